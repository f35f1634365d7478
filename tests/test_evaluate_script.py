import importlib.util
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from offseg_hf import OffSegForSemanticSegmentation, OffSegImageProcessor
from offseg_hf.hub import weights_fingerprint

from .conftest import tiny_config

SCRIPT = Path(__file__).parents[1] / "examples" / "evaluate.py"


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_evaluate_cli_on_demo_data_writes_json_and_model_index(tmp_path, mode):
    model = OffSegForSemanticSegmentation(tiny_config(num_labels=5)).eval()  # the demo set has 5 classes
    model.save_pretrained(tmp_path / "model")
    OffSegImageProcessor().save_pretrained(tmp_path / "model")
    card = tmp_path / "model" / "README.md"
    result = load_script().main(
        [
            "--model_name_or_path",
            str(tmp_path / "model"),
            "--demo",
            "--max_samples",
            "3",
            "--mode",
            mode,
            "--crop_size",
            "96",
            "96",
            "--stride",
            "64",
            "64",
            "--output_file",
            str(tmp_path / "r.json"),
            "--model_card",
            str(card),
        ]
    )
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["num_images"] == 3 and len(written["per_category_iou"]) == 5
    assert written["mean_iou"] == pytest.approx(result["mean_iou"]) and 0 <= written["mean_iou"] <= 1
    parsed = ModelCard.load(card).data
    values = {r.metric_name: r.metric_value for r in parsed.eval_results}
    assert values["mIoU"] == pytest.approx(round(100 * written["mean_iou"], 2))
    assert values["aAcc"] == pytest.approx(round(100 * written["overall_accuracy"], 2))


def test_evaluate_cli_needs_one_source():
    with pytest.raises(SystemExit):
        load_script().parse_args(["--model_name_or_path", "x", "--demo", "--ade20k_root", "y"])


def test_batched_evaluation_equals_one_image_at_a_time_and_records_the_weights(tmp_path):
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(tiny_config(num_labels=5)).eval()
    model.save_pretrained(tmp_path / "model")
    # The demo scenes are all 128x128, so batches of 3 form; windows 96 every 64 overlap.
    common = ["--model_name_or_path", str(tmp_path / "model"), "--demo", "--max_samples", "5", "--num_workers", "0"]
    common += ["--crop_size", "96", "96", "--stride", "64", "64"]
    one = load_script().main([*common, "--batch_size", "1", "--output_file", str(tmp_path / "one.json")])
    three = load_script().main([*common, "--batch_size", "3"])
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert three[key] == pytest.approx(one[key], abs=1e-6), key
    assert json.loads((tmp_path / "one.json").read_text())["weights_sha256"] == weights_fingerprint(model)
