"""CUDA checks in one run: the hand-written autograd Functions and the banded loss against their plain forms, a full
training step, and inference speed, each next to transformers' SegFormer-B0.

    python benchmarks/cuda_check.py --device cuda            # the GPU run (about 5 minutes on an H200)
    python benchmarks/cuda_check.py --device cpu --quick     # smoke run: small inputs, few repeats, 2 models

1. Correctness. CARAFE (`_CarafeFunction`), the neighbour cosine similarities (`_NeighbourDotsFunction`), the banded
   upsampled cross entropy (`_BandedUpsampledCrossEntropy`) and a whole FreqFusion block (all of its CARAFEs and
   similarities, with parameter gradients) on odd sizes, batch > 1, channels-last inputs and ignored label pixels.
   Each runs its hand-written form (the one training uses) and its plain form (the tap loops recorded by autograd;
   `F.interpolate` + `F.cross_entropy`), on the same inputs drawn in float64 on the CPU: forward values and the
   gradients of a random weighting of the output, in float64 and float32 on the device, the device against the CPU
   (same form, same inputs), and both forms under bf16 autocast with the dtypes the model hands them there.
   Differences are relative to the largest |value| of the reference; TF32 is off for this part.
2. Training step (`train_step.py`'s loop, in this process): zero_grad, forward with labels, backward, AdamW, batch 8,
   512x512, 150 classes, random weights, in fp32 and under bf16 autocast; median step time after warm-up and the
   peak of allocated memory above the model and the batches. A first step on one batch (the same weights in both
   precisions) gives the loss in fp32 and bf16 and whether every gradient is finite.
3. Inference: latency at batch 1 and throughput at batch 16 (512x512), eager fp32 and bf16 autocast (`speed.py`'s
   groups: every model timed in the same rounds as the baseline), then `torch.compile` (inductor, static shapes) of
   the most important models, each in a child process killed after `--compile_cap_s` seconds.

A wall-clock budget (`--budget_s`) skips what would start after it, saying so, so the run ends in its time slot.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import multiprocessing as mp
import platform
import queue
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import timm
import torch
import transformers
from common import FAMILY_PRESETS, HF_SEGFORMER_B0, measure, median, print_table, synchronize
from speed import build, throughput, timed_group
from torch.nn import functional as F
from train_step import _worker, random_batches

from offseg_hf.models import fast_freqfusion, fast_losses
from offseg_hf.models.fast_freqfusion import carafe
from offseg_hf.models.freqfusion import FreqFusion, neighbour_cosine_similarity
from offseg_hf.models.losses import upsampled_cross_entropy

START = time.perf_counter()
TRAIN_MODELS = ["offseg-t", "segformer-b0-offset"]
SPEED_MODELS = list(FAMILY_PRESETS)
COMPILE_MODELS = ["offseg-t", "segformer-b0-offset", "segnext-t-offset"]
# Tolerances relative to the largest |value| of the reference: float64 (exact up to summation order), float32
# (rounding), bf16 autocast (both forms round to bf16 in different places).
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bf16 autocast": 5e-2}


def elapsed() -> float:
    return time.perf_counter() - START


def report_failure(what: str) -> None:
    """The end of the current exception's traceback, so a one-shot run on a lent machine says where it broke."""
    lines = traceback.format_exc().splitlines()
    print(f"# {what}: FAILED\n" + "\n".join(f"#   {line}" for line in lines[-12:]), flush=True)


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}" if reference > 0 else "-"


def over_budget(args, reserve: float = 0.0) -> bool:
    return elapsed() + reserve > args.budget_s


# ---------------------------------------------------------------------------------------------------------------------
# 1. Correctness of the hand-written autograd Functions and the banded loss


@contextlib.contextmanager
def plain_forms():
    """Within the block CARAFE and the neighbour similarities run their plain tap loops even with gradients (autograd
    records them): the reference the hand-written backwards replace."""
    with mock.patch.object(fast_freqfusion, "hand_written_backward", lambda *inputs: False):
        yield


@contextlib.contextmanager
def no_tf32():
    """float32 convolutions and matrix products in full float32 (cuDNN's default is TF32)."""
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def plain_upsampled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(upsampled, labels, ignore_index=255)


