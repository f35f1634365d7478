#!/usr/bin/env python
"""Train an OffSeg model for semantic segmentation with the paper's (mmseg's) recipe, on one CPU or many GPUs.

    accelerate launch examples/train.py                                   # offline demo: synthetic scenes, CPU
    accelerate launch examples/train.py --ade20k_root data/ADEChallengeData2016 --recipe ade20k-160k \\
        --pretrained_encoder nvidia/mit-b0 --output_dir outputs/segformer-b0-offset-ade20k
    accelerate launch --multi_gpu --num_processes 8 examples/train.py --dataset_name scene_parse_150 \\
        --recipe ade20k-160k --mixed_precision bf16

Without a data flag it trains a fresh SegFormer-B0-offset on the synthetic demo set (`offseg_hf.demo_data`). Every
recipe value (learning rate, schedule, batch, crop, augmentation) defaults from `offseg_hf.training.RECIPES`; a flag
overrides it. `--help` lists them with each recipe's value. The loop is iteration-based like mmseg's: an endless
seeded sample stream, `--max_train_steps` optimizer steps of `total_batch_size` images, evaluation every
`--eval_steps`, atomic checkpoints every `--checkpointing_steps`, and `--resume_from_checkpoint latest` continues
exactly where a run stopped. The output folder loads with `AutoModelForSemanticSegmentation` and
`pipeline("image-segmentation")`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForSemanticSegmentation

import offseg_hf  # noqa: F401  (registers OffSeg with the Auto classes)
from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation, OffSegImageProcessor
from offseg_hf.data import (
    IGNORE_INDEX,
    SegmentationDataset,
    StreamSampler,
    collate_segmentation,
    labels_need_reducing,
    load_segmentation_splits,
    seed_worker,
)
from offseg_hf.training import (
    DEFAULT_RECIPE,
    RECIPES,
    build_optimizer,
    build_scheduler,
    convert_sync_batchnorm,
    evaluate,
    format_metrics,
    latest_checkpoint,
    per_device_batch_size,
    read_trainer_state,
    resolve_checkpoint,
    resolve_settings,
    save_checkpoint,
    sync_buffers,
)
from offseg_hf.transforms import EvalTransform, TrainTransform

logger = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before the bad step is applied."""


