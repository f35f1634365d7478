"""SegNeXt's LightHam decoder (mmseg's `LightHamHead`): a Hamburger with non-negative matrix factorization at 1/8.

    stages 2-4 -> resize to 1/8, concat -> squeeze (1x1 conv + GN + ReLU)
               -> Hamburger: x -> ReLU(x + GN(conv(NMF(ReLU(conv(x))))))
               -> align (1x1 conv + GN + ReLU)  -> pixel embeddings E at 1/8 of the input

NMF (Geng et al., "Is Attention Better Than Matrix Decomposition?", ICLR 2021) approximates the non-negative
(D, N) feature matrix X of each image (D channels, N = H*W positions) by bases (D, R) times coefficients (R, N),
starting from random bases and running multiplicative updates, with gradients through every step.

Where the starting bases come from (`bases` argument, `OffSegConfig.decode_head_config["eval_bases"]`):

* training: a fresh draw from torch's global RNG on every forward, as the official code does (so `set_seed`
  governs it), one draw per image of the batch;
* evaluation, `"seeded"` (default): one fixed draw made from a generator seeded with `decode_head_config["seed"]`,
  shared by every image. `model.eval()` then gives the same logits on every call, in every process and whatever else
  used the global RNG, and a batch of N images gives what the N images give one by one;
* evaluation, `"global_rng"`: the official behaviour, a fresh draw from the global RNG on every forward (two calls on
  the same image differ). Use it, after `torch.manual_seed`, to reproduce the official code's outputs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init

from .configuration_offseg import EVAL_BASES, check_eval_bases
from .layers import ConvNormAct, initialise_with, kaiming_relu_, resize_and_project

# mmcv GroupNorm setting of the official head (ConvModule norm_cfg GN, 32 groups).
NORM_GROUPS = 32
# The stages the head reads: 1/8, 1/16, 1/32 (mmseg's in_index [1, 2, 3]).
IN_INDEX = (1, 2, 3)
_EPS = 1e-6  # added to every multiplicative-update denominator, as in the official NMF


def _draw_bases(batch: int, channels: int, rank: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform [0, 1) bases (batch, channels, rank), drawn on the CPU as the official code draws them, unit columns."""
    return F.normalize(torch.rand((batch, channels, rank), generator=generator), dim=1)


def _seeded_bases_(nmf: MatrixFactorization) -> None:
    init.copy_(nmf.eval_bases, _draw_bases(1, nmf.channels, nmf.rank, torch.Generator().manual_seed(nmf.seed)))


