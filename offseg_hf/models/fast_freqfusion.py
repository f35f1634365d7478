"""The fast and export forms of FreqFusion's operations (`freqfusion.py` holds the reference forms; `forms.py` says
how a module chooses). Each computes the reference's values up to float rounding (summation order); tests compare them.

Fast (eager PyTorch, the default):

* CARAFE as a loop over the k*k taps that accumulates `mask_tap * shifted_map` in place (`carafe_by_taps`): no
  (C * k * k)-channel unfolded copy of the map is ever built (CARAFE is memory-bound: the copy costs more than the
  arithmetic). For s = 2 the masks are split into the four output phases (pixel-unshuffle), the taps are accumulated
  at the input resolution for all phases at once, and the result is pixel-shuffled up. With gradients, one autograd
  node with a hand-written, in-place backward (`CarafeFunction`) replaces the k*k recorded multiply-adds.
* The resampler's neighbour similarities the same way (`neighbour_dots_by_shifts`, `NeighbourDotsFunction`).

Compiled (`form = "compiled"`, opt-in): CARAFE as `carafe_by_rows`, a sum of k*k shifted channel rows times kernel
weights written for inductor, run through one `torch.compile(..., dynamic=True)` per process (`compiled_carafe`).
Inductor turns it into one C++ loop nest per (k, s): no per-tap tensor, no pixel shuffle; the first forward pays
the compilation. Whether it pays off depends on the preset, the CPU and the thread count (docs/speed.md). Where the
compiled kernels do not apply (`forms.compiled_kernels`: a gradient is needed, or a device other than the CPU) the
fast form runs; under an outer `torch.compile` the plain `carafe_by_rows` is traced.

Export (`form = "export"`, which `offseg_hf.export` sets on the model it exports): CARAFE, the similarities and the
resampler's bilinear sampling as row gathers and small batched matrix products (`carafe_by_gather`,
`neighbour_dots_by_gather`, `grid_sample_by_gather`), and the whole fusion with its kernels kept in the gathers'
layout (`fuse_by_gather`). ONNX Runtime runs the tap loops as k*k separate slice, product and sum kernels, each
writing a fresh full-size buffer, and its GridSample kernel is slow; in eager PyTorch the gathers are the slower
form, hence export only. The speed of each form on each CPU is in docs/speed.md and docs/export.md.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from .forms import compiled_kernels, hand_written_backward


def check_carafe_masks(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, scale_factor: int) -> None:
    """Raise `ValueError` unless masks (B, k*k, s*h, s*w) fit features (B, C, h, w)."""
    batch_size, _, height, width = features.shape
    s = scale_factor
    expected = (batch_size, kernel_size * kernel_size, s * height, s * width)
    if tuple(masks.shape) != expected:
        raise ValueError(
            f"CARAFE masks must have shape {expected} for features {tuple(features.shape)}, kernel {kernel_size} and "
            f"scale {scale_factor}; got {tuple(masks.shape)}."
        )


def carafe(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, scale_factor: int) -> torch.Tensor:
    """CARAFE's fast form: (B, C, h, w) features, (B, k*k, s*h, s*w) normalised masks -> (B, C, s*h, s*w); the
    hand-written backward when a gradient will be taken, else the tap loop."""
    check_carafe_masks(features, masks, kernel_size, scale_factor)
    if hand_written_backward(features, masks):
        return CarafeFunction.apply(features, masks, kernel_size, scale_factor)
    return carafe_by_taps(features, masks, kernel_size, scale_factor)


def compiled_carafe(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, scale_factor: int) -> torch.Tensor:
    """CARAFE's compiled form: `carafe_by_rows` compiled by inductor, the features handed over channels-last (the
    output is channels-last too); where the compiled kernels do not apply, the fast form."""
    if not torch.compiler.is_compiling() and not compiled_kernels(features, masks):
        return carafe(features, masks, kernel_size, scale_factor)
    check_carafe_masks(features, masks, kernel_size, scale_factor)
    if torch.compiler.is_compiling():
        return carafe_by_rows(features, masks, kernel_size, scale_factor)  # the outer compilation fuses it
    features = features.contiguous(memory_format=torch.channels_last)
    return _carafe_by_rows_compiled()(features, masks.contiguous(), kernel_size, scale_factor)


@functools.cache
def _carafe_by_rows_compiled():
    # One compiled function per process, shared by every module that runs the compiled form: inductor's code depends
    # on (k, s) and the dtype, not on the module, and dynamic shapes keep it to one graph per (k, s) for every input
    # size and channel count. Built on first use so that importing the models never imports dynamo.
    return torch.compile(carafe_by_rows, dynamic=True)


def carafe_by_rows(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, scale_factor: int) -> torch.Tensor:
    """CARAFE as one sum of k*k products of shifted channel rows and kernel weights, out of place, laid out
    channels-last: features (B, C, h, w), masks (B, k*k, s*h, s*w) -> (B, C, s*h, s*w) in channels-last memory.

    Written to be compiled, not run eagerly (eagerly every product is a fresh full-size tensor). The output is indexed
    (B, h, s, w, s, C): output pixel (s*y + i, s*x + j) of channel c reads the k x k window of input pixel (y, x), so
    the s x s output phases are two size-s axes of one view of the masks and of the output, and no pixel shuffle
    (a second pass over the output) is needed. With the channels innermost, every load of the features and every
    store of the output is contiguous along the axis inductor vectorises, and a kernel weight is one broadcast scalar
    per pixel; features that arrive channels-first are read across that axis with a stride of h*w, hence
    `compiled_carafe` hands them over channels-last."""
    batch_size, channels, height, width = features.shape
    k, s, radius = kernel_size, scale_factor, kernel_size // 2
    rows = F.pad(features.permute(0, 2, 3, 1), (0, 0, radius, radius, radius, radius))  # (B, h + 2r, w + 2r, C)
    weights = masks.view(batch_size, k * k, height, s, width, s, 1)  # tap t at [:, t]: (B, h, s, w, s, 1)
    out = None
    # Two loops rather than divmod of the tap index: under dynamic shapes dynamo cannot trace divmod of ints.
    for top in range(k):
        for left in range(k):
            window = rows[:, top : top + height, None, left : left + width, None, :]  # (B, h, 1, w, 1, C)
            term = window * weights[:, top * k + left]
            out = term if out is None else out + term
    return out.reshape(batch_size, s * height, s * width, channels).permute(0, 3, 1, 2)


def neighbour_dots(unit: torch.Tensor, window: int, dilation: int) -> torch.Tensor:
    """Channel dot products of each position of `unit` (B, C, H, W) with its dilated neighbours, in row-major order
    without the centre: (B, window^2 - 1, H, W). The fast form of the similarity's products."""
    if hand_written_backward(unit):
        return NeighbourDotsFunction.apply(unit, window, dilation)
    return neighbour_dots_by_shifts(unit, window, dilation)


