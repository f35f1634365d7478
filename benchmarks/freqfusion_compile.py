"""OffSeg-T's decoder on the CPU: where an eager forward spends its time, and what `torch.compile` (inductor) makes of
FreqFusion's CARAFE, of its resampler, of each FreqFusion block and of the whole model (issue 25).

    python benchmarks/freqfusion_compile.py --threads 1 --repeats 7
    python benchmarks/freqfusion_compile.py --sections profile          # only table 1 (seconds)

Tables (512x512 by default, batch 1, fp32, 150 classes, random weights, eval mode):

1. Profile of one eager forward: time per part (encoder stem and stages, each FreqFusion with its four CARAFE calls
   and its resampler, the other decoder modules, offset learning), from two clocks: this process's CPU time read
   around each part on unprofiled passes, and `torch.profiler`'s CPU ranges (`record_function`) on profiled passes;
   then the aten ops by self time, for the whole model and for the part of it inside the FreqFusion blocks.
2. CARAFE alone, for each call OffSeg-T's decoder makes (features and masks recorded on one forward pass, memory
   layouts included): the fast form's tap loop eager (`carafe_by_taps`, what the model runs) against the same
   function compiled, compiled with the features made channels-last first, and `carafe_by_rows` (below) compiled.
   Every output is compared with the reference `carafe` (unfold and sum), and the code inductor generated is counted.
3. Each FreqFusion's `SimilarityGuidedResampler.forward` alone, eager against compiled, on its recorded inputs.
4. The whole model: OffSeg-T eager, with parts of it compiled per instance (CARAFE as `carafe_by_rows` with static
   or dynamic shapes, the resamplers, each FreqFusion block, each block with its low-resolution input made
   channels-last), and compiled whole, each as a ratio to `transformers`' SegFormer-B0 eager timed in the same
   rounds.

Timing: every comparison is timed in rounds in which the contenders take turns, in the opposite order every other
round, on `--threads` torch threads with this process's CPU time (`time.process_time`), so that on a machine shared
with other work the time spent waiting for a core is not counted; a ratio is the median over rounds of the two
times of one round. Compile times are wall times of the first call. Inductor compiles in this process
(`compile_threads = 1`) with its caches off, so each compilation generates its code anew and is counted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from unittest import mock

import torch
import torch._inductor.config as inductor_config
from common import hf_segformer_b0, logits_of, machine_line, print_table
from torch import nn
from torch._inductor.graph import GraphLowering

from offseg_hf.models.fast_freqfusion import carafe_by_rows, carafe_by_taps
from offseg_hf.models.freqfusion import carafe as reference_carafe
from offseg_hf.presets import model_for_variant

SECTIONS = ("profile", "carafe", "resampler", "model")


# ---------------------------------------------------------------------------------------------------------------------
# Layout.


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------------------------------
# Timing.


def time_rounds(contenders: dict[str, Callable[[], object]], repeats: int, inner: int = 1) -> dict[str, list[float]]:
    """ms of CPU time (this process) per call of each contender, one sample per round of `inner` calls; the contenders
    take turns within a round, in reverse order every other round. Run under `torch.inference_mode()`."""
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            start = time.process_time()
            for _ in range(inner):
                contenders[name]()
            times[name].append((time.process_time() - start) * 1e3 / inner)
    return times


def ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of name's time over the baseline's in the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline], strict=True))


def calls_per_sample(call: Callable[[], object], target_ms: float = 40.0) -> int:
    """How many calls make a sample of about `target_ms` of CPU time: short calls are timed in batches so that the
    clock's granularity and the per-sample overhead stay small."""
    start = time.process_time()
    call()
    elapsed_ms = (time.process_time() - start) * 1e3
    return max(1, min(200, round(target_ms / max(elapsed_ms, 1e-3))))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------------
# Inductor's generated code.


@contextlib.contextmanager
def generated_code() -> Iterator[list[str]]:
    """The Python wrapper modules (with their C++ kernels inline) that inductor generates within the block: the hook
    `torch._inductor.utils.run_and_get_code` uses, without its `torch._dynamo.reset()`, which would drop the other
    compiled functions of the run."""
    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        yield codes


