#!/usr/bin/env python
"""Train an OffSeg model for semantic segmentation with the paper's (mmseg's) recipe, on one CPU or many GPUs.

    accelerate launch examples/train.py                                   # offline demo: synthetic scenes, CPU
    accelerate launch examples/train.py --ade20k_root data/ADEChallengeData2016 --recipe ade20k-160k \\
        --pretrained_encoder nvidia/mit-b0
    accelerate launch examples/train.py --pascal_context_root data/VOCdevkit/VOC2010 --variant segnext-t-offset
    accelerate launch --multi_gpu --num_processes 8 examples/train.py --dataset_name scene_parse_150 \\
        --recipe ade20k-160k --mixed_precision bf16

Without a data flag it trains a fresh SegFormer-B0-offset on the synthetic demo set (`offseg_hf.data.demo`). Every
recipe value (learning rate, schedule, batch, crop, augmentation, evaluation protocol) defaults from
`offseg_hf.training.RECIPES`; a flag overrides it, and `--help` lists each recipe's value. The run is
iteration-based like mmseg's: an endless seeded sample stream, `--max_train_steps` optimizer steps of
`total_batch_size` images, evaluation every `--eval_steps` and at the end, atomic checkpoints every
`--checkpointing_steps`; `--resume_from_checkpoint latest` continues exactly where a run stopped. The output
folder (default `outputs/<recipe>-<variant>`) loads with `AutoModelForSemanticSegmentation` and
`pipeline("image-segmentation")`.

The script reads top to bottom: arguments (all checked before any work), accelerator, data, model, optimizer and
schedule, resume, training, final evaluation and the saved model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import datasets
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForSemanticSegmentation

import offseg_hf  # noqa: F401  (registers OffSeg with the Auto classes)
from offseg_hf import OffSegImageProcessor
from offseg_hf.convert import from_pretrained_encoder, official_key
from offseg_hf.data.datasets import (
    IGNORE_INDEX,
    SegmentationDataError,
    SegmentationDataset,
    labels_need_reducing,
    load_segmentation_splits,
)
from offseg_hf.data.transforms import EvalTransform, TrainTransform
from offseg_hf.hub.repos import weights_fingerprint
from offseg_hf.models.local_paths import missing_folder_message
from offseg_hf.models.modeling_offseg import ENCODERS
from offseg_hf.presets import encoder_sources, model_for_variant
from offseg_hf.training import (
    FAMILY_CHANGES,
    PAPER_RECIPE,
    RECIPE_FIELDS,
    RECIPES,
    CheckpointMismatchError,
    NonFiniteLossError,
    TrainerState,
    build_optimizer,
    build_scheduler,
    check_output_dir,
    check_same_model,
    convert_sync_batchnorm,
    default_output_dir,
    default_recipe,
    eval_protocol,
    evaluate,
    format_metrics,
    metrics_to_log,
    model_signature,
    per_device_batch_size,
    read_trainer_state,
    remove_checkpoints,
    resolve_checkpoint,
    resolve_settings,
    save_checkpoint,
    saved_model_family,
    stream_loader,
    train,
)

logger = get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Arguments


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after flags with a fixed default; the recipe flags list each recipe's value instead."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "[recipe default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_recipe_flags(group) -> None:
    """One flag per recipe field (`offseg_hf.training.RECIPE_FIELDS`), its type from the paper's value, its help
    ending with every recipe's default."""
    for name, field in RECIPE_FIELDS.items():
        values = {recipe: settings[name] for recipe, settings in RECIPES.items()}
        if len(set(values.values())) == 1:
            defaults = f"every recipe: {PAPER_RECIPE[name]}"
        else:
            defaults = ", ".join(f"{recipe}: {value}" for recipe, value in values.items())
        changes = [
            f"{family} on {recipe}: {values[name]}"
            for family, recipes in FAMILY_CHANGES.items()
            for recipe, values in recipes.items()
            if name in values
        ]
        if changes:
            defaults += f"; model family {', '.join(changes)}"
        text = field.help + (f" One of: {', '.join(field.choices)}." if field.choices else "")
        text += f" [recipe default, {defaults}]"
        example = PAPER_RECIPE[name]
        if isinstance(example, bool):
            group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(example, tuple):
            group.add_argument(f"--{name}", type=type(example[0]), nargs=2, metavar=field.metavar, help=text)
        else:
            metavar = name.upper() if field.choices else None  # the choices are listed in the help text
            group.add_argument(f"--{name}", type=type(example), choices=field.choices, metavar=metavar, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        usage="%(prog)s [options]  (see --help)",
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
        epilog="Recipe values live in one place, offseg_hf.training.RECIPES; a flag overrides its value.",
    )
    data = parser.add_argument_group("data (one source; none = the synthetic demo set)")
    data.add_argument(
        "--dataset_name",
        help="What datasets.load_dataset takes, with image + mask columns: a Hub id (e.g. scene_parse_150; one in the "
        "cache loads offline), a local folder in the Hub's layout (data/train-*.parquet ..., its id2label.json if any) "
        "or a save_to_disk folder.",
    )
    data.add_argument("--dataset_config_name", help="Configuration name of the Hub data set.")
    data.add_argument("--image_column_name", default="image", help="Image column of the Hub data set.")
    data.add_argument("--label_column_name", default="annotation", help="Mask column of the Hub data set.")
    data.add_argument("--train_dir", help="Training folder with images/ and masks/ (see offseg_hf.data.datasets).")
    data.add_argument("--validation_dir", help="Held-out folder in the same layout (needs --train_dir).")
    data.add_argument("--ade20k_root", help="The ADEChallengeData2016 folder (or its parent).")
    data.add_argument(
        "--pascal_context_root", help="Pascal Context 59 in mmseg's layout: VOCdevkit/VOC2010 (or a parent)."
    )
    data.add_argument("--demo", action="store_true", help="The synthetic demo set (the default without a source).")
    data.add_argument("--demo_image_size", type=int, help="Demo set: image side in pixels (default 128).")
    data.add_argument("--demo_num_train", type=int, help="Demo set: training images (default 400).")
    data.add_argument("--demo_num_validation", type=int, help="Demo set: held-out images (default 100).")
    data.add_argument(
        "--reduce_labels",
        action=argparse.BooleanOptionalAction,
        help="Map id 0 to 255 and shift the others down (mmseg's reduce_zero_label). Default: on for ADE20K / "
        "scene_parse_150 and Pascal Context.",
    )
    data.add_argument("--num_labels", type=int, help="Classes, when the data does not name them.")
    data.add_argument("--validation_split", type=float, default=0.15, help="Held-out share without a val split.")

    model = parser.add_argument_group("model (a fresh --variant, or --model_name_or_path)")
    model.add_argument("--model_name_or_path", help="Fine-tune a saved OffSeg model (folder or Hub id).")
    model.add_argument(
        "--pretrained_encoder",
        help="Start a fresh model's encoder from pretrained weights. "
        + "; ".join(f"{encoder.display_name} variants: {encoder.pretrained_sources}" for encoder in ENCODERS.values())
        + f"; Mask2Former (Swin): {encoder_sources('mask2former-swin-t-offset')[1]}.",
    )
    model.add_argument(
        "--config_overrides", help="JSON overrides of the variant, e.g. '{\"decoder_hidden_size\": 128}'."
    )
    model.add_argument("--ignore_mismatched_sizes", action="store_true", help="New classifier for other labels.")
    model.add_argument(
        "--backbone_norm_eval",
        choices=("config", "yes", "no"),
        default="config",
        help="Keep an EfficientFormerV2 or MSCAN backbone's BatchNorms in eval mode while training (mmseg's "
        "norm_eval). "
        "config: the model's encoder_config.norm_eval (off in the presets: the official runs train them as SyncBN).",
    )

    recipe = parser.add_argument_group("recipe (defaults from --recipe)")
    recipe.add_argument(
        "--recipe",
        choices=list(RECIPES),
        help=f"Training recipe; default {default_recipe(demo=True)} for the demo set, "
        f"{default_recipe(demo=False, source='pascal_context_root')} for --pascal_context_root, "
        f"{default_recipe(demo=False)} for other data.",
    )
    _add_recipe_flags(recipe)

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", help="Checkpoints + final model; default outputs/<recipe>-<variant>.")
    run.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Train into a non-empty --output_dir: its earlier checkpoints are removed, its model replaced at the end.",
    )
    run.add_argument("--per_device_train_batch_size", type=int, help="Default: total / (processes x accumulation).")
    run.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimizer step.")
    run.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), help="Default: accelerate's config.")
    run.add_argument("--seed", type=int, default=0, help="Seeds weights, data order, augmentation, demo set.")
    run.add_argument("--resume_from_checkpoint", help="A step_N folder, or 'latest' in --output_dir.")
    run.add_argument("--checkpoints_total_limit", type=int, help="Keep only the newest N checkpoints.")
    run.add_argument("--logging_steps", type=int, default=10, help="Log loss and learning rate every N steps.")
    run.add_argument("--with_tracking", action="store_true", help="Log to experiment trackers (--report_to).")
    run.add_argument("--report_to", default="tensorboard", help="Tracker(s) for Accelerate: tensorboard, wandb, all.")
    run.add_argument("--push_to_hub", action="store_true", help="Upload the final model to the Hub (network).")
    run.add_argument("--hub_model_id", help="Hub repo for --push_to_hub; default the --output_dir folder name.")
    run.add_argument("--hub_token", help="Hub token (else the logged-in one).")
    return parser


