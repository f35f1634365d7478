"""Checkpoints: `output_dir/step_N`, written atomically, found again by `--resume_from_checkpoint`, refused when
they belong to another model; and the output folder rule (never overwrite another run's folder silently)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

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


# --------------------------------------------------------------------------------------------------------------
# The output folder


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, resume_from: str | os.PathLike | None) -> None:
    """HF's `--overwrite_output_dir` convention: a folder that already holds files (another run's model or
    checkpoints) is used only when the run resumes from one of that folder's own checkpoints or may overwrite it;
    else `FileExistsError`. Resuming a checkpoint from elsewhere does not license writing over this folder."""
    root = Path(output_dir)
    if overwrite or not root.is_dir():
        return
    if resume_from is not None and root.resolve() in Path(resume_from).resolve().parents:
        return
    entries = sorted(path.name for path in root.iterdir())
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        continue_it = "--resume_from_checkpoint latest to continue it, " if list_checkpoints(root) else ""
        raise FileExistsError(
            f"The output folder {root} is not empty ({shown}): pass --overwrite_output_dir to replace that run, "
            f"{continue_it}or another --output_dir."
        )


def _is_checkpoint_folder(name: str) -> bool:
    """`step_N`, or its staging (`.tmp-step_N`) or moved-aside (`.old-step_N`) copy."""
    for prefix in ("", ".tmp-", ".old-"):
        head = prefix + CHECKPOINT_PREFIX
        if name.startswith(head) and name[len(head) :].isdigit():
            return True
    return False


def remove_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Remove the checkpoints (complete, staged or moved aside) of an earlier run in `output_dir`, so that
    `--resume_from_checkpoint latest` can only find this run's. Call on the main process."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = [path for path in root.iterdir() if path.is_dir() and _is_checkpoint_folder(path.name)]
    for path in removed:
        shutil.rmtree(path)
    return removed


# --------------------------------------------------------------------------------------------------------------
# Which model a checkpoint belongs to


def model_signature(model: nn.Module, label: str) -> dict[str, Any]:
    """What trainer_state.json records about the model: `label` (the variant, or the folder fine-tuned), its
    config, and a digest of its state-dict names and shapes (what `load_state` needs to match)."""
    layout = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        layout.update(f"{name}:{tuple(tensor.shape)};".encode())
    config = getattr(model, "config", None)
    # As trainer_state.json will hold it (string keys), so a saved config compares equal to a built one.
    values = json.loads(json.dumps(config.to_diff_dict() if config is not None else {}))
    values.pop("transformers_version", None)
    return {"model": label, "model_config": values, "model_layout_sha256": layout.hexdigest()}


class CheckpointMismatchError(ValueError):
    """A checkpoint of another model than the one being trained."""


def check_same_model(checkpoint: str | os.PathLike, signature: dict[str, Any]) -> None:
    """Raise `CheckpointMismatchError` (one line naming both models) when `checkpoint` was saved from another
    model than the one `signature` describes. Checkpoints saved before signatures were recorded pass."""
    state = read_trainer_state(checkpoint)
    saved = state.get("model_layout_sha256")
    if saved is None or saved == signature["model_layout_sha256"]:
        return
    theirs, ours = state.get("model_config", {}), signature["model_config"]
    differing = sorted(key for key in theirs.keys() | ours.keys() if theirs.get(key) != ours.get(key))
    raise CheckpointMismatchError(
        f"{checkpoint} is a checkpoint of {state.get('model', 'another model')} but this run builds "
        f"{signature['model']} (config differs in: {', '.join(differing) or 'nothing; the layouts differ'}); resume "
        "with the same --variant / --config_overrides / --model_name_or_path, or train into another --output_dir."
    )


# --------------------------------------------------------------------------------------------------------------
# Atomic saves


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
