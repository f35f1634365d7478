"""A user's mistake gets one line that names it, at once, in every command line tool and in the model's
`from_pretrained`; a traceback means a bug. Each case is one that a user hit (issue 22)."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from offseg_hf import OffSegForSemanticSegmentation, OffSegImageProcessor
from offseg_hf.convert import official as convert_module
from offseg_hf.export import onnx as onnx_module
from offseg_hf.models.local_paths import looks_local, missing_folder_message

from .conftest import tiny_config
from .test_data import write_folder_split

EXAMPLES = Path(__file__).parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"offseg_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_error_line(capsys, main, argv, code=2) -> str:
    """Run a CLI's `main(argv)`; it must exit with `code` and print one error line (after argparse's usage)."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == code
    error_lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(" ")]
    assert "Traceback" not in "\n".join(error_lines)
    return error_lines[-1]


@pytest.fixture
def trained_folder(tmp_path) -> Path:
    """A saved model where a training run leaves it (the working directory is a scratch folder: conftest.py)."""
    folder = Path("outputs/demo-segformer-b0-offset")
    OffSegForSemanticSegmentation(tiny_config(num_labels=5)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("./model", True),
        ("../model", True),
        ("/abs/model", True),
        ("~/model", True),
        ("model/", True),
        ("a/b/c", True),
        ("org\\model", True),
        ("org/model", False),  # a Hub repo id, unless a folder ./org exists
        ("model", False),
    ],
)
def test_which_names_can_only_be_local_paths(name, local):
    assert looks_local(name) is local


def test_a_hub_shaped_name_is_local_when_its_first_folder_exists(trained_folder):
    assert looks_local("outputs/demo-segformer-b0")
    assert missing_folder_message("outputs/demo-segformer-b0-offset") is None  # it exists
    message = missing_folder_message("outputs/demo-segformer-b0", "--model_name_or_path")
    assert message == (
        "--model_name_or_path 'outputs/demo-segformer-b0': no such folder. "
        "Did you mean outputs/demo-segformer-b0-offset?"
    )
    assert missing_folder_message("org/model") is None  # may be a Hub repo: transformers decides
    assert "(missing/deeper does not exist either)" in missing_folder_message("missing/deeper/model")


def test_from_pretrained_names_a_mistyped_folder_at_once(trained_folder):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="no such folder. Did you mean outputs/demo-segformer-b0-offset"):
        OffSegForSemanticSegmentation.from_pretrained("outputs/demo-segformer-b0")
    assert time.perf_counter() - start < 5  # no Hub round trip (and the suite runs offline anyway)


def test_train_names_a_mistyped_model_folder(trained_folder, capsys):
    train = load_example("train")
    line = one_error_line(capsys, train.parse_args, ["--model_name_or_path", "outputs/demo-segformer-b0"])
    assert line.endswith(
        "error: --model_name_or_path 'outputs/demo-segformer-b0': no such folder. Did you mean "
        "outputs/demo-segformer-b0-offset?"
    )


def test_evaluate_names_a_mistyped_model_folder(trained_folder, capsys):
    evaluate = load_example("evaluate_segmentation")
    line = one_error_line(capsys, evaluate.main, ["--model_name_or_path", "outputs/demo-segformer-b0", "--demo"])
    assert "--model_name_or_path 'outputs/demo-segformer-b0': no such folder" in line


def test_onnx_names_an_unknown_variant(capsys):
    line = one_error_line(capsys, onnx_module.main, ["--variant", "offseg-s", "--random_init", "--output", "x.onnx"])
    assert "error: --variant: Unknown variant 'offseg-s'. Did you mean offseg-t" in line
    assert not Path("x.onnx").exists()


def test_onnx_names_a_mistyped_model_folder(trained_folder, capsys):
    argv = ["--model_name_or_path", "outputs/demo-segformer-b0", "--output", "x.onnx"]
    assert "'outputs/demo-segformer-b0': no such folder" in one_error_line(capsys, onnx_module.main, argv)


def test_convert_names_a_missing_checkpoint(capsys):
    argv = ["--checkpoint", "nope.pth", "--variant", "offseg-t", "--output_dir", "converted"]
    assert one_error_line(capsys, convert_module.main, argv).endswith("error: --checkpoint nope.pth: no such file.")
    assert not Path("converted").exists()


def test_convert_names_a_file_that_is_no_checkpoint(capsys):
    Path("notes.pth").write_text("not a checkpoint\n")
    argv = ["--checkpoint", "notes.pth", "--variant", "offseg-t", "--output_dir", "converted"]
    line = one_error_line(capsys, convert_module.main, argv, code=1)
    assert "error: notes.pth is not a PyTorch checkpoint (" in line


def test_convert_names_a_checkpoint_of_another_model(capsys):
    torch.save({"state_dict": {"decode_head.conv_seg.weight": torch.zeros(150, 256, 1, 1)}}, "other.pth")
    argv = ["--checkpoint", "other.pth", "--variant", "offseg-t", "--output_dir", "converted"]
    line = one_error_line(capsys, convert_module.main, argv, code=1)
    assert "per-pixel classifier (conv_seg), but 'offseg-t' is built with offset learning" in line
    assert not Path("converted").exists()


@pytest.fixture
def app_module():
    pytest.importorskip("gradio")
    return load_example("app")


def test_app_refuses_to_start_with_a_mistyped_model_folder(trained_folder, app_module, capsys, monkeypatch):
    monkeypatch.setattr(app_module, "build_demo", lambda *args, **kwargs: pytest.fail("the app was built"))
    line = one_error_line(capsys, app_module.main, ["--model_name_or_path", "outputs/demo-segformer-b0"])
    assert "--model_name_or_path 'outputs/demo-segformer-b0': no such folder" in line


def test_app_refuses_to_start_with_a_model_that_does_not_load(app_module, capsys, monkeypatch):
    Path("empty").mkdir()
    monkeypatch.setattr(app_module, "build_demo", lambda *args, **kwargs: pytest.fail("the app was built"))
    line = one_error_line(capsys, app_module.main, ["--model_name_or_path", "./empty"], code=1)
    assert "Could not load './empty'" in line


@pytest.mark.parametrize("script", ["train.py", "evaluate_segmentation.py"])
def test_a_missing_mask_ends_the_script_with_one_line(tmp_path, script):
    """The command line in a fresh process, as a user runs it: a data folder with an image whose mask is missing."""
    folder = tmp_path / "data"
    write_folder_split(folder, 3, seed=1)
    (folder / "masks" / "scene0.png").unlink()
    data = ["--train_dir", str(folder)] if script == "train.py" else ["--validation_dir", str(folder)]
    model = [] if script == "train.py" else ["--model_name_or_path", str(save_tiny_model(tmp_path / "model"))]
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *data, *model, "--output_dir", str(tmp_path / "out")],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 1 and "Traceback" not in completed.stderr, completed.stderr[-3000:]
    assert completed.stderr.strip().splitlines()[-1].startswith(f"error: No mask for image {folder}/images/scene0")


def save_tiny_model(folder: Path) -> Path:
    OffSegForSemanticSegmentation(tiny_config(num_labels=5)).save_pretrained(folder)
    OffSegImageProcessor().save_pretrained(folder)
    return folder
