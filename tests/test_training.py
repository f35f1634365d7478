"""The training recipe (optimizer groups, schedule, BatchNorm, checkpoints) and examples/train.py end to end:
resume exactness, non-finite loss, bad data, two processes over gloo, the saved folder in a pipeline."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from offseg_hf import OffSegForSemanticSegmentation
from offseg_hf.data import SegmentationDataError
from offseg_hf.demo_data import make_demo_splits
from offseg_hf.training import (
    RECIPES,
    WarmupPolyFactor,
    build_optimizer,
    build_scheduler,
    convert_sync_batchnorm,
    get_recipe,
    latest_checkpoint,
    list_checkpoints,
    param_groups,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
)

from .conftest import TINY_ENCODER, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "examples" / "train.py"

# A tiny model on a tiny demo set: 32x32 images, 4 images a step.
TINY_RUN = [
    *"--demo_image_size 32 --demo_num_train 16 --demo_num_validation 4 --crop_size 32 32 --resize_scale 128 32".split(),
    *"--eval_scale 128 32 --total_batch_size 4 --warmup_steps 2 --learning_rate 1e-3 --logging_steps 1".split(),
    *"--eval_steps 0 --checkpointing_steps 0".split(),
    *["--config_overrides", json.dumps({"decoder_hidden_size": 32, "encoder_config": TINY_ENCODER})],
]


def _reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def train_script():
    """examples/train.py as a module, with Accelerate's process-wide state reset around each use."""
    _reset_accelerate()
    spec = importlib.util.spec_from_file_location("offseg_train_example", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    _reset_accelerate()


def run(train_script, output_dir, *extra):
    _reset_accelerate()
    return train_script.main([*TINY_RUN, "--output_dir", str(output_dir), *extra])


# ------------------------------------------------------------------------------------------------------------
# Recipe, optimizer groups, schedule


def test_help_shows_every_option_and_each_recipes_default(train_script):
    text = " ".join(train_script.build_parser().format_help().split())
    for field in RECIPES["ade20k-160k"]:
        assert f"--{field}" in text
    assert "ade20k-160k: 6e-05" in text and "demo: 0.001" in text  # learning rates
    assert "ade20k-160k: 160000" in text and "coco-stuff-80k: 80000" in text  # iterations
    assert "cityscapes-160k: (1024, 1024)" in text and "cityscapes-160k: 8," in text  # crop, batch
    for flag in ("--model_name_or_path", "--dataset_name", "--output_dir", "--per_device_train_batch_size"):
        assert flag in text
    for flag in ("--gradient_accumulation_steps", "--resume_from_checkpoint", "--push_to_hub", "--hub_model_id"):
        assert flag in text
    assert "--seed SEED Seeds weights, data order, augmentation, demo set. (default: 0)" in text


def test_paper_recipes():
    ade = get_recipe("ade20k-160k")
    assert (ade["learning_rate"], ade["adam_beta1"], ade["adam_beta2"], ade["weight_decay"]) == (6e-5, 0.9, 0.999, 0.01)
    assert (ade["head_lr_mult"], ade["warmup_steps"], ade["warmup_start_factor"], ade["poly_power"]) == (
        10,
        1500,
        1e-6,
        1,
    )
    assert (ade["max_train_steps"], ade["total_batch_size"], ade["crop_size"]) == (160_000, 16, (512, 512))
    assert (ade["resize_scale"], ade["ratio_range"], ade["cat_max_ratio"]) == ((2048, 512), (0.5, 2.0), 0.75)
    city = get_recipe("cityscapes-160k")
    assert (city["crop_size"], city["total_batch_size"], city["max_train_steps"]) == ((1024, 1024), 8, 160_000)
    assert get_recipe("coco-stuff-80k")["max_train_steps"] == 80_000


def test_param_groups_head_lr_and_no_decay_on_norms():
    model = OffSegForSemanticSegmentation(tiny_config())
    groups = {group["name"]: group for group in param_groups(model, learning_rate=6e-5, weight_decay=0.01)}
    assert set(groups) == {"encoder_decay", "encoder_no_decay", "head_decay", "head_no_decay"}
    names = {id(param): name for name, param in model.named_parameters()}
    members = {key: {names[id(p)] for p in group["params"]} for key, group in groups.items()}
    assert sum(len(m) for m in members.values()) == len(names)  # every parameter exactly once
    for key, group in groups.items():
        assert group["lr"] == pytest.approx(6e-5 * (1 if key.startswith("encoder") else 10))
        assert group["weight_decay"] == (0.0 if key.endswith("no_decay") else 0.01)
        in_encoder = {name.startswith("offseg.encoder.") for name in members[key]}
        assert in_encoder == {key.startswith("encoder")}
    # Every norm layer's weight and bias, and nothing else, is exempt from decay.
    norm_params = {
        f"{module_name}.{param_name}"
        for module_name, module in model.named_modules()
        if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm))
        for param_name, _ in module.named_parameters(recurse=False)
    }
    assert members["encoder_no_decay"] | members["head_no_decay"] == norm_params
    encoder_norms = [n for n in norm_params if n.startswith("offseg.encoder.")]
    assert len(encoder_norms) > 8  # MiT's block, reduction, patch-embedding and end-of-stage LayerNorms
    assert any(".bn." in name or "norm" in name for name in members["head_no_decay"])  # head BN / LayerNorm
    # mmseg exempts only 'norm' / 'pos_block' keys: other biases and the class embeddings keep their decay.
    conv_biases = {
        f"{module_name}.bias"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.bias is not None
    }
    assert conv_biases and conv_biases <= members["encoder_decay"] | members["head_decay"]
    assert "classifier.class_embeddings" in members["head_decay"]


