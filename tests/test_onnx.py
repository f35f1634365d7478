"""ONNX export and ONNX Runtime inference (offseg_hf/export/onnx.py): each family exported once with dynamic shapes, ORT
logits against PyTorch at three sizes (square, non-square, odd), graph names, the ORT segmenter against the
pipeline, the command line on a saved folder with int8 quantisation, and clear errors."""

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from transformers import pipeline

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation, OffSegImageProcessor
from offseg_hf.export import onnx as offseg_onnx
from offseg_hf.export.onnx import INPUT_NAME, OUTPUT_NAME, OnnxSegmenter, compare_with_pytorch, export_onnx

from .conftest import build_model, randomize_norms
from .test_backbone_mscan import SMALL_MSCAN

# 512x512, 480x640 and 333x517 scaled by 1/4 (the odd size kept odd, the non-square one non-square).
SIZES = ((128, 128), (120, 160), (83, 129))
TOLERANCE = 1e-4
LABELS = {0: "wall", 1: "floor", 2: "sky", 3: "tree", 4: "car", 5: "person"}


def segnext_model() -> OffSegForSemanticSegmentation:
    torch.manual_seed(0)
    config = OffSegConfig.from_variant("segnext-t-offset", num_labels=5, encoder_config=dict(SMALL_MSCAN))
    model = OffSegForSemanticSegmentation(config).eval()
    randomize_norms(model)
    return model


FAMILIES = {
    "segformer": lambda: build_model("segformer"),
    "segnext": segnext_model,
    "offseg-t": lambda: build_model("offseg-t"),
}
# OffSeg-T is the real EfficientFormerV2-S1 + FreqFusion: its dynamic-shape export traces for minutes on 2 cores.
FAMILY_PARAMS = [pytest.param(f, marks=pytest.mark.slow) if f == "offseg-t" else f for f in sorted(FAMILIES)]


def export_for_test(model, folder):
    """The dynamic-shape export each test of this module shares (the `exported` fixture in conftest.py)."""
    return export_onnx(model, folder / "model.onnx", example_size=(128, 160))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_ort_logits_match_pytorch_at_three_sizes(exported, family):
    model, path = exported(family)
    differences = compare_with_pytorch(model, path, SIZES, batch=2)
    assert set(differences) == set(SIZES)
    assert max(differences.values()) < TOLERANCE, differences


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_graph_names_and_dynamic_dimensions(exported, family):
    model, path = exported(family)
    proto = onnx.load(str(path))
    assert [value.name for value in proto.graph.input] == [INPUT_NAME]
    assert [value.name for value in proto.graph.output] == [OUTPUT_NAME]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [dims[0].dim_param, dims[1].dim_value, dims[2].dim_param, dims[3].dim_param] == [
        "batch",
        3,
        "height",
        "width",
    ]
    output_dims = proto.graph.output[0].type.tensor_type.shape.dim
    assert output_dims[0].dim_param == "batch" and output_dims[1].dim_value == model.config.num_labels
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert {int(k): v for k, v in json.loads(metadata["id2label"]).items()} == model.config.id2label
    assert not list(path.parent.glob("*.data"))  # one self-contained file


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_every_softmax_normalises_the_last_axis(exported, family):
    """ONNX Runtime runs a Softmax over another axis by transposing in and out: the export forms (offset learning's
    class softmax, FreqFusion's kernel softmaxes) lay their scores out so that none is left."""
    proto = onnx.load(str(exported(family)[1]))
    softmaxes = [node for node in proto.graph.node if node.op_type == "Softmax"]
    assert softmaxes
    assert [onnx.helper.get_attribute_value(a) for node in softmaxes for a in node.attribute if a.name == "axis"] == [
        -1
    ] * len(softmaxes)


def test_convolutions_without_bias_let_runtime_fold_their_batchnorm(exported, tmp_path):
    """SegFormer-offset's stage projections are bias-free Conv + BatchNorm: the file has no computed (Expand) bias
    on any Conv, and ONNX Runtime's optimised graph keeps only the BatchNorm that follows a sum, not a Conv."""
    import onnxruntime as ort

    _, path = exported("segformer")
    proto = onnx.load(str(path))
    producer = {output: node for node in proto.graph.node for output in node.output}
    convs = [node for node in proto.graph.node if node.op_type == "Conv"]
    assert convs and not [node.name for node in convs if len(node.input) > 2 and node.input[2] in producer]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(options.optimized_model_filepath).graph
    producer = {output: node for node in optimised.node for output in node.output}
    norms = [node for node in optimised.node if node.op_type == "BatchNormalization"]
    assert [producer[node.input[0]].op_type for node in norms] == ["Add"]


