"""How every export form of a `transformers` module is put on the model being exported: the project's own subclass
of the module's class, set on that model's instances for the duration of a block (`swapped_classes`). Neither
`torch` nor `transformers` is modified, so any other model, in this thread or another, runs as before."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from torch import nn


@contextlib.contextmanager
def swapped_classes(model: nn.Module, forms: Mapping[type[nn.Module], type[nn.Module]]) -> Iterator[nn.Module]:
    """Within the block, every submodule of `model` whose class is exactly a key of `forms` has the class it maps to
    (a subclass of it, with the same attributes); each gets its own class back on exit, also after an exception.

    Only these instances change. Exact classes, not `isinstance`: a subclass of a `transformers` module has
    overrides of its own, which the export form would silently drop. Entering twice for one model is harmless: the
    inner block finds nothing left to swap."""
    for original, form in forms.items():
        if not issubclass(form, original):
            raise TypeError(f"{form.__name__} must subclass {original.__name__}, the class it stands in for.")
    swapped: list[tuple[nn.Module, type[nn.Module]]] = []
    try:
        for module in model.modules():
            form = forms.get(type(module))
            if form is not None:
                swapped.append((module, type(module)))
                module.__class__ = form
        yield model
    finally:
        for module, original in reversed(swapped):
            module.__class__ = original


__all__ = ["swapped_classes"]
