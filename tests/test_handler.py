"""The Inference Endpoints handler every Hub folder carries: it runs where offseg_hf is not importable, takes the
image as PIL, bytes, base64 or a data URL, and returns one base64 PNG mask per present class at the image size."""

import base64
import importlib.util
import io
import json
import pickle
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from offseg_hf import OffSegImageProcessor
from offseg_hf.hub.repos import endpoint_requirements, handler_source, write_endpoint_files
from offseg_hf.presets import model_for_variant

from .conftest import TINY_MASK2FORMER, bad_image_files, build_model, encoded_image, run_python_elsewhere

MASK2FORMER = "mask2former-swin-t-offset"

# The handler, driven as Inference Endpoints does (EndpointHandler(path)(data)), in a process without offseg_hf.
# It prints, per input kind, the labels, scores and decoded masks (as lists) for the test to check.
HANDLER_SCRIPT = textwrap.dedent(
    """
    import base64, io, json, sys
    sys.modules["offseg_hf"] = None  # as on an endpoint: only transformers, torch and the repo's own code
    import numpy as np
    from PIL import Image
    import importlib.util

    def load_handler(folder):  # the toolkit imports handler.py from the repo root
        spec = importlib.util.spec_from_file_location("handler", folder + "/handler.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.EndpointHandler(path=folder)

    image_path, folder = sys.argv[1], sys.argv[2]
    handler = load_handler(folder)
    raw = open(image_path, "rb").read()
    encoded = base64.b64encode(raw).decode()
    inputs = {
        "pil": Image.open(image_path),
        "bytes": raw,
        "base64": encoded,
        "data_url": "data:image/png;base64," + encoded,
    }

    def decode(segment):
        mask = Image.open(io.BytesIO(base64.b64decode(segment["mask"])))
        return {"label": segment["label"], "score": segment["score"], "mode": mask.mode, "size": mask.size,
                "values": sorted(np.unique(np.asarray(mask)).tolist()), "mask": (np.asarray(mask) > 0).tolist()}

    report = {kind: [decode(s) for s in handler({"inputs": value})] for kind, value in inputs.items()}
    task_parameters = {"threshold": 0.9, "mask_threshold": 0.5, "overlap_mask_area_threshold": 0.8}
    task_parameters["subtask"] = "semantic"
    report["task_parameters"] = [decode(s) for s in handler({"inputs": raw, "parameters": task_parameters})]
    answer = handler({"inputs": encoded, "parameters": {"return_label_map": True}})
    label_map = Image.open(io.BytesIO(base64.b64decode(answer["label_map"])))
    report["label_map"] = {"mode": label_map.mode, "ids": np.asarray(label_map).tolist(),
                           "labels": [s["label"] for s in answer["segments"]]}
    errors = {}
    for name, data in {"no_inputs": {}, "text": {"inputs": "not an image!"}, "number": {"inputs": 3},
                       "parameter": {"inputs": raw, "parameters": {"bogus": 0.5}},
                       "subtask": {"inputs": raw, "parameters": {"subtask": "panoptic"}}}.items():
        try:
            handler(data)
        except ValueError as error:
            errors[name] = str(error)
    report["errors"] = errors
    report["module"] = type(handler.model).__module__
    for other in sys.argv[3:]:  # more folders: the segments of the PIL input only
        report[other] = [decode(s) for s in load_handler(other)({"inputs": Image.open(image_path)})]
    print(json.dumps(report))
    """
)


def odd_image(width: int = 37, height: int = 53) -> Image.Image:
    """An RGB image of odd size with structure (so a random model predicts several classes)."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 / width, ys * 255 / height, rng.uniform(0, 255, (height, width))], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def save_folder(model, folder: Path, variant: str) -> Path:
    model.config.id2label = {i: f"class-{i}" for i in range(model.config.num_labels)}
    model.config.label2id = {label: i for i, label in model.config.id2label.items()}
    model.save_pretrained(folder)
    OffSegImageProcessor().save_pretrained(folder)
    write_endpoint_files(folder, variant)
    return folder


def expected_label_map(model, image: Image.Image) -> np.ndarray:
    """The model's own prediction at the image size, through the processor's post-processing."""
    processor = OffSegImageProcessor()
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    (label_map,) = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])
    return label_map.numpy()


def expected_scores(model, image: Image.Image, normalised: bool = False) -> dict[int, float]:
    """Each predicted class's mean probability over its pixels, from the whole (K, H, W) resized logits."""
    processor = OffSegImageProcessor()
    with torch.no_grad():
        logits = model(**processor(images=image, return_tensors="pt")).logits.float()
    resized = torch.nn.functional.interpolate(logits, size=image.size[::-1], mode="bilinear", align_corners=False)[0]
    probabilities = resized / resized.sum(dim=0, keepdim=True) if normalised else resized.softmax(dim=0)
    labels = resized.argmax(dim=0)
    return {int(k): probabilities[k][labels == k].mean().item() for k in labels.unique()}


