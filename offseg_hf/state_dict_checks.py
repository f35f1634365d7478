"""Checking that a state dict fits a module before loading it, with an error that lists what does not fit."""

from __future__ import annotations

from collections.abc import Callable

import torch


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
