"""ExecuTorch export (XNNPACK delegate, fp32 or int8) and inference for every preset.

`export_executorch(model, "model.pte", example_size=(512, 512))` writes an ExecuTorch program for one input size,
batch 1: `torch.export` under the ONNX export's switches (`offseg_hf.export.onnx.export_friendly`), then
`executorch.exir.to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])` and `.to_executorch()`.
`quantize="int8"` first quantises with the XNNPACK quantizer (PT2E: per-channel symmetric int8 weights, int8
activations) calibrated on a few demo-set images. Beside the program, `model.pte.json` holds `id2label`, the input
size and the list of operators left outside XNNPACK (`not_delegated`).

Why one size: XNNPACK's graphs take upper-bounded dynamic shapes only, and the integer index arithmetic of
FreqFusion's gathers and Mask2Former's pixel decoder is cheapest folded into constants at a fixed size. The image
processor resizes every image to one size anyway (512x512 by default); `ExecuTorchSegmenter` sets it to the
program's, then resizes the logits to the image as the pipeline does.

What the lowering changes so XNNPACK takes more of the graph (each keeps the values up to float rounding):

* the model's channels-last conversions (EfficientFormerV2 and MSCAN run channels-last in eager PyTorch) are
  dropped: ExecuTorch's portable kernels (GroupNorm among them) refuse tensors in another dim order, and XNNPACK
  picks its own layout inside a delegate;
* LayerNorm and GroupNorm, which the XNNPACK partitioner has no kernel for, are written as means over the two inner
  axes of a 4-D view (XNNPACK's global average pooling), subtractions, products and a reciprocal square root;
* weights computed from parameters (SegFormer's fusion convolution split per stage, the channels-first Mix-FFN's
  1x1 kernels, transposed class embeddings) are folded into constants, since XNNPACK takes static weights only;
* expands that add no data (only axes of size 1, from matmul broadcasting) become views, and aliases are dropped;
* attention runs in eager form: the sdpa decomposition adds mask handling (`any`, `where`, `logical_not`) that
  XNNPACK does not take.

Two rewrites work around executorch 1.5.1 XNNPACK bugs that gave wrong values, not slower ones (tests reproduce
each):

* a folded constant that is a view into a larger tensor (a slice of a packed parameter) gets a copy of its own:
  XNNPACK serialised it from the start of the storage (`_own_storage`; Mask2Former's cross-attention);
* a last-axis softmax of a 4-D tensor runs on a 2-D view of it: on a convolution's output XNNPACK normalised the
  channels instead (`_softmax_over_rows`; EfficientFormerV2's talking-head attention in OffSeg).

`not_delegated_ops` lists what still runs on ExecuTorch's portable kernels, with the partitioner's reason for each
operator (or "no XNNPACK kernel" where it has none) and the modules it comes from.

`ExecuTorchSegmenter(path, image_processor=folder)` runs a program with `executorch.runtime`, one image at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.freqfusion import FreqFusion
from .onnx import SemanticLogits, calibration_batches, export_friendly, minimum_input_size
from .runtime import Labels, RuntimeSegmenter, existing_file

QUANTIZE_MODES = (None, "int8")
SIDECAR_SUFFIX = ".json"  # model.pte -> model.pte.json
_XNNPACK_LOGGER = "executorch.backends.xnnpack"
NO_KERNEL = "no XNNPACK kernel for this operator"


def _require_executorch() -> None:
    import importlib.util

    if importlib.util.find_spec("executorch") is None:
        raise ImportError(
            "ExecuTorch export and inference need executorch: install offseg-hf's executorch extra "
            "(pip install 'offseg-hf[executorch]')."
        )


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


# --- Capture and graph rewrites ---


@contextlib.contextmanager
def _lowering_switches(model: nn.Module) -> Iterator[None]:
    """The ONNX export's switches, eager attention, and parameters without gradients (folded weights are then
    plain tensors, which the lowering can copy); all restored on exit."""
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    switch_attention = attention not in (None, "eager") and hasattr(model, "set_attn_implementation")
    grads = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        if switch_attention:
            model.set_attn_implementation("eager")
        for parameter, _ in grads:
            parameter.requires_grad_(False)
        with export_friendly(model), torch.no_grad():
            yield
    finally:
        for parameter, requires_grad in grads:
            parameter.requires_grad_(requires_grad)
        if switch_attention:
            model.set_attn_implementation(attention)


def _drop_memory_formats(graph_module: torch.fx.GraphModule) -> int:
    """Turn the graph's copies into another memory format into no-ops (the values are the same); returns how many."""
    aten = torch.ops.aten
    changed = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function":
            continue
        memory_format = node.kwargs.get("memory_format")
        if memory_format in (None, torch.contiguous_format, torch.preserve_format):
            continue
        if node.target in (aten.clone.default, aten.contiguous.default) and not node.kwargs.keys() - {"memory_format"}:
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
        else:
            node.kwargs = {**node.kwargs, "memory_format": torch.contiguous_format}
        changed += 1
    graph_module.graph.lint()
    graph_module.recompile()
    return changed


