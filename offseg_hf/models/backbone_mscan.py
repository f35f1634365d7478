"""MSCAN, SegNeXt's convolutional-attention encoder (Guo et al., NeurIPS 2022), as an OffSeg backbone.

Neither `timm` nor `transformers` has it, so it is written here, in plain PyTorch, on (B, C, H, W) tensors:

* stage 1 embeds with two 3x3 stride-2 convolutions (BN, GELU between, BN after); stages 2-4 with one 3x3 stride-2
  convolution + BN;
* each block is `x + s1 * MSCA(BN(x))` then `x + s2 * MLP(BN(x))`, with per-channel layer scales s1, s2 and
  stochastic depth. MSCA is 1x1 conv, GELU, a multi-scale convolutional gate (a 5x5 depthwise convolution, then
  the sum of it and three pairs of depthwise strip convolutions 1xk / kx1 for k = 7, 11, 21, a 1x1 channel mix, the
  result multiplying the gate's input), 1x1 conv, plus a residual; the MLP is 1x1 conv, 3x3 depthwise conv, GELU,
  1x1 conv;
* a LayerNorm over the channels closes every stage.

The maps are computed and returned in channels-last memory (`torch.channels_last` strides on (B, C, H, W)
tensors); values are the same as in the default layout up to float rounding.

Parameter names are those of mmseg's `MSCAN` (`patch_embed1.proj.0`, `block2.1.attn.spatial_gating_unit.conv1_2`,
`norm4`, ...), so the official ImageNet checkpoints (`mscan_t/s/b`) load by name (`load_pretrained`) and converted
SegNeXt checkpoints need no backbone renaming.
"""

from __future__ import annotations

import math
import os
import re

import torch
from timm.layers import DropPath
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init

from .configuration_mscan import MSCANConfig
from .encoder import EncoderOutput, no_attentions_error
from .layers import initialise_with
from .state_dict_checks import read_state_dict_file, require_fit


def _conv_init_(conv: nn.Conv2d) -> None:
    # The official MSCAN init (without a checkpoint): normal with std sqrt(2 / fan_out), fan_out per group; zero bias.
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
    init.normal_(conv.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        init.zeros_(conv.bias)


def _conv(in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, groups=1) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups)
    return initialise_with(conv, _conv_init_)


def _depthwise(channels: int, kernel_size: tuple[int, int]) -> nn.Conv2d:
    return _conv(channels, channels, kernel_size, padding=(kernel_size[0] // 2, kernel_size[1] // 2), groups=channels)


class StemConv(nn.Module):
    """Two 3x3 stride-2 convolutions with BN (GELU between): stride 4."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Sequential(
            _conv(in_channels, out_channels // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(out_channels // 2),
            nn.GELU(),
            _conv(out_channels // 2, out_channels, 3, stride=2, padding=1),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class DownsampleEmbed(nn.Module):
    """3x3 stride-2 convolution + BN between stages (mmseg's `OverlapPatchEmbed` as MSCAN builds it)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = _conv(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class MultiScaleConvGate(nn.Module):
    """The multi-scale convolutional attention: depthwise 5x5, plus strip-convolution branches, 1x1 mix; the
    result multiplies the input."""

    def __init__(self, channels: int, strip_kernel_sizes: tuple[int, ...]):
        super().__init__()
        self.conv0 = _depthwise(channels, (5, 5))
        self.num_branches = len(strip_kernel_sizes)
        for i, k in enumerate(strip_kernel_sizes):
            self.add_module(f"conv{i}_1", _depthwise(channels, (1, k)))
            self.add_module(f"conv{i}_2", _depthwise(channels, (k, 1)))
        self.conv3 = _conv(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = self.conv0(x)
        total = attention
        for i in range(self.num_branches):
            branch = getattr(self, f"conv{i}_2")(getattr(self, f"conv{i}_1")(attention))
            total = total + branch
        return self.conv3(total) * x


class MSCAttention(nn.Module):
    """1x1 conv, GELU, the multi-scale gate, 1x1 conv, plus the input."""

    def __init__(self, channels: int, strip_kernel_sizes: tuple[int, ...]):
        super().__init__()
        self.proj_1 = _conv(channels, channels, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = MultiScaleConvGate(channels, strip_kernel_sizes)
        self.proj_2 = _conv(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x)))) + x


class ConvMlp(nn.Module):
    """1x1 conv, 3x3 depthwise conv, GELU, dropout, 1x1 conv, dropout."""

    def __init__(self, channels: int, hidden_channels: int, dropout: float):
        super().__init__()
        self.fc1 = _conv(channels, hidden_channels, 1)
        self.dwconv = _depthwise(hidden_channels, (3, 3))
        self.act = nn.GELU()
        self.fc2 = _conv(hidden_channels, channels, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x))))
        return self.drop(self.fc2(x))


