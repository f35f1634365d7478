import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
    pipeline,
)
from transformers import (
    logging as transformers_logging,
)

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation, OffSegImageProcessor, OffSegModel

from .conftest import build_model, randomize_norms, run_python_elsewhere, tiny_config


def save_folder(model, path):
    model.save_pretrained(path)
    OffSegImageProcessor(size={"height": 64, "width": 64}).save_pretrained(path)
    return path


@pytest.mark.parametrize("size", [(97, 131), (500, 375), (512, 512)])
def test_any_input_size(any_model, size):
    with torch.no_grad():
        logits = any_model(torch.randn(1, 3, *size)).logits
    # Both backbones reach 1/4 as ceil(size / 4); SegFormer-offset then max-pools to 1/8.
    expected = [(s - 1) // 4 + 1 for s in size]
    if any_model.config.decoder_max_pool:
        expected = [s // 2 for s in expected]
    assert logits.shape == (1, 6, *expected)
    assert torch.isfinite(logits).all()


def test_per_pixel_baseline_is_at_quarter_resolution():
    model = OffSegForSemanticSegmentation(tiny_config(classifier="per_pixel", decoder_max_pool=False)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).logits.shape == (1, 6, 16, 24)


def test_batch_equals_single_runs(any_model):
    images = torch.randn(3, 3, 75, 101)
    with torch.no_grad():
        batched = any_model(images).logits
        singles = torch.cat([any_model(image[None]).logits for image in images])
    # 1e-5 relative to the logits' scale: float32 GEMMs sum in a batch-size-dependent order, and OffSeg's
    # 256-channel head carries scores up to ~10 (the float64 test below shows the difference is rounding only).
    scale = batched.abs().max().clamp_min(1.0)
    assert (batched - singles).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("kind", ["segformer", "offseg-t"])
def test_batch_equals_single_runs_exactly_in_float64(kind):
    """Nothing mixes samples: in float64 the only differences left are rounding (at any weights, init included)."""
    torch.manual_seed(0)
    config = tiny_config() if kind == "segformer" else OffSegConfig.from_variant("offseg-t", num_labels=6)
    model = OffSegForSemanticSegmentation(config).eval().double()
    images = torch.randn(3, 3, 75, 101, dtype=torch.float64)
    with torch.no_grad():
        batched = model(images).logits
        singles = torch.cat([model(image[None]).logits for image in images])
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-10)


def test_loss_is_cross_entropy_on_upsampled_logits(tiny_model):
    images = torch.randn(2, 3, 64, 80)
    labels = torch.randint(0, 6, (2, 64, 80))
    labels[0, :10] = 255
    with torch.no_grad():
        out = tiny_model(images, labels=labels)
        upsampled = F.interpolate(out.logits, size=(64, 80), mode="bilinear", align_corners=False)
        expected = F.cross_entropy(upsampled, labels, ignore_index=255)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("kind", ["segformer", "offseg-t"])
def test_training_step_reaches_every_parameter(kind):
    model = build_model(kind).train()
    # 128x128: at 64x64 the 1/32 map is 2x2 and the coarsest fusion's dilated similarities are all zero.
    loss = model(torch.randn(2, 3, 128, 128), labels=torch.randint(0, 6, (2, 128, 128))).loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_wrong_channel_count_is_a_value_error(any_model):
    for channels in (1, 4):
        with pytest.raises(ValueError, match="pixel_values must have shape"):
            any_model(torch.randn(1, channels, 32, 32))


@pytest.mark.parametrize("bad", [6, 200, -1])
def test_out_of_range_labels_are_a_value_error(any_model, bad):
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 3, 4] = bad
    with pytest.raises(ValueError, match=rf"\[{bad}\].*ignore index 255"):
        any_model(torch.randn(1, 3, 32, 32), labels=labels)


@pytest.mark.slow
def test_save_and_load_give_identical_logits(any_model, tmp_path):
    save_folder(any_model, tmp_path)
    images = torch.randn(2, 3, 64, 64)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, OffSegForSemanticSegmentation)
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(backbone, OffSegModel)
    with torch.no_grad():
        # Identical weights (checked bitwise); the outputs are compared at float32 resolution because oneDNN may
        # pick another summation order for differently aligned buffers.
        for key, value in any_model.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key]), key
        torch.testing.assert_close(any_model(images).logits, loaded(images).logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            any_model.offseg(images).last_hidden_state, backbone(images).last_hidden_state, rtol=0, atol=1e-6
        )
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), OffSegImageProcessor)


