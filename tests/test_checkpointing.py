"""Checkpoints: atomic saves, resolving 'latest', the output-folder rule and the same-model check."""

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from offseg_hf import OffSegForSemanticSegmentation
from offseg_hf.convert import official_key
from offseg_hf.training.checkpointing import (
    CheckpointMismatchError,
    check_output_dir,
    check_same_model,
    latest_checkpoint,
    list_checkpoints,
    model_signature,
    read_trainer_state,
    remove_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from offseg_hf.training.optimization import build_optimizer, build_scheduler
from offseg_hf.training.recipes import get_recipe

from .conftest import tiny_config


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_checkpoint_interrupted_mid_write_never_replaces_the_last_good_one(tmp_path, monkeypatch, accelerator):
    model = OffSegForSemanticSegmentation(tiny_config())
    settings = {**get_recipe("demo"), "max_train_steps": 10}
    optimizer = build_optimizer(model, settings, official_key)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, build_scheduler(optimizer, settings))
    good = save_checkpoint(accelerator, tmp_path, 2, {"note": "good"})
    good_files = {path.name: path.read_bytes() for path in good.iterdir()}
    saved_weights = {key: value.clone() for key, value in model.state_dict().items()}

    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    real_save_state = accelerator.save_state

    def save_state_then_crash(output_dir, **kwargs):
        real_save_state(output_dir, **kwargs)
        Path(output_dir, "model.safetensors").write_bytes(b"half a file")  # cut off mid-write
        raise OSError("No space left on device")

    monkeypatch.setattr(accelerator, "save_state", save_state_then_crash)
    for step in (4, 2):  # a new step, and re-saving the good step itself
        with pytest.raises(OSError, match="No space left"):
            save_checkpoint(accelerator, tmp_path, step, {"note": "bad"})
        assert latest_checkpoint(tmp_path) == good and [s for s, _ in list_checkpoints(tmp_path)] == [2]
        assert {path.name: path.read_bytes() for path in good.iterdir()} == good_files
    assert not (tmp_path / "step_4").exists()
    monkeypatch.undo()

    accelerator.load_state(str(resolve_checkpoint("latest", tmp_path)))
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved_weights[key])
    assert read_trainer_state(good) == {"note": "good", "step": 2}
    # The next save clears the partial staging folder; total_limit prunes old checkpoints.
    save_checkpoint(accelerator, tmp_path, 4, {})
    save_checkpoint(accelerator, tmp_path, 6, {}, total_limit=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step_4", "step_6"]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "step_5"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under"):
        resolve_checkpoint("latest", tmp_path / "elsewhere")


def test_a_folder_of_another_run_is_not_overwritten_silently(tmp_path):
    check_output_dir(tmp_path / "new", overwrite=False, resume_from=None)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", overwrite=False, resume_from=None)
    run = tmp_path / "run"
    for name in ("step_250", "step_500", ".tmp-step_750", ".old-step_250", "step_x", "runs"):
        (run / name).mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "step_500" / "trainer_state.json").write_text("{}")  # one complete checkpoint: resuming is offered
    with pytest.raises(FileExistsError, match=r"run is not empty \(.old-step_250, .tmp-step_750, config.json, runs, "):
        check_output_dir(run, overwrite=False, resume_from=None)
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint latest to continue it"):
        check_output_dir(run, overwrite=False, resume_from=None)
    check_output_dir(run, overwrite=True, resume_from=None)
    check_output_dir(run, overwrite=False, resume_from=run / "step_500")  # its own checkpoint: continuing it
    # A checkpoint from elsewhere does not license writing over this folder.
    (tmp_path / "other" / "step_1").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="is not empty"):
        check_output_dir(run, overwrite=False, resume_from=tmp_path / "other" / "step_1")
    # A finished run without checkpoints cannot be continued, so that is not offered.
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "config.json").write_text("{}")
    with pytest.raises(FileExistsError) as error:
        check_output_dir(finished, overwrite=False, resume_from=None)
    assert "resume" not in str(error.value) and "--overwrite_output_dir" in str(error.value)
    # --overwrite_output_dir: the earlier run's checkpoints go, so 'latest' can only find this run's.
    removed = remove_checkpoints(run)
    assert sorted(path.name for path in removed) == [".old-step_250", ".tmp-step_750", "step_250", "step_500"]
    assert sorted(path.name for path in run.iterdir()) == ["config.json", "runs", "step_x"]


def test_resuming_a_checkpoint_of_another_model_names_both(tmp_path):
    small = model_signature(OffSegForSemanticSegmentation(tiny_config()), "segformer-b0-offset")
    wider = model_signature(OffSegForSemanticSegmentation(tiny_config(decoder_hidden_size=16)), "segformer-b0-offset")
    same = model_signature(OffSegForSemanticSegmentation(tiny_config()), "segformer-b0-offset")
    assert small["model_layout_sha256"] == same["model_layout_sha256"] != wider["model_layout_sha256"]
    assert small["model_config"]["decoder_hidden_size"] == 32 and "transformers_version" not in small["model_config"]

    checkpoint = tmp_path / "step_2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, **small}))
    check_same_model(checkpoint, same)
    with pytest.raises(CheckpointMismatchError) as caught:
        check_same_model(checkpoint, {**wider, "model": "offseg-t"})
    message = str(caught.value)
    assert "\n" not in message
    assert f"{checkpoint} is a checkpoint of segformer-b0-offset but this run builds offseg-t" in message
    assert "(config differs in: decoder_hidden_size); resume with the same --variant" in message  # not id2label
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2}))  # saved before signatures: passes
    check_same_model(checkpoint, wider)