def test_param_groups_pos_block_by_name_and_generic_encoder():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.pos_block = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))  # PVT-style positional conv

    model = nn.Module()
    model.encoder, model.decode_head = Encoder(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4))
    groups = {group["name"]: group for group in param_groups(model, 1.0, 0.5, head_lr_mult=10)}
    assert len(groups["encoder_no_decay"]["params"]) == 2  # pos_block weight + bias
    assert len(groups["encoder_decay"]["params"]) == 2 and groups["encoder_decay"]["lr"] == 1.0
    assert len(groups["head_no_decay"]["params"]) == 2 and groups["head_no_decay"]["lr"] == 10.0
    assert len(groups["head_decay"]["params"]) == 2


def test_warmup_then_poly_schedule():
    factor = WarmupPolyFactor(total_steps=160_000, warmup_steps=1500, start_factor=1e-6, power=1.0)
    assert factor(0) == pytest.approx(1e-6)
    assert factor(750) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert factor(1500) == pytest.approx(1.0)
    assert factor(1500 + 158_500 // 2) == pytest.approx(0.5)
    assert factor(159_999) == pytest.approx(1 / 158_500) and factor(160_000) == 0.0
    assert WarmupPolyFactor(100, 10, power=0.9)(55) == pytest.approx(0.5**0.9)

    model = OffSegForSemanticSegmentation(tiny_config())
    settings = {**get_recipe("ade20k-160k"), "max_train_steps": 20, "warmup_steps": 5}
    optimizer = build_optimizer(model, settings)
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    scheduler = build_scheduler(optimizer, settings)
    seen = []
    for _ in range(20):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    reference = WarmupPolyFactor(20, 5)
    for step, lrs in enumerate(seen):
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            assert lr == pytest.approx(6e-5 * group["lr_mult"] * reference(step))  # the head stays at 10x
    assert all(group["lr"] == 0 for group in optimizer.param_groups)
    # The schedule survives a state_dict round trip (resume).
    restored = build_scheduler(
        build_optimizer(model, {**settings, "max_train_steps": 999}), {**settings, "max_train_steps": 999}
    )
    restored.load_state_dict(scheduler.state_dict())
    assert restored.lr_lambdas[0].total_steps == 20 and restored.last_epoch == 20


# ------------------------------------------------------------------------------------------------------------
# BatchNorm


def test_sync_batchnorm_only_for_distributed_gpus():
    def model():
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

    gpus = SimpleNamespace(num_processes=2, device=torch.device("cuda"))
    cpus = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    single = SimpleNamespace(num_processes=1, device=torch.device("cuda"))
    assert isinstance(convert_sync_batchnorm(model(), gpus)[1], nn.SyncBatchNorm)
    assert type(convert_sync_batchnorm(model(), cpus)[1]) is nn.BatchNorm2d
    assert type(convert_sync_batchnorm(model(), single)[1]) is nn.BatchNorm2d


# ------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_interrupted_mid_write_never_replaces_the_last_good_one(tmp_path, monkeypatch):
    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    model = OffSegForSemanticSegmentation(tiny_config())
    settings = {**get_recipe("demo"), "max_train_steps": 10}
    optimizer = build_optimizer(model, settings)
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
    _reset_accelerate()


# ------------------------------------------------------------------------------------------------------------
# examples/train.py end to end


def state_dict_of(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def test_resume_matches_an_uninterrupted_run_and_the_output_folder_loads(train_script, tmp_path):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    # --with_tracking logs to TensorBoard (the default --report_to).
    straight = run(train_script, straight_dir, *"--max_train_steps 8 --checkpointing_steps 4 --with_tracking".split())
    assert straight["step"] == 8 and [s for s, _ in list_checkpoints(straight_dir)] == [4, 8]
    assert read_trainer_state(straight_dir / "step_4")["samples_seen"] == 16

    # Steps 5..8 again from the step-4 checkpoint, in a fresh output folder, with DataLoader workers this time:
    # augmentation is seeded per draw, so workers change nothing.
    shutil.copytree(straight_dir / "step_4", resumed_dir / "step_4")
    resume = "--max_train_steps 8 --resume_from_checkpoint latest --dataloader_num_workers 2"
    resumed = run(train_script, resumed_dir, *resume.split())
    assert resumed["step"] == 8
    expected, actual = state_dict_of(straight["model"]), state_dict_of(resumed["model"])
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.allclose(actual[key].float(), expected[key].float(), atol=1e-6, rtol=0), key
    assert [g["lr"] for g in resumed["optimizer"].param_groups] == [g["lr"] for g in straight["optimizer"].param_groups]
    assert straight["metrics"]["num_pixels"] == 4 * 32 * 32

    # Trackers wrote TensorBoard events; the folder loads with the Auto classes and the pipeline.
    assert list(straight_dir.rglob("events.out.tfevents*"))
    from transformers import AutoModelForSemanticSegmentation, pipeline

    loaded = AutoModelForSemanticSegmentation.from_pretrained(straight_dir)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key])
    assert loaded.config.id2label[1] == "ellipse"
    segmenter = pipeline("image-segmentation", model=str(straight_dir))
    image = make_demo_splits(seed=0, num_train=1, num_validation=1, image_size=48)[0]["validation"][0]["image"]
    segments = segmenter(image)
    assert segments and all(s["mask"].size == (48, 48) for s in segments)
    assert {s["label"] for s in segments} <= set(loaded.config.id2label.values())
    summary = json.loads((straight_dir / "eval_results.json").read_text())
    assert summary["mean_iou"] == pytest.approx(straight["metrics"]["mean_iou"])


