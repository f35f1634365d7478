"""The training loop and what runs around it: the endless sample stream, BatchNorm across processes, gradient
accumulation through Accelerate, the non-finite-loss stop, and training-time evaluation with the recipe's
protocol (`offseg_hf.evaluation.inference.evaluate_dataset`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.datasets import StreamSampler, collate_segmentation, seed_worker
from .recipes import EvalProtocol


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before the bad step is applied."""


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
# Data


def stream_loader(
    dataset, batch_size: int, accelerator, seed: int, samples_seen: int = 0, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """This process's endless training batches (mmseg's infinite sampler): draw g of one seeded global order goes
    to process g % P, so the images of a step do not depend on how they are split over processes, and a resumed
    run (`samples_seen` images over all processes) starts at the next unseen draw. Not for `accelerator.prepare`:
    the sampler already shards."""
    sampler = StreamSampler(
        len(dataset),
        seed=seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        start=samples_seen // accelerator.num_processes,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_segmentation,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed + accelerator.process_index),
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


# --------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainerState:
    """Where a run stands: optimizer steps taken, images consumed over all processes, the newest checkpoint."""

    step: int = 0
    samples_seen: int = 0
    last_checkpoint: Path | None = None


def _non_finite_message(loss: float, state: TrainerState, micro_step: int) -> str:
    where = (
        f"The last checkpoint, {state.last_checkpoint}, is intact: "
        if state.last_checkpoint
        else "No checkpoint was saved. "
    )
    return (
        f"The training loss is {loss} at step {state.step + 1} (micro-step {micro_step}); stopped before applying "
        f"it. {where}lower --learning_rate, check the data, or use --mixed_precision bf16/no, then "
        "--resume_from_checkpoint latest."
    )


def train(
    accelerator,
    model: nn.Module,
    optimizer,
    scheduler,
    batches: Iterator[dict[str, torch.Tensor]],
    state: TrainerState,
    *,
    max_steps: int,
    images_per_step: int,
    logging_steps: int = 10,
    after_step: Callable[[TrainerState], Any] | None = None,
    clip_grad_norm: float = 0.0,
) -> None:
    """Optimizer steps from `state.step` to `max_steps`, each of `accelerator.gradient_accumulation_steps`
    micro-batches from `batches`, through Accelerate's accumulation: `accumulate` counts micro-steps (and skips
    DDP's all-reduce on all but the last), `backward` divides the loss by the accumulation steps, and the
    prepared optimizer steps and zeroes only on the last micro-step. The loader is not prepared, so that count
    alone decides when a step completes. The scheduler (prepared with `step_scheduler_with_optimizer=False`)
    steps here once per applied optimizer step, not after an fp16 overflow skipped it.

    `clip_grad_norm` > 0 clips the global L2 norm of the gradients before each applied step (mmengine's
    `clip_grad=dict(max_norm=..., norm_type=2)`, the Mask2Former configs' 0.01), through Accelerate, which unscales
    fp16 gradients first.

    Raises `NonFiniteLossError` before a NaN/inf loss (on any process) reaches the weights. Logs the mean loss
    and each parameter group's learning rate every `logging_steps`; calls `after_step(state)` after each step.
    """
    progress = tqdm(total=max_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process)
    accumulation = accelerator.gradient_accumulation_steps
    model.train()
    running_loss, running_count = 0.0, 0
    while state.step < max_steps:
        batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in next(batches).items()}
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            mean_loss = accelerator.reduce(loss.detach().float(), reduction="mean").item()
            if not math.isfinite(mean_loss):
                micro_step = (accelerator.step - 1) % accumulation + 1
                raise NonFiniteLossError(_non_finite_message(mean_loss, state, micro_step))
            accelerator.backward(loss)
            if clip_grad_norm > 0 and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            if accelerator.sync_gradients and not optimizer.step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        running_loss += mean_loss
        running_count += 1
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        state.samples_seen += images_per_step
        progress.update(1)
        if state.step % logging_steps == 0 or state.step == max_steps:
            learning_rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
            base_lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_mult"]
            average = running_loss / running_count
            progress.set_postfix(loss=f"{average:.4f}", lr=f"{base_lr:.2e}")
            accelerator.log(
                {"train/loss": average, **{f"train/lr_{name}": lr for name, lr in learning_rates.items()}},
                step=state.step,
            )
            running_loss, running_count = 0.0, 0
        if after_step is not None:
            after_step(state)
    progress.close()


# --------------------------------------------------------------------------------------------------------------
# Evaluation


@contextlib.contextmanager
def _without_autocast(network: nn.Module) -> Iterator[nn.Module]:
    """`network` running its own forward: for mixed precision, Accelerate's `prepare` replaces the model's forward
    with an autocast wrapper and keeps the original as `_original_forward` (what `unwrap_model(...,
    keep_fp32_wrapper=False)` restores for good); here it is restored only for the duration."""
    original = network.__dict__.get("_original_forward")
    if original is None:
        yield network
        return
    wrapped = network.__dict__["forward"]
    network.forward = original
    try:
        yield network
    finally:
        network.forward = wrapped


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    accelerator,
    num_labels: int,
    protocol: EvalProtocol,
    ignore_index: int = 255,
    num_workers: int = 0,
) -> dict[str, Any]:
    """mIoU over `dataset` (a `SegmentationDataset` with an `EvalTransform` of `protocol.scale`) with the recipe's
    inference `protocol`, sharded over processes.

    BatchNorm statistics are first averaged over processes (`sync_buffers`). Process r evaluates samples r, r + P,
    ... in eval mode (`offseg_hf.evaluation.inference.evaluate_dataset`, as `examples/evaluate_segmentation.py` does,
    which
    then restores every submodule's mode); the per-process confusion matrices are summed with `accelerator.reduce`,
    so every sample counts once. Returns `SegmentationMetrics.compute()` plus "num_pixels" (labelled pixels over all
    processes) and "local_num_pixels" (this process's share).
    """
    from ..evaluation.inference import evaluate_dataset
    from ..evaluation.metrics import SegmentationMetrics

    sync_buffers(model, accelerator)
    # float32 whatever the training precision (as mmengine's ValLoop, and as examples/evaluate_segmentation.py), so
    # training and the script report the same figures for the same weights.
    with _without_autocast(accelerator.unwrap_model(model)) as network:  # unwrapped: no DDP collectives
        metrics = evaluate_dataset(
            network,
            dataset,
            num_labels,
            ignore_index=ignore_index,
            **protocol.inference_kwargs(),
            num_workers=num_workers,
            device=accelerator.device,
            shard=(accelerator.process_index, accelerator.num_processes),
            progress=accelerator.is_local_main_process,
        )
    local_pixels = int(metrics.confusion.sum())
    confusion = accelerator.reduce(metrics.confusion.to(accelerator.device), reduction="sum")
    total = SegmentationMetrics(num_labels=num_labels, ignore_index=ignore_index)
    total.merge(confusion.cpu())
    result = total.compute()
    result["num_pixels"] = int(total.confusion.sum())
    result["local_num_pixels"] = local_pixels
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


def metrics_to_log(result: dict[str, Any], id2label: dict[int, str]) -> dict[str, float]:
    """Tracker values of an evaluation: eval/mean_iou, eval/mean_accuracy, eval/overall_accuracy, eval/iou_<class>."""
    values = {f"eval/{key}": result[key] for key in ("mean_iou", "mean_accuracy", "overall_accuracy")}
    for index, iou in enumerate(result["per_category_iou"]):
        if not math.isnan(iou):
            values[f"eval/iou_{id2label.get(index, index)}"] = iou
    return values
