"""Mask2Former Swin-T with offset learning against the plain Mask2Former (the paper's Table 5), in one run:
parameters, counted FLOPs, latency, the offset module's share of it and what offset learning costs.

    python benchmarks/mask2former.py                          # 512x512, batch 1, fp32, CPU
    python benchmarks/mask2former.py --device cuda --repeats 50

Rows:
  mask2former-swin-t          transformers' Mask2Former (Swin-T, 100 queries, 9 decoder layers) with the official
                              semantic inference: the baseline of every ratio.
  mask2former-swin-t-offset   the same with the paper's offset module before each of the 10 mask predictions.

Columns:
  GMAC             what `torch.utils.flop_counter` counts (FLOPs / 2) on one image, the semantic inference included
                   (the deformable attention's sampling is not counted).
  median ms        median over `--repeats` timed forward passes after `--warmup` untimed ones; the two models take
                   turns within each round, so drift in machine load hits both alike.
  offset ms        time inside the offset module (all its calls in one pass, summed) during the same timed passes,
                   from forward pre/post hooks, and its share of the model's median.
  ratio            median over the baseline's median, both from this run.
"""

from __future__ import annotations

import argparse

import torch
from common import (
    ForwardTimer,
    add_input_arguments,
    count_gmac,
    machine_line,
    measure,
    median,
    parameters_m,
    print_table,
)

from offseg_hf.presets import model_for_variant, paper_figures

BASELINE, OFFSET = "mask2former-swin-t", "mask2former-swin-t-offset"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser, warmup=1, repeats=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = {}
    for name in (BASELINE, OFFSET):
        torch.manual_seed(0)
        models[name] = model_for_variant(name, num_labels=args.num_labels).eval().to(device)
    pixel_values = torch.randn(args.batch_size, 3, args.height, args.width, device=device)
    gmac = {name: count_gmac(model, pixel_values[:1]) for name, model in models.items()}

    offset_module = models[OFFSET].model.transformer_module.decoder.mask_predictor.offset_learning
    with ForwardTimer({"offset": offset_module}, device) as timer:
        times = measure(models, pixel_values, args.warmup, args.repeats)
    calls = timer.times["offset"]
    per_pass = len(calls) // (args.warmup + args.repeats)  # one call per mask prediction
    assert per_pass * (args.warmup + args.repeats) == len(calls), len(calls)
    offset_ms = median([sum(calls[i : i + per_pass]) for i in range(args.warmup * per_pass, len(calls), per_pass)])

    baseline = median(times[BASELINE])
    print(f"# {args.repeats} repeats after {args.warmup} warmup passes\n# {machine_line(device)}")
    columns = ["model", "params (M)", "paper params (M)", "GMAC", "median ms", "ratio", "offset ms (share)"]
    rows = []
    for name, model in models.items():
        ms = median(times[name])
        share = f"{offset_ms:.1f} ({100 * offset_ms / ms:.1f}%), {per_pass} calls" if name == OFFSET else "-"
        paper = paper_figures(name)
        rows.append(
            [name, f"{parameters_m(model):.3f}", f"{paper['params_m']:.1f}", f"{gmac[name]:.2f}", f"{ms:.1f}"]
            + [f"{ms / baseline:.3f}", share]
        )
    print_table(columns, rows)
    print(f"\ninput {'x'.join(map(str, pixel_values.shape))} fp32, {args.num_labels} labels")


if __name__ == "__main__":
    main()
