"""Which form of an operation a module runs: the one place that says how the choice is made.

The model files (`offset_learning.py`, `freqfusion.py`, `losses.py`) hold each operation in its reference form, the
math of the paper and of the official code written as directly as PyTorch allows. Some operations also have forms
that compute the same values (up to float rounding) faster in a given setting; those live in the `fast_*.py` files
beside them, each with a test against the reference form:

* CARAFE and the neighbour similarities (`fast_freqfusion.py`). Fast: a loop over the k*k taps accumulating in
  place, and with a gradient one autograd node with a hand-written backward. Export: one gather of every window and
  a batched product.
* FreqFusion's resampler sampling. Fast: `F.grid_sample` (the reference). Export: a gather of the four neighbours'
  channel rows.
* FreqFusion as a whole. Fast: the reference order through the fast ops. Export: the kernels kept in the gathers'
  layout, one crop at the end (`fast_freqfusion.fuse_by_gather`).
* CARAFE compiled (`fast_freqfusion.compiled_carafe`, opt-in). Compiled: a sum of shifted channel rows that
  inductor turns into one loop nest, for CPU inference (`compiled_kernels`); every other operation runs its fast
  form.
* Offset learning (`fast_offset_learning.py`). Fast: the feature-offset term right to left through a (K, K) factor,
  the class rows padded for the GEMMs. Export: the same products without the padding, a last-axis softmax.
* Mask2Former's offset learning. Fast (and export): the (Q, Q) factor first; masks wanted at the attention-mask size
  computed at that size.
* The loss (`fast_losses.py`). Fast: band by band, the upsampling as two small GEMMs (never exported).
* 1x1 convolutions of the decoders' `ConvNormAct` and EfficientFormerV2's talking heads (`fast_layers.py`). Fast: one
  matrix product over the channels of a channels-first CPU map (`pointwise_as_matmul`); the convolution otherwise.

A module with more than one form subclasses `HasForms` and reads its own `form` attribute in `forward`: "fast" by
default, "reference", "compiled" or "export" when set on that instance with `set_form(model, ...)` or, for a block,
`using_form(model, ...)`; under "compiled" a module without a compiled form of its own runs its fast form. The
choice is per model instance: nothing global changes, so another model (or the same one in another thread, while no
one switches it) is unaffected. The rules that depend on how a module is run are decided here:
`hand_written_backward` (the fast form's autograd nodes with hand-written backwards are used only when a gradient
will be taken, and not under `torch.compile`, which traces the plain loops), `compiled_kernels` (the compiled form's
kernels run for CPU inference only), `pointwise_as_matmul` (a 1x1 convolution runs as a matrix product on
channels-first CPU maps only) and `exporting` (under `torch.export` the fast form leaves out what only helps eager
CPU kernels, such as the class-row padding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

FORMS = ("reference", "fast", "compiled", "export")


class HasForms:
    """Mixin of the modules that have forms besides their reference form (see the module docstring)."""

    form: str = "fast"


def _modules_with_forms(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, HasForms)]


def set_form(model: nn.Module, form: str) -> None:
    """Make every module of `model` that has forms run `form` ("reference", "fast", "compiled" or "export")."""
    if form not in FORMS:
        raise ValueError(f"Unknown form {form!r}; the forms are {', '.join(FORMS)}.")
    for module in _modules_with_forms(model):
        module.form = form


@contextlib.contextmanager
def using_form(model: nn.Module, form: str) -> Iterator[nn.Module]:
    """Within the block, `model`'s modules run `form`; each module's previous form is restored on exit."""
    previous = [(module, module.form) for module in _modules_with_forms(model)]
    set_form(model, form)
    try:
        yield model
    finally:
        for module, old in previous:
            module.form = old


def hand_written_backward(*inputs: torch.Tensor) -> bool:
    """Whether a fast op runs as its autograd node with a hand-written backward: only when a gradient will be taken
    and not under `torch.compile` (which traces the plain loop and derives its own backward)."""
    return _needs_gradient(inputs) and not torch.compiler.is_compiling()


def compiled_kernels(*inputs: torch.Tensor) -> bool:
    """Whether the compiled form runs its inductor-compiled kernels: inference on the CPU (the form was measured on
    CPUs only; with a gradient the fast form's hand-written backward runs instead of compiling one)."""
    return all(tensor.device.type == "cpu" for tensor in inputs) and not _needs_gradient(inputs)


def _needs_gradient(inputs: tuple[torch.Tensor, ...]) -> bool:
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs)


def pointwise_as_matmul(x: torch.Tensor) -> bool:
    """Whether a 1x1 convolution of the (B, C, H, W) map `x` runs as one matrix product (`fast_layers.pointwise_conv`):
    on the CPU, for a channels-first (contiguous) map, outside `torch.export`. oneDNN's convolution is the measured
    slow case there; on channels-last maps it is fast, exported graphs keep the convolution for their runtimes, and
    other devices were not measured."""
    return x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous() and not exporting()


def exporting() -> bool:
    """Whether the module is being traced by `torch.export` (ONNX, ExecuTorch): the fast form then leaves out what
    only helps eager kernels."""
    return torch.compiler.is_exporting()


__all__ = [
    "FORMS",
    "HasForms",
    "compiled_kernels",
    "exporting",
    "hand_written_backward",
    "pointwise_as_matmul",
    "set_form",
    "using_form",
]