@pytest.fixture(scope="module")
def handler_report(tmp_path_factory):
    """The handler's answers for a small SegFormer-offset folder (every input kind) and a small Mask2Former-offset
    folder (PIL input), next to each model's own prediction."""
    tmp_path = tmp_path_factory.mktemp("handler")
    segformer = build_model("segformer")
    torch.manual_seed(0)
    mask2former = model_for_variant(MASK2FORMER, **TINY_MASK2FORMER).eval()
    folders = {
        "segformer": save_folder(segformer, tmp_path / "segformer", "segformer-b0-offset"),
        "mask2former": save_folder(mask2former, tmp_path / "mask2former", MASK2FORMER),
    }
    image = odd_image()
    image.save(tmp_path / "image.png")
    line = run_python_elsewhere(
        HANDLER_SCRIPT,
        str(tmp_path / "image.png"),
        *map(str, folders.values()),
        cwd=tmp_path,
        timeout=300,
        HF_MODULES_CACHE=str(tmp_path / "modules"),
    )
    report = json.loads(line)
    report["mask2former"] = report.pop(str(folders["mask2former"]))
    models = {"segformer": segformer, "mask2former": mask2former}
    expected = {name: expected_label_map(model, image) for name, model in models.items()}
    report["expected_scores"] = {
        "segformer": expected_scores(segformer, image),
        "mask2former": expected_scores(mask2former, image, normalised=True),
    }
    return report, expected, segformer.config.id2label


def check_segments(
    segments: list[dict], expected: np.ndarray, id2label: dict[int, str], scores: dict[int, float]
) -> None:
    """One "L" 0/255 mask per class of the model's own prediction, in id order, at the image size; disjoint masks
    that cover the image; each score the class's mean probability over its mask (rounded to 4 decimals)."""
    present = sorted(np.unique(expected).tolist())
    assert [s["label"] for s in segments] == [id2label[i] for i in present]
    union = np.zeros(expected.shape, dtype=np.int64)
    for class_id, segment in zip(present, segments, strict=True):
        assert segment["mode"] == "L" and segment["size"] == [37, 53] and set(segment["values"]) <= {0, 255}
        mask = np.array(segment["mask"])
        assert mask.shape == (53, 37) and mask.any()
        np.testing.assert_array_equal(mask, expected == class_id)  # the model's own prediction
        assert 0 < segment["score"] <= 1
        assert segment["score"] == pytest.approx(scores[class_id], abs=5e-5 + 1e-6)
        union += mask
    assert (union == 1).all()  # disjoint, and together they cover the image


def test_folder_carries_the_handler_and_its_requirements(tmp_path):
    paths = write_endpoint_files(tmp_path, "offseg-t")
    assert [p.name for p in paths] == ["handler.py", "requirements.txt"]
    assert (tmp_path / "handler.py").read_text() == handler_source() and "class EndpointHandler" in handler_source()
    assert "import offseg_hf" not in handler_source() and "from offseg_hf" not in handler_source()
    requirements = (tmp_path / "requirements.txt").read_text().split()
    assert "transformers>=5" in requirements and "timm>=1.0" in requirements and "scipy>=1.10" not in requirements
    assert "scipy>=1.10" in endpoint_requirements("mask2former-swin-t-offset")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pil", "bytes", "base64", "data_url"])
def test_handler_returns_one_mask_per_predicted_class(handler_report, kind):
    report, expected, id2label = handler_report
    assert report["module"].startswith("transformers_modules")  # the folder's remote code, not offseg_hf
    assert len(np.unique(expected["segformer"])) >= 2, "the test image should give several classes"
    check_segments(report[kind], expected["segformer"], id2label, report["expected_scores"]["segformer"])


def test_handler_runs_mask2former_folders(handler_report):
    report, expected, _ = handler_report
    scores = report["expected_scores"]["mask2former"]
    check_segments(report["mask2former"], expected["mask2former"], {i: f"class-{i}" for i in range(4)}, scores)


def test_handler_returns_the_label_map_on_request_and_refuses_bad_requests(handler_report):
    report, expected, id2label = handler_report
    assert report["label_map"]["mode"] == "L"
    np.testing.assert_array_equal(np.array(report["label_map"]["ids"]), expected["segformer"])
    assert report["label_map"]["labels"] == [id2label[i] for i in sorted(np.unique(expected["segformer"]).tolist())]
    errors = report["errors"]
    assert set(errors) == {"no_inputs", "text", "number", "parameter", "subtask"}
    assert '"inputs"' in errors["no_inputs"] and "could not be read as an image" in errors["text"]
    assert "got int" in errors["number"] and "unknown parameters ['bogus']" in errors["parameter"]
    assert "semantic segmentation only; got subtask 'panoptic'" in errors["subtask"]
    assert report["task_parameters"] == report["bytes"]  # the task's own parameters are accepted, without effect


