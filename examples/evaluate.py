"""Evaluate a semantic-segmentation model with mmseg's protocol (the paper's).

    python examples/evaluate.py --model_name_or_path outputs/demo --demo
    python examples/evaluate.py --model_name_or_path converted/offseg-t --ade20k_root data/ADEChallengeData2016 \
        --output_file results/offseg-t-ade20k.json --model_card converted/offseg-t/README.md

Each image is resized keeping its aspect ratio to the `--scale` (2048, 512), normalised, and run whole or in
sliding windows (`--mode slide`, crop 512, stride 480, overlapping logits averaged); the logits are resized to
the original image before the argmax. mIoU / mAcc / aAcc come from one confusion matrix over the whole split
(`offseg_hf.metrics`). Consecutive images of equal size after the resize run in one batch (`--batch_size`;
windows of one image batch too). Prints a per-class table, writes JSON (with `weights_sha256`, the fingerprint of
the evaluated weights that `push_to_hub.py` checks), and can write the result into a model card's `model-index`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSemanticSegmentation

import offseg_hf  # noqa: F401  (registers OffSeg with the Auto classes)
from offseg_hf.data import SegmentationDataset, labels_need_reducing, load_segmentation_splits
from offseg_hf.hub import weights_fingerprint
from offseg_hf.inference import DEFAULT_CROP, DEFAULT_SCALE, DEFAULT_STRIDE, predict_labels
from offseg_hf.metrics import SegmentationMetrics
from offseg_hf.training import RECIPES
from offseg_hf.transforms import EvalTransform


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Saved model folder or Hub id.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Load a Hub repo's code without offseg_hf.")
    data = parser.add_argument_group("data (one source, as in train.py)")
    data.add_argument("--dataset_name", default=None, help="Hub data set (scene_parse_150 schema; network).")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--data_dir", default=None, help="Folder with images/ and masks/ (see offseg_hf.data).")
    data.add_argument("--ade20k_root", default=None, help="The ADEChallengeData2016 folder (or its parent).")
    data.add_argument("--demo", action="store_true", help="The synthetic demo set's held-out split.")
    data.add_argument("--seed", type=int, default=0, help="Seed of the demo set.")
    data.add_argument("--split", default="validation")
    data.add_argument(
        "--reduce_labels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ADE20K label rule (default: on for ADE20K / scene_parse_150).",
    )
    data.add_argument("--max_samples", type=int, default=None, help="Evaluate only the first N images.")
    protocol = parser.add_argument_group("protocol (mmseg defaults)")
    protocol.add_argument("--mode", choices=("slide", "whole"), default="slide")
    protocol.add_argument(
        "--scale",
        type=int,
        nargs=2,
        default=None,
        help=f"Keep-ratio resize scale (default {DEFAULT_SCALE}; the demo recipe's eval scale for --demo).",
    )
    protocol.add_argument("--crop_size", type=int, nargs=2, default=list(DEFAULT_CROP))
    protocol.add_argument("--stride", type=int, nargs=2, default=list(DEFAULT_STRIDE))
    protocol.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    protocol.add_argument(
        "--batch_size", type=int, default=4, help="Images per forward pass (consecutive images of equal size)."
    )
    protocol.add_argument("--num_workers", type=int, default=2, help="DataLoader workers decoding images.")
    output = parser.add_argument_group("output")
    output.add_argument("--output_file", default=None, help="Write the results as JSON here.")
    output.add_argument("--model_card", default=None, help="README.md whose model-index metadata gets the result.")
    output.add_argument("--dataset_label", default=None, help="Dataset name for the card (default: the source).")
    args = parser.parse_args(argv)
    if (
        sum(x is not None and x is not False for x in (args.dataset_name, args.data_dir, args.ade20k_root, args.demo))
        != 1
    ):
        parser.error("give exactly one of --dataset_name, --data_dir, --ade20k_root, --demo")
    return args


def load_split(args, num_labels: int):
    source = {
        "dataset_name": args.dataset_name,
        "train_dir": args.data_dir,
        "validation_dir": args.data_dir,
        "ade20k_root": args.ade20k_root,
        "demo": args.demo,
    }
    reduce = args.reduce_labels
    if reduce is None:
        reduce = labels_need_reducing(dataset_name=args.dataset_name, ade20k_root=args.ade20k_root)
    splits, id2label = load_segmentation_splits(
        **source,
        seed=args.seed,
        num_labels=num_labels,
        do_reduce_labels=reduce,
        dataset_config_name=args.dataset_config_name,
    )
    split = splits[args.split]
    if args.max_samples is not None:
        split = split.select(range(min(args.max_samples, len(split))))
    return split, id2label, reduce


def same_size_batches(dataset, batch_size: int, num_workers: int):
    """Samples in order, consecutive ones of equal size after the resize grouped into batches of up to
    `batch_size` (most ADE20K images are 4:3 and all become 512x683). Images decode in `num_workers` workers."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    batch = []
    for sample in loader:
        if batch and (len(batch) == batch_size or sample["pixel_values"].shape != batch[0]["pixel_values"].shape):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


