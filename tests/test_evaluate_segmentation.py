"""examples/evaluate_segmentation.py: arguments, outputs, and the same figures as training for the same weights."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from huggingface_hub import ModelCard

from offseg_hf import OffSegForSemanticSegmentation, OffSegImageProcessor
from offseg_hf.hub.repos import weights_fingerprint
from offseg_hf.training import RECIPES

from .conftest import TINY_ENCODER, tiny_config
from .test_data import write_pascal_context

EXAMPLES = Path(__file__).parents[1] / "examples"
SCRIPT = EXAMPLES / "evaluate_segmentation.py"

# The demo set at 32x32, and windows that overlap on the 128x128 input the demo scale makes of it.
SMALL_DEMO = ["--demo", "--demo_image_size", "32", "--demo_num_validation", "3", "--eval_scale", "512", "128"]
WINDOWS = ["--eval_crop_size", "96", "96", "--eval_stride", "64", "64"]


def load_script(path=SCRIPT, name="evaluate_segmentation_script"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def saved_model(tmp_path) -> Path:
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(tiny_config(num_labels=5)).eval()  # the demo set has 5 classes
    model.save_pretrained(tmp_path / "model")
    OffSegImageProcessor().save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_demo_evaluation_writes_eval_results_and_model_index(tmp_path, saved_model, mode):
    card = saved_model / "README.md"
    result = load_script().main(
        ["--model_name_or_path", str(saved_model), *SMALL_DEMO, "--eval_mode", mode, *WINDOWS]
        + ["--per_device_eval_batch_size", "2", "--output_dir", str(tmp_path / "out"), "--model_card", str(card)]
    )
    written = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert written["num_images"] == 3 and len(written["per_category_iou"]) == 5
    assert written["num_pixels"] == 3 * 32 * 32  # the demo set labels every pixel
    assert written["mean_iou"] == result["mean_iou"] and 0 <= written["mean_iou"] <= 1
    assert written["eval_protocol"] == {
        "scale": [512, 128],
        "mode": mode,
        "crop_size": [96, 96],
        "stride": [64, 64],
        "batch_size": 2,
    }
    assert written["weights_sha256"] == weights_fingerprint(OffSegForSemanticSegmentation.from_pretrained(saved_model))
    parsed = ModelCard.load(card).data
    values = {r.metric_name: r.metric_value for r in parsed.eval_results}
    assert values["mIoU"] == pytest.approx(round(100 * written["mean_iou"], 2))
    assert values["aAcc"] == pytest.approx(round(100 * written["overall_accuracy"], 2))
    assert parsed.eval_results[0].dataset_type == "offseg-demo"


def test_protocol_defaults_to_the_recipes():
    script = load_script()
    demo = script.parse_args(["--model_name_or_path", "m", "--demo"])
    assert demo.recipe == "demo"
    for name in ("eval_scale", "eval_mode", "eval_crop_size", "eval_stride", "per_device_eval_batch_size"):
        assert demo.settings[name] == RECIPES["demo"][name], name
    # Other data: the paper's protocol (mmseg's ADE20K test settings), one image a pass.
    paper = script.parse_args(["--model_name_or_path", "m", "--dataset_name", "scene_parse_150"])
    protocol = [paper.settings[name] for name in ("eval_scale", "eval_mode", "eval_crop_size", "eval_stride")]
    assert protocol == [(2048, 512), "slide", (512, 512), (480, 480)]
    assert paper.settings["per_device_eval_batch_size"] == 1
    city = script.parse_args(["--model_name_or_path", "m", "--demo", "--recipe", "cityscapes-160k"])
    assert (city.settings["eval_scale"], city.settings["eval_stride"]) == ((2048, 1024), (768, 768))
    override = script.parse_args(["--model_name_or_path", "m", "--demo", "--eval_mode", "slide"])
    assert (
        override.settings["eval_mode"] == "slide" and override.settings["eval_scale"] == RECIPES["demo"]["eval_scale"]
    )


def test_pascal_context_layout_with_its_recipe_and_reduced_labels(tmp_path):
    write_pascal_context(tmp_path)  # one validation image, 20x16: ids 0, 5, 59, 255 in four bands of 4 rows
    torch.manual_seed(0)
    OffSegForSemanticSegmentation(tiny_config(num_labels=59)).save_pretrained(tmp_path / "model")
    script = load_script()
    argv = ["--model_name_or_path", str(tmp_path / "model"), "--pascal_context_root", str(tmp_path / "VOCdevkit")]
    args = script.parse_args(argv)
    assert args.recipe == "pascal-context-59-80k"  # its protocol: scale 520, windows 480 every 320
    protocol = [args.settings[name] for name in ("eval_scale", "eval_mode", "eval_crop_size", "eval_stride")]
    assert protocol == [(520, 520), "slide", (480, 480), (320, 320)]
    card = tmp_path / "README.md"
    small = ["--eval_scale", "64", "64", "--eval_crop_size", "48", "48", "--eval_stride", "32", "32"]
    small += ["--dataloader_num_workers", "0"]
    result = script.main([*argv, *small, "--model_card", str(card)])
    assert (result["recipe"], result["num_images"], len(result["per_category_iou"])) == ("pascal-context-59-80k", 1, 59)
    assert result["num_pixels"] == 2 * 4 * 20  # background (0 -> 255) and 255 are ignored: ids 5 -> 4 and 59 -> 58
    assert result["class_names"][:2] == ["aeroplane", "bag"] and result["class_names"][-1] == "wood"
    entry = ModelCard.load(card).data.eval_results[0]
    assert (entry.dataset_type, entry.dataset_name) == ("pascal_context", "Pascal Context 59")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--demo", "--ade20k_root", "."], "give exactly one data source"),
        (
            ["--ade20k_root", ".", "--pascal_context_root", "."],
            "give exactly one data source: --dataset_name, --validation_dir, --ade20k_root, --pascal_context_root or "
            "--demo.",
        ),
        (["--pascal_context_root", "nowhere"], "--pascal_context_root nowhere is not a folder."),
        ([], "give exactly one data source"),
        (["--validation_dir", "nowhere"], "--validation_dir nowhere is not a folder."),
        (["--dataset_name", "x", "--demo_image_size", "64"], "--demo_image_size describes the demo set"),
        (["--demo", "--eval_stride", "0", "64"], "--eval_stride must be positive"),
        (["--demo", "--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be positive"),
        (["--demo", "--eval_mode", "grid"], "invalid choice: 'grid'"),
    ],
)
def test_arguments_are_checked_before_loading_anything(capsys, args, message):
    with pytest.raises(SystemExit):
        load_script().main(["--model_name_or_path", "not/loaded", *args])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in error and message in error


def flags_of(script: str) -> set[str]:
    parser = load_script(EXAMPLES / script, f"flags_of_{script[:-3]}").build_parser()
    assert all(action.help for action in parser._actions), script  # every flag says what it does
    return {flag for action in parser._actions for flag in action.option_strings}


def test_the_three_clis_spell_shared_flags_alike():
    evaluate, train, publish = flags_of("evaluate_segmentation.py"), flags_of("train.py"), flags_of("push_to_hub.py")
    assert {"--dataset_name", "--output_dir", "--seed", "--hub_token"} <= evaluate & train & publish
    data = {"--dataset_config_name", "--validation_dir", "--ade20k_root", "--demo", "--reduce_labels", "--recipe"}
    data |= {"--pascal_context_root"}
    data |= {"--demo_image_size", "--demo_num_validation", "--image_column_name", "--label_column_name"}
    data |= {"--model_name_or_path", "--eval_scale", "--eval_mode", "--eval_crop_size", "--eval_stride"}
    data |= {"--per_device_eval_batch_size", "--dataloader_num_workers", "--validation_split"}
    assert data <= evaluate & train, data - (evaluate & train)
    assert {"--push_to_hub", "--hub_namespace", "--hub_private_repo"} <= publish and "--push_to_hub" in train
    renamed = {"--data_dir", "--batch_size", "--num_workers", "--output_file", "--scale", "--mode", "--max_samples"}
    assert not renamed & evaluate and not {"--local_dir", "--dataset_id", "--namespace", "--private"} & publish


SHADOW_PROBE = """
import importlib.util, json, os, sys
import evaluate  # with examples/ first on sys.path, as `python examples/evaluate_segmentation.py` has it
real = {"file": evaluate.__file__, "has_load": hasattr(evaluate, "load")}
sys.path = [entry for entry in sys.path if entry not in ("", os.getcwd())]
print(json.dumps({**real, "installed": [name for name in sys.argv[1:] if importlib.util.find_spec(name)]}))
"""


@pytest.mark.slow
def test_no_example_shadows_an_installed_module():
    # A script in examples/ named like a package (as evaluate.py was) is what `import evaluate` finds first when
    # a script of that folder runs, breaking the package for everything the script imports.
    names = [path.stem for path in EXAMPLES.glob("*.py")]
    out = subprocess.run(
        [sys.executable, "-c", SHADOW_PROBE, *names], cwd=EXAMPLES, capture_output=True, text=True, check=True
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).parent.name == "evaluate" and report["has_load"]
    assert EXAMPLES not in Path(report["file"]).parents
    assert report["installed"] == [], report["installed"]  # no example stem is an installed module's name


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_training_and_the_script_report_the_same_figures_for_the_same_weights(tmp_path, precision):
    """Train the demo a few steps, then evaluate the saved folder on the same held-out scenes with the demo
    recipe's protocol: every figure equal, to the last bit."""
    demo = ["--demo_image_size", "64", "--demo_num_validation", "6", "--eval_scale", "256", "64"]
    tiny = json.dumps({"decoder_hidden_size": 32, "encoder_config": TINY_ENCODER})
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        trained = load_script(EXAMPLES / "train.py", "train_for_eval_test").main(
            [*demo, "--demo_num_train", "16", "--crop_size", "64", "64", "--max_train_steps", "4"]
            + ["--total_batch_size", "4", "--warmup_steps", "2", "--eval_steps", "0", "--checkpointing_steps", "0"]
            + ["--config_overrides", tiny, "--output_dir", str(tmp_path / "run"), "--mixed_precision", precision]
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    evaluated = load_script().main(
        ["--model_name_or_path", str(tmp_path / "run"), "--demo", *demo, "--output_dir", str(tmp_path / "eval")]
    )
    from_train = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    from_script = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy", "num_pixels"):
        assert evaluated[key] == trained["metrics"][key] == from_train[key] == from_script[key], key
    for key in ("per_category_iou", "per_category_accuracy"):  # NaN where a class is absent: equal too
        np.testing.assert_array_equal(evaluated[key], trained["metrics"][key])
        np.testing.assert_array_equal(from_script[key], from_train[key])
    assert from_script["eval_protocol"] == from_train["eval_protocol"]
    assert 0 < evaluated["num_pixels"] == 6 * 64 * 64
    # Both record the weights they measured, so push_to_hub.py takes either result for this folder's card.
    assert from_train["weights_sha256"] == from_script["weights_sha256"]
    assert from_train["num_images"] == from_script["num_images"] == 6