@dataclass
class Case:
    """One op on fixed inputs. `make(generator)` draws them on the CPU in float64 (integer labels stay integer), with
    the module the op needs, if any; `autocast_dtypes` are the dtypes the model hands the floating inputs under bf16
    autocast; `node` names the hand-written autograd node the forward must record (None: not checked)."""

    name: str
    make: Callable[[torch.Generator], tuple[list[torch.Tensor], torch.nn.Module | None]]
    forward: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    autocast_dtypes: list[torch.dtype]
    node: str | None
    float32_tolerance: float = TOLERANCE["float32"]


def carafe_case(batch, channels, height, width, kernel_size, scale, channels_last) -> Case:
    def make(generator):
        features = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64)
        if channels_last:
            features = features.contiguous(memory_format=torch.channels_last)
        logits = torch.randn(batch, kernel_size**2, scale * height, scale * width, generator=generator)
        return [features, logits.double().softmax(dim=1)], None

    layout = ", channels-last" if channels_last else ""
    return Case(
        f"CARAFE k{kernel_size} x{scale} {batch}x{channels}x{height}x{width}{layout}",
        make,
        lambda features, masks, _: carafe(features, masks, kernel_size, scale),
        lambda features, masks, _: carafe(features, masks, kernel_size, scale),  # run within plain_forms()
        [torch.bfloat16, torch.float32],  # a convolution's output; a softmax's (float32 under autocast)
        "CarafeFunction",
    )


def similarity_case(batch, channels, height, width, channels_last) -> Case:
    def make(generator):
        x = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64)
        return [x.contiguous(memory_format=torch.channels_last) if channels_last else x], None

    layout = ", channels-last" if channels_last else ""
    return Case(
        f"neighbour cosine 3x3 d2 {batch}x{channels}x{height}x{width}{layout}",
        make,
        lambda x, _: neighbour_cosine_similarity(x, form="fast"),
        lambda x, _: neighbour_cosine_similarity(x, form="fast"),  # run within plain_forms()
        [torch.bfloat16],
        "NeighbourDots",
    )


