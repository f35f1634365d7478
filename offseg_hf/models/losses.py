"""The segmentation loss: cross entropy of the logits upsampled bilinearly to the label size, pixels labelled with
the ignore index left out (mmseg's and transformers' SegFormer loss). `fast_losses.py` computes the same value band by
band without the full-resolution logits; `forms.py` says when each runs."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .fast_losses import banded_cross_entropy


def upsampled_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, form: str = "fast"
) -> torch.Tensor:
    """Mean cross entropy of `logits` (B, K, h, w) upsampled (bilinear, align_corners=False) to the size of `labels`
    (B, H, W), over the pixels not labelled `ignore_index` (nan if there are none). `form="fast"` runs
    `fast_losses.banded_cross_entropy` (not under torch.compile, which fuses the plain formula itself)."""
    if form != "reference" and not torch.compiler.is_compiling():
        return banded_cross_entropy(logits, labels, ignore_index)
    upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(upsampled, labels, ignore_index=ignore_index)
