"""OffSeg-T/B/L against transformers' SegFormer-B0, in one run: latency, per-stage time split, peak memory at
1024x2048, parameters and FLOPs next to the paper's Table 2.

    python benchmarks/offseg.py                       # CPU, all cores
    python benchmarks/offseg.py --device cuda --repeats 50
    python benchmarks/offseg.py --skip_memory         # only the 512x512 tables

Tables:
1. 512x512, batch 1, fp32: median latency (models take turns each round), ratio against HF SegFormer-B0
   (decoder 256, 150 labels), parameters, FLOPs. "GMAC (ours)" is what `torch.utils.flop_counter` counts on the
   computation this package runs; "GMAC (official order)" counts the same weights computed in the official
   code's order (offset learning forms dE at (HW, C)). The counter sees no FLOPs in CARAFE, here (in-place
   multiply-adds) as in mmcv's custom op, so neither count includes it (about 0.1-0.2 GMAC).
2. Per-stage split of one forward pass (median over the timed passes, measured with forward hooks):
   backbone, FreqFusion cascade, the rest of the decoder (projections, concatenation, align conv), offset
   learning.
3. Peak memory of one inference pass at 1024x2048 (Cityscapes size), each model in a fresh process: on CPU the
   peak resident set size minus the size after building the model; on CUDA `max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from collections import defaultdict

import torch
from common import OfficialOrder, count_gmac, machine_line, measure, median, parameters_m, print_table
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from offseg_hf import PAPER_FIGURES, OffSegConfig, OffSegForSemanticSegmentation

BASELINE = "hf-segformer-b0"
VARIANTS = ("offseg-t", "offseg-b", "offseg-l")
PAPER = {BASELINE: {"params_m": 3.8, "gflops": 8.4}} | {v: PAPER_FIGURES[v] for v in VARIANTS}

FLOPS_NOTE = """\
Why the counted FLOPs exceed the paper's (5.3 / 10.3 / 17.1 G): OffSeg runs offset learning at 1/4 resolution
(128x128 positions at 512x512), where its matrix products cost HW*K*C each (0.63 GMAC at K=150, C=256). The
paper's counter (mmseg/fvcore style) leaves most of them out; torch.utils.flop_counter counts every one. The
official arrangement counts 9.4 / 14.7 / 21.8 GMAC; this package evaluates the feature-offset term through a
(K, K) matrix instead of forming dE at (HW, C), which removes 1.3 GMAC at the same result."""


def build(name: str, num_labels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == BASELINE:
        return SegformerForSemanticSegmentation(SegformerConfig(num_labels=num_labels, decoder_hidden_size=256))
    return OffSegForSemanticSegmentation(OffSegConfig.from_variant(name, num_labels=num_labels))


def stage_split(model: OffSegForSemanticSegmentation, pixel_values: torch.Tensor, repeats: int) -> dict:
    """Median ms per stage over `repeats` forward passes, timed with forward hooks."""
    offseg = model.offseg
    stages = {"backbone": [offseg.encoder], "FreqFusion": list(offseg.decode_head.fusions)}
    stages |= {"decoder (rest)": [offseg.decode_head], "offset learning": [model.classifier]}
    starts, elapsed = {}, defaultdict(float)
    device = pixel_values.device

    def attach(module, key):
        def before(*_):
            torch.cuda.synchronize(device) if device.type == "cuda" else None
            starts[key] = time.perf_counter()

        def after(*_):
            torch.cuda.synchronize(device) if device.type == "cuda" else None
            elapsed[key] += (time.perf_counter() - starts[key]) * 1e3

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    handles = [h for name, modules in stages.items() for i, m in enumerate(modules) for h in attach(m, (name, i))]
    samples = defaultdict(list)
    with torch.inference_mode():
        model(pixel_values)
        for _ in range(repeats):
            elapsed.clear()
            start = time.perf_counter()
            model(pixel_values)
            samples["total"].append((time.perf_counter() - start) * 1e3)
            per_stage = defaultdict(float)
            for (name, _), ms in elapsed.items():
                per_stage[name] += ms
            per_stage["decoder (rest)"] -= per_stage["FreqFusion"]  # the head's time includes its fusions
            for name, ms in per_stage.items():
                samples[name].append(ms)
    for handle in handles:
        handle.remove()
    return {name: median(values) for name, values in samples.items()}


def _peak_memory_worker(name: str, num_labels: int, height: int, width: int, device: str, queue) -> None:
    torch.set_num_threads(torch.get_num_threads())
    model = build(name, num_labels).eval().to(device)
    pixel_values = torch.randn(1, 3, height, width, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            shape = tuple(model(pixel_values).logits.shape)
        queue.put((name, (torch.cuda.max_memory_allocated(device) - base) / 2**20, shape))
        return
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        shape = tuple(model(pixel_values).logits.shape)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    queue.put((name, (peak - base) / 1024, shape))


def peak_memory(names, num_labels: int, height: int, width: int, device: str) -> dict:
    context = mp.get_context("spawn")
    results = {}
    for name in names:
        queue = context.Queue()
        process = context.Process(target=_peak_memory_worker, args=(name, num_labels, height, width, device, queue))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"{name} failed at {height}x{width} (exit code {process.exitcode}).")
        _, mib, shape = queue.get()
        results[name] = (mib, shape)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_labels", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip_memory", action="store_true", help="skip the 1024x2048 peak-memory table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    names = (BASELINE, *VARIANTS)
    models = {name: build(name, args.num_labels).eval().to(device) for name in names}
    pixel_values = torch.randn(1, 3, 512, 512, device=device)
    gmac = {name: count_gmac(model, pixel_values) for name, model in models.items()}
    gmac_official = {name: count_gmac(OfficialOrder(models[name]), pixel_values) for name in VARIANTS}
    times = measure(models, pixel_values, args.warmup, args.repeats)
    baseline = median(times[BASELINE])

    print(f"# 512x512, batch 1, fp32, {args.repeats} repeats\n# {machine_line(device)}\n")
    columns = ["model", "params (M)", "paper params", "GMAC (ours)", "GMAC (official order)", "paper GFLOPs"]
    columns += ["median ms", "ratio vs HF SegFormer-B0"]
    rows = []
    for name in names:
        ms = median(times[name])
        rows.append(
            [
                name,
                f"{parameters_m(models[name]):.3f}",
                f"{PAPER[name]['params_m']:.1f}",
                f"{gmac[name]:.2f}",
                f"{gmac_official[name]:.2f}" if name in gmac_official else "-",
                f"{PAPER[name]['gflops']:.1f}",
                f"{ms:.1f}",
                f"{ms / baseline:.3f}",
            ]
        )
    print_table(columns, rows)
    print("\n" + FLOPS_NOTE + "\n")

    print("## Per-stage split at 512x512 (median ms, share of the forward pass)\n")
    stage_names = ["backbone", "FreqFusion", "decoder (rest)", "offset learning"]
    rows = []
    for name in VARIANTS:
        split = stage_split(models[name], pixel_values, args.repeats)
        cells = [f"{split[s]:.1f} ({100 * split[s] / split['total']:.0f}%)" for s in stage_names]
        rows.append([name, *cells, f"{split['total']:.1f}"])
    print_table(["model", *stage_names, "total"], rows)

    if not args.skip_memory:
        print("\n## Peak memory of one inference pass at 1024x2048, batch 1 (fresh process per model)\n")
        memory = peak_memory(names, args.num_labels, 1024, 2048, args.device)
        rows = [[name, f"{mib:.0f}", str(shape)] for name, (mib, shape) in memory.items()]
        print_table(["model", "peak MiB", "logits shape"], rows)


if __name__ == "__main__":
    main()
