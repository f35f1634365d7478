"""A channels-first Mix-FFN for transformers' SegFormer encoder (MiT), used while exporting to ONNX.

transformers' `SegformerMixMLP` keeps the tokens as (B, N, C): `fc1` widens them to (B, N, 4C), the depthwise 3x3
convolution needs (B, 4C, H, W), so the widened map is transposed there and back, and `fc2` narrows it again. In
ONNX Runtime the transpose of the widened map is the most expensive kernel of a MiT block (about as much as the
block's two attention products together).

`ChannelsFirstMixFFN`, a subclass of `SegformerMixMLP`, computes the same with the transposes moved to the narrow
ends: the C-channel tokens are laid out as (B, C, H, W) once, `fc1` and `fc2` run as 1x1 convolutions with their own
weights (a Linear layer is a 1x1 convolution), the depthwise convolution and the activation in between need no
transpose, and the C-channel result goes back to (B, N, C). ONNX Runtime runs the three convolutions in its blocked
(NCHWc) layout. Values are the same up to float rounding; docs/export.md has the ONNX Runtime latencies. Eager
PyTorch keeps transformers' forward: this form is not faster there.

`channels_first_mix_ffn(model)` gives the Mix-FFNs of `model`, and of no other model, this class for the duration of
a block (`offseg_hf.export.subclasses.swapped_classes`); `SegformerMixMLP` itself is never modified.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.segformer import modeling_segformer as segformer

from .subclasses import swapped_classes


class ChannelsFirstMixFFN(segformer.SegformerMixMLP):
    def forward(self, hidden_states: torch.Tensor, height, width) -> torch.Tensor:
        """(B, N, C) tokens of an (H, W) map -> (B, N, C_out), channels-first inside."""
        batch_size, _, channels = hidden_states.shape
        x = hidden_states.transpose(1, 2).reshape(batch_size, channels, height, width)
        x = F.conv2d(x, self.fc1.weight[:, :, None, None], self.fc1.bias)
        x = self.dropout(self.activation_fn(self.dwconv.dwconv(x)))
        x = F.conv2d(x, self.fc2.weight[:, :, None, None], self.fc2.bias)
        return self.dropout(x).flatten(2).transpose(1, 2)


CHANNELS_FIRST_MIX_FFN: dict[type[nn.Module], type[nn.Module]] = {segformer.SegformerMixMLP: ChannelsFirstMixFFN}


def channels_first_mix_ffn(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Within the block, every `SegformerMixMLP` of `model` runs channels-first; restored on exit. Other models
    are unaffected."""
    return swapped_classes(model, CHANNELS_FIRST_MIX_FFN)


__all__ = ["CHANNELS_FIRST_MIX_FFN", "ChannelsFirstMixFFN", "channels_first_mix_ffn"]
