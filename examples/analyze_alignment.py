#!/usr/bin/env python
"""Ideal class representation mining (the paper's Sec. 3.2, Eq. 2, Fig. 3) for a trained model and its data.

    python examples/analyze_alignment.py --model_name_or_path outputs/demo-segformer-b0-offset --demo \\
        --output_dir results/alignment
    python examples/analyze_alignment.py --model_name_or_path converted/offseg-t \\
        --ade20k_root data/ADEChallengeData2016 --classes building sky floor tree person glass \\
        --num_images 500 --output_dir results/alignment-offseg-t

For each of the first `--num_images` images of the split: the pixel embeddings E the classifier sees, the
ground-truth masks M at the embedding resolution (majority vote per cell, ignore cells left out), the ideal class
representations W* = M (E^T)^+ of the classes present, and the reconstruction argmax(W* E^T) with its IoUs; for an
offset model also the image's W + dW and ||dE|| / ||E||. Then, per chosen class (`--classes`, default the
`--num_classes` classes present in the most images), over the first `--images_per_class` images containing it:
the pairwise cosine similarity of W* across images (Fig. 3), its mean off the diagonal, and the mean cosine
similarity of W* to the model's fixed W and, for offset models, to the image's W + dW.

Writes `alignment.json` (every figure) and `alignment.png` (one heatmap per class) into `--output_dir`. Images
are resized and normalised by `--recipe`'s evaluation scale (the `demo` recipe with `--demo`, pascal-context-59-80k
with `--pascal_context_root`, else ade20k-160k) and run whole. The data flags are `evaluate_segmentation.py`'s.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSemanticSegmentation

import offseg_hf  # noqa: F401  (registers OffSeg with the Auto classes)
from offseg_hf.analysis import (
    analyse_image,
    class_statistics,
    classifier_weights,
    default_classes,
    reconstruction_summary,
)
from offseg_hf.data.datasets import IGNORE_INDEX, SegmentationDataError, SegmentationDataset
from offseg_hf.data.transforms import EvalTransform
from offseg_hf.training import RECIPE_FIELDS, RECIPES, default_recipe, resolve_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate_segmentation  # noqa: E402  (one set of data flags and one data loader for both scripts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Saved model folder (OffSeg, any classifier).")

    # The data flags are evaluate_segmentation.py's own argparse actions, so the two scripts cannot drift apart;
    # its --max_eval_samples is this script's --num_images.
    data = parser.add_argument_group("data (exactly one source; the flags are evaluate_segmentation.py's)")
    source = next(g for g in evaluate_segmentation.build_parser()._action_groups if g.title.startswith("data"))
    for action in source._group_actions:
        if action.dest != "max_eval_samples":
            data._add_action(action)

    analysis = parser.add_argument_group("analysis")
    analysis.add_argument(
        "--num_images", type=int, default=100, help="Analyse the first N images of the split (default 100)."
    )
    analysis.add_argument(
        "--classes",
        nargs="+",
        default=None,
        metavar="NAME",
        help="Class names to compare across images (Fig. 3); default: the --num_classes classes present in the most "
        "analysed images.",
    )
    analysis.add_argument(
        "--num_classes", type=int, default=6, help="How many classes to pick without --classes (default 6, as Fig. 3)."
    )
    analysis.add_argument(
        "--images_per_class",
        type=int,
        default=10,
        help="Per class, use the first M analysed images that contain it (default 10, as Fig. 3).",
    )
    analysis.add_argument(
        "--rcond",
        type=float,
        default=None,
        help="Truncate the pseudoinverse: singular values of E below RCOND x the largest count as zero. Default: "
        "none, Eq. 2 as written (it weights W* toward E's directions of least variance).",
    )
    analysis.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default=None,
        help=f"Resize images by this training recipe's evaluation scale; default {default_recipe(demo=True)} with "
        f"--demo, {default_recipe(demo=False, source='pascal_context_root')} with --pascal_context_root, else "
        f"{default_recipe(demo=False)}.",
    )
    analysis.add_argument(
        "--eval_scale",
        type=int,
        nargs=2,
        default=None,
        metavar=RECIPE_FIELDS["eval_scale"].metavar,
        help=f"{RECIPE_FIELDS['eval_scale'].help} Default: the recipe's.",
    )
    analysis.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Where the model runs."
    )
    analysis.add_argument(
        "--output_dir", required=True, help="Folder for alignment.json and alignment.png (created if needed)."
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument before any work; a bad one ends the script with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not Path(args.model_name_or_path).is_dir():
        parser.error(f"--model_name_or_path {args.model_name_or_path} is not a folder.")
    demo_flags = evaluate_segmentation.check_data_flags(parser, args)
    for name in (*demo_flags, "num_images", "num_classes", "images_per_class"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if args.rcond is not None and not 0 <= args.rcond < 1:
        parser.error(f"--rcond must be in [0, 1), got {args.rcond}.")
    if args.images_per_class < 2:
        parser.error("--images_per_class must be at least 2: similarity across images needs two.")
    if not 0 < args.validation_split < 1:
        parser.error(f"--validation_split must be in (0, 1), got {args.validation_split}.")
    if args.classes is not None and len(set(args.classes)) != len(args.classes):
        parser.error("--classes names a class twice.")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output_dir {args.output_dir} exists and is not a folder.")
    if args.recipe is None:
        args.recipe = default_recipe(args.demo, args.data_source)
    try:
        args.settings = resolve_settings({"eval_scale": args.eval_scale}, args.recipe)
    except ValueError as error:
        parser.error(str(error))
    # Class names are checked against the model's config now, before the model or any image is loaded; a model
    # with transformers' placeholder names is checked against the data's names once they are read.
    names = {int(k): v for k, v in AutoConfig.from_pretrained(args.model_name_or_path).id2label.items()}
    if args.classes is not None and not has_placeholder_names(names):
        try:
            resolve_classes(args.classes, names)
        except ValueError as error:
            parser.error(str(error))
    # evaluate_segmentation.load_split reads these; this script always takes the first --num_images.
    args.max_eval_samples = args.num_images
    return args


def has_placeholder_names(names: dict[int, str]) -> bool:
    return all(name == f"LABEL_{index}" for index, name in names.items())


def class_names(model, id2label: dict[int, str]) -> dict[int, str]:
    """The model's class names, or the data's where the model has transformers' placeholders."""
    names = {int(k): v for k, v in model.config.id2label.items()}
    return {int(k): v for k, v in id2label.items()} if has_placeholder_names(names) else names


