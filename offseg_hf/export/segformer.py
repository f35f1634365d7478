"""A channels-first Mix-FFN for transformers' SegFormer encoder (MiT), used while exporting to ONNX.

transformers' `SegformerMixMLP` keeps the tokens as (B, N, C): `fc1` widens them to (B, N, 4C), the depthwise 3x3
convolution needs (B, 4C, H, W), so the widened map is transposed there and back, and `fc2` narrows it again. In
ONNX Runtime the transpose of the widened map is the most expensive kernel of a MiT block (2.0 of 13.7 ms in a
first-stage block of MiT-B0 at 512x512, 2 threads: as much as the block's two attention products together).

`channels_first_mix_ffn()` replaces, for the duration of a block, `SegformerMixMLP.forward` by the same computation
with the transposes moved to the narrow ends: the C-channel tokens are laid out as (B, C, H, W) once, `fc1` and `fc2`
run as 1x1 convolutions with their own weights (a Linear layer is a 1x1 convolution), the depthwise convolution and
the activation in between need no transpose, and the C-channel result goes back to (B, N, C). ONNX Runtime runs the
three convolutions in its blocked (NCHWc) layout. Values are the same up to float rounding; SegFormer-B0-offset's
ONNX Runtime latency went from 106-112 to 91-93 ms (512x512, 2 threads). Eager PyTorch keeps transformers' forward:
this form is not faster there.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from unittest import mock

import torch
from torch.nn import functional as F
from transformers.models.segformer import modeling_segformer as segformer


def _channels_first_mix_ffn(self, hidden_states: torch.Tensor, height, width) -> torch.Tensor:
    """`SegformerMixMLP.forward`: (B, N, C) tokens of an (H, W) map -> (B, N, C_out), channels-first inside."""
    batch_size, _, channels = hidden_states.shape
    x = hidden_states.transpose(1, 2).reshape(batch_size, channels, height, width)
    x = F.conv2d(x, self.fc1.weight[:, :, None, None], self.fc1.bias)
    x = self.dropout(self.activation_fn(self.dwconv.dwconv(x)))
    x = F.conv2d(x, self.fc2.weight[:, :, None, None], self.fc2.bias)
    return self.dropout(x).flatten(2).transpose(1, 2)


def channels_first_mix_ffn() -> AbstractContextManager:
    """A context in which every `SegformerMixMLP` runs `_channels_first_mix_ffn`; restored on exit. Not thread-safe (a
    class attribute, as export is)."""
    return mock.patch.object(segformer.SegformerMixMLP, "forward", _channels_first_mix_ffn)
