"""examples/app.py, the Gradio demo: driven in headless Chromium (upload an image, press Segment, read the page),
and run where offseg_hf is not importable (the Space case: the model folder's own code)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

from offseg_hf import OffSegImageProcessor

from .conftest import bad_image_files, build_model, encoded_image, run_python_elsewhere

APP = Path(__file__).parents[1] / "examples" / "app.py"
SCREENSHOT = Path(os.environ.get("OFFSEG_APP_SCREENSHOT", "/tmp/app_screenshot.png"))
LABELS = ["road", "sky", "tree", "car", "person", "building"]


def browser_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def scene(width: int = 97, height: int = 71) -> Image.Image:
    """An odd-size RGB image with structure, so a random model predicts several classes."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 / width, ys * 255 / height, rng.uniform(0, 255, (height, width))], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("app") / "model"
    model = build_model("segformer")  # 6 classes
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {label: i for i, label in enumerate(LABELS)}
    model.save_pretrained(folder)
    OffSegImageProcessor().save_pretrained(folder)
    return folder


def predicted_classes(folder: Path, image: Image.Image) -> list[str]:
    """The classes in the model's own prediction (processor post-processing at the image size), in id order."""
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    (label_map,) = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])
    return [model.config.id2label[i] for i in sorted(label_map.unique().tolist())]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited with {process.returncode}:\n{process.stdout.read()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not answer at {url} within {timeout} s")


@pytest.mark.slow
def test_page_shows_the_overlay_legend_and_areas_of_the_prediction(model_folder, tmp_path):
    binary = browser_binary()
    if binary is None:
        pytest.skip("no Chromium/Chrome binary installed (apt-get install chromium); .ci/run installs it")
    from playwright.sync_api import expect, sync_playwright

    image = scene()
    image.save(tmp_path / "scene.png")
    expected = predicted_classes(model_folder, image)
    assert len(expected) >= 2, "the test image should give several classes"

    port = free_port()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [sys.executable, str(APP), "--model_name_or_path", str(model_folder), "--port", str(port)],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_server(url, process)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=binary, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                # Generous bounds (they only delay a failure): on a loaded 2-core CI machine the app's first
                # prediction has taken over 30 s.
                page.set_default_timeout(90_000)
                page.goto(url)
                page.locator("#input input[type=file]").set_input_files(str(tmp_path / "scene.png"))
                expect(page.locator("#input img")).to_be_visible(timeout=60_000)  # the upload's preview
                page.locator("#segment").click()
                overlay = page.locator("#overlay img")
                expect(overlay).to_be_visible(timeout=90_000)
                page.wait_for_function(
                    "() => { const img = document.querySelector('#overlay img'); "
                    "return img && img.complete && img.naturalWidth > 0; }",
                    timeout=60_000,
                )
                size = overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]")
                expect(page.locator("#legend .legend-item")).to_have_count(len(expected), timeout=30_000)
                legend = page.locator("#legend .legend-name").all_inner_texts()
                swatches = page.locator("#legend .swatch").evaluate_all(
                    "spans => spans.map(span => getComputedStyle(span).backgroundColor)"
                )
                table = page.locator("#areas").inner_text()
                attention_shown = page.locator("#attention-class").is_visible()
                attention_size = None
                if attention_shown:  # offset models that return the class attention: its picture, image-sized
                    page.wait_for_function(
                        "() => { const img = document.querySelector('#attention img'); "
                        "return img && img.complete && img.naturalWidth > 0; }",
                        timeout=60_000,
                    )
                    attention_size = page.locator("#attention img").evaluate(
                        "img => [img.naturalWidth, img.naturalHeight]"
                    )
                page.screenshot(path=str(SCREENSHOT), full_page=True)
                # An example scene (256x256, generated offline from the demo set) through the same button.
                page.locator("#examples img").first.click()
                # Gradio fetches the example into the input asynchronously: a click on Segment before it is there
                # segments the uploaded image again (seen on a loaded 2-core machine), so wait for its preview.
                page.wait_for_function(
                    "() => { const img = document.querySelector('#input img'); "
                    "return img && img.complete && img.naturalWidth === 256; }",
                    timeout=90_000,
                )
                page.locator("#segment").click()
                page.wait_for_function(
                    "() => { const img = document.querySelector('#overlay img'); "
                    "return img && img.complete && img.naturalWidth === 256; }",
                    timeout=90_000,
                )
                example_size = overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            finally:
                browser.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()

    assert size == [97, 71]  # the overlay at the uploaded image's size
    assert example_size == [256, 256]
    assert legend == expected  # exactly the predicted classes, in id order
    assert len(set(swatches)) == len(expected) and all(colour.startswith("rgb(") for colour in swatches)
    for label in expected:
        assert label in table
    for label in set(LABELS) - set(expected):
        assert label not in table
    # The class-attention control appears only for models that return the class attention.
    model = AutoModelForSemanticSegmentation.from_pretrained(model_folder)
    assert attention_shown == load_app().takes_class_attention(model)
    assert attention_size == ([97, 71] if attention_shown else None)


