"""Building blocks shared by the decode heads, and the way OffSeg modules declare their initialisation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init

INIT_RULE = "_offseg_init"


def initialise_with(module: nn.Module, rule: Callable[[nn.Module], None]) -> nn.Module:
    """Attach `rule(module)` as `module`'s initialisation; `OffSegPreTrainedModel._init_weights` runs it (at
    construction, and for weights a checkpoint does not provide).

    Rules go on the modules that hold the parameters themselves: for models outside its own package, transformers
    skips every module without parameters of its own (a container such as FreqFusion), so an init written on the
    container would never run. Rules use `transformers.initialization`, which leaves loaded weights alone.
    """
    setattr(module, INIT_RULE, rule)
    return module


def kaiming_relu_(conv: nn.Module) -> None:
    """mmcv's ConvModule init: Kaiming normal, fan_out, for ReLU; zero bias."""
    init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        init.zeros_(conv.bias)


class ConvNormAct(nn.Module):
    """1x1 convolution (no bias) + norm + ReLU, mmseg's `ConvModule` with a norm layer.

    `norm_groups=None` gives BatchNorm (SegFormer head); an int gives GroupNorm with that many groups (OffSeg).
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int | None = None):
        super().__init__()
        self.conv = initialise_with(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), kaiming_relu_)
        self.norm = nn.BatchNorm2d(out_channels) if norm_groups is None else nn.GroupNorm(norm_groups, out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


__all__ = ["INIT_RULE", "ConvNormAct", "initialise_with", "kaiming_relu_"]