def test_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(train_script, tmp_path, monkeypatch):
    forward = OffSegForSemanticSegmentation.forward
    calls = {"training": 0}

    def forward_with_nan_at_step_3(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if self.training:
            calls["training"] += 1
            if calls["training"] == 3:
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(OffSegForSemanticSegmentation, "forward", forward_with_nan_at_step_3)
    with pytest.raises(train_script.NonFiniteLossError, match=r"loss is nan at step 3.*step_2, is intact"):
        run(train_script, tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "2")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    assert (tmp_path / "step_2" / "model.safetensors").is_file()
    assert not (tmp_path / "config.json").exists()  # no final model from a broken run


def write_folder_split(root: Path, count: int, seed: int) -> None:
    splits, _ = make_demo_splits(seed=seed, num_train=count, num_validation=0, image_size=32)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index, sample in enumerate(splits["train"]):
        sample["image"].save(root / "images" / f"scene{index}.jpg")
        sample["annotation"].save(root / "masks" / f"scene{index}.png")


def test_train_on_folders_and_stop_on_a_bad_sample_naming_it(train_script, tmp_path):
    write_folder_split(tmp_path / "train", 6, seed=1)
    write_folder_split(tmp_path / "val", 2, seed=2)
    (tmp_path / "train" / "id2label.json").write_text(json.dumps(dict(enumerate("abcde"))))
    folders = ["--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val"), "--recipe", "demo"]
    result = run(train_script, tmp_path / "out", *folders, "--max_train_steps", "2")
    assert result["metrics"]["num_pixels"] == 2 * 32 * 32
    assert AutoConfigFor(tmp_path / "out").id2label == dict(enumerate("abcde"))

    (tmp_path / "train" / "images" / "scene4.jpg").write_bytes(b"not an image at all")
    with pytest.raises(SegmentationDataError, match=r"train sample \d+ \(.*scene4.jpg.*cannot read the image"):
        run(train_script, tmp_path / "out2", *folders, "--max_train_steps", "2")


