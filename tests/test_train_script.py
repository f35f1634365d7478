"""examples/train.py end to end: arguments checked before any work, resume exactness, the output-folder and
same-model rules, non-finite loss, bad data, two processes over gloo, accumulation, the saved folder in a
pipeline, push to hub (mocked)."""

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
from accelerate.state import AcceleratorState, GradientState

from offseg_hf import OffSegForSemanticSegmentation
from offseg_hf.data.datasets import SegmentationDataError
from offseg_hf.data.demo import make_demo_splits
from offseg_hf.training import RECIPE_FIELDS, CheckpointMismatchError, list_checkpoints, read_trainer_state

from .conftest import TINY_ENCODER

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "examples" / "train.py"

# A tiny demo set (32x32 images, 4 images a step) and a tiny model.
TINY_DEMO = "--demo_image_size 32 --demo_num_train 16 --demo_num_validation 4".split()
TINY_RECIPE = [
    *"--crop_size 32 32 --resize_scale 128 32 --eval_scale 128 32 --total_batch_size 4 --warmup_steps 2".split(),
    *"--learning_rate 1e-3 --logging_steps 1 --eval_steps 0 --checkpointing_steps 0".split(),
]
TINY_MODEL = ["--config_overrides", json.dumps({"decoder_hidden_size": 32, "encoder_config": TINY_ENCODER})]
TINY_RUN = TINY_DEMO + TINY_RECIPE + TINY_MODEL


