"""Inference speed of every preset in four execution modes, next to transformers' SegFormer-B0, in one run.

    python benchmarks/speed.py                                        # every preset, all modes, CPU
    python benchmarks/speed.py --variants offseg-t segformer-b0-offset --modes eager fused bf16
    python benchmarks/speed.py --device cuda --repeats 50              # + a batch-16 throughput table

Modes (columns):
  eager      the model as built, fp32.
  fused      `offseg_hf.export.fuse_for_inference` on a copy: eval-mode BatchNorms folded into the convolutions
             before them (transformers' SegFormer-B0 gets the same treatment: its head's fuse conv + BN folds).
  compiled   `torch.compile(model)` (inductor) of the eager model; the first call's time (tracing and code
             generation, C++ on CPU) is reported apart, in seconds, and the timed passes follow it.
  bf16       the eager model under `torch.autocast(device, torch.bfloat16)`; its logits are compared with fp32
             (max |difference| and the share of positions whose argmax class agrees).

Every preset is timed in its own group of rounds together with the baseline (hf-segformer-b0, eager fp32): within
a round the models take turns, so drift in machine load hits them alike, and every ratio is a preset's median over
the baseline's median from the same rounds. The baseline's own row is a group of its four modes. Latency is the
median over `--repeats` passes after `--warmup` untimed ones (batch `--batch_size`, default 1), in wall time or,
with `--clock process --threads 1` on a CPU shared with other work, in this process's CPU time.

On CUDA a second table gives throughput (images/s) at batch `--throughput_batch` (default 16): eager fp32, bf16
autocast, and fused + bf16 autocast.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import (
    HF_SEGFORMER_B0,
    Autocast,
    add_input_arguments,
    agreement,
    hf_segformer_b0,
    logits_of,
    machine_line,
    measure,
    median,
    print_table,
    synchronize,
)

from offseg_hf.export.batchnorm import fuse_for_inference
from offseg_hf.presets import all_variant_names, model_for_variant

MODES = ("eager", "fused", "compiled", "bf16")


def build(name: str, num_labels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == HF_SEGFORMER_B0:
        return hf_segformer_b0(num_labels)
    return model_for_variant(name, num_labels=num_labels)


def batch_norm_count(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def prepare(name: str, args, pixel_values: torch.Tensor) -> tuple[dict, dict]:
    """The timed callables of one model, one per mode, and what was measured while building them."""
    device = pixel_values.device
    model = build(name, args.num_labels).eval().to(device)
    info = {"batch_norms": batch_norm_count(model)}
    with torch.inference_mode():
        reference = logits_of(model(pixel_values))
    callables = {"eager": model}
    if "fused" in args.modes:
        fused = fuse_for_inference(copy.deepcopy(model), pixel_values[:1])
        info["pairs"], info["left"] = len(fused.fused_conv_bn_pairs), batch_norm_count(fused)
        with torch.inference_mode():
            info["fused_error"], _ = agreement(reference, logits_of(fused(pixel_values)))
        callables["fused"] = fused
    if "compiled" in args.modes:
        compiled = torch.compile(model, backend=args.compile_backend)
        with torch.inference_mode():
            synchronize(device)
            start = time.perf_counter()
            output = logits_of(compiled(pixel_values))
            synchronize(device)
        info["compile_s"] = time.perf_counter() - start
        info["compiled_error"], _ = agreement(reference, output)
        callables["compiled"] = compiled
    if "bf16" in args.modes:
        bf16 = Autocast(model, device.type)
        with torch.inference_mode():
            info["bf16_error"], info["bf16_argmax"] = agreement(reference, logits_of(bf16(pixel_values)))
        callables["bf16"] = bf16
    return callables, info


def timed_group(name: str, args, pixel_values: torch.Tensor, baseline) -> tuple[dict, dict, list[float]]:
    """Median ms per mode of `name`, what `prepare` measured, and the baseline's times from the same rounds."""
    callables, info = prepare(name, args, pixel_values)
    models = {(name, mode): fn for mode, fn in callables.items()}
    if name != HF_SEGFORMER_B0:
        models[(HF_SEGFORMER_B0, "eager")] = baseline
    times = measure(models, pixel_values, args.warmup, args.repeats, args.clock)
    ms = {mode: median(times[(name, mode)]) for mode in callables}
    return ms, info, times[(HF_SEGFORMER_B0, "eager")]