def _inner_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3), keepdim=True)


def _normalised(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (A, B, 1, L) normalised over its last axis, with mean and 1/std: the forms XNNPACK runs (a 4-D mean over
    the two inner axes is its global average pooling)."""
    mean = _inner_mean(x)
    centred = x - mean
    rstd = torch.rsqrt(_inner_mean(centred * centred) + eps)
    return centred * rstd, mean, rstd


def _native_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    axes = len(normalized_shape)
    out, mean, rstd = _normalised(input.reshape(1, -1, 1, math.prod(normalized_shape)), eps)
    out = out.reshape(input.shape)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    stats = (*input.shape[: input.dim() - axes], *(1,) * axes)
    return out, mean.reshape(stats), rstd.reshape(stats)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return _native_layer_norm(input, normalized_shape, weight, bias, eps)[0]


def _native_group_norm(input, weight, bias, batch, channels, pixels, groups, eps):
    out, mean, rstd = _normalised(input.reshape(batch, groups, 1, -1), eps)
    out = out.reshape(input.shape)
    affine = (1, channels, *(1,) * (input.dim() - 2))
    if weight is not None:
        out = out * weight.reshape(affine)
    if bias is not None:
        out = out + bias.reshape(affine)
    return out, mean.reshape(batch, groups), rstd.reshape(batch, groups)


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    batch, channels = input.shape[:2]
    return _native_group_norm(input, weight, bias, batch, channels, math.prod(input.shape[2:]), num_groups, eps)[0]


NORM_DECOMPOSITIONS = {
    torch.ops.aten.layer_norm.default: _layer_norm,
    torch.ops.aten.native_layer_norm.default: _native_layer_norm,
    torch.ops.aten.group_norm.default: _group_norm,
    torch.ops.aten.native_group_norm.default: _native_group_norm,
}


def _views_for_data_free_ops(graph_module: torch.fx.GraphModule):
    """Edge-dialect pass: an expand that keeps the element count (it only adds or keeps size-1 axes) becomes a
    view, and an alias is replaced by its input; XNNPACK takes views but neither of the two."""
    from executorch.exir.dialects._ops import ops as exir_ops

    edge = exir_ops.edge.aten
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == edge.expand_copy.default and node.args[0].meta["val"].numel() == node.meta["val"].numel():
            with graph.inserting_before(node):
                view = graph.call_function(edge.view_copy.default, (node.args[0], list(node.meta["val"].shape)))
            view.meta = dict(node.meta)
            node.replace_all_uses_with(view)
            graph.erase_node(node)
        elif node.target == edge.alias_copy.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph_module.recompile()


def _softmax_over_rows(graph_module: torch.fx.GraphModule):
    """Edge-dialect pass: a last-axis softmax of a 4-D tensor runs on a 2-D view of it, (B * C * H, W), and is viewed
    back.

    Why: XNNPACK's channels-last pass (executorch 1.5.1, `ChannelsLastTaggedReshapePass`) lets a softmax take its
    input in whatever layout the delegate holds it, but XNNPACK's softmax normalises the innermost axis in memory. A
    softmax straight after a convolution (EfficientFormerV2's talking-head attention: conv, softmax over the keys,
    conv) thus ran over the channels (the heads) instead of the keys: logits off by up to 1.3 on a trained OffSeg-T.
    A view needs its input in the graph's own layout, so the channels-last map is turned back before the softmax."""
    from executorch.exir.dialects._ops import ops as exir_ops

    edge = exir_ops.edge.aten
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != edge._softmax.default:
            continue
        source, dim = node.args[0], node.args[1]
        shape = list(source.meta["val"].shape)
        if len(shape) != 4 or dim not in (-1, 3):
            continue
        rows = [math.prod(shape[:-1]), shape[-1]]
        with graph.inserting_before(node):
            flat = graph.call_function(edge.view_copy.default, (source, rows))
            flat.meta = {**node.meta, "val": source.meta["val"].reshape(rows)}
            softmax = graph.call_function(edge._softmax.default, (flat, -1, *node.args[2:]))
            softmax.meta = {**node.meta, "val": node.meta["val"].reshape(rows)}
            back = graph.call_function(edge.view_copy.default, (softmax, shape))
            back.meta = dict(node.meta)
        node.replace_all_uses_with(back)
        graph.erase_node(node)
    graph_module.recompile()


def _own_storage(program) -> int:
    """Give each constant of `program` that is a view into a larger storage (`constant_prop_pass` folds slices and
    selects of parameters into such views: nn.MultiheadAttention's q/k/v chunks of `in_proj_weight`, a row of
    Mask2Former's `level_embed`) a storage of its own; returns how many. XNNPACK serialises a constant from the start
    of its storage (executorch 1.5.1: `.contiguous()`, then `untyped_storage().data_ptr()`), so a view at a storage
    offset would be written as the storage's first elements: Mask2Former's cross-attention keys and values were
    computed with the query weights. A contiguous constant also gets the standard strides: size-1 axes with other
    strides (a permuted map with one head, as Swin's relative position bias) give an ExecuTorch dim order that the
    XNNPACK delegate refuses at run time ("Propagating input shapes failed")."""
    changed = 0
    for table in (program.constants, program.state_dict):
        for name, value in list(table.items()):
            if not isinstance(value, torch.Tensor):
                continue
            standard = value.is_contiguous() and value.stride() == torch.empty(value.shape, device="meta").stride()
            if (
                value.storage_offset() == 0
                and value.untyped_storage().nbytes() == value.nbytes
                and (standard or not value.is_contiguous())
            ):
                continue
            # A storage of exactly its size; the same strides where dense and not contiguous, else the standard ones.
            layout = torch.contiguous_format if value.is_contiguous() else torch.preserve_format
            own = value.detach().clone(memory_format=layout)
            table[name] = nn.Parameter(own, requires_grad=False) if isinstance(value, nn.Parameter) else own
            changed += 1
    return changed


def _kept_unfolded(program) -> set:
    """What constant folding must leave in place: the int8 weights' (de)quantisation, the pattern by which XNNPACK
    recognises a quantised convolution or linear layer (folded, the layer would run in float32), and `full`, whose
    folding only makes the file larger."""
    kept = {torch.ops.aten.full.default}
    for node in program.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) in (
            "quantized_decomposed",
            "torchao",
        ):
            kept.add(node.target)
    return kept