DATA_SOURCES = ("dataset_name", "train_dir", "ade20k_root", "pascal_context_root")


def _check_data(parser, args) -> None:
    sources = [name for name in DATA_SOURCES if getattr(args, name) is not None]
    if len(sources) + args.demo > 1:
        parser.error(f"give one data source: {', '.join(f'--{name}' for name in DATA_SOURCES)} or --demo.")
    if args.validation_dir and not args.train_dir:
        parser.error("--validation_dir needs --train_dir.")
    if not 0 < args.validation_split < 1:
        parser.error(f"--validation_split must be in (0, 1), got {args.validation_split}.")
    if args.dataset_name and (message := missing_folder_message(args.dataset_name, "--dataset_name")):
        parser.error(message)
    args.demo = not sources
    args.data_source = sources[0] if sources else "demo"
    demo_flags = [f"--{name}" for name in ("demo_image_size", "demo_num_train", "demo_num_validation")]
    if not args.demo and any(getattr(args, flag[2:]) is not None for flag in demo_flags):
        parser.error(f"{'/'.join(demo_flags)} describe the demo set; this run reads --{sources[0]}.")


def _check_model(parser, args) -> None:
    fresh_model_flags = [f"--{name}" for name in ("variant", "pretrained_encoder", "config_overrides")]
    if args.model_name_or_path and any(getattr(args, flag[2:]) is not None for flag in fresh_model_flags):
        parser.error(f"{', '.join(fresh_model_flags)} build a fresh model; --model_name_or_path loads a saved one.")
    if args.ignore_mismatched_sizes and not args.model_name_or_path:
        parser.error("--ignore_mismatched_sizes applies to --model_name_or_path.")
    if args.model_name_or_path and (message := missing_folder_message(args.model_name_or_path, "--model_name_or_path")):
        parser.error(message)
    variant = args.settings["variant"]
    encoder_name, sources, accepts = encoder_sources(variant)
    if args.pretrained_encoder and not accepts(args.pretrained_encoder):
        parser.error(
            f"--pretrained_encoder {args.pretrained_encoder}: the encoder of {variant} is {encoder_name}; give "
            f"{sources}."
        )
    try:
        args.config_overrides = json.loads(args.config_overrides or "{}")
    except json.JSONDecodeError as error:
        parser.error(f"--config_overrides is not JSON: {error}")
    if not isinstance(args.config_overrides, dict):
        parser.error("--config_overrides must be a JSON object.")
    args.model_label = args.model_name_or_path or variant


