"""SegNeXt-T/S/B with offset learning and per-pixel, against transformers' SegFormer-B0, in one run: parameters,
FLOPs next to the paper's Table 3, latency, the NMF's share of it and what offset learning costs.

    python benchmarks/segnext.py                      # 512x512, batch 1, fp32, CPU, all six presets
    python benchmarks/segnext.py --variants segnext-t-offset segnext-t --height 1024 --width 2048 --repeats 5
    python benchmarks/segnext.py --device cuda --repeats 50 --threads 2

Rows:
  hf-segformer-b0      transformers' SegformerForSemanticSegmentation (MiT-B0, decoder 256): the baseline every
                       "ratio vs HF" is taken against.
  segnext-X-offset     SegNeXt-X (MSCAN-X encoder, LightHam decoder with NMF at 1/8) with offset learning.
  segnext-X            the same SegNeXt-X with the per-pixel 1x1 classifier, the paper's baseline for it.

Columns:
  GMAC (ours)          what `torch.utils.flop_counter` counts (FLOPs / 2) on one image through our model.
  GMAC (official)      the official mmseg modules counted the same way (`offseg_hf.hub.repos.OFFICIAL_GMAC_150`); only
  at
                       512x512 with 150 labels, "-" otherwise. Paper GFLOPs likewise only at 512x512.
  median ms            median over `--repeats` timed forward passes per model, after `--warmup` untimed ones; the
                       models take turns within each round, so drift in machine load hits all of them alike.
  NMF ms (share)       time inside the LightHam decoder's NMF (`decode_head.hamburger.nmf`) during those same timed
                       passes, from forward pre/post hooks on it (median, and its share of the model's median).
  offset / per-pixel   segnext-X-offset's median over segnext-X's, both from this run: the cost of offset learning.
"""

from __future__ import annotations

import argparse

import torch
from common import (
    HF_SEGFORMER_B0,
    HF_SEGFORMER_B0_PAPER,
    ForwardTimer,
    add_input_arguments,
    count_gmac,
    hf_segformer_b0,
    machine_line,
    measure,
    median,
    parameters_m,
    print_table,
)

from offseg_hf import PAPER_FIGURES, OffSegConfig, OffSegForSemanticSegmentation
from offseg_hf.hub.repos import OFFICIAL_GMAC_150

VARIANTS = ("segnext-t-offset", "segnext-t", "segnext-s-offset", "segnext-s", "segnext-b-offset", "segnext-b")
PAPER = {HF_SEGFORMER_B0: HF_SEGFORMER_B0_PAPER} | {v: PAPER_FIGURES[v] for v in VARIANTS}


def build(name: str, num_labels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == HF_SEGFORMER_B0:
        return hf_segformer_b0(num_labels)
    return OffSegForSemanticSegmentation(OffSegConfig.from_variant(name, num_labels=num_labels))


def per_pixel_of(name: str) -> str | None:
    """segnext-X for segnext-X-offset, None for the others."""
    return name.removesuffix("-offset") if name.endswith("-offset") else None


def family(name: str) -> str:
    return "SegFormer-B0 (transformers)" if name == HF_SEGFORMER_B0 else f"SegNeXt-{name.split('-')[1].upper()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser, warmup=2, repeats=15)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), metavar="VARIANT")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    names = [HF_SEGFORMER_B0, *dict.fromkeys(args.variants)]
    models = {name: build(name, args.num_labels).eval().to(device) for name in names}
    pixel_values = torch.randn(args.batch_size, 3, args.height, args.width, device=device)
    gmac = {name: count_gmac(model, pixel_values[:1]) for name, model in models.items()}

    # Hooks on the NMFs only (never the baseline), present for exactly the passes `measure` runs.
    nmfs = {name: models[name].offseg.decode_head.hamburger.nmf for name in names[1:]}
    with ForwardTimer(nmfs, device) as nmf_timer:
        times = measure(models, pixel_values, args.warmup, args.repeats)
    assert not any(nmf._forward_pre_hooks or nmf._forward_hooks for nmf in nmfs.values()), "NMF hooks left behind"
    nmf_ms = {}
    for name, calls in nmf_timer.times.items():
        assert len(calls) == args.warmup + args.repeats, f"{name}: {len(calls)} NMF calls"
        nmf_ms[name] = median(calls[args.warmup :])  # the timed passes, after the warmup ones

    at_official_setting = (args.height, args.width, args.num_labels) == (512, 512, 150)
    baseline = median(times[HF_SEGFORMER_B0])
    print(f"# {args.repeats} repeats after {args.warmup} warmup passes\n# {machine_line(device)}")
    columns = ["model", "params (M)", "paper params (M)", "GMAC (ours)", "GMAC (official)", "paper GFLOPs"]
    columns += ["median ms", "ratio vs HF", "NMF ms (share)", "offset / per-pixel"]
    rows = []
    for name, model in models.items():
        ms = median(times[name])
        official = OFFICIAL_GMAC_150.get(name) if at_official_setting else None
        per_pixel = per_pixel_of(name)
        rows.append(
            [
                name,
                f"{parameters_m(model):.3f}",
                f"{PAPER[name]['params_m']:.1f}",
                f"{gmac[name]:.2f}",
                f"{official:.2f}" if official is not None else "-",
                f"{PAPER[name]['gflops']:.1f}" if (args.height, args.width) == (512, 512) else "-",
                f"{ms:.1f}",
                f"{ms / baseline:.3f}",
                f"{nmf_ms[name]:.1f} ({100 * nmf_ms[name] / ms:.1f}%)" if name in nmf_ms else "-",
                f"{ms / median(times[per_pixel]):.3f}" if per_pixel in times else "-",
            ]
        )
    print_table(columns, rows)

    shape = "x".join(map(str, pixel_values.shape))
    print()
    for group in dict.fromkeys(map(family, names)):
        members = ", ".join(name for name in names if family(name) == group)
        print(f"{group} [{members}]: input {shape} fp32, {args.num_labels} labels")


if __name__ == "__main__":
    main()