def code_summary(codes: list[str]) -> str:
    """ "kernels/loop nests/library calls": C++ kernels, their outermost loops (one per fused group of loops that
    inductor could not merge further), and the calls of the wrapper into ATen or oneDNN (convolutions, fallbacks)."""
    kernels = nests = library = 0
    for code in codes:
        kernels += len(re.findall(r"async_compile\.cpp(?:_pybinding)?\(", code))
        nests += len(re.findall(r"for\s*\(\s*int64_t x0\s*=", code))
        body = code.split("def call(", 1)[-1]
        library += len(re.findall(r"\b(?:extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?)\(", body))
    return f"{kernels}/{nests}/{library}"


def first_call(compiled: Callable, *args) -> tuple[str, float, object]:
    """The first call of a compiled function on args (which compiles it for them): (code summary, wall seconds,
    result)."""
    with generated_code() as codes:
        start = time.perf_counter()
        result = compiled(*args)
        seconds = time.perf_counter() - start
    return code_summary(codes), seconds, result


# ---------------------------------------------------------------------------------------------------------------------
# OffSeg-T and what its decoder is called with.


def build_offseg_t(num_labels: int) -> nn.Module:
    torch.manual_seed(0)
    return model_for_variant("offseg-t", num_labels=num_labels).eval()


def fusions_of(model: nn.Module) -> list[nn.Module]:
    return list(model.offseg.decode_head.fusions)


