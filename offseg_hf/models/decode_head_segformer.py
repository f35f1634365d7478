"""mmseg's SegformerHead as the pixel decoder of SegFormer-offset."""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConvNormAct, resize_and_project


class SegformerPixelDecoder(nn.Module):
    """Per stage a 1x1 conv + BN + ReLU to `channels`, resize to the 1/4 map, concat (stage order 1/4 .. 1/32),
    1x1 fusion conv + BN + ReLU.

    The fusion conv is applied blockwise at each stage's own resolution before resizing (`resize_and_project`):
    the three coarser stages are fused at 1/4, 1/16 and 1/64 of the 1/4 map's positions, and the (B, 4C, H/4, W/4)
    concatenation is never formed; the weight keeps the official (C, 4C, 1, 1) layout, so checkpoints are unchanged.
    """

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.channels = channels
        self.stage_projections = nn.ModuleList([ConvNormAct(c, channels) for c in in_channels])
        self.fusion = ConvNormAct(channels * len(in_channels), channels)

    def forward(self, features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Multi-scale maps (B, C_i, H_i, W_i), finest first -> (B, channels, H/4, W/4)."""
        projected = [projection(feature) for feature, projection in zip(features, self.stage_projections, strict=True)]
        fused = resize_and_project(projected, self.fusion.conv.weight, features[0].shape[-2:])  # (B, C, H/4, W/4)
        return self.fusion.act(self.fusion.norm(fused))
