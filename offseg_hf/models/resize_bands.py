"""Full-size label maps in row bands: the argmax of logits resized bilinearly to the image (and the per-class scores
the Inference Endpoints handler reports), without ever holding the (K, H, W) resized logits.

Why: `transformers`' post-processing resizes the (K, h, w) logits to the image as one (K, H, W) tensor; at 150
classes a 12 MP photo makes that 7.3 GB in float32. Each output row of a bilinear resize (align_corners=False) reads
at most two input rows, so the resized logits can be formed a band of rows at a time, reduced to class ids (and
scores) and dropped. `resize_argmax` does that; the image processor's `post_process_semantic_segmentation` (so
`pipeline("image-segmentation")` and `OnnxSegmenter`), the handler, the Gradio app and the evaluation use it.

Band size: `rows_per_band` fits a band's working tensors into a byte budget: `budget_mb` where a caller passes one
(the image processor's `resize_budget_mb`), else the environment variable OFFSEG_RESIZE_BUDGET_MB, else 256 MiB. The
budget bounds the working memory; the (H, W) int64 label map that is returned comes on top. A band has at least one
row, so a budget below one row's need is exceeded by that row. When two (K, H, W) tensors fit the budget (what the
whole resize can hold), it runs whole: the plain `F.interpolate` + argmax.

Exactness: a band cannot be handed to `F.interpolate`: it derives the sampling positions from the sizes it is given,
so a band's rows would sample elsewhere. The bands repeat the arithmetic of the ATen kernel that the whole resize
would run (`aten_kernel`). Both of ATen's CPU bilinear kernels compute, per output index d along a dimension of
`size_in` -> `size_out` in the logits' dtype: scale = size_in / size_out, src = scale * (d + 0.5) - 0.5 clamped at 0,
i0 = floor(src) (floored in float32, as ATen's floorf does; at most size_in - 1), i1 = i0 + 1 (i0 at the last
index), w1 = src - i0, w0 = 1 - w1; an unchanged size keeps i0 = i1 = d, w0 = 1, w1 = 0. The generic kernel
(contiguous logits) resizes the width, then the height, each as t0 * w0 + t1 * w1. The channels-last kernel (taken
for channels-last logits of more than 3 classes, which is what offset learning's classifier returns, for 3 classes
on one thread, and for outputs with height + width <= 128) sums the four corners with weights h * w, vectorised over
the classes, with a scalar loop for the classes past the last full vector. Both leave the rounding of `a * b + c`
to the compiler, which on x86-64 builds fuses products into fused multiply-adds, in an order that differs between
the vector and the scalar loop. Which fused or plain form a build uses (for the source index, for the generic sums,
and per class for the channels-last sums) is found once per device type, dtype (and number of classes) by comparing
the candidate forms with `F.interpolate` on small probes (`arithmetic`, `channels_last_arithmetic`). With the
matching forms every resized value is bitwise `F.interpolate`'s, so the argmax (ties included) is identical. Left
approximate (values equal to float rounding, label maps equal except where classes tie to within rounding): a
build, device or dtype where no candidate form matches (`.exact` is False; CUDA's kernels are probed the same way).
Half-precision logits are resized in float32, as the evaluation has always done: their argmax then no longer depends
on ties from rounding to the half type.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import NamedTuple

import torch
from torch.nn import functional as F

DEFAULT_BUDGET_MB = 256
BUDGET_ENV = "OFFSEG_RESIZE_BUDGET_MB"
# Outputs whose height + width is at most this take ATen's channels-last kernel on the CPU (its size rule).
_CHANNELS_LAST_KERNEL_MAX_SIDES = 128
# The per-class score of a pixel: "softmax" (logits) or "normalised" (Mask2Former's non-negative class maps, / sum).
SCORE_KINDS = ("softmax", "normalised")


def resize_budget_bytes(budget_mb: float | None = None) -> int:
    """The working-memory budget in bytes: `budget_mb` MiB, else $OFFSEG_RESIZE_BUDGET_MB, else 256 MiB."""
    source = "budget_mb"
    if budget_mb is None:
        text = os.environ.get(BUDGET_ENV, "").strip()
        if not text:
            return DEFAULT_BUDGET_MB * 2**20
        source = BUDGET_ENV
        try:
            budget_mb = float(text)
        except ValueError:
            raise ValueError(f"{BUDGET_ENV}={text!r} is not a number of MiB") from None
    if not budget_mb > 0:
        raise ValueError(f"{source} must be a positive number of MiB; got {budget_mb!r}")
    return int(budget_mb * 2**20)


def _rows_in_runs(input_height: int, output_height: int) -> bool:
    # From 2x upsampling on, consecutive output rows share their two input rows: such runs are formed by
    # broadcasting those two rows (no copies); otherwise each output row gathers its own two. (Columns always gather:
    # runs along the last dimension are many small strided operations, far slower.)
    return 2 * input_height <= output_height


def rows_per_band(
    num_labels: int,
    input_height: int,
    output_height: int,
    output_width: int,
    dtype: torch.dtype = torch.float32,
    budget_bytes: int | None = None,
    kernel: str = "generic",
) -> int:
    """How many output rows a band holds so that its working tensors fit `budget_bytes` (at least 1, at most
    `output_height`), for the bands that follow ATen's "generic" or "channels_last" kernel ("channels_last_unfused"
    where the build's sums are not fused).

    Generic: a band of b output rows reads r <= b * s + 3 input rows (s = input_height / output_height). Its peak
    holds the (K, b, W) band, the (K, r, W) width-resized input rows with the two (K, r, W) gathers they are formed
    from, and, where rows are gathered rather than broadcast in runs, two (K, b, W) gathers. Channels-last: the
    (K, b, W) band, its four (b, W) corner weights and four width-resized input rows (K, W), plus five band-sized
    temporaries where the build's sums are not fused. Either way the band's per-pixel class ids, maxima and scores
    take up to 32 bytes a pixel.
    """
    budget_bytes = resize_budget_bytes() if budget_bytes is None else budget_bytes
    itemsize = 8 if dtype == torch.float64 else 4  # half types are resized in float32
    plane_row = itemsize * num_labels * output_width  # one row of a (K, rows, W) tensor
    if kernel.startswith("channels_last"):
        per_row = plane_row * (6 if kernel == "channels_last_unfused" else 1) + (4 * itemsize + 32) * output_width
        fixed = plane_row * 4
    else:
        s = input_height / output_height
        per_row = plane_row * (1 + 3 * s if _rows_in_runs(input_height, output_height) else max(1 + 3 * s, 3 + s))
        per_row += 32 * output_width
        fixed = plane_row * 9  # the up to 3 extra input rows, three times
    rows = int(0.9 * (budget_bytes - fixed) // per_row)  # 10% for the allocator and the bincounts
    return max(1, min(output_height, rows))


class Arithmetic(NamedTuple):
    """Which rounding form reproduces `F.interpolate` on a device type and dtype (see the module docstring)."""

    source: str  # "fused": fma(scale, d + 0.5, -0.5); "plain": scale * (d + 0.5) - 0.5
    combine: str  # "fused_first": fma(t0, w0, t1 * w1); "fused_second": fma(t1, w1, t0 * w0); "plain"
    exact: bool  # False where no candidate matched the probes (then: "plain", "plain")


def _axis_weights(
    size_in: int, size_out: int, dtype: torch.dtype, source: str, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i0, i1, w0, w1), each (size_out,), as ATen's bilinear kernel computes them for one dimension."""
    if size_in == size_out:
        index = torch.arange(size_out, device=device)
        ones = torch.ones(size_out, dtype=dtype, device=device)
        return index, index, ones, torch.zeros_like(ones)
    scale = torch.tensor(size_in, dtype=dtype, device=device) / size_out
    centre = torch.arange(size_out, dtype=dtype, device=device) + 0.5
    if source == "fused":
        src = torch.addcmul(torch.full_like(centre, -0.5), centre, scale)
    else:
        src = centre * scale - 0.5
    src = src.clamp_min(0)
    # ATen floors the index in float32 (floorf) whatever the dtype: a float64 index just below an integer rounds up.
    i0 = src.float().floor().long().clamp_max(size_in - 1)
    w1 = (src - i0.to(dtype)).clamp(0, 1)
    i1 = torch.where(i0 < size_in - 1, i0 + 1, i0)
    return i0, i1, 1 - w1, w1