# Recipe fields and their flags: (metavar / nargs, type, help). Defaults come from RECIPES, shown in --help.
_RECIPE_FLAGS = {
    "variant": (None, str, "Model variant for a fresh model (OffSegConfig.variant_names())."),
    "learning_rate": (None, float, "Peak learning rate of the encoder (AdamW)."),
    "adam_beta1": (None, float, "AdamW beta1."),
    "adam_beta2": (None, float, "AdamW beta2."),
    "weight_decay": (None, float, "AdamW weight decay (0 for norm layers and positional blocks)."),
    "head_lr_mult": (None, float, "Learning-rate multiplier of everything outside the encoder."),
    "warmup_steps": (None, int, "Linear warmup steps."),
    "warmup_start_factor": (None, float, "Learning-rate factor at step 0 of the warmup."),
    "poly_power": (None, float, "Power of the poly decay after warmup (to 0 at the last step)."),
    "max_train_steps": (None, int, "Optimizer steps (iterations) in total."),
    "total_batch_size": (None, int, "Images per optimizer step over all processes and accumulation steps."),
    "crop_size": (2, int, "Training crop, HEIGHT WIDTH."),
    "resize_scale": (2, int, "Random-resize base scale, LONG SHORT (keep ratio), times a ratio from --ratio_range."),
    "ratio_range": (2, float, "Random-resize ratio range, MIN MAX."),
    "cat_max_ratio": (None, float, "Largest share one class may have of a crop (1 disables the check)."),
    "flip_prob": (None, float, "Horizontal flip probability."),
    "photometric": ("bool", None, "Photometric distortion (brightness, contrast, saturation, hue)."),
    "eval_scale": (2, int, "Evaluation resize scale, LONG SHORT (keep ratio)."),
    "eval_steps": (None, int, "Evaluate every N steps (and always at the end); 0 only at the end."),
    "checkpointing_steps": (None, int, "Save a resumable checkpoint every N steps; 0 never."),
    "dataloader_num_workers": (None, int, "DataLoader worker processes per process."),
    "demo_image_size": (None, int, "Demo set: image side in pixels."),
    "demo_num_train": (None, int, "Demo set: training images."),
    "demo_num_validation": (None, int, "Demo set: held-out images."),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every flag but the recipe flags, which list each recipe's value instead."""

    def _get_help_string(self, action):
        return action.help if "[recipe default" in (action.help or "") else super()._get_help_string(action)


_METAVARS = {
    "crop_size": ("HEIGHT", "WIDTH"),
    "resize_scale": ("LONG", "SHORT"),
    "ratio_range": ("MIN", "MAX"),
    "eval_scale": ("LONG", "SHORT"),
}


def _recipe_default(field: str) -> str:
    values = ", ".join(f"{name}: {recipe[field]}" for name, recipe in RECIPES.items() if field in recipe)
    return f"[recipe default, {values}]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
        epilog="Recipe values live in one place, offseg_hf.training.RECIPES; a flag overrides its value.",
    )
    data = parser.add_argument_group("data (one source; none = the synthetic demo set)")
    data.add_argument("--dataset_name", default=None, help="Hub data set with image + mask columns (network).")
    data.add_argument("--dataset_config_name", default=None, help="Its configuration name.")
    data.add_argument("--image_column_name", default="image", help="Image column of the Hub data set.")
    data.add_argument("--label_column_name", default="annotation", help="Mask column of the Hub data set.")
    data.add_argument("--train_dir", default=None, help="Folder with images/ and masks/ (see offseg_hf.data).")
    data.add_argument("--validation_dir", default=None, help="Held-out folder in the same layout.")
    data.add_argument("--ade20k_root", default=None, help="The ADEChallengeData2016 folder (or its parent).")
    data.add_argument("--demo", action="store_true", help="The synthetic demo set (the default without a source).")
    data.add_argument(
        "--reduce_labels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Map id 0 to 255 and shift the others down (ADE20K). Default: on for ADE20K / scene_parse_150.",
    )
    data.add_argument("--num_labels", type=int, default=None, help="Classes, when the data does not name them.")
    data.add_argument("--validation_split", type=float, default=0.15, help="Held-out share without a val split.")

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default=None, help="Fine-tune a saved OffSeg (folder or Hub id).")
    model.add_argument("--pretrained_encoder", default=None, help="Start the MiT encoder from e.g. nvidia/mit-b0.")
    model.add_argument(
        "--config_overrides", default=None, help="JSON overrides of the variant, e.g. '{\"decoder_hidden_size\": 128}'."
    )
    model.add_argument("--ignore_mismatched_sizes", action="store_true", help="New classifier for other labels.")
    model.add_argument(
        "--backbone_norm_eval",
        choices=("config", "yes", "no"),
        default="config",
        help="Keep an EfficientFormerV2 backbone's BatchNorms in eval mode while training (mmseg's norm_eval). "
        "config: the model's encoder_config.norm_eval (off in the presets: the official runs train them as SyncBN).",
    )

    recipe = parser.add_argument_group("recipe (defaults from --recipe)")
    recipe.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help=f"Training recipe; default {DEFAULT_RECIPE} for the demo set, ade20k-160k for real data.",
    )
    for field, (nargs, kind, text) in _RECIPE_FLAGS.items():
        text = f"{text} {_recipe_default(field)}"
        if nargs == "bool":
            recipe.add_argument(f"--{field}", action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            metavar = _METAVARS.get(field)
            recipe.add_argument(f"--{field}", type=kind, nargs=nargs, default=None, metavar=metavar, help=text)

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default=None, help="Checkpoints + final model; default outputs/<recipe>.")
    run.add_argument("--per_device_train_batch_size", type=int, default=None, help="Default: total / processes.")
    run.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimizer step.")
    run.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="Default: accelerate's.")
    run.add_argument("--seed", type=int, default=0, help="Seeds weights, data order, augmentation, demo set.")
    run.add_argument("--resume_from_checkpoint", default=None, help="A step_N folder, or 'latest' in output_dir.")
    run.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    run.add_argument("--logging_steps", type=int, default=10, help="Log loss and learning rate every N steps.")
    run.add_argument("--with_tracking", action="store_true", help="Log to experiment trackers (--report_to).")
    run.add_argument("--report_to", default="tensorboard", help="Tracker(s) for Accelerate: tensorboard, wandb, all.")
    run.add_argument("--push_to_hub", action="store_true", help="Upload the final model to the Hub (network).")
    run.add_argument("--hub_model_id", default=None, help="Hub repo for --push_to_hub; default the folder name.")
    run.add_argument("--hub_token", default=None, help="Hub token (else the logged-in one).")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    sources = [args.dataset_name, args.train_dir, args.ade20k_root]
    if args.demo and any(sources):
        raise SystemExit("--demo and a data source flag exclude each other.")
    if sum(source is not None for source in sources) > 1:
        raise SystemExit("Give one of --dataset_name, --train_dir, --ade20k_root.")
    if args.validation_dir and not args.train_dir:
        raise SystemExit("--validation_dir needs --train_dir.")
    if args.push_to_hub and args.hub_model_id is None and args.output_dir is None:
        raise SystemExit("--push_to_hub needs --hub_model_id or --output_dir (its name is the repo).")
    args.demo = args.demo or not any(sources)
    if args.recipe is None:
        args.recipe = DEFAULT_RECIPE if args.demo else "ade20k-160k"
    if args.output_dir is None:
        args.output_dir = f"outputs/{args.recipe}"
    return args


