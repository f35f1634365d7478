"""The presets table of docs/presets.md: every preset's parameters and counted multiply-adds next to the paper's.

    python docs/make_presets_table.py                   # all 17 presets, 150 classes, 512x512 (minutes)
    python docs/make_presets_table.py --variants offseg-t segformer-b0-offset

Columns: parameters counted on the preset built here (150 classes, random weights); GMAC that
`torch.utils.flop_counter` counts in one 512x512 forward pass of this package's model (`offseg_hf.hub.repos.count_gmac`,
the figure the Hub cards print); the same count on the official mmseg modules (`offseg_hf.hub.repos.OFFICIAL_GMAC_150`,
measured once on them, "-" where none was); and the paper's parameters, GFLOPs and ADE20K mIoU
(`offseg_hf.presets.paper_figures`). Counts do not depend on the machine.
"""

from __future__ import annotations

import argparse

import torch

from offseg_hf.hub.repos import OFFICIAL_GMAC_150, count_gmac
from offseg_hf.presets import all_variant_names, model_for_variant, paper_figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=all_variant_names(), help="Presets (default: all).")
    args = parser.parse_args(argv)

    columns = [
        "variant",
        "params (M), ours",
        "params (M), paper",
        "GMAC, ours",
        "GMAC, official modules",
        "GFLOPs, paper",
        "ADE20K mIoU, paper",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for variant in args.variants:
        torch.manual_seed(0)
        model = model_for_variant(variant, num_labels=150).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gmac = count_gmac(model)
        paper = paper_figures(variant)
        official = OFFICIAL_GMAC_150.get(variant)
        cells = [
            f"`{variant}`",
            f"{params:.3f}",
            str(paper.get("params_m", "-")),
            f"{gmac:.2f}",
            f"{official:.2f}" if official is not None else "-",
            str(paper.get("gflops", "-")),
            str(paper.get("ade20k_miou", "-")),
        ]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