def _combine(out: torch.Tensor, t0: torch.Tensor, w0: torch.Tensor, t1: torch.Tensor, w1: torch.Tensor, form: str):
    """out = t0 * w0 + t1 * w1, rounded as `form` says (t0, t1, w0, w1 broadcast to `out`)."""
    if form == "fused_first":
        torch.mul(t1, w1, out=out).addcmul_(t0, w0)
    elif form == "fused_second":
        torch.mul(t0, w0, out=out).addcmul_(t1, w1)
    else:
        torch.mul(t0, w0, out=out).add_(t1 * w1)
    return out


def _resize_dim(source, dim, positions, out: torch.Tensor, runs: bool, form: str) -> torch.Tensor:
    """`source` resized along `dim` into `out`, with `positions` = (i0, i1, w0, w1) of out's indices along it."""
    i0, i1, w0, w1 = positions
    shape = [1] * out.ndim
    shape[dim] = -1
    if not runs:
        gathered0, gathered1 = source.index_select(dim, i0), source.index_select(dim, i1)
        return _combine(out, gathered0, w0.view(shape), gathered1, w1.view(shape), form)
    values, counts = torch.unique_consecutive(i0, return_counts=True)
    start, seconds = 0, i1.tolist()
    for first, count in zip(values.tolist(), counts.tolist(), strict=True):
        second = seconds[start]  # i1 follows from i0, so it is constant along a run too
        weights0, weights1 = w0[start : start + count].view(shape), w1[start : start + count].view(shape)
        inputs0, inputs1 = source.narrow(dim, first, 1), source.narrow(dim, second, 1)
        _combine(out.narrow(dim, start, count), inputs0, weights0, inputs1, weights1, form)
        start += count
    return out