def _phases(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """(B, N, s*h, s*w) -> (B, N, s*s, h, w): output phase (i, j) of input pixel (y, x) is output pixel
    (s*y + i, s*x + j)."""
    if scale_factor == 1:
        return x[:, :, None]
    batch_size, channels, height, width = x.shape
    s = scale_factor
    return F.pixel_unshuffle(x, s).view(batch_size, channels, s * s, height // s, width // s)


def carafe_by_taps(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, scale_factor: int) -> torch.Tensor:
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


def carafe_by_gather(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, scale_factor: int) -> torch.Tensor:
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


def grid_sample_by_gather(rows: torch.Tensor, grid: torch.Tensor, groups: int) -> torch.Tensor:
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


class CarafeFunction(torch.autograd.Function):
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
        return carafe_by_taps(features, masks, kernel_size, scale_factor)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        features, masks = ctx.saved_tensors
        k, s = ctx.kernel_size, ctx.scale_factor
        radius, margin = k // 2, 2 * (k // 2)
        # Every operand in the features' memory layout (OffSeg's high-res maps are channels-last): mixed layouts send
        # the elementwise kernels down ATen's slow strided path.
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


def _neighbour_offsets(window: int, dilation: int) -> list[tuple[int, int]]:
    """(top, left) corners, in the padded map, of the neighbour windows in row-major order without the centre."""
    centre = window * window // 2
    taps = [divmod(tap, window) for tap in range(window**2) if tap != centre]
    return [(a * dilation, b * dilation) for a, b in taps]


def neighbour_dots_by_shifts(unit: torch.Tensor, window: int, dilation: int) -> torch.Tensor:
    """Channel dot products of each position of `unit` with its dilated neighbours: (B, window^2 - 1, H, W)."""
    margin = 2 * (window // 2) * dilation
    padded = F.pad(unit, (margin // 2,) * 4)
    similarities = [
        (unit * _shifted_window(padded, top, left, margin)).sum(dim=1)
        for top, left in _neighbour_offsets(window, dilation)
    ]  # each (B, H, W)
    return torch.stack(similarities, dim=1)


def neighbour_dots_by_gather(unit: torch.Tensor, window: int, dilation: int) -> torch.Tensor:
    """`neighbour_dots_by_shifts` as one gather of every position's neighbour rows (`_gathered_windows`) and an
    (n x C) @ (C x 1) product per position: the export form (ONNX Runtime runs the loop as n slices, products and
    channel sums)."""
    batch_size, channels, height, width = unit.shape
    margin = 2 * (window // 2) * dilation
    neighbours = _gathered_windows(unit, _neighbour_offsets(window, dilation), margin)
    centres = unit.permute(0, 2, 3, 1).reshape(batch_size, height * width, channels, 1)
    return (neighbours @ centres).view(batch_size, height, width, -1).permute(0, 3, 1, 2)


class NeighbourDotsFunction(torch.autograd.Function):
    """`neighbour_dots_by_shifts` with a hand-written backward. Recorded by autograd, each neighbour window's gradient
    is a full padded zero map plus a copy (8 of each per call); here, with
    g_n the gradient of similarity n and P the zero-padded map, both terms accumulate in place into one padded
    gradient:

        d P[centre]      += g_n * P[window n]
        d P[window n]    += g_n * P[centre]
    """

    @staticmethod
    def forward(ctx, unit, window, dilation):
        ctx.save_for_backward(unit)
        ctx.window, ctx.dilation = window, dilation
        return neighbour_dots_by_shifts(unit, window, dilation)

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


def fuse_by_gather(
    fusion: nn.Module, hr_feat: torch.Tensor, lr_feat: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`FreqFusion._fuse` with every CARAFE as `_carafe_rows` and the kernels kept in its layout, and both outputs
    cropped to `size`: the export form. The resampler samples the cropped window only, and the high-res output is
    cropped by one negative padding: ONNX Runtime copies the map for every slice, even a full-length one.

    The kernel logits are laid out per input pixel and output phase with the taps last (`_taps_last`) as soon as
    a convolution has made them, and summed, normalised (a last-axis softmax) and used there; the upsampled map
    stays channels-last into the resampler, whose gather reads channel rows. ONNX Runtime otherwise transposes
    for every channel softmax, for the pixel shuffles and for the resampler's gather. Same values as
    `FreqFusion._fuse` up to float rounding."""
    batch_size = hr_feat.shape[0]
    height, width = lr_feat.shape[-2:]
    k_low, k_high = fusion.lowpass_kernel, fusion.highpass_kernel
    hr_guide = fusion.hr_compressor(hr_feat)
    lr_guide = fusion.lr_compressor(lr_feat)

    def to_map(rows: torch.Tensor) -> torch.Tensor:  # (B, 4hw, 1, C) at the high resolution -> (B, C, 2h, 2w)
        return _rows_to_map(rows, 2 * height, 2 * width, 1).permute(0, 3, 1, 2)

    highpass = _taps_last(fusion.highpass_encoder(hr_guide), 2 * height, 2 * width, 1)  # logits (B, 4hw, 1, 9)
    hr_guide = 2 * hr_guide - to_map(_carafe_rows(hr_guide, highpass.softmax(dim=-1), k_high))

    lowpass = _taps_last(fusion.lowpass_encoder(hr_guide), height, width, 2)  # logits (B, hw, 4, 25)
    lowpass = lowpass + _carafe_rows(fusion.lowpass_encoder(lr_guide), lowpass.softmax(dim=-1), k_low)
    lowpass = lowpass.softmax(dim=-1)
    upsampled = _rows_to_map(_carafe_rows(lr_feat, lowpass, k_low), height, width, 2)  # (B, 2h, 2w, Cl)
    highpass_upsampled = _carafe_rows(fusion.highpass_encoder(lr_guide), lowpass, k_low)  # (B, hw, 4, 9)
    highpass_upsampled = _rows_to_map(highpass_upsampled, height, width, 2).reshape(batch_size, -1, 1, k_high**2)
    highpass = (highpass + highpass_upsampled).softmax(dim=-1)
    hr_out = 2 * hr_feat - to_map(_carafe_rows(hr_feat, highpass, k_high))
    hr_out = F.pad(hr_out, (0, size[1] - 2 * width, 0, size[0] - 2 * height))  # crop: pads of 0 or -1
    return hr_out, fusion.resampler(hr_guide, lr_guide, upsampled, channels_last=True, size=size)
