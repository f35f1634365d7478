"""Inference with mmseg's test protocol: keep-ratio resize to a scale, whole-image or sliding-window logits,
logits resized back to the original image, and `evaluate_dataset`, the one mIoU loop that training-time
evaluation and `examples/evaluate_segmentation.py` share (so both report the same figures for the same weights).

mmseg's sliding window (`slide` mode): windows of `crop_size` every `stride`, the last row/column of windows
aligned to the image border (so windows overlap more there), each window's logits resized to the window, summed
where windows overlap and divided by the number of windows covering each pixel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..data.transforms import rescale_size  # mmcv's keep-ratio rule, shared with training-time evaluation
from ..models.resize_bands import resize_argmax
from .metrics import SegmentationMetrics

# mmseg's ADE20K / COCO-Stuff test settings (the paper's): Resize(scale=(2048, 512), keep_ratio=True),
# slide crop 512, stride 480.
DEFAULT_SCALE = (2048, 512)
DEFAULT_CROP = (512, 512)
DEFAULT_STRIDE = (480, 480)


def _logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    outputs = model(pixel_values=pixel_values)
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    # Half-precision logits (autocast, or a half model) are resized, averaged and compared in float32.
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


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
    """Logits at `original_size` for images already resized (e.g. by `rescale_size`) and normalised: the whole
    (B, K, H, W) tensor; `predict_labels` gives the label maps without it."""
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
    to `original_sizes[i]` and argmax, as mmseg's post-processing, in row bands within $OFFSEG_RESIZE_BUDGET_MB
    (default 256 MiB; `offseg_hf.models.resize_bands`: the same label maps without the (K, H_i, W_i) resized logits).
    Returns B tensors (H_i, W_i) of class ids.
    """
    if len(original_sizes) != pixel_values.shape[0]:
        raise ValueError(f"{len(original_sizes)} original sizes for a batch of {pixel_values.shape[0]} images.")
    logits = _logits_at_input_size(model, pixel_values, mode, num_labels, crop_size, stride)
    return [resize_argmax(logits[i], tuple(size)).label_map for i, size in enumerate(original_sizes)]


def same_size_batches(samples: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    """Samples in order, consecutive ones whose "pixel_values" have the same shape grouped into lists of up to
    `batch_size` (after the keep-ratio resize most ADE20K images, being 4:3, become 512x683)."""
    batch: list[dict] = []
    for sample in samples:
        if batch and (len(batch) == batch_size or sample["pixel_values"].shape != batch[0]["pixel_values"].shape):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


class _AutocastForward:
    """`model(pixel_values=...)` inside `autocast()`; only the forward pass: resizing, window averaging and the
    argmax stay outside, in float32."""

    def __init__(self, model: nn.Module, autocast: Callable[[], AbstractContextManager]):
        self.model, self.autocast = model, autocast

    def __call__(self, pixel_values: torch.Tensor):
        with self.autocast():
            return self.model(pixel_values=pixel_values)


@torch.no_grad()
def evaluate_dataset(
    model: nn.Module,
    dataset,
    num_labels: int,
    *,
    ignore_index: int = 255,
    mode: str = "whole",
    crop_size: tuple[int, int] = DEFAULT_CROP,
    stride: tuple[int, int] = DEFAULT_STRIDE,
    batch_size: int = 1,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    autocast: Callable[[], AbstractContextManager] | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = False,
) -> SegmentationMetrics:
    """The confusion matrix of `model` over this process's share of `dataset`, with mmseg's test protocol.

    Args:
        dataset: yields {"pixel_values": (3, h, w) keep-ratio resized and normalised, "labels": (H, W) at the
            original size}, e.g. `offseg_hf.data.datasets.SegmentationDataset` with
            `offseg_hf.data.transforms.EvalTransform`.
        mode, crop_size, stride: `predict_labels`'s: logits of the whole image or of sliding windows, resized to
            each image's original size, argmax.
        batch_size: consecutive samples of equal resized size run in one forward pass, up to this many.
        num_workers: DataLoader workers decoding and resizing images.
        device: where the images go; default the model's.
        autocast: optional context-manager factory around the forward pass (e.g. `accelerator.autocast`).
        shard: (index, count): this process evaluates samples index, index + count, ...; sum the returned
            matrices over the `count` processes for the whole set.
        progress: show a progress bar.

    The model is in eval mode meanwhile; every submodule's mode is restored afterwards (a backbone kept in eval
    mode inside a training model stays so). Returns a `SegmentationMetrics` holding this shard's matrix.
    """
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {shard}: the index must be in [0, count).")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if mode not in ("slide", "whole"):
        raise ValueError(f"Unknown inference mode {mode!r}; use 'slide' or 'whole'.")
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    if device is None:
        device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    forward = model if autocast is None else _AutocastForward(model, autocast)

    indices = range(index, len(dataset), count)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=None, num_workers=num_workers
    )
    metrics = SegmentationMetrics(num_labels=num_labels, ignore_index=ignore_index)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    bar = tqdm(total=len(indices), desc=f"eval ({mode})", unit="img", disable=not progress, leave=False)
    try:
        for batch in same_size_batches(loader, batch_size):
            pixel_values = torch.stack([sample["pixel_values"] for sample in batch]).to(device, dtype)  # (B, 3, h, w)
            predictions = predict_labels(
                forward,
                pixel_values,
                [tuple(sample["labels"].shape[-2:]) for sample in batch],
                mode=mode,
                num_labels=num_labels,
                crop_size=tuple(crop_size),
                stride=tuple(stride),
            )
            for prediction, sample in zip(predictions, batch, strict=True):
                metrics.update(prediction, sample["labels"].to(prediction.device))
            bar.update(len(batch))
    finally:
        bar.close()
        for module, training in modes:
            module.training = training
    return metrics


__all__ = [
    "DEFAULT_CROP",
    "DEFAULT_SCALE",
    "DEFAULT_STRIDE",
    "evaluate_dataset",
    "predict_labels",
    "predict_logits",
    "rescale_size",
    "same_size_batches",
    "slide_inference",
    "whole_inference",
    "window_boxes",
]