# --- Quantisation ---


def _calibration(model: nn.Module, example_size: tuple[int, int], count: int) -> list[torch.Tensor]:
    from ..models.image_processing_offseg import OffSegImageProcessor

    processor = OffSegImageProcessor(size={"height": example_size[0], "width": example_size[1]})
    return [torch.from_numpy(batch) for batch in calibration_batches(processor, count=count)]


def _quantized(graph_module, example: torch.Tensor, calibration: Sequence) -> torch.fx.GraphModule:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph_module, quantizer)
    for batch in calibration:
        batch = torch.as_tensor(np.asarray(batch), dtype=torch.float32)
        if tuple(batch.shape) != tuple(example.shape):
            raise ValueError(f"calibration batches must have the example's shape {tuple(example.shape)}")
        prepared(batch)
    return convert_pt2e(prepared)


# --- Lowering ---


class _WhyNotDelegated(logging.Handler):
    """Collects the XNNPACK partitioner's rejection reasons (it logs them at debug level), by node name."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.reasons: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.msg
        node = getattr(message, "node", None)
        if node is not None and hasattr(message, "reason"):
            # The partitioner reuses one message object; read it now. The first reason a node gets is kept.
            self.reasons.setdefault(node.name, str(message.reason))


@contextlib.contextmanager
def _collecting_reasons() -> Iterator[_WhyNotDelegated]:
    logger = logging.getLogger(_XNNPACK_LOGGER)
    handler, level, propagate = _WhyNotDelegated(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # the reasons go to the report, not to the console
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _operator_name(target) -> str:
    return str(getattr(target, "_op", target))


def not_delegated_ops(program, reasons: dict[str, str] | None = None) -> list[dict]:
    """The operators of a lowered program (an `EdgeProgramManager` or its `ExportedProgram`) that run outside the
    XNNPACK delegate: per operator its `count`, the partitioner's `reason` (from `reasons`, node name -> reason, as
    `lower_to_xnnpack` collects them; otherwise or where the partitioner gave none, that XNNPACK has no kernel for
    it), the `dtypes` of its outputs and the `modules` it comes from; most frequent first. Empty when XNNPACK runs
    the whole graph."""
    exported = program.exported_program() if hasattr(program, "exported_program") else program
    reasons = reasons or {}
    counts: Counter = Counter()
    why: dict[str, Counter] = {}
    modules: dict[str, set] = {}
    dtypes: dict[str, set] = {}
    for node in exported.graph_module.graph.nodes:
        name = _operator_name(node.target)
        if node.op != "call_function" or name in ("<built-in function getitem>", "executorch_call_delegate"):
            continue
        counts[name] += 1
        why.setdefault(name, Counter())[reasons.get(node.name, NO_KERNEL)] += 1
        value = node.meta.get("val")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, torch.Tensor):
                dtypes.setdefault(name, set()).add(str(item.dtype).removeprefix("torch."))
        stack = node.meta.get("nn_module_stack") or {}
        modules.setdefault(name, set()).add(next(reversed(stack.values()))[0] if stack else "")
    return [
        {
            "op": name,
            "count": count,
            "reason": "; ".join(reason for reason, _ in why[name].most_common()),
            "dtypes": sorted(dtypes.get(name, ())),
            "modules": sorted(modules[name] - {""}),
        }
        for name, count in counts.most_common()
    ]


def delegated_partitions(program) -> int:
    """How many XNNPACK delegate calls a lowered program makes (fewer: fewer layout changes at the boundaries)."""
    exported = program.exported_program() if hasattr(program, "exported_program") else program
    return sum(
        node.op == "call_function" and _operator_name(node.target) == "executorch_call_delegate"
        for node in exported.graph_module.graph.nodes
    )


def lower_to_xnnpack(
    model: nn.Module,
    example_size: tuple[int, int] = (512, 512),
    quantize: str | None = None,
    calibration: Sequence | None = None,
    calibration_count: int = 4,
):
    """Capture `model` at batch 1 x `example_size` and lower it to XNNPACK (see the module docstring); returns the
    `EdgeProgramManager` and `not_delegated_ops`'s list for it."""
    _require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}; got {quantize!r}.")
    height, width = (int(side) for side in example_size)
    minimum = minimum_input_size(model)
    if minimum is not None and min(height, width) < minimum:
        raise ValueError(
            f"This model's graph holds for inputs of at least {minimum}x{minimum}; the example size {height}x{width} "
            "is smaller."
        )
    if quantize and any(isinstance(module, FreqFusion) for module in model.modules()):
        # Seen with executorch 1.5.1: the XNNPACK quantizer turns the scalar operands of FreqFusion's int64 gather
        # index arithmetic into float32 constants (index_select then refuses the float indices); with those kept
        # integer, its channels-last pass fails on the quantised graph. Refused here rather than after minutes.
        raise NotImplementedError(
            "int8 ExecuTorch programs of OffSeg (FreqFusion) are not supported: XNNPACK's quantisation breaks its "
            "gather indices. Export it in float32 (quantize=None), or use ONNX Runtime's int8 (offseg_hf.export.onnx)."
        )
    if quantize and calibration is None:
        calibration = _calibration(model, (height, width), calibration_count)
    model.eval()
    example = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    with _lowering_switches(model):
        captured = torch.export.export(SemanticLogits(model), (example,), strict=False)
        graph_module = captured.module()
        _drop_memory_formats(graph_module)
        if quantize:
            graph_module = _quantized(graph_module, example, calibration)
        # Captured again: the shapes and strides of every node follow the rewrites. The unlifted module's
        # parameters are new ones that ask for gradients again.
        graph_module.requires_grad_(False)
        captured = torch.export.export(graph_module, (example,), strict=False)
        captured = captured.run_decompositions(NORM_DECOMPOSITIONS)
        captured = constant_prop_pass(captured, custom_skip_targets=_kept_unfolded(captured))
        _own_storage(captured)
        with _collecting_reasons() as collected:
            lowered = to_edge_transform_and_lower(
                captured,
                transform_passes=[_views_for_data_free_ops, _softmax_over_rows],
                partitioner=[XnnpackPartitioner()],
            )
    return lowered, not_delegated_ops(lowered, collected.reasons)


