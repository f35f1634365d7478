"""The paper's training recipe as library code: recipes, optimizer parameter groups, the warmup + poly schedule,
BatchNorm handling, atomic checkpoints and training-time evaluation. `examples/train.py` is a thin loop over it.

The recipe is mmseg's (which the paper uses): AdamW (lr 6e-5, betas (0.9, 0.999), weight decay 0.01), the decode
head at 10x the learning rate, no weight decay on norm layers and positional blocks, linear warmup over 1500
iterations from a factor 1e-6, then poly decay (power 1) to 0 at the last iteration; 16 images a step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# --------------------------------------------------------------------------------------------------------------
# Recipes: the one place for the training defaults (`examples/train.py --help` prints them).

_PAPER_OPTIMIZER = {
    "learning_rate": 6e-5,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "weight_decay": 0.01,
    "head_lr_mult": 10.0,
    "warmup_steps": 1500,
    "warmup_start_factor": 1e-6,
    "poly_power": 1.0,
}
_PAPER_AUGMENTATION = {
    "ratio_range": (0.5, 2.0),
    "cat_max_ratio": 0.75,
    "flip_prob": 0.5,
    "photometric": True,
}

RECIPES: dict[str, dict[str, Any]] = {
    # The project's demo: a fresh SegFormer-B0-offset on the synthetic scenes, minutes on a laptop CPU.
    "demo": {
        "variant": "segformer-b0-offset",
        **_PAPER_OPTIMIZER,
        "learning_rate": 1e-3,
        "warmup_steps": 30,
        **_PAPER_AUGMENTATION,
        "ratio_range": (0.75, 1.5),
        "max_train_steps": 500,
        "total_batch_size": 8,
        "crop_size": (128, 128),
        "resize_scale": (512, 128),
        "eval_scale": (512, 128),
        "eval_steps": 250,
        "checkpointing_steps": 250,
        "dataloader_num_workers": 0,
        "demo_image_size": 128,
        "demo_num_train": 400,
        "demo_num_validation": 100,
    },
    # ADE20K, 150 classes: 160k iterations, crop 512, 16 images a step (8 GPUs x 2).
    "ade20k-160k": {
        "variant": "segformer-b0-offset",
        **_PAPER_OPTIMIZER,
        **_PAPER_AUGMENTATION,
        "max_train_steps": 160_000,
        "total_batch_size": 16,
        "crop_size": (512, 512),
        "resize_scale": (2048, 512),
        "eval_scale": (2048, 512),
        "eval_steps": 16_000,
        "checkpointing_steps": 16_000,
        "dataloader_num_workers": 4,
    },
    # Cityscapes, 19 classes: 160k iterations, crop 1024, 8 images a step (8 GPUs x 1).
    "cityscapes-160k": {
        "variant": "segformer-b0-offset",
        **_PAPER_OPTIMIZER,
        **_PAPER_AUGMENTATION,
        "max_train_steps": 160_000,
        "total_batch_size": 8,
        "crop_size": (1024, 1024),
        "resize_scale": (2048, 1024),
        "eval_scale": (2048, 1024),
        "eval_steps": 16_000,
        "checkpointing_steps": 16_000,
        "dataloader_num_workers": 4,
    },
    # COCO-Stuff-164k, 171 classes: 80k iterations, crop 512, 16 images a step.
    "coco-stuff-80k": {
        "variant": "segformer-b0-offset",
        **_PAPER_OPTIMIZER,
        **_PAPER_AUGMENTATION,
        "max_train_steps": 80_000,
        "total_batch_size": 16,
        "crop_size": (512, 512),
        "resize_scale": (2048, 512),
        "eval_scale": (2048, 512),
        "eval_steps": 8_000,
        "checkpointing_steps": 8_000,
        "dataloader_num_workers": 4,
    },
}
DEFAULT_RECIPE = "demo"


def get_recipe(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; known: {', '.join(RECIPES)}.")
    return dict(RECIPES[name])


def resolve_settings(overrides: dict[str, Any], recipe: str) -> dict[str, Any]:
    """The recipe's values with every non-None override on top (CLI flags left unset are None)."""
    settings = get_recipe(recipe)
    settings.update({key: value for key, value in overrides.items() if value is not None})
    return settings


def per_device_batch_size(total_batch_size: int, num_processes: int, gradient_accumulation_steps: int) -> int:
    """Images per process and micro-step so that a step sees `total_batch_size` images over all processes."""
    shares = num_processes * gradient_accumulation_steps
    if total_batch_size % shares:
        raise ValueError(
            f"total batch size {total_batch_size} is not divisible by {num_processes} processes x "
            f"{gradient_accumulation_steps} accumulation steps; set --per_device_train_batch_size instead."
        )
    return total_batch_size // shares


# --------------------------------------------------------------------------------------------------------------
# Optimizer

NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
NO_DECAY_NAME_KEYS: tuple[str, ...] = ("pos_block", "norm")


def _is_norm_layer(module: nn.Module) -> bool:
    return isinstance(module, NORM_LAYERS) or (hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm))


