"""ONNX export and ONNX Runtime inference for every preset (SegFormer-offset, OffSeg, SegNeXt, Mask2Former).

Export (PyTorch's dynamo exporter, `torch.onnx.export(..., dynamo=True)`) writes one self-contained `.onnx` file with
one input, `pixel_values` (batch, 3, height, width), and one output, `logits`: the model's `outputs.logits` (1/8 of
the input size for SegFormer-offset, 1/4 for OffSeg, the input size for Mask2Former, whose `logits` are its
semantic class scores). Batch, height and width are dynamic unless `dynamic=False`. The file's metadata carries
`id2label` (JSON) so `OnnxSegmenter` can name classes without the model folder, and for Mask2Former
`min_input_size` (see below), which `OnnxSegmenter` enforces.

    python -m offseg_hf.export --model_name_or_path outputs/demo-segformer-b0-offset --output model.onnx
    python -m offseg_hf.export --variant offseg-t --random_init --num_labels 150 --output offseg-t.onnx --quantize int8

After the export the command runs the file with ONNX Runtime and prints the largest |ORT - PyTorch| logit
difference at three sizes (`--no_verify` skips it). `--quantize int8` also writes `<output stem>.int8.onnx`.

`OnnxSegmenter(path, image_processor=folder_or_processor)` runs a file with ONNX Runtime with the same pre- and
post-processing as `pipeline("image-segmentation")` on the model folder: `OffSegImageProcessor` (the folder's
`preprocessor_config.json`) and its `post_process_semantic_segmentation` (bilinear resize of the logits to the image
size, argmax). Whole-image inference only: sliding-window evaluation
(`offseg_hf.evaluation.inference.slide_inference`) is not part of the exported graph.

What the exporter needs (`export_friendly(model)`, all undone after the export). Every change is made on the
model being exported and on nothing else, so another model, in this thread or another, runs as before while one is
exported: the project's own modules are set to their export forms on this model's instances
(`using_form(model, "export")`, see `offseg_hf.models.forms`); where a `transformers` module needs another form, the
project subclasses it and gives the subclass to that module of this model by assigning the instance's `__class__`
(`offseg_hf.export.subclasses.swapped_classes`), and gives the original class back afterwards. Nothing is assigned on
the `torch` module or on a `torch` or `transformers` class (tests/test_no_global_patches.py checks the package).

* an example batch of 2, so the batch dimension is not specialised to 1;
* FreqFusion's CARAFE and its resampler's neighbour similarities and bilinear sampling run their gather forms
  (`offseg_hf.models.fast_freqfusion`): ONNX Runtime runs them faster than the tap loops and GridSample (same
  values up to float rounding); the fusion keeps its kernels in the gathers' layout throughout
  (`fast_freqfusion.fuse_by_gather`: last-axis softmaxes, no pixel shuffles, no full-map crops);
* offset learning, under `torch.export`, normalises its class scores along the last axis and does not pad the class
  rows (`offseg_hf.models.fast_offset_learning`): ORT transposes around a non-last-axis Softmax, and the padding
  only helps MKL;
* SegFormer's Mix-FFN (MiT encoder) runs channels-first, its two Linear layers as 1x1 convolutions, so its 4C-wide
  hidden map needs no transpose (`offseg_hf.export.segformer.ChannelsFirstMixFFN`, swapped in by
  `channels_first_mix_ffn(model)`; same values up to float rounding, faster in ONNX Runtime, see docs/export.md);
* Mask2Former's Swin runs eager attention (the sdpa path's decomposition fails on a non-contiguous view);
* Mask2Former: transformers' Swin pads without branches on the sizes (`offseg_hf.export.swin`, swapped in by
  `branch_free_swin(model)`), which would otherwise tie the graph to the example's sizes; its pixel decoder builds
  its reference points (a linspace over each level's size) and its level start indices (a tensor of the level
  sizes) with arithmetic that keeps the sizes symbolic (`offseg_hf.export.mask2former`, swapped in by
  `traceable_pixel_decoder(model)`), where `torch.linspace` and `torch.as_tensor` would bake the example's sizes in;
  and the model is captured by `torch.export` directly (the ONNX exporter's own capture assumes sizes of at least 2
  and fails on the pixel decoder). The graph holds for inputs of at least `minimum_input_size(model)` pixels a side
  (225 for Swin-T: its last stage must be wider than one 7x7 window, where Swin would narrow the window instead),
  written to the file's metadata as `min_input_size`; the export refuses a smaller example.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.configuration_offseg import OffSegConfig, unknown_variant_message
from ..models.forms import using_form
from ..models.local_paths import missing_folder_message
from .mask2former import traceable_pixel_decoder
from .runtime import Labels, RuntimeSegmenter, load_image_processor
from .segformer import channels_first_mix_ffn
from .swin import branch_free_swin

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
# Opset 20 has Gelu, which ONNX Runtime runs as one kernel; at 18 the exporter spells it out with Erf, which ORT
# does not fuse back (OffSeg-T: 11% slower).
DEFAULT_OPSET = 20
DEFAULT_VERIFY_SIZES: tuple[tuple[int, int], ...] = ((512, 512), (480, 640), (333, 517))
ID2LABEL_KEY = "id2label"
MIN_SIZE_KEY = "min_input_size"


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if _missing(name)]
    if missing:
        raise ImportError(
            f"ONNX export needs {', '.join(missing)}: install offseg-hf's onnx extra (pip install 'offseg-hf[onnx]')."
        )


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


# --- Export ---


def _mask_predictor(model: nn.Module) -> nn.Module | None:
    try:
        return model.model.transformer_module.decoder.mask_predictor
    except AttributeError:
        return None


class SemanticLogits(nn.Module):
    """`pixel_values -> outputs.logits` of a segmentation model: the graph the exporter traces."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _is_mask2former(model: nn.Module) -> bool:
    return _mask_predictor(model) is not None


