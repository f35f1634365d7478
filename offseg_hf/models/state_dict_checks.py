"""Reading a state dict out of a loaded checkpoint, and checking that it fits a module before loading it, with
errors that say what is wrong."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .safe_pickle import read_checkpoint


def require_fit(
    expected: dict[str, torch.Tensor],
    given: dict[str, torch.Tensor],
    what: str,
    may_be_missing: Callable[[str], bool] = lambda key: False,
) -> None:
    """Raise `ValueError` naming the keys of `expected` missing from `given` (unless `may_be_missing`), the keys
    of `given` that `expected` lacks, and the keys whose shapes differ."""
    missing = [k for k in expected if k not in given and not may_be_missing(k)]
    unexpected = [k for k in given if k not in expected]
    mismatched = [k for k in given if k in expected and given[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{what}: missing {missing[:20]}, unexpected {unexpected[:20]}, shape mismatch {mismatched[:20]}."
        )


def unwrap_state_dict(checkpoint, wrappers: tuple[str, ...] = ("state_dict",)) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: the value of the first of `wrappers` it has (mmseg/mmengine's
    `{"state_dict": ..., "meta": ...}`, timm's `{"model": ...}`), else the checkpoint itself; "module." prefixes
    (DistributedDataParallel) removed. Raises `ValueError` unless that is a dict of name -> tensor (a file of
    another kind, or an object a safe reader left inert, is refused here rather than failing later)."""
    for wrapper in wrappers:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(key, str) for key in checkpoint):
        raise ValueError(f"Not a state dict: a {type(checkpoint).__name__} (expected a dict of name -> tensor).")
    not_tensors = {
        key: type(value).__name__ for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)
    }
    if not_tensors:
        raise ValueError(
            f"{len(not_tensors)} state dict entries are not tensors: {dict(list(not_tensors.items())[:20])}"
        )
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def read_state_dict_file(path: str, wrappers: tuple[str, ...] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """The state dict in a weights file: `.safetensors` as is, anything else through `safe_pickle.read_checkpoint`
    (no code from the file runs), then `unwrap_state_dict`; a `ValueError` names the file."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        checkpoint = load_file(path)
    else:
        checkpoint = read_checkpoint(path)
    try:
        return unwrap_state_dict(checkpoint, wrappers)
    except ValueError as error:
        raise ValueError(f"{path!r}: {error}") from None
