"""OpenVINO IR export and inference (offseg_hf/export/openvino.py): each family exported once with dynamic shapes,
OpenVINO logits against PyTorch at three sizes and two batch sizes, the IR's names, shapes, float32 weights and
class names, the segmenter's label maps against the pipeline's, a static IR, Mask2Former's minimum size, and clear
errors.

OpenVINO is not in [dev] (with OffSeg-T's and Mask2Former's exports this file takes minutes): without it these
tests skip."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import pipeline

ov = pytest.importorskip("openvino", reason="OpenVINO tests need offseg-hf's openvino extra (not in [dev])")

from offseg_hf import OffSegImageProcessor  # noqa: E402
from offseg_hf.export.openvino import OpenVinoSegmenter, export_openvino  # noqa: E402

from .conftest import build_model  # noqa: E402
from .test_onnx import LABELS, MASK2FORMER_SIZES, SIZES, SMALL_WINDOW_SWIN, scene, segnext_model  # noqa: E402

# The float32 IR against eager PyTorch float32: the same bound as ONNX Runtime's (measured: 2.6e-6 to 3.1e-5, OffSeg-T
# before conftest gave it trained-size layer scales).
TOLERANCE = 1e-4


def named_segformer():
    model = build_model("segformer")
    model.config.id2label, model.config.label2id = dict(LABELS), {v: k for k, v in LABELS.items()}
    return model


FAMILIES = {
    "segformer": named_segformer,
    "segnext": segnext_model,
    "offseg-t": lambda: build_model("offseg-t"),
}
# OffSeg-T is the real EfficientFormerV2-S1 + FreqFusion: its capture and conversion take minutes on 2 cores.
FAMILY_PARAMS = [f if f == "segformer" else pytest.param(f, marks=pytest.mark.slow) for f in sorted(FAMILIES)]


def export_for_test(model, folder):
    """The dynamic-shape IR each test of this module shares (the `exported` fixture in conftest.py)."""
    return export_openvino(model, folder / "model.xml", example_size=(128, 160))


def largest_differences(model, segmenter, sizes, batch: int, seed: int = 0) -> dict:
    differences = {}
    for height, width in sizes:
        pixel_values = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = model(pixel_values=pixel_values).logits.numpy()
        actual = segmenter.logits(pixel_values.numpy())
        assert actual.shape == expected.shape, (height, width)
        differences[(height, width)] = float(np.abs(actual - expected).max())
    return differences


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_openvino_logits_match_pytorch_at_three_sizes_and_two_batches(exported, family):
    model, path = exported(family)
    segmenter = OpenVinoSegmenter(path, threads=2)
    for batch in (1, 2):
        differences = largest_differences(model, segmenter, SIZES, batch, seed=batch)
        assert max(differences.values()) <= TOLERANCE, differences


def test_ir_names_dynamic_shapes_float32_weights_and_class_names(exported):
    model, path = exported("segformer")
    ir = ov.Core().read_model(str(path))
    assert [port.get_any_name() for port in ir.inputs] == ["pixel_values"]
    assert [port.get_any_name() for port in ir.outputs] == ["logits"]
    assert str(ir.inputs[0].get_partial_shape()) == "[?,3,?,?]"
    # save_model would store float16 weights unless told not to: the .bin holds every parameter in 4 bytes.
    parameters = sum(p.numel() for p in model.parameters())
    assert path.with_suffix(".bin").stat().st_size >= 4 * parameters * 0.95
    stored = json.loads(ir.get_rt_info(["offseg", "id2label"]).astype(str))
    assert {int(k): v for k, v in stored.items()} == model.config.id2label
    assert ir.get_rt_info(["offseg", "model_type"]).astype(str) == model.config.model_type
    assert not ir.has_rt_info(["offseg", "min_input_size"])
    segmenter = OpenVinoSegmenter(path.parent)  # a folder means its model.xml
    assert segmenter.id2label == model.config.id2label and segmenter.input_size is None
    assert segmenter.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32


@pytest.fixture(scope="module")
def saved_folder_with_ir(exported, tmp_path_factory):
    """The tiny SegFormer-offset with named labels and a 128x128 processor, saved as the scripts save models, with
    its IR in the same folder."""
    folder = tmp_path_factory.mktemp("folder")
    model, path = exported("segformer")
    model.save_pretrained(folder)
    OffSegImageProcessor(size={"height": 128, "width": 128}).save_pretrained(folder)
    for suffix in (".xml", ".bin"):
        shutil.copy(path.with_suffix(suffix), folder / f"model{suffix}")
    return folder, folder / "model.xml"


def test_segmenter_label_maps_and_segments_match_the_pipeline(saved_folder_with_ir):
    folder, path = saved_folder_with_ir
    segmenter = OpenVinoSegmenter(path)  # the processor saved beside the IR
    assert segmenter.image_processor.size == {"height": 128, "width": 128}
    assert segmenter.id2label == LABELS
    segment = pipeline("image-segmentation", model=str(folder))
    names = {v: k for k, v in LABELS.items()}
    for image in (scene(), scene(200, 150, seed=1)):
        label_map = segmenter.segment(image)
        assert label_map.shape == (image.height, image.width) and label_map.dtype == np.int64
        reference = np.full(label_map.shape, -1, dtype=np.int64)
        for item in segment(image):
            reference[np.asarray(item["mask"]) > 0] = names[item["label"]]
        # Logits within 1e-5 of PyTorch's: a pixel can only differ where two classes tie to that precision.
        assert (label_map == reference).mean() >= 0.999
        assert len(np.unique(label_map)) > 1
        segments = segmenter(image, return_masks=True)
        assert [s["label"] for s in segments] == [LABELS[int(k)] for k in np.unique(label_map)]
        assert all(s["mask"].mode == "L" and s["mask"].size == image.size for s in segments)


@pytest.mark.slow
def test_conversion_from_the_onnx_file_matches_too(tmp_path):
    pytest.importorskip("onnxruntime")
    model = build_model("segformer")
    path = export_openvino(model, tmp_path / "model.xml", example_size=(128, 160), via="onnx")
    ir = ov.Core().read_model(str(path))
    assert [port.get_any_name() for port in ir.inputs] == ["pixel_values"]
    assert str(ir.inputs[0].get_partial_shape()) == "[?,3,?,?]"
    differences = largest_differences(model, OpenVinoSegmenter(path), SIZES, batch=2)
    assert max(differences.values()) <= TOLERANCE, differences


def test_static_ir_takes_its_example_size_and_the_segmenter_resizes_to_it(tmp_path):
    model = build_model("segformer")
    path = export_openvino(model, tmp_path / "static.xml", example_size=(96, 64), dynamic=False)
    assert str(ov.Core().read_model(str(path)).inputs[0].get_partial_shape()) == "[1,3,96,64]"
    segmenter = OpenVinoSegmenter(path)
    assert segmenter.input_size == (96, 64)
    assert segmenter.preprocess([scene()]).shape == (1, 3, 96, 64)  # not the processor's own 512x512
    assert max(largest_differences(model, segmenter, [(96, 64)], batch=2).values()) <= TOLERANCE  # image by image
    assert segmenter.segment(scene()).shape == (83, 129)
    with pytest.raises(ValueError, match="exported for 96x64 inputs; got 128x128"):
        segmenter.logits(np.zeros((1, 3, 128, 128), dtype=np.float32))


@pytest.mark.slow
def test_mask2former_ir_holds_from_its_minimum_size(tmp_path):
    from .test_mask2former import tiny_model

    pytest.importorskip("onnxruntime")  # Mask2Former is converted from its ONNX export
    model = tiny_model(backbone_config=SMALL_WINDOW_SWIN)
    with pytest.raises(ValueError, match="at least 97x97"):
        export_openvino(model, tmp_path / "small.xml", example_size=(96, 160))
    path = export_openvino(model, tmp_path / "m2f.xml", example_size=(128, 160))
    segmenter = OpenVinoSegmenter(path)
    assert segmenter.minimum_size == 97
    differences = largest_differences(model, segmenter, MASK2FORMER_SIZES, batch=1)
    # Masked attention thresholds mask logits at 0.5; docs/export.md measures up to 2e-4 where a bit flips.
    assert max(differences.values()) <= 2e-4, differences
    with pytest.raises(ValueError, match="at least 97x97 pixels; got 96x200"):
        segmenter.logits(np.zeros((1, 3, 96, 200), dtype=np.float32))


def test_wrong_channel_count_is_a_clear_error(exported):
    _, path = exported("segformer")
    segmenter = OpenVinoSegmenter(path)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, height, width\); got \(1, 4"):
        segmenter.logits(np.zeros((1, 4, 64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match=r"got \(3, 64, 64\)"):
        segmenter.logits(np.zeros((3, 64, 64), dtype=np.float32))
    for mode in ("L", "RGBA"):  # the processor makes them RGB
        assert segmenter.segment(scene().convert(mode)).shape == (83, 129)


def test_wrong_paths_are_clear_errors(exported, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.xml does not exist: expected an OpenVINO IR there"):
        OpenVinoSegmenter(tmp_path)
    _, path = exported("segformer")
    lone = tmp_path / "lone.xml"
    lone.write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="no weights file"):
        OpenVinoSegmenter(lone)
    other = tmp_path / "model.onnx"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="does not look like an OpenVINO IR: expected a file ending in .xml"):
        OpenVinoSegmenter(other)
    with pytest.raises(ValueError, match="written as a .xml file"):
        export_openvino(build_model("segformer"), tmp_path / "model.onnx")
