"""CARAFE and FreqFusion in plain PyTorch (no custom CUDA op), as OffSeg's decode head uses them.

CARAFE (Wang et al., ICCV 2019) reassembles features with a predicted, per-output-pixel k x k kernel:

    out[c, i, j] = sum_{a, b} mask[a * k + b, i, j] * feat[c, i // s + a - k // 2, j // s + b - k // 2]

(zero outside the map, s the upsampling factor). FreqFusion (Chen et al., TPAMI 2024) fuses a low-resolution
map into a high-resolution one with an adaptive low-pass CARAFE upsampler for the low-res map, an adaptive
high-pass residual for the high-res map, and a resampler that moves the upsampled map along offsets guided by
local feature similarity.

CARAFE here loops over the k*k taps and accumulates `mask_tap * shifted_map` in place: no (C * k * k)-channel
unfolded copy of the map is ever built (CARAFE is memory-bound: the copy costs more than the arithmetic). For s = 2 the
masks are split into the four output phases (pixel-unshuffle), the taps are accumulated at the input resolution
for all phases at once, and the result is pixel-shuffled up. With gradients, one autograd node with a hand-written,
in-place backward replaces the k*k recorded multiply-adds (`_CarafeFunction`).

For ONNX export (`gather_formulations()`, which `offseg_hf.export.onnx.export_onnx` enters) CARAFE, the resampler's
neighbour similarities and its bilinear sampling are written as row gathers and small batched matrix products
instead: ONNX Runtime runs the tap loops as k*k separate slice, product and sum kernels, each writing a fresh
full-size buffer, and its GridSample kernel is slow; the gather forms run 2-3x faster there (and slower than the tap
loops in eager PyTorch, hence export only). They compute the same values up to float rounding (summation order).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init

from .layers import initialise_with


def carafe(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, scale_factor: int) -> torch.Tensor:
    """Content-aware reassembly.

    Args:
        features: (B, C, h, w).
        masks: (B, k*k, s*h, s*w) reassembly kernels, tap index a * k + b (normalised by the caller).
        kernel_size: k (odd).
        scale_factor: s (1 or 2).

    Returns:
        (B, C, s*h, s*w).

    With gradients required the op runs as one autograd node (`_CarafeFunction`) whose backward accumulates in
    place instead of through the k*k recorded multiply-adds; without (inference, tracing, export) it is the plain
    tap loop below. Both compute the same values.
    """
    batch_size, channels, height, width = features.shape
    taps, s = kernel_size * kernel_size, scale_factor
    if masks.shape != (batch_size, taps, s * height, s * width):
        raise ValueError(
            f"CARAFE masks must have shape {(batch_size, taps, s * height, s * width)} for features "
            f"{tuple(features.shape)}, kernel {kernel_size} and scale {scale_factor}; got {tuple(masks.shape)}."
        )
    if _gather_formulations_on:
        return _carafe_by_gather(features, masks, kernel_size, scale_factor)
    if _takes_hand_written_backward(features, masks):
        return _CarafeFunction.apply(features, masks, kernel_size, scale_factor)
    return _carafe(features, masks, kernel_size, scale_factor)


_gather_formulations_on = False


@contextlib.contextmanager
def gather_formulations() -> Iterator[None]:
    """Within the block, CARAFE and the resampler's similarities and sampling run their gather forms
    (`_carafe_by_gather`, `_neighbour_dots_by_gather`, `_grid_sample_by_gather`): what ONNX export traces. Not
    thread-safe (a module-level switch, as export is)."""
    global _gather_formulations_on
    previous, _gather_formulations_on = _gather_formulations_on, True
    try:
        yield
    finally:
        _gather_formulations_on = previous


def _takes_hand_written_backward(*inputs: torch.Tensor) -> bool:
    """Whether an op here runs as its autograd node with a hand-written backward: only when a gradient will be taken
    and not under torch.compile (which traces the plain loop; inference, tracing and export run it too)."""
    needs_gradient = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs)
    return needs_gradient and not torch.compiler.is_compiling()


def _phases(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """(B, N, s*h, s*w) -> (B, N, s*s, h, w): output phase (i, j) of input pixel (y, x) is output pixel
    (s*y + i, s*x + j)."""
    if scale_factor == 1:
        return x[:, :, None]
    batch_size, channels, height, width = x.shape
    s = scale_factor
    return F.pixel_unshuffle(x, s).view(batch_size, channels, s * s, height // s, width // s)


def _carafe(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, scale_factor: int) -> torch.Tensor:
    """The tap loop: for each of the k*k taps, the shifted (B, C, h, w) window times that tap's masks of all s*s
    output phases, accumulated in place at the input resolution."""
    taps, s, radius = kernel_size * kernel_size, scale_factor, kernel_size // 2
    padded = F.pad(features, (radius, radius, radius, radius))[:, :, None]  # (B, C, 1, h + 2r, w + 2r)
    phases = _phases(masks, s)[:, None].unbind(dim=2)  # k*k x (B, 1, s*s, h, w)
    # A fixed number of whole-map passes (k*k, from the kernel size only), so the loop unrolls the same way for every
    # input size when traced or exported; the windows are sliced with constant bounds (no size arithmetic in the
    # graph). In-place accumulation keeps one output buffer alive.
    out = None
    for tap in range(taps):
        window = _shifted_window(padded, *divmod(tap, kernel_size), 2 * radius)
        out = window * phases[tap] if out is None else out.addcmul_(window, phases[tap])  # (B, C, s*s, h, w)
    if s == 1:
        return out[:, :, 0]
    return F.pixel_shuffle(out.flatten(1, 2), s)  # (B, C, s*h, s*w)


def _carafe_by_gather(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, scale_factor: int) -> torch.Tensor:
    """CARAFE as one gather and one batched matrix product (`_carafe_rows`), in and out of the NCHW layout."""
    height, width = features.shape[-2:]
    kernels = _taps_last(masks, height, width, scale_factor)
    rows = _carafe_rows(features, kernels, kernel_size)
    return _rows_to_map(rows, height, width, scale_factor).permute(0, 3, 1, 2)


def _taps_last(masks: torch.Tensor, height, width, scale_factor: int) -> torch.Tensor:
    """(B, n, s*h, s*w) per-output-pixel kernels (or their logits) -> (B, h*w, s*s, n): per input pixel of the
    (h, w) grid and output phase (i, j) (output pixel (s*y + i, s*x + j), phase index i * s + j), its n taps last,
    where a softmax over the taps is a last-axis softmax."""
    batch_size, taps = masks.shape[:2]
    s = scale_factor
    if s == 1:
        return masks.permute(0, 2, 3, 1).reshape(batch_size, height * width, 1, taps)
    phases = masks.view(batch_size, taps, height, s, width, s).permute(0, 2, 4, 3, 5, 1)
    return phases.reshape(batch_size, height * width, s * s, taps)


def _carafe_rows(features: torch.Tensor, kernels: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """CARAFE with its kernels in the `_taps_last` layout: features (B, C, h, w) and normalised kernels
    (B, h*w, p, k*k) for p output phases per input pixel -> (B, h*w, p, C). Every input pixel's k x k window of
    channel rows is gathered (`_gathered_windows`; at 1/8 of a 512x512 input with 233 channels a 95 MB copy, read
    once) and multiplied by that pixel's (p, k*k) kernels."""
    k = kernel_size
    windows = _gathered_windows(features, [divmod(tap, k) for tap in range(k * k)], 2 * (k // 2))  # (B, hw, k*k, C)
    return kernels @ windows


def _rows_to_map(rows: torch.Tensor, height, width, scale_factor: int) -> torch.Tensor:
    """(B, h*w, s*s, C) values per input pixel and output phase -> the channels-last (B, s*h, s*w, C) map (a copy of
    whole C-channel rows)."""
    batch_size, channels, s = rows.shape[0], rows.shape[-1], scale_factor
    if s == 1:
        return rows.view(batch_size, height, width, channels)
    rows = rows.view(batch_size, height, width, s, s, channels).transpose(2, 3)
    return rows.reshape(batch_size, s * height, s * width, channels)


def _gathered_windows(x: torch.Tensor, corners: list[tuple[int, int]], margin: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, n, C): for every position, the channel rows at its n window offsets, gathered by
    index from `x` zero-padded by margin / 2 a side and laid out channels-last. `corners` are the windows' (top, left)
    corners in the padded map, as for `_shifted_window`."""
    batch_size, channels, height, width = x.shape
    rows = F.pad(x, (margin // 2,) * 4).permute(0, 2, 3, 1).reshape(batch_size, -1, channels)
    corners = torch.tensor(corners, device=x.device)  # (n, 2)
    # Row of window n for position (y, x): (y + top_n) * (W + margin) + x + left_n, as an (H, W, n) grid.
    top = (torch.arange(height, device=x.device).view(-1, 1, 1) + corners[:, 0]) * (width + margin)
    left = torch.arange(width, device=x.device).view(-1, 1) + corners[:, 1]
    return rows.index_select(1, (top + left).flatten()).view(batch_size, height * width, -1, channels)


def _grid_sample_by_gather(rows: torch.Tensor, grid: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped `F.grid_sample(..., mode="bilinear", padding_mode="border", align_corners=False)` on a channels-last
    map: rows (B, H, W, C) whose C channels form `groups` consecutive groups, grid (B * groups, oh, ow, 2) (group g
    of image b at b * groups + g, as for the (B * groups, C / groups, H, W) planes) -> channels-last (B, oh, ow, C).

    The four neighbours' channel rows of every output pixel and group are gathered and combined by a
    (1 x 4) @ (4 x C / groups) product; the coordinates are unnormalised and clipped with grid_sample's own
    formulas."""
    batch_size, height, width, channels = rows.shape
    out_height, out_width = grid.shape[1:3]
    grid = grid.view(batch_size, groups, out_height, out_width, 2).permute(0, 2, 3, 1, 4)  # (B, oh, ow, G, xy)
    ix = (((grid[..., 0] + 1) * width - 1) / 2).clamp(0, width - 1)
    iy = (((grid[..., 1] + 1) * height - 1) / 2).clamp(0, height - 1)
    x0, y0 = ix.floor(), iy.floor()
    tx, ty = ix - x0, iy - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)  # weight 0 where clamped
    # Row of (image b, pixel (y, x), group g) in rows viewed as (B * H * W * G, C / G): ((b * H + y) * W + x) * G + g.
    image = torch.arange(batch_size, device=rows.device).view(-1, 1, 1, 1) * height
    group = torch.arange(groups, device=rows.device)
    top, bottom = (image + y0) * width, (image + y1) * width
    index = torch.stack([top + x0, top + x1, bottom + x0, bottom + x1], dim=-1) * groups + group[:, None]
    weights = torch.stack([(1 - tx) * (1 - ty), tx * (1 - ty), (1 - tx) * ty, tx * ty], dim=-1)  # (B, oh, ow, G, 4)
    corners = rows.reshape(-1, channels // groups).index_select(0, index.flatten())
    corners = corners.view(batch_size, out_height * out_width * groups, 4, channels // groups)
    out = weights.view(batch_size, -1, 1, 4) @ corners
    return out.view(batch_size, out_height, out_width, channels)


class _CarafeFunction(torch.autograd.Function):
    """CARAFE with a hand-written backward.

    Recorded by autograd, the tap loop keeps k*k multiply-adds whose backward allocates two (B, C, s*s, h, w)
    products per tap (a fresh 30 MB each for the last OffSeg-T fusion at batch 2, 512x512) and a padded zero map per
    tap for the feature gradient. Here, with G the output gradient split into phases (B, C, s*s, h, w):

        d features (padded)[window of tap t] += sum_phase G[:, :, phase] * mask[t, phase]   (in place, per phase)
        d mask[t, phase]                      = sum_c G[:, c, phase] * window_t[:, c]       (one reused buffer)
    """

    @staticmethod
    def forward(ctx, features, masks, kernel_size, scale_factor):
        ctx.save_for_backward(features, masks)
        ctx.kernel_size, ctx.scale_factor = kernel_size, scale_factor
        return _carafe(features, masks, kernel_size, scale_factor)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        features, masks = ctx.saved_tensors
        k, s = ctx.kernel_size, ctx.scale_factor
        radius, margin = k // 2, 2 * (k // 2)
        # Every operand in the features' memory layout (OffSeg's high-res maps are channels-last): mixed layouts send
        # the elementwise kernels down a slow strided path (6.9 vs 1.8 ms a tap at 64 x 128 x 128, batch 2).
        channels_last = features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        grad = _phases(grad_output, s).contiguous(memory_format=torch.channels_last_3d if channels_last else layout)
        phases = _phases(masks, s)  # (B, k*k, s*s, h, w)
        grad_features = grad_phases = None
        if ctx.needs_input_grad[0]:
            batch_size, channels, height, width = features.shape
            padded_grad = torch.empty(
                batch_size,
                channels,
                height + margin,
                width + margin,
                dtype=grad.dtype,
                device=grad.device,
                memory_format=layout,
            ).zero_()
            for tap in range(k * k):
                window = _shifted_window(padded_grad, *divmod(tap, k), margin)  # (B, C, h, w), a view
                for phase in range(s * s):
                    window.addcmul_(grad[:, :, phase], phases[:, tap, phase, None])
            grad_features = _shifted_window(padded_grad, radius, radius, margin)
        if ctx.needs_input_grad[1]:
            padded = F.pad(features, (radius, radius, radius, radius))[:, :, None]  # (B, C, 1, h + 2r, w + 2r)
            grad_phases = torch.empty_like(phases, memory_format=torch.contiguous_format)
            product = torch.empty_like(grad)  # reused by every tap (same layout as G)
            for tap in range(k * k):
                torch.mul(grad, _shifted_window(padded, *divmod(tap, k), margin), out=product)
                torch.sum(product, dim=1, out=grad_phases[:, tap])
            grad_phases = grad_phases.flatten(1, 2)
            grad_phases = F.pixel_shuffle(grad_phases, s) if s > 1 else grad_phases
        return grad_features, grad_phases, None, None


def _shifted_window(padded: torch.Tensor, top: int, left: int, margin: int) -> torch.Tensor:
    """The window of a map padded by `margin` in total per dimension whose corner is (top, left):
    `padded[..., top : top + H, left : left + W]` for the unpadded size (H, W), with constant bounds."""
    bottom, right = top - margin, left - margin  # <= 0; 0 means to the end
    return padded[..., top : bottom if bottom else None, left : right if right else None]


def neighbour_cosine_similarity(x: torch.Tensor, window: int = 3, dilation: int = 2) -> torch.Tensor:
    """Cosine similarity of each position with its (window^2 - 1) dilated neighbours (zero outside the map).

    (B, C, H, W) -> (B, window^2 - 1, H, W), neighbours in row-major order with the centre left out.
    """
    # Sum of squares over the channel dim of NCHW, rather than `norm(dim=1)`, which reduces slowly over a strided dim.
    unit = x / x.square().sum(dim=1, keepdim=True).sqrt().clamp_min(1e-8)  # (B, C, H, W)
    if _gather_formulations_on:
        return _neighbour_dots_by_gather(unit, window, dilation)
    if _takes_hand_written_backward(unit):
        return _NeighbourDotsFunction.apply(unit, window, dilation)
    return _neighbour_dots(unit, window, dilation)


def _neighbour_offsets(window: int, dilation: int) -> list[tuple[int, int]]:
    """(top, left) corners, in the padded map, of the neighbour windows in row-major order without the centre."""
    centre = window * window // 2
    taps = [divmod(tap, window) for tap in range(window**2) if tap != centre]
    return [(a * dilation, b * dilation) for a, b in taps]


def _neighbour_dots(unit: torch.Tensor, window: int, dilation: int) -> torch.Tensor:
    """Channel dot products of each position of `unit` with its dilated neighbours: (B, window^2 - 1, H, W)."""
    margin = 2 * (window // 2) * dilation
    padded = F.pad(unit, (margin // 2,) * 4)
    similarities = [
        (unit * _shifted_window(padded, top, left, margin)).sum(dim=1)
        for top, left in _neighbour_offsets(window, dilation)
    ]  # each (B, H, W)
    return torch.stack(similarities, dim=1)


def _neighbour_dots_by_gather(unit: torch.Tensor, window: int, dilation: int) -> torch.Tensor:
    """`_neighbour_dots` as one gather of every position's neighbour rows (`_gathered_windows`) and a (n x C) @ (C x 1)
    product per position: the export form (ONNX Runtime runs the loop as n slices, products and channel sums)."""
    batch_size, channels, height, width = unit.shape
    margin = 2 * (window // 2) * dilation
    neighbours = _gathered_windows(unit, _neighbour_offsets(window, dilation), margin)
    centres = unit.permute(0, 2, 3, 1).reshape(batch_size, height * width, channels, 1)
    return (neighbours @ centres).view(batch_size, height, width, -1).permute(0, 3, 1, 2)


class _NeighbourDotsFunction(torch.autograd.Function):
    """`_neighbour_dots` with a hand-written backward. Recorded by autograd, each neighbour window's gradient is a
    full padded zero map plus a copy (8 of each per call, 75 ms of an OffSeg-T training step at batch 2); here, with
    g_n the gradient of similarity n and P the zero-padded map, both terms accumulate in place into one padded
    gradient:

        d P[centre]      += g_n * P[window n]
        d P[window n]    += g_n * P[centre]
    """

    @staticmethod
    def forward(ctx, unit, window, dilation):
        ctx.save_for_backward(unit)
        ctx.window, ctx.dilation = window, dilation
        return _neighbour_dots(unit, window, dilation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (unit,) = ctx.saved_tensors
        margin = 2 * (ctx.window // 2) * ctx.dilation
        padded = F.pad(unit, (margin // 2,) * 4)
        padded_grad = torch.zeros_like(padded)
        centre_grad = _shifted_window(padded_grad, margin // 2, margin // 2, margin)
        for index, (top, left) in enumerate(_neighbour_offsets(ctx.window, ctx.dilation)):
            grad = grad_output[:, index : index + 1]  # (B, 1, H, W)
            centre_grad.addcmul_(_shifted_window(padded, top, left, margin), grad)
            _shifted_window(padded_grad, top, left, margin).addcmul_(unit, grad)
        return centre_grad, None, None


def _xavier_uniform_(conv: nn.Conv2d) -> None:
    init.xavier_uniform_(conv.weight)
    init.zeros_(conv.bias)


def _small_normal_(conv: nn.Conv2d) -> None:
    init.normal_(conv.weight, mean=0.0, std=0.001)
    init.zeros_(conv.bias)


def _zeros_(conv: nn.Conv2d) -> None:
    init.zeros_(conv.weight)
    init.zeros_(conv.bias)


class SimilarityGuidedResampler(nn.Module):
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
        hr_similarity = neighbour_cosine_similarity(hr_guide)
        lr_similarity = neighbour_cosine_similarity(lr_guide)
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
        if _gather_formulations_on:
            rows = x if channels_last else x.permute(0, 2, 3, 1)
            return _grid_sample_by_gather(rows, grid, groups).permute(0, 3, 1, 2)
        if channels_last:
            x = x.permute(0, 3, 1, 2)
        grouped = x.reshape(batch_size * groups, -1, s * height, s * width)
        sampled = F.grid_sample(grouped, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return sampled.view(batch_size, -1, *grid.shape[1:3])


class FreqFusion(nn.Module):
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

        if _gather_formulations_on:
            return self._fuse_by_gather(hr_feat, lr_feat, (height, width))
        hr_out, lr_out = self._fuse(hr_feat, lr_feat)
        return _crop(hr_out, height, width), _crop(lr_out, height, width)

    def _fuse(self, hr_feat: torch.Tensor, lr_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hr_feat (B, Ch, 2h, 2w), lr_feat (B, Cl, h, w) -> (hr_out, lr_out), both (B, C, 2h, 2w)."""
        hr_guide = self.hr_compressor(hr_feat)  # (B, c, 2h, 2w)
        lr_guide = self.lr_compressor(lr_feat)  # (B, c, h, w)

        # High-pass kernels from the high-res guide, used first to sharpen the guide itself.
        highpass_logits = self.highpass_encoder(hr_guide)  # (B, 9, 2h, 2w)
        hr_guide = 2 * hr_guide - carafe(hr_guide, highpass_logits.softmax(dim=1), self.highpass_kernel, 1)

        # Low-pass kernels from both guides; the low-res contribution is upsampled with the high-res estimate.
        lowpass_logits = self.lowpass_encoder(hr_guide)  # (B, 25, 2h, 2w)
        lowpass_logits = lowpass_logits + carafe(
            self.lowpass_encoder(lr_guide), lowpass_logits.softmax(dim=1), self.lowpass_kernel, 2
        )
        lowpass_kernels = lowpass_logits.softmax(dim=1)
        # The low-res map (adaptive low-pass upsampling) and its high-pass kernel logits share the low-pass kernels:
        # one CARAFE over both (channels are independent), half the traced graph of two.
        shared = carafe(
            torch.cat([lr_feat, self.highpass_encoder(lr_guide)], dim=1), lowpass_kernels, self.lowpass_kernel, 2
        )
        upsampled, highpass_upsampled = shared.split([lr_feat.shape[1], self.highpass_kernel**2], dim=1)
        highpass_logits = highpass_logits + highpass_upsampled
        # Adaptive high-pass residual: hr + (hr - lowpass(hr)).
        hr_out = 2 * hr_feat - carafe(hr_feat, highpass_logits.softmax(dim=1), self.highpass_kernel, 1)
        return hr_out, self.resampler(hr_guide, lr_guide, upsampled)

    def _fuse_by_gather(
        self, hr_feat: torch.Tensor, lr_feat: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_fuse` with every CARAFE as `_carafe_rows` and the kernels kept in its layout, and both outputs cropped to
        `size`: the export form. The resampler samples the cropped window only, and the high-res output is cropped
        by one negative padding: ONNX Runtime copies the map for every slice, even a full-length one.

        The kernel logits are laid out per input pixel and output phase with the taps last (`_taps_last`) as soon as
        a convolution has made them, and summed, normalised (a last-axis softmax) and used there; the upsampled map
        stays channels-last into the resampler, whose gather reads channel rows. ONNX Runtime otherwise transposes
        for every channel softmax, for the pixel shuffles and for the resampler's gather (19 of 84 ms of OffSeg-T's
        last fusion at 512x512). Same values as `_fuse` up to float rounding."""
        batch_size = hr_feat.shape[0]
        height, width = lr_feat.shape[-2:]
        k_low, k_high = self.lowpass_kernel, self.highpass_kernel
        hr_guide = self.hr_compressor(hr_feat)
        lr_guide = self.lr_compressor(lr_feat)

        def to_map(rows: torch.Tensor) -> torch.Tensor:  # (B, 4hw, 1, C) at the high resolution -> (B, C, 2h, 2w)
            return _rows_to_map(rows, 2 * height, 2 * width, 1).permute(0, 3, 1, 2)

        highpass = _taps_last(self.highpass_encoder(hr_guide), 2 * height, 2 * width, 1)  # logits (B, 4hw, 1, 9)
        hr_guide = 2 * hr_guide - to_map(_carafe_rows(hr_guide, highpass.softmax(dim=-1), k_high))

        lowpass = _taps_last(self.lowpass_encoder(hr_guide), height, width, 2)  # logits (B, hw, 4, 25)
        lowpass = lowpass + _carafe_rows(self.lowpass_encoder(lr_guide), lowpass.softmax(dim=-1), k_low)
        lowpass = lowpass.softmax(dim=-1)
        upsampled = _rows_to_map(_carafe_rows(lr_feat, lowpass, k_low), height, width, 2)  # (B, 2h, 2w, Cl)
        highpass_upsampled = _carafe_rows(self.highpass_encoder(lr_guide), lowpass, k_low)  # (B, hw, 4, 9)
        highpass_upsampled = _rows_to_map(highpass_upsampled, height, width, 2).reshape(batch_size, -1, 1, k_high**2)
        highpass = (highpass + highpass_upsampled).softmax(dim=-1)
        hr_out = 2 * hr_feat - to_map(_carafe_rows(hr_feat, highpass, k_high))
        hr_out = F.pad(hr_out, (0, size[1] - 2 * width, 0, size[0] - 2 * height))  # crop: pads of 0 or -1
        return hr_out, self.resampler(hr_guide, lr_guide, upsampled, channels_last=True, size=size)


def _crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The top-left (height, width) window of a (..., H, W) map."""
    return x.narrow(-2, 0, height).narrow(-1, 0, width)