class _Plan:
    """One image's resize: the sampling positions and weights of both dimensions, in the chosen arithmetic."""

    def __init__(self, logits: torch.Tensor, size: tuple[int, int], arithmetic: Arithmetic):
        _, in_h, in_w = logits.shape
        self.form = arithmetic.combine
        self.rows = _axis_weights(in_h, size[0], logits.dtype, arithmetic.source, logits.device)
        self.cols = _axis_weights(in_w, size[1], logits.dtype, arithmetic.source, logits.device)
        self.row_runs = _rows_in_runs(in_h, size[0])

    def band(self, logits: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
        """The resized logits of output rows [start, start + b) written into `out` (K, b, W)."""
        i0, i1, w0, w1 = (part[start : start + out.shape[1]] for part in self.rows)
        first, last = int(i0[0]), int(i1[-1]) + 1
        slab = logits[:, first:last]  # (K, r, w): the input rows this band samples
        resized = slab.new_empty(slab.shape[0], slab.shape[1], out.shape[2])  # (K, r, W): those rows at width W
        _resize_dim(slab, 2, self.cols, resized, False, self.form)
        return _resize_dim(resized, 1, (i0 - first, i1 - first, w0, w1), out, self.row_runs, self.form)


def _probe_logits(shape: tuple[int, ...], device, dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 8).to(device=device, dtype=dtype)


# Probe resizes ATen runs through its generic kernel (2 classes, height + width > 128): up and down, odd ratios.
# Rows formed in runs and by gathers (see _rows_in_runs).
_PROBES = (((2, 7, 11), (97, 89)), ((2, 61, 53), (37, 131)), ((2, 13, 150), (20, 171)))


@functools.cache
def arithmetic(device_type: str, dtype: torch.dtype, channels_last: bool = False) -> Arithmetic:
    """The rounding form under which the bands reproduce `F.interpolate` bitwise on this build, device type and
    dtype (a property of the installed torch and the machine, so computed once per process). `channels_last`: probe
    with logits in that layout (on the CPU it takes the channels-last kernel only with more classes than the probes
    have; a GPU may pick its kernel by layout alone)."""
    device = torch.device(device_type)
    for source in ("fused", "plain"):
        for combine in ("fused_first", "fused_second", "plain"):
            candidate = Arithmetic(source, combine, True)
            for index, (shape, size) in enumerate(_PROBES):
                logits = _probe_logits(shape, device, dtype, index)
                if channels_last:
                    logits = logits[None].contiguous(memory_format=torch.channels_last)[0]
                expected = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
                plan = _Plan(logits, size, candidate)
                resized = logits.new_empty(logits.shape[0], *size)
                for start in range(0, size[0], 5):
                    plan.band(logits, start, resized[:, start : start + 5])
                if not torch.equal(resized, expected):
                    break
            else:
                return candidate
    return Arithmetic("plain", "plain", False)


# ATen's channels-last kernel sums a pixel's four corners a = (i0, j0), b = (i0, j1), c = (i1, j0), d = (i1, j1) with
# weights h0 * w0, h0 * w1, h1 * w0, h1 * w1, vectorised over the classes with a scalar loop for the classes past the
# last full vector. The compiler orders and fuses those sums differently in the two loops: a chain "cdba" is
# fma(a, wa, fma(b, wb, fma(d, wd, c * wc))); "nested" and "left" are the unfused sums a + (b + (c + d)) and
# ((a + b) + c) + d of the products.
_CHAINS = tuple("".join(order) for order in itertools.permutations("abcd")) + ("nested", "left")


class ChannelsLastArithmetic(NamedTuple):
    """The rounding form of ATen's channels-last kernel per class (see `_CHAINS`), for one number of classes."""

    source: str  # as Arithmetic.source
    chains: tuple[tuple[int, int, str], ...]  # (first class, end class, chain): consecutive classes sharing a chain
    exact: bool


def _sum_corners(out: torch.Tensor, corners: dict[str, tuple[torch.Tensor, torch.Tensor]], chain: str) -> None:
    """out = the sum over corners of value * weight, rounded as `chain` says (values and weights broadcast)."""
    if chain in ("nested", "left"):
        products = [value * weight for value, weight in (corners[corner] for corner in "abcd")]
        if chain == "nested":
            out.copy_(products[0] + (products[1] + (products[2] + products[3])))
        else:
            out.copy_(((products[0] + products[1]) + products[2]) + products[3])
        return
    torch.mul(*corners[chain[0]], out=out)
    for corner in chain[1:]:
        out.addcmul_(*corners[corner])


class _ChannelsLastPlan:
    """One image's resize as ATen's channels-last kernel computes it: per output row band, the rows formed from
    their two input rows (width-gathered) and the four (b, W) corner weights, chain by chain over the classes."""

    def __init__(self, logits: torch.Tensor, size: tuple[int, int], arithmetic: ChannelsLastArithmetic):
        _, in_h, in_w = logits.shape
        self.chains = arithmetic.chains
        self.rows = _axis_weights(in_h, size[0], logits.dtype, arithmetic.source, logits.device)
        self.cols = _axis_weights(in_w, size[1], logits.dtype, arithmetic.source, logits.device)

    def band(self, logits: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
        """The resized logits of output rows [start, start + b) written into `out` (K, b, W)."""
        i0, i1, h0, h1 = (part[start : start + out.shape[1]] for part in self.rows)
        j0, j1, v0, v1 = self.cols
        h0, h1 = h0[:, None], h1[:, None]
        weights = {"a": h0 * v0, "b": h0 * v1, "c": h1 * v0, "d": h1 * v1}  # (b, W) each
        values, counts = torch.unique_consecutive(i0, return_counts=True)
        row, seconds = 0, i1.tolist()
        for first, count in zip(values.tolist(), counts.tolist(), strict=True):
            rows = slice(row, row + count)
            upper, lower = logits[:, first], logits[:, seconds[row]]  # (K, w): i1 is constant along a run of i0
            corners = {  # (K, 1, W) each
                "a": upper.index_select(1, j0)[:, None],
                "b": upper.index_select(1, j1)[:, None],
                "c": lower.index_select(1, j0)[:, None],
                "d": lower.index_select(1, j1)[:, None],
            }
            for begin, end, chain in self.chains:
                classes = {name: (value[begin:end], weights[name][rows]) for name, value in corners.items()}
                _sum_corners(out[begin:end, rows], classes, chain)
            row += count
        return out


# Probe resizes ATen runs through its channels-last kernel whatever the logits' layout (height + width <= 128).
_CHANNELS_LAST_PROBES = (((13, 17), (29, 37)), ((23, 19), (11, 14)))


@functools.cache
def channels_last_arithmetic(device_type: str, dtype: torch.dtype, num_labels: int) -> ChannelsLastArithmetic:
    """The rounding form of each class under which the bands reproduce ATen's channels-last kernel bitwise, for
    `num_labels` classes on this build, device type and dtype (which classes fall past the last full vector depends
    on the number of classes; computed once per process)."""
    device = torch.device(device_type)
    probes = []
    for index, (shape, size) in enumerate(_CHANNELS_LAST_PROBES):
        logits = _probe_logits((num_labels, *shape), device, dtype, index)
        logits = logits[None].contiguous(memory_format=torch.channels_last)[0]
        probes.append((logits, size, F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]))
    for source in ("fused", "plain"):
        found: list[str | None] = [None] * num_labels
        for chain in _CHAINS:
            candidate = ChannelsLastArithmetic(source, ((0, num_labels, chain),), True)
            matches = torch.ones(num_labels, dtype=torch.bool, device=device)
            for logits, size, expected in probes:
                resized = _ChannelsLastPlan(logits, size, candidate).band(logits, 0, torch.empty_like(expected))
                matches &= (resized == expected).flatten(1).all(dim=1)
            for class_id in matches.nonzero().flatten().tolist():
                found[class_id] = found[class_id] or chain
        if None not in found:
            groups = []
            for class_id, chain in enumerate(found):
                if groups and groups[-1][2] == chain:
                    groups[-1] = (groups[-1][0], class_id + 1, chain)
                else:
                    groups.append((class_id, class_id + 1, chain))
            return ChannelsLastArithmetic(source, tuple(groups), True)
    return ChannelsLastArithmetic("plain", ((0, num_labels, "left"),), False)


def aten_kernel(logits: torch.Tensor, size: tuple[int, int]) -> str:
    """Which of its bilinear kernels ATen resizes (K, h, w) logits to `size` with: "channels_last" on the CPU for
    channels-last logits of more than 3 classes, for 3 classes on one thread and for outputs with
    height + width <= 128 (its dispatch rule); else "generic"."""
    if logits.device.type != "cpu":
        return "generic"
    classes = logits.shape[0]
    if size[0] + size[1] <= _CHANNELS_LAST_KERNEL_MAX_SIDES:
        return "channels_last"
    if classes > 3 and logits[None].is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "channels_last" if classes == 3 and torch.get_num_threads() == 1 else "generic"


def _pixel_scores(band: torch.Tensor, top: torch.Tensor, kind: str) -> torch.Tensor:
    """The winning class's score per pixel (b, W) from the band's resized logits (K, b, W; overwritten) and their
    maximum over classes (b, W)."""
    if kind == "softmax":
        return band.sub_(top).exp_().sum(dim=0).reciprocal_()  # exp(top - top) / sum_k exp(x_k - top)
    return (top / band.sum(dim=0).clamp_min(1e-12)).clamp_(0, 1)


class BandedResult(NamedTuple):
    label_map: torch.Tensor  # (H, W) int64
    scores: torch.Tensor | None  # (K,) float64: each class's mean score over its pixels (NaN where it has none)
    pixel_counts: torch.Tensor | None  # (K,) int64: pixels per class


def resize_argmax(
    logits: torch.Tensor,
    size: tuple[int, int],
    *,
    scores: str | None = None,
    budget_mb: float | None = None,
    band_rows: int | None = None,
) -> BandedResult:
    """(K, h, w) logits -> the label map (H, W) = argmax over K of the bilinear resize (align_corners=False) to
    `size`, formed in row bands (see the module docstring).

    Args:
        scores: also each class's mean score over the pixels it wins: "softmax" (the softmax probability, for
            logits) or "normalised" (the class map over the sum of all maps, for Mask2Former's semantic maps).
        budget_mb: working-memory budget in MiB (default: $OFFSEG_RESIZE_BUDGET_MB, else 256).
        band_rows: rows per band, overriding the budget's choice (tests use it to force bands).
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (num_labels, height, width); got shape {tuple(logits.shape)}")
    if scores is not None and scores not in SCORE_KINDS:
        raise ValueError(f"scores must be one of {SCORE_KINDS} or None; got {scores!r}")
    height, width = (int(side) for side in size)
    if min(height, width, *logits.shape) < 1:
        raise ValueError(f"cannot resize logits of shape {tuple(logits.shape)} to {height}x{width}")
    budget = resize_budget_bytes(budget_mb)
    num_labels = logits.shape[0]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # half types: resized and compared in float32, as the evaluation always has
    with torch.no_grad():
        # The whole resize can hold two (K, H, W) tensors: for channels-last logits ATen computes into a
        # channels-last one and copies it to the contiguous output it allocated.
        fits = 2 * logits.element_size() * num_labels * height * width <= budget
        if band_rows is None and fits:  # the whole resize fits the budget: F.interpolate itself
            plan, band_rows = None, height
        else:
            kernel = aten_kernel(logits, (height, width))
            if kernel == "channels_last":
                form = channels_last_arithmetic(logits.device.type, logits.dtype, num_labels)
                plan = _ChannelsLastPlan(logits, (height, width), form)
                if any(chain in ("nested", "left") for *_, chain in form.chains):
                    kernel = "channels_last_unfused"
            else:
                layout = logits[None].is_contiguous(memory_format=torch.channels_last) and not logits.is_contiguous()
                plan = _Plan(logits, (height, width), arithmetic(logits.device.type, logits.dtype, layout))
            if band_rows is None:
                band_rows = rows_per_band(num_labels, logits.shape[1], height, width, logits.dtype, budget, kernel)
        label_map = torch.empty((height, width), dtype=torch.long, device=logits.device)
        sums = torch.zeros(num_labels, dtype=torch.float64, device=logits.device) if scores else None
        buffer = None if plan is None else logits.new_empty(num_labels, band_rows, width)  # reused by every band
        for start in range(0, height, band_rows):
            stop = min(start + band_rows, height)
            if plan is None:
                band = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
            else:
                band = plan.band(logits, start, buffer[:, : stop - start])  # (K, b, W)
            # max's indices are argmax's (the first of equal maxima, NaN counting as the maximum); it also gives the
            # top value the scores need.
            top, labels = band.max(dim=0)  # (b, W)
            label_map[start:stop] = labels
            if sums is not None:
                chosen = _pixel_scores(band, top, scores)
                sums += torch.bincount(labels.flatten(), weights=chosen.flatten().double(), minlength=num_labels)
            del band
        if sums is None:
            return BandedResult(label_map, None, None)
        counts = torch.bincount(label_map.flatten(), minlength=num_labels)
        return BandedResult(label_map, sums / counts, counts)


__all__ = [
    "BUDGET_ENV",
    "DEFAULT_BUDGET_MB",
    "SCORE_KINDS",
    "Arithmetic",
    "BandedResult",
    "arithmetic",
    "resize_argmax",
    "resize_budget_bytes",
    "rows_per_band",
]
