#!/usr/bin/env python
"""Evaluate a semantic-segmentation model with mmseg's protocol (the paper's), as training-time evaluation does.

    python examples/evaluate_segmentation.py --model_name_or_path outputs/demo-segformer-b0-offset --demo
    python examples/evaluate_segmentation.py --model_name_or_path converted/offseg-t \\
        --ade20k_root data/ADEChallengeData2016 --output_dir results/offseg-t --model_card converted/offseg-t/README.md

Each image is resized keeping its aspect ratio to `--eval_scale`, normalised, and run whole or in sliding windows
(`--eval_mode slide`: windows of `--eval_crop_size` every `--eval_stride`, overlapping logits averaged); the logits
are resized to the original image before the argmax, and mIoU / mAcc / aAcc come from one confusion matrix over
the split. The loop is `offseg_hf.evaluation.inference.evaluate_dataset`, the one `examples/train.py` evaluates with,
and
the protocol defaults to a training recipe's (`--recipe`: `demo` with `--demo`, `pascal-context-59-80k` with
`--pascal_context_root`, else `ade20k-160k`, the paper's protocol), so a training run's folder evaluated on its
held-out data gives exactly the figures training printed.

Prints a per-class table, writes `eval_results.json` into `--output_dir` (with `weights_sha256`, the fingerprint
of the evaluated weights that `push_to_hub.py` checks), and can write the result into a model card's
`model-index`. The data flags are `train.py`'s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForSemanticSegmentation

import offseg_hf  # noqa: F401  (registers OffSeg with the Auto classes)
from offseg_hf.data.datasets import (
    IGNORE_INDEX,
    SegmentationDataError,
    SegmentationDataset,
    labels_need_reducing,
    load_segmentation_splits,
)
from offseg_hf.data.transforms import EvalTransform
from offseg_hf.evaluation.inference import evaluate_dataset
from offseg_hf.hub.repos import eval_results, weights_fingerprint
from offseg_hf.models.local_paths import missing_folder_message
from offseg_hf.training import (
    DEFAULT_RECIPE,
    RECIPE_FIELDS,
    RECIPES,
    default_recipe,
    eval_protocol,
    format_metrics,
    resolve_settings,
    saved_model_family,
)

# The recipe fields that make up the evaluation protocol; each is a flag here, defaulting to --recipe's value.
PROTOCOL_FIELDS = (
    "eval_scale",
    "eval_mode",
    "eval_crop_size",
    "eval_stride",
    "per_device_eval_batch_size",
    "dataloader_num_workers",
)
DATA_SOURCES = ("dataset_name", "validation_dir", "ade20k_root", "pascal_context_root", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Saved model folder or Hub model id.")
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="Allow a Hub repo's own modeling code (without offseg_hf)."
    )
    parser.add_argument("--hub_token", default=None, help="Hub token for a private model (else the logged-in one).")

    data = parser.add_argument_group("data (exactly one source; the flags are train.py's)")
    data.add_argument(
        "--dataset_name",
        default=None,
        help="What datasets.load_dataset takes, with image + mask columns: a Hub id (one in the cache loads "
        "offline), a local folder in the Hub's layout (data/validation-*.parquet ..., its id2label.json if any) or a "
        "save_to_disk folder.",
    )
    data.add_argument("--dataset_config_name", default=None, help="Its configuration name.")
    data.add_argument("--image_column_name", default="image", help="Image column of the Hub data set.")
    data.add_argument("--label_column_name", default="annotation", help="Mask column of the Hub data set.")
    data.add_argument(
        "--validation_split",
        type=float,
        default=0.15,
        help="Share of a Hub data set's train split held out (seeded, as train.py does) when it has no validation "
        "split.",
    )
    data.add_argument(
        "--validation_dir", default=None, help="Folder with images/ and masks/ (see offseg_hf.data.datasets)."
    )
    data.add_argument("--ade20k_root", default=None, help="The ADEChallengeData2016 folder (or its parent).")
    data.add_argument(
        "--pascal_context_root",
        default=None,
        help="Pascal Context 59 in mmseg's layout: VOCdevkit/VOC2010 (or a parent).",
    )
    data.add_argument("--demo", action="store_true", help="The synthetic demo set's held-out split.")
    data.add_argument("--demo_image_size", type=int, default=None, help="Demo set: image side in pixels (train.py's).")
    data.add_argument("--demo_num_validation", type=int, default=None, help="Demo set: held-out images (train.py's).")
    data.add_argument("--seed", type=int, default=0, help="Seed of the demo set and of a held-out split (train.py's).")
    data.add_argument("--split", choices=("validation", "train"), default="validation", help="Split to evaluate.")
    data.add_argument(
        "--reduce_labels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Map id 0 to 255 and shift the others down (mmseg's reduce_zero_label). Default: on for ADE20K / "
        "scene_parse_150 and Pascal Context.",
    )
    data.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate only the first N images.")

    protocol = parser.add_argument_group("protocol (defaults from --recipe)")
    protocol.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default=None,
        help=f"Evaluate as this training recipe does; default {default_recipe(demo=True)} with --demo, "
        f"{default_recipe(demo=False, source='pascal_context_root')} with --pascal_context_root, else "
        f"{default_recipe(demo=False)} (the paper's protocol: scale 2048x512, slide, windows 512 every 480; whole "
        "images for SegNeXt, whose official configs test ADE20K and COCO-Stuff that way).",
    )
    for name in PROTOCOL_FIELDS:
        field = RECIPE_FIELDS[name]
        pair = isinstance(RECIPES[DEFAULT_RECIPE][name], tuple)
        protocol.add_argument(
            f"--{name}",
            type=int if name != "eval_mode" else str,
            nargs=2 if pair else None,
            metavar=field.metavar,
            choices=field.choices,
            default=None,
            help=f"{field.help} Default: the recipe's.",
        )
    protocol.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Where the model runs."
    )

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default=None, help="Write eval_results.json into this folder.")
    output.add_argument("--model_card", default=None, help="README.md whose model-index metadata gets the result.")
    output.add_argument(
        "--dataset_pretty_name",
        default=None,
        help="Data set name shown on the card (default: the Hub id, ADE20K, Pascal Context 59, the folder name, "
        "or offseg-demo).",
    )
    return parser


def check_data_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The data-flag checks of every script that reads one split: exactly one source, its folder exists, demo-set
    flags only with --demo. Sets `args.data_source` (the source's flag name) and returns the demo-set flags given
    (for their own range checks)."""
    sources = [name for name in DATA_SOURCES if getattr(args, name) not in (None, False)]
    if len(sources) != 1:
        names = [f"--{name}" for name in DATA_SOURCES]
        parser.error(f"give exactly one data source: {', '.join(names[:-1])} or {names[-1]}.")
    args.data_source = sources[0]
    for name in ("validation_dir", "ade20k_root", "pascal_context_root"):
        if getattr(args, name) is not None and not Path(getattr(args, name)).is_dir():
            parser.error(f"--{name} {getattr(args, name)} is not a folder.")
    if args.dataset_name and (message := missing_folder_message(args.dataset_name, "--dataset_name")):
        parser.error(message)
    demo_flags = [name for name in ("demo_image_size", "demo_num_validation") if getattr(args, name) is not None]
    if demo_flags and not args.demo:
        parser.error(f"--{demo_flags[0]} describes the demo set; this run reads --{sources[0]}.")
    return demo_flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument before any work; a bad one ends the script with one line. Adds `settings`
    (the recipe's values with the protocol flags on top)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    demo_flags = check_data_flags(parser, args)
    for name in (*demo_flags, "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if not 0 < args.validation_split < 1:
        parser.error(f"--validation_split must be in (0, 1), got {args.validation_split}.")
    if args.recipe is None:
        args.recipe = default_recipe(args.demo, args.data_source)
    if message := missing_folder_message(args.model_name_or_path, "--model_name_or_path"):
        parser.error(message)
    try:
        family = saved_model_family(args.model_name_or_path, token=args.hub_token)
        args.settings = resolve_settings({name: getattr(args, name) for name in PROTOCOL_FIELDS}, args.recipe, family)
    except ValueError as error:
        parser.error(str(error))
    return args


def load_split(args, num_labels: int):
    """The split to evaluate as a `datasets.Dataset`, its id2label and whether labels are reduced."""
    reduce = args.reduce_labels
    if reduce is None:
        reduce = labels_need_reducing(
            dataset_name=args.dataset_name, ade20k_root=args.ade20k_root, pascal_context_root=args.pascal_context_root
        )
    # The held-out scenes do not depend on how many training scenes there are: make none unless they are evaluated.
    demo_options = {"num_train": 0} if args.split == "validation" else {}
    if args.demo_image_size is not None:
        demo_options["image_size"] = args.demo_image_size
    if args.demo_num_validation is not None:
        demo_options["num_validation"] = args.demo_num_validation
    splits, id2label = load_segmentation_splits(
        dataset_name=args.dataset_name,
        train_dir=args.validation_dir,  # one folder is the only split, whichever --split names
        validation_dir=args.validation_dir,
        ade20k_root=args.ade20k_root,
        pascal_context_root=args.pascal_context_root,
        demo=args.demo,
        seed=args.seed,
        num_labels=num_labels,
        do_reduce_labels=reduce,
        dataset_config_name=args.dataset_config_name,
        image_column=args.image_column_name,
        label_column=args.label_column_name,
        validation_split=args.validation_split,
        demo_options=demo_options if args.demo else None,
    )
    split = splits[args.split]
    if args.max_eval_samples is not None:
        split = split.select(range(min(args.max_eval_samples, len(split))))
    return split, id2label, reduce


def print_table(result: dict, id2label: dict[int, str]) -> None:
    width = max(len(name) for name in id2label.values())
    print(f"\n{'class':<{width}}  {'IoU':>6}  {'Acc':>6}")
    for index, name in sorted(id2label.items()):
        iou, acc = result["per_category_iou"][index], result["per_category_accuracy"][index]
        cells = ["   n/a" if math.isnan(v) else f"{100 * v:6.2f}" for v in (iou, acc)]
        print(f"{name:<{width}}  {cells[0]}  {cells[1]}")
    print(f"\n{format_metrics(result)}  ({result['num_images']} images)")


def dataset_names(args) -> tuple[str, str]:
    """(Hub id or stand-in, name shown) of the evaluated data, for a model card."""
    if args.dataset_name and Path(os.path.expanduser(args.dataset_name)).is_dir():
        dataset_name = pretty = Path(os.path.expanduser(args.dataset_name)).resolve().name  # no path into a card
    elif args.dataset_name:
        dataset_name = pretty = args.dataset_name
    elif args.ade20k_root:
        dataset_name, pretty = "scene_parse_150", "ADE20K"  # the Hub's copy of ADEChallengeData2016
    elif args.pascal_context_root:
        dataset_name, pretty = "pascal_context", "Pascal Context 59"  # no Hub copy: the paper-figure key of the cards
    elif args.validation_dir:
        dataset_name = pretty = Path(args.validation_dir).resolve().name
    else:
        dataset_name = pretty = "offseg-demo"
    return dataset_name, args.dataset_pretty_name or pretty


def write_model_index(card_path: str, model_name: str, dataset_name: str, pretty_name: str, result: dict) -> None:
    """Put the measured mIoU/mAcc/aAcc into the card's model-index (creating the card if needed)."""
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard.load(card_path) if os.path.exists(card_path) else ModelCard(f"# {model_name}\n")
    data = card.data if isinstance(card.data, ModelCardData) else ModelCardData(**card.data.to_dict())
    data.model_name = data.model_name or model_name
    data.eval_results = eval_results(result, dataset_name, pretty_name)
    card.data = data
    card.save(card_path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    protocol = eval_protocol(args.settings)
    model = AutoModelForSemanticSegmentation.from_pretrained(
        args.model_name_or_path, trust_remote_code=args.trust_remote_code, token=args.hub_token
    ).to(args.device)
    num_labels = model.config.num_labels
    split, id2label, reduce = load_split(args, num_labels)
    dataset = SegmentationDataset(
        split, EvalTransform(scale=protocol.scale), num_labels=num_labels, do_reduce_labels=reduce, split=args.split
    )
    start = time.perf_counter()
    metrics = evaluate_dataset(
        model,
        dataset,
        num_labels,
        ignore_index=IGNORE_INDEX,
        **protocol.inference_kwargs(),
        num_workers=args.settings["dataloader_num_workers"],
        progress=True,
    )
    result = metrics.compute()
    names = {int(k): v for k, v in model.config.id2label.items()}
    if all(name == f"LABEL_{index}" for index, name in names.items()):  # transformers' placeholders: the data's
        names = {int(k): v for k, v in id2label.items()}
    result |= {
        "num_pixels": int(metrics.confusion.sum()),
        "num_images": len(dataset),
        "seconds": round(time.perf_counter() - start, 2),
        "model": args.model_name_or_path,
        "weights_sha256": weights_fingerprint(model),  # push_to_hub.py checks results against the weights
        "split": args.split,
        "recipe": args.recipe,
        "eval_protocol": asdict(protocol),  # as train.py records it
        "measured_by": "examples/evaluate_segmentation.py",
        "class_names": [names[i] for i in range(num_labels)],
    }
    print_table(result, names)
    if args.output_dir:
        path = Path(args.output_dir) / "eval_results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    if args.model_card:
        model_name = os.path.basename(args.model_name_or_path.rstrip("/"))
        write_model_index(args.model_card, model_name, *dataset_names(args), result)
        print(f"wrote model-index into {args.model_card}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (SegmentationDataError, FileNotFoundError) as error:  # a bad sample, a missing file: the user's to fix
        sys.exit(f"error: {error}")