SPACE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    sys.modules["offseg_hf"] = None  # as on a Space: transformers, torch, gradio and the model's own code
    from PIL import Image
    app_path, folder, image_path = sys.argv[1:4]
    spec = importlib.util.spec_from_file_location("app", app_path)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    segmenter = app.Segmenter(folder)
    image = Image.open(image_path).convert("RGB")
    label_map, attention = segmenter.predict(image)
    config = app.read_app_config()
    demo = app.build_demo(config["models"], allow_download=config["allow_download"])
    rows = app.area_rows(label_map, segmenter.id2label)
    print(json.dumps({
        "have_offseg": app.HAVE_OFFSEG,
        "module": type(segmenter.model).__module__,
        "shape": list(label_map.shape),
        "classes": [segmenter.id2label[i] for i in sorted(set(label_map.flatten().tolist()))],
        "rows": rows,
        "examples": app.example_images(),
        "config": config,
        "demo": type(demo).__name__,
    }))
    """
)


@pytest.mark.slow
def test_app_runs_without_offseg_hf_through_the_model_folders_code(model_folder, tmp_path):
    # A Space's layout: app.py next to app_config.json and example_images/ (what push_to_hub.py --space_dir writes).
    space = tmp_path / "space"
    (space / "example_images").mkdir(parents=True)
    shutil.copyfile(APP, space / "app.py")
    (space / "app_config.json").write_text(json.dumps({"models": [str(model_folder)], "allow_download": False}))
    scene(32, 24).save(space / "example_images" / "a.png")
    image = scene()
    image.save(tmp_path / "scene.png")
    line = run_python_elsewhere(
        SPACE_SCRIPT,
        str(space / "app.py"),
        str(model_folder),
        str(tmp_path / "scene.png"),
        cwd=tmp_path,
        timeout=300,
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        GRADIO_ANALYTICS_ENABLED="False",
    )
    report = json.loads(line)
    assert report["have_offseg"] is False and report["module"].startswith("transformers_modules")
    assert report["shape"] == [71, 97] and report["classes"] == predicted_classes(model_folder, image)
    assert sorted(row[0] for row in report["rows"]) == sorted(report["classes"])
    assert abs(sum(row[1] for row in report["rows"]) - 100) < 0.05 and sum(row[2] for row in report["rows"]) == 97 * 71
    assert report["config"]["models"] == [str(model_folder)] and report["demo"] == "Blocks"
    assert report["examples"] == [str(space / "example_images" / "a.png")]


def test_pictures_are_at_the_image_size_and_colours_differ():
    app = load_app()
    colours = app.palette(150)
    assert colours.shape == (150, 3) and len({tuple(c) for c in colours}) == 150
    image = scene(13, 9)
    label_map = np.zeros((9, 13), dtype=np.int64)
    label_map[:, 7:] = 2
    tinted = app.overlay(image, label_map, colours)
    assert tinted.size == (13, 9)
    assert not np.array_equal(np.asarray(tinted)[:, :7], np.asarray(image)[:, :7])
    attention = np.random.default_rng(0).random((3, 4, 5))
    assert app.attention_picture(image, attention[1]).size == (13, 9)
    assert app.area_rows(label_map, dict(enumerate("abc"))) == [["a", 53.85, 63], ["c", 46.15, 54]]
    assert 'data-label="a"' in app.legend_html([0, 2], dict(enumerate("abc")), colours)


def load_app():
    import importlib.util

    spec = importlib.util.spec_from_file_location("offseg_app", APP)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    return app


class NoClassAttentionModel(torch.nn.Module):
    """A model whose forward does not take `output_class_attention` (older model code, Mask2Former)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, pixel_values):
        return self.inner(pixel_values=pixel_values)