def load_handler_module(folder: Path):
    (folder / "handler.py").write_text(handler_source())
    spec = importlib.util.spec_from_file_location("offseg_endpoint_handler", folder / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_handler_scores_mask2former_maps_as_probabilities(tmp_path):
    # Mask2Former's semantic maps are sums of class x mask probabilities, not logits: normalised, not softmaxed (the
    # scores themselves: tests/test_resize_bands.py).
    module = load_handler_module(tmp_path)
    m2f = type("M", (), {"config": type("C", (), {"num_queries": 100})()})()
    plain = type("M", (), {"config": type("C", (), {})()})()
    assert module.score_kind(m2f) == "normalised" and module.score_kind(plain) == "softmax"
    image = odd_image(5, 4)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    decoded = module._decode_image({"image": base64.b64encode(buffer.getvalue()).decode()})
    assert decoded.size == (5, 4)


def test_pixel_limit_comes_from_the_argument_the_environment_or_the_default(tmp_path, monkeypatch):
    module = load_handler_module(tmp_path)
    monkeypatch.delenv("OFFSEG_MAX_IMAGE_PIXELS", raising=False)
    assert module.pixel_limit() == 4096 * 4096 and module.pixel_limit(10) == 10
    monkeypatch.setenv("OFFSEG_MAX_IMAGE_PIXELS", "25_000_000")
    assert module.pixel_limit() == 25_000_000
    monkeypatch.setenv("OFFSEG_MAX_IMAGE_PIXELS", "big")
    with pytest.raises(ValueError, match="OFFSEG_MAX_IMAGE_PIXELS='big' is not a whole number of pixels"):
        module.pixel_limit()


# One request per bad input to a handler whose pixel limit is 2000 (OFFSEG_MAX_IMAGE_PIXELS), each followed by a
# good request, in a process without offseg_hf; the error each raised (or None) and whether the next one was served.
LIMITS_SCRIPT = textwrap.dedent(
    """
    import importlib.util, io, json, pickle, sys
    sys.modules["offseg_hf"] = None
    from PIL import Image

    folder, cases_path = sys.argv[1], sys.argv[2]
    spec = importlib.util.spec_from_file_location("handler", folder + "/handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = module.EndpointHandler(path=folder)
    cases = pickle.load(open(cases_path, "rb"))
    good = cases.pop("good")
    report = {"limit": handler.max_image_pixels}
    for name, data in cases.items():
        inputs = Image.open(io.BytesIO(data[4:])) if data[:4] == b"PIL:" else data  # as the toolkit hands it over
        try:
            answer = handler({"inputs": inputs})
            error = None
        except ValueError as exception:
            error, answer = str(exception), None
        served = handler({"inputs": good})
        report[name] = {"error": error, "segments": None if answer is None else len(answer), "next": len(served)}
    raised = module.EndpointHandler(path=folder, max_image_pixels=3000)
    report["raised_limit"] = len(raised({"inputs": cases["over_limit"]}))
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def limits_report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("limits")
    folder = save_folder(build_model("segformer"), tmp_path / "segformer", "segformer-b0-offset")
    cases = {
        **bad_image_files(odd_image),
        "good": encoded_image(odd_image(), "PNG"),  # 37x53 = 1961 pixels, within the limit
        "over_limit_pil": b"PIL:" + encoded_image(odd_image(60, 40), "PNG"),
        "empty_bytes": b"",
    }
    (tmp_path / "cases.pkl").write_bytes(pickle.dumps(cases))
    line = run_python_elsewhere(
        LIMITS_SCRIPT,
        str(folder),
        str(tmp_path / "cases.pkl"),
        cwd=tmp_path,
        timeout=300,
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        OFFSEG_MAX_IMAGE_PIXELS="2000",
    )
    return json.loads(line)


@pytest.mark.parametrize(
    "case, message",
    [
        ("over_limit", "the image has 50x50 = 2,500 pixels, more than this endpoint's limit of 2,000"),
        ("over_limit_pil", "the image has 60x40 = 2,400 pixels, more than this endpoint's limit of 2,000"),
        ("bomb", "the image is too large to decode safely"),
        ("truncated_jpeg", "the image could not be decoded (truncated or corrupt?)"),
        ("text", "inputs could not be read as an image (24 bytes that are not a known image format)"),
        ("empty_png", "the image is empty (a PNG of 0 pixels)"),
        ("empty_bytes", "inputs is empty: no image data"),
        ("animated_gif", "animated or multi-frame images are not supported (a GIF file with more than one frame)"),
    ],
)
def test_bad_inputs_get_one_line_errors_and_the_handler_serves_the_next_request(limits_report, case, message):
    report = limits_report[case]
    assert report["error"] is not None and message in report["error"], report
    assert "\n" not in report["error"]
    assert report["next"] >= 1  # the next (good) request is answered


def test_limits_hold_for_the_deployers_value_and_mpo_photos_pass(limits_report, tmp_path):
    assert limits_report["limit"] == 2000  # from OFFSEG_MAX_IMAGE_PIXELS
    assert limits_report["raised_limit"] >= 1  # a 2500-pixel image under a limit of 3000
    assert limits_report["mpo_photo"]["error"] is None and limits_report["mpo_photo"]["segments"] >= 1
    module = load_handler_module(tmp_path)
    with pytest.raises(ValueError, match=r"^the image is empty \(0x0 pixels\)$"):
        module._decode_image(Image.new("RGB", (0, 0)))