def AutoConfigFor(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------------------
# Two processes (gloo on CPU) through `accelerate launch`

RANK_REPORT = """
import hashlib, importlib.util, json, sys
from accelerate import PartialState
spec = importlib.util.spec_from_file_location("train", sys.argv[1])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
result = train.main(sys.argv[3:])
state = PartialState()
digest = hashlib.sha256()
for key, value in sorted(result["model"].state_dict().items()):
    digest.update(key.encode())
    digest.update(value.detach().cpu().contiguous().numpy().tobytes())
report = {
    "rank": state.process_index, "world": state.num_processes, "distributed_type": str(state.distributed_type),
    "sha256": digest.hexdigest(), "num_pixels": result["metrics"]["num_pixels"],
    "local_num_pixels": result["metrics"]["local_num_pixels"], "mean_iou": result["metrics"]["mean_iou"],
}
with open(f"{sys.argv[2]}/rank{state.process_index}.json", "w") as handle:
    json.dump(report, handle)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_on_cpu_stay_in_sync_and_gather_the_metric(tmp_path):
    helper = tmp_path / "rank_report.py"
    helper.write_text(RANK_REPORT)
    accelerate_cli = Path(sys.executable).with_name("accelerate")
    launcher = (
        [str(accelerate_cli)] if accelerate_cli.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    )
    # `accelerate launch --cpu` starts one process; multi-process CPU (gloo) is --multi_gpu with ACCELERATE_USE_CPU.
    command = [
        *launcher,
        *(["launch"] if accelerate_cli.exists() else []),
        *"--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no".split(),
        *["--main_process_port", str(free_port()), str(helper), str(TRAIN_SCRIPT), str(tmp_path)],
        *TINY_RUN,
        *"--demo_num_validation 5 --max_train_steps 3".split(),
        *["--output_dir", str(tmp_path / "out")],
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2] and reports[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert reports[0]["sha256"] == reports[1]["sha256"]  # identical weights after DDP steps
    # 5 held-out images of 32x32, all labelled: rank 0 evaluates 3, rank 1 evaluates 2, and both get the sum.
    splits, _ = make_demo_splits(seed=0, num_train=1, num_validation=5, image_size=32)
    total = sum(int((np.asarray(s["annotation"]) != 255).sum()) for s in splits["validation"])
    assert [r["local_num_pixels"] for r in reports] == [3 * 32 * 32, 2 * 32 * 32]
    assert reports[0]["num_pixels"] == reports[1]["num_pixels"] == total
    assert reports[0]["mean_iou"] == reports[1]["mean_iou"]
    assert "final mIoU" in completed.stdout and (tmp_path / "out" / "config.json").is_file()


def test_fine_tune_a_saved_folder_with_bf16_and_accumulation(train_script, tmp_path):
    run(train_script, tmp_path / "first", "--max_train_steps", "1")
    flags = "--mixed_precision bf16 --gradient_accumulation_steps 2 --max_train_steps 2 --checkpointing_steps 2"
    second = run(train_script, tmp_path / "second", "--model_name_or_path", str(tmp_path / "first"), *flags.split())
    # 2 micro-batches of 2 images make each step's 4 images.
    assert read_trainer_state(tmp_path / "second" / "step_2")["samples_seen"] == 8
    assert second["model"].config.decoder_hidden_size == 32  # the folder's model, not a fresh variant
    assert 0 <= second["metrics"]["mean_iou"] <= 1


def test_push_to_hub_uploads_the_model_folder_only(train_script, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, exist_ok):
            calls["create"] = (repo_id, exist_ok)
            return SimpleNamespace(repo_id=f"someone/{repo_id}")

        def upload_folder(self, **kwargs):
            calls["upload"] = kwargs

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    train_script.push_to_hub(tmp_path, "offseg-demo", "token")
    assert calls["token"] == "token" and calls["create"] == ("offseg-demo", True)
    assert calls["upload"]["repo_id"] == "someone/offseg-demo" and calls["upload"]["folder_path"] == str(tmp_path)
    assert "step_*" in calls["upload"]["ignore_patterns"]
    with pytest.raises(SystemExit):
        train_script.parse_args(["--push_to_hub"])  # no repo name given