class ClassAttentionModel(NoClassAttentionModel):
    """A model whose forward returns the class attention on request, as OffSeg's offset models do."""

    def forward(self, pixel_values, output_class_attention=False):
        outputs = self.inner(pixel_values=pixel_values)
        if output_class_attention:
            logits = outputs.logits  # (B, K, h, w)
            outputs.class_attention = logits.flatten(2).softmax(-1).reshape(logits.shape)
        return outputs


def test_the_class_attention_control_follows_the_model(model_folder):
    app = load_app()
    segmenter = app.Segmenter(str(model_folder))
    model = segmenter.model
    image = scene()
    segmenter.model = NoClassAttentionModel(model)
    segmenter.can_return_attention = app.takes_class_attention(segmenter.model)
    assert not segmenter.can_return_attention
    plain = app.segment_outputs(segmenter, image)
    assert plain[0].size == (97, 71) and plain[3]["visible"] is False and plain[4]["visible"] is False
    segmenter.model = ClassAttentionModel(model)
    segmenter.can_return_attention = app.takes_class_attention(segmenter.model)
    assert segmenter.can_return_attention
    overlay, legend, rows, choice, picture, state = app.segment_outputs(segmenter, image)
    names = [LABELS[i] for i in sorted(np.unique(segmenter.predict(image)[0]).tolist())]
    assert choice["visible"] and choice["choices"] == names and choice["value"] == names[0]
    assert picture["visible"] and picture["value"].size == (97, 71)
    assert state["attention"].shape[0] == len(LABELS)
    other = app.show_attention(names[-1], state)
    assert other.size == (97, 71) and (names[-1] == names[0] or other.tobytes() != picture["value"].tobytes())
    assert np.asarray(overlay).shape == (71, 97, 3) and np.array_equal(np.asarray(overlay), np.asarray(plain[0]))


def write_upload(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def upload_answers(model_folder, tmp_path_factory):
    """The Segment button's answer (`segment_upload`, an upload's path as Gradio hands it over) to each bad upload
    under a 2000-pixel limit, and whether the good upload after it is answered."""
    import gradio as gr

    tmp_path = tmp_path_factory.mktemp("uploads")
    app = load_app()
    cache = app.ModelCache(allow_download=False, device="cpu")
    uploads = bad_image_files(scene)
    good = write_upload(tmp_path / "good.png", encoded_image(scene(37, 53), "PNG"))  # 1961 pixels
    answers = {}
    for name, data in uploads.items():
        path = write_upload(tmp_path / name, data)
        try:
            outputs = app.segment_upload(cache, 2000, path, str(model_folder))
            answers[name] = {"error": None, "overlay": outputs[0].size}
        except gr.Error as error:
            answers[name] = {"error": error.message}
        answers[name]["next"] = app.segment_upload(cache, 2000, good, str(model_folder))[0].size
    return answers


@pytest.mark.parametrize(
    "case, message",
    [
        ("over_limit", "The image has 50x50 = 2,500 pixels, more than this app's limit of 2,000"),
        ("truncated_jpeg", "The image could not be decoded (truncated or corrupt?)"),
        ("text", "The file is not an image this app can read"),
        ("empty_png", "The image is empty (a PNG of 0 pixels)."),
        ("animated_gif", "Animated or multi-frame images are not supported"),
        ("bomb", "The image is too large to decode safely"),
    ],
)
def test_bad_uploads_get_one_line_errors_and_the_next_upload_is_segmented(upload_answers, case, message):
    answer = upload_answers[case]
    assert answer["error"] is not None and message in answer["error"] and "\n" not in answer["error"], answer
    assert answer["next"] == (37, 53)


def test_upload_limit_comes_from_the_flag_the_config_or_the_environment(upload_answers, monkeypatch):
    assert upload_answers["mpo_photo"] == {"error": None, "overlay": (20, 10), "next": (37, 53)}  # its first frame
    app = load_app()
    monkeypatch.delenv("OFFSEG_MAX_IMAGE_PIXELS", raising=False)
    assert app.max_image_pixels() == 4096 * 4096
    monkeypatch.setenv("OFFSEG_MAX_IMAGE_PIXELS", "1_000_000")
    assert app.max_image_pixels() == 1_000_000
    assert app.max_image_pixels(config={"max_image_pixels": 500}) == 500 and app.max_image_pixels(7, {}) == 7
    with pytest.raises(app.gr.Error, match=r"The image is empty \(0x0 pixels\)\."):
        app.open_upload(Image.new("RGB", (0, 0)), 100)
    with pytest.raises(app.gr.Error, match="Upload an image or pick an example first"):
        app.open_upload(None, 100)