class MatrixFactorization(nn.Module):
    """NMF of each image's (C, H*W) feature map into `rank` bases, by multiplicative updates; returns the
    reconstruction bases @ coefficients, (B, C, H, W). The input must be non-negative (it follows a ReLU).

    Args:
        channels: C (the official code's D, with its single spatial group S = 1).
        rank: R, the number of bases (official 16).
        train_steps / eval_steps: multiplicative-update iterations in training / evaluation (official 6 / 7).
        eval_bases: `"seeded"` or `"global_rng"` (module docstring).
        seed: seed of the fixed evaluation bases.
    """

    def __init__(
        self,
        channels: int,
        rank: int = 16,
        train_steps: int = 6,
        eval_steps: int = 7,
        eval_bases: str = "seeded",
        seed: int = 0,
    ):
        super().__init__()
        check_eval_bases(eval_bases)
        self.channels, self.rank, self.seed = channels, rank, seed
        self.train_steps, self.eval_steps, self.eval_bases_mode = train_steps, eval_steps, eval_bases
        # Derived from `seed`, not saved: every copy of the model with the same config has the same bases.
        self.register_buffer("eval_bases", torch.zeros(1, channels, rank), persistent=False)
        initialise_with(self, _seeded_bases_)
        _seeded_bases_(self)

    def _initial_bases(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self.training or self.eval_bases_mode == "global_rng":
            return _draw_bases(batch, self.channels, self.rank).to(device=device, dtype=dtype)
        return self.eval_bases.to(dtype).expand(batch, -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if channels != self.channels:
            raise ValueError(f"MatrixFactorization expects {self.channels} channels, got {channels}.")
        # Multiplicative updates divide by sums of products: run them in at least float32, also under autocast.
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            features = x.reshape(batch, channels, height * width).to(dtype)  # X: (B, D, N)
            features_t = features.transpose(1, 2)  # X^T: (B, N, D)
            bases = self._initial_bases(batch, x.device, dtype)  # (B, D, R)
            projection = torch.bmm(features_t, bases)  # X^T bases: (B, N, R)
            coefficients = projection.softmax(dim=-1)  # the official inverse temperature is 1
            steps = self.train_steps if self.training else self.eval_steps
            for step in range(steps + 1):
                if step > 0:
                    projection = torch.bmm(features_t, bases)
                gram = torch.bmm(bases.transpose(1, 2), bases)  # (B, R, R)
                coefficients = coefficients * projection / (torch.bmm(coefficients, gram) + _EPS)
                if step == steps:  # the last pass updates the coefficients only
                    break
                numerator = torch.bmm(features, coefficients)  # (B, D, R)
                gram = torch.bmm(coefficients.transpose(1, 2), coefficients)  # (B, R, R)
                bases = bases * numerator / (torch.bmm(bases, gram) + _EPS)
            if x.is_contiguous(memory_format=torch.channels_last):  # keep the input's layout, without a copy
                reconstruction = torch.bmm(coefficients, bases.transpose(1, 2))  # (B, N, D)
                return reconstruction.unflatten(1, (height, width)).permute(0, 3, 1, 2).to(x.dtype)
            reconstruction = torch.bmm(bases, coefficients.transpose(1, 2))  # (B, D, N)
        return reconstruction.reshape(batch, channels, height, width).to(x.dtype)


class Hamburger(nn.Module):
    """`ReLU(x + GN(conv(NMF(ReLU(conv(x))))))`: 1x1 conv with bias in, 1x1 conv + GroupNorm out."""

    def __init__(self, channels: int, **nmf_kwargs):
        super().__init__()
        self.ham_in = initialise_with(nn.Conv2d(channels, channels, kernel_size=1), kaiming_relu_)
        self.nmf = MatrixFactorization(channels, **nmf_kwargs)
        self.ham_out = ConvNormAct(channels, channels, NORM_GROUPS, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.ham_out(self.nmf(F.relu(self.ham_in(x)))))


class LightHamPixelDecoder(nn.Module):
    """Stages 2-4 resized to 1/8 and squeezed (1x1 conv + GN + ReLU) to `channels`, a Hamburger, a 1x1 align
    (conv + GN + ReLU); returns the (B, channels, H/8, W/8) pixel embeddings.

    The squeeze is applied blockwise before resizing (`resize_and_project`), so the concatenation of the three
    maps at 1/8 is never formed; the weight keeps mmseg's layout.
    """

    def __init__(self, in_channels: list[int], channels: int, **nmf_kwargs):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"The LightHam decoder reads stages 2-4 of a four-stage backbone, got {len(in_channels)}.")
        self.squeeze = ConvNormAct(sum(in_channels[i] for i in IN_INDEX), channels, NORM_GROUPS)
        self.hamburger = Hamburger(channels, **nmf_kwargs)
        self.align = ConvNormAct(channels, channels, NORM_GROUPS)

    def forward(self, features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Multi-scale maps, finest first -> (B, channels, H/8, W/8)."""
        selected = [features[i] for i in IN_INDEX]
        squeezed = resize_and_project(selected, self.squeeze.conv.weight, selected[0].shape[-2:])
        x = self.squeeze.act(self.squeeze.norm(squeezed))
        return self.align(self.hamburger(x))


__all__ = ["EVAL_BASES", "check_eval_bases", "Hamburger", "LightHamPixelDecoder", "MatrixFactorization"]