def _check_run(parser, args) -> None:
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if args.push_to_hub and args.hub_model_id is None and args.output_dir is None:
        parser.error("--push_to_hub needs --hub_model_id or --output_dir (its name is the repo).")
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.recipe, args.model_label)
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("--overwrite_output_dir removes the folder's checkpoints; --resume_from_checkpoint continues one.")
    resume = args.resume_from_checkpoint
    try:
        args.checkpoint = resolve_checkpoint(resume, args.output_dir) if resume else None
        check_output_dir(args.output_dir, args.overwrite_output_dir, resume_from=args.checkpoint)
    except (FileNotFoundError, FileExistsError) as error:
        parser.error(str(error))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument before any work; a bad one ends the script with one line. Adds `settings`
    (the resolved recipe), `model_label` (the variant or the model fine-tuned) and `checkpoint` (the resolved
    --resume_from_checkpoint)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_data(parser, args)
    args.recipe = args.recipe or default_recipe(args.demo, args.data_source)
    try:
        family = saved_model_family(args.model_name_or_path, token=args.hub_token) if args.model_name_or_path else None
        args.settings = resolve_settings({name: getattr(args, name) for name in RECIPE_FIELDS}, args.recipe, family)
    except ValueError as error:
        parser.error(str(error))
    _check_model(parser, args)
    _check_run(parser, args)
    return args