def test_channels_first_mix_ffn_keeps_the_values_and_the_exported_graph_has_no_wide_transpose(exported):
    """SegFormer's Mix-FFN in its export form gives the eager logits (up to rounding), is undone on exit, and the
    exported graph transposes only C-channel token maps, never the 4C-wide hidden map."""
    from transformers.models.segformer.modeling_segformer import SegformerMixMLP

    from offseg_hf.export.segformer import ChannelsFirstMixFFN, channels_first_mix_ffn

    model, path = exported("segformer")
    pixel_values = torch.randn(2, 3, 83, 129, generator=torch.Generator().manual_seed(0))
    mix_ffns = [module for module in model.modules() if type(module) is SegformerMixMLP]
    original = SegformerMixMLP.forward
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
        with channels_first_mix_ffn(model):
            assert mix_ffns and all(type(module) is ChannelsFirstMixFFN for module in mix_ffns)
            actual = model(pixel_values=pixel_values).logits
    assert all(type(module) is SegformerMixMLP for module in mix_ffns)
    assert SegformerMixMLP.forward is original  # the class itself never changes
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)

    encoder = model.config.encoder_config
    hidden = set(encoder.hidden_sizes)
    widths = {int(r * c) for r, c in zip(encoder.mlp_ratios, encoder.hidden_sizes, strict=True)} - hidden
    assert widths  # widened maps whose channel count no token map has
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    transposed = [shapes.get(node.output[0], []) for node in graph.node if node.op_type == "Transpose"]
    assert transposed and not [shape for shape in transposed if len(shape) == 3 and set(shape[1:]) & widths]


# Swin with 3x3 windows and two blocks a stage (the second shifted): windows, shifts and padding all take part at
# these sizes, and the smallest input the dynamic graph holds for is 32 * 3 + 1 = 97 pixels a side.
SMALL_WINDOW_SWIN = {"depths": [2, 2, 2, 2], "embed_dim": 48, "num_heads": [1, 2, 4, 8], "window_size": 3}
MASK2FORMER_SIZES = ((128, 128), (120, 160), (99, 131))  # square, non-square, odd (not multiples of 32 or 3)


@pytest.mark.slow
def test_mask2former_exports_with_dynamic_batch_height_and_width(tmp_path):
    """Mask2Former-offset (tiny Swin/decoder) at three sizes and batch 1 and 2, none the example's: semantic logits at
    the input size within the tolerance (the traced pass is the evaluation pass, intermediate masks at the attention
    size included); the minimum size is in the metadata and the segmenter enforces it."""
    from .test_mask2former import tiny_model

    model = tiny_model(backbone_config=SMALL_WINDOW_SWIN)
    with pytest.raises(ValueError, match="at least 97x97"):
        export_onnx(model, tmp_path / "small.onnx", example_size=(96, 160))
    path = export_onnx(model, tmp_path / "m2f.onnx", example_size=(128, 160))
    proto = onnx.load(str(path))
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    assert [dims[0].dim_param, dims[1].dim_value, dims[2].dim_param, dims[3].dim_param] == [
        "batch",
        4,
        "height",
        "width",
    ]
    assert {entry.key: entry.value for entry in proto.metadata_props}[offseg_onnx.MIN_SIZE_KEY] == "97"
    for batch in (1, 2):
        differences = compare_with_pytorch(model, path, MASK2FORMER_SIZES, batch=batch, seed=batch)
        assert max(differences.values()) < TOLERANCE, differences
    with pytest.raises(ValueError, match="at least 97x97 pixels; got 96x200"):
        OnnxSegmenter(path).logits(np.zeros((1, 3, 96, 200), dtype=np.float32))


