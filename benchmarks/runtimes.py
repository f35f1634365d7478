"""CPU latency of every inference runtime the project exports to, per preset, against transformers' SegFormer-B0.

    python benchmarks/runtimes.py                                        # the six presets below, 512x512, 2 threads
    python benchmarks/runtimes.py --variants segformer-b0-offset --size 128 128 --repeats 1   # a smoke run
    python benchmarks/runtimes.py --runtimes eager,onnxruntime,openvino --threads 4
    python benchmarks/runtimes.py --variants offseg-t --runtimes eager --allocator keep   # glibc keeps freed memory

Per preset (random weights, eval mode, batch 1, 150 labels), the runtimes:

* `eager`: PyTorch, the model as loaded;
* `folded`: PyTorch after `offseg_hf.export.fuse_for_inference` (BatchNorms folded into convolutions);
* `compiled-form`: eager with `set_form(model, "compiled")`: CARAFE (OffSeg's FreqFusion) through inductor, the
  rest as `eager` (the same as `eager` for presets without FreqFusion; its compilation happens in the warm-up);
* `folded-compiled-form`: both of the above (BatchNorms folded, then the compiled form);
* `compile`: `torch.compile` of the model (default mode; its compilation happens in the warm-up);
* `onnxruntime`: `offseg_hf.export.onnx.export_onnx` (dynamic shapes) on ONNX Runtime's CPU provider;
* `openvino`: `offseg_hf.export.openvino.export_openvino` on OpenVINO's CPU plugin, float32 inference;
* `executorch`, `executorch-int8`: `offseg_hf.export.executorch.export_executorch` (XNNPACK, a program for the
  benchmark size; int8 calibrated on 4 demo images) run by `executorch.runtime`.

Each is timed on the same input as transformers' `SegformerForSemanticSegmentation` (MiT-B0, decoder 256, 150
labels) eager, `hf-segformer-b0`, in the same rounds: every round runs each runtime once, in forward order in even
rounds and reverse order in odd ones, so load drift and cache effects hit all alike; the table gives the median per
runtime and its ratio to the reference's median of the same preset's rounds. Every runtime gets `--threads` threads
(torch, ONNX Runtime intra-op, OpenVINO inference threads, ExecuTorch's XNNPACK pool). `max abs diff` is the largest
logit difference from eager on the benchmark input (for a graph's own rounding, or int8's error). A runtime that
fails to build or run for a preset shows its error in the table; the others go on.

The machine line (CPU model, ISA extensions, threads, library versions) is printed first: figures compare only with
figures measured on the same kind of CPU.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import (
    FAMILY_PRESETS,
    HF_SEGFORMER_B0,
    add_allocator_argument,
    apply_allocator,
    hf_segformer_b0,
    machine_line,
    median,
    print_table,
)

from offseg_hf import presets

DEFAULT_VARIANTS = FAMILY_PRESETS
RUNTIMES = (
    "eager",
    "folded",
    "compiled-form",
    "folded-compiled-form",
    "compile",
    "onnxruntime",
    "openvino",
    "executorch",
    "executorch-int8",
)

Runner = Callable[[torch.Tensor], np.ndarray]


def as_numpy(output) -> np.ndarray:
    logits = output if isinstance(output, (torch.Tensor, np.ndarray)) else output.logits
    return logits.float().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)


def torch_runner(model: torch.nn.Module) -> Runner:
    return lambda pixel_values: as_numpy(model(pixel_values=pixel_values))


def build_runner(runtime: str, model: torch.nn.Module, args, workdir: Path, variant: str) -> Runner:
    """The runtime's callable for `model`: exports first where the runtime needs a file."""
    size = tuple(args.size)
    if runtime == "eager":
        return torch_runner(model)
    if runtime == "folded":
        from offseg_hf.export import fuse_for_inference

        return torch_runner(fuse_for_inference(copy.deepcopy(model)))
    if runtime in ("compiled-form", "folded-compiled-form"):
        from offseg_hf.export import fuse_for_inference
        from offseg_hf.models.forms import set_form

        compiled_form = copy.deepcopy(model)
        if runtime.startswith("folded"):
            fuse_for_inference(compiled_form)
        set_form(compiled_form, "compiled")
        return torch_runner(compiled_form)
    if runtime == "compile":
        return torch_runner(torch.compile(model))
    if runtime == "onnxruntime":
        from offseg_hf.export.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx, inference_session

        session = inference_session(export_onnx(model, workdir / f"{variant}.onnx", example_size=size), args.threads)
        return lambda pixel_values: session.run([OUTPUT_NAME], {INPUT_NAME: pixel_values.numpy()})[0]
    if runtime == "openvino":
        from offseg_hf.export.openvino import OpenVinoSegmenter, export_openvino

        path = export_openvino(model, workdir / f"{variant}-openvino" / "model.xml", example_size=size)
        segmenter = OpenVinoSegmenter(path, threads=args.threads)
        return lambda pixel_values: segmenter.logits(pixel_values.numpy())
    if runtime in ("executorch", "executorch-int8"):
        from offseg_hf.export.executorch import ExecuTorchSegmenter, export_executorch

        quantize = "int8" if runtime.endswith("int8") else None
        path = export_executorch(model, workdir / f"{variant}-{runtime}.pte", example_size=size, quantize=quantize)
        segmenter = ExecuTorchSegmenter(path, threads=args.threads)
        return lambda pixel_values: segmenter.logits(pixel_values.numpy())
    raise ValueError(f"unknown runtime {runtime!r}; the runtimes are {', '.join(RUNTIMES)}")


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:150]}"