def minimum_input_size(model: nn.Module) -> int | None:
    """The smallest height and width a dynamic-size export of `model` holds for (None: any). Mask2Former's Swin
    narrows its windows at stages no larger than one window (a branch the exported graph cannot follow): the graph
    holds while the last stage, at stride patch * 2^(stages - 1), is wider than one window."""
    if not _is_mask2former(model):
        return None
    backbone = model.config.backbone_config
    patch = backbone.patch_size if isinstance(backbone.patch_size, int) else max(backbone.patch_size)
    stride = patch * 2 ** (len(backbone.depths) - 1)
    return stride * backbone.window_size + 1


@contextlib.contextmanager
def export_friendly(model: nn.Module) -> Iterator[None]:
    """The export-time forms listed in the module docstring, on `model` only; everything is restored on exit, also
    after an exception. Neither `torch` nor `transformers` is modified: another model, in this thread or another,
    runs as before."""
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch_attention = _is_mask2former(model) and attention not in (None, "eager")
    training = model.training
    try:
        if switch_attention:
            model.set_attn_implementation("eager")
        model.eval()
        with (
            using_form(model, "export"),
            branch_free_swin(model),
            traceable_pixel_decoder(model),
            channels_first_mix_ffn(model),
        ):
            yield
    finally:
        if switch_attention:
            model.set_attn_implementation(attention)
        model.train(training)