def test_mask2former_export_forms_keep_the_values():
    """The export-time Swin (branch-free padding) and pixel decoder (symbolic level sizes) give bitwise the eager
    logits at sizes that pad in every way, and are undone on exit."""
    from offseg_hf.export.mask2former import TRACEABLE_PIXEL_DECODER, traceable_pixel_decoder
    from offseg_hf.export.onnx import SemanticLogits
    from offseg_hf.export.swin import BRANCH_FREE_SWIN, branch_free_swin

    from .test_mask2former import tiny_model

    wrapper = SemanticLogits(tiny_model(backbone_config=SMALL_WINDOW_SWIN))
    forms = {**BRANCH_FREE_SWIN, **TRACEABLE_PIXEL_DECODER}
    classes = [type(module) for module in wrapper.modules()]
    assert set(forms) <= set(classes)
    for size in ((99, 131), (64, 64)):
        pixel_values = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = wrapper(pixel_values)
            with branch_free_swin(wrapper), traceable_pixel_decoder(wrapper):
                assert [type(module) for module in wrapper.modules()] == [forms.get(cls, cls) for cls in classes]
                assert torch.equal(wrapper(pixel_values), expected)
        assert [type(module) for module in wrapper.modules()] == classes


def test_static_export_takes_its_example_size_only(tmp_path):
    model = build_model("segformer")
    path = export_onnx(model, tmp_path / "static.onnx", dynamic=False, example_size=(96, 64))
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 96, 64]
    assert compare_with_pytorch(model, path, [(96, 64)])[(96, 64)] < TOLERANCE