def resolve_classes(requested: list[str], names: dict[int, str]) -> list[int]:
    """Class ids of `requested` names (exact, then case-insensitive); ValueError naming the unknown ones."""
    exact = {name: index for index, name in names.items()}
    folded = {name.lower(): index for index, name in names.items()}
    ids, unknown = [], []
    for name in requested:
        index = exact.get(name, folded.get(name.lower()))
        (unknown if index is None else ids).append(name if index is None else index)
    if unknown:
        known = ", ".join(names[k] for k in sorted(names))
        raise ValueError(f"unknown class name(s) {', '.join(unknown)}; the model's classes: {known}.")
    return ids


def plot_heatmaps(statistics: dict, path: Path, title: str) -> None:
    """One heatmap per class, as Fig. 3: pairwise cosine similarity of W* across images, one colour bar each."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    count = len(statistics)
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 4.2 * rows), squeeze=False)
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    for axis, (name, entry) in zip(axes.flat, statistics.items(), strict=False):
        matrix = entry["similarity"]
        if not matrix:
            axis.set_title(f"{name}: in none of the analysed images", fontsize=10)
            axis.set_xlabel("image")
            axis.set_ylabel("image")
            continue
        # A fixed range, so that colours mean the same in every panel and in every run.
        image = axis.imshow(matrix, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
        mean = entry["mean_intra_class_similarity"]
        subtitle = "n/a" if mean is None else f"{mean:.2f}"
        axis.set_title(f"{name} (n={len(matrix)}, mean off-diag {subtitle})", fontsize=10)
        axis.set_xlabel("image (index in the split)")
        axis.set_ylabel("image (index in the split)")
        ticks = list(range(len(matrix)))
        axis.set_xticks(ticks, [str(i) for i in entry["images"]], fontsize=7, rotation=90)
        axis.set_yticks(ticks, [str(i) for i in entry["images"]], fontsize=7)
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="cosine similarity of W*")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model = AutoModelForSemanticSegmentation.from_pretrained(args.model_name_or_path).to(args.device).eval()
    num_labels = model.config.num_labels
    split, id2label, reduce = evaluate_segmentation.load_split(args, num_labels)
    names = class_names(model, id2label)
    try:
        requested = None if args.classes is None else resolve_classes(args.classes, names)
    except ValueError as error:
        raise SystemExit(f"analyze_alignment.py: error: {error}") from None
    dataset = SegmentationDataset(
        split,
        EvalTransform(scale=tuple(args.settings["eval_scale"])),
        num_labels=num_labels,
        do_reduce_labels=reduce,
        split=args.split,
    )
    fixed, kind = classifier_weights(model)

    results = []
    for index in tqdm(range(len(dataset)), desc="W* per image", unit="image"):
        sample = dataset[index]
        results.append(analyse_image(model, sample["pixel_values"], sample["labels"], IGNORE_INDEX, index, args.rcond))

    chosen = requested if requested is not None else default_classes(results, args.num_classes)
    statistics = {
        names[k]: class_statistics(results, k, fixed, max_images=args.images_per_class).to_dict() for k in chosen
    }
    reconstruction = reconstruction_summary(results, num_labels)
    reconstruction["per_class_iou"] = {names[k]: v for k, v in reconstruction["per_class_iou"].items()}
    ratios = [r.feature_offset_ratio for r in results if r.feature_offset_ratio is not None]

    def overall(key: str) -> float | None:
        values = [entry[key] for entry in statistics.values() if entry[key] is not None]
        return sum(values) / len(values) if values else None

    report = {
        "model": args.model_name_or_path,
        "classifier": kind,
        "class_offset": bool(getattr(model.config, "class_offset", False)) and kind == "offset",
        "feature_offset": bool(getattr(model.config, "feature_offset", False)) and kind == "offset",
        "channels": int(fixed.shape[1]),
        "split": args.split,
        "recipe": args.recipe,
        "eval_scale": list(args.settings["eval_scale"]),
        "mask_resolution": "majority vote per embedding cell; cells whose majority is the ignore label left out",
        "num_images": len(results),
        # With no more positions than channels E^T generically has full column rank and any mask is fitted
        # exactly, so the reconstruction says nothing about the features there.
        "images_with_positions_at_most_channels": sum(r.num_positions <= fixed.shape[1] for r in results),
        "images_per_class": args.images_per_class,
        "rcond": args.rcond,
        "reconstruction": reconstruction,
        "feature_offset_ratio": {"mean": sum(ratios) / len(ratios), "per_image": ratios} if ratios else None,
        "summary": {
            "mean_intra_class_similarity": overall("mean_intra_class_similarity"),
            "mean_similarity_to_W": overall("mean_similarity_to_W"),
            "mean_similarity_to_W_plus_dW": overall("mean_similarity_to_W_plus_dW"),
        },
        "classes": statistics,
        "images": [
            {
                "index": r.index,
                "classes": [names[k] for k in r.classes],
                "ious": r.ious,
                "reconstruction_miou": None if math.isnan(r.miou) else r.miou,
                "positions": r.num_positions,
                "rank_of_E": r.rank,
                "feature_offset_ratio": r.feature_offset_ratio,
            }
            for r in results
        ],
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "alignment.json").write_text(json.dumps(report, indent=2))
    title = f"Ideal class representations W*: cosine similarity across images ({Path(args.model_name_or_path).name}"
    title += ")" if args.rcond is None else f", pseudoinverse cut at rcond {args.rcond})"
    plot_heatmaps(statistics, output_dir / "alignment.png", title)
    print_summary(report)
    print(f"wrote {output_dir / 'alignment.json'} and {output_dir / 'alignment.png'}")
    return report


def print_summary(report: dict) -> None:
    def show(value) -> str:
        return "   n/a" if value is None else f"{value:6.3f}"

    recon = report["reconstruction"]
    print(f"\nreconstruction mIoU {show(recon['miou'])}  (mean per image {show(recon['mean_image_miou'])})")
    exact = report["images_with_positions_at_most_channels"]
    if exact and report["rcond"] is None:  # a truncated pseudoinverse fits with fewer directions than positions
        print(
            f"note: {exact} of {report['num_images']} images have no more embedding positions than the "
            f"{report['channels']} channels: any mask is reconstructed exactly there (use larger images)."
        )
    if report["feature_offset_ratio"] is not None:
        print(f"||dE|| / ||E||      {show(report['feature_offset_ratio']['mean'])}")
    width = max([len(name) for name in report["classes"]] + [5])
    print(f"\n{'class':<{width}}  images  intra-class  cos(W*, W)  cos(W*, W+dW)")
    for name, entry in report["classes"].items():
        print(
            f"{name:<{width}}  {entry['num_images']:6d}  {show(entry['mean_intra_class_similarity']):>11}  "
            f"{show(entry['mean_similarity_to_W']):>10}  {show(entry['mean_similarity_to_W_plus_dW']):>13}"
        )


if __name__ == "__main__":
    try:
        main()
    except (SegmentationDataError, FileNotFoundError) as error:  # a bad sample, a missing file: the user's to fix
        sys.exit(f"error: {error}")