def param_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    head_lr_mult: float = 10.0,
    encoder_prefix: str | None = None,
    no_decay_name_keys: tuple[str, ...] = NO_DECAY_NAME_KEYS,
) -> list[dict[str, Any]]:
    """AdamW parameter groups of the recipe.

    * Learning rate: parameters under the encoder (`offseg.encoder`, or `encoder` for an `OffSegModel`) get
      `learning_rate`; every other parameter (decode head, classifier) gets `head_lr_mult` times it, mmseg's
      `'head': lr_mult=10` (in mmseg everything outside the backbone is `decode_head.*`).
    * Weight decay: 0 for the parameters of norm layers (LayerNorm, BatchNorm/SyncBatchNorm, GroupNorm, ...,
      found by module type, so any naming works) and for parameters whose name contains a key of
      `no_decay_name_keys` (mmseg's `'pos_block'` and `'norm'` custom keys); `weight_decay` for the rest.
      Biases of other layers keep their decay: mmseg's recipe exempts only the 'norm' and 'pos_block' keys, and
      so does this.

    Where this differs from mmseg: mmengine applies only the first matching custom key, and 'head' sorts before
    'norm', so in the official runs the decode head's norm layers kept their decay, and MiT's end-of-stage
    LayerNorms (named `layers.N.2`, without 'norm') were decayed too. Here every norm layer is exempt, as the
    recipe states. Each group carries a "name" ("encoder"/"head" + "decay"/"no_decay") and its "lr_mult".
    """
    if encoder_prefix is None:
        encoder_prefix = "offseg.encoder" if hasattr(model, "offseg") else "encoder"
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        norm_layer = _is_norm_layer(module)
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            in_encoder = name == encoder_prefix or name.startswith(encoder_prefix + ".")
            no_decay = norm_layer or any(key in name for key in no_decay_name_keys)
            groups.setdefault((in_encoder, no_decay), []).append(param)
    result = []
    for (in_encoder, no_decay), params in sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1])):
        lr_mult = 1.0 if in_encoder else head_lr_mult
        result.append(
            {
                "params": params,
                "lr": learning_rate * lr_mult,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_mult": lr_mult,
                "name": f"{'encoder' if in_encoder else 'head'}_{'no_decay' if no_decay else 'decay'}",
            }
        )
    return result


def build_optimizer(model: nn.Module, settings: dict[str, Any]) -> torch.optim.AdamW:
    """AdamW over `param_groups` with the recipe's learning rate, betas and weight decay."""
    groups = param_groups(model, settings["learning_rate"], settings["weight_decay"], settings["head_lr_mult"])
    return torch.optim.AdamW(
        groups,
        lr=settings["learning_rate"],
        betas=(settings["adam_beta1"], settings["adam_beta2"]),
        weight_decay=settings["weight_decay"],
    )


# --------------------------------------------------------------------------------------------------------------
# Schedule


@dataclass
class WarmupPolyFactor:
    """Learning-rate factor at a step: mmseg's LinearLR warmup then PolyLR, iteration-based.

    For step t (0-based, the optimizer steps already taken): `start + (1 - start) * t / warmup` while t < warmup,
    then `(1 - (t - warmup) / (total - warmup)) ** power`, reaching 0 after the last step (t = total).
    A dataclass so `LambdaLR.state_dict()` saves it.
    """

    total_steps: int
    warmup_steps: int = 1500
    start_factor: float = 1e-6
    power: float = 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        return max(0.0, 1.0 - (step - self.warmup_steps) / decay_steps) ** self.power


def build_scheduler(optimizer: torch.optim.Optimizer, settings: dict[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
    """Step it once per optimizer step; every group keeps its own base lr (so the head stays at 10x)."""
    factor = WarmupPolyFactor(
        total_steps=settings["max_train_steps"],
        warmup_steps=settings["warmup_steps"],
        start_factor=settings["warmup_start_factor"],
        power=settings["poly_power"],
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)


# --------------------------------------------------------------------------------------------------------------
# BatchNorm


def convert_sync_batchnorm(model: nn.Module, accelerator) -> nn.Module:
    """SyncBatchNorm across processes when training distributed on GPUs (mmseg's SyncBN); unchanged otherwise
    (one process, or CPU/gloo where torch has no SyncBatchNorm)."""
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@torch.no_grad()
def sync_buffers(model: nn.Module, accelerator) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over processes.

    DDP copies rank 0's buffers to the others at the start of each forward, so after a step every process holds
    the statistics of its own last batch; without SyncBatchNorm (CPU/gloo) they then differ. Averaging them before
    evaluating or saving (as mmengine does before evaluation) makes every process hold the same model. A no-op for
    one process, and with SyncBatchNorm, where they already agree.
    """
    if accelerator.num_processes == 1:
        return
    for buffer in accelerator.unwrap_model(model).buffers():
        if buffer.is_floating_point():
            buffer.copy_(accelerator.reduce(buffer.detach().clone(), reduction="mean"))


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: `output_dir/step_N`, written atomically.

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a trainer_state.json), oldest first."""
    found = []
    root = Path(output_dir)
    if not root.is_dir():
        return found
    for path in root.iterdir():
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and (path / TRAINER_STATE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str | os.PathLike) -> Path:
    """A checkpoint folder from `--resume_from_checkpoint`: a path, or "latest" (newest under output_dir)."""
    if resume_from_checkpoint == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint under {output_dir}.")
        return path
    path = Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE}).")
    return path


