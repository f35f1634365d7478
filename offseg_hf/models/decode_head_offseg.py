"""The OffSeg pixel decoder: per-stage projections, a FreqFusion cascade from 1/32 to 1/4, and a 1x1 align."""

from __future__ import annotations

import torch
from torch import nn

from .freqfusion import FreqFusion
from .layers import ConvNormAct

# mmcv GroupNorm setting of the official head (ConvModule norm_cfg GN, 32 groups).
NORM_GROUPS = 32


def interleave_channels(hr: torch.Tensor, lr: torch.Tensor, chunks: int = 4) -> torch.Tensor:
    """Concatenate two maps in the official head's channel order: the channels of each are split into `chunks`
    consecutive blocks, and the result is hr block 0, lr block 0, hr block 1, lr block 1, ..."""
    return torch.cat([hr.unflatten(1, (chunks, -1)), lr.unflatten(1, (chunks, -1))], dim=2).flatten(1, 2)


class OffSegPixelDecoder(nn.Module):
    """Per stage 1x1 conv + GroupNorm(32) + ReLU to `stage_channels`; starting from the 1/32 map, each FreqFusion
    fuses the running low-res map into the next finer stage (compressed channels (lr + hr) // 4) and the two
    outputs are concatenated (interleaved, as the official head); a 1x1 conv + GN + ReLU aligns the 1/4 map to
    `channels`."""

    def __init__(self, in_channels: list[int], channels: int, stage_channels: list[int]):
        super().__init__()
        stage_channels = list(stage_channels)
        if len(in_channels) != len(stage_channels):
            raise ValueError(f"{len(in_channels)} backbone stages but {len(stage_channels)} decoder stage widths.")
        self.stage_projections = nn.ModuleList(
            [ConvNormAct(c_in, c_out, NORM_GROUPS) for c_in, c_out in zip(in_channels, stage_channels, strict=True)]
        )
        fusions = []
        lr_channels = stage_channels[-1]
        for hr_channels in reversed(stage_channels[:-1]):
            fusions.append(FreqFusion(hr_channels, lr_channels, (hr_channels + lr_channels) // 4))
            lr_channels += hr_channels
        self.fusions = nn.ModuleList(fusions)
        self.align = ConvNormAct(sum(stage_channels), channels, NORM_GROUPS)

    def forward(self, features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Multi-scale maps, finest first -> (B, channels, H/4, W/4)."""
        maps = [projection(x) for x, projection in zip(features, self.stage_projections, strict=True)]
        fused = maps[-1]  # 1/32
        for hr_map, fusion in zip(reversed(maps[:-1]), self.fusions, strict=True):
            hr_map, upsampled = fusion(hr_map, fused)
            fused = interleave_channels(hr_map, upsampled)
        return self.align(fused)
