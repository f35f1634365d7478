import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Under pytest-xdist (pyproject's addopts: two workers) each worker, and every script a test starts from it, gets its
# share of the cores: two workers each running OpenMP with a thread per core would oversubscribe them, and spinning
# OpenMP threads that wait for a core slow a forward several times over.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import io  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if _WORKERS > 1:  # in case something imported torch before this file set OMP_NUM_THREADS
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation  # noqa: E402

# A MiT small enough for a unit test, with the real code paths (4 stages, spatial reduction, offset learning).
TINY_ENCODER = {"hidden_sizes": [8, 16, 24, 32], "num_attention_heads": [1, 1, 2, 2], "depths": [1, 1, 1, 1]}


# A Mask2Former small enough for a unit test, with the real code paths (Swin, deformable pixel decoder,
# masked-attention decoder, matcher, loss): one narrower block per Swin stage, one pixel-decoder layer, the initial
# prediction + 2 decoder layers, 20 queries; the 256-channel features and mask embeddings (so the offset module) are
# the preset's.
TINY_MASK2FORMER = {
    "num_labels": 4,
    "backbone_config": {"depths": [1, 1, 1, 1], "embed_dim": 48, "num_heads": [1, 2, 4, 8]},
    "encoder_layers": 1,
    "decoder_layers": 3,
    "num_queries": 20,
    "dim_feedforward": 512,
}


@pytest.fixture(autouse=True)
def _run_in_a_scratch_folder(tmp_path_factory, monkeypatch):
    """Each test runs in a fresh empty working directory: scripts' relative defaults (`outputs/...`) land there, so
    the suite neither reads nor writes the clone's own folders and passes before or after the README's training
    command has run."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def tiny_config(**overrides) -> OffSegConfig:
    values = {"num_labels": 6, "decoder_hidden_size": 32, "encoder_config": dict(TINY_ENCODER)}
    values.update(overrides)
    return OffSegConfig.from_variant("segformer-b0-offset", **values)


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Give BatchNorm statistics/affines and LayerNorm affines non-trivial values, so tests see them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))


def randomize_attention_biases(model: torch.nn.Module, seed: int = 0) -> None:
    """EfficientFormerV2 attention biases start at zero; give them values so tests see them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("attention_biases"):
                param.copy_(torch.randn(param.shape, generator=generator))


def trained_layer_scales(model: torch.nn.Module, value: float = 0.02) -> None:
    """EfficientFormerV2's layer scales start at 1e-5, so at initialisation every block adds almost nothing to its
    input and a wrong attention or MLP output barely shows in the logits; trained OffSeg-T's are about 0.002-0.02.
    Sets them all to `value` (`build_model("offseg-t")` does, so every test comparing its logits sees the blocks)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                param.fill_(value)


def build_model(kind: str) -> OffSegForSemanticSegmentation:
    """A small SegFormer-offset, or OffSeg-T (the smallest real EfficientFormerV2 + FreqFusion model)."""
    torch.manual_seed(0)
    config = tiny_config() if kind == "segformer" else OffSegConfig.from_variant("offseg-t", num_labels=6)
    model = OffSegForSemanticSegmentation(config).eval()
    randomize_norms(model)
    randomize_attention_biases(model)
    if kind != "segformer":
        # Trained-size layer scales: at timm's initial 1e-5 each encoder block adds almost nothing to its input, so an
        # export that got an attention or MLP wrong still matched eager here (an XNNPACK softmax over the wrong axis
        # moved this model's logits by 2e-5, a trained OffSeg-T's by 1.26).
        trained_layer_scales(model)
    if config.classifier == "offset":
        # Spread the class scores as training does: at init (std 0.02) the K scores of a pixel are nearly equal
        # and the LayerNorm over them magnifies float32 rounding about tenfold.
        with torch.no_grad():
            model.classifier.class_embeddings.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


@pytest.fixture
def tiny_model() -> OffSegForSemanticSegmentation:
    return build_model("segformer")


@pytest.fixture(params=["segformer", "offseg-t"])
def any_model(request) -> OffSegForSemanticSegmentation:
    """Each model family: the generic behaviour tests run on both."""
    return build_model(request.param)


def run_python_elsewhere(code: str, *args: str, cwd, timeout: int = 300, **env) -> str:
    """Run `code` in a fresh interpreter in `cwd`, offline, without PYTHONPATH (so only what is installed imports),
    with `env` added to the environment; raise on failure and return the last line it printed."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    environment.pop("PYTHONPATH", None)
    completed = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )
    if completed.returncode:
        raise AssertionError(f"the subprocess failed:\n{completed.stderr[-4000:]}")
    lines = completed.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def encoded_image(image, format: str, **options) -> bytes:
    """A PIL image's file bytes in `format` (PNG, JPEG, GIF, MPO, ...)."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def bad_image_files(make_image) -> dict[str, bytes]:
    """The inputs a server must refuse with one line (issue 24), built from `make_image(width, height)`, and an MPO
    photo (a camera JPEG with a preview frame), which it must take: the handler's and the app's tests share them."""
    photo = encoded_image(make_image(40, 30), "JPEG", quality=90)
    frames = [make_image(20, 10).point(lambda value, shift=shift: (value + shift) % 256) for shift in (0, 90, 180)]
    return {
        "over_limit": encoded_image(make_image(50, 50), "PNG"),
        "bomb": png_of_size(200_000, 200_000),  # beyond Pillow's own guard: refused at open
        "truncated_jpeg": photo[: len(photo) // 2],
        "text": b"name,value\nroad,1\nsky,2\n",
        "empty_png": png_of_size(0, 0),
        "animated_gif": encoded_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        "mpo_photo": encoded_image(frames[0], "MPO", save_all=True, append_images=frames[1:2]),
    }


def png_of_size(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels and holds none: Pillow writes neither a 0x0 PNG nor a
    decompression bomb."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """For an export test module: per family, `(model, path)` with the module's `FAMILIES[family]()` exported by its
    `export_for_test(model, folder)`, built on first use and shared by the module's tests (exports take seconds to
    minutes)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model = request.module.FAMILIES[family]()
            cache[family] = model, request.module.export_for_test(model, tmp_path_factory.mktemp(family))
        return cache[family]

    return get
