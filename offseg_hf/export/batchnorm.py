"""BatchNorm folding for inference: every eval-mode BatchNorm that reads a convolution's output and nothing else is
folded into that convolution (`torch.nn.utils.fusion.fuse_conv_bn_weights`) and replaced by `nn.Identity`.

    from offseg_hf.export import fuse_for_inference

    model = model_for_variant("offseg-t", num_labels=150).eval()
    fuse_for_inference(model)          # in place; returns the model
    model.fused_conv_bn_pairs          # (("...conv", "...bn"), ...): what was folded

Which pairs are folded is decided from one traced forward pass (on a small random input, or `example_inputs`),
not from module names: forward hooks on the convolutions and BatchNorms and a `TorchFunctionMode` that sees every
torch call record, for each convolution output tensor, every operation that reads it. A pair is folded only when

- every output of the convolution is read by exactly one thing, the `F.batch_norm` of that one BatchNorm module,
  and by nothing else (no residual, activation, resize, view, in-place op or model output in between; metadata
  such as `.shape` does not count);
- every input of the BatchNorm is an output of that convolution;
- neither module's parameters are used outside its own forward (as `SegformerPixelDecoder` does with its fusion
  conv's weight, which `resize_and_project` applies blockwise: that BatchNorm stays);
- the BatchNorm uses running statistics (eval mode, `track_running_stats`), and both are plain torch modules
  (`nn.Conv1d/2d/3d` with their own forward, without parametrizations; `nn.BatchNorm1d/2d/3d`/`SyncBatchNorm`, or
  timm's `BatchNormAct2d`, whose dropout and activation stay in its place, see below).

Then (unless `fuse_activations=False`) a ReLU or GELU that timm's `BatchNormAct2d` applies right after a folded
`nn.Conv2d` moves into it: the conv becomes a `ConvActivation2d`, which runs both as one oneDNN op on CPU in float32
inference (and conv then activation everywhere else), and the BatchNorm's place holds `nn.Identity` (44 convs of
OffSeg-T).

The folding is computed in float64 and written into the convolution's own weight (its memory format is kept) and
bias (created when the convolution had none). A fused model is for inference only: it has no BatchNorm keys and
conv biases the unfused class does not have, so that model's `save_pretrained` refuses it (save the unfused model and
fuse after loading), and its `train()` refuses to switch it back to training mode. Both guards are set on the fused
instance only: the model classes, and the code a saved folder carries, know nothing of folding.

Per preset (150 classes), what folds: offseg-t/b/l every BatchNorm of timm's EfficientFormerV2 (its `ConvNorm`
and `ConvNormAct` blocks: 95 for T); SegFormer-offset the head's four stage projections (the fusion's BatchNorm
follows `resize_and_project`, not a conv module, and stays); SegNeXt MSCAN's stem and downsampling BatchNorms (5;
the blocks' `norm1`/`norm2` come before their convolutions, after a residual sum, and stay); Mask2Former has none.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvTransposeNd
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..models.forms import using_form

try:  # timm's BatchNorm + dropout + activation (EfficientFormerV2's ConvNormAct), and its GELU module
    from timm.layers.activations import GELU as TimmGELU
    from timm.layers.norm_act import BatchNormAct2d
except ImportError:  # pragma: no cover - timm is a dependency of the package
    BatchNormAct2d = TimmGELU = None

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PLAIN_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
# Tensor methods and attributes that read metadata only, never values: using a conv output through them is harmless.
_METADATA = frozenset(
    "shape size dim ndim ndimension dtype device layout is_contiguous numel nelement stride storage_offset "
    "requires_grad is_floating_point is_complex element_size data_ptr is_cuda is_meta is_sparse is_quantized "
    "is_nested get_device names __len__ grad_fn is_leaf".split()
)


class FusedModelError(RuntimeError):
    """An operation a BatchNorm-folded model cannot do (saving it, training it) or a model that cannot be fused."""


def _function_name(func) -> str | None:
    name = getattr(func, "__name__", None)
    if name == "__get__":  # attribute access such as `tensor.shape`: the descriptor's name
        name = getattr(getattr(func, "__self__", None), "__name__", None)
    return name


def _foldable_conv(module: nn.Module) -> bool:
    if not isinstance(module, _CONV_TYPES):
        return False
    base = next(cls for cls in _CONV_TYPES if isinstance(module, cls))
    return type(module).forward is base.forward and not torch.nn.utils.parametrize.is_parametrized(module)


def _foldable_batch_norm(module: nn.Module) -> bool:
    if not isinstance(module, _BatchNorm) or module.running_mean is None or module.running_var is None:
        return False
    if not module.track_running_stats:
        return False
    return type(module).forward in _PLAIN_BN_FORWARDS or (BatchNormAct2d is not None and type(module) is BatchNormAct2d)


def _replacement(batch_norm: nn.Module) -> nn.Module:
    """What stays in a folded BatchNorm's place: nothing, or timm's BatchNormAct2d's dropout and activation."""
    if BatchNormAct2d is not None and type(batch_norm) is BatchNormAct2d:
        rest = [m for m in (batch_norm.drop, batch_norm.act) if not _is_no_op(m)]
        return nn.Identity() if not rest else rest[0] if len(rest) == 1 else nn.Sequential(*rest)
    return nn.Identity()