def layout(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "NCHW"
    return "NHWC" if x.is_contiguous(memory_format=torch.channels_last) else "strided"


def describe(x: torch.Tensor) -> str:
    return "x".join(str(n) for n in x.shape[1:]) + f" {layout(x)}"


@contextlib.contextmanager
def wrapped(owner: object, attribute: str, wrapper: Callable[[Callable], Callable]) -> Iterator[None]:
    """`owner.attribute` replaced, on this instance only, by `wrapper(original)`; the instance attribute is removed on
    exit, so the class's method is seen again."""
    setattr(owner, attribute, wrapper(getattr(owner, attribute)))
    try:
        yield
    finally:
        delattr(owner, attribute)


def record_decoder_calls(model: nn.Module, pixel_values: torch.Tensor) -> tuple[list[dict], list[dict]]:
    """One forward pass with every CARAFE call and every resampler call recorded: copies of their inputs (same
    strides) and, for CARAFE, k and s."""
    carafe_calls, resampler_calls = [], []

    def carafe_recorder(index):
        def wrapper(original):
            def record(features, masks, kernel_size, scale_factor):
                carafe_calls.append(
                    {
                        "fusion": index,
                        "features": features.clone(),
                        "masks": masks.clone(),
                        "k": kernel_size,
                        "s": scale_factor,
                    }
                )
                return original(features, masks, kernel_size, scale_factor)

            return record

        return wrapper

    def resampler_recorder(index):
        def wrapper(original):
            def record(*args, **kwargs):
                if kwargs:
                    raise ValueError(f"The resampler was called with keyword arguments {sorted(kwargs)}.")
                resampler_calls.append({"fusion": index, "args": tuple(a.clone() for a in args)})
                return original(*args)

            return record

        return wrapper

    with contextlib.ExitStack() as stack, torch.inference_mode():
        for index, fusion in enumerate(fusions_of(model)):
            stack.enter_context(wrapped(fusion, "_carafe", carafe_recorder(index)))
            stack.enter_context(wrapped(fusion.resampler, "forward", resampler_recorder(index)))
        model(pixel_values)
    return carafe_calls, resampler_calls


# ---------------------------------------------------------------------------------------------------------------------
# 1. The profile.


def carafe_label(index: int) -> Callable:
    def label(features, masks, kernel_size, scale_factor):
        return f"FreqFusion {index}: CARAFE k={kernel_size} s={scale_factor} C={features.shape[1]}"

    return label


def labelled_parts(model: nn.Module) -> list[tuple[object, str, str | Callable]]:
    """(owner, attribute, label or label function) for every timed part; nested parts sit inside their parents."""
    offseg = model.offseg
    encoder, decoder = offseg.encoder, offseg.decode_head
    parts = [(model, "forward", "forward (total)"), (offseg.encoder, "forward", "encoder")]
    parts.append((encoder.stem, "forward", "encoder: stem"))
    parts += [(stage, "forward", f"encoder: stage {i}") for i, stage in enumerate(encoder.stages)]
    parts.append((decoder, "forward", "decoder"))
    parts += [(projection, "forward", "decoder: stage projections") for projection in decoder.stage_projections]
    for index, fusion in enumerate(decoder.fusions):
        parts.append((fusion, "forward", f"FreqFusion {index}"))
        parts.append((fusion, "_carafe", carafe_label(index)))
        parts.append((fusion.resampler, "forward", f"FreqFusion {index}: resampler"))
    parts.append((decoder.align, "forward", "decoder: align (1x1 conv, GN, ReLU)"))
    parts.append((model.classifier, "forward", "offset learning classifier"))
    return parts


@contextlib.contextmanager
def timed_parts(model: nn.Module, totals: dict[str, float], calls: dict[str, int]) -> Iterator[None]:
    """Each part of `labelled_parts` runs inside a `record_function` range named by its label and adds its CPU time
    (ms, this process) to totals[label] and 1 to calls[label]."""

    def timer(label):
        def wrapper(original):
            def timed(*args, **kwargs):
                name = label(*args, **kwargs) if callable(label) else label
                with torch.profiler.record_function(name):
                    start = time.process_time()
                    try:
                        return original(*args, **kwargs)
                    finally:
                        totals[name] += (time.process_time() - start) * 1e3
                        calls[name] += 1

            return timed

        return wrapper

    with contextlib.ExitStack() as stack:
        for owner, attribute, label in labelled_parts(model):
            stack.enter_context(wrapped(owner, attribute, timer(label)))
        yield


def profile_section(args, pixel_values: torch.Tensor) -> None:
    model = build_offseg_t(args.num_labels)
    passes: list[dict[str, float]] = []
    calls: dict[str, int] = defaultdict(int)
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(pixel_values)
        for _ in range(args.repeats):
            totals: dict[str, float] = defaultdict(float)
            with timed_parts(model, totals, calls):
                model(pixel_values)
            passes.append(totals)
        profiled_calls: dict[str, int] = defaultdict(int)
        with timed_parts(model, defaultdict(float), profiled_calls):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                for _ in range(args.profile_passes):
                    model(pixel_values)
    events = profiler.events()
    labels = {label for totals in passes for label in totals}
    # Inclusive CPU time of every labelled range (each is a `record_function` event), per pass.
    ranged: dict[str, float] = defaultdict(float)
    for event in events:
        if event.name in labels:
            ranged[event.name] += event.cpu_time_total / 1e3 / args.profile_passes

    process = {label: statistics.median(totals.get(label, 0.0) for totals in passes) for label in labels}
    total_process, total_ranged = process["forward (total)"], ranged["forward (total)"]

    # Derived rows are computed pass by pass before the median (a difference of medians of different passes can even
    # come out negative); the profiler's figures are means, which add up as they are.
    def per_pass(name: str, value: Callable[[dict[str, float]], float]) -> None:
        for totals in passes:
            totals[name] = value(totals)
        process[name] = statistics.median(totals[name] for totals in passes)

    def derived(name: str, whole: str, parts: list[str]) -> None:
        per_pass(name, lambda totals: totals.get(whole, 0.0) - sum(totals.get(p, 0.0) for p in parts))
        ranged[name] = ranged[whole] - sum(ranged[p] for p in parts)
        calls[name] = 0

    # (label, depth in the table)
    order = [("forward (total)", 0), ("encoder", 0), ("encoder: stem", 1)]
    order += [(f"encoder: stage {i}", 1) for i in range(len(model.offseg.encoder.stages))]
    order += [("decoder", 0), ("decoder: stage projections", 1)]
    fusion_labels, carafe_labels, resampler_labels = [], [], []
    for index in range(len(fusions_of(model))):
        fusion, resampler = f"FreqFusion {index}", f"FreqFusion {index}: resampler"
        own_carafes = [label for label in passes[0] if label.startswith(f"{fusion}: CARAFE")]  # in call order
        rest = f"{fusion}: the rest (compressors, kernel encoders, softmaxes, pad)"
        derived(rest, fusion, [*own_carafes, resampler])
        order += [(fusion, 1), *((label, 2) for label in own_carafes), (resampler, 2), (rest, 2)]
        fusion_labels.append(fusion)
        carafe_labels += own_carafes
        resampler_labels.append(resampler)
    align = "decoder: align (1x1 conv, GN, ReLU)"
    interleaving = "decoder: the rest (channel interleaving)"
    derived(interleaving, "decoder", ["decoder: stage projections", *fusion_labels, align])
    order += [(align, 1), (interleaving, 1), ("offset learning classifier", 0)]
    derived("outside these parts", "forward (total)", ["encoder", "decoder", "offset learning classifier"])
    order.append(("outside these parts", 0))
    for name, group in (
        ("all FreqFusion blocks", fusion_labels),
        ("all CARAFE calls", carafe_labels),
        ("all resamplers", resampler_labels),
    ):
        per_pass(name, lambda totals, group=group: sum(totals.get(p, 0.0) for p in group))
        ranged[name] = sum(ranged[p] for p in group)
        calls[name] = 0
        order.append((name, 0))

    print(
        f"\n### 1. OffSeg-T eager forward at {args.size}x{args.size}: time per part\n\n"
        f"CPU time of this process per part (median of {args.repeats} unprofiled passes) and `torch.profiler` CPU "
        f"range time (mean of {args.profile_passes} profiled passes: wall time inside the ranges, so it also counts "
        "time spent waiting for a core); parts marked with dots lie inside the part above them; rows without a call "
        "count are differences or sums of the others, taken pass by pass.\n"
    )
    rows = []
    for name, depth in order:
        per_pass = calls[name] / args.repeats
        rows.append(
            [
                "· " * depth + name,
                f"{per_pass:g}" if per_pass else "-",
                f"{process[name]:.1f}",
                f"{100 * process[name] / total_process:.1f}%",
                f"{ranged[name]:.1f}",
                f"{100 * ranged[name] / total_ranged:.1f}%",
            ]
        )
    print_table(["part", "calls/pass", "CPU ms", "share", "profiler ms", "profiler share"], rows)

    # Self time of each aten op, for the whole pass and inside the FreqFusion ranges.
    whole: dict[str, float] = defaultdict(float)
    inside: dict[str, float] = defaultdict(float)
    op_calls: dict[str, int] = defaultdict(int)
    fusion_names = set(fusion_labels)
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        ms = event.self_cpu_time_total / 1e3 / args.profile_passes
        whole[event.name] += ms
        op_calls[event.name] += 1
        parent = event.cpu_parent
        while parent is not None and parent.name not in fusion_names:
            parent = parent.cpu_parent
        if parent is not None:
            inside[event.name] += ms
    total_ops, total_inside = sum(whole.values()), sum(inside.values())
    print(
        f"\naten ops by self CPU time (profiler, per pass; the top {args.top_ops} of the whole pass, then the top "
        f"{args.top_ops} inside the FreqFusion blocks). All aten ops: {total_ops:.1f} ms a pass, of which "
        f"{total_inside:.1f} ms ({100 * total_inside / total_ops:.1f}%) inside FreqFusion.\n"
    )
    rows = []
    for name in sorted(whole, key=whole.get, reverse=True)[: args.top_ops]:
        rows.append(
            [
                name,
                f"{op_calls[name] / args.profile_passes:g}",
                f"{whole[name]:.1f}",
                f"{100 * whole[name] / total_ops:.1f}%",
                f"{inside[name]:.1f}",
            ]
        )
    print_table(["aten op (whole pass)", "calls/pass", "self ms", "share", "of which in FreqFusion ms"], rows)
    print()
    rows = [
        [name, f"{inside[name]:.1f}", f"{100 * inside[name] / total_inside:.1f}%"]
        for name in sorted(inside, key=inside.get, reverse=True)[: args.top_ops]
    ]
    print_table(["aten op (inside FreqFusion)", "self ms", "share of FreqFusion's"], rows)


# ---------------------------------------------------------------------------------------------------------------------
# 2. CARAFE alone.


def carafe_call_rows(args, call: dict, number: int) -> tuple[list[str], list[str]]:
    """Table 2's two rows for one recorded CARAFE call: timings, then differences and generated code."""
    features, masks, k, s = call["features"], call["masks"], call["k"], call["s"]
    features_nhwc = channels_last(features)
    taps = torch.compile(carafe_by_taps, dynamic=False)
    rows = torch.compile(carafe_by_rows, dynamic=False)
    with torch.inference_mode():
        reference = reference_carafe(features, masks, k, s)
        eager_diff = max_abs_diff(carafe_by_taps(features, masks, k, s), reference)
        taps_code, taps_s, taps_out = first_call(taps, features, masks, k, s)
        if features_nhwc is features:  # already channels-last: the same call, the same compiled code
            taps_nhwc_code, taps_nhwc_s, taps_nhwc_out = "as taps", 0.0, taps_out
        else:
            taps_nhwc_code, taps_nhwc_s, taps_nhwc_out = first_call(taps, features_nhwc, masks, k, s)
        rows_code, rows_s, rows_out = first_call(rows, features_nhwc, masks, k, s)
        # The channels-last copies are made inside the timed calls: a caller would have to make them.
        contenders = {
            "eager": lambda: carafe_by_taps(features, masks, k, s),
            "taps": lambda: taps(features, masks, k, s),
            "taps nhwc": lambda: taps(channels_last(features), masks, k, s),
            "rows": lambda: rows(channels_last(features), masks, k, s),
        }
        for contender in contenders.values():  # warm-up
            contender()
        times = time_rounds(contenders, args.repeats, calls_per_sample(contenders["eager"]))
    median = {name: statistics.median(values) for name, values in times.items()}
    name = f"{call['fusion']}.{number % 4} k{k} s{s}"
    timing = [name, describe(features), f"{median['eager']:.2f}"]
    for contender in ("taps", "taps nhwc", "rows"):
        timing += [f"{median[contender]:.2f}", f"{ratio(times, contender, 'eager'):.2f}"]
    code = [name, f"{eager_diff:.1e}"]
    code += [f"{max_abs_diff(out, reference):.1e}" for out in (taps_out, taps_nhwc_out, rows_out)]
    code += [taps_code, taps_nhwc_code, rows_code, f"{taps_s:.1f} / {taps_nhwc_s:.1f} / {rows_s:.1f}"]
    print(f"# CARAFE call {name} done", flush=True)
    return timing, code


def carafe_section(args, carafe_calls: list[dict]) -> None:
    timing_rows, code_rows = [], []
    for number, call in enumerate(carafe_calls):
        timing, code = carafe_call_rows(args, call, number)
        timing_rows.append(timing)
        code_rows.append(code)
    print(
        "\n### 2. CARAFE alone, each call of OffSeg-T's decoder\n\n"
        "Call: FreqFusion.call k s (calls 0 and 3 of a block are its high-pass CARAFEs at the high resolution, "
        "1 and 2 its low-pass upsamplings). Features: channels x h x w and memory layout as the decoder passes them. "
        "eager: the fast form's tap loop `carafe_by_taps`, as the model runs it; taps: that function compiled; "
        "taps NHWC: compiled, features made channels-last first (the copy counted); rows: `carafe_by_rows` compiled, "
        "features made channels-last first (counted). ms: median CPU time per call; x: median of the per-round "
        "ratios to eager.\n"
    )
    columns = ["call", "features", "eager ms", "taps ms", "x", "taps NHWC ms", "x", "rows ms", "x"]
    print_table(columns, timing_rows)
    print(
        "\nMax |output - reference `carafe`| (float32) and the code inductor generated: C++ kernels / outermost "
        "loops / calls into ATen or oneDNN, and the first call's wall time (compilation) for taps / taps NHWC / "
        "rows.\n"
    )
    columns = ["call", "eager diff", "taps diff", "taps NHWC diff", "rows diff", "taps code", "taps NHWC code"]
    print_table(columns + ["rows code", "compile s"], code_rows)


# ---------------------------------------------------------------------------------------------------------------------
# 3. The resampler alone.


def resampler_row(args, resampler: nn.Module, call: dict) -> list[str]:
    """Table 3's row for one recorded resampler call."""
    hr_guide, lr_guide, upsampled = call["args"]
    upsampled_nhwc = channels_last(upsampled)
    compiled = torch.compile(resampler.forward, dynamic=False)
    with torch.inference_mode():
        expected = resampler(hr_guide, lr_guide, upsampled)
        code, seconds, out = first_call(compiled, hr_guide, lr_guide, upsampled)
        nhwc_code, nhwc_seconds, nhwc_out = first_call(compiled, hr_guide, lr_guide, upsampled_nhwc)
        contenders = {
            "eager": lambda: resampler(hr_guide, lr_guide, upsampled),
            "compiled": lambda: compiled(hr_guide, lr_guide, upsampled),
            "compiled nhwc": lambda: compiled(hr_guide, lr_guide, upsampled_nhwc),
        }
        for contender in contenders.values():  # warm-up
            contender()
        times = time_rounds(contenders, args.repeats, calls_per_sample(contenders["eager"]))
    median = {name: statistics.median(values) for name, values in times.items()}
    row = [f"FreqFusion {call['fusion']}", describe(upsampled), f"{median['eager']:.2f}"]
    for contender in ("compiled", "compiled nhwc"):
        row += [f"{median[contender]:.2f}", f"{ratio(times, contender, 'eager'):.2f}"]
    row += [f"{max_abs_diff(out, expected):.1e}", f"{max_abs_diff(nhwc_out, expected):.1e}"]
    print(f"# resampler of FreqFusion {call['fusion']} done", flush=True)
    return row + [code, nhwc_code, f"{seconds:.1f} / {nhwc_seconds:.1f}"]


def resampler_section(args, model: nn.Module, resampler_calls: list[dict]) -> None:
    rows = [resampler_row(args, fusions_of(model)[call["fusion"]].resampler, call) for call in resampler_calls]
    print(
        "\n### 3. The resampler alone (`SimilarityGuidedResampler.forward`), each FreqFusion\n\n"
        "upsampled: the map it resamples (channels x size, layout as the decoder passes it). compiled: the bound "
        "method compiled; NHWC: compiled and called with that map channels-last (as `carafe_by_rows` would leave "
        "it; the conversion is not timed). diff: max |compiled - eager|. Code as in table 2.\n"
    )
    columns = ["resampler", "upsampled", "eager ms", "compiled ms", "x", "NHWC ms", "x", "diff", "NHWC diff"]
    print_table(columns + ["code", "NHWC code", "compile s"], rows)


# ---------------------------------------------------------------------------------------------------------------------
# 4. The whole model.


def compiled_rows_carafe(dynamic: bool = False) -> Callable:
    """A `FreqFusion._carafe` replacement: `carafe_by_rows` compiled, features made channels-last first. With
    `dynamic`, sizes are symbolic: one graph per (k, s) serves every call and input size."""
    compiled = torch.compile(carafe_by_rows, dynamic=dynamic)

    def run(features, masks, kernel_size, scale_factor):
        return compiled(channels_last(features), masks, kernel_size, scale_factor)

    return run


def with_channels_last_input(forward: Callable) -> Callable:
    def run(hr_feat, lr_feat):
        return forward(hr_feat, channels_last(lr_feat))

    return run


def model_variants(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """OffSeg-T with parts compiled, each a copy of `model` (same weights): name -> (what it is, model)."""
    variants = {"offseg-t eager": ("as built", model)}

    def variant(name: str, what: str, change: Callable[[nn.Module], nn.Module]) -> None:
        variants[name] = (what, change(copy.deepcopy(model)))

    def each_fusion(edit: Callable[[nn.Module], None]) -> Callable[[nn.Module], nn.Module]:
        def change(copied: nn.Module) -> nn.Module:
            for fusion in fusions_of(copied):
                edit(fusion)
            return copied

        return change

    def rows_carafe(fusion):
        fusion._carafe = compiled_rows_carafe()

    # One compiled function for the three blocks, as a package-level form would have it.
    dynamic_rows = compiled_rows_carafe(dynamic=True)

    def rows_carafe_dynamic(fusion):
        fusion._carafe = dynamic_rows

    def resampler(fusion):
        fusion.resampler.forward = torch.compile(fusion.resampler.forward, dynamic=False)

    def fusion_compiled(fusion):
        fusion.forward = torch.compile(fusion.forward, dynamic=False)

    def fusion_nhwc(fusion):
        fusion.forward = with_channels_last_input(torch.compile(fusion.forward, dynamic=False))

    variant(
        "CARAFE rows compiled", "each `_carafe`: `carafe_by_rows` compiled, features NHWC", each_fusion(rows_carafe)
    )
    variant(
        "CARAFE rows compiled, dynamic",
        "the same, one `torch.compile(carafe_by_rows, dynamic=True)` for all calls",
        each_fusion(rows_carafe_dynamic),
    )
    variant("resamplers compiled", "each `resampler.forward` compiled", each_fusion(resampler))
    variant("FreqFusion compiled", "each `FreqFusion.forward` compiled", each_fusion(fusion_compiled))
    variant(
        "FreqFusion compiled, lr NHWC",
        "each `FreqFusion.forward` compiled, its low-res input made channels-last first",
        each_fusion(fusion_nhwc),
    )
    variant("whole model compiled", "`torch.compile(model)`", lambda copied: torch.compile(copied, dynamic=False))
    return variants


def model_section(args, pixel_values: torch.Tensor) -> None:
    # Compiled code of the sections above would otherwise serve these models (same functions, same shapes), and
    # their first calls would not show what compiling costs.
    torch._dynamo.reset()
    model = build_offseg_t(args.num_labels)
    torch.manual_seed(0)
    baseline = hf_segformer_b0(args.num_labels).eval()
    variants = model_variants(model)
    compile_seconds, codes_by_name, diffs = {}, {}, {}
    with torch.inference_mode():
        expected = logits_of(model(pixel_values))
        for name, (_, variant) in variants.items():
            with generated_code() as codes:
                start = time.perf_counter()
                logits = logits_of(variant(pixel_values))
                compile_seconds[name] = time.perf_counter() - start
            codes_by_name[name] = code_summary(codes) if codes else "-"
            diffs[name] = max_abs_diff(logits, expected)
            print(f"# {name}: first call {compile_seconds[name]:.1f} s", flush=True)
        contenders = {"hf-segformer-b0 eager": lambda: baseline(pixel_values)}
        contenders |= {name: (lambda variant=variant: variant(pixel_values)) for name, (_, variant) in variants.items()}
        for _ in range(args.warmup):
            for contender in contenders.values():
                contender()
        times = time_rounds(contenders, args.repeats)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"\n### 4. The whole model at {args.size}x{args.size}: OffSeg-T eager and compiled, against SegFormer-B0 "
        "eager\n\n"
        f"Median CPU time per forward over {args.repeats} rounds (all models take turns each round); x HF B0 and x "
        "eager: medians of the per-round ratios. Compiled parts are compiled per model instance (`dynamic=False` "
        "unless the row says otherwise). "
        "diff: max |logits - eager OffSeg-T's|. Code: kernels / outermost loops / ATen-oneDNN calls over all "
        "graphs, first call: wall time of the first forward (compilation).\n"
    )
    rows = [
        [
            "hf-segformer-b0 eager",
            "baseline",
            f"{median['hf-segformer-b0 eager']:.1f}",
            "1.000",
            "-",
            "-",
            "-",
            "-",
        ]
    ]
    for name, (what, _) in variants.items():
        rows.append(
            [
                name,
                what,
                f"{median[name]:.1f}",
                f"{ratio(times, name, 'hf-segformer-b0 eager'):.3f}",
                f"{ratio(times, name, 'offseg-t eager'):.3f}",
                f"{diffs[name]:.1e}",
                codes_by_name[name],
                f"{compile_seconds[name]:.1f}",
            ]
        )
    print_table(["model", "what", "ms", "x HF B0", "x eager", "diff", "code", "first call s"], rows)


# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per comparison")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes before the model tables")
    parser.add_argument("--size", type=int, default=512, help="input height and width")
    parser.add_argument("--num_labels", type=int, default=150)
    parser.add_argument("--profile_passes", type=int, default=3, help="passes under torch.profiler")
    parser.add_argument("--top_ops", type=int, default=15, help="rows of the aten op tables")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # Compile in this process, and generate every graph's code anew, so that each compilation is seen and timed.
    inductor_config.compile_threads = 1
    inductor_config.force_disable_caches = True
    # Twelve CARAFE shapes and three FreqFusion blocks share code objects: one cache entry each, no dynamic shapes.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024

    print(machine_line(torch.device("cpu")))
    print(
        f"\nOffSeg-T, {args.size}x{args.size}, batch 1, fp32, {args.num_labels} classes, random weights; "
        f"{args.threads} torch thread(s), CPU time of this process; {args.repeats} rounds per comparison."
    )
    torch.manual_seed(0)
    pixel_values = torch.randn(1, 3, args.size, args.size)
    if "profile" in args.sections:
        profile_section(args, pixel_values)
    if "carafe" in args.sections or "resampler" in args.sections:
        model = build_offseg_t(args.num_labels)
        carafe_calls, resampler_calls = record_decoder_calls(model, pixel_values)
        if "carafe" in args.sections:
            carafe_section(args, carafe_calls)
        if "resampler" in args.sections:
            resampler_section(args, model, resampler_calls)
    if "model" in args.sections:
        model_section(args, pixel_values)


if __name__ == "__main__":
    main()
