"""mmseg's SegformerHead as the pixel decoder of SegFormer-offset."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .layers import ConvNormAct


class SegformerPixelDecoder(nn.Module):
    """Per stage a 1x1 conv + BN + ReLU to `channels`, resize to the 1/4 map, concat (stage order 1/4 .. 1/32),
    1x1 fusion conv + BN + ReLU.

    The fusion conv acts on the concatenation of bilinearly resized maps. Both operations are linear and a 1x1
    conv mixes channels only, so `fuse(concat(resize(y_i))) == sum_i resize(fuse_i(y_i))`, where `fuse_i` is the
    i-th input-channel block of the fusion weight. Applying each block at its stage's own resolution and summing
    avoids the (B, 4C, H/4, W/4) concatenation and most of the multiply-adds (the three coarser stages are fused at
    1/4, 1/16 and 1/64 of the 1/4 map's positions); the weight keeps the official (C, 4C, 1, 1) layout, so
    checkpoints are unchanged.
    """

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.channels = channels
        self.stage_projections = nn.ModuleList([ConvNormAct(c, channels) for c in in_channels])
        self.fusion = ConvNormAct(channels * len(in_channels), channels)

    def forward(self, features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Multi-scale maps (B, C_i, H_i, W_i), finest first -> (B, channels, H/4, W/4)."""
        output_size = features[0].shape[-2:]
        fusion_blocks = self.fusion.conv.weight.split(self.channels, dim=1)  # each (C, C, 1, 1)
        fused = None
        for feature, projection, block in zip(features, self.stage_projections, fusion_blocks, strict=True):
            partial = F.conv2d(projection(feature), block)  # (B, C, H_i, W_i)
            if partial.shape[-2:] != output_size:
                partial = F.interpolate(partial, size=output_size, mode="bilinear", align_corners=False)
            fused = partial if fused is None else fused + partial  # (B, C, H/4, W/4)
        return self.fusion.act(self.fusion.norm(fused))