def test_num_labels_mismatch_is_a_value_error(any_model, tmp_path, capfd):
    save_folder(any_model, tmp_path)
    transformers_logging.set_verbosity_warning()  # the load report transformers would print is at warning level
    try:
        with pytest.raises(ValueError, match="num_labels=6 but num_labels=9.*ignore_mismatched_sizes"):
            OffSegForSemanticSegmentation.from_pretrained(tmp_path, num_labels=9)
        with pytest.raises(ValueError, match="num_labels=6 but num_labels=9"):
            AutoModelForSemanticSegmentation.from_pretrained(tmp_path, num_labels=9)
        with pytest.raises(ValueError, match="num_labels=6 but num_labels=2"):
            OffSegForSemanticSegmentation.from_pretrained(tmp_path, id2label={0: "a", 1: "b"})
    finally:
        transformers_logging.set_verbosity_error()
    printed = capfd.readouterr()
    assert "mismatch" not in (printed.out + printed.err).lower()  # one message: the error, no load report before it
    model = OffSegForSemanticSegmentation.from_pretrained(tmp_path, num_labels=9, ignore_mismatched_sizes=True)
    assert model.classifier.class_embeddings.shape == (9, any_model.config.decoder_hidden_size)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["offseg_hf"] = None  # make the package unimportable, as on a machine without it
    try:
        import offseg_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("offseg_hf is still importable")
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation
    folder, inputs, output = sys.argv[1:4]
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    backbone = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(processor).__name__ == "OffSegImageProcessor" and type(backbone).__name__ == "OffSegModel"
    with torch.no_grad():
        logits = model(torch.load(inputs)).logits
    torch.save(logits, output)
    # Other labels without ignore_mismatched_sizes: the package's one clear error, from the folder's own code too.
    try:
        AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True, num_labels=11)
    except ValueError as error:
        assert "num_labels=11 was requested" in str(error) and "ignore_mismatched_sizes" in str(error), error
    else:
        raise SystemExit("loading with another num_labels did not fail")
    """
)


@pytest.mark.slow
def test_remote_code_loads_without_the_package(any_model, tmp_path):
    folder = save_folder(any_model, tmp_path / "model")
    images = torch.randn(2, 3, 64, 64)
    torch.save(images, tmp_path / "inputs.pt")
    arguments = [str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    run_python_elsewhere(REMOTE_SCRIPT, *arguments, cwd=tmp_path, HF_MODULES_CACHE=str(tmp_path / "modules"))
    with torch.no_grad():
        expected = any_model(images).logits
    # Another process with the same weights: MKL/oneDNN may split reductions differently (memory alignment, thread
    # count), a few 1e-6 on some CPUs (2.7e-6 seen on an AVX2 machine); a wrong folder would be off by far more.
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_pipeline_masks_match_image_size(any_model, tmp_path, mode):
    save_folder(any_model, tmp_path)
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    array = rng.integers(0, 256, size=(333, 517, channels), dtype=np.uint8)
    image = Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode)
    results = segmenter(image)
    # Reference: processor + model + post-processing by hand, on the RGB image.
    processor = OffSegImageProcessor.from_pretrained(tmp_path)
    with torch.no_grad():
        outputs = any_model(**processor(image.convert("RGB"), return_tensors="pt"))
    seg = processor.post_process_semantic_segmentation(outputs, target_sizes=[(333, 517)])[0]
    present = sorted(int(i) for i in torch.unique(seg))
    assert sorted(any_model.config.label2id[r["label"]] for r in results) == present
    for r in results:
        assert r["mask"].size == (517, 333)
        mask = np.array(r["mask"]) > 0
        assert np.array_equal(mask, (seg == any_model.config.label2id[r["label"]]).numpy())


def test_pipeline_on_a_saved_folder_asks_nothing(any_model, tmp_path, monkeypatch):
    """With offseg_hf installed, loading a saved folder must not prompt about custom code (transformers derives a
    video processor from a processor-side auto_map and would ask in an interactive terminal)."""
    save_folder(any_model, tmp_path)

    def no_prompt(*_):
        raise AssertionError("transformers asked whether to run custom code")

    monkeypatch.setattr("builtins.input", no_prompt)
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    assert isinstance(segmenter.image_processor, OffSegImageProcessor)
    assert isinstance(segmenter.model, OffSegForSemanticSegmentation)
    assert "auto_map" not in json.loads((tmp_path / "preprocessor_config.json").read_text())


def test_randomized_norms_fixture_is_effective(tiny_model):
    fresh = OffSegForSemanticSegmentation(tiny_config()).eval()
    fresh.load_state_dict(tiny_model.state_dict())
    randomize_norms(fresh, seed=5)
    with torch.no_grad():
        images = torch.randn(1, 3, 32, 32)
        assert not torch.allclose(fresh(images).logits, tiny_model(images).logits)


def test_forward_refuses_keyword_arguments_it_does_not_take(tiny_model):
    """transformers 5 models name what they take; an unknown keyword is a TypeError, not silently dropped."""
    with pytest.raises(TypeError, match="output_hidden_state"):
        tiny_model(torch.randn(1, 3, 32, 32), output_hidden_state=True)  # a typo of output_hidden_states
    with pytest.raises(TypeError, match="pixel_mask"):
        tiny_model.offseg(torch.randn(1, 3, 32, 32), pixel_mask=None)
