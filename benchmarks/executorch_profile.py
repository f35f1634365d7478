"""Where an ExecuTorch program spends its time: inside the XNNPACK delegate calls, per XNNPACK operator kind, and
outside them, per portable-kernel operator (ExecuTorch's ETDump, read by `executorch.devtools.Inspector`).

    python benchmarks/executorch_profile.py --variant offseg-t                  # exports at 512x512 first (2-4 min)
    python benchmarks/executorch_profile.py --pte /tmp/rt/offseg-t-executorch.pte   # a program runtimes.py wrote

A preset is built with random weights (150 labels) and exported by `offseg_hf.export.executorch.export_executorch`,
fp32, for the benchmark size; a given `--pte` is profiled as it is. The program runs `--repeats` forwards on a random
input with event tracing on (which adds a little time of its own); each row is the median over those forwards of the
summed time of its events in one forward. XNNPACK names its operators by kind and instance (`Batch Matrix Multiply
(NC, F32) GEMM #3`); rows add up the instances of a kind. Rows under "inside XNNPACK" are parts of the delegate calls'
time; "outside XNNPACK" rows are ExecuTorch's portable kernels (`native_call_<op>`).

The machine line comes first: the split depends on the CPU (XNNPACK picks its kernels by ISA) and the thread count.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from common import machine_line, print_table

from offseg_hf import presets

# ETDump events that time the whole call rather than one operator.
WHOLE_CALL_EVENTS = {"Method::execute", "Program::load_method", "Method::init", "DELEGATE_CALL", "OPERATOR_CALL"}
PORTABLE_PREFIX = "native_call_"


def operator_kind(event_name: str) -> str:
    """`Batch Matrix Multiply (NC, F32) GEMM #3` -> `Batch Matrix Multiply (NC, F32) GEMM`."""
    return re.sub(r" #\d+$", "", event_name)


def per_forward_times(etdump_path: Path) -> list[dict[str, float]]:
    """Per forward (run) recorded in the ETDump, ms per event kind, summed over that forward's events."""
    from executorch.devtools import Inspector

    inspector = Inspector(etdump_path=str(etdump_path))
    runs: list[dict[str, float]] = []
    for block in inspector.event_blocks:
        for event in block.events:
            if event.perf_data is None:
                continue
            # perf_data.raw holds one duration (ms) per forward in which the event ran.
            for run, duration in enumerate(event.perf_data.raw):
                while len(runs) <= run:
                    runs.append(defaultdict(float))
                runs[run][operator_kind(event.name)] += duration
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--variant", help="A preset to export and profile (random weights).")
    source.add_argument("--pte", help="An ExecuTorch program to profile as it is.")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--threads", type=int, default=2, help="XNNPACK's thread pool (default 2).")
    parser.add_argument("--repeats", type=int, default=5, help="Profiled forwards (median; default 5).")
    parser.add_argument("--num_labels", type=int, default=150)
    parser.add_argument("--top", type=int, default=12, help="Operator kinds listed inside XNNPACK (default 12).")
    args = parser.parse_args(argv)

    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    from offseg_hf.export.executorch import export_executorch, set_threads

    print(machine_line(torch.device("cpu")))  # its thread count is torch's; XNNPACK's is in the table's title
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        if args.pte:
            path = Path(args.pte)
        else:
            model = presets.model_for_variant(args.variant, num_labels=args.num_labels).eval()
            path = export_executorch(model, Path(scratch) / "model.pte", example_size=tuple(args.size))
        program = _load_for_executorch(str(path), enable_etdump=True)
        height, width = args.size
        pixel_values = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
        for _ in range(1 + args.repeats):
            program.run_method("forward", (pixel_values,))
        etdump = Path(scratch) / "profile.etdp"
        program.write_etdump_result_to_file(str(etdump))
        runs = per_forward_times(etdump)[1:]  # the first forward is the warm-up

    def median_of(kind: str) -> float:
        return statistics.median(run.get(kind, 0.0) for run in runs)

    total = median_of("Method::execute")
    delegated = median_of("DELEGATE_CALL")
    kinds = {kind for run in runs for kind in run} - WHOLE_CALL_EVENTS
    inside = sorted((k for k in kinds if not k.startswith(PORTABLE_PREFIX)), key=median_of, reverse=True)
    outside = sorted((k for k in kinds if k.startswith(PORTABLE_PREFIX)), key=median_of, reverse=True)

    def row(name: str, ms: float) -> list[str]:
        return [name, f"{ms:.2f}", f"{100 * ms / total:.1f}%"]

    rows = [row("forward (Method::execute)", total), row("inside XNNPACK (all delegate calls)", delegated)]
    rows += [row(f"  {kind}", median_of(kind)) for kind in inside[: args.top]]
    rest = sum(median_of(kind) for kind in inside[args.top :])
    rows.append(row("  other XNNPACK operators", rest))
    rows.append(row("outside XNNPACK (portable kernels)", sum(median_of(kind) for kind in outside)))
    rows += [row(f"  {kind.removeprefix(PORTABLE_PREFIX)}", median_of(kind)) for kind in outside]
    print(
        f"\n{path.name if args.pte else args.variant}: {height}x{width}, batch 1, fp32, {args.threads} XNNPACK "
        f"threads, median of {len(runs)} traced forwards (ms)\n"
    )
    print_table(["part", "ms", "share of forward"], rows)


if __name__ == "__main__":
    main()