# ----------------------------------------------------------------------------------------------------------------
# Accelerator


def make_accelerator(args) -> Accelerator:
    """Accelerate's gradient accumulation; the scheduler is stepped by the loop once per optimizer step (the
    prepared scheduler would otherwise step once per process)."""
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        step_scheduler_with_optimizer=False,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.logger.setLevel(logging.INFO)  # this script's messages; libraries stay at warnings
    verbosity = logging.WARNING if accelerator.is_local_main_process else logging.ERROR
    datasets.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.set_verbosity(verbosity)
    if args.overwrite_output_dir and accelerator.is_main_process:
        remove_checkpoints(args.output_dir)  # "latest" must never find the replaced run's checkpoints
    accelerator.wait_for_everyone()
    return accelerator


def batch_sizes(args, accelerator) -> tuple[int, int]:
    """(images per process and micro-step, images per optimizer step over all processes)."""
    accumulation = args.gradient_accumulation_steps
    try:
        per_device = args.per_device_train_batch_size or per_device_batch_size(
            args.settings["total_batch_size"], accelerator.num_processes, accumulation
        )
    except ValueError as error:  # known only once the processes are: before any data or model work still
        raise SystemExit(f"error: {error}") from None
    return per_device, per_device * accelerator.num_processes * accumulation


# ----------------------------------------------------------------------------------------------------------------
# Data


def load_data(args, settings: dict, accelerator):
    """(train dataset with the recipe's augmentation, held-out dataset with its eval resize, id2label, whether
    labels are reduced)."""
    reduce = args.reduce_labels
    if reduce is None:
        reduce = labels_need_reducing(
            dataset_name=args.dataset_name, ade20k_root=args.ade20k_root, pascal_context_root=args.pascal_context_root
        )
    demo_options = {
        key: getattr(args, f"demo_{key}")
        for key in ("image_size", "num_train", "num_validation")
        if getattr(args, f"demo_{key}") is not None
    }
    with accelerator.main_process_first():
        splits, id2label = load_segmentation_splits(
            dataset_name=args.dataset_name,
            train_dir=args.train_dir,
            validation_dir=args.validation_dir,
            ade20k_root=args.ade20k_root,
            pascal_context_root=args.pascal_context_root,
            demo=args.demo,
            seed=args.seed,
            num_labels=args.num_labels,
            do_reduce_labels=reduce,
            dataset_config_name=args.dataset_config_name,
            image_column=args.image_column_name,
            label_column=args.label_column_name,
            validation_split=args.validation_split,
            demo_options=demo_options,
        )
    augmentation = TrainTransform(
        crop_size=settings["crop_size"],
        scale=settings["resize_scale"],
        ratio_range=settings["ratio_range"],
        resize_mode=settings["resize_mode"],
        cat_max_ratio=settings["cat_max_ratio"],
        flip_prob=settings["flip_prob"],
        photometric=settings["photometric"],
    )
    common = {"num_labels": len(id2label), "do_reduce_labels": reduce, "seed": args.seed}
    train_dataset = SegmentationDataset(splits["train"], augmentation, split="train", **common)
    eval_transform = EvalTransform(scale=settings["eval_scale"])
    eval_dataset = SegmentationDataset(splits["validation"], eval_transform, split="validation", **common)
    return train_dataset, eval_dataset, id2label, reduce


# ----------------------------------------------------------------------------------------------------------------
# Model


