"""Building blocks shared by the decode heads, and the way OffSeg modules declare their initialisation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init

from .fast_layers import pointwise_conv
from .forms import HasForms

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


class ConvNormAct(HasForms, nn.Module):
    """1x1 convolution (no bias) + norm + ReLU, mmseg's `ConvModule` with a norm layer.

    `norm_groups=None` gives BatchNorm (SegFormer head); an int gives GroupNorm with that many groups (OffSeg,
    LightHam). `activation=False` leaves out the ReLU (mmseg's `act_cfg=None`). The fast form runs the convolution
    as a matrix product where that is faster (`fast_layers.pointwise_conv`).
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int | None = None, activation: bool = True):
        super().__init__()
        self.conv = initialise_with(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), kaiming_relu_)
        self.norm = nn.BatchNorm2d(out_channels) if norm_groups is None else nn.GroupNorm(norm_groups, out_channels)
        self.act = nn.ReLU(inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x) if self.form == "reference" else pointwise_conv(self.conv, x)
        return self.act(self.norm(x))


def resize_and_project(
    features: list[torch.Tensor] | tuple[torch.Tensor, ...], weight: torch.Tensor, size: torch.Size | tuple[int, int]
) -> torch.Tensor:
    """`conv1x1(concat(resize(f) for f in features), weight)` (no bias), computed without the concatenation.

    Bilinear resizing mixes positions and a 1x1 convolution mixes channels; both are linear, so they commute and
    the result equals `sum_i resize(conv1x1(f_i, weight_i))`, with `weight_i` the input-channel block of `f_i`. Each
    block is applied at its map's own resolution, so a coarse map is projected at a fraction of the positions and
    the wide concatenated tensor is never formed. mmseg's heads (SegformerHead, LightHamHead) resize first; the
    results agree up to float rounding, and the weight keeps their (C_out, sum C_i, 1, 1) layout.
    """
    blocks = weight.split([feature.shape[1] for feature in features], dim=1)
    total = None
    for feature, block in zip(features, blocks, strict=True):
        projected = F.conv2d(feature, block)
        if projected.shape[-2:] != size:
            projected = F.interpolate(projected, size=size, mode="bilinear", align_corners=False)
        total = projected if total is None else total + projected
    return total


__all__ = ["INIT_RULE", "ConvNormAct", "initialise_with", "kaiming_relu_", "resize_and_project"]
