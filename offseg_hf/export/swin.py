"""Branch-free padding for transformers' Swin, so Mask2Former exports with symbolic height and width.

transformers' Swin pads with Python branches on the sizes (`if width % patch != 0`, `if height % 2 == 1`,
`if pad_right > 0 ...`) and writes the padded window sizes as `(window - h % window) % window`. Traced with symbolic
sizes, every branch becomes a guard on the example's sizes (the exported graph then holds only for heights and widths
that are multiples of 32, and fails at another batch size), and the padded size is an expression the exporter cannot
prove divisible by the window, so the window reshapes add guards of their own.

`branch_free_swin()` replaces, for the duration of a block, three methods of transformers' Swin classes with
equivalents that always pad (a zero pad is the identity) to sizes written as `ceil(n / m) * m`, and always crop back.
Values are unchanged: the same zero padding, the same windows, the same crop. Only the window clamp for stages no
larger than one window (`SwinLayer.set_shift_and_window_size`) stays a branch: the graph holds for inputs whose every
Swin stage is larger than one window (at least 225 x 225 pixels for Swin-T's 7 x 7 windows at 1/32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch
from torch.nn import functional as F
from transformers.models.swin import modeling_swin as swin


def _round_up(size, multiple: int):
    """The smallest multiple of `multiple` not below `size`, as ceil(size / multiple) * multiple (an expression whose
    divisibility the exporter can see)."""
    return (size + multiple - 1) // multiple * multiple


def _pad_pixels(self, pixel_values: torch.Tensor, height, width) -> torch.Tensor:
    """`SwinPatchEmbeddings.maybe_pad`: (B, C, H, W) padded right and bottom to multiples of the patch size."""
    patch_height, patch_width = self.patch_size
    return F.pad(pixel_values, (0, _round_up(width, patch_width) - width, 0, _round_up(height, patch_height) - height))


def _pad_merging(self, input_feature: torch.Tensor, height, width) -> torch.Tensor:
    """`SwinPatchMerging.maybe_pad`: (B, H, W, C) padded right and bottom to even sizes."""
    return F.pad(input_feature, (0, 0, 0, _round_up(width, 2) - width, 0, _round_up(height, 2) - height))


def _layer_forward(self, hidden_states: torch.Tensor, input_dimensions, always_partition: bool = False, **kwargs):
    """`SwinLayer.forward`: (shifted) window attention on the map padded to whole windows, cropped back
    unconditionally, then the MLP; both with their residuals."""
    if not always_partition:
        self.set_shift_and_window_size(input_dimensions)
    height, width = input_dimensions
    batch_size, _, channels = hidden_states.shape
    window = self.window_size
    padded_height, padded_width = _round_up(height, window), _round_up(width, window)

    grid = self.layernorm_before(hidden_states).view(batch_size, height, width, channels)
    grid = F.pad(grid, (0, 0, 0, padded_width - width, 0, padded_height - height))
    windows = swin.window_partition(self.cyclic_shift(grid), window).view(-1, window * window, channels)
    mask = self.get_attn_mask(padded_height, padded_width, dtype=grid.dtype, device=grid.device)
    attended, attention_weights = self.attention(windows, mask, **kwargs)
    attended = self.dropout(attended).view(-1, window, window, channels)
    grid = self.cyclic_shift(swin.window_reverse(attended, window, padded_height, padded_width), reverse=True)
    attended = grid[:, :height, :width, :].reshape(batch_size, height * width, channels)

    hidden_states = hidden_states + self.drop_path(attended)
    hidden_states = hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states)))
    return hidden_states, attention_weights


@contextlib.contextmanager
def branch_free_swin() -> Iterator[None]:
    """Within the block, transformers' Swin pads without branches on the sizes (module docstring); restored on
    exit."""
    with (
        mock.patch.object(swin.SwinPatchEmbeddings, "maybe_pad", _pad_pixels),
        mock.patch.object(swin.SwinPatchMerging, "maybe_pad", _pad_merging),
        mock.patch.object(swin.SwinLayer, "forward", _layer_forward),
    ):
        yield


__all__ = ["branch_free_swin"]