def build_model(args, id2label: dict[int, str], settings: dict):
    label2id = {name: index for index, name in id2label.items()}
    labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": label2id}
    if args.model_name_or_path:
        model = AutoModelForSemanticSegmentation.from_pretrained(
            args.model_name_or_path, ignore_mismatched_sizes=args.ignore_mismatched_sizes, **labels
        )
    elif args.pretrained_encoder:
        model = from_pretrained_encoder(args.pretrained_encoder, settings["variant"], **labels, **args.config_overrides)
    else:
        model = model_for_variant(settings["variant"], **labels, **args.config_overrides)
    encoder = getattr(getattr(model, "offseg", None), "encoder", None)
    if args.backbone_norm_eval != "config" and hasattr(encoder, "norm_eval"):
        model.offseg.encoder.norm_eval = model.config.encoder_config.norm_eval = args.backbone_norm_eval == "yes"
    return model


# ----------------------------------------------------------------------------------------------------------------
# Resume


def resume(args, accelerator, signature: dict, total_batch: int) -> TrainerState:
    """Where training starts: step 0, or the checkpoint's step, weights, optimizer, scheduler and RNG states."""
    if not args.checkpoint:
        return TrainerState()
    check_same_model(args.checkpoint, signature)  # before load_state, which would fail on the first tensor
    accelerator.load_state(str(args.checkpoint))
    # Checkpoints are saved between optimizer steps: the next micro-batch starts a step whatever the
    # accumulation, while load_state restores the micro-step count of the run that saved it.
    accelerator.step = 0
    saved = read_trainer_state(args.checkpoint)
    if saved.get("total_batch_size", total_batch) != total_batch:
        logger.warning(
            f"The checkpoint was trained with {saved['total_batch_size']} images a step, this run uses {total_batch}: "
            f"the data stream continues from image {saved['samples_seen']} but the run is no longer the same as an "
            "uninterrupted one."
        )
    if saved.get("max_train_steps", args.settings["max_train_steps"]) != args.settings["max_train_steps"]:
        logger.warning(
            f"The learning-rate schedule comes back with the checkpoint and still ends at step "
            f"{saved['max_train_steps']}; --max_train_steps {args.settings['max_train_steps']} only moves where "
            "training stops."
        )
    logger.info(f"Resumed from {args.checkpoint} at step {saved['step']}", main_process_only=True)
    return TrainerState(saved["step"], saved.get("samples_seen", saved["step"] * total_batch), args.checkpoint)


# ----------------------------------------------------------------------------------------------------------------
# Between training steps: checkpoints and evaluation


def evaluate_and_log(model, eval_dataset, accelerator, settings: dict, id2label: dict, step: int) -> dict:
    result = evaluate(
        model,
        eval_dataset,
        accelerator,
        len(id2label),
        eval_protocol(settings),
        IGNORE_INDEX,
        settings["dataloader_num_workers"],
    )
    result["num_images"] = len(eval_dataset)
    if accelerator.is_main_process:
        tqdm.write(f"step {step}: {format_metrics(result, id2label)}")
    accelerator.log(metrics_to_log(result, id2label), step=step)
    return result


def between_steps(args, accelerator, model, eval_dataset, id2label: dict, run_record: dict):
    """What runs after a training step: a checkpoint every --checkpointing_steps, an evaluation every --eval_steps
    (the last step's evaluation is the final one)."""
    settings = args.settings

    def after_step(state: TrainerState) -> None:
        if settings["checkpointing_steps"] and state.step % settings["checkpointing_steps"] == 0:
            record = {**run_record, "samples_seen": state.samples_seen}
            state.last_checkpoint = save_checkpoint(
                accelerator, args.output_dir, state.step, record, total_limit=args.checkpoints_total_limit
            )
        if (
            settings["eval_steps"]
            and state.step % settings["eval_steps"] == 0
            and state.step < settings["max_train_steps"]
        ):
            evaluate_and_log(model, eval_dataset, accelerator, settings, id2label, state.step)

    return after_step


def describe_run(args, accelerator, train_dataset, eval_dataset, id2label, per_device: int, total_batch: int):
    """The run in one log line, and its hyperparameters for the trackers."""
    settings = args.settings
    if args.with_tracking:
        values = {key: str(value) if isinstance(value, tuple) else value for key, value in settings.items()}
        accelerator.init_trackers("offseg", config={**values, "recipe": args.recipe, "total_batch_size": total_batch})
    logger.info(
        f"recipe {args.recipe}: {len(train_dataset)} training / {len(eval_dataset)} held-out images, "
        f"{len(id2label)} classes, {accelerator.num_processes} process(es) x {per_device} images x "
        f"{args.gradient_accumulation_steps} accumulation = {total_batch} images a step, "
        f"{settings['max_train_steps']} steps, device {accelerator.device}",
        main_process_only=True,
    )