def export_executorch(
    model: nn.Module,
    output_path: str | Path,
    example_size: tuple[int, int] = (512, 512),
    quantize: str | None = None,
    calibration: Sequence | None = None,
    calibration_count: int = 4,
) -> Path:
    """Write `model` as an ExecuTorch program (`.pte`) for batch 1 x `example_size`, XNNPACK-delegated, fp32 or
    `quantize="int8"` (calibrated on `calibration` batches (1, 3, H, W) at `example_size`, default
    `calibration_count` demo-set images), and its sidecar `<name>.json` (`id2label`, `input_size`, `quantize`,
    `not_delegated`). Returns the `.pte` path."""
    output_path = Path(output_path)
    if output_path.suffix != ".pte":
        raise ValueError(f"An ExecuTorch program is written as a .pte file; got {output_path}.")
    lowered, not_delegated = lower_to_xnnpack(model, example_size, quantize, calibration, calibration_count)
    with torch.no_grad(), warnings.catch_warnings():
        # Unlifting the delegates' source graphs re-wraps the folded constants as tensors that ask for gradients and
        # warns that it treats them as constants, which they are.
        warnings.filterwarnings("ignore", message="A model attribute `_prop_tensor_constant")
        program = lowered.to_executorch()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_bytes(program.buffer)
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    sidecar = {
        "format": "executorch",
        "input_size": [int(side) for side in example_size],
        "quantize": quantize,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "id2label": {int(k): v for k, v in id2label.items()} if id2label else None,
        "delegate_calls": delegated_partitions(lowered),
        "not_delegated": not_delegated,
    }
    sidecar_path(output_path).write_text(json.dumps(sidecar, indent=1) + "\n")
    return output_path


