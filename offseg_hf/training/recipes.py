"""Training recipes: the one place for the training defaults (`examples/train.py --help` prints each recipe's).

Every recipe is the paper's base (the official mmseg configs of github.com/HVision-NKU/OffSeg, ADE20K's values)
plus the few values its data set changes:

* optimizer: AdamW, lr 6e-5, betas (0.9, 0.999), weight decay 0.01, with mmseg's `paramwise_cfg` custom keys
  `pos_block` (no decay), `norm` (no decay) and `head` (lr x10), applied as mmengine applies them
  (`offseg_hf.training.optimization`);
* schedule: linear warmup over 1500 iterations from a factor 1e-6, then poly (power 1) to 0 at the last one;
* augmentation: random resize of a scale by a ratio in [0.5, 2.0], random crop with `cat_max_ratio` 0.75,
  flip 0.5, photometric distortion;
* evaluation: keep-ratio resize to the scale, sliding windows, one image a batch (`val_dataloader` batch 1).

ADE20K (160k iterations, 16 images a step: 8 GPUs x 2), Cityscapes (160k, 8 images: 8 GPUs x 1, crop 1024, test
windows 1024 every 768), COCO-Stuff-164k (80k iterations) and Pascal Context 59 (80k, scale 520, crop 480, test
windows 480 every 320; the paper reports SegNeXt there) differ only there. The OffSeg-T/L and SegNeXt COCO-Stuff
configs run 160k iterations but end their poly decay at 80k, after which mmengine leaves the learning rate at its
last, near-zero value; `coco-stuff-80k` is the 80k run of the SegFormer-offset and OffSeg-B configs.

A model family whose official configs differ from that on a data set says so in `FAMILY_CHANGES` (by decode head):
the SegNeXt configs (`lightham`) test ADE20K and COCO-Stuff on whole images, not sliding windows. Their optimizer,
schedule, batch and augmentation are the paper base's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..data.transforms import RESIZE_MODES
from ..models.configuration_mask2former import OffSegMask2FormerConfig
from ..presets import ALL_VARIANTS, MASK2FORMER_FAMILY, variant_family


@dataclass(frozen=True)
class RecipeField:
    """What a recipe value means (the flag's help text) and, for text values, the accepted choices."""

    help: str
    choices: tuple[str, ...] | None = None
    metavar: tuple[str, str] | None = None


EVAL_MODES = ("slide", "whole")
PARAM_GROUP_RULES = ("official", "all_norms")

RECIPE_FIELDS: dict[str, RecipeField] = {
    "variant": RecipeField("Model variant of a fresh model.", choices=ALL_VARIANTS),
    "learning_rate": RecipeField("Peak learning rate (AdamW); parameters with an lr multiplier get a multiple."),
    "adam_beta1": RecipeField("AdamW beta1."),
    "adam_beta2": RecipeField("AdamW beta2."),
    "weight_decay": RecipeField("AdamW weight decay (parameters exempt by --param_group_rule get 0)."),
    "head_lr_mult": RecipeField("Learning-rate multiplier of the 'head' parameters (see --param_group_rule)."),
    "backbone_lr_mult": RecipeField(
        "Learning-rate multiplier of the backbone (Mask2Former's official rule: 0.1; the other families have none)."
    ),
    "clip_grad_norm": RecipeField("Clip the gradients' global L2 norm to this before each step; 0 never."),
    "param_group_rule": RecipeField(
        "Which parameters get the head lr multiplier and no weight decay. official: mmseg's custom keys "
        "(pos_block, head, norm; the first one in the official parameter name wins), exactly as the official runs; "
        "all_norms: every norm layer exempt from decay, everything outside the encoder at the head lr.",
        choices=PARAM_GROUP_RULES,
    ),
    "warmup_steps": RecipeField("Linear warmup steps."),
    "warmup_start_factor": RecipeField("Learning-rate factor at step 0 of the warmup."),
    "poly_power": RecipeField("Power of the poly decay after warmup (to 0 at the last step)."),
    "max_train_steps": RecipeField("Optimizer steps (iterations) in total."),
    "total_batch_size": RecipeField("Images per optimizer step over all processes and accumulation steps."),
    "crop_size": RecipeField("Training crop, HEIGHT WIDTH.", metavar=("HEIGHT", "WIDTH")),
    "resize_scale": RecipeField(
        "Random-resize base scale, LONG SHORT (keep ratio), times a ratio from --ratio_range.",
        metavar=("LONG", "SHORT"),
    ),
    "ratio_range": RecipeField("Random-resize ratio range, MIN MAX.", metavar=("MIN", "MAX")),
    "resize_mode": RecipeField(
        "Random resize: ratio (mmseg's RandomResize: the scale times a uniform ratio) or shortest_edge (the "
        "Mask2Former configs' RandomChoiceResize: short edge min(scale) x 0.1k for k over the ratio range, long edge "
        "at most max(scale)).",
        choices=tuple(RESIZE_MODES),
    ),
    "cat_max_ratio": RecipeField("Largest share one class may have of a crop (1 disables the check)."),
    "flip_prob": RecipeField("Horizontal flip probability."),
    "photometric": RecipeField("Photometric distortion (brightness, contrast, saturation, hue)."),
    "eval_scale": RecipeField("Evaluation resize scale, LONG SHORT (keep ratio).", metavar=("LONG", "SHORT")),
    "eval_mode": RecipeField("Evaluation inference: whole images or sliding windows.", choices=EVAL_MODES),
    "eval_crop_size": RecipeField("Sliding-window size, HEIGHT WIDTH (slide mode).", metavar=("HEIGHT", "WIDTH")),
    "eval_stride": RecipeField("Sliding-window stride, HEIGHT WIDTH (slide mode).", metavar=("HEIGHT", "WIDTH")),
    "per_device_eval_batch_size": RecipeField("Evaluation images per forward pass (consecutive, equal size)."),
    "eval_steps": RecipeField("Evaluate every N steps (and always at the end); 0 only at the end."),
    "checkpointing_steps": RecipeField("Save a resumable checkpoint every N steps; 0 never."),
    "dataloader_num_workers": RecipeField("DataLoader worker processes per process."),
}

# The official configs' values (ADE20K's data set); every recipe starts from these.
PAPER_RECIPE: dict[str, Any] = {
    "variant": "segformer-b0-offset",
    "learning_rate": 6e-5,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "weight_decay": 0.01,
    "head_lr_mult": 10.0,
    "backbone_lr_mult": 1.0,
    "clip_grad_norm": 0.0,
    "param_group_rule": "official",
    "warmup_steps": 1500,
    "warmup_start_factor": 1e-6,
    "poly_power": 1.0,
    "max_train_steps": 160_000,
    "total_batch_size": 16,
    "crop_size": (512, 512),
    "resize_scale": (2048, 512),
    "ratio_range": (0.5, 2.0),
    "resize_mode": "ratio",
    "cat_max_ratio": 0.75,
    "flip_prob": 0.5,
    "photometric": True,
    "eval_scale": (2048, 512),
    "eval_mode": "slide",
    "eval_crop_size": (512, 512),
    "eval_stride": (480, 480),
    "per_device_eval_batch_size": 1,
    "eval_steps": 16_000,
    "checkpointing_steps": 16_000,
    "dataloader_num_workers": 4,
}


def _recipe(**changes: Any) -> MappingProxyType:
    unknown = set(changes) - set(PAPER_RECIPE)
    if unknown:
        raise KeyError(f"Not recipe fields: {sorted(unknown)}")
    return MappingProxyType({**PAPER_RECIPE, **changes})


RECIPES: dict[str, MappingProxyType] = {
    # The project's demo: a fresh SegFormer-B0-offset on the synthetic scenes, minutes on a laptop CPU.
    "demo": _recipe(
        learning_rate=1e-3,
        warmup_steps=30,
        ratio_range=(0.75, 1.5),
        max_train_steps=500,
        total_batch_size=8,
        crop_size=(128, 128),
        resize_scale=(512, 128),
        eval_scale=(512, 128),
        eval_mode="whole",
        per_device_eval_batch_size=8,
        eval_steps=250,
        checkpointing_steps=250,
        dataloader_num_workers=0,
    ),
    "ade20k-160k": _recipe(),  # 150 classes
    "cityscapes-160k": _recipe(  # 19 classes
        total_batch_size=8,
        crop_size=(1024, 1024),
        resize_scale=(2048, 1024),
        eval_scale=(2048, 1024),
        eval_crop_size=(1024, 1024),
        eval_stride=(768, 768),
    ),
    "coco-stuff-80k": _recipe(max_train_steps=80_000, eval_steps=8_000, checkpointing_steps=8_000),  # 171 classes
    "pascal-context-59-80k": _recipe(  # 59 classes: the 60th, background, is ignored (reduced labels)
        max_train_steps=80_000,
        eval_steps=8_000,
        checkpointing_steps=8_000,
        crop_size=(480, 480),
        resize_scale=(520, 520),
        eval_scale=(520, 520),
        eval_crop_size=(480, 480),
        eval_stride=(320, 320),
    ),
}
DEFAULT_RECIPE = "demo"

# The official Mask2Former(-offset) Swin-T ADE20K config: AdamW lr 1e-4, weight decay 0.05; backbone at 0.1x the lr;
# no weight decay for norms, position and query/level embeddings; gradients clipped to L2 norm 0.01; poly (0.9)
# from the first step, no warmup; checkpoints and evaluation every 5000 steps, on whole images; on ADE20K its random
# resize draws a short edge from 256, 307, ..., 1024 (long edge at most 2048) instead of mmseg's ratio resize.
_MASK2FORMER = {
    "learning_rate": 1e-4,
    "weight_decay": 0.05,
    "head_lr_mult": 1.0,
    "backbone_lr_mult": 0.1,
    "clip_grad_norm": 0.01,
    "warmup_steps": 0,
    "poly_power": 0.9,
    "eval_mode": "whole",
}

# Per model family (the variant's decode head, or "mask2former"): recipe values its official configs set differently.
FAMILY_CHANGES: dict[str, dict[str, dict[str, Any]]] = {
    "lightham": {"ade20k-160k": {"eval_mode": "whole"}, "coco-stuff-80k": {"eval_mode": "whole"}},
    "mask2former": {
        "ade20k-160k": {
            **_MASK2FORMER,
            "resize_mode": "shortest_edge",
            "eval_steps": 5_000,
            "checkpointing_steps": 5_000,
        },
        # The demo trains from scratch: the backbone at the full rate, a higher peak, the demo's short schedule.
        "demo": {**_MASK2FORMER, "learning_rate": 3e-4, "backbone_lr_mult": 1.0, "eval_mode": "whole"},
    },
}


# Data sources (`load_segmentation_splits` arguments, the scripts' flags) whose data set has a recipe of its own.
SOURCE_RECIPES: dict[str, str] = {"pascal_context_root": "pascal-context-59-80k"}


def default_recipe(demo: bool, source: str | None = None) -> str:
    """The recipe of a run that names none: the demo's on the demo set, the data set's own for a `source` in
    `SOURCE_RECIPES` (`pascal_context_root`: pascal-context-59-80k), else the paper's ADE20K recipe."""
    return DEFAULT_RECIPE if demo else SOURCE_RECIPES.get(source, "ade20k-160k")


def get_recipe(name: str, family: str | None = None) -> dict[str, Any]:
    """A mutable copy of a recipe's values, with `family`'s changes (`FAMILY_CHANGES`) when given."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; known: {', '.join(RECIPES)}.")
    return {**RECIPES[name], **FAMILY_CHANGES.get(family, {}).get(name, {})}


def family_of(variant: str) -> str:
    """The model family of a variant (its decode head, or "mask2former"), the key of `FAMILY_CHANGES`."""
    return variant_family(variant)


def saved_model_family(name_or_path: str, **hub_kwargs: Any) -> str | None:
    """The model family (decode head) of a saved OffSeg model (folder or Hub id), read from its config.json alone;
    None when that cannot be read here (the model's own loading then says why)."""
    from transformers import PreTrainedConfig

    try:
        config, _ = PreTrainedConfig.get_config_dict(name_or_path, **hub_kwargs)
    except (OSError, ValueError):
        return None
    if config.get("model_type") == OffSegMask2FormerConfig.model_type:
        return MASK2FORMER_FAMILY
    return config.get("decode_head")


def validate_settings(settings: dict[str, Any]) -> None:
    """Raise `ValueError` naming the first value no run can use (before any work is done)."""
    for name, field in RECIPE_FIELDS.items():
        if field.choices and settings[name] not in field.choices:
            raise ValueError(f"--{name} {settings[name]!r} is not one of: {', '.join(field.choices)}.")
    pairs = ("crop_size", "resize_scale", "eval_scale", "eval_crop_size", "eval_stride")
    positive = ("learning_rate", "poly_power", "max_train_steps", "total_batch_size", "per_device_eval_batch_size")
    for name in (*positive, *pairs):
        values = settings[name] if name in pairs else (settings[name],)
        if not all(value > 0 for value in values):
            raise ValueError(f"--{name} must be positive, got {settings[name]}.")
    for name in (
        "weight_decay",
        "warmup_steps",
        "eval_steps",
        "checkpointing_steps",
        "dataloader_num_workers",
        "backbone_lr_mult",
        "clip_grad_norm",
    ):
        if settings[name] < 0:
            raise ValueError(f"--{name} must not be negative, got {settings[name]}.")
    for name in ("flip_prob", "cat_max_ratio", "warmup_start_factor"):
        if not 0 <= settings[name] <= 1:
            raise ValueError(f"--{name} must be in [0, 1], got {settings[name]}.")
    low, high = settings["ratio_range"]
    if not 0 < low <= high:
        raise ValueError(f"--ratio_range needs 0 < MIN <= MAX, got {low} {high}.")


def resolve_settings(overrides: dict[str, Any], recipe: str, family: str | None = None) -> dict[str, Any]:
    """The recipe's values (with `family`'s changes; by default the family of the variant the settings name) and
    every non-None override on top (CLI flags left unset are None), pairs as tuples, checked by
    `validate_settings`."""
    if family is None:
        variant = overrides.get("variant") or get_recipe(recipe)["variant"]
        family = family_of(variant) if variant in ALL_VARIANTS else None
    settings = get_recipe(recipe, family)
    unknown = set(overrides) - set(settings)
    if unknown:
        raise ValueError(f"Not recipe fields: {sorted(unknown)}")
    for key, value in overrides.items():
        if value is not None:
            settings[key] = tuple(value) if isinstance(value, list) else value
    validate_settings(settings)
    return settings


@dataclass(frozen=True)
class EvalProtocol:
    """How a recipe evaluates: keep-ratio resize to `scale`, then `mode` inference ("whole", or "slide" windows of
    `crop_size` every `stride`), `batch_size` images a forward pass. `inference_kwargs()` are
    `offseg_hf.evaluation.inference.evaluate_dataset`'s."""

    scale: tuple[int, int]
    mode: str
    crop_size: tuple[int, int]
    stride: tuple[int, int]
    batch_size: int

    def inference_kwargs(self) -> dict[str, Any]:
        return {"mode": self.mode, "crop_size": self.crop_size, "stride": self.stride, "batch_size": self.batch_size}


def eval_protocol(recipe_or_settings: str | dict[str, Any], family: str | None = None) -> EvalProtocol:
    """The evaluation protocol of a recipe (by name, for a model `family`) or of resolved settings."""
    if isinstance(recipe_or_settings, str):
        settings = get_recipe(recipe_or_settings, family)
    else:
        settings = recipe_or_settings
    return EvalProtocol(
        scale=tuple(settings["eval_scale"]),
        mode=settings["eval_mode"],
        crop_size=tuple(settings["eval_crop_size"]),
        stride=tuple(settings["eval_stride"]),
        batch_size=settings["per_device_eval_batch_size"],
    )


def per_device_batch_size(total_batch_size: int, num_processes: int, gradient_accumulation_steps: int) -> int:
    """Images per process and micro-step so that a step sees `total_batch_size` images over all processes."""
    shares = num_processes * gradient_accumulation_steps
    if total_batch_size % shares:
        raise ValueError(
            f"total batch size {total_batch_size} is not divisible by {num_processes} processes x "
            f"{gradient_accumulation_steps} accumulation steps; set --per_device_train_batch_size instead."
        )
    return total_batch_size // shares


def default_output_dir(recipe: str, model: str) -> str:
    """`outputs/<recipe>-<model>` (`model`: a variant, or the last part of the folder / Hub id fine-tuned): runs
    of different models never share a folder by default."""
    return f"outputs/{recipe}-{Path(model.rstrip('/')).name}"