# ----------------------------------------------------------------------------------------------------------------
# The model folder


def save_model(args, accelerator, model, result: dict, state: TrainerState, do_reduce_labels: bool, minutes: float):
    """The final model, its image processor and eval_results.json into --output_dir (main process)."""
    output_dir = Path(args.output_dir)
    network = accelerator.unwrap_model(model)
    network.save_pretrained(output_dir, save_function=accelerator.save)
    crop_h, crop_w = args.settings["crop_size"]
    processor = OffSegImageProcessor(size={"height": crop_h, "width": crop_w}, do_reduce_labels=do_reduce_labels)
    processor.save_pretrained(output_dir)
    protocol = eval_protocol(args.settings)
    summary = {key: value for key, value in result.items() if key != "local_num_pixels"}
    summary.update(
        step=state.step, minutes=round(minutes, 2), id2label={str(k): v for k, v in network.config.id2label.items()}
    )
    summary.update(recipe=args.recipe, eval_protocol=asdict(protocol))
    # The fingerprint lets push_to_hub.py put these figures into a card only next to these very weights.
    summary["weights_sha256"] = weights_fingerprint(network)
    summary["measured_by"] = "examples/train.py (final evaluation)"
    (output_dir / "eval_results.json").write_text(json.dumps(summary, indent=2))


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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = args.settings
    accelerator = make_accelerator(args)
    per_device, total_batch = batch_sizes(args, accelerator)
    set_seed(args.seed)  # the same initial weights on every process
    started = time.perf_counter()

    train_dataset, eval_dataset, id2label, do_reduce_labels = load_data(args, settings, accelerator)

    model = build_model(args, id2label, settings)
    signature = model_signature(model, args.model_label)
    model = convert_sync_batchnorm(model, accelerator)

    optimizer = build_optimizer(model, settings, official_key)
    scheduler = build_scheduler(optimizer, settings)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    state = resume(args, accelerator, signature, total_batch)

    num_workers = settings["dataloader_num_workers"]
    batches = iter(stream_loader(train_dataset, per_device, accelerator, args.seed, state.samples_seen, num_workers))
    describe_run(args, accelerator, train_dataset, eval_dataset, id2label, per_device, total_batch)
    run_record = {"recipe": args.recipe, "seed": args.seed, "total_batch_size": total_batch, **signature}
    run_record["max_train_steps"] = settings["max_train_steps"]
    after_step = between_steps(args, accelerator, model, eval_dataset, id2label, run_record)
    loop = {"max_steps": settings["max_train_steps"], "logging_steps": args.logging_steps, "after_step": after_step}
    loop["clip_grad_norm"] = settings["clip_grad_norm"]
    train(accelerator, model, optimizer, scheduler, batches, state, images_per_step=total_batch, **loop)

    result = evaluate_and_log(model, eval_dataset, accelerator, settings, id2label, state.step)
    minutes = (time.perf_counter() - started) / 60
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(args, accelerator, model, result, state, do_reduce_labels, minutes)
        print(
            f"final mIoU {result['mean_iou']:.4f} (mAcc {result['mean_accuracy']:.4f}, aAcc "
            f"{result['overall_accuracy']:.4f}) on {len(eval_dataset)} held-out images after {state.step} steps, "
            f"{minutes:.1f} min; model saved to {args.output_dir}",
            flush=True,
        )
        if args.push_to_hub:
            push_to_hub(Path(args.output_dir), args.hub_model_id or Path(args.output_dir).name, args.hub_token)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    network = accelerator.unwrap_model(model)
    return {
        "metrics": result,
        "step": state.step,
        "output_dir": args.output_dir,
        "model": network,
        "optimizer": optimizer,
    }


if __name__ == "__main__":
    try:
        main()
    # A data set's missing image, mask or split list is the user's to fix: one line, as for a bad sample.
    except (NonFiniteLossError, CheckpointMismatchError, SegmentationDataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
