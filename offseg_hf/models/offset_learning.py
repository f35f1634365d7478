"""Offset learning (Zhang et al., ICCV 2025, Sec. 3.3), the per-pixel baseline classifier, and offset learning for
mask classification (`MaskOffsetLearning`, Mask2Former).

Notation of the paper: pixel embeddings E (HW, C), class embeddings W (K, C).

    A   = W E^T                        coupled attention            (4)
    dW  = P_c (Softmax_HW(A) E)        class offset                 (5)-(7)
    dE  = P_f (Softmax_K(A)^T W)       feature offset               (9)-(11)
    M   = (W + dW)(E + dE)^T           masks                        (13)
    out = LayerNorm_K(M)

P_c and P_f are bias-free C x C linear maps. `OffsetLearning.forward` with `form = "reference"` computes exactly
these lines in this order. By default (`form = "fast"`) it runs `fast_offset_learning.offset_learning`, the same
values up to float rounding with the products reordered so that none costs HW x C x C (see that module and
`forms.py`).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init

from .fast_offset_learning import mask_offset_learning, offset_learning
from .forms import HasForms
from .layers import initialise_with


def _trunc_normal_(module: nn.Module, std: float) -> None:
    for param in module.parameters(recurse=False):
        init.trunc_normal_(param, std=std)


def _conv_seg_(conv: nn.Conv2d) -> None:
    # mmseg's BaseDecodeHead.conv_seg: normal(0, 0.01), zero bias.
    init.normal_(conv.weight, mean=0.0, std=0.01)
    init.zeros_(conv.bias)


class OffsetLearning(HasForms, nn.Module):
    """Class- and feature-offset learning followed by a LayerNorm over the class scores.

    Args:
        num_classes: K.
        channels: C, the width of the pixel embeddings.
        class_offset: use the class-offset branch (W' = W + dW); otherwise W' = W.
        feature_offset: use the feature-offset branch (E' = E + dE); otherwise E' = E.
        initializer_range: std of the truncated-normal init of W and both projections (official: 0.02).
    """

    def __init__(
        self,
        num_classes: int,
        channels: int,
        class_offset: bool = True,
        feature_offset: bool = True,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.channels = channels
        self.initializer_range = initializer_range
        self.class_embeddings = nn.Parameter(torch.zeros(num_classes, channels))  # W (K, C)
        self.class_offset_proj = nn.Linear(channels, channels, bias=False) if class_offset else None
        self.feature_offset_proj = nn.Linear(channels, channels, bias=False) if feature_offset else None
        self.mask_norm = nn.LayerNorm(num_classes)
        # As the official head: truncated normal for W and both offset projections (the LayerNorm starts at 1, 0).
        for module in (self, self.class_offset_proj, self.feature_offset_proj):
            if module is not None:
                initialise_with(module, partial(_trunc_normal_, std=initializer_range))

    def _flatten(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> E^T: (B, C, HW), a view; checks the channel count."""
        if features.shape[1] != self.channels:
            raise ValueError(f"OffsetLearning expects {self.channels} feature channels, got {features.shape[1]}.")
        return features.flatten(2)

    def _aligned_classes(self, embeddings: torch.Tensor, class_attention: torch.Tensor | None) -> torch.Tensor:
        """W' = W + dW, (B, K, C), from E^T (B, C, HW) and Softmax_HW(A) (B, K, HW); W broadcast when there is no
        class offset."""
        class_embeddings = self.class_embeddings  # W: (K, C)
        if self.class_offset_proj is None:
            return class_embeddings.expand(embeddings.shape[0], -1, -1)
        class_context = torch.matmul(class_attention, embeddings.transpose(1, 2))  # F_cls: (B, K, C)
        return class_embeddings + self.class_offset_proj(class_context)

    def aligned_class_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """The per-image class representations W + dW (B, K, C) that `forward` scores (B, C, H, W) features with
        (W itself, broadcast over the batch, without the class-offset branch)."""
        embeddings = self._flatten(features)
        class_attention = None
        if self.class_offset_proj is not None:
            class_attention = torch.matmul(self.class_embeddings, embeddings).softmax(dim=-1)  # (B, K, HW)
        return self._aligned_classes(embeddings, class_attention)

    def forward(
        self, features: torch.Tensor, output_class_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) pixel embeddings -> (B, K, H, W) normalised class scores.

        With `output_class_attention=True`, returns `(scores, class_attention)`: class_attention (B, K, H, W) is
        Softmax_HW(A), A = W E^T, the per-class distribution over positions that the class offset pools E with
        (Eq. 4-5). It is the tensor the class-offset branch computes anyway; without that branch it is computed for
        the output only.
        """
        if self.form != "reference":
            return offset_learning(self, features, output_class_attention)
        height, width = features.shape[-2:]
        pixels = self._flatten(features).transpose(1, 2)  # E: (B, HW, C)
        classes = self.class_embeddings  # W: (K, C)
        coupled_attention = torch.matmul(classes, pixels.transpose(1, 2))  # A = W E^T: (B, K, HW)
        class_attention = coupled_attention.softmax(dim=-1)  # Softmax_HW(A)
        aligned_classes = classes.expand(pixels.shape[0], -1, -1)  # W' = W without the class offset
        if self.class_offset_proj is not None:
            aligned_classes = classes + self.class_offset_proj(torch.matmul(class_attention, pixels))  # W + dW
        aligned_pixels = pixels  # E' = E without the feature offset
        if self.feature_offset_proj is not None:
            position_attention = coupled_attention.softmax(dim=1).transpose(1, 2)  # Softmax_K(A)^T: (B, HW, K)
            aligned_pixels = pixels + self.feature_offset_proj(torch.matmul(position_attention, classes))  # E + dE
        masks = torch.matmul(aligned_pixels, aligned_classes.transpose(1, 2))  # M^T = E' W'^T: (B, HW, K)
        scores = self.mask_norm(masks).transpose(1, 2).unflatten(2, (height, width))  # LayerNorm_K: (B, K, H, W)
        if output_class_attention:
            return scores, class_attention.unflatten(2, (height, width))
        return scores


class PerPixelClassifier(nn.Module):
    """The per-pixel paradigm the paper compares against: dropout + 1x1 convolution (mmseg's `cls_seg`)."""

    def __init__(self, num_classes: int, channels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = initialise_with(nn.Conv2d(channels, num_classes, kernel_size=1), _conv_seg_)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(features))  # (B, K, H, W)


class MaskOffsetLearning(HasForms, nn.Module):
    """Offset learning for mask classification (Mask2Former, the paper's Sec. 4.3): aligns the mask embeddings q
    (B, Q, C) of the queries and the per-pixel mask features F (B, C, H, W) before the masks are predicted.

        A  = q F^T                         coupled attention, (Q, HW) per image
        q' = q + P_c(Softmax_HW(A) F)      class (query) offset
        F' = F + P_f(Softmax_Q(A)^T q)     feature offset
        masks = q' F'^T

    P_c and P_f are bias-free C x C maps; there is no LayerNorm (the masks go through a sigmoid). `forward` returns
    the masks; by default in the fast form (`fast_offset_learning.mask_offset_learning`).
    """

    def __init__(self, channels: int, initializer_range: float = 0.02):
        super().__init__()
        self.channels = channels
        self.class_offset_proj = nn.Linear(channels, channels, bias=False)
        self.feature_offset_proj = nn.Linear(channels, channels, bias=False)
        for module in (self.class_offset_proj, self.feature_offset_proj):
            initialise_with(module, partial(_trunc_normal_, std=initializer_range))

    def forward(
        self,
        mask_embeddings: torch.Tensor,
        mask_features: torch.Tensor,
        size: tuple[int, int] | None = None,
        resized_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, Q, C) mask embeddings and (B, C, H, W) mask features -> (B, Q, H, W) mask logits.

        With `size` (h, w), the masks come out bilinearly resized to it (`align_corners=False`), as Mask2Former's
        attention masks are made. The offsets always come from every position of F. `resized_features`, F resized to
        `size`, may be passed to share it between calls (the fast form uses it; the reference form resizes the
        masks).
        """
        if self.form != "reference":
            return mask_offset_learning(self, mask_embeddings, mask_features, size, resized_features)
        height, width = mask_features.shape[-2:]
        features = mask_features.flatten(2).transpose(1, 2)  # F: (B, HW, C)
        coupled_attention = torch.matmul(mask_embeddings, features.transpose(1, 2))  # A = q F^T: (B, Q, HW)
        class_context = torch.matmul(coupled_attention.softmax(dim=-1), features)  # Softmax_HW(A) F: (B, Q, C)
        aligned_queries = mask_embeddings + self.class_offset_proj(class_context)  # q'
        position_attention = coupled_attention.softmax(dim=1).transpose(1, 2)  # Softmax_Q(A)^T: (B, HW, Q)
        aligned_features = features + self.feature_offset_proj(torch.matmul(position_attention, mask_embeddings))
        masks = torch.matmul(aligned_queries, aligned_features.transpose(1, 2)).unflatten(2, (height, width))
        if size is not None and tuple(size) != (height, width):
            masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        return masks


__all__ = ["MaskOffsetLearning", "OffsetLearning", "PerPixelClassifier"]