def build_model(args, id2label: dict[int, str], settings: dict):
    label2id = {name: index for index, name in id2label.items()}
    if args.model_name_or_path:
        return AutoModelForSemanticSegmentation.from_pretrained(
            args.model_name_or_path,
            num_labels=len(id2label),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=args.ignore_mismatched_sizes,
        )
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    values = {"num_labels": len(id2label), "id2label": id2label, "label2id": label2id, **overrides}
    if args.pretrained_encoder:
        return OffSegForSemanticSegmentation.from_pretrained_encoder(
            args.pretrained_encoder, settings["variant"], **values
        )
    return OffSegForSemanticSegmentation(OffSegConfig.from_variant(settings["variant"], **values))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = resolve_settings({field: getattr(args, field) for field in _RECIPE_FLAGS}, args.recipe)
    for field in ("crop_size", "resize_scale", "ratio_range", "eval_scale"):
        settings[field] = tuple(settings[field])
    output_dir = Path(args.output_dir)

    # One optimizer step = gradient_accumulation_steps micro-steps, accumulated here (see the loop), so
    # Accelerate's own accumulation stays at 1; the scheduler steps once per optimizer step.
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=str(output_dir),
        step_scheduler_with_optimizer=False,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.logger.setLevel(logging.INFO)  # this script's messages; libraries stay at warnings
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)  # the same initial weights on every process
    started = time.perf_counter()

    # ---- data -----------------------------------------------------------------------------------------------
    demo_options = {
        "image_size": settings["demo_image_size"],
        "num_train": settings["demo_num_train"],
        "num_validation": settings["demo_num_validation"],
    }
    do_reduce_labels = args.reduce_labels
    if do_reduce_labels is None:
        do_reduce_labels = labels_need_reducing(dataset_name=args.dataset_name, ade20k_root=args.ade20k_root)
    with accelerator.main_process_first():
        splits, id2label = load_segmentation_splits(
            dataset_name=args.dataset_name,
            train_dir=args.train_dir,
            validation_dir=args.validation_dir,
            ade20k_root=args.ade20k_root,
            demo=args.demo,
            seed=args.seed,
            num_labels=args.num_labels,
            do_reduce_labels=do_reduce_labels,
            dataset_config_name=args.dataset_config_name,
            image_column=args.image_column_name,
            label_column=args.label_column_name,
            validation_split=args.validation_split,
            demo_options=demo_options if args.demo else None,
        )
    num_labels = len(id2label)

    train_dataset = SegmentationDataset(
        splits["train"],
        TrainTransform(
            crop_size=settings["crop_size"],
            scale=settings["resize_scale"],
            ratio_range=settings["ratio_range"],
            cat_max_ratio=settings["cat_max_ratio"],
            flip_prob=settings["flip_prob"],
            photometric=settings["photometric"],
        ),
        num_labels=num_labels,
        do_reduce_labels=do_reduce_labels,
        seed=args.seed,
        split="train",
    )
    eval_dataset = SegmentationDataset(
        splits["validation"],
        EvalTransform(scale=settings["eval_scale"]),
        num_labels=num_labels,
        do_reduce_labels=do_reduce_labels,
        seed=args.seed,
        split="validation",
    )

    # ---- model, optimizer, schedule -------------------------------------------------------------------------
    model = build_model(args, id2label, settings)
    if args.backbone_norm_eval != "config" and hasattr(model.offseg.encoder, "norm_eval"):
        model.offseg.encoder.norm_eval = model.config.encoder_config.norm_eval = args.backbone_norm_eval == "yes"
    model = convert_sync_batchnorm(model, accelerator)
    optimizer = build_optimizer(model, settings)
    scheduler = build_scheduler(optimizer, settings)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    accumulation = args.gradient_accumulation_steps
    per_device = args.per_device_train_batch_size or per_device_batch_size(
        settings["total_batch_size"], accelerator.num_processes, accumulation
    )
    total_batch = per_device * accelerator.num_processes * accumulation
    max_steps = settings["max_train_steps"]

    # ---- resume ---------------------------------------------------------------------------------------------
    step = 0
    last_checkpoint = latest_checkpoint(output_dir)
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
        accelerator.load_state(str(checkpoint))  # weights, optimizer, scheduler, RNG of every process
        state = read_trainer_state(checkpoint)
        step, last_checkpoint = state["step"], checkpoint
        if state.get("total_batch_size", total_batch) != total_batch:
            logger.warning(
                f"The checkpoint was trained with {state['total_batch_size']} images a step, this run uses "
                f"{total_batch}: the data stream continues from image {step * state['total_batch_size']} but "
                "the run is no longer the same as an uninterrupted one."
            )
        consumed = state.get("samples_seen", step * total_batch)
        logger.info(f"Resumed from {checkpoint} at step {step}", main_process_only=True)
    else:
        consumed = 0

    # An endless stream: draw g of the global order goes to process g % P, so the images of a step do not depend
    # on how they are split over processes, and resuming starts at the next unseen draw.
    sampler = StreamSampler(
        len(train_dataset),
        seed=args.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        start=consumed // accelerator.num_processes,
    )
    num_workers = settings["dataloader_num_workers"]
    train_loader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=per_device,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_segmentation,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(args.seed + accelerator.process_index),
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=num_workers > 0,
    )
    batches = iter(train_loader)

    if args.with_tracking:
        hyperparameters = {key: str(value) if isinstance(value, tuple) else value for key, value in settings.items()}
        hyperparameters.update(recipe=args.recipe, total_batch_size=total_batch, seed=args.seed)
        accelerator.init_trackers("offseg", config=hyperparameters)

    logger.info(
        f"recipe {args.recipe}: {len(train_dataset)} training / {len(eval_dataset)} held-out images, "
        f"{num_labels} classes, {accelerator.num_processes} process(es) x {per_device} images x {accumulation} "
        f"accumulation = {total_batch} images a step, {max_steps} steps, device {accelerator.device}",
        main_process_only=True,
    )

    def run_evaluation() -> dict:
        sync_buffers(model, accelerator)
        result = evaluate(model, eval_dataset, accelerator, num_labels, IGNORE_INDEX, num_workers)
        if accelerator.is_main_process:
            tqdm.write(f"step {step}: {format_metrics(result, id2label)}")
        accelerator.log(
            {
                "eval/mean_iou": result["mean_iou"],
                "eval/mean_accuracy": result["mean_accuracy"],
                "eval/overall_accuracy": result["overall_accuracy"],
                **{
                    f"eval/iou_{id2label[index]}": iou
                    for index, iou in enumerate(result["per_category_iou"])
                    if not math.isnan(iou)
                },
            },
            step=step,
        )
        return result

    # ---- train ----------------------------------------------------------------------------------------------
    progress = tqdm(total=max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    model.train()
    running_loss, running_count = 0.0, 0
    while step < max_steps:
        for micro_step in range(accumulation):
            batch = next(batches)
            batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
            # Gradients are all-reduced only on the last micro-step of a step.
            with accelerator.no_sync(model) if micro_step < accumulation - 1 else contextlib.nullcontext():
                loss = model(**batch).loss
                mean_loss = accelerator.reduce(loss.detach().float(), reduction="mean").item()
                if not math.isfinite(mean_loss):
                    raise NonFiniteLossError(
                        f"The training loss is {mean_loss} at step {step + 1} (micro-step {micro_step + 1}); stopped "
                        "before applying it. "
                        + (
                            f"The last checkpoint, {last_checkpoint}, is intact: "
                            if last_checkpoint
                            else "No checkpoint was saved. "
                        )
                        + "lower --learning_rate, check the data, or use --mixed_precision bf16/no, then "
                        "--resume_from_checkpoint latest."
                    )
                accelerator.backward(loss / accumulation)
            running_loss += mean_loss
            running_count += 1
        optimizer.step()
        if not optimizer.step_was_skipped:  # fp16 overflow: the scale drops, the schedule waits
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        consumed += total_batch
        progress.update(1)

        if step % args.logging_steps == 0 or step == max_steps:
            learning_rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
            average = running_loss / max(running_count, 1)
            progress.set_postfix(loss=f"{average:.4f}", lr=f"{learning_rates.get('encoder_decay', 0):.2e}")
            accelerator.log(
                {"train/loss": average, **{f"train/lr_{name}": lr for name, lr in learning_rates.items()}}, step=step
            )
            running_loss, running_count = 0.0, 0
        if settings["checkpointing_steps"] and step % settings["checkpointing_steps"] == 0:
            sync_buffers(model, accelerator)
            last_checkpoint = save_checkpoint(
                accelerator,
                output_dir,
                step,
                {
                    "recipe": args.recipe,
                    "total_batch_size": total_batch,
                    "samples_seen": consumed,
                    "max_train_steps": max_steps,
                    "seed": args.seed,
                },
                total_limit=args.checkpoints_total_limit,
            )
        if settings["eval_steps"] and step % settings["eval_steps"] == 0 and step < max_steps:
            run_evaluation()
    progress.close()

    # ---- final evaluation and the model folder --------------------------------------------------------------
    result = run_evaluation()
    minutes = (time.perf_counter() - started) / 60
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir, save_function=accelerator.save)
        crop_h, crop_w = settings["crop_size"]
        processor = OffSegImageProcessor(size={"height": crop_h, "width": crop_w}, do_reduce_labels=do_reduce_labels)
        processor.save_pretrained(output_dir)
        summary = {key: value for key, value in result.items() if key != "local_num_pixels"}
        summary.update(step=step, minutes=round(minutes, 2), id2label={str(k): v for k, v in id2label.items()})
        (output_dir / "eval_results.json").write_text(json.dumps(summary, indent=2))
        print(
            f"final mIoU {result['mean_iou']:.4f} (mAcc {result['mean_accuracy']:.4f}, aAcc "
            f"{result['overall_accuracy']:.4f}) on {len(eval_dataset)} held-out images after {step} steps, "
            f"{minutes:.1f} min; model saved to {output_dir}",
            flush=True,
        )
        if args.push_to_hub:
            push_to_hub(output_dir, args.hub_model_id or output_dir.name, args.hub_token)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"metrics": result, "step": step, "output_dir": str(output_dir), "model": unwrapped, "optimizer": optimizer}


def push_to_hub(folder: Path, repo_id: str, token: str | None) -> None:
    """Upload the final model folder (not the checkpoints or tracker logs) to a Hub model repo."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo.repo_id,
        commit_message="OffSeg trained with examples/train.py",
        ignore_patterns=["step_*", "step_*/**", ".tmp-*", ".old-*", "offseg/**", "runs/**"],
    )
    print(f"pushed {folder} to https://huggingface.co/{repo.repo_id}")


if __name__ == "__main__":
    try:
        main()
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