def _is_no_op(module: nn.Module) -> bool:
    """Identity, or a dropout in eval mode (what timm's BatchNormAct2d holds between its norm and activation)."""
    return isinstance(module, nn.Identity) or (
        isinstance(module, nn.modules.dropout._DropoutNd) and not module.training
    )


def _onednn_activation(module: nn.Module) -> tuple[str, str | None] | None:
    """oneDNN's name (attr, algorithm) for an activation module it can apply as a convolution post-op, else None."""
    if type(module) is nn.ReLU:
        return "relu", None
    if type(module) is nn.GELU:
        return "gelu", module.approximate  # "none" (erf) or "tanh"
    if TimmGELU is not None and type(module) is TimmGELU:
        return "gelu", "none"  # timm's GELU module: `F.gelu(x)`, erf form
    return None


class ConvActivation2d(nn.Conv2d):
    """A BatchNorm-folded `nn.Conv2d` and the activation after it, as one oneDNN convolution with an element-wise
    post-op on CPU: the activation is applied while the output tile is still in cache, so the map is written once
    and no second full-size buffer is allocated. EfficientFormerV2's 1/4-resolution MLP blocks are memory-bound, so
    this saves a full read and write of each map (`benchmarks/speed.py`'s fused column measures the effect). The
    values are the convolution's followed by the activation's, up to float rounding (oneDNN evaluates erf-GELU with
    its own polynomial; about 1e-7).

    Only fuse_for_inference makes these, by changing the class of a folded convolution and keeping the activation
    module as `fused_activation`. Where oneDNN's op does not apply (not CPU float32, autograd on, autocast,
    tracing, torch.compile or ONNX export, which fuse the two themselves) it runs `fused_activation(conv(x))`.
    """

    fused_activation: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_onednn(x):
            attr, algorithm = _onednn_activation(self.fused_activation)
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, attr, [], algorithm
            )
        return self.fused_activation(super().forward(x))

    def _runs_onednn(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32 or x.dim() != 4:
            return False
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or not torch.backends.mkldnn.enabled:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return False  # oneDNN's fused op has no backward
        if torch.is_autocast_enabled("cpu") or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        return not (torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


def _fuse_activation(conv: nn.Module, replacement: nn.Module) -> nn.Module:
    """Move an activation that directly follows a folded Conv2d into it (as `ConvActivation2d`) when oneDNN can run
    the pair as one op; returns what stays in the BatchNorm's place."""
    fusable = type(conv) is nn.Conv2d and torch.backends.mkldnn.is_available()
    if not fusable or _onednn_activation(replacement) is None:
        return replacement
    conv.__class__ = ConvActivation2d
    conv.fused_activation = replacement
    return nn.Identity()


class _UseTracer(TorchFunctionMode):
    """Records, during one forward pass, who reads each conv output and where conv/BN parameters are used."""

    def __init__(self, convs: dict[nn.Module, str], batch_norms: dict[nn.Module, str]):
        super().__init__()
        self.conv_outputs: dict[int, tuple[torch.Tensor, str]] = {}  # id -> (tensor kept alive, conv name)
        self.active: list[str] = []  # stack of the conv / BN modules whose forward is running
        self.current_bn: tuple[str, torch.Tensor] | None = None
        self.param_owner = {id(p): name for modules in (convs, batch_norms) for m, name in modules.items() for p in
                            m.parameters(recurse=False)}  # fmt: skip
        self.consumers: dict[str, set[str]] = defaultdict(set)  # conv -> BNs that read its outputs
        self.sources: dict[str, set[str | None]] = defaultdict(set)  # BN -> convs its inputs came from (None: other)
        self.unsafe: set[str] = set()  # modules that must not be folded
        self.calls: dict[str, int] = defaultdict(int)

    # hooks
    def conv_pre(self, name: str):
        def hook(module, args):
            self.active.append(name)

        return hook

    def conv_post(self, name: str):
        def hook(module, args, output):
            self.active.pop()
            self.calls[name] += 1
            if isinstance(output, torch.Tensor):
                self.conv_outputs[id(output)] = (output, name)
            else:
                self.unsafe.add(name)

        return hook

    def bn_pre(self, name: str):
        def hook(module, args):
            self.active.append(name)
            self.calls[name] += 1
            source = self.conv_outputs.get(id(args[0])) if args else None
            self.sources[name].add(source[1] if source is not None and source[0] is args[0] else None)
            self.current_bn = (name, args[0]) if args else None

        return hook

    def bn_post(self, name: str):
        def hook(module, args, output):
            self.active.pop()
            self.current_bn = None

        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None
        for leaf in pytree.tree_leaves((args, kwargs)):
            if not isinstance(leaf, torch.Tensor):
                continue
            owner = self.param_owner.get(id(leaf))
            if owner is not None and (not self.active or self.active[-1] != owner):
                self.unsafe.add(owner)  # a conv/BN parameter used outside the module's own forward
            entry = self.conv_outputs.get(id(leaf))
            if entry is None or entry[0] is not leaf:
                continue
            name = name or _function_name(func)
            if name in _METADATA:
                continue
            bn = self.current_bn
            if func is torch.nn.functional.batch_norm and bn is not None and bn[1] is leaf and args and args[0] is leaf:
                if self.active and self.active[-1] == bn[0]:
                    self.consumers[entry[1]].add(bn[0])
                    continue
            self.unsafe.add(entry[1])  # read by something other than its BatchNorm
        return func(*args, **kwargs)


def _default_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    config = getattr(model, "config", None)
    channels = getattr(config, "num_channels", None)
    backbone = getattr(config, "backbone_config", None) or getattr(config, "encoder_config", None)
    if channels is None and backbone is not None:
        channels = backbone.get("num_channels") if isinstance(backbone, dict) else getattr(backbone, "num_channels", 3)
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, channels or 3, 128, 128, generator=generator)
    return (pixel_values.to(device=parameter.device, dtype=parameter.dtype),)


def _check_eval(model: nn.Module) -> None:
    training = [name or "(the model)" for name, m in model.named_modules() if m.training]
    if training:
        raise FusedModelError(
            f"fuse_for_inference folds BatchNorm running statistics and needs a model in eval mode; "
            f"{len(training)} modules are in training mode (e.g. {training[0]!r}). Call model.eval() first."
        )


def find_conv_bn_pairs(model: nn.Module, example_inputs=None) -> list[tuple[str, str]]:
    """The (conv name, BatchNorm name) pairs `fuse_for_inference` folds, from one traced forward pass on
    `example_inputs` (a tensor or a tuple of positional arguments; default a random 1x3x128x128 image)."""
    _check_eval(model)
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        names.setdefault(module, name)
    batch_norms = {m: n for m, n in names.items() if _foldable_batch_norm(m)}
    if not batch_norms:
        return []
    convs = {m: n for m, n in names.items() if _foldable_conv(m)}
    if example_inputs is None:
        example_inputs = _default_inputs(model)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)

    tracer = _UseTracer(convs, batch_norms)
    handles = []
    try:
        for module, name in convs.items():
            handles += [module.register_forward_pre_hook(tracer.conv_pre(name))]
            handles += [module.register_forward_hook(tracer.conv_post(name))]
        for module, name in batch_norms.items():
            handles += [module.register_forward_pre_hook(tracer.bn_pre(name))]
            handles += [module.register_forward_hook(tracer.bn_post(name))]
        # Traced in the reference form, where every convolution runs as its module (the fast form may run a 1x1
        # convolution as a matrix product of its weight, which the hooks would not see); the fold applies to both.
        with torch.no_grad(), using_form(model, "reference"), tracer:
            outputs = model(*example_inputs)
        for leaf in pytree.tree_leaves(outputs if not hasattr(outputs, "to_tuple") else outputs.to_tuple()):
            entry = tracer.conv_outputs.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if entry is not None and entry[0] is leaf:
                tracer.unsafe.add(entry[1])  # a conv output the model returns
    finally:
        for handle in handles:
            handle.remove()

    pairs = []
    readers: dict[str, list[str]] = defaultdict(list)
    for conv, bns in tracer.consumers.items():
        for bn in bns:
            readers[bn].append(conv)
    for bn_name in batch_norms.values():
        sources = tracer.sources.get(bn_name, set())
        if len(sources) != 1 or None in sources:
            continue
        (conv_name,) = sources
        if conv_name in tracer.unsafe or bn_name in tracer.unsafe:
            continue
        if tracer.consumers[conv_name] != {bn_name} or readers[bn_name] != [conv_name]:
            continue
        if tracer.calls[conv_name] != tracer.calls[bn_name]:
            continue  # an output of the conv that the BatchNorm never read (e.g. returned or dropped)
        pairs.append((conv_name, bn_name))
    return pairs