class MSCABlock(nn.Module):
    """`x + s1 * attn(BN(x))`, then `x + s2 * mlp(BN(x))`, with stochastic depth on both branches."""

    def __init__(
        self,
        channels: int,
        mlp_ratio: float,
        strip_kernel_sizes: tuple[int, ...],
        drop_path: float,
        dropout: float,
        layer_scale_init_value: float,
    ):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.attn = MSCAttention(channels, strip_kernel_sizes)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(channels)
        self.mlp = ConvMlp(channels, int(channels * mlp_ratio), dropout)
        self.layer_scale_1 = nn.Parameter(torch.full((channels,), layer_scale_init_value))
        self.layer_scale_2 = nn.Parameter(torch.full((channels,), layer_scale_init_value))
        self.layer_scale_init_value = layer_scale_init_value
        initialise_with(self, _layer_scale_init_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))


def _layer_scale_init_(block: MSCABlock) -> None:
    init.constant_(block.layer_scale_1, block.layer_scale_init_value)
    init.constant_(block.layer_scale_2, block.layer_scale_init_value)


# Keys of the original SegNeXt release (`mlp.dwconv.dwconv`) and of the ImageNet classifier, for `load_pretrained`.
_ORIGINAL_RELEASE_DWCONV = re.compile(r"\.mlp\.dwconv\.dwconv\.")
_IMAGENET_HEAD = ("head.",)


class MSCANEncoder(nn.Module):
    """MSCAN's four stages; returns the channel-LayerNormed output of each (strides 4, 8, 16, 32)."""

    has_attentions = False
    display_name = "MSCAN"
    pretrained_sources = "a local MSCAN ImageNet checkpoint file (the official mscan_t/s/b .pth)"

    @staticmethod
    def accepts_pretrained(name_or_path: str) -> bool:
        return os.path.isfile(name_or_path)

    def __init__(self, config: MSCANConfig):
        super().__init__()
        self.config = config
        depths, widths = list(config.depths), list(config.hidden_sizes)
        if not len(depths) == len(widths) == len(config.mlp_ratios) == 4:
            raise ValueError(
                f"MSCAN has four stages: got depths {depths}, hidden_sizes {widths}, mlp_ratios {config.mlp_ratios}."
            )
        rates = torch.linspace(0, config.drop_path_rate, sum(depths), device="cpu").tolist()  # the official decay rule
        strips = tuple(config.strip_kernel_sizes)
        for i, (depth, width, ratio) in enumerate(zip(depths, widths, config.mlp_ratios, strict=True)):
            embed = StemConv(config.num_channels, width) if i == 0 else DownsampleEmbed(widths[i - 1], width)
            first = sum(depths[:i])
            blocks = nn.ModuleList(
                MSCABlock(
                    width,
                    ratio,
                    strips,
                    rates[first + j],
                    config.hidden_dropout_prob,
                    config.layer_scale_init_value,
                )
                for j in range(depth)
            )
            self.add_module(f"patch_embed{i + 1}", embed)
            self.add_module(f"block{i + 1}", blocks)
            self.add_module(f"norm{i + 1}", nn.LayerNorm(width))
        self.channels = widths
        self.norm_eval = config.norm_eval

    @classmethod
    def from_encoder_config(cls, config: MSCANConfig) -> MSCANEncoder:
        return cls(config)

    def train(self, mode: bool = True) -> MSCANEncoder:
        super().train(mode)
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> EncoderOutput:
        if output_attentions:
            raise no_attentions_error("MSCAN")
        # Channels-last memory throughout: oneDNN's depthwise and strip convolutions and the decoder's bilinear
        # upsampling run much faster on it (docs/speed.md), and each stage's LayerNorm over
        # channels then reads and writes contiguous rows, with no layout copies between stages.
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        features = []
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x)
            norm = getattr(self, f"norm{i}")
            x = F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            x = x.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides: a view, no copy
            features.append(x)
        return EncoderOutput(feature_maps=tuple(features))

    def load_pretrained(self, name_or_path: str) -> list[str]:
        """The official ImageNet MSCAN weights (`mscan_t_20230227-119e8c9f.pth`, `mscan_s_...`, `mscan_b_...`) or any
        state dict with mmseg's MSCAN key names, from a local file (`.pth`, `.bin` or `.safetensors`), read without
        running code from it. Accepted wrappers: `{"state_dict": ...}` / `{"model": ...}`; prefixes `module.` and
        `backbone.`; the original SegNeXt release's `mlp.dwconv.dwconv` names. An ImageNet classifier (`head.*`)
        is dropped and returned; any other key that does not fit raises `ValueError`. Returns the keys not used.
        """
        if not os.path.isfile(name_or_path):
            raise ValueError(
                f"MSCAN weights are read from a local file; {name_or_path!r} is not one. Download the official "
                "ImageNet checkpoint (mscan_t/s/b .pth, linked from mmseg's SegNeXt configs) first."
            )
        state_dict = {
            _ORIGINAL_RELEASE_DWCONV.sub(".mlp.dwconv.", key.removeprefix("backbone.")): value
            for key, value in read_state_dict_file(name_or_path).items()
        }
        unused = [key for key in state_dict if key.startswith(_IMAGENET_HEAD)]
        selected = {key: value for key, value in state_dict.items() if key not in unused}
        require_fit(self.state_dict(), selected, f"{name_or_path!r} does not fit this MSCAN encoder")
        self.load_state_dict(selected, strict=True)
        return unused


__all__ = ["MSCANConfig", "MSCANEncoder"]
