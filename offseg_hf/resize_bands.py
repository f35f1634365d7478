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
row, so a budget below one row's need is exceeded by that row. When the whole (K, H, W) tensor fits the budget, it is
resized whole (the plain `F.interpolate` + argmax).

Exactness: a band cannot be handed to `F.interpolate`: it derives the sampling positions from the sizes it is given,
so a band's rows would sample elsewhere. The bands repeat the arithmetic of ATen's generic bilinear kernel instead.
Per output index d along a dimension of `size_in` -> `size_out`, in the logits' dtype: scale = size_in / size_out,
src = scale * (d + 0.5) - 0.5 clamped at 0, i0 = floor(src) (floored in float32, as ATen's floorf does; at most
size_in - 1), i1 = i0 + 1 (i0 at the last index), w1 = src - i0, w0 = 1 - w1; an unchanged size keeps i0 = i1 = d,
w0 = 1, w1 = 0. The width is resized first, then the height, each as t0 * w0 + t1 * w1 (the kernel nests the width
inside the height the same way). The kernel leaves the rounding of `a * b + c` and `a * b + c * d` to its compiler,
which on x86-64 builds fuses a product into a fused multiply-add; which fused or plain form a build uses is found
once per device type and dtype by comparing the candidate forms with `F.interpolate` on small probes (`arithmetic`).
With the matching form every resized value is bitwise `F.interpolate`'s, so the argmax (ties included) is identical.
ATen takes another kernel, vectorised over classes and rounding otherwise, for CPU outputs with height + width <= 128
(at most 4096 pixels: resized whole here), for channels-last logits with more than 3 classes and for 3 classes on one
thread (resized whole when that fits the budget). Left approximate (values equal to float rounding, label maps equal
except where classes tie to within rounding): those last two cases when they do not fit, and a build, device or dtype
where no candidate form matches (`arithmetic(...).exact` is False). Half-precision logits are resized in float32, as
the evaluation has always done: their argmax then no longer depends on ties from rounding to the half type.
"""

from __future__ import annotations

import functools
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
) -> int:
    """How many output rows a band holds so that its working tensors fit `budget_bytes` (at least 1, at most
    `output_height`).

    A band of b output rows reads r <= b * s + 3 input rows (s = input_height / output_height). Its peak holds the
    (K, b, W) band, the (K, r, W) width-resized input rows with the two (K, r, W) gathers they are formed from, and,
    where rows are gathered rather than broadcast in runs, two (K, b, W) gathers; the band's per-pixel class ids,
    maxima and scores take up to 32 bytes a pixel.
    """
    budget_bytes = resize_budget_bytes() if budget_bytes is None else budget_bytes
    itemsize = 8 if dtype == torch.float64 else 4  # half types are resized in float32
    plane_row = itemsize * num_labels * output_width  # one row of a (K, rows, W) tensor
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
def arithmetic(device_type: str, dtype: torch.dtype) -> Arithmetic:
    """The rounding form under which the bands reproduce `F.interpolate` bitwise on this build, device type and
    dtype (a property of the installed torch and the machine, so computed once per process)."""
    device = torch.device(device_type)
    for source in ("fused", "plain"):
        for combine in ("fused_first", "fused_second", "plain"):
            candidate = Arithmetic(source, combine, True)
            for index, (shape, size) in enumerate(_PROBES):
                logits = _probe_logits(shape, device, dtype, index)
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


def _takes_channels_last_kernel(logits: torch.Tensor, size: tuple[int, int]) -> str | None:
    """Why ATen would resize these logits with its channels-last CPU kernel, whose rounding the bands do not follow:
    "small" (an output of at most 4096 pixels), "layout" (channels-last logits, or 3 classes on one thread), or None.
    """
    if logits.device.type != "cpu":
        return None
    if size[0] + size[1] <= _CHANNELS_LAST_KERNEL_MAX_SIDES:
        return "small"
    classes = logits.shape[0]
    if logits[None].is_contiguous(memory_format=torch.channels_last) and classes > 3:
        return "layout"
    return "layout" if classes == 3 and torch.get_num_threads() == 1 else None


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
        fits = logits.element_size() * num_labels * height * width * (2 if scores else 1) <= budget
        kernel = _takes_channels_last_kernel(logits, (height, width))
        # Whole where that is exact and cheap: outputs of ATen's channels-last kernel when they fit (small ones
        # always do), anything that fits unless bands are asked for.
        whole = kernel == "small" or (fits and (band_rows is None or kernel is not None))
        if whole:
            plan, band_rows = None, height
        else:
            plan = _Plan(logits, (height, width), arithmetic(logits.device.type, logits.dtype))
            if band_rows is None:
                band_rows = rows_per_band(num_labels, logits.shape[1], height, width, logits.dtype, budget)
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
