"""Latency of this checkout against another one (e.g. the commit before a refactor), same weights, one process.

    git worktree add /tmp/before <commit>
    python benchmarks/against_checkout.py --before /tmp/before
    python benchmarks/against_checkout.py --before /tmp/before --variants offseg-t offseg-b --repeats 20
    python benchmarks/against_checkout.py --before /tmp/before --variants all --dtypes float32 float64 --repeats 0

Both versions of `offseg_hf` are imported side by side (the other one under another package name), every model (any
of the 17 presets, `--variants all`) is built by this checkout with a fixed seed and its weights are loaded into the
other version's model, which needs the two to share parameter names and the top-level `OffSegConfig.from_variant` and
model classes. The two models take turns, the order alternating every round, so drift in
machine load hits both alike. The table gives the median forward time of each, their ratio, and whether the two
produce bitwise equal logits (and their largest difference): a refactor that claims to keep the function should show
`True` and a ratio near 1; an optimisation that reorders float sums, a difference at float32 rounding level.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from common import add_allocator_argument, apply_allocator, machine_line, measure, median, print_table

from offseg_hf.presets import all_variant_names, model_for_variant


def import_checkout(root: Path, name: str = "offseg_hf_before"):
    """The `offseg_hf` package of another checkout, imported as `name` (its relative imports keep it whole)."""
    package = root / "offseg_hf"
    if not (package / "__init__.py").is_file():
        raise SystemExit(f"{root} has no offseg_hf package.")
    spec = importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_pair(before, variant: str, num_labels: int, dtype: torch.dtype):
    """(before model, after model) of a preset in eval mode and `dtype`, the same weights (built by this checkout)."""
    torch.manual_seed(0)
    after_model = model_for_variant(variant, num_labels=num_labels).eval().to(dtype)
    config = before.OffSegConfig.from_variant(variant, num_labels=num_labels)
    mask2former = isinstance(config, before.OffSegMask2FormerConfig)
    model_class = (
        before.OffSegMask2FormerForSemanticSegmentation if mask2former else before.OffSegForSemanticSegmentation
    )
    before_model = model_class(config).eval().to(dtype)
    before_model.load_state_dict(after_model.state_dict())
    return before_model, after_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, type=Path, help="Root of the other checkout (a git worktree).")
    parser.add_argument(
        "--variants", nargs="+", default=["segformer-b0-offset", "offseg-t", "offseg-b"], help="Presets, or 'all'."
    )
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--num_labels", type=int, default=150)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float64"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=12, help="Timed forward passes of each model (0: no timing).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_allocator_argument(parser)
    args = parser.parse_args(argv)
    apply_allocator(args.allocator)
    variants = all_variant_names() if args.variants == ["all"] else args.variants
    unknown = [v for v in variants if v not in all_variant_names()]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; known: {', '.join(all_variant_names())}")
    if args.threads:
        torch.set_num_threads(args.threads)
    before = import_checkout(args.before.resolve())

    rows = []
    for variant in variants:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            before_model, after_model = build_pair(before, variant, args.num_labels, dtype)
            pixel_values = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(0), dtype=dtype)
            with torch.inference_mode():
                before_logits, after_logits = before_model(pixel_values).logits, after_model(pixel_values).logits
                equal = torch.equal(before_logits, after_logits)
                largest = (before_logits - after_logits).abs().max().item()
            ms_before = ms_after = float("nan")
            if args.repeats:
                # measure() keeps one order in all its rounds: run it with each order for half the repeats, then pool.
                times = {"before": [], "after": []}
                for order in (("before", "after"), ("after", "before")):
                    models = {name: before_model if name == "before" else after_model for name in order}
                    for name, values in measure(models, pixel_values, args.warmup, (args.repeats + 1) // 2).items():
                        times[name] += values
                ms_before, ms_after = median(times["before"]), median(times["after"])
            rows.append(
                [
                    variant,
                    dtype_name,
                    f"{ms_before:.1f}",
                    f"{ms_after:.1f}",
                    f"{ms_after / ms_before:.3f}",
                    str(equal),
                    f"{largest:.1e}",
                ]
            )
            del before_model, after_model

    height, width = args.size
    print(f"# {height}x{width}, batch 1, {args.repeats} timed repeats each")
    print(f"# {machine_line(torch.device('cpu'))}")
    print(f"# before: {args.before}\n")
    columns = [
        "variant",
        "dtype",
        "before (ms)",
        "after (ms)",
        "after / before",
        "logits bitwise equal",
        "max abs diff",
    ]
    print_table(columns, rows)


if __name__ == "__main__":
    main()