def _fold(conv: nn.Module, batch_norm: _BatchNorm) -> None:
    """Write BN(conv(x)) into conv's weight and bias, computed in float64 by torch's own fusion function."""

    def double(tensor):
        return None if tensor is None else tensor.detach().double()

    weight, bias = fuse_conv_bn_weights(
        double(conv.weight),
        double(conv.bias),
        double(batch_norm.running_mean),
        double(batch_norm.running_var),
        batch_norm.eps,
        double(batch_norm.weight),
        double(batch_norm.bias),
        transpose=isinstance(conv, _ConvTransposeNd),
    )
    with torch.no_grad():
        conv.weight.copy_(weight)  # in place: the parameter object and its memory format stay
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(bias)


def _refuse_save(class_name: str, *args, **kwargs):
    raise FusedModelError(
        f"This {class_name} has its BatchNorms folded into its convolutions (fuse_for_inference): its state dict "
        "has no BatchNorm keys, so the checkpoint would not load strictly into the unfused class. Save the model "
        "before fusing (or load the original checkpoint again) and call fuse_for_inference after loading."
    )


def _guarded_train(model: nn.Module, mode: bool = True):
    if mode:
        raise FusedModelError(
            "This model's BatchNorms are folded into its convolutions (fuse_for_inference): it is for inference "
            "only and cannot be put back into training mode. Build or load an unfused model to train."
        )
    return type(model).train(model, False)