def evaluate(model, dataset, args, num_labels: int) -> dict:
    metrics = SegmentationMetrics(num_labels=num_labels, ignore_index=model.config.semantic_loss_ignore_index)
    start = time.perf_counter()
    progress = tqdm(total=len(dataset), desc=f"{args.mode} inference", unit="img")
    for batch in same_size_batches(dataset, args.batch_size, args.num_workers):
        pixel_values = torch.stack([sample["pixel_values"] for sample in batch]).to(args.device)
        predictions = predict_labels(
            model,
            pixel_values,
            [tuple(sample["labels"].shape) for sample in batch],
            args.mode,
            num_labels,
            tuple(args.crop_size),
            tuple(args.stride),
        )
        for prediction, sample in zip(predictions, batch, strict=True):
            metrics.update(prediction.cpu(), sample["labels"])
        progress.update(len(batch))
    progress.close()
    result = metrics.compute()
    result["num_images"] = len(dataset)
    result["seconds"] = time.perf_counter() - start
    return result


def print_table(result: dict, id2label: dict[int, str]) -> None:
    width = max(len(name) for name in id2label.values())
    print(f"\n{'class':<{width}}  {'IoU':>6}  {'Acc':>6}")
    for index, name in sorted(id2label.items()):
        iou, acc = result["per_category_iou"][index], result["per_category_accuracy"][index]
        cells = ["   n/a" if math.isnan(v) else f"{100 * v:6.2f}" for v in (iou, acc)]
        print(f"{name:<{width}}  {cells[0]}  {cells[1]}")
    print(
        f"\nmIoU {100 * result['mean_iou']:.2f}  mAcc {100 * result['mean_accuracy']:.2f}  "
        f"aAcc {100 * result['overall_accuracy']:.2f}  ({result['num_images']} images)"
    )


def write_model_index(card_path: str, model_name: str, dataset_name: str, result: dict, mode: str) -> None:
    """Put the measured mIoU/mAcc/aAcc into the card's model-index (creating the card if needed)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    card = ModelCard.load(card_path) if os.path.exists(card_path) else ModelCard(f"# {model_name}\n")
    data = card.data if isinstance(card.data, ModelCardData) else ModelCardData(**card.data.to_dict())
    results = [
        EvalResult(
            task_type="image-segmentation",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            metric_type=metric,
            metric_name=label,
            metric_value=round(100 * result[key], 2),
            dataset_split="validation",
        )
        for metric, label, key in (
            ("mean_iou", "mIoU", "mean_iou"),
            ("accuracy", "mAcc", "mean_accuracy"),
            ("accuracy", "aAcc", "overall_accuracy"),
        )
    ]
    data.model_name = data.model_name or model_name
    data.eval_results = results
    card.data = data
    card.save(card_path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.scale is None:
        args.scale = list(RECIPES["demo"]["eval_scale"] if args.demo else DEFAULT_SCALE)
    model = (
        AutoModelForSemanticSegmentation.from_pretrained(
            args.model_name_or_path, trust_remote_code=args.trust_remote_code
        )
        .to(args.device)
        .eval()
    )
    num_labels = model.config.num_labels
    split, id2label, reduce = load_split(args, num_labels)
    dataset = SegmentationDataset(
        split,
        EvalTransform(scale=tuple(args.scale)),
        num_labels=num_labels,
        do_reduce_labels=reduce,
        split=args.split,
    )
    result = evaluate(model, dataset, args, num_labels)
    names = model.config.id2label or id2label
    print_table(result, {int(k): v for k, v in names.items()})
    result |= {
        "model": args.model_name_or_path,
        "weights_sha256": weights_fingerprint(model),  # push_to_hub.py checks results against the weights
        "mode": args.mode,
        "scale": args.scale,
        "crop_size": args.crop_size,
        "stride": args.stride,
        "class_names": [names[i] for i in range(num_labels)],
    }
    if args.output_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
        with open(args.output_file, "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {args.output_file}")
    if args.model_card:
        source = args.dataset_label or args.dataset_name or ("ade20k" if args.ade20k_root else "offseg-demo")
        write_model_index(
            args.model_card, os.path.basename(args.model_name_or_path.rstrip("/")), source, result, args.mode
        )
        print(f"wrote model-index into {args.model_card}")
    return result


if __name__ == "__main__":
    main()