def loss_case(batch, classes, logits_size, label_size, band_rows: int | None) -> Case:
    """`band_rows` label rows per band (None: the default bands)."""

    def make(generator):
        logits = torch.randn(batch, classes, *logits_size, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, classes, (batch, *label_size), generator=generator)
        labels[:, : label_size[0] // 5] = 255  # an ignored band of rows
        labels[-1, -1, ::3] = 255
        return [logits, labels], None

    def forward(logits, labels, _):
        band = batch * classes * label_size[1] * band_rows if band_rows else fast_losses.BAND_ELEMENTS
        with mock.patch.object(fast_losses, "BAND_ELEMENTS", band):
            return upsampled_cross_entropy(logits, labels)

    bands = f", {band_rows}-row bands" if band_rows else ""
    return Case(
        f"banded CE {batch}x{classes}x{logits_size[0]}x{logits_size[1]} -> {label_size[0]}x{label_size[1]}{bands}",
        make,
        forward,
        lambda logits, labels, _: plain_upsampled_cross_entropy(logits, labels),
        [torch.bfloat16],  # a per-pixel classifier's logits (offset learning's come out of a LayerNorm: float32)
        "BandedUpsampledCrossEntropy",
    )


def freqfusion_case(batch, hr_size, lr_size) -> Case:
    hr_channels, lr_channels, compressed = 16, 32, 16

    def make(generator):
        torch.manual_seed(0)
        module = FreqFusion(hr_channels, lr_channels, compressed).double()
        with torch.no_grad():  # away from the near-zero initialisation, so every branch moves the output
            for parameter in module.parameters():
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
        hr = torch.randn(batch, hr_channels, *hr_size, generator=generator, dtype=torch.float64)
        lr = torch.randn(batch, lr_channels, *lr_size, generator=generator, dtype=torch.float64)
        return [hr, lr], module

    def forward(hr, lr, module):
        return torch.cat([out.flatten() for out in module(hr, lr)])

    return Case(
        f"FreqFusion block {batch}x({hr_channels}x{hr_size[0]}x{hr_size[1]}, {lr_channels}x{lr_size[0]}x{lr_size[1]})",
        make,
        forward,
        forward,  # run within plain_forms()
        [torch.float32, torch.float32],
        None,
        # A chain of convolutions, GroupNorms, softmaxes and grid_sample with 0.3-std weights: float32 alone is 9e-6
        # off float64 here on the CPU, so two backends' float32 results differ by about that much (cuDNN and oneDNN
        # sum in other orders). 1e-5 failed it on the H200 at 2.6e-5 while its float64 rows agreed to 3e-15.
        float32_tolerance=1e-4,
    )


def correctness_cases(quick: bool) -> list[Case]:
    cases = [
        carafe_case(2, 5, 7, 9, 3, 1, False),
        carafe_case(3, 4, 6, 5, 5, 2, False),
        carafe_case(2, 8, 9, 7, 5, 2, True),
        similarity_case(2, 6, 7, 9, False),
        similarity_case(3, 8, 6, 11, True),
        loss_case(2, 5, (10, 13), (31, 27), band_rows=3),
        loss_case(3, 7, (9, 11), (37, 45), band_rows=None),
        freqfusion_case(2, (15, 19), (8, 10)),
    ]
    if not quick:
        cases.insert(7, loss_case(2, 150, (32, 40), (128, 160), band_rows=None))
    return cases


@dataclass
class Result:
    output: torch.Tensor
    grads: list[torch.Tensor]
    dtypes_ok: bool  # every gradient has its input's dtype


def evaluate(case: Case, device: torch.device, dtype: torch.dtype, plain: bool, autocast: bool = False) -> Result:
    """The case's forward (its hand-written form, or its plain form with `plain`) and the gradients of a random
    weighting of its output with respect to every floating input and parameter."""
    generator = torch.Generator().manual_seed(0)
    tensors, module = case.make(generator)
    dtypes = iter(case.autocast_dtypes)
    inputs, leaves = [], []
    for tensor in tensors:
        if tensor.is_floating_point():
            tensor = tensor.to(device=device, dtype=next(dtypes) if autocast else dtype).requires_grad_()
            leaves.append(tensor)
        inputs.append(tensor.to(device))
    if module is not None:
        module = copy.deepcopy(module).to(device=device, dtype=torch.float32 if autocast else dtype)
        leaves += list(module.parameters())
    forms = plain_forms() if plain else contextlib.nullcontext()
    with forms, torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        output = (case.reference if plain else case.forward)(*inputs, module)
    if not plain and case.node and case.node not in type(output.grad_fn).__name__:
        raise AssertionError(f"{case.name}: recorded {type(output.grad_fn).__name__}, not {case.node}")
    weights = torch.randn(output.shape, generator=generator, dtype=torch.float64).to(device, output.dtype)
    grads = torch.autograd.grad((output * weights).sum(), leaves)
    dtypes_ok = all(grad.dtype == leaf.dtype for grad, leaf in zip(grads, leaves, strict=True))
    return Result(output.detach(), list(grads), dtypes_ok)


def relative_difference(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(max |other - reference|, that over max |reference|), in float64 on the CPU."""
    reference, other = reference.detach().cpu().double(), other.detach().cpu().double()
    difference = (other - reference).abs().max().item()
    return difference, difference / max(reference.abs().max().item(), 1e-300)


def compare(reference: Result, other: Result, tolerance: float) -> tuple[list[str], bool]:
    """The table cells of one comparison (forward and gradient differences, gradient dtypes) and whether it passes."""
    forward = relative_difference(reference.output, other.output)
    grads = [relative_difference(a, b) for a, b in zip(reference.grads, other.grads, strict=True)]
    grad_abs, grad_rel = max(g[0] for g in grads), max(g[1] for g in grads)
    dtypes_ok = reference.dtypes_ok and other.dtypes_ok
    cells = [f"{value:.1e}" for value in (*forward, grad_abs, grad_rel)] + ["ok" if dtypes_ok else "WRONG"]
    return cells, forward[1] <= tolerance and grad_rel <= tolerance and dtypes_ok


def comparisons(device: torch.device) -> list[tuple[str, str, torch.dtype, tuple, tuple]]:
    """(label, tolerance name, dtype, reference run, checked run); a run is (device, plain form, bf16 autocast)."""
    kind, plain, hand = device.type, (device, True, False), (device, False, False)
    rows = []
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        rows.append((f"{kind} {name}: hand-written vs plain", name, dtype, plain, hand))
        if kind != "cpu":
            rows.append((f"{kind} vs cpu {name}: hand-written", name, dtype, (torch.device("cpu"), False, False), hand))
    autocast = "bf16 autocast"
    rows.append(
        (
            f"{kind} {autocast}: hand-written vs plain",
            autocast,
            torch.float32,
            (device, True, True),
            (device, False, True),
        )
    )
    return rows


def correctness(args, device: torch.device) -> list[list[str]]:
    rows = []
    with no_tf32():
        for case in correctness_cases(args.quick):
            for label, tolerance_name, dtype, *runs in comparisons(device):
                tolerance = case.float32_tolerance if tolerance_name == "float32" else TOLERANCE[tolerance_name]
                try:
                    results = [
                        evaluate(case, run_device, dtype, plain, autocast) for run_device, plain, autocast in runs
                    ]
                    cells, passed = compare(*results, tolerance)
                    verdict = "PASS" if passed else "FAIL"
                except Exception as error:  # a crash is a result of the check, reported in its row
                    report_failure(f"{case.name}, {label}")
                    cells, verdict = ["-"] * 5, f"FAIL ({type(error).__name__}: {str(error)[:80]})"
                rows.append([case.name, label, *cells, f"{tolerance:.0e}", verdict])
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# 2. Training step


def first_step(name: str, precision: str, args, device: torch.device) -> tuple[float, bool, int]:
    """(loss, every gradient finite, parameters with a gradient) of one forward and backward of a freshly built model
    (the same weights in every precision: `build` seeds) on the same batch, with the same RNG seed for dropout."""
    model = build(name, args.num_labels).train().to(device)
    images, labels = random_batches(1, args.train_batch, args.size, args.size, args.num_labels, device)[0]
    torch.manual_seed(1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(pixel_values=images, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) and bool(torch.isfinite(loss))
    return loss.item(), finite, len(grads)


def training(args, device: torch.device) -> None:
    worker_args = {"height": args.size, "width": args.size, "batch_size": args.train_batch}
    worker_args |= {"num_labels": args.num_labels, "warmup": args.train_warmup, "repeats": args.train_repeats}
    worker_args |= {"threads": None, "device": str(device), "clock": "wall"}
    checks, timings, failures = {}, {}, {}
    for name in [HF_SEGFORMER_B0, *TRAIN_MODELS]:
        for precision in ("fp32", "bf16"):  # apart, so a failure in one precision leaves the other's figures
            if over_budget(args, reserve=args.budget_reserve_s):
                failures[name, precision] = "skipped (budget)"
                continue
            try:
                checks[name, precision] = first_step(name, precision, args, device)
                collected = queue.SimpleQueue()
                _worker(name, precision, worker_args, collected)  # train_step.py's timed loop, in this process
                timings[name, precision] = collected.get()
            except Exception as error:
                report_failure(f"{name} {precision}")
                checks.pop((name, precision), None)
                failures[name, precision] = f"FAILED ({type(error).__name__})"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"# {name} trained ({elapsed():.0f} s)", flush=True)

    print(
        f"\n## 2. Training step: batch {args.train_batch} x {args.size}x{args.size}, {args.num_labels} classes, AdamW "
        f"(lr 6e-5, wd 0.01); median of {args.train_repeats} steps after {args.train_warmup}\n"
    )
    columns = ["model", "precision", "1st-step loss", "bf16 - fp32 loss", "grads finite", "params with grad"]
    columns += ["last loss", "median ms/step", "ms vs HF B0", "peak MiB", "MiB vs HF B0"]
    rows = []
    for name, precision in [(n, p) for n in [HF_SEGFORMER_B0, *TRAIN_MODELS] for p in ("fp32", "bf16")]:
        if (name, precision) in failures:
            rows.append([name, precision, failures[name, precision], *["-"] * 8])
            continue
        loss, finite, with_grad = checks[name, precision]
        fp32_loss = checks.get((name, "fp32"), (float("nan"),))[0]
        cells = [name, precision, f"{loss:.4f}", f"{loss - fp32_loss:+.4f}", "yes" if finite else "NO", str(with_grad)]
        timing, baseline = timings[name, precision], timings.get((HF_SEGFORMER_B0, precision))
        ratios = [ratio(timing[key], baseline[key] if baseline else 0) for key in ("ms", "peak_mib")]
        cells += [f"{timing['loss']:.4f}", f"{timing['ms']:.1f}", ratios[0], f"{timing['peak_mib']:.0f}"]
        rows.append(cells + [ratios[1]])
    print_table(columns, rows)
    print(
        "\n(peak MiB: torch.cuda.max_memory_allocated during the steps minus what the model and the batches held "
        "before them: gradients, AdamW state, activations; on CPU the peak RSS increase. 1st-step loss: the same "
        "weights and batch in both precisions; last loss: after the timed steps.)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# 3. Inference


def speed_namespace(args, modes: list[str], warmup: int, repeats: int) -> argparse.Namespace:
    """The arguments `speed.py`'s helpers read."""
    return argparse.Namespace(
        num_labels=args.num_labels,
        modes=modes,
        compile_backend=args.compile_backend,
        warmup=warmup,
        repeats=repeats,
        clock="wall",
        throughput_batch=args.throughput_batch,
        height=args.size,
        width=args.size,
    )


def compiled_timings(name: str, settings: dict, results) -> None:
    """Child process: `torch.compile` (static shapes) of one model, its first call (compilation) and median latency
    at batch 1 and at the throughput batch, next to the eager model and HF SegFormer-B0 in the same rounds."""
    device = torch.device(settings["device"])
    model = build(name, settings["num_labels"]).eval().to(device)
    baseline = build(HF_SEGFORMER_B0, settings["num_labels"]).eval().to(device)
    compiled = torch.compile(model, backend=settings["backend"], dynamic=False)
    out = {}
    for batch in (1, settings["throughput_batch"]):
        pixel_values = torch.randn(batch, 3, settings["size"], settings["size"], device=device)
        with torch.inference_mode():
            synchronize(device)
            start = time.perf_counter()
            logits = compiled(pixel_values).logits
            synchronize(device)
            out[f"compile_s_{batch}"] = time.perf_counter() - start
            reference = model(pixel_values).logits
        out[f"error_{batch}"] = (logits.float() - reference.float()).abs().max().item()
        repeats = settings["repeats"]
        times = measure({"compiled": compiled, "eager": model, "hf": baseline}, pixel_values, 2, repeats)
        out[f"ms_{batch}"] = {key: median(values) for key, values in times.items()}
        results.put(("partial", out))
    results.put(("done", out))


def run_compiled(name: str, args, cap: float) -> tuple[dict | None, str]:
    """`compiled_timings` in a spawned process, killed after `cap` seconds: (results, note)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    settings = {"device": args.device, "num_labels": args.num_labels, "backend": args.compile_backend}
    settings |= {"throughput_batch": args.throughput_batch, "size": args.size, "repeats": args.repeats}
    # Not daemonic: inductor may start worker processes of its own.
    process = context.Process(target=compiled_timings, args=(name, settings, results))
    deadline = time.perf_counter() + cap
    process.start()
    latest, note, status = None, "", ""
    while note == "":
        try:
            status, latest = results.get(timeout=1.0)
            if status == "done":
                break
            continue
        except queue.Empty:
            pass
        if not process.is_alive():  # crashed (its traceback is on stderr), or exiting right after its last message
            with contextlib.suppress(queue.Empty):
                while True:
                    status, latest = results.get(timeout=1.0)
            note = "" if status == "done" else f"child exited with {process.exitcode}"
            break
        if time.perf_counter() > deadline:
            note = (
                f"skipped: compile > {cap:.0f} s"
                if latest is None
                else f"b{args.throughput_batch} skipped: > {cap:.0f} s"
            )
            process.kill()
    process.join(timeout=10)
    return latest, note


def latency_group(name: str, args, pixel_values: torch.Tensor, baseline) -> tuple[dict, dict, list[float]]:
    """`speed.py`'s timed group in eager fp32 and bf16 autocast, or in eager fp32 alone if that fails (reported)."""
    try:
        return timed_group(
            name, speed_namespace(args, ["eager", "bf16"], args.warmup, args.repeats), pixel_values, baseline
        )
    except Exception:
        report_failure(f"{name} eager + bf16 (timed again in eager fp32 alone)")
        return timed_group(name, speed_namespace(args, ["eager"], args.warmup, args.repeats), pixel_values, baseline)


def images_per_second(name: str, args, device: torch.device) -> dict[str, float]:
    """`speed.py`'s throughput (eager fp32, bf16 autocast, fused + bf16), or eager fp32 alone if that fails."""
    namespace = speed_namespace(args, ["eager", "bf16"], args.throughput_warmup, args.throughput_repeats)
    try:
        return throughput(name, namespace, device)
    except Exception:
        report_failure(f"{name} throughput (timed again in eager fp32 alone)")
    model = build(name, args.num_labels).eval().to(device)
    pixel_values = torch.randn(args.throughput_batch, 3, args.size, args.size, device=device)
    times = measure({"fp32": model}, pixel_values, args.throughput_warmup, args.throughput_repeats)
    return {"fp32": args.throughput_batch / (median(times["fp32"]) / 1e3)}


def inference(args, device: torch.device) -> None:
    pixel_values = torch.randn(1, 3, args.size, args.size, device=device)
    latency, throughputs = {}, {}
    names = [HF_SEGFORMER_B0, *(SPEED_MODELS[:2] if args.quick else SPEED_MODELS)]
    baseline = build(HF_SEGFORMER_B0, args.num_labels).eval().to(device)
    for name in names:
        if over_budget(args, reserve=args.budget_reserve_s):
            print(f"# {name}: skipped (budget)", flush=True)
            continue
        try:
            ms, info, reference = latency_group(name, args, pixel_values, baseline)
            latency[name] = (ms, info, median(reference))
            print(f"# {name}: " + ", ".join(f"{m} {v:.2f} ms" for m, v in ms.items()) + f" ({elapsed():.0f} s)")
            if device.type == "cuda" or args.quick:
                throughputs[name] = images_per_second(name, args, device)
        except Exception:
            report_failure(name)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    compiled = {}
    for name in args.compile_models if args.compile_cap_s > 0 else []:
        cap = min(args.compile_cap_s, args.budget_s - elapsed())
        if cap < 30:
            compiled[name] = (None, "skipped: budget")
            continue
        compiled[name] = run_compiled(name, args, cap)
        print(f"# {name} compiled: {compiled[name][1] or 'ok'} ({elapsed():.0f} s)", flush=True)

    print(
        f"\n## 3a. Latency, batch 1 x {args.size}x{args.size}, {args.num_labels} labels: median ms of {args.repeats} "
        f"after {args.warmup} (each model in the same rounds as HF SegFormer-B0 eager fp32)\n"
    )
    columns = ["model", "eager fp32 ms", "bf16 ms", "HF B0 ms (same rounds)", "eager / HF", "bf16 / HF"]
    columns += ["bf16 / eager", "bf16 max abs diff", "bf16 argmax agree"]
    rows = []
    for name, (ms, info, reference) in latency.items():
        bf16 = ms.get("bf16", float("nan"))  # nan: bf16 failed (reported above)
        rows.append(
            [name, f"{ms['eager']:.2f}", f"{bf16:.2f}", f"{reference:.2f}", f"{ms['eager'] / reference:.2f}"]
            + [f"{bf16 / reference:.2f}", f"{bf16 / ms['eager']:.2f}", f"{info.get('bf16_error', bf16):.2e}"]
            + [f"{100 * info.get('bf16_argmax', bf16):.2f}%"]
        )
    print_table(columns, rows)

    if throughputs:
        hf = throughputs.get(HF_SEGFORMER_B0)
        batch = f"batch {args.throughput_batch} x {args.size}x{args.size}"
        print(f"\n## 3b. Throughput, {batch} (images/s; x HF: over HF B0's eager fp32)\n")
        columns = ["model", "eager fp32", "bf16 autocast", "fused + bf16", "fp32 x HF", "bf16 x HF"]
        rows = []
        for name, rates in throughputs.items():
            cells = [name, *[f"{rates.get(mode, float('nan')):.1f}" for mode in ("fp32", "bf16", "fused bf16")]]
            cells += [ratio(rates.get(mode, float("nan")), hf["fp32"] if hf else 0) for mode in ("fp32", "bf16")]
            rows.append(cells)
        print_table(columns, rows)

    if compiled:
        print(
            f"\n## 3c. torch.compile ({args.compile_backend}, fp32, dynamic=False), each model in a child process "
            f"(cap {args.compile_cap_s:.0f} s for its start, compilations and timing); eager and HF B0 eager timed in "
            "the same rounds\n"
        )
        batch = args.throughput_batch
        columns = ["model", "compile s (b1)", "b1 ms", "b1 / eager", "b1 / HF B0", "max abs diff (b1)"]
        columns += [f"compile s (b{batch})", f"b{batch} img/s", f"b{batch} / eager", f"b{batch} x HF B0", "note"]
        rows = []
        for name, (result, note) in compiled.items():
            cells = [name]
            for size in (1, batch):
                if result is None or f"ms_{size}" not in result:
                    cells += ["-"] * (5 if size == 1 else 4)
                    continue
                ms = result[f"ms_{size}"]
                cells += [f"{result[f'compile_s_{size}']:.1f}"]
                if size == 1:
                    cells += [f"{ms['compiled']:.2f}", f"{ms['compiled'] / ms['eager']:.2f}"]
                    cells += [f"{ms['compiled'] / ms['hf']:.2f}", f"{result['error_1']:.1e}"]
                else:
                    cells += [f"{1e3 * size / ms['compiled']:.1f}", f"{ms['compiled'] / ms['eager']:.2f}"]
                    cells += [f"{ms['hf'] / ms['compiled']:.2f}"]
            rows.append(cells + [note or "ok"])
        print_table(columns, rows)
        print(
            f"\n(b1 / eager, b{batch} / eager: time ratios, below 1 is faster; x HF B0: images/s over HF B0 eager's.)"
        )


# ---------------------------------------------------------------------------------------------------------------------


def header(args, device: torch.device) -> None:
    print("# offseg-hf CUDA check")
    print(f"# date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# command: python {' '.join(sys.argv)}")
    line = f"# python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
    line += f"{torch.backends.cudnn.version()}), transformers {transformers.__version__}, timm {timm.__version__}"
    print(line)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        print(
            f"# GPU {properties.name}, compute capability {properties.major}.{properties.minor}, "
            f"{properties.multi_processor_count} SMs, {properties.total_memory / 2**30:.0f} GiB"
        )
    print(
        f"# defaults kept for parts 2-3: float32 matmul precision '{torch.get_float32_matmul_precision()}', "
        f"cuDNN TF32 {torch.backends.cudnn.allow_tf32}, cuDNN benchmark {torch.backends.cudnn.benchmark}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="smoke run: 128x128, batch 2, few repeats, 2 models")
    parser.add_argument("--parts", nargs="+", choices=["correctness", "training", "inference"])
    parser.add_argument("--compile_backend", default="inductor")
    parser.add_argument("--compile_models", nargs="+", default=None, help=f"default {' '.join(COMPILE_MODELS)}")
    parser.add_argument("--compile_cap_s", type=float, default=90.0, help="per compiled model (0: no compile)")
    parser.add_argument("--budget_s", type=float, default=300.0, help="skip what would start after this many seconds")
    parser.add_argument("--budget_reserve_s", type=float, default=120.0, help="kept for compile by parts 2-3a")
    args = parser.parse_args()
    args.parts = args.parts or ["correctness", "training", "inference"]
    args.num_labels = 150
    args.compile_models = args.compile_models or (COMPILE_MODELS[:1] if args.quick else COMPILE_MODELS)
    if args.quick:
        args.size, args.train_batch, args.throughput_batch = 128, 2, 2
        args.train_warmup, args.train_repeats, args.warmup, args.repeats = 1, 2, 1, 3
        args.throughput_warmup, args.throughput_repeats = 1, 2
    else:
        args.size, args.train_batch, args.throughput_batch = 512, 8, 16
        args.train_warmup, args.train_repeats, args.warmup, args.repeats = 3, 10, 5, 15
        args.throughput_warmup, args.throughput_repeats = 3, 10
    device = torch.device(args.device)
    header(args, device)

    if "correctness" in args.parts:
        rows = correctness(args, device)
        print("\n## 1. Hand-written autograd Functions and banded loss against their plain forms\n")
        columns = ["case", "comparison", "fwd max abs", "fwd rel", "grad max abs", "grad rel", "grad dtypes"]
        print_table([*columns, "tol (rel)", "result"], rows)
        failed = sum(not row[-1].startswith("PASS") for row in rows)
        print(f"\n{len(rows) - failed} of {len(rows)} rows PASS ({elapsed():.0f} s)", flush=True)
    if "training" in args.parts:
        training(args, device)
    if "inference" in args.parts:
        inference(args, device)
    print(f"\n# total {elapsed():.0f} s")


if __name__ == "__main__":
    main()
