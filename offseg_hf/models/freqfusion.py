"""CARAFE and FreqFusion as OffSeg's decode head uses them, in their reference forms (plain PyTorch, no custom op).

CARAFE (Wang et al., ICCV 2019) reassembles features with a predicted, per-output-pixel k x k kernel:

    out[c, i, j] = sum_{a, b} mask[a * k + b, i, j] * feat[c, i // s + a - k // 2, j // s + b - k // 2]

(zero outside the map, s the upsampling factor). FreqFusion (Chen et al., TPAMI 2024) fuses a low-resolution
map into a high-resolution one with an adaptive low-pass CARAFE upsampler for the low-res map, an adaptive
high-pass residual for the high-res map, and a resampler that moves the upsampled map along offsets guided by
local feature similarity.

`carafe` and `neighbour_cosine_similarity` below are the formulas as written: every window unfolded, then a
weighted sum. The modules run them with `form = "reference"`; by default they run the fast forms of
`fast_freqfusion.py` (a tap loop with hand-written backwards in eager PyTorch, gathers in exported graphs, and on
request a CARAFE compiled by inductor), which compute the same values up to float rounding. `forms.py` explains the
choice.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init

from .fast_freqfusion import carafe as fast_carafe
from .fast_freqfusion import (
    check_carafe_masks,
    compiled_carafe,
    fuse_by_gather,
    grid_sample_by_gather,
    neighbour_dots,
    neighbour_dots_by_gather,
)
from .forms import HasForms
from .layers import initialise_with


def carafe(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, scale_factor: int) -> torch.Tensor:
    """Content-aware reassembly, as the formula in the module docstring.

    Args:
        features: (B, C, h, w).
        masks: (B, k*k, s*h, s*w) reassembly kernels, tap index a * k + b (normalised by the caller).
        kernel_size: k (odd).
        scale_factor: s (1 or 2).

    Returns:
        (B, C, s*h, s*w).
    """
    check_carafe_masks(features, masks, kernel_size, scale_factor)
    batch_size, channels, height, width = features.shape
    k, s = kernel_size, scale_factor
    # Every input pixel's k x k neighbourhood (zero outside the map), tap index a * k + b: (B, C, k*k, h, w).
    windows = F.unfold(features, k, padding=k // 2).view(batch_size, channels, k * k, height, width)
    # Output pixel (i, j) reads the neighbourhood of input pixel (i // s, j // s).
    windows = windows.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)  # (B, C, k*k, s*h, s*w)
    return (windows * masks[:, None]).sum(dim=2)


def neighbour_cosine_similarity(x: torch.Tensor, window: int = 3, dilation: int = 2, form: str = "reference"):
    """Cosine similarity of each position with its (window^2 - 1) dilated neighbours (zero outside the map).

    (B, C, H, W) -> (B, window^2 - 1, H, W), neighbours in row-major order with the centre left out. Any `form` but
    "reference" computes the channel products by `fast_freqfusion`'s forms (by gathers for "export", else by shifts).
    """
    # Sum of squares over the channel dim of NCHW, rather than `norm(dim=1)`, which reduces slowly over a strided dim.
    unit = x / x.square().sum(dim=1, keepdim=True).sqrt().clamp_min(1e-8)  # (B, C, H, W)
    if form == "export":
        return neighbour_dots_by_gather(unit, window, dilation)
    if form != "reference":
        return neighbour_dots(unit, window, dilation)
    batch_size, channels, height, width = unit.shape
    taps = window * window
    neighbours = F.unfold(unit, window, dilation=dilation, padding=dilation * (window // 2))
    neighbours = neighbours.view(batch_size, channels, taps, height, width)  # (B, C, window^2, H, W)
    dots = (neighbours * unit[:, :, None]).sum(dim=1)  # (B, window^2, H, W)
    centre = taps // 2
    return torch.cat([dots[:, :centre], dots[:, centre + 1 :]], dim=1)


def _xavier_uniform_(conv: nn.Conv2d) -> None:
    init.xavier_uniform_(conv.weight)
    init.zeros_(conv.bias)


def _small_normal_(conv: nn.Conv2d) -> None:
    init.normal_(conv.weight, mean=0.0, std=0.001)
    init.zeros_(conv.bias)


def _zeros_(conv: nn.Conv2d) -> None:
    init.zeros_(conv.weight)
    init.zeros_(conv.bias)


class SimilarityGuidedResampler(HasForms, nn.Module):
    """FreqFusion's offset generator: resamples the upsampled map at positions predicted from local similarity
    of the (compressed) high- and low-resolution maps, one offset per channel group and output sub-pixel."""

    def __init__(self, channels: int, groups: int = 4, scale: int = 2, kernel_size: int = 3):
        super().__init__()
        if channels % groups or channels % 8:
            raise ValueError(f"channels ({channels}) must be divisible by groups ({groups}) and by 8.")
        self.groups, self.scale = groups, scale
        similarities = 8  # 3x3 window minus its centre
        lr_outputs = 2 * groups * scale * scale  # (x, y) offset per group and output sub-pixel
        # As the official code: offsets start near zero and their scales at zero, so sampling starts at the
        # sub-pixel centres.
        conv = partial(nn.Conv2d, kernel_size=kernel_size, padding=kernel_size // 2)
        self.offset = initialise_with(conv(similarities, lr_outputs), _small_normal_)
        self.direct_scale = initialise_with(conv(channels, lr_outputs), _zeros_)
        self.hr_offset = initialise_with(conv(similarities, 2 * groups), _small_normal_)
        self.hr_direct_scale = initialise_with(conv(channels, 2 * groups), _zeros_)
        self.norm_hr = nn.GroupNorm(channels // 8, channels)
        self.norm_lr = nn.GroupNorm(channels // 8, channels)

    def initial_positions(self, device, dtype) -> torch.Tensor:
        """Sub-pixel centres of the s x s outputs of each input pixel, in input pixels: (1, 2 * G * s * s, 1, 1),
        channel order (coordinate x/y, group, output row phase, output column phase)."""
        shift = (torch.arange(self.scale, device=device, dtype=dtype) - (self.scale - 1) / 2) / self.scale
        x = shift.view(1, -1).expand(self.scale, self.scale)  # depends on the column phase
        y = shift.view(-1, 1).expand(self.scale, self.scale)  # depends on the row phase
        positions = torch.stack([x, y]).reshape(2, 1, -1).expand(2, self.groups, -1)
        return positions.reshape(1, -1, 1, 1)

    def forward(
        self,
        hr_guide: torch.Tensor,
        lr_guide: torch.Tensor,
        upsampled: torch.Tensor,
        channels_last: bool = False,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """hr_guide (B, c, sH, sW), lr_guide (B, c, H, W), upsampled (B, C, sH, sW) (or (B, sH, sW, C) with
        `channels_last`) -> (B, C, sH, sW), or its top-left `size` window (sampled there only)."""
        hr_guide, lr_guide = self.norm_hr(hr_guide), self.norm_lr(lr_guide)
        hr_similarity = neighbour_cosine_similarity(hr_guide, form=self.form)
        lr_similarity = neighbour_cosine_similarity(lr_guide, form=self.form)
        s = self.scale
        direction = self.offset(lr_similarity) + F.pixel_unshuffle(self.hr_offset(hr_similarity), s)
        magnitude = self.direct_scale(lr_guide) + F.pixel_unshuffle(self.hr_direct_scale(hr_guide), s)
        offsets = direction * magnitude.sigmoid() + self.initial_positions(direction.device, direction.dtype)
        return self.sample(upsampled, offsets, channels_last, size)

    def sample(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        channels_last: bool = False,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Bilinear sampling of x (B, C, sH, sW), or (B, sH, sW, C) with `channels_last`, at the low-res pixel centres
        plus `offsets` (B, 2*G*s*s, H, W) -> (B, C, sH, sW), or only its top-left `size` (h, w) window."""
        batch_size, _, height, width = offsets.shape
        s, groups = self.scale, self.groups
        offsets = offsets.view(batch_size, 2, -1, height, width)  # (B, xy, G*s*s, H, W)
        # Pixel centres normalised to [-1, 1] per coordinate, with the sizes as Python scalars (symbolic when
        # exported), not a tensor built from them.
        xs = torch.arange(width, device=x.device, dtype=x.dtype) + 0.5
        ys = torch.arange(height, device=x.device, dtype=x.dtype).view(-1, 1) + 0.5
        grid_x = 2 * (xs + offsets[:, 0]) / width - 1  # (B, G*s*s, H, W)
        grid_y = 2 * (ys + offsets[:, 1]) / height - 1
        grid = torch.stack([grid_x, grid_y], dim=1)  # (B, xy, G*s*s, H, W)
        grid = F.pixel_shuffle(grid.reshape(batch_size, -1, height, width), s)  # (B, 2*G, sH, sW)
        grid = grid.view(batch_size, 2, groups, s * height, s * width).permute(0, 2, 3, 4, 1).flatten(0, 1)
        if size is not None:
            grid = grid.narrow(1, 0, size[0]).narrow(2, 0, size[1])  # (B*G, h, w, 2)
        if self.form == "export":
            rows = x if channels_last else x.permute(0, 2, 3, 1)
            return grid_sample_by_gather(rows, grid, groups).permute(0, 3, 1, 2)
        if channels_last:
            x = x.permute(0, 3, 1, 2)
        grouped = x.reshape(batch_size * groups, -1, s * height, s * width)
        sampled = F.grid_sample(grouped, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return sampled.view(batch_size, -1, *grid.shape[1:3])


class FreqFusion(HasForms, nn.Module):
    """Frequency-aware fusion of a low-res map into a 2x larger high-res map (FreqFusion's settings in OffSeg:
    low-pass kernel 5, high-pass kernel 3, kernel encoders 3x3, compressed guides, high-pass residual, resampler
    with 4 groups).

    Returns the high-pass-enhanced high-res map and the upsampled, resampled low-res map, both at the high-res
    size. If the high-res map is one pixel short of twice the low-res map in a dimension (odd sizes), it is
    padded (replicate) to exactly twice, fused, and the outputs cropped back.
    """

    def __init__(self, hr_channels: int, lr_channels: int, compressed_channels: int):
        super().__init__()
        self.lowpass_kernel, self.highpass_kernel = 5, 3
        # The official initialisation: Xavier-uniform compressors, kernel encoders normal(0, 1e-3).
        self.hr_compressor = initialise_with(nn.Conv2d(hr_channels, compressed_channels, 1), _xavier_uniform_)
        self.lr_compressor = initialise_with(nn.Conv2d(lr_channels, compressed_channels, 1), _xavier_uniform_)
        self.lowpass_encoder = initialise_with(
            nn.Conv2d(compressed_channels, self.lowpass_kernel**2, 3, padding=1), _small_normal_
        )
        self.highpass_encoder = initialise_with(
            nn.Conv2d(compressed_channels, self.highpass_kernel**2, 3, padding=1), _small_normal_
        )
        self.resampler = SimilarityGuidedResampler(compressed_channels)

    def forward(self, hr_feat: torch.Tensor, lr_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hr_feat (B, Ch, H, W), lr_feat (B, Cl, h, w) with H in {2h - 1, 2h}, W likewise ->
        (hr_out (B, Ch, H, W), lr_out (B, Cl, H, W))."""
        height, width = hr_feat.shape[-2:]
        lr_h, lr_w = lr_feat.shape[-2:]
        if not (2 * lr_h - 1 <= height <= 2 * lr_h and 2 * lr_w - 1 <= width <= 2 * lr_w):
            raise ValueError(
                f"FreqFusion needs the high-res map at twice the low-res size; got {(height, width)} and "
                f"{(lr_h, lr_w)}."
            )
        # Padded (by zero rows/columns at even sizes) without a branch on the sizes, so one traced graph serves all.
        hr_feat = F.pad(hr_feat, (0, 2 * lr_w - width, 0, 2 * lr_h - height), mode="replicate")

        if self.form == "export":
            return fuse_by_gather(self, hr_feat, lr_feat, (height, width))
        hr_out, lr_out = self._fuse(hr_feat, lr_feat)
        return _crop(hr_out, height, width), _crop(lr_out, height, width)

    def _fuse(self, hr_feat: torch.Tensor, lr_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hr_feat (B, Ch, 2h, 2w), lr_feat (B, Cl, h, w) -> (hr_out, lr_out), both (B, C, 2h, 2w)."""
        hr_guide = self.hr_compressor(hr_feat)  # (B, c, 2h, 2w)
        lr_guide = self.lr_compressor(lr_feat)  # (B, c, h, w)

        # High-pass kernels from the high-res guide, used first to sharpen the guide itself.
        highpass_logits = self.highpass_encoder(hr_guide)  # (B, 9, 2h, 2w)
        hr_guide = 2 * hr_guide - self._carafe(hr_guide, highpass_logits.softmax(dim=1), self.highpass_kernel, 1)

        # Low-pass kernels from both guides; the low-res contribution is upsampled with the high-res estimate.
        lowpass_logits = self.lowpass_encoder(hr_guide)  # (B, 25, 2h, 2w)
        lowpass_logits = lowpass_logits + self._carafe(
            self.lowpass_encoder(lr_guide), lowpass_logits.softmax(dim=1), self.lowpass_kernel, 2
        )
        lowpass_kernels = lowpass_logits.softmax(dim=1)
        # The low-res map (adaptive low-pass upsampling) and its high-pass kernel logits share the low-pass kernels:
        # one CARAFE over both (channels are independent), half the traced graph of two.
        shared = self._carafe(
            torch.cat([lr_feat, self.highpass_encoder(lr_guide)], dim=1), lowpass_kernels, self.lowpass_kernel, 2
        )
        upsampled, highpass_upsampled = shared.split([lr_feat.shape[1], self.highpass_kernel**2], dim=1)
        highpass_logits = highpass_logits + highpass_upsampled
        # Adaptive high-pass residual: hr + (hr - lowpass(hr)).
        hr_out = 2 * hr_feat - self._carafe(hr_feat, highpass_logits.softmax(dim=1), self.highpass_kernel, 1)
        return hr_out, self.resampler(hr_guide, lr_guide, upsampled)

    def _carafe(self, features: torch.Tensor, masks: torch.Tensor, kernel_size: int, scale_factor: int):
        """`carafe` in this module's form (the export form never comes here: `fuse_by_gather` has its own)."""
        if self.form == "reference":
            return carafe(features, masks, kernel_size, scale_factor)
        if self.form == "compiled":
            return compiled_carafe(features, masks, kernel_size, scale_factor)
        return fast_carafe(features, masks, kernel_size, scale_factor)


def _crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The top-left (height, width) window of a (..., H, W) map."""
    return x.narrow(-2, 0, height).narrow(-1, 0, width)