def time_rounds(runners: dict[str, Runner], pixel_values: torch.Tensor, warmup: int, repeats: int) -> dict:
    """Per runner, the wall times (ms) of `repeats` rounds after `warmup` rounds; the order alternates by round."""
    names = list(runners)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for name in names if round_index % 2 == 0 else reversed(names):
                start = time.perf_counter()
                runners[name](pixel_values)
                if round_index >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return times


def benchmark_variant(variant: str, args, workdir: Path, pixel_values: torch.Tensor, reference: Runner) -> list:
    """Table rows [variant, runtime, build s, ms, x HF B0, x eager, max |diff|] for one preset."""
    torch.manual_seed(0)
    model = presets.model_for_variant(variant, num_labels=args.num_labels).eval()
    with torch.inference_mode():
        expected = as_numpy(model(pixel_values=pixel_values))
    runners, build_seconds, failures, differences = {HF_SEGFORMER_B0: reference}, {}, {}, {}
    for runtime in args.runtimes:
        print(f"  {variant}: {runtime} ...", flush=True)
        start = time.perf_counter()
        try:
            runner = build_runner(runtime, model, args, workdir, variant)
            with torch.inference_mode():
                differences[runtime] = float(np.abs(runner(pixel_values) - expected).max())
        except Exception as error:  # one runtime's failure must not lose the others' figures
            failures[runtime] = one_line(error)
            print(f"    failed: {failures[runtime]}", flush=True)
            continue
        build_seconds[runtime] = time.perf_counter() - start
        runners[runtime] = runner
    times = {}
    try:
        times = time_rounds(runners, pixel_values, args.warmup, args.repeats)
    except Exception as error:  # a runtime that built but fails when timed: time the rest without it
        message = one_line(error)
        for runtime in list(runners)[1:]:
            try:
                with torch.inference_mode():
                    runners[runtime](pixel_values)
            except Exception:
                failures[runtime] = message
                del runners[runtime]
        times = time_rounds(runners, pixel_values, args.warmup, args.repeats)
    baseline = median(times[HF_SEGFORMER_B0])
    eager = median(times["eager"]) if "eager" in times else None
    rows = [[variant, HF_SEGFORMER_B0, "-", f"{baseline:.1f}", "1.00", "-", "-"]]
    for runtime in args.runtimes:
        if runtime in failures:
            rows.append([variant, runtime, "-", failures[runtime], "-", "-", "-"])
            continue
        milliseconds = median(times[runtime])
        rows.append(
            [
                variant,
                runtime,
                f"{build_seconds[runtime]:.0f}",
                f"{milliseconds:.1f}",
                f"{milliseconds / baseline:.2f}",
                f"{milliseconds / eager:.2f}" if eager else "-",
                f"{differences[runtime]:.1e}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="Comma-separated presets.")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="Comma-separated, of: " + ", ".join(RUNTIMES))
    parser.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--threads", type=int, default=2, help="Threads for every runtime (default 2).")
    parser.add_argument("--repeats", type=int, default=9, help="Timed rounds (median; default 9).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed rounds first (default 2).")
    parser.add_argument("--num_labels", type=int, default=150)
    parser.add_argument("--workdir", default=None, help="Where exported files go (default a temporary folder).")
    add_allocator_argument(parser)
    args = parser.parse_args(argv)
    apply_allocator(args.allocator)
    args.runtimes = [name for name in args.runtimes.split(",") if name]
    unknown = sorted(set(args.runtimes) - set(RUNTIMES))
    if unknown:
        parser.error(f"unknown runtimes {', '.join(unknown)}; the runtimes are {', '.join(RUNTIMES)}")
    torch.set_num_threads(args.threads)
    print(machine_line(torch.device("cpu")), flush=True)
    pixel_values = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(0))
    reference_model = hf_segformer_b0(args.num_labels).eval()
    reference = torch_runner(reference_model)
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(args.workdir or temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        for variant in args.variants.split(","):
            print(f"{variant} ...", flush=True)
            try:
                rows += benchmark_variant(variant, args, workdir, pixel_values, reference)
            except Exception as error:  # the preset itself failed (e.g. its model could not be built)
                rows.append([variant, "(all)", "-", one_line(error), "-", "-", "-"])
    print(
        f"\n{args.size[0]}x{args.size[1]}, batch 1, float32 input, {args.num_labels} labels, {args.threads} threads, "
        f"median of {args.repeats} rounds (ms); x HF B0: against {HF_SEGFORMER_B0} eager in the same rounds:\n"
    )
    print_table(["variant", "runtime", "build s", "ms", "x HF B0", "x eager", "max abs diff vs eager"], rows)


if __name__ == "__main__":
    main()
