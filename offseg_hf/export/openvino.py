"""OpenVINO IR export and inference for every preset.

`export_openvino(model, "model.xml")` captures the model with `torch.export` under the same export-time switches as
the ONNX export (`offseg_hf.export.onnx.export_friendly`: FreqFusion's gather forms, last-axis class softmax,
channels-first Mix-FFN, Mask2Former's branch-free Swin) and converts the captured program with
`openvino.convert_model`, then writes `model.xml` + `model.bin`. Input `pixel_values` (batch, 3, height, width),
output `logits`; batch, height and width are dynamic unless `dynamic=False`. Weights are stored in float32 (OpenVINO's
`save_model` would halve them to float16 by default). The IR's `rt_info` carries `offseg/id2label` (JSON),
`offseg/model_type` and, for Mask2Former, `offseg/min_input_size` (see `offseg_hf.export.onnx.minimum_input_size`).

Converting from the captured program rather than from an exported ONNX file needs no `onnx` install and skips the
ONNX translation; both give graphs that match PyTorch at every input size. Mask2Former is the exception: its
capture keeps the pixel decoder's level sizes as symbolic Python arithmetic (`sym_float`, `sym_max`, division),
which OpenVINO's PyTorch frontend has no conversion rule for, while the ONNX exporter writes it as graph operators;
so `via="auto"` (the default) converts Mask2Former from the file `export_onnx` writes and every other model from
the capture. `via="export"` or `via="onnx"` choose one path for every model.

`OpenVinoSegmenter(path, image_processor=folder)` runs the IR on OpenVINO's CPU plugin with `pipeline`'s pre- and
post-processing (`offseg_hf.export.runtime.RuntimeSegmenter`). It asks for float32 inference: on CPUs with
AVX-512-BF16 or AMX the plugin's default is bfloat16, which moves logits by about 1e-2.

    python -c "from offseg_hf.export.onnx import load_model; from offseg_hf.export.openvino import export_openvino;
               export_openvino(load_model('outputs/demo-segformer-b0-offset'), 'ov/model.xml')"
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .onnx import INPUT_NAME, OUTPUT_NAME, SemanticLogits, export_friendly, export_onnx, minimum_input_size
from .runtime import Labels, RuntimeSegmenter, existing_file

RT_INFO_SECTION = "offseg"


def _require_openvino():
    try:
        import openvino
    except ImportError as error:
        raise ImportError(
            "OpenVINO export and inference need openvino: install offseg-hf's openvino extra "
            "(pip install 'offseg-hf[openvino]')."
        ) from error
    return openvino


def _example_input(example_size: tuple[int, int], batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, *example_size, generator=torch.Generator().manual_seed(0))


def capture(model: nn.Module, example_size: tuple[int, int] = (512, 512), dynamic: bool = True):
    """`torch.export` of `pixel_values -> logits` with the export-time switches of the ONNX export; with `dynamic`
    the batch, height and width are symbolic (an example batch of 2, so batch 1 is not baked in)."""
    minimum = minimum_input_size(model) if dynamic else None
    if minimum is not None and min(example_size) < minimum:
        raise ValueError(
            f"A dynamic-size export of this model holds for inputs of at least {minimum}x{minimum} only; the example "
            f"size {example_size[0]}x{example_size[1]} is smaller (export at e.g. 512x512, or with dynamic=False)."
        )
    example = _example_input(example_size, batch=2 if dynamic else 1)
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim.DYNAMIC
        dynamic_shapes = {INPUT_NAME: {0: dim, 2: dim, 3: dim}}
    wrapper = SemanticLogits(model).eval()
    with export_friendly(model), torch.no_grad():
        return torch.export.export(wrapper, (example,), dynamic_shapes=dynamic_shapes, strict=False)


def export_openvino(
    model: nn.Module,
    output_path: str | Path,
    example_size: tuple[int, int] = (512, 512),
    dynamic: bool = True,
    via: str = "auto",
) -> Path:
    """Write `model` (a segmentation model; put in eval mode) as an OpenVINO IR: `output_path` (`.xml`) and the
    `.bin` beside it. `via="export"` converts the `torch.export` capture, `via="onnx"` the file `export_onnx` writes
    (into a temporary folder; needs the onnx extra), `via="auto"` the second for Mask2Former and the first for the
    others (see the module docstring). Returns the `.xml` path."""
    ov = _require_openvino()
    output_path = Path(output_path)
    if output_path.suffix != ".xml":
        raise ValueError(f"An OpenVINO IR is written as a .xml file (with its .bin beside it); got {output_path}.")
    if via not in ("auto", "export", "onnx"):
        raise ValueError(f"via must be 'auto', 'export' or 'onnx'; got {via!r}.")
    if via == "auto":
        via = "export" if minimum_input_size(model) is None else "onnx"  # a minimum size: Mask2Former
    output_path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    if via == "export":
        converted = ov.convert_model(capture(model, example_size, dynamic))
    else:
        with tempfile.TemporaryDirectory() as scratch:
            onnx_path = export_onnx(model, Path(scratch) / "model.onnx", dynamic=dynamic, example_size=example_size)
            converted = ov.convert_model(str(onnx_path))
    if not dynamic:  # the converter leaves a captured program's input dynamic even where torch.export fixed it
        converted.reshape([1, 3, *example_size])
    # The converter names tensors after graph nodes (view_57:0); the segmenter and users address them by role.
    converted.inputs[0].get_tensor().set_names({INPUT_NAME})
    converted.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    id2label = getattr(model.config, "id2label", None)
    if id2label:
        converted.set_rt_info(json.dumps({int(k): v for k, v in id2label.items()}), [RT_INFO_SECTION, "id2label"])
    minimum = minimum_input_size(model) if dynamic else None
    if minimum is not None:
        converted.set_rt_info(str(minimum), [RT_INFO_SECTION, "min_input_size"])
    model_type = getattr(model.config, "model_type", None)
    if model_type:
        converted.set_rt_info(str(model_type), [RT_INFO_SECTION, "model_type"])
    ov.save_model(converted, str(output_path), compress_to_fp16=False)
    return output_path


def _rt_info(model, key: str) -> str | None:
    path = [RT_INFO_SECTION, key]
    return model.get_rt_info(path).astype(str) if model.has_rt_info(path) else None


class OpenVinoSegmenter(RuntimeSegmenter):
    """Semantic segmentation with an OpenVINO IR on the CPU, pre- and post-processed as
    `pipeline("image-segmentation")` does it (whole image).

    `path`: the `.xml` file, or a folder holding `model.xml`. `image_processor`: an image processor, a folder with
    `preprocessor_config.json`, or None (the IR's folder when it holds one, else the default `OffSegImageProcessor`).
    `id2label`: class names; default the IR's `rt_info`, else the folder's `config.json`. `threads`: the plugin's
    inference threads (default its choice). `precision`: the plugin's inference precision hint, "f32" (default: the
    exported model's numbers) or "bf16" (faster on CPUs with AVX-512-BF16 or AMX, logits off by about 1e-2).

        segmenter = OpenVinoSegmenter("ov/model.xml", image_processor="outputs/demo-segformer-b0-offset")
        label_map = segmenter.segment(image)  # (H, W) int64 at the image size
    """

    runtime_name = "OpenVINO"

    def __init__(
        self,
        path: str | Path,
        image_processor=None,
        id2label: Labels = None,
        threads=None,
        precision="f32",
        device="CPU",
    ):
        ov = _require_openvino()
        path = existing_file(path, "model.xml", (".xml",), "an OpenVINO IR")
        if not path.with_suffix(".bin").is_file():
            raise FileNotFoundError(f"The OpenVINO IR {path} has no weights file {path.with_suffix('.bin')} beside it.")
        core = ov.Core()
        self.model = core.read_model(str(path))
        config = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(self.model, device, config)
        self._request = self.compiled.create_infer_request()
        self.minimum_size = int(_rt_info(self.model, "min_input_size") or 0)
        shape = self.model.inputs[0].get_partial_shape()
        if shape[2].is_static and shape[3].is_static:
            self.input_size = (shape[2].get_length(), shape[3].get_length())
        super().__init__(path, image_processor, id2label)

    def _stored_id2label(self) -> dict[int, str] | None:
        text = _rt_info(self.model, "id2label")
        return {int(k): v for k, v in json.loads(text).items()} if text else None

    def _run(self, pixel_values: np.ndarray) -> np.ndarray:
        # A static IR (dynamic=False) takes batch 1: run its images one at a time.
        batch = self.model.inputs[0].get_partial_shape()[0]
        if batch.is_static and batch.get_length() != pixel_values.shape[0]:
            return np.concatenate([self._run(pixel_values[i : i + 1]) for i in range(len(pixel_values))])
        self._request.infer({INPUT_NAME: pixel_values})
        return self._request.get_output_tensor(0).data.copy()


__all__ = ["OpenVinoSegmenter", "capture", "export_openvino"]