def _reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def train_script():
    """examples/train.py as a module, with Accelerate's process-wide state reset around each use."""
    _reset_accelerate()
    spec = importlib.util.spec_from_file_location("offseg_train_example", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    _reset_accelerate()


def run(train_script, output_dir, *extra, model=TINY_MODEL, data=TINY_DEMO):
    _reset_accelerate()
    return train_script.main([*data, *TINY_RECIPE, *model, "--output_dir", str(output_dir), *extra])


# ------------------------------------------------------------------------------------------------------------
# Arguments


def test_help_shows_every_option_and_each_recipes_default(train_script):
    text = " ".join(train_script.build_parser().format_help().split())
    for field in RECIPE_FIELDS:
        assert f"--{field}" in text
    assert "ade20k-160k: 6e-05" in text and "demo: 0.001" in text  # learning rates
    assert "ade20k-160k: 160000" in text and "coco-stuff-80k: 80000" in text  # iterations
    assert "cityscapes-160k: (1024, 1024)" in text and "cityscapes-160k: 8," in text  # crop, batch
    assert "demo: whole, ade20k-160k: slide" in text and "cityscapes-160k: (768, 768)" in text  # eval protocol
    assert "[recipe default, every recipe: 0.75]" in text  # cat_max_ratio
    assert "nvidia/mit-b0" in text and "efficientformerv2_s1.snap_dist_in1k" in text  # --pretrained_encoder
    flags = "--model_name_or_path --dataset_name --train_dir --validation_dir --ade20k_root --output_dir"
    flags += " --overwrite_output_dir --per_device_train_batch_size --per_device_eval_batch_size --seed"
    flags += " --gradient_accumulation_steps --resume_from_checkpoint --push_to_hub --hub_model_id --hub_token"
    for flag in flags.split():
        assert flag in text
    assert "--seed SEED Seeds weights, data order, augmentation, demo set. (default: 0)" in text
    parser = train_script.build_parser()
    assert all(action.help for action in parser._actions)  # every flag explains itself


BAD_ARGUMENTS = [
    ("--variant segformer-b0", "invalid choice: 'segformer-b0' (choose from 'offseg-b', 'offseg-l', 'offseg-t',"),
    ("--eval_mode tiled", "invalid choice: 'tiled'"),
    ("--crop_size 0 32", "--crop_size must be positive"),
    ("--recipe ade20k", "invalid choice: 'ade20k'"),
    ("--train_dir data --demo_num_train 8", "describe the demo set; this run reads --train_dir"),
    ("--train_dir data --ade20k_root ade", "give one data source"),
    (
        "--ade20k_root a --pascal_context_root b",
        "give one data source: --dataset_name, --train_dir, --ade20k_root, --pascal_context_root or --demo.",
    ),
    ("--validation_dir val", "--validation_dir needs --train_dir"),
    ("--model_name_or_path some/model --variant offseg-t", "build a fresh model; --model_name_or_path loads"),
    ("--variant offseg-t --pretrained_encoder nvidia/mit-b0", "the encoder of offseg-t is EfficientFormerV2; give a"),
    ("--pretrained_encoder efficientformerv2_s1", "the encoder of segformer-b0-offset is MiT; give a Hub id"),
    ("--variant segnext-t-offset --pretrained_encoder nvidia/mit-b0", "is MSCAN; give a local MSCAN ImageNet"),
    ("--config_overrides [bad", "--config_overrides is not JSON"),
    ("--ignore_mismatched_sizes", "--ignore_mismatched_sizes applies to --model_name_or_path"),
    ("--gradient_accumulation_steps 0", "--gradient_accumulation_steps must be at least 1"),
    ("--push_to_hub", "--push_to_hub needs --hub_model_id or --output_dir"),
    ("--resume_from_checkpoint latest --output_dir {tmp}/none", "no complete checkpoint under"),
    ("--resume_from_checkpoint latest --overwrite_output_dir", "--overwrite_output_dir removes the folder's"),
    ("--output_dir {tmp}/used", "is not empty (config.json): pass --overwrite_output_dir"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS, ids=[argv for argv, _ in BAD_ARGUMENTS])
def test_bad_arguments_fail_at_once_with_one_line(train_script, tmp_path, monkeypatch, capsys, argv, message):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "config.json").write_text("{}")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(train_script, "make_accelerator", no_work)
    monkeypatch.setattr(train_script, "load_data", no_work)
    with pytest.raises(SystemExit) as caught:
        train_script.main(argv.format(tmp=tmp_path).split())
    assert caught.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 2 and error[0].startswith("usage:")  # a short usage line, then the one error line
    assert message in error[1]


def test_each_model_gets_its_own_default_folder(train_script):
    assert train_script.parse_args([]).output_dir == "outputs/demo-segformer-b0-offset"
    assert train_script.parse_args(["--variant", "offseg-t"]).output_dir == "outputs/demo-offseg-t"
    assert train_script.parse_args(["--recipe", "ade20k-160k"]).output_dir == "outputs/ade20k-160k-segformer-b0-offset"


def test_pascal_context_data_defaults_to_its_recipe(train_script, tmp_path):
    absent = str(tmp_path / "VOCdevkit")  # parse_args checks the flags only: the folder is read by load_data
    args = train_script.parse_args(["--pascal_context_root", absent, "--variant", "segnext-t-offset"])
    assert (args.recipe, args.data_source, args.demo) == ("pascal-context-59-80k", "pascal_context_root", False)
    assert (args.settings["crop_size"], args.settings["max_train_steps"]) == ((480, 480), 80_000)
    assert (args.settings["eval_mode"], args.settings["eval_stride"]) == ("slide", (320, 320))  # SegNeXt slides here
    assert args.output_dir == "outputs/pascal-context-59-80k-segnext-t-offset"
    assert train_script.parse_args(["--pascal_context_root", absent, "--recipe", "demo"]).recipe == "demo"
    assert train_script.parse_args(["--ade20k_root", absent]).recipe == "ade20k-160k"


# ------------------------------------------------------------------------------------------------------------
# Training runs


def state_dict_of(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run_and_the_output_folder_loads(train_script, tmp_path):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    # Each step is 2 accumulated micro-batches of 2 images (Accelerate counts micro-steps, and load_state restores
    # that count). --with_tracking logs to TensorBoard (the default --report_to).
    flags = "--max_train_steps 8 --gradient_accumulation_steps 2"
    straight = run(train_script, straight_dir, *f"{flags} --checkpointing_steps 4 --with_tracking".split())
    assert straight["step"] == 8 and [s for s, _ in list_checkpoints(straight_dir)] == [4, 8]
    assert read_trainer_state(straight_dir / "step_4")["samples_seen"] == 16

    # Steps 5..8 again from the step-4 checkpoint, in a fresh output folder, with DataLoader workers this time:
    # augmentation is seeded per draw, so workers change nothing.
    shutil.copytree(straight_dir / "step_4", resumed_dir / "step_4")
    resume = f"{flags} --resume_from_checkpoint latest --dataloader_num_workers 2"
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
    result = run(train_script, tmp_path / "out", *folders, "--max_train_steps", "2", data=[])
    assert result["metrics"]["num_pixels"] == 2 * 32 * 32
    assert AutoConfigFor(tmp_path / "out").id2label == dict(enumerate("abcde"))

    (tmp_path / "train" / "images" / "scene4.jpg").write_bytes(b"not an image at all")
    with pytest.raises(SegmentationDataError, match=r"train sample \d+ \(.*scene4.jpg.*cannot read the image"):
        run(train_script, tmp_path / "out2", *folders, "--max_train_steps", "2", data=[])


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_fine_tune_a_saved_folder_with_bf16_and_accumulation(train_script, tmp_path):
    run(train_script, tmp_path / "first", "--max_train_steps", "1")
    flags = "--mixed_precision bf16 --gradient_accumulation_steps 2 --max_train_steps 2 --checkpointing_steps 2"
    flags += " --warmup_steps 1"
    fine_tune = ["--model_name_or_path", str(tmp_path / "first")]
    second = run(train_script, tmp_path / "second", *flags.split(), model=fine_tune)
    # 2 micro-batches of 2 images make each step's 4 images; the optimizer stepped once per 2 micro-batches and
    # the schedule with it: after the last of 2 steps the poly decay is at 0.
    assert read_trainer_state(tmp_path / "second" / "step_2")["samples_seen"] == 8
    optimizer = second["optimizer"]
    assert {int(state["step"]) for state in optimizer.state.values()} == {2}
    assert [group["lr"] for group in optimizer.param_groups] == [0.0] * len(optimizer.param_groups)
    assert second["model"].config.decoder_hidden_size == 32  # the folder's model, not a fresh variant
    assert 0 <= second["metrics"]["mean_iou"] <= 1


def test_segnext_offset_trains_on_the_demo_set_and_its_folder_loads(train_script, tmp_path):
    small = {"encoder_config": {"depths": [1, 1, 1, 1]}, "decoder_hidden_size": 32}
    model = ["--variant", "segnext-t-offset", "--config_overrides", json.dumps(small)]
    result = run(train_script, tmp_path / "segnext", "--max_train_steps", "3", model=model)
    assert result["step"] == 3 and 0 <= result["metrics"]["mean_iou"] <= 1
    trained = result["model"]
    assert trained.config.decode_head == "lightham" and trained.config.encoder_config.model_type == "mscan"
    from transformers import AutoModelForSemanticSegmentation

    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "segnext").eval()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, trained.state_dict()[key].cpu()), key
    images = torch.randn(2, 3, 40, 56)
    with torch.no_grad():  # evaluation is deterministic: the NMF's evaluation bases come from the config's seed
        assert torch.equal(loaded(images).logits, trained.eval()(images).logits)