def throughput(name: str, args, device: torch.device) -> dict[str, float]:
    """Images/s at batch `--throughput_batch`: eager fp32, bf16 autocast, fused + bf16 autocast."""
    model = build(name, args.num_labels).eval().to(device)
    pixel_values = torch.randn(args.throughput_batch, 3, args.height, args.width, device=device)
    fused = fuse_for_inference(copy.deepcopy(model), pixel_values[:1])
    models = {"fp32": model, "bf16": Autocast(model, device.type), "fused bf16": Autocast(fused, device.type)}
    times = measure(models, pixel_values, args.warmup, args.repeats)
    return {mode: args.throughput_batch / (median(values) / 1e3) for mode, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser, warmup=2, repeats=10)
    names = all_variant_names()
    parser.add_argument("--variants", nargs="+", choices=names, default=names, metavar="VARIANT")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--throughput_batch", type=int, default=16, help="CUDA throughput table batch size")
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="wall time, or this process's CPU time (CPU only; with --threads 1 on a shared machine)",
    )
    args = parser.parse_args()
    args.modes = ["eager", *[m for m in MODES if m in args.modes and m != "eager"]]
    if args.clock == "process" and args.device != "cpu":
        parser.error("--clock process measures CPU time: CPU only.")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pixel_values = torch.randn(args.batch_size, 3, args.height, args.width, device=device)

    baseline_ms, baseline_info, _ = timed_group(HF_SEGFORMER_B0, args, pixel_values, None)
    baseline = build(HF_SEGFORMER_B0, args.num_labels).eval().to(device)  # the eager reference of every group
    results = {HF_SEGFORMER_B0: (baseline_ms, baseline_info, baseline_ms["eager"])}
    for name in dict.fromkeys(args.variants):
        ms, info, reference_times = timed_group(name, args, pixel_values, baseline)
        results[name] = (ms, info, median(reference_times))
        print(f"# {name}: " + ", ".join(f"{mode} {value:.1f} ms" for mode, value in ms.items()), flush=True)

    shape = "x".join(map(str, pixel_values.shape))
    print(
        f"\n# {shape}, {args.num_labels} labels, {args.repeats} repeats after {args.warmup}, {args.clock} clock, "
        f"{machine_line(device)}"
    )
    print("\n## Latency (median ms) and ratio against HF SegFormer-B0 eager fp32 timed in the same rounds\n")
    columns = ["model", *[f"{mode} ms" for mode in args.modes], "HF B0 ms (same rounds)"]
    columns += [f"{mode} / HF" for mode in args.modes]
    columns += [f"{mode} / eager" for mode in args.modes if mode != "eager"]
    rows = []
    for name, (ms, _, reference) in results.items():
        rows.append(
            [name, *[f"{ms[m]:.1f}" for m in args.modes], f"{reference:.1f}"]
            + [f"{ms[m] / reference:.3f}" for m in args.modes]
            + [f"{ms[m] / ms['eager']:.3f}" for m in args.modes if m != "eager"]
        )
    print_table(columns, rows)

    print("\n## Folding, compilation and bf16 accuracy (logits against eager fp32, same input)\n")
    columns = ["model", "BN", "BN folded", "BN left", "fused max abs diff", "compile s (1st call)"]
    columns += ["compiled max abs diff", "bf16 max abs diff", "bf16 argmax agree"]
    rows = []
    for name, (_, info, _) in results.items():

        def cell(key, fmt, info=info):
            return format(info[key], fmt) if key in info else "-"

        agree = f"{100 * info['bf16_argmax']:.2f}%" if "bf16_argmax" in info else "-"
        rows.append(
            [name, str(info["batch_norms"]), cell("pairs", "d"), cell("left", "d"), cell("fused_error", ".1e")]
            + [cell("compile_s", ".1f"), cell("compiled_error", ".1e"), cell("bf16_error", ".2e"), agree]
        )
    print_table(columns, rows)

    if device.type == "cuda":
        print(f"\n## Throughput at batch {args.throughput_batch} (images/s, {args.height}x{args.width})\n")
        rows = []
        for name in results:
            images_per_s = throughput(name, args, device)
            rows.append([name, *[f"{value:.1f}" for value in images_per_s.values()]])
        print_table(["model", "eager fp32", "bf16 autocast", "fused + bf16 autocast"], rows)


if __name__ == "__main__":
    main()