def _example_input(example_size: Sequence[int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    height, width = example_size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _rename_dimensions(proto, names: dict[str, str]) -> None:
    """Give the symbolic dimensions readable names (s12 -> height, in expressions too) in inputs, outputs and
    value infos."""
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(symbol) for symbol in names) + r")\b")
    values = [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = pattern.sub(lambda match: names[match.group(1)], dim.dim_param)


def _constant_is_zero(node) -> bool:
    from onnx import numpy_helper

    if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
        return False
    return not numpy_helper.to_array(node.attribute[0].t).any()


def _drop_zero_conv_biases(proto) -> int:
    """Remove the bias input of every Conv whose bias is the exporter's `Expand(CastLike(0, x), shape)` (how it
    writes a convolution without bias), and the nodes left unused; returns how many Convs changed.

    A computed bias, even an all-zero one, keeps ONNX Runtime from folding a following BatchNormalization into the
    Conv (its fusion wants constant inputs): SegFormer-offset's four stage projections ran as Conv + a separate
    BatchNormalization. Without the input the Conv computes the same values and the fusion applies."""
    graph = proto.graph
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    changed = 0
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 3 or consumers.get(node.input[2]) != 1:
            continue
        expand = producer.get(node.input[2])
        cast = producer.get(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
        zero = producer.get(cast.input[0]) if cast is not None and cast.op_type == "CastLike" else None
        if zero is not None and _constant_is_zero(zero):
            del node.input[2]
            changed += 1
    graph_outputs = {output.name for output in graph.output}
    while True:  # drop nodes whose outputs nobody reads any more
        used = {name for node in graph.node for name in node.input} | graph_outputs
        dead = [node for node in graph.node if not any(output in used for output in node.output)]
        if not dead:
            return changed
        for node in dead:
            graph.node.remove(node)


def export_onnx(
    model: nn.Module,
    output_path: str | Path,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    example_size: tuple[int, int] = (512, 512),
    optimize: bool = False,
) -> Path:
    """Export a segmentation model (eval mode) to one ONNX file: input `pixel_values`, output `logits`.

    `optimize` runs onnxscript's graph optimiser on the file. It is off by default: ONNX Runtime optimises the
    graph itself when it opens the file, and measured on OffSeg-T (512x512, 2 threads) the optimised file ran no
    faster (328 vs 326 ms) while the export took twice as long (116 vs 61 s).

    With `dynamic` the batch, height and width are symbolic (named `batch`, `height`, `width` in the file); without
    it the graph takes batch 1 at `example_size` only. Returns the path written."""
    _require_onnx()
    import onnx

    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = SemanticLogits(model).eval()
    example = _example_input(example_size, batch=2 if dynamic else 1)
    dynamic_shapes = None
    minimum = minimum_input_size(model) if dynamic else None
    if minimum is not None and min(example_size) < minimum:
        raise ValueError(
            f"A dynamic-size export of this model holds for inputs of at least {minimum}x{minimum} only; the example "
            f"size {example_size[0]}x{example_size[1]} is smaller (export at e.g. 512x512, or with dynamic=False)."
        )
    if dynamic:
        dim = torch.export.Dim.DYNAMIC
        axes = (0, 2, 3)
        dynamic_shapes = {INPUT_NAME: {axis: dim for axis in axes}}
    with export_friendly(model), torch.no_grad():
        traced = wrapper
        if _is_mask2former(model):
            # Captured here rather than by the ONNX exporter, whose capture assumes every size is at least 2
            # ("size-oblivious"): on Mask2Former's pixel decoder that contradicts the example and the capture fails.
            traced = torch.export.export(wrapper, (example,), dynamic_shapes=dynamic_shapes, strict=False)
        program = torch.onnx.export(
            traced,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            optimize=optimize,
            verbose=False,
        )
    proto = program.model_proto
    _drop_zero_conv_biases(proto)
    if dynamic:
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        names = {dims[axis].dim_param: name for axis, name in zip(axes, ("batch", "height", "width"), strict=False)}
        _rename_dimensions(proto, {symbol: name for symbol, name in names.items() if symbol})
    id2label = getattr(model.config, "id2label", None)
    if id2label:
        entry = proto.metadata_props.add()
        entry.key, entry.value = ID2LABEL_KEY, json.dumps({int(k): v for k, v in id2label.items()})
    if minimum is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = MIN_SIZE_KEY, str(minimum)
    model_type = getattr(model.config, "model_type", None)
    if model_type:
        entry = proto.metadata_props.add()
        entry.key, entry.value = "model_type", str(model_type)
    onnx.save_model(proto, str(output_path))
    return output_path


# --- ONNX Runtime ---


def inference_session(path: str | Path, threads: int | None = None):
    """A CPU ONNX Runtime session (`threads` intra-op threads; default ORT's choice), full graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def compare_with_pytorch(
    model: nn.Module,
    onnx_path: str | Path,
    sizes: Iterable[tuple[int, int]] = DEFAULT_VERIFY_SIZES,
    batch: int = 1,
    session=None,
    seed: int = 0,
) -> dict[tuple[int, int], float]:
    """Largest |ORT - PyTorch| of the logits per input size (random pixel values, eval mode)."""
    session = session or inference_session(onnx_path)
    differences = {}
    model.eval()
    for height, width in sizes:
        pixel_values = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = model(pixel_values=pixel_values).logits.float().numpy()
        actual = session.run([OUTPUT_NAME], {INPUT_NAME: pixel_values.numpy()})[0]
        if actual.shape != expected.shape:
            raise AssertionError(f"ONNX logits {actual.shape} != PyTorch logits {expected.shape} at {height}x{width}")
        differences[(height, width)] = float(np.abs(actual - expected).max())
    return differences


class OnnxSegmenter(RuntimeSegmenter):
    """Semantic segmentation with an exported file on ONNX Runtime, pre- and post-processed as
    `pipeline("image-segmentation")` does it (whole image; see the module docstring).

    `path`: the `.onnx` file, or a folder holding `model.onnx`. `image_processor`: an image processor, a folder with
    `preprocessor_config.json`, or None (the file's folder when it holds a `preprocessor_config.json`, else the
    default `OffSegImageProcessor`). `id2label`: class names; default the file's metadata, else the folder's
    `config.json`, else the ids as text.

        segmenter = OnnxSegmenter("my-model/model.onnx")
        label_map = segmenter.segment(image)  # (H, W) int64 at the image size
        segments = segmenter.pipeline_output(image)  # [{"label", "score": None, "mask": PIL "L"}], as the pipeline
    """

    runtime_name = "ONNX"

    def __init__(self, path: str | Path, image_processor=None, id2label: Labels = None, threads=None, session=None):
        path = Path(path)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file() and session is None:
            raise FileNotFoundError(f"No ONNX file at {path}.")
        self.session = session or inference_session(path, threads)
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.minimum_size = int(self.metadata.get(MIN_SIZE_KEY, 0))
        super().__init__(path, image_processor, id2label)

    def _stored_id2label(self) -> dict[int, str] | None:
        if ID2LABEL_KEY not in self.metadata:
            return None
        return {int(k): v for k, v in json.loads(self.metadata[ID2LABEL_KEY]).items()}

    def _run(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: pixel_values})[0]


# --- Quantisation ---


class _CalibrationReader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of pixel-value arrays."""

    def __init__(self, batches: Sequence[np.ndarray]):
        self._batches = iter(list(batches))

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def calibration_batches(image_processor=None, count: int = 8, seed: int = 0) -> list[np.ndarray]:
    """`count` prepared demo-set images (offseg_hf.data.demo) for static quantisation, one per batch."""
    from ..data.demo import make_demo_splits

    processor = load_image_processor(image_processor)
    splits = make_demo_splits(seed=seed, num_train=count, num_validation=0)
    train = splits[0]["train"] if isinstance(splits, tuple) else splits["train"]
    images = [train[i]["image"] for i in range(count)]
    return [processor(images=[image], return_tensors="np")["pixel_values"].astype(np.float32) for image in images]


def quantize_int8(
    onnx_path: str | Path,
    output_path: str | Path | None = None,
    mode: str = "dynamic",
    calibration: Sequence[np.ndarray] | None = None,
) -> Path:
    """Int8 copy of an exported file: `mode="dynamic"` (ORT `quantize_dynamic`: int8 weights, activations
    quantised at run time) or `"static"` (ORT `quantize_static`, QDQ, per-channel int8 weights, uint8 activations
    calibrated on `calibration` batches, default 8 demo-set images). Written to `<stem>.int8.onnx` by default.

    The quantiser needs weights as graph initialisers, so the file first goes through onnxscript's optimiser
    (constant folding), into a temporary copy; the input file is left as it is."""
    import tempfile

    import onnx
    import onnxscript
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    onnx_path = Path(onnx_path)
    output_path = Path(output_path) if output_path else onnx_path.with_suffix(".int8.onnx")
    if mode not in ("dynamic", "static"):
        raise ValueError(f"mode must be 'dynamic' or 'static'; got {mode!r}.")
    with tempfile.TemporaryDirectory() as scratch:
        folded = str(Path(scratch) / "folded.onnx")
        onnx.save_model(onnxscript.optimizer.optimize(onnx.load(str(onnx_path))), folded)
        if mode == "dynamic":
            quantize_dynamic(folded, str(output_path), weight_type=QuantType.QInt8)
        else:
            quantize_static(
                folded,
                str(output_path),
                _CalibrationReader(calibration if calibration is not None else calibration_batches()),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
    return output_path


# --- Command line ---


def load_model(model_name_or_path: str | None = None, variant: str | None = None, num_labels: int = 150):
    """A model in eval mode: from a folder / Hub repo, or a randomly initialised preset."""
    from .. import presets

    if variant:
        torch.manual_seed(0)
        return presets.model_for_variant(variant, num_labels=num_labels).eval()
    from transformers import AutoModelForSemanticSegmentation

    return AutoModelForSemanticSegmentation.from_pretrained(model_name_or_path).eval()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m offseg_hf.export")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_name_or_path", help="A saved model folder or Hub repo.")
    source.add_argument("--variant", help="A preset (offseg_hf.presets.all_variant_names()); needs --random_init.")
    parser.add_argument("--random_init", action="store_true", help="With --variant: a randomly initialised model.")
    parser.add_argument("--num_labels", type=int, default=150, help="With --variant: classes (default 150).")
    parser.add_argument("--output", required=True, help="The .onnx file to write.")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET}).")
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="Run onnxscript's optimiser on the file (slower export; ONNX Runtime optimises the graph when loading).",
    )
    parser.add_argument(
        "--dynamic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Dynamic batch, height and width (default); --no-dynamic fixes batch 1 at --example_size.",
    )
    parser.add_argument("--example_size", type=int, nargs=2, default=(512, 512), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--no_verify", action="store_true", help="Skip the ONNX Runtime vs PyTorch check.")
    parser.add_argument(
        "--verify_sizes",
        default=",".join(f"{h}x{w}" for h, w in DEFAULT_VERIFY_SIZES),
        help="Sizes of the check, HxW comma-separated (default %(default)s; only --example_size without --dynamic).",
    )
    parser.add_argument("--quantize", choices=["int8"], default=None, help="Also write <output stem>.int8.onnx.")
    parser.add_argument(
        "--quantize_mode", choices=["dynamic", "static"], default="dynamic", help="Int8 method (default dynamic)."
    )
    return parser


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        height, _, width = item.strip().lower().partition("x")
        sizes.append((int(height), int(width or height)))
    return sizes


def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.variant and not args.random_init:
        parser.error("--variant exports a randomly initialised preset: add --random_init (or use a folder).")
    if args.variant and args.variant not in OffSegConfig.variant_names():
        parser.error(f"--variant: {unknown_variant_message(args.variant)}")
    if args.model_name_or_path and (message := missing_folder_message(args.model_name_or_path, "--model_name_or_path")):
        parser.error(message)
    model = load_model(args.model_name_or_path, args.variant, args.num_labels)
    name = args.model_name_or_path or args.variant
    start = time.perf_counter()
    path = export_onnx(
        model,
        args.output,
        opset=args.opset,
        dynamic=args.dynamic,
        example_size=args.example_size,
        optimize=args.optimize,
    )
    print(f"exported {name} to {path} in {time.perf_counter() - start:.1f} s (opset {args.opset})")
    if args.model_name_or_path and Path(args.model_name_or_path).is_dir():
        # OnnxSegmenter reads the image processor beside the file; it is the model's own, so it replaces one there.
        source = Path(args.model_name_or_path) / "preprocessor_config.json"
        target = path.parent / "preprocessor_config.json"
        if source.is_file():
            target.write_text(source.read_text())
            print(f"copied {source} to {target} (the image processor OnnxSegmenter reads beside the file)")
    if not args.no_verify:
        sizes = parse_sizes(args.verify_sizes) if args.dynamic else [tuple(args.example_size)]
        for (height, width), difference in compare_with_pytorch(model, path, sizes).items():
            print(f"ORT vs PyTorch at {height}x{width}: max |diff| {difference:.3g}")
    if args.quantize:
        quantized = quantize_int8(path, mode=args.quantize_mode)
        print(f"wrote {quantized} ({args.quantize_mode} int8)")
        if not args.no_verify:
            size = sizes[0]
            difference = compare_with_pytorch(model, quantized, [size])[size]
            print(f"int8 ORT vs PyTorch at {size[0]}x{size[1]}: max |diff| {difference:.3g}")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OnnxSegmenter",
    "SemanticLogits",
    "calibration_batches",
    "compare_with_pytorch",
    "export_friendly",
    "export_onnx",
    "inference_session",
    "quantize_int8",
]
