"""push_to_hub.py: one repo folder per variant, each loading without offseg_hf installed; its arguments and upload."""

import fnmatch
import importlib.util
import io
import json
import re
import shutil
import textwrap
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from offseg_hf import VARIANTS, OffSegConfig, OffSegForSemanticSegmentation, OffSegImageProcessor
from offseg_hf.data.demo import generate_scene
from offseg_hf.hub.examples import EXAMPLE_PHOTOS, overlay, palette, photo_bytes
from offseg_hf.hub.repos import count_gmac, weights_fingerprint
from offseg_hf.models.offset_learning import OffsetLearning
from offseg_hf.presets import all_variant_names, model_for_variant

from .conftest import TINY_ENCODER, run_python_elsewhere, tiny_config
from .test_train_script import TINY_DEMO, TINY_MODEL, TINY_RECIPE, TRAIN_SCRIPT, _reset_accelerate

SCRIPT = Path(__file__).parents[1] / "examples" / "push_to_hub.py"
README = Path(__file__).parents[1] / "README.md"

CHECK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.modules["offseg_hf"] = None  # as on a machine without the package
    from huggingface_hub import ModelCard
    from PIL import Image
    from transformers import pipeline
    report = {}
    for folder in sys.argv[1:]:
        segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True)
        segments = segmenter(Image.new("RGB", (61, 47), (120, 80, 40)))
        card = ModelCard.load(f"{folder}/README.md").data
        report[folder] = {
            "module": type(segmenter.model).__module__,
            "mask_sizes": sorted({s["mask"].size for s in segments}),
            "pipeline_tag": card.pipeline_tag,
            "license": card.license,
            "datasets": card.datasets,
            "widget": bool(card.get("widget")),
            "widget_files": all(
                os.path.isfile(os.path.join(folder, path))
                for example in card.get("widget") or ()
                for path in (example["src"], example["output"]["url"])
            ),
            "eval_results": [(r.metric_name, r.metric_value) for r in (card.eval_results or [])],
        }
    print(json.dumps(report))
    """
)


def load_script():
    spec = importlib.util.spec_from_file_location("push_to_hub_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_results(results_dir: Path, variant: str, result: dict) -> None:
    """evaluate_segmentation.py's layout: --output_dir DIR/<variant> holds eval_results.json."""
    (results_dir / variant).mkdir(parents=True, exist_ok=True)
    (results_dir / variant / "eval_results.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_output_dir_gets_one_loadable_repo_per_variant(tmp_path):
    results = tmp_path / "results"
    measured = {"mean_iou": 0.4123, "mean_accuracy": 0.5, "overall_accuracy": 0.8, "num_images": 2000}
    torch.manual_seed(0)  # the script's --random_init model for offseg-t, whose weights these results describe
    measured["weights_sha256"] = weights_fingerprint(
        OffSegForSemanticSegmentation(OffSegConfig.from_variant("offseg-t"))
    )
    write_results(results, "offseg-t", measured)
    overrides = {
        "segformer": {"encoder_config": TINY_ENCODER, "decoder_hidden_size": 32},
        "lightham": {"encoder_config": {"depths": [1, 1, 1, 1]}, "decoder_hidden_size": 64},
        "mask2former": {"backbone_config": {"depths": [1, 1, 1, 1]}, "encoder_layers": 1, "decoder_layers": 3},
    }
    folders = load_script().main(
        [
            "--output_dir",
            str(tmp_path / "hub"),
            "--random_init",
            "--config_overrides",
            json.dumps(overrides),
            "--results_dir",
            str(results),
            # Rendering the example photos runs every full-size preset four times (minutes on 2 cores); the
            # rendering is tested on small models in test_cards_show_predictions_rendered_from_the_published_weights.
            "--no_examples",
        ]
    )
    assert sorted(f.name for f in folders) == sorted(all_variant_names()) and len(folders) == 17
    for folder in folders:
        names = {p.name for p in folder.iterdir()}
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        code = {f"{reference.split('.')[0]}.py" for reference in auto_map.values()}  # the modules auto_map names
        expected = {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"}
        assert expected | {"handler.py", "requirements.txt"} | code <= names  # + the Inference Endpoints handler
        assert "AutoModelForSemanticSegmentation" in auto_map and "image_processing_offseg.py" in code
    # The card says measured results only where a result was given.
    assert "41.23" in (tmp_path / "hub" / "offseg-t" / "README.md").read_text()
    assert "Not evaluated yet" in ModelCard.load(tmp_path / "hub" / "offseg-b" / "README.md").text

    last_line = run_python_elsewhere(
        CHECK_SCRIPT, *map(str, folders), cwd=tmp_path, timeout=600, HF_MODULES_CACHE=str(tmp_path / "modules")
    )
    report = json.loads(last_line)
    for folder in folders:
        entry = report[str(folder)]
        assert entry["module"].startswith("transformers_modules"), entry
        assert entry["mask_sizes"] == [[61, 47]]
        assert entry["pipeline_tag"] == "image-segmentation" and entry["license"] == "apache-2.0"
        assert entry["datasets"] == ["scene_parse_150"] and not entry["widget"]  # --no_examples
        expected = [["mIoU", 41.23], ["mAcc", 50.0], ["aAcc", 80.0]] if folder.name == "offseg-t" else []
        assert entry["eval_results"] == expected, folder.name


TINY_SEGFORMER = ["--config_overrides", json.dumps({"segformer": {"encoder_config": TINY_ENCODER}})]


def test_results_measured_on_other_weights_are_refused(tmp_path, capsys):
    results = tmp_path / "results"
    base = ["--variants", "segformer-b0-offset", "--random_init", *TINY_SEGFORMER, "--results_dir", str(results)]
    measured = {"mean_iou": 0.4, "mean_accuracy": 0.5, "overall_accuracy": 0.8}
    for recorded in (None, "0" * 64):  # an empty fingerprint, or another model's
        write_results(results, "segformer-b0-offset", {**measured, "weights_sha256": recorded})
        with pytest.raises(ValueError, match="not measured on these weights"):
            load_script().main(["--output_dir", str(tmp_path / "hub"), *base])
        assert not (tmp_path / "hub" / "segformer-b0-offset").exists()
    write_results(results, "segformer-b0-offset", measured)  # none at all: refused before any work
    with pytest.raises(SystemExit):
        load_script().main(["--output_dir", str(tmp_path / "hub"), *base])
    assert "names no weights_sha256" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--random_init", "--variants", "segformer-b9"], "unknown variant 'segformer-b9'; known: offseg-b, "),
        (["--weights_dir", "nowhere"], "--weights_dir nowhere is not a folder."),
        (["--model_dir", "nowhere"], "--model_dir nowhere is not a folder."),
        (["--random_init", "--config_overrides", "{"], "--config_overrides is not JSON"),
        (
            ["--random_init", "--config_overrides", '{"mit": {}}'],
            "keys among ['lightham', 'mask2former', 'offseg', 'segformer']",
        ),
        (["--random_init", "--results_dir", "nowhere"], "--results_dir nowhere is not a folder."),
        (["--random_init", "--hub_namespace", "org"], "apply with --push_to_hub"),
    ],
)
def test_arguments_are_checked_before_any_work(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        load_script().main(["--output_dir", str(tmp_path / "hub"), *args])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in error and message in error
    assert not (tmp_path / "hub").exists()


def test_help_names_every_flag_and_the_size_of_random_init(capsys):
    with pytest.raises(SystemExit):
        load_script().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--output_dir", "--dataset_name", "--dataset_pretty_name", "--push_to_hub", "--hub_namespace"):
        assert flag in text
    for flag in ("--hub_token", "--seed", "--model_dir", "--weights_dir", "--random_init", "--variants"):
        assert flag in text
    assert "--no_examples" in text
    assert all(action.help for action in load_script().build_parser()._actions)
    # The size --random_init writes at full size: the presets' state dicts (what model.safetensors holds), built
    # on the meta device; --help and the README state the same figure.
    with torch.device("meta"):
        models = [model_for_variant(variant) for variant in all_variant_names()]
    gigabytes = sum(t.numel() * t.element_size() for m in models for t in m.state_dict().values()) / 1e9
    claim = f"about {gigabytes:.1f} GB for all {len(models)} variants"
    assert claim in text
    publish = README.read_text().split("**Publish**")[1].split("## ")[0]
    assert claim in " ".join(publish.split())


def saved_model(folder: Path, size: dict | None = None, **config) -> Path:
    """A saved tiny SegFormer-B0-offset with its processor, as train.py or offseg_hf.convert.official leaves one."""
    torch.manual_seed(0)
    OffSegForSemanticSegmentation(tiny_config(**config)).save_pretrained(folder)
    OffSegImageProcessor(size=size or {"height": 64, "width": 96}).save_pretrained(folder)
    return folder


def test_a_trained_folder_is_published_as_trained(tmp_path):
    # Train (examples/train.py, the demo set, 2 steps) -> publish the output folder -> the published folder
    # segments a photo exactly as the trained one: same weights, same processor (trained at 48x64, not 512x512).
    spec = importlib.util.spec_from_file_location("offseg_train_for_hub", TRAIN_SCRIPT)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    trained = tmp_path / "outputs" / "demo-segformer-b0-offset"  # train.py's default name: outputs/<recipe>-<variant>
    _reset_accelerate()
    try:
        crop = ["--crop_size", "48", "64", "--max_train_steps", "2"]
        train.main([*TINY_DEMO, *TINY_RECIPE, *TINY_MODEL, *crop, "--output_dir", str(trained)])
    finally:
        _reset_accelerate()
    (folder,) = load_script().main(["--output_dir", str(tmp_path / "hub"), "--model_dir", str(trained)])
    assert folder == tmp_path / "hub" / "demo-segformer-b0-offset"  # the repo is named after the folder

    for name in ("preprocessor_config.json", "config.json"):
        assert (folder / name).read_bytes() == (trained / name).read_bytes(), name
    assert json.loads((folder / "preprocessor_config.json").read_text())["size"] == {"height": 48, "width": 64}
    from transformers import pipeline

    photo = Image.fromarray(generate_scene(np.random.default_rng(7), 83, 117)[0])  # RGB, not square
    expected = pipeline("image-segmentation", model=str(trained))(photo)
    published = pipeline("image-segmentation", model=str(folder))
    segments = published(photo)
    assert [s["label"] for s in segments] == [s["label"] for s in expected]
    for got, want in zip(segments, expected, strict=True):
        assert got["mask"].size == (117, 83) and np.array_equal(np.asarray(got["mask"]), np.asarray(want["mask"]))
    # The masks can agree by chance after 2 steps; the logits cannot, unless the processor is the trained one.
    inputs = published.image_processor(photo, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[-2:]) == (48, 64)
    with torch.no_grad():
        logits = published.model(**inputs).logits
        reference = OffSegForSemanticSegmentation.from_pretrained(trained).eval()
        assert torch.equal(
            logits, reference(**OffSegImageProcessor.from_pretrained(trained)(photo, return_tensors="pt")).logits
        )

    # The card: the training data and train.py's own evaluation of these weights.
    result = json.loads((trained / "eval_results.json").read_text())
    card = ModelCard.load(folder / "README.md")
    assert card.data.datasets is None  # the demo set is drawn locally, no Hub data set to link
    assert [(r.dataset_type, r.metric_name, r.metric_value) for r in card.data.eval_results][0] == (
        "offseg-demo",
        "mIoU",
        round(100 * result["mean_iou"], 2),
    )
    assert "trained by offseg-hf's `examples/train.py` (recipe `demo`, 2 steps)" in card.text
    assert "| 5 (offseg-hf's synthetic demo scenes) |" in card.text


def test_weights_dir_publishes_the_variants_it_holds(tmp_path, capsys):
    converted = tmp_path / "converted"
    saved_model(converted / "segformer-b0-offset")
    script = load_script()
    args = ["--output_dir", str(tmp_path / "hub"), "--weights_dir", str(converted)]
    (folder,) = script.main(args)  # not every preset is there: the ones that are
    assert folder.name == "segformer-b0-offset"
    processor = converted / "segformer-b0-offset" / "preprocessor_config.json"
    assert (folder / "preprocessor_config.json").read_bytes() == processor.read_bytes()
    assert ModelCard.load(folder / "README.md").data.datasets == ["scene_parse_150"]  # 6 classes, not the demo's
    # Named variants must all be there; a results file of another recipe's data needs the data named.
    with pytest.raises(SystemExit):
        script.main([*args, "--variants", "segformer-b0-offset", "offseg-t", "segnext-t"])
    assert capsys.readouterr().err.strip().endswith(f"--weights_dir {converted} has no folder for offseg-t, segnext-t.")
    model = OffSegForSemanticSegmentation.from_pretrained(converted / "segformer-b0-offset")
    results = {"mean_iou": 0.5, "mean_accuracy": 0.6, "overall_accuracy": 0.9, "recipe": "cityscapes-160k"}
    write_results(
        tmp_path / "results", "segformer-b0-offset", {**results, "weights_sha256": weights_fingerprint(model)}
    )
    with pytest.raises(SystemExit):
        script.main([*args, "--results_dir", str(tmp_path / "results")])
    assert "recipe 'cityscapes-160k', not on ADE20K: name the data set" in capsys.readouterr().err
    named = ["--dataset_name", "cityscapes", "--dataset_pretty_name", "Cityscapes"]
    (folder,) = script.main([*args, "--results_dir", str(tmp_path / "results"), *named])
    card = ModelCard.load(folder / "README.md")
    assert card.data.datasets == ["cityscapes"] and card.data.eval_results[0].dataset_name == "Cityscapes"


def test_model_dir_mistakes_end_with_one_line(tmp_path, capsys):
    saved_model(tmp_path / "run")
    trained = saved_model(tmp_path / "demo-segformer-b0-offset")
    (tmp_path / "empty-offseg-t").mkdir()
    (tmp_path / "no-processor" / "offseg-t").mkdir(parents=True)
    (tmp_path / "no-processor" / "offseg-t" / "config.json").write_text("{}")
    cases = [
        ([str(tmp_path / "empty-offseg-t")], f"{tmp_path / 'empty-offseg-t'} has no config.json: not a saved model"),
        ([str(tmp_path / "run")], "its name ends with no variant's; name it with --variants."),
        ([str(tmp_path / "run"), "--variants", "offseg-t"], "holds no offseg-t: its decode_head is 'segformer'"),
        ([str(tmp_path / "run"), "--variants", "offseg-t", "offseg-b"], "1 folders, 2 variants"),
        ([str(trained), str(trained)], "two folders named 'demo-segformer-b0-offset' would be one repo"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as raised:
            load_script().main(["--output_dir", str(tmp_path / "hub"), "--model_dir", *argv])
        lines = capsys.readouterr().err.strip().splitlines()
        assert raised.value.code == 2 and ": error: " in lines[-1] and message in lines[-1], (argv, lines[-1])
    with pytest.raises(SystemExit):
        load_script().main(["--output_dir", str(tmp_path / "hub"), "--weights_dir", str(tmp_path / "no-processor")])
    assert "offseg-t has no preprocessor_config.json" in capsys.readouterr().err
    assert not (tmp_path / "hub").exists()
    # A folder under another name publishes under that name, with the variant given.
    (folder,) = load_script().main(
        [
            "--output_dir",
            str(tmp_path / "hub"),
            "--model_dir",
            str(tmp_path / "run"),
            "--variants",
            "segformer-b0-offset",
        ]
    )
    assert folder.name == "run" and "offseg-hf/run" in (folder / "README.md").read_text()


def files_the_card_names(card: ModelCard) -> set[str]:
    """The widget's photos and outputs and the gallery's images: the paths the Hub resolves inside the repo."""
    widget = [(example["src"], example["output"]["url"]) for example in card.data.widget]
    return {path for pair in widget for path in pair} | set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text))


def label_map_of_the_pipeline(folder: Path, image: Image.Image) -> np.ndarray:
    """The label map a user of the repo gets: transformers' pipeline on the published folder (one disjoint mask per
    class present), not the renderer's own code path."""
    from transformers import pipeline

    segmenter = pipeline("image-segmentation", model=str(folder))
    label2id = segmenter.model.config.label2id
    label_map = np.full((image.height, image.width), -1)
    for segment in segmenter(image):
        label_map[np.asarray(segment["mask"]) == 255] = label2id[segment["label"]]
    assert (label_map >= 0).all()  # the masks cover the photo
    return label_map


def test_cards_show_predictions_rendered_from_the_published_weights(tmp_path):
    first = saved_model(tmp_path / "first-segformer-b0-offset")
    # The same model with a bias that makes class 4 win every pixel: other weights must give other pictures.
    second = tmp_path / "second-segformer-b0-offset"
    model = OffSegForSemanticSegmentation.from_pretrained(first)
    with torch.no_grad():
        model.classifier.mask_norm.bias[4] = 100.0
    model.save_pretrained(second)
    shutil.copyfile(first / "preprocessor_config.json", second / "preprocessor_config.json")
    folders = load_script().main(["--output_dir", str(tmp_path / "hub"), "--model_dir", str(first), str(second)])

    label_maps = {}
    for folder in folders:
        card = ModelCard.load(folder / "README.md")
        # Every photo is a widget example paired with its output, both inside the repo, and the gallery shows them.
        assert [example["src"] for example in card.data.widget] == [f"examples/{p.name}.jpg" for p in EXAMPLE_PHOTOS]
        for example in card.data.widget:
            assert example["output"]["url"] == example["src"].replace(".jpg", "_prediction.png")
        named = files_the_card_names(card)
        assert len(named) == 2 * len(EXAMPLE_PHOTOS) and all((folder / path).is_file() for path in named)
        assert "## Predictions of these weights" in card.text and "weights are random" not in card.text
        assert "It displays the example predictions above" in card.text
        for photo in EXAMPLE_PHOTOS:
            assert (folder / "examples" / f"{photo.name}.jpg").read_bytes() == photo_bytes(photo)
            image = Image.open(io.BytesIO(photo_bytes(photo))).convert("RGB")
            label_map = label_map_of_the_pipeline(folder, image)
            label_maps[folder.name, photo.name] = label_map
            # Above its legend, the picture is the overlay of exactly that label map (PNG: no colour is rounded).
            picture = np.asarray(Image.open(folder / "examples" / f"{photo.name}_prediction.png").convert("RGB"))
            expected = np.asarray(overlay(image, label_map, palette(6)))
            assert picture.shape[1] == image.width and picture.shape[0] > image.height
            assert np.array_equal(picture[: image.height], expected), (folder.name, photo.name)
            # The gallery names the classes of the prediction, largest first.
            row = next(line for line in card.text.splitlines() if f"(examples/{photo.name}.jpg)" in line)
            ids, counts = np.unique(label_map, return_counts=True)
            names = [f"LABEL_{ids[i]}" for i in np.argsort(-counts, kind="stable")]
            assert re.findall(r"(LABEL_\d+) \d+\.\d%", row) == names
    for photo in EXAMPLE_PHOTOS:  # the bias shows: the pictures are rendered from each folder's weights
        assert (label_maps["second-segformer-b0-offset", photo.name] == 4).all()
        assert not (label_maps["first-segformer-b0-offset", photo.name] == 4).all()


def test_random_weights_say_so_and_no_examples_leaves_them_out(tmp_path):
    base = ["--random_init", *TINY_SEGFORMER, "--variants", "segformer-b0-offset"]
    (folder,) = load_script().main(["--output_dir", str(tmp_path / "hub"), *base])
    card = ModelCard.load(folder / "README.md")
    assert "**These weights are random (not trained)**" in card.text
    assert len(card.data.widget) == len(EXAMPLE_PHOTOS)
    assert all((folder / path).is_file() for path in files_the_card_names(card))
    # --no_examples: no pictures, so no widget examples (none that nothing answers) and no gallery.
    (folder,) = load_script().main(["--output_dir", str(tmp_path / "plain"), *base, "--no_examples"])
    card = ModelCard.load(folder / "README.md")
    assert card.data.get("widget") is None and not (folder / "examples").exists()
    assert "Predictions of these weights" not in card.text and "example predictions" not in card.text
    assert "cannot run this model.** Hub widgets run on" in card.text and "\n\n\n" not in card.text


def test_bundled_photos_are_small_credited_and_packaged():
    folder = resources.files("offseg_hf.hub").joinpath("example_images")
    shipped = sorted(path.name for path in folder.iterdir() if path.name != "README.md")
    assert shipped == sorted(f"{photo.name}.jpg" for photo in EXAMPLE_PHOTOS)
    readme = folder.joinpath("README.md").read_text()
    for photo in EXAMPLE_PHOTOS:
        data = photo_bytes(photo)
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.mode == "RGB" and max(image.size) <= 512 and len(data) <= 100_000
        # Its README row quotes the licence, and the card's credit names the same one.
        (row,) = [line for line in readme.splitlines() if line.startswith(f"| `{photo.name}.jpg` |")]
        licence = "CC0" if "CC0" in row else "public domain"
        assert licence in row and photo.credit.endswith(f"({licence})")
    # A wheel carries them: pyproject's package data names every shipped file.
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()  # tomllib: Python >= 3.11 only
    package_data = pyproject.split("[tool.setuptools.package-data]")[1]
    patterns = json.loads(re.search(r"^offseg_hf = (\[.*\])$", package_data, re.MULTILINE).group(1))
    for name in [*shipped, "README.md"]:
        assert any(fnmatch.fnmatch(f"hub/example_images/{name}", pattern) for pattern in patterns), name


def test_card_pictures_use_the_demo_apps_colours():
    # The Space's app keeps its own palette (it runs without offseg-hf): a class must look the same in both.
    pytest.importorskip("gradio")
    app_path = Path(__file__).parents[1] / "examples" / "app.py"
    spec = importlib.util.spec_from_file_location("offseg_app_for_hub", app_path)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    assert np.array_equal(app.palette(150), palette(150))


def test_push_to_hub_uploads_each_folder_to_the_namespace(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def whoami(self):
            return {"name": "someone"}

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", Path(folder_path).name, repo_id))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    base = ["--random_init", *TINY_SEGFORMER, "--variants", "segformer-b0-offset", "--push_to_hub"]
    (folder,) = load_script().main(["--output_dir", str(tmp_path / "a"), *base, "--hub_token", "t"])
    assert calls == [
        ("token", "t"),
        ("create", "someone/segformer-b0-offset", False),  # the logged-in user's namespace
        ("upload", "segformer-b0-offset", "someone/segformer-b0-offset"),
    ]
    assert "someone/segformer-b0-offset" in (folder / "README.md").read_text()
    calls.clear()
    load_script().main(["--output_dir", str(tmp_path / "b"), *base, "--hub_namespace", "org", "--hub_private_repo"])
    assert calls[1:] == [
        ("create", "org/segformer-b0-offset", True),
        ("upload", "segformer-b0-offset", "org/segformer-b0-offset"),
    ]


def test_new_presets_are_picked_up_and_cards_say_whose_figures_they_show(tmp_path, monkeypatch):
    # A preset added to VARIANTS later (as OffSeg-T/B/L were) is published with no code change; with no paper
    # figures for it, the card claims none.
    preset = {
        **VARIANTS["segformer-b0-offset"],
        "encoder_config": {**VARIANTS["segformer-b0-offset"]["encoder_config"]},
    }
    preset["encoder_config"].update(TINY_ENCODER)
    monkeypatch.setitem(VARIANTS, "segformer-tiny-offset", preset)
    script = load_script()
    args = ["--output_dir", str(tmp_path / "hub"), "--random_init"]
    assert "segformer-tiny-offset" in script.parse_args(args).variants
    (folder,) = script.main([*args, "--variants", "segformer-tiny-offset"])
    card = ModelCard.load(folder / "README.md")
    assert "The paper reports no figures for this variant." in card.text
    assert card.data.eval_results is None and card.data.pipeline_tag == "image-segmentation"


def test_card_figures_are_labelled_and_results_carry_the_protocol():
    from offseg_hf.hub.repos import render_card

    template = (Path(__file__).parents[1] / "MODEL_CARD.md").read_text()
    result = {"mean_iou": 0.44, "mean_accuracy": 0.55, "overall_accuracy": 0.8, "num_images": 2000}
    result["eval_protocol"] = {"scale": [2048, 512], "mode": "slide", "crop_size": [512, 512], "stride": [480, 480]}
    card = render_card(template, "offseg-t", "org/offseg-t", 6.18, 8.07, 150, "scene_parse_150", "ADE20K", "x", result)
    text = card.text
    assert card.data.datasets == ["scene_parse_150"] and "| 150 (ADE20K) |" in text
    assert "44.2 mIoU on ADE20K (single scale, sliding window)" in text and "These are the paper's numbers" in text
    assert "The official modules count 9.39 GMAC" in text
    assert "mIoU 44.00" in text and "keep-ratio resize to (2048, 512), windows (512, 512) every (480, 480)" in text
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [
        ("mIoU", 44.0),
        ("mAcc", 55.0),
        ("aAcc", 80.0),
    ]
    assert "measured by offseg-hf's `examples/evaluate_segmentation.py`" in text  # results without a source
    result["measured_by"] = "examples/train.py (final evaluation)"
    card = render_card(template, "offseg-t", "org/offseg-t", 6.18, 8.07, 150, "scene_parse_150", "ADE20K", "x", result)
    assert "measured by offseg-hf's `examples/train.py (final evaluation)`" in card.text
    assert "with **offset learning**, from the ICCV 2025 paper" in text
    assert "without mmseg's unused `conv_seg`" in text and "--variant offseg-t --recipe ade20k-160k" in text
    segformer = render_card(template, "segformer-b0-offset", "o/b0", 3.9, 5.48, 19, "cityscapes", "Cityscapes", "x")
    assert "fewer multiply-adds" in segformer.text and "official modules count" not in segformer.text  # not 150


def test_segnext_cards_name_the_classifier_and_every_data_set_of_the_paper():
    from offseg_hf.hub.repos import render_card

    template = (Path(__file__).parents[1] / "MODEL_CARD.md").read_text()
    baseline = render_card(template, "segnext-t", "o/t", 4.26, 6.01, 150, "scene_parse_150", "ADE20K", "x").text
    assert (
        "SegNeXt-T (MSCAN-T encoder, LightHam decoder" in baseline and "with the **per-pixel** classifier" in baseline
    )
    assert "offset learning**" not in baseline and "unused `conv_seg`" not in baseline
    assert (
        "41.1 mIoU on ADE20K (single scale, whole image); mIoU 79.8 on Cityscapes (50.5 GFLOPs at 2048x1024)"
        in baseline
    )
    assert "51.2 on Pascal Context 59" in baseline and "38.7 on COCO-Stuff-164k" in baseline
    assert "The official modules count 6.40 GMAC" in baseline and "squeeze convolution" in baseline
    offset = render_card(template, "segnext-b-offset", "o/b", 28.16, 31.95, 150, "scene_parse_150", "ADE20K", "x").text
    assert "with **offset learning**" in offset and "49.4 mIoU on ADE20K" in offset and "28.2 M parameters" in offset


def test_mask2former_cards_name_the_offset_module_and_the_official_recipe():
    from offseg_hf.hub.repos import render_card

    template = (Path(__file__).parents[1] / "MODEL_CARD.md").read_text()
    offset = render_card(
        template, "mask2former-swin-t-offset", "o/m", 47.57, 60.0, 150, "scene_parse_150", "ADE20K", "x"
    )
    text = offset.text
    assert "Mask2Former (Swin-T backbone" in text and "offset learning** between the mask embeddings" in text
    assert "50.3 mIoU on ADE20K (single scale, whole image); 47.6 M parameters." in text
    assert "(paper: 47.6 M) |" in text and "unused `conv_seg`" not in text and "GFLOPs at 512x512" not in text
    assert "lr 1e-4, weight decay 0.05; backbone at 0.1x the lr" in text and "6e-5" not in text
    assert "The paper gives no FLOPs for Mask2Former" in text
    baseline = render_card(template, "mask2former-swin-t", "o/b", 47.44, 58.0, 150, "scene_parse_150", "ADE20K", "x")
    assert "as originally published (mask classification without offsets)" in baseline.text
    assert "47.7 mIoU on ADE20K" in baseline.text and "offset learning** between" not in baseline.text


def test_space_dir_writes_a_gradio_space_that_the_cards_link(tmp_path):
    from importlib import metadata

    from huggingface_hub import SpaceCard

    space = tmp_path / "space"
    base = ["--output_dir", str(tmp_path / "hub"), "--random_init", *TINY_SEGFORMER, "--space_dir", str(space)]
    (folder,) = load_script().main([*base, "--variants", "segformer-b0-offset"])
    metadata_ = SpaceCard.load(space / "README.md").data
    assert metadata_.sdk == "gradio" and metadata_.sdk_version == metadata.version("gradio")
    assert metadata_.sdk_version.split(".")[0] == "6" and metadata_.app_file == "app.py"
    assert metadata_.python_version == "3.11" and metadata_.models == ["offseg-hf/segformer-b0-offset"]
    app = Path(__file__).parents[1] / "examples" / "app.py"
    assert (space / "app.py").read_text() == app.read_text()
    config = json.loads((space / "app_config.json").read_text())
    assert config == {"models": ["offseg-hf/segformer-b0-offset"], "allow_download": True}
    requirements = (space / "requirements.txt").read_text().split()
    assert {"torch>=2.4", "transformers>=5", "timm>=1.0"} <= set(requirements) and "scipy>=1.10" not in requirements
    images = sorted((space / "example_images").glob("*.png"))
    assert len(images) == 3 and all(Image.open(path).size == (256, 256) for path in images)
    card = (folder / "README.md").read_text()
    assert "https://huggingface.co/spaces/offseg-hf/offseg-demo" in card
    assert "The inference widget on this page cannot run this model" in card
    assert "Inference Providers" in card and "custom-code" in card and "handler.py" in card
    assert "has no ONNX export" in card and "{space_section}" not in card and "{onnx_section}" not in card
    # A named Space, and Mask2Former among the models: scipy in the Space's requirements.
    script = load_script()
    args = script.parse_args([*base, "--space_id", "me/seg", "--variants", "mask2former-swin-t"])
    script.build_space(tmp_path / "other", args.space_id, ["me/mask2former-swin-t"], args)
    assert "scipy>=1.10" in (tmp_path / "other" / "requirements.txt").read_text().split()
    assert SpaceCard.load(tmp_path / "other" / "README.md").data.models == ["me/mask2former-swin-t"]


def test_cards_without_a_space_say_how_to_run_the_demo_locally():
    from offseg_hf.hub.repos import render_card

    template = (Path(__file__).parents[1] / "MODEL_CARD.md").read_text()
    card = render_card(template, "offseg-t", "org/offseg-t", 6.18, 8.07, 150, "scene_parse_150", "ADE20K", "x").text
    assert "spaces/" not in card and "examples/app.py --model_name_or_path org/offseg-t --allow_download" in card
    card = render_card(template, "offseg-t", "org/offseg-t", 6.2, 8.1, 150, "d", "D", "x", onnx_opset=17).text
    assert "`onnx/model.onnx` (opset 17, dynamic batch, height and width)" in card
    assert 'hf_hub_download("org/offseg-t", "onnx/model.onnx")' in card


def test_onnx_flag_exports_each_model_and_cards_follow_what_was_written(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    def export_onnx(model, output_path, opset=18, dynamic=False):
        calls.append((type(model).__name__, Path(output_path).relative_to(tmp_path).as_posix(), opset, dynamic))
        if "failing" in str(output_path):
            raise RuntimeError("the exporter cannot handle this model")
        Path(output_path).write_bytes(b"onnx")

    monkeypatch.setitem(sys.modules, "offseg_hf.export.onnx", types.SimpleNamespace(export_onnx=export_onnx))
    base = ["--random_init", *TINY_SEGFORMER, "--variants", "segformer-b0-offset", "--onnx", "--onnx_opset", "17"]
    (folder,) = load_script().main(["--output_dir", str(tmp_path / "hub"), *base])
    assert calls == [
        ("OffSegForSemanticSegmentation", "hub/segformer-b0-offset/onnx/model.onnx", 17, True),
    ]
    assert (folder / "onnx" / "model.onnx").read_bytes() == b"onnx"
    assert "`onnx/model.onnx` (opset 17" in (folder / "README.md").read_text()
    (folder,) = load_script().main(["--output_dir", str(tmp_path / "failing"), *base])
    assert not (folder / "onnx").exists() and "has no ONNX export" in (folder / "README.md").read_text()
    assert (folder / "model.safetensors").exists()  # the rest of the repo is still written

    def missing_dependency(model, output_path, opset=18, dynamic=False):
        raise ImportError("ONNX export needs onnxruntime")

    monkeypatch.setitem(sys.modules, "offseg_hf.export.onnx", types.SimpleNamespace(export_onnx=missing_dependency))
    with pytest.raises(ImportError, match="needs onnxruntime"):  # no variant would export: stop and say so
        load_script().main(["--output_dir", str(tmp_path / "missing"), *base])


def test_push_to_hub_uploads_the_space(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def whoami(self):
            return {"name": "someone"}

        def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None, space_sdk=None):
            calls.append(("create", repo_id, repo_type, space_sdk))

        def upload_folder(self, folder_path, repo_id, commit_message, repo_type=None):
            calls.append(("upload", Path(folder_path).name, repo_id, repo_type))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    args = ["--output_dir", str(tmp_path / "hub"), "--random_init", *TINY_SEGFORMER, "--push_to_hub"]
    (folder,) = load_script().main([*args, "--variants", "segformer-b0-offset", "--space_dir", str(tmp_path / "space")])
    assert calls[2:] == [
        ("create", "someone/offseg-demo", "space", "gradio"),
        ("upload", "space", "someone/offseg-demo", "space"),
    ]
    assert "https://huggingface.co/spaces/someone/offseg-demo" in (folder / "README.md").read_text()
    assert "someone/segformer-b0-offset" in (tmp_path / "space" / "README.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--space_id", "no-namespace"], "--space_id must be <namespace>/<name>"),
        (["--onnx", "--onnx_opset", "5"], "--onnx_opset must be at least 7"),
    ],
)
def test_deployment_arguments_are_checked(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        load_script().main(["--output_dir", str(tmp_path / "hub"), "--random_init", *args])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_onnx_flag_writes_a_file_that_onnx_runtime_runs_like_the_model(tmp_path):
    import onnxruntime

    args = ["--output_dir", str(tmp_path / "hub"), "--random_init", *TINY_SEGFORMER, "--seed", "3"]
    (folder,) = load_script().main([*args, "--variants", "segformer-b0-offset", "--onnx"])
    model = OffSegForSemanticSegmentation.from_pretrained(folder).eval()
    session = onnxruntime.InferenceSession(str(folder / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    pixel_values = torch.randn(1, 3, 96, 160)  # another size than the export's example: dynamic height and width
    (logits,) = session.run(["logits"], {"pixel_values": pixel_values.numpy()})
    with torch.no_grad():
        expected = model(pixel_values).logits
    assert logits.shape == tuple(expected.shape) == (1, 150, 12, 20)
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4)
    assert "`onnx/model.onnx` (opset 20, dynamic batch, height and width)" in (folder / "README.md").read_text()


def test_count_gmac_counts_every_product_of_offset_learning():
    """The cards' multiply-add count includes the fast form's in-place feature-offset product (`baddbmm_`), which
    `torch.utils.flop_counter` alone counts as nothing: the total equals the products the fast form runs."""
    classes, channels, height, width = 10, 16, 6, 7
    padded = 16  # the class rows padded to a multiple of 8 (fast_offset_learning.pad_class_rows)
    positions = height * width
    expected = (
        padded * channels * positions  # A = W E^T
        + classes * positions * channels  # Softmax_HW(A) E
        + classes * channels * channels  # P_c
        + positions * channels * padded  # E W'^T
        + classes * channels * channels  # W P_f^T
        + classes * channels * padded  # (W P_f^T) W'^T
        + positions * classes * padded  # Softmax_K(A)^T times that, in place
    )
    module = OffsetLearning(classes, channels).eval()
    assert count_gmac(module, torch.randn(1, channels, height, width)) * 1e9 == pytest.approx(expected, abs=0.5)
