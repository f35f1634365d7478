"""mmseg's training and test pipelines for semantic segmentation, on torch tensors.

Training (mmseg's ADE20K pipeline, in its order): random resize of a (long, short) scale by a ratio in
[0.5, 2.0] keeping the aspect ratio (or, as the Mask2Former configs do, a short edge drawn from a fixed list with
the long edge capped) -> random crop with at most `cat_max_ratio` of the crop one class ->
horizontal flip -> photometric distortion -> ImageNet normalisation -> pad to the crop size (0 for the normalised
image, the ignore index for labels). torchvision has no category-ratio crop and no mmseg-style photometric
distortion, hence this module.

Every random choice comes from the `np.random.Generator` passed in, which `SegmentationDataset` seeds per sample:
augmentation is reproducible and independent of DataLoader workers.

Images are (3, H, W) uint8 RGB tensors and labels (H, W) int64 tensors until normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 scale
IMAGENET_STD = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(height, width) resized keeping the aspect ratio so the long edge fits max(scale) and the short edge
    min(scale) (mmcv's `rescale_size`, rounding half up)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize(image: torch.Tensor, labels: torch.Tensor | None, size: tuple[int, int]):
    """Bilinear for the image (no antialiasing, half-pixel centres, as OpenCV), nearest for labels."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, labels
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    image = resized.round_().clamp_(0, 255).to(torch.uint8)
    if labels is not None:
        labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, labels


def random_resize(
    image: torch.Tensor,
    labels: torch.Tensor,
    rng: np.random.Generator,
    scale: tuple[int, int] = (2048, 512),
    ratio_range: tuple[float, float] = (0.5, 2.0),
):
    """Scale `scale` by a ratio drawn uniformly from `ratio_range`, then resize keeping the aspect ratio."""
    ratio = rng.uniform(ratio_range[0], ratio_range[1])
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    return resize(image, labels, rescale_size(image.shape[-2], image.shape[-1], target))


def shortest_edge_choices(scale: tuple[int, int], ratio_range: tuple[float, float]) -> list[int]:
    """The short edges mmseg's Mask2Former configs choose from: `int(short * x * 0.1)` for x from 10 x the low ratio
    to 10 x the high one (scale (2048, 512), ratios 0.5-2.0: 256, 307, 358, ..., 972, 1024)."""
    short = min(scale)
    return [int(short * x * 0.1) for x in range(round(ratio_range[0] * 10), round(ratio_range[1] * 10) + 1)]


def shortest_edge_size(height: int, width: int, edge: int, max_size: int) -> tuple[int, int]:
    """mmseg's `ResizeShortestEdge`: the short edge to `edge` keeping the ratio, unless the long edge would pass
    `max_size`, which then bounds it; rounded half up."""
    factor = edge / min(height, width)
    new_height, new_width = height * factor, width * factor
    if max(new_height, new_width) > max_size:
        shrink = max_size / max(new_height, new_width)
        new_height, new_width = new_height * shrink, new_width * shrink
    return int(new_height + 0.5), int(new_width + 0.5)


def random_shortest_edge_resize(
    image: torch.Tensor,
    labels: torch.Tensor,
    rng: np.random.Generator,
    scale: tuple[int, int] = (2048, 512),
    ratio_range: tuple[float, float] = (0.5, 2.0),
):
    """mmseg's `RandomChoiceResize(scales=shortest_edge_choices(...), resize_type="ResizeShortestEdge",
    max_size=max(scale))`: one short edge drawn uniformly from the choices."""
    choices = shortest_edge_choices(scale, ratio_range)
    edge = choices[int(rng.integers(len(choices)))]
    return resize(image, labels, shortest_edge_size(image.shape[-2], image.shape[-1], edge, max(scale)))


RESIZE_MODES = {"ratio": random_resize, "shortest_edge": random_shortest_edge_resize}