def test_mask2former_offset_trains_on_the_demo_set_with_its_official_rules(train_script, tmp_path):
    small = {"backbone_config": {"depths": [1, 1, 1, 1]}, "encoder_layers": 1, "decoder_layers": 3}
    small["train_num_points"] = 1024
    model = ["--variant", "mask2former-swin-t-offset", "--config_overrides", json.dumps(small)]
    result = run(train_script, tmp_path / "m2f", "--max_train_steps", "3", model=model)
    assert result["step"] == 3 and 0 <= result["metrics"]["mean_iou"] <= 1
    # The family's recipe: AdamW weight decay 0.05, poly 0.9 without warmup (lr 0 after the last step), backbone
    # groups at the demo's backbone multiplier (1.0: the demo trains from scratch), no head x10.
    groups = result["optimizer"].param_groups
    assert {group["lr_mult"] for group in groups} == {1.0} and {g["weight_decay"] for g in groups} == {0.0, 0.05}
    assert all(group["lr"] == 0.0 for group in groups)
    from transformers import AutoModelForSemanticSegmentation

    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "m2f").eval()
    assert type(loaded).__name__ == "OffSegMask2FormerForSemanticSegmentation" and loaded.config.offset_learning
    images = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        logits = loaded(images).logits
    assert logits.shape == (1, 5, 40, 56)
    torch.testing.assert_close(logits, result["model"].eval()(images).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_another_model_never_replaces_a_run_silently_nor_resumes_its_checkpoints(train_script, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    run(train_script, folder, "--max_train_steps", "2", "--checkpointing_steps", "2")
    first_weights = (folder / "model.safetensors").read_bytes()
    assert read_trainer_state(folder / "step_2")["model"] == "segformer-b0-offset"

    # A second model into the same folder: refused before any work, the first run intact.
    with pytest.raises(SystemExit):
        run(train_script, folder, "--variant", "offseg-t", model=[])
    assert (folder / "model.safetensors").read_bytes() == first_weights

    # Resuming the first run's checkpoint with another architecture: one line naming both, before load_state.
    with pytest.raises(CheckpointMismatchError) as caught:
        run(train_script, folder, "--variant", "offseg-t", "--resume_from_checkpoint", "latest", model=[])
    message = str(caught.value)
    assert "\n" not in message
    assert "step_2 is a checkpoint of segformer-b0-offset but this run builds offseg-t" in message

    # --overwrite_output_dir replaces it, and 'latest' can no longer find the old run's checkpoints. The final
    # evaluation runs the recipe's protocol (here overridden) in one process.
    import offseg_hf.evaluation.inference

    calls = []
    evaluate_dataset = offseg_hf.evaluation.inference.evaluate_dataset

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return evaluate_dataset(*args, **kwargs)

    monkeypatch.setattr(offseg_hf.evaluation.inference, "evaluate_dataset", recording)
    wider = ["--config_overrides", json.dumps({"decoder_hidden_size": 16, "encoder_config": TINY_ENCODER})]
    protocol = "--eval_scale 128 64 --eval_mode slide --eval_crop_size 32 32 --eval_stride 16 16"
    protocol += " --per_device_eval_batch_size 3"
    run(train_script, folder, "--overwrite_output_dir", "--max_train_steps", "1", *protocol.split(), model=wider)
    assert list_checkpoints(folder) == []
    assert json.loads((folder / "config.json").read_text())["decoder_hidden_size"] == 16
    assert len(calls) == 1
    assert {key: calls[0][key] for key in ("mode", "crop_size", "stride", "batch_size", "shard")} == {
        "mode": "slide",
        "crop_size": (32, 32),
        "stride": (16, 16),
        "batch_size": 3,
        "shard": (0, 1),
    }


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