def scene(height: int = 83, width: int = 129, seed: int = 0) -> Image.Image:
    """A blocky RGB image with some structure, so label maps are not constant."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    image = np.kron(blocks, np.ones((height // 6 + 1, width // 8 + 1, 1), dtype=np.uint8))[:height, :width]
    return Image.fromarray(np.clip(image + rng.integers(0, 40, image.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    """A tiny SegFormer-offset with named labels and a 128x128 processor, saved as the scripts save models."""
    folder = tmp_path_factory.mktemp("folder")
    torch.manual_seed(0)
    model = build_model("segformer")
    model.config.id2label, model.config.label2id = dict(LABELS), {v: k for k, v in LABELS.items()}
    model.save_pretrained(folder)
    OffSegImageProcessor(size={"height": 128, "width": 128}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cli_export(saved_folder, tmp_path_factory):
    """The command line on the saved folder, with int8: (printed text, the .onnx path)."""
    import contextlib
    import io

    output = tmp_path_factory.mktemp("cli") / "model.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        offseg_onnx.main(
            [
                "--model_name_or_path",
                str(saved_folder),
                "--output",
                str(output),
                "--example_size",
                "128",
                "160",
                "--verify_sizes",
                "64x96,45x67",
                "--quantize",
                "int8",
            ]
        )
    return printed.getvalue(), output


@pytest.mark.slow
def test_segmenter_label_map_and_segments_equal_the_pipeline(saved_folder, cli_export):
    segmenter = OnnxSegmenter(cli_export[1], image_processor=saved_folder)
    segment = pipeline("image-segmentation", model=str(saved_folder))
    for image in (scene(), scene(200, 150, seed=1)):
        expected = segment(image)
        label_map = segmenter.segment(image)
        assert label_map.shape == (image.height, image.width)
        reference = np.zeros(label_map.shape, dtype=np.int64) - 1
        names = {v: k for k, v in LABELS.items()}
        for item in expected:
            reference[np.asarray(item["mask"]) > 0] = names[item["label"]]
        np.testing.assert_array_equal(label_map, reference)
        assert len(np.unique(label_map)) > 1
        ours = segmenter.pipeline_output(image)
        assert [(s["label"], s["score"]) for s in ours] == [(s["label"], s["score"]) for s in expected]
        for mine, theirs in zip(ours, expected, strict=True):
            assert mine["mask"].mode == theirs["mask"].mode == "L"
            np.testing.assert_array_equal(np.asarray(mine["mask"]), np.asarray(theirs["mask"]))
        assert [s["label"] for s in segmenter(image, return_masks=True)] == [s["label"] for s in expected]


def test_cli_on_a_saved_folder_with_int8(cli_export):
    printed, output = cli_export
    differences = [float(line.rsplit(" ", 1)[1]) for line in printed.splitlines() if line.startswith("ORT vs")]
    assert len(differences) == 2 and max(differences) < TOLERANCE, printed
    quantized = output.with_name("model.int8.onnx")
    assert quantized.is_file() and "int8 ORT vs PyTorch" in printed
    assert (output.parent / "preprocessor_config.json").is_file()  # the folder's processor, for OnnxSegmenter
    # The int8 file runs, keeps the graph's names, and its label map mostly agrees with fp32's.
    fp32, int8 = OnnxSegmenter(output), OnnxSegmenter(quantized)
    assert int8.image_processor.size == {"height": 128, "width": 128}
    image = scene()
    logits = int8.logits(int8.preprocess([image]))
    assert logits.shape == (1, 6, 16, 16) and np.isfinite(logits).all()
    assert (int8.segment(image) == fp32.segment(image)).mean() > 0.5
    assert int8.pipeline_output(image)[0]["label"] in LABELS.values()


def test_static_int8_quantisation_runs(exported, tmp_path):
    _, path = exported("segformer")
    calibration = [np.random.default_rng(i).standard_normal((1, 3, 64, 64)).astype(np.float32) for i in range(2)]
    quantized = offseg_onnx.quantize_int8(path, tmp_path / "static.int8.onnx", mode="static", calibration=calibration)
    logits = OnnxSegmenter(quantized).logits(calibration[0])
    assert logits.shape == (1, 6, 8, 8) and np.isfinite(logits).all()


def test_wrong_channel_count_is_a_clear_error(exported):
    _, path = exported("segformer")
    segmenter = OnnxSegmenter(path)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, height, width\); got \(1, 4"):
        segmenter.logits(np.zeros((1, 4, 64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="got \\(3, 64, 64\\)"):
        segmenter.logits(np.zeros((3, 64, 64), dtype=np.float32))
    # Grayscale and RGBA images become RGB in the processor, so whole images work.
    for mode in ("L", "RGBA"):
        assert segmenter.segment(scene().convert(mode)).shape == (83, 129)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No ONNX file"):
        OnnxSegmenter(tmp_path)


def test_cli_needs_random_init_with_a_variant(capsys):
    with pytest.raises(SystemExit):
        offseg_onnx.main(["--variant", "offseg-t", "--output", "x.onnx"])
    assert "--random_init" in capsys.readouterr().err


# --- The export forms (Mask2Former's needs, checked on small graphs) ---


class ReferencePoints(torch.nn.Module):
    """Mask2Former's pixel-decoder reference points for two levels of a map's size, with the export form's
    `get_reference_points` (`TraceablePixelDecoderEncoder`) or transformers' own."""

    def __init__(self, encoder_class):
        super().__init__()
        self.encoder_class = encoder_class

    def forward(self, x):
        height, width = x.shape[-2:]
        valid_ratios = torch.ones(x.shape[0], 2, 2, dtype=x.dtype) + x.sum() * 0
        levels = [(height, width), (width, height)]
        return self.encoder_class.get_reference_points(levels, valid_ratios, device=x.device)


def test_reference_points_with_symbolic_level_sizes_stay_dynamic(tmp_path):
    """The linspace of the export form's reference points keeps a symbolic step count: one graph gives transformers'
    reference points (torch.linspace's) at every size, a step count of 1 included; `torch.linspace` is untouched."""
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoderEncoderOnly

    from offseg_hf.export.mask2former import TraceablePixelDecoderEncoder

    linspace = torch.linspace
    path = tmp_path / "reference_points.onnx"
    dim = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(
        ReferencePoints(TraceablePixelDecoderEncoder).eval(),
        (torch.zeros(2, 3, 7, 11),),
        dynamo=True,
        dynamic_shapes=({0: dim, 2: dim, 3: dim},),
    )
    program.save(str(path))
    assert torch.linspace is linspace
    session = offseg_onnx.inference_session(path)
    reference = ReferencePoints(Mask2FormerPixelDecoderEncoderOnly)
    for height, width in ((7, 11), (5, 13), (1, 4), (16, 16)):
        x = torch.zeros(1, 3, height, width)
        (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_array_equal(actual, reference(x).numpy())