def read_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    with open(Path(checkpoint) / TRAINER_STATE) as handle:
        return json.load(handle)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _clean_interrupted_saves(output_dir: Path) -> None:
    """Remove staging folders of saves that never completed; put back a checkpoint moved aside by a re-save of
    the same step that stopped between its two renames."""
    for path in output_dir.glob(".tmp-*"):
        shutil.rmtree(path)
    for path in output_dir.glob(".old-*"):
        original = output_dir / path.name[len(".old-") :]
        if original.exists():
            shutil.rmtree(path)
        else:
            os.replace(path, original)


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    trainer_state: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """`accelerator.save_state` (model, optimizer, scheduler, RNG of every process, registered objects) into
    `output_dir/step_N`, atomically: everything is written into `.tmp-step_N`, the trainer state last, and only
    then renamed into place. A crash or error while writing leaves the previous checkpoints as they were, and
    `latest_checkpoint` never picks a partial one. Call on every process. `total_limit` keeps the newest N.
    """
    output_dir = Path(output_dir)
    final = checkpoint_path(output_dir, step)
    staging = output_dir / f".tmp-{final.name}"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _clean_interrupted_saves(output_dir)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(staging / TRAINER_STATE, "w") as handle:
            json.dump({**trainer_state, "step": step}, handle, indent=2)
        _fsync_tree(staging)
        if final.exists():  # re-saving a step: move the old copy aside only once the new one is complete
            retired = output_dir / f".old-{final.name}"
            if retired.exists():
                shutil.rmtree(retired)
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired)
        else:
            os.replace(staging, final)
        if total_limit is not None and total_limit > 0:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, dataset, accelerator, num_labels: int, ignore_index: int = 255, num_workers: int = 0):
    """Whole-image mIoU over `dataset` (a `SegmentationDataset` with an `EvalTransform`), sharded over processes.

    Process r evaluates samples r, r + P, ...; the per-process confusion matrices are summed with
    `accelerator.reduce`, so every sample counts once. Logits are upsampled bilinearly to the label size before
    the argmax. Returns `SegmentationMetrics.compute()` plus "num_pixels" (labelled pixels over all processes)
    and "local_num_pixels" (this process's share).
    """
    from tqdm.auto import tqdm

    from .metrics import SegmentationMetrics

    network = accelerator.unwrap_model(model)  # no DDP collectives: shards may differ in length
    was_training = network.training
    network.eval()
    shard = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard), batch_size=None, num_workers=num_workers
    )
    metrics = SegmentationMetrics(num_labels=num_labels, ignore_index=ignore_index)
    for sample in tqdm(loader, desc="eval", disable=not accelerator.is_local_main_process, leave=False):
        pixel_values = sample["pixel_values"][None].to(accelerator.device)  # (1, 3, h, w)
        labels = sample["labels"]  # (H, W), the original size
        with accelerator.autocast():
            logits = network(pixel_values=pixel_values).logits  # (1, K, h/8, w/8)
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        metrics.update(logits.argmax(1)[0].cpu(), labels)
    local_pixels = int(metrics.confusion.sum())
    confusion = accelerator.reduce(metrics.confusion.to(accelerator.device), reduction="sum")
    total = SegmentationMetrics(num_labels=num_labels, ignore_index=ignore_index)
    total.merge(confusion.cpu())
    result = total.compute()
    result["num_pixels"] = int(total.confusion.sum())
    result["local_num_pixels"] = local_pixels
    network.train(was_training)
    return result


def format_metrics(result: dict[str, Any], id2label: dict[int, str] | None = None) -> str:
    """One line: mIoU, mAcc, aAcc in percent, then per-class IoU."""
    line = (
        f"mIoU {100 * result['mean_iou']:.2f}  mAcc {100 * result['mean_accuracy']:.2f}  "
        f"aAcc {100 * result['overall_accuracy']:.2f}"
    )
    if id2label:
        per_class = ", ".join(
            f"{id2label.get(index, index)} {'n/a' if math.isnan(iou) else f'{100 * iou:.1f}'}"
            for index, iou in enumerate(result["per_category_iou"])
        )
        line += f"  | IoU: {per_class}"
    return line


__all__ = [
    "DEFAULT_RECIPE",
    "RECIPES",
    "WarmupPolyFactor",
    "build_optimizer",
    "build_scheduler",
    "checkpoint_path",
    "convert_sync_batchnorm",
    "evaluate",
    "format_metrics",
    "get_recipe",
    "latest_checkpoint",
    "list_checkpoints",
    "param_groups",
    "per_device_batch_size",
    "read_trainer_state",
    "resolve_checkpoint",
    "resolve_settings",
    "save_checkpoint",
    "sync_buffers",
]