def fuse_for_inference(model: nn.Module, example_inputs=None, fuse_activations: bool = True) -> nn.Module:
    """Fold every foldable eval-mode BatchNorm into the convolution before it, in place; returns `model`.

    The pairs come from `find_conv_bn_pairs` (one traced forward pass on `example_inputs`, default a random
    1x3x128x128 image); each is folded with `torch.nn.utils.fusion.fuse_conv_bn_weights` and its BatchNorm replaced
    by `nn.Identity` (for timm's `BatchNormAct2d`, by its dropout/activation). With `fuse_activations` (default),
    a ReLU or GELU that timm's `BatchNormAct2d` applies right after the folded convolution moves into it
    (`ConvActivation2d`: one oneDNN op on CPU) and its place holds `nn.Identity`. The model gets `is_fused = True` and
    `fused_conv_bn_pairs`; its `save_pretrained` and `train(True)` raise `FusedModelError` afterwards. Raises
    `FusedModelError` on a model in training mode.
    """
    pairs = find_conv_bn_pairs(model, example_inputs)
    for conv_name, bn_name in pairs:
        conv, batch_norm = model.get_submodule(conv_name), model.get_submodule(bn_name)
        _fold(conv, batch_norm)
        replacement = _replacement(batch_norm)
        if fuse_activations:
            replacement = _fuse_activation(conv, replacement)
        for name, module in list(model.named_modules(remove_duplicate=False)):
            if module is batch_norm:
                model.set_submodule(name, replacement)
    model.is_fused = True
    model.fused_conv_bn_pairs = tuple(getattr(model, "fused_conv_bn_pairs", ())) + tuple(pairs)
    # This instance, and no other, refuses to be saved or trained from now on: instance attributes shadow the class's
    # methods, so the model classes (and every saved folder's code) know nothing of folding.
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = functools.partial(_refuse_save, type(model).__name__)
    model.train = functools.partial(_guarded_train, model)
    return model


__all__ = ["ConvActivation2d", "FusedModelError", "find_conv_bn_pairs", "fuse_for_inference"]