def _crop_box(height: int, width: int, crop: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    top = int(rng.integers(0, max(height - crop[0], 0) + 1))
    left = int(rng.integers(0, max(width - crop[1], 0) + 1))
    return top, min(top + crop[0], height), left, min(left + crop[1], width)


def largest_class_fraction(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[float, int]:
    """(share of the most frequent class among labelled pixels, number of classes present); ignore excluded."""
    counts = torch.bincount(labels.reshape(-1), minlength=256)
    if ignore_index < counts.numel():
        counts[ignore_index] = 0
    present = int((counts > 0).sum())
    total = int(counts.sum())
    return (float(counts.max()) / total if total else 1.0), present


def random_crop(
    image: torch.Tensor,
    labels: torch.Tensor,
    rng: np.random.Generator,
    crop_size: tuple[int, int] = (512, 512),
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
    max_tries: int = 10,
):
    """A random crop (smaller where the image is smaller) in which no single class covers `cat_max_ratio` or more
    of the labelled pixels, when one can be found.

    mmseg's rule: up to `max_tries` candidate windows are checked in turn and the first with at least two classes
    and a largest class share below `cat_max_ratio` is taken; if none passes, one more window is drawn and used
    as it is. The ignore index does not count.
    """
    height, width = labels.shape
    box = _crop_box(height, width, crop_size, rng)
    if cat_max_ratio < 1.0:
        for _ in range(max_tries):
            top, bottom, left, right = box
            share, present = largest_class_fraction(labels[top:bottom, left:right], ignore_index)
            if present > 1 and share < cat_max_ratio:
                break
            box = _crop_box(height, width, crop_size, rng)
    top, bottom, left, right = box
    return image[:, top:bottom, left:right], labels[top:bottom, left:right]


def random_flip(image: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator, prob: float = 0.5):
    """Horizontal flip with probability `prob`."""
    if rng.random() < prob:
        return image.flip(-1), labels.flip(-1)
    return image, labels


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float RGB in [0, 255] -> HSV with OpenCV's 8-bit ranges: H in [0, 180), S and V in [0, 255]."""
    red, green, blue = rgb.unbind(0)
    value, _ = rgb.max(0)
    minimum, _ = rgb.min(0)
    delta = value - minimum
    saturation = torch.where(value > 0, delta / value.clamp(min=1e-12) * 255, torch.zeros_like(value))
    safe = delta.clamp(min=1e-12)
    hue = torch.where(
        value == red,
        60 * (green - blue) / safe,
        torch.where(value == green, 120 + 60 * (blue - red) / safe, 240 + 60 * (red - green) / safe),
    )
    hue = torch.where(delta > 0, torch.remainder(hue, 360), torch.zeros_like(hue)) / 2
    return torch.stack([hue, saturation, value])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hsv`: OpenCV 8-bit HSV ranges -> float RGB in [0, 255]."""
    hue, saturation, value = hsv.unbind(0)
    hue = torch.remainder(hue * 2, 360) / 60  # sector coordinate in [0, 6)
    chroma = value * saturation / 255
    # f(n) = V - C * clamp(min(k, 4 - k), 0, 1) with k = (n + H/60) mod 6 gives R, G, B for n = 5, 3, 1.
    channels = []
    for n in (5, 3, 1):
        k = torch.remainder(n + hue, 6)
        channels.append(value - chroma * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(channels)


def _convert(values: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """values * alpha + beta, clipped to [0, 255] and truncated to integers (mmseg casts to uint8 after each)."""
    return (values * alpha + beta).clamp_(0, 255).floor_()


def photometric_distortion(
    image: torch.Tensor,
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a (3, H, W) uint8 RGB image; each step applies with probability 1/2:
    brightness (+ U(-32, 32)), then contrast (x U(0.5, 1.5)) either first or last (coin flip), saturation
    (HSV S x U(0.5, 1.5)) and hue (HSV H + an integer in [-18, 18), 2 degrees a unit). Returns uint8.

    Differences from mmseg: the HSV round trip is in float (OpenCV rounds H, S, V to 8 bits), and the image is
    RGB where mmseg's is BGR, which changes nothing here (hue is computed from the right channels either way).
    """
    values = image.float()
    if rng.integers(2):
        values = _convert(values, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        values = _convert(values, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hsv = rgb_to_hsv(values)
        hsv[1] = _convert(hsv[1], alpha=rng.uniform(*saturation_range))
        values = hsv_to_rgb(hsv).round_().clamp_(0, 255)
    if rng.integers(2):
        hsv = rgb_to_hsv(values)
        hsv[0] = torch.remainder(hsv[0] + int(rng.integers(-hue_delta, hue_delta)), 180)
        values = hsv_to_rgb(hsv).round_().clamp_(0, 255)
    if not contrast_first and rng.integers(2):
        values = _convert(values, alpha=rng.uniform(*contrast_range))
    return values.to(torch.uint8)


def normalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(3, H, W) uint8 RGB -> float (x - mean) / std."""
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (image.float() - mean) / std


def pad_to(
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    size: tuple[int, int],
    pad_value: float = 0.0,
    label_pad_value: int = IGNORE_INDEX,
):
    """Pad bottom and right up to `size` (mmseg pads after normalising, so 0 is the mean colour)."""
    pad_h, pad_w = max(size[0] - pixel_values.shape[-2], 0), max(size[1] - pixel_values.shape[-1], 0)
    if pad_h or pad_w:
        pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h), value=pad_value)
        labels = F.pad(labels, (0, pad_w, 0, pad_h), value=label_pad_value)
    return pixel_values, labels


@dataclass
class TrainTransform:
    """mmseg's training pipeline; call with (image uint8 (3, H, W), labels int64 (H, W), rng).

    Returns (pixel_values float (3, crop_h, crop_w), labels int64 (crop_h, crop_w)).
    """

    crop_size: tuple[int, int] = (512, 512)
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    resize_mode: str = "ratio"  # "ratio": `random_resize`; "shortest_edge": `random_shortest_edge_resize`
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int = IGNORE_INDEX

    def __call__(self, image: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        image, labels = RESIZE_MODES[self.resize_mode](image, labels, rng, self.scale, self.ratio_range)
        image, labels = random_crop(image, labels, rng, self.crop_size, self.cat_max_ratio, self.ignore_index)
        image, labels = random_flip(image, labels, rng, self.flip_prob)
        if self.photometric:
            image = photometric_distortion(image, rng)
        pixel_values = normalize(image, self.mean, self.std)
        return pad_to(pixel_values, labels, self.crop_size, 0.0, self.ignore_index)


@dataclass
class EvalTransform:
    """Whole-image evaluation input: resize keeping the aspect ratio to `scale` and normalise; the labels stay at
    the original size (logits are resized to them). Call with (image, labels, rng=None)."""

    scale: tuple[int, int] = (2048, 512)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator | None = None):
        size = rescale_size(image.shape[-2], image.shape[-1], self.scale)
        image, _ = resize(image, None, size)
        return normalize(image, self.mean, self.std), labels


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "TrainTransform",
    "hsv_to_rgb",
    "largest_class_fraction",
    "normalize",
    "pad_to",
    "photometric_distortion",
    "random_crop",
    "random_flip",
    "random_resize",
    "rescale_size",
    "resize",
    "rgb_to_hsv",
]