# --- Inference ---


def set_threads(threads: int) -> None:
    """XNNPACK's thread pool size for the whole process (ExecuTorch has one pool; its call is marked unsafe
    because it must not run while a program executes)."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(int(threads))


class ExecuTorchSegmenter(RuntimeSegmenter):
    """Semantic segmentation with an ExecuTorch program (`executorch.runtime`), pre- and post-processed as
    `pipeline("image-segmentation")` does it, except that images are resized to the program's input size (the
    processor's `size` is replaced by it) rather than the processor's own.

    `path`: the `.pte` file, or a folder holding `model.pte`. `image_processor`, `id2label`: as `OnnxSegmenter`'s
    (class names from the program's sidecar json, else the folder's `config.json`). `threads`: sets XNNPACK's
    thread pool for the whole process (`set_threads`).

        segmenter = ExecuTorchSegmenter("et/model.pte", image_processor="outputs/demo-segformer-b0-offset")
        label_map = segmenter.segment(image)  # (H, W) int64 at the image size
    """

    runtime_name = "ExecuTorch"

    def __init__(self, path: str | Path, image_processor=None, id2label: Labels = None, threads: int | None = None):
        _require_executorch()
        from executorch.runtime import Runtime

        path = existing_file(path, "model.pte", (".pte",), "an ExecuTorch program")
        sidecar = sidecar_path(path)
        self.sidecar = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        if threads:
            set_threads(threads)
        self.program = Runtime.get().load_program(path)
        self.method = self.program.load_method("forward")
        sizes = tuple(self.method.metadata.input_tensor_meta(0).sizes())
        if len(sizes) != 4 or sizes[1] != 3:
            raise ValueError(f"{path} does not take pixel values (1, 3, height, width); its input is {sizes}.")
        self.input_size = (int(sizes[2]), int(sizes[3]))
        super().__init__(path, image_processor, id2label)

    def _stored_id2label(self) -> dict[int, str] | None:
        id2label = self.sidecar.get("id2label")
        return {int(k): v for k, v in id2label.items()} if id2label else None

    def _run(self, pixel_values: np.ndarray) -> np.ndarray:
        outputs = [self.method.execute([torch.from_numpy(image[None])])[0] for image in pixel_values]
        return torch.cat(outputs).numpy()


__all__ = [
    "ExecuTorchSegmenter",
    "delegated_partitions",
    "export_executorch",
    "lower_to_xnnpack",
    "not_delegated_ops",
    "set_threads",
    "sidecar_path",
]
