"""Inference with mmseg's test protocol: keep-ratio resize to a scale, whole-image or sliding-window logits,
logits resized back to the original image.

mmseg's sliding window (`slide` mode): windows of `crop_size` every `stride`, the last row/column of windows
aligned to the image border (so windows overlap more there), each window's logits resized to the window, summed
where windows overlap and divided by the number of windows covering each pixel.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .transforms import rescale_size  # mmcv's keep-ratio rule, shared with training-time evaluation

# mmseg's ADE20K / COCO-Stuff test settings (the paper's): Resize(scale=(2048, 512), keep_ratio=True),
# slide crop 512, stride 480.
DEFAULT_SCALE = (2048, 512)
DEFAULT_CROP = (512, 512)
DEFAULT_STRIDE = (480, 480)


def _logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    outputs = model(pixel_values=pixel_values)
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


def whole_inference(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, K, H, W): the whole image at once, logits resized to the input."""
    logits = _logits(model, pixel_values)
    return F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)


def window_boxes(height: int, width: int, crop_size=DEFAULT_CROP, stride=DEFAULT_STRIDE) -> list[tuple[int, ...]]:
    """mmseg's sliding windows as (top, bottom, left, right)."""
    (crop_h, crop_w), (stride_h, stride_w) = crop_size, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for row in range(rows):
        for col in range(cols):
            bottom, right = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            boxes.append((max(bottom - crop_h, 0), bottom, max(right - crop_w, 0), right))
    return boxes


def slide_inference(
    model: nn.Module,
    pixel_values: torch.Tensor,
    num_labels: int,
    crop_size: tuple[int, int] = DEFAULT_CROP,
    stride: tuple[int, int] = DEFAULT_STRIDE,
    windows_per_batch: int = 8,
) -> torch.Tensor:
    """(B, 3, H, W) -> (B, K, H, W) averaged over overlapping windows; windows of equal size run batched."""
    batch_size, _, height, width = pixel_values.shape
    summed = pixel_values.new_zeros(batch_size, num_labels, height, width)
    counts = pixel_values.new_zeros(1, 1, height, width)
    boxes = window_boxes(height, width, crop_size, stride)
    step = math.ceil(windows_per_batch / batch_size)
    for start in range(0, len(boxes), step):
        chunk = boxes[start : start + step]
        # All windows have the same size (the crop, or the image where it is smaller), so they batch.
        crops = torch.cat([pixel_values[:, :, top:bottom, left:right] for top, bottom, left, right in chunk])
        logits = _logits(model, crops)
        logits = F.interpolate(logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)
        for index, (top, bottom, left, right) in enumerate(chunk):
            summed[:, :, top:bottom, left:right] += logits[index * batch_size : (index + 1) * batch_size]
            counts[:, :, top:bottom, left:right] += 1
    return summed / counts


def _logits_at_input_size(model, pixel_values, mode, num_labels, crop_size, stride) -> torch.Tensor:
    if mode == "slide":
        num_labels = num_labels or model.config.num_labels
        return slide_inference(model, pixel_values, num_labels, crop_size, stride)
    if mode == "whole":
        return whole_inference(model, pixel_values)
    raise ValueError(f"Unknown inference mode {mode!r}; use 'slide' or 'whole'.")


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    pixel_values: torch.Tensor,
    original_size: tuple[int, int],
    mode: str = "slide",
    num_labels: int | None = None,
    crop_size: tuple[int, int] = DEFAULT_CROP,
    stride: tuple[int, int] = DEFAULT_STRIDE,
) -> torch.Tensor:
    """Logits at `original_size` for images already resized (e.g. by `rescale_size`) and normalised."""
    logits = _logits_at_input_size(model, pixel_values, mode, num_labels, crop_size, stride)
    return F.interpolate(logits, size=original_size, mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_labels(
    model: nn.Module,
    pixel_values: torch.Tensor,
    original_sizes: list[tuple[int, int]],
    mode: str = "slide",
    num_labels: int | None = None,
    crop_size: tuple[int, int] = DEFAULT_CROP,
    stride: tuple[int, int] = DEFAULT_STRIDE,
) -> list[torch.Tensor]:
    """Label maps for a batch of images resized to one common size, each at its own original size.

    pixel_values (B, 3, h, w) -> logits (B, K, h, w) in one pass (slide or whole) -> per image: bilinear resize
    to `original_sizes[i]` and argmax, as mmseg's post-processing. Returns B tensors (H_i, W_i) of class ids.
    """
    if len(original_sizes) != pixel_values.shape[0]:
        raise ValueError(f"{len(original_sizes)} original sizes for a batch of {pixel_values.shape[0]} images.")
    logits = _logits_at_input_size(model, pixel_values, mode, num_labels, crop_size, stride)
    return [
        F.interpolate(logits[i : i + 1], size=tuple(size), mode="bilinear", align_corners=False).argmax(dim=1)[0]
        for i, size in enumerate(original_sizes)
    ]


__all__ = ["rescale_size", "predict_labels", "predict_logits", "slide_inference", "whole_inference", "window_boxes"]
