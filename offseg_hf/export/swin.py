"""Branch-free padding for transformers' Swin, so Mask2Former exports with symbolic height and width.

transformers' Swin pads with Python branches on the sizes (`if width % patch != 0`, `if height % 2 == 1`,
`if pad_right > 0 ...`) and writes the padded window sizes as `(window - h % window) % window`. Traced with symbolic
sizes, every branch becomes a guard on the example's sizes (the exported graph then holds only for heights and widths
that are multiples of 32, and fails at another batch size), and the padded size is an expression the exporter cannot
prove divisible by the window, so the window reshapes add guards of their own.

The three subclasses below (`BranchFreeSwinPatchEmbeddings`, `BranchFreeSwinPatchMerging`, `BranchFreeSwinLayer`)
always pad (a zero pad is the identity) to sizes written as `ceil(n / m) * m`, and always crop back. Values are
unchanged: the same zero padding, the same windows, the same crop. Only the window clamp for stages no larger than
one window (`SwinLayer.set_shift_and_window_size`) stays a branch: the graph holds for inputs whose every Swin stage
is larger than one window (at least 225 x 225 pixels for Swin-T's 7 x 7 windows at 1/32).

`branch_free_swin(model)` gives, for the duration of a block, the Swin modules of `model` (and of no other model)
these classes. The classes of `transformers` are never modified: a method assigned on a class, or a function
assigned on the `torch` module, would change every model in the process, including one another thread is running.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.swin import modeling_swin as swin

from .subclasses import swapped_classes


def _round_up(size, multiple: int):
    """The smallest multiple of `multiple` not below `size`, as ceil(size / multiple) * multiple (an expression whose
    divisibility the exporter can see)."""
    return (size + multiple - 1) // multiple * multiple


class BranchFreeSwinPatchEmbeddings(swin.SwinPatchEmbeddings):
    def maybe_pad(self, pixel_values: torch.Tensor, height, width) -> torch.Tensor:
        """(B, C, H, W) padded right and bottom to multiples of the patch size."""
        patch_height, patch_width = self.patch_size
        padding = (0, _round_up(width, patch_width) - width, 0, _round_up(height, patch_height) - height)
        return F.pad(pixel_values, padding)


class BranchFreeSwinPatchMerging(swin.SwinPatchMerging):
    def maybe_pad(self, input_feature: torch.Tensor, height, width) -> torch.Tensor:
        """(B, H, W, C) padded right and bottom to even sizes."""
        return F.pad(input_feature, (0, 0, 0, _round_up(width, 2) - width, 0, _round_up(height, 2) - height))


class BranchFreeSwinLayer(swin.SwinLayer):
    def forward(self, hidden_states: torch.Tensor, input_dimensions, always_partition: bool = False, **kwargs):
        """(Shifted) window attention on the map padded to whole windows, cropped back unconditionally, then the MLP;
        both with their residuals."""
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


BRANCH_FREE_SWIN: dict[type[nn.Module], type[nn.Module]] = {
    swin.SwinPatchEmbeddings: BranchFreeSwinPatchEmbeddings,
    swin.SwinPatchMerging: BranchFreeSwinPatchMerging,
    swin.SwinLayer: BranchFreeSwinLayer,
}


def branch_free_swin(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Within the block, the Swin modules of `model` pad without branches on the sizes (module docstring); their
    classes are restored on exit. Other models, and `transformers`' classes, are unaffected."""
    return swapped_classes(model, BRANCH_FREE_SWIN)


__all__ = [
    "BRANCH_FREE_SWIN",
    "BranchFreeSwinLayer",
    "BranchFreeSwinPatchEmbeddings",
    "BranchFreeSwinPatchMerging",
    "branch_free_swin",
]
