"""Mask2Former with offset learning (offseg_hf/models/modeling_mask2former.py): one offset module shared by every mask
prediction, plain transformers' Mask2Former without it, the official semantic inference, the training path, and
loading through the Auto classes, the pipeline and remote code."""

import json
import textwrap

import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import (
    AutoModelForSemanticSegmentation,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    pipeline,
)

from offseg_hf import (
    MaskOffsetLearning,
    OffSegConfig,
    OffSegImageProcessor,
    OffSegMask2FormerConfig,
    OffSegMask2FormerForSemanticSegmentation,
)
from offseg_hf.models import modeling_mask2former
from offseg_hf.models.modeling_mask2former import semantic_targets

from .conftest import TINY_MASK2FORMER, run_python_elsewhere

OFFSET, BASELINE = "mask2former-swin-t-offset", "mask2former-swin-t"
TINY = TINY_MASK2FORMER
OFFSET_MODULE = "model.transformer_module.decoder.mask_predictor.offset_learning"
OFFSET_KEYS = {f"{OFFSET_MODULE}.class_offset_proj.weight", f"{OFFSET_MODULE}.feature_offset_proj.weight"}
LABELS = {0: "wall", 1: "floor", 2: "sky", 3: "tree"}


def tiny_config(variant: str = OFFSET, **overrides) -> OffSegMask2FormerConfig:
    return OffSegConfig.from_variant(variant, **{**TINY, **overrides})


def tiny_model(variant: str = OFFSET, seed: int = 0, **overrides) -> OffSegMask2FormerForSemanticSegmentation:
    torch.manual_seed(seed)
    return OffSegMask2FormerForSemanticSegmentation(tiny_config(variant, **overrides)).eval()


def images(height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def offset_module(model) -> MaskOffsetLearning:
    return model.model.transformer_module.decoder.mask_predictor.offset_learning


def zero_offset_projections(model) -> None:
    with torch.no_grad():
        offset_module(model).class_offset_proj.weight.zero_()
        offset_module(model).feature_offset_proj.weight.zero_()


def blocky_batch(height: int = 64, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images whose colour follows a blocky label map (classes 0-3, a 255 corner)."""
    labels = torch.zeros(2, height, width, dtype=torch.long)
    labels[0, :, width // 2 :] = 1
    labels[0, height // 2 :, : width // 3] = 2
    labels[1, : height // 2] = 3
    labels[1, height // 2 :] = 1
    labels[1, : height // 4, : width // 4] = 255
    palette = torch.tensor([[-1.0, 0.0, 1.0], [1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [1.0, 1.0, 1.0]])
    pixels = palette[labels.clamp(max=3)].permute(0, 3, 1, 2)
    return pixels + 0.3 * images(height, width), labels


def official_semantic_logits(class_logits, mask_logits, padded_size, size):
    """mmseg's Mask2FormerHead.predict, written out: masks upsampled to the padded input, sigmoid, times the class
    probabilities without no-object, summed over the queries; then the padding cropped off."""
    masks = F.interpolate(mask_logits, size=padded_size, mode="bilinear", align_corners=False).sigmoid()
    probabilities = class_logits.softmax(dim=-1)[..., :-1]  # (B, Q, K)
    scores = (probabilities[..., None, None] * masks[:, :, None]).sum(dim=1)  # (B, K, H, W)
    return scores[..., : size[0], : size[1]]


# -- initialisation and structure -------------------------------------------------------------------------------


def assert_normal(weight: torch.Tensor, std: float) -> None:
    assert abs(weight.std().item() / std - 1) < 0.1, weight.std()
    assert abs(weight.mean().item()) < 0.05 * std
    # Normal tails (about 4.5 std over 65536 values), not uniform (bound sqrt(3) std) nor clipped at 2 std.
    assert 3 * std < weight.abs().max() < 6 * std


def assert_transformers_mask_mlp_init(predictor) -> None:
    """transformers' Mask2Former keeps nn.Linear's default init for the mask MLP: kaiming uniform, bound 1/16."""
    for name, param in predictor.mask_embedder.named_parameters():
        assert param.abs().max() <= 1 / 16 and 0.033 < param.std() < 0.039, name


@pytest.mark.parametrize("std", [0.02, 0.05])
def test_offset_projections_get_the_official_init(std):
    # mmengine's trunc_normal_init(std=0.02) truncates at the absolute bounds (-2, 2), i.e. 100 std: in effect a
    # normal(0, 0.02). nn.Linear's default (kaiming uniform, std 0.036, bound 0.0625) or zeros would fail here.
    model = tiny_model(offset_initializer_range=std)
    projections = offset_module(model).class_offset_proj.weight, offset_module(model).feature_offset_proj.weight
    for weight in projections:
        assert weight.shape == (256, 256)
        assert_normal(weight, std)
    assert not torch.equal(*projections)
    # The rest of the offset predictor is initialised as transformers initialises the plain one.
    assert_transformers_mask_mlp_init(model.model.transformer_module.decoder.mask_predictor)
    assert_transformers_mask_mlp_init(tiny_model(BASELINE).model.transformer_module.decoder.mask_predictor)


def test_a_baseline_checkpoint_loads_with_freshly_initialised_offsets(tmp_path):
    baseline = tiny_model(BASELINE)
    baseline.save_pretrained(tmp_path)
    model = OffSegMask2FormerForSemanticSegmentation.from_pretrained(
        tmp_path, offset_learning=True, offset_initializer_range=0.05
    )
    state, loaded = model.state_dict(), baseline.state_dict()
    assert set(state) == set(loaded) | OFFSET_KEYS
    for key, value in loaded.items():
        assert torch.equal(state[key], value), key  # the mask MLP included: loaded, not re-initialised
    for key in OFFSET_KEYS:
        assert_normal(state[key], 0.05)


def test_one_offset_module_inside_the_mask_predictor():
    model = tiny_model()
    found = [name for name, module in model.named_modules() if isinstance(module, MaskOffsetLearning)]
    assert found == [OFFSET_MODULE]
    baseline = tiny_model(BASELINE)
    assert not any(isinstance(module, MaskOffsetLearning) for module in baseline.modules())
    assert type(baseline.model.transformer_module.decoder.mask_predictor).__name__ == "Mask2FormerMaskPredictor"
    assert set(model.state_dict()) == set(baseline.state_dict()) | OFFSET_KEYS
    assert len(model.state_dict()) == len(baseline.state_dict()) + 2


def test_the_offset_module_runs_once_per_mask_prediction():
    model = tiny_model(decoder_layers=4)
    calls = []
    handle = offset_module(model).register_forward_hook(lambda _module, _inputs, output: calls.append(output))
    with torch.no_grad():
        outputs = model(images(64, 96), output_auxiliary_logits=True)
    handle.remove()
    assert len(calls) == model.config.decoder_layers == 4  # the initial prediction and one per decoder layer
    # Every mask prediction, auxiliary ones included, is that module's output.
    predictions = [aux["masks_queries_logits"] for aux in outputs.auxiliary_logits] + [outputs.masks_queries_logits]
    assert len(predictions) == 4
    for prediction, call in zip(predictions, calls, strict=True):
        assert torch.equal(prediction, call)


def test_baseline_preset_is_transformers_mask2former():
    baseline = tiny_model(BASELINE)
    values = baseline.config.to_dict()
    for key in ("model_type", "offset_learning", "offset_initializer_range", "size_divisor", "auto_map"):
        values.pop(key)
    torch.manual_seed(1)
    reference = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(**values)).eval()
    reference_state = reference.state_dict()
    assert {k: v.shape for k, v in baseline.state_dict().items()} == {k: v.shape for k, v in reference_state.items()}
    # Same weights, same outputs (64x96 needs no padding).
    baseline.load_state_dict(reference_state)
    pixel_values = images(64, 96)
    with torch.no_grad():
        ours, theirs = baseline(pixel_values), reference(pixel_values)
    assert torch.equal(ours.class_queries_logits, theirs.class_queries_logits)
    assert torch.equal(ours.masks_queries_logits, theirs.masks_queries_logits)


def test_evaluation_takes_the_intermediate_masks_at_the_attention_mask_size_with_the_same_result():
    model = tiny_model(decoder_layers=4).eval()
    shapes = []
    handle = offset_module(model).register_forward_hook(lambda _m, _i, output: shapes.append(tuple(output.shape)))
    pixel_values = images(64, 96)
    with torch.no_grad():
        fast = model(pixel_values)
        full = model(pixel_values, output_auxiliary_logits=True)  # every prediction at 1/4: the plain path
    handle.remove()
    # The 3 intermediate predictions of the fast pass at the next layer's attention-mask size (levels 1/32, 1/16,
    # 1/8), the last at 1/4; every one at 1/4 in the full pass.
    assert shapes[:4] == [(2, 20, 2, 3), (2, 20, 4, 6), (2, 20, 8, 12), (2, 20, 16, 24)]
    assert shapes[4:] == [(2, 20, 16, 24)] * 4
    torch.testing.assert_close(fast.logits, full.logits, rtol=0, atol=1e-5)


def module_attributes(model: torch.nn.Module) -> dict[str, dict[str, object]]:
    return {name: dict(vars(module)) for name, module in model.named_modules()}


def test_a_pass_leaves_no_state_on_the_modules():
    """Nothing of a pass is kept on any module (what makes one instance safe to share between threads): every
    module has the same attributes, holding the same objects, after passes of every kind as before."""
    model = tiny_model(train_num_points=1024)
    before = module_attributes(model)
    pixel_values, labels = blocky_batch()
    with torch.no_grad():
        model(pixel_values)
        model(pixel_values, output_auxiliary_logits=True)
        model(pixel_values, labels=labels)
    model.train()
    model(pixel_values, labels=labels)
    model.eval()
    after = module_attributes(model)
    assert after.keys() == before.keys()
    for name, attributes in before.items():
        assert after[name].keys() == attributes.keys(), name
        changed = [key for key, value in attributes.items() if after[name][key] is not value]
        assert not changed, (name, changed)


def test_the_inference_pass_returns_what_transformers_pass_returns():
    """Without labels or auxiliary outputs in evaluation the model runs its own pass (`inference_pass`); with
    auxiliary outputs, transformers'. Both return the same fields, hidden states and attentions included, and the
    same values up to the float rounding of the intermediate masks (exactly before the masked-attention decoder)."""
    model = tiny_model(decoder_layers=4)
    pixel_values = images(70, 90)
    options = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        fast = model(pixel_values, **options)
        full = model(pixel_values, output_auxiliary_logits=True, **options)
        as_tuple = model(pixel_values, return_dict=False, **options)
    assert set(full.keys()) - set(fast.keys()) == {"auxiliary_logits"}
    assert len(as_tuple) == len(fast)
    for key in ("encoder_last_hidden_state", "pixel_decoder_last_hidden_state"):
        assert torch.equal(fast[key], full[key]), key
    for key in ("encoder_hidden_states", "pixel_decoder_hidden_states"):
        assert len(fast[key]) == len(full[key]) and all(map(torch.equal, fast[key], full[key])), key
    assert len(fast.transformer_decoder_hidden_states) == len(full.transformer_decoder_hidden_states) == 4
    assert len(fast.attentions) == len(full.attentions) == 3
    for key in ("transformer_decoder_hidden_states", "attentions"):
        for ours, theirs in zip(fast[key], full[key], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    for key in ("transformer_decoder_last_hidden_state", "class_queries_logits", "masks_queries_logits", "logits"):
        torch.testing.assert_close(fast[key], full[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "size", [(2, 3), (4, 6), (8, 12), (4, 12), (16, 12), (16, 24), (5, 7)], ids=lambda size: "x".join(map(str, size))
)
def test_the_offset_module_resizes_masks_as_bilinear_interpolation(size):
    """Even reductions are computed at the 2x2 positions bilinear interpolation reads; the others resize the full
    masks. Either way the result is the resized full masks."""
    generator = torch.Generator().manual_seed(0)
    module = MaskOffsetLearning(256).double()
    queries = torch.randn(2, 20, 256, generator=generator, dtype=torch.float64)
    features = torch.randn(2, 256, 16, 24, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        resized = F.interpolate(module(queries, features), size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(module(queries, features, size=size), resized, rtol=0, atol=1e-10)


def test_zero_offsets_give_exactly_the_baseline():
    """Class logits use the queries without offset, and with zero projections the masks are the plain q F^T: the
    offset model is then the baseline, bit for bit, including the next layers' attention masks."""
    model, baseline = tiny_model(), tiny_model(BASELINE, seed=1)
    trained_like = {k: v.clone() for k, v in offset_module(model).state_dict().items()}
    zero_offset_projections(model)
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and set(unexpected) == OFFSET_KEYS
    pixel_values = images(70, 90)
    with torch.no_grad():
        ours = model(pixel_values, output_auxiliary_logits=True)
        theirs = baseline(pixel_values, output_auxiliary_logits=True)
    for key in ("class_queries_logits", "masks_queries_logits", "logits"):
        assert torch.equal(ours[key], theirs[key]), key
    for aux, aux_baseline in zip(ours.auxiliary_logits, theirs.auxiliary_logits, strict=True):
        assert torch.equal(aux["class_queries_logits"], aux_baseline["class_queries_logits"])
        assert torch.equal(aux["masks_queries_logits"], aux_baseline["masks_queries_logits"])

    # With the offsets back, the first prediction's masks change but its class logits do not.
    offset_module(model).load_state_dict(trained_like)
    with torch.no_grad():
        shifted = model(pixel_values, output_auxiliary_logits=True)
    first, first_baseline = shifted.auxiliary_logits[0], theirs.auxiliary_logits[0]
    assert torch.equal(first["class_queries_logits"], first_baseline["class_queries_logits"])
    assert not torch.allclose(first["masks_queries_logits"], first_baseline["masks_queries_logits"])
    assert not torch.allclose(shifted.logits, theirs.logits)


# -- semantic inference -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, padded", [((70, 90), (96, 96)), ((64, 96), (64, 96))])
def test_logits_are_the_official_semantic_inference(size, padded):
    model = tiny_model()
    with torch.no_grad():
        outputs = model(images(*size))
    assert outputs.masks_queries_logits.shape == (2, 20, padded[0] // 4, padded[1] // 4)
    assert outputs.class_queries_logits.shape == (2, 20, 5)
    assert outputs.logits.shape == (2, 4, *size)
    expected = official_semantic_logits(outputs.class_queries_logits, outputs.masks_queries_logits, padded, size)
    torch.testing.assert_close(outputs.logits, expected, rtol=1e-6, atol=1e-6)


def test_inputs_are_padded_with_zeros():
    model = tiny_model()
    pixel_values = images(70, 90)
    with torch.no_grad():
        padded_here = model(pixel_values)
        padded_by_hand = model(F.pad(pixel_values, (0, 6, 0, 26)))
        padded_with_ones = model(F.pad(pixel_values, (0, 6, 0, 26), value=1.0))
    assert padded_by_hand.logits.shape == (2, 4, 96, 96)
    assert torch.equal(padded_here.logits, padded_by_hand.logits[..., :70, :90])
    assert torch.equal(padded_here.masks_queries_logits, padded_by_hand.masks_queries_logits)
    assert torch.equal(padded_here.class_queries_logits, padded_by_hand.class_queries_logits)
    # The padding's value reaches the output, so the comparison above does test it.
    assert not torch.allclose(padded_here.logits, padded_with_ones.logits[..., :70, :90])


# -- training ---------------------------------------------------------------------------------------------------


def test_semantic_targets_one_exact_mask_per_present_class():
    labels = torch.tensor(
        [
            [[0, 0, 3, 3], [0, 255, 3, 3], [2, 2, 255, 3]],
            [[255, 255, 255, 255], [255, 255, 255, 255], [255, 255, 255, 255]],
        ]
    )
    masks, classes = semantic_targets(labels, num_labels=4)
    assert classes[0].tolist() == [0, 2, 3] and classes[0].dtype == torch.long
    expected = torch.tensor(
        [
            [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]],
            [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]],
            [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]],
        ],
        dtype=torch.float32,
    )
    assert torch.equal(masks[0], expected)
    assert masks[1].shape == (0, 3, 4) and classes[1].numel() == 0  # only ignored pixels: no target
    for bad in (4, -1):
        with pytest.raises(ValueError, match=rf"ids \[{bad}\].*\[0, 4\)"):
            semantic_targets(torch.full((1, 2, 2), bad), num_labels=4)


def test_labels_give_a_loss_with_gradients_and_padding_is_ignored(monkeypatch):
    model = tiny_model(train_num_points=1024).train()
    seen = []

    def spy(labels, num_labels, ignore_index):
        seen.append(labels)
        assert ignore_index == model.config.ignore_value == 255
        return semantic_targets(labels, num_labels, ignore_index)

    monkeypatch.setattr(modeling_mask2former, "semantic_targets", spy)
    pixel_values, labels = blocky_batch(70, 90)
    outputs = model(pixel_values, labels=labels)
    assert outputs.logits is None  # training with labels: no semantic inference
    assert outputs.loss.ndim == 0 and torch.isfinite(outputs.loss) and outputs.loss.requires_grad
    (padded,) = seen
    assert padded.shape == (2, 96, 96)
    assert torch.equal(padded[:, :70, :90], labels)
    assert (padded[:, 70:] == 255).all() and (padded[:, :, 90:] == 255).all()
    outputs.loss.backward()
    for name, param in offset_module(model).named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name

    model.eval()
    with torch.no_grad():
        evaluated = model(pixel_values, labels=labels)
    assert torch.isfinite(evaluated.loss) and evaluated.logits.shape == (2, 4, 70, 90)
    with pytest.raises(ValueError, match=r"ids \[7\]"):
        model(pixel_values, labels=labels.masked_fill(labels == 3, 7))


def test_a_few_steps_lower_the_loss():
    model = tiny_model(train_num_points=1024).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixel_values, labels = blocky_batch()
    losses = []
    for _ in range(8):
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


# -- Auto classes, pipeline, remote code ------------------------------------------------------------------------


REMOTE_PIPELINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["offseg_hf"] = None  # as on a machine without the package
    import torch
    from PIL import Image
    from transformers import pipeline
    folder, inputs, output = sys.argv[1:4]
    segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True)
    segments = segmenter(Image.new("RGB", (61, 47), (120, 80, 40)))
    with torch.no_grad():
        torch.save(segmenter.model.eval()(torch.load(inputs)).logits, output)
    print(json.dumps({
        "module": type(segmenter.model).__module__,
        "class": type(segmenter.model).__name__,
        "mask_sizes": sorted({s["mask"].size for s in segments}),
        "labels": [s["label"] for s in segments],
    }))
    """
)


@pytest.fixture
def saved_folder(tmp_path):
    model = tiny_model(id2label=LABELS)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    OffSegImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return model, folder


def test_auto_class_and_pipeline_load_the_saved_folder(saved_folder):
    model, folder = saved_folder
    assert {"modeling_mask2former.py", "configuration_mask2former.py", "offset_learning.py"} <= {
        p.name for p in folder.iterdir()
    }
    loaded = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    assert type(loaded) is OffSegMask2FormerForSemanticSegmentation and loaded.config.offset_learning
    pixel_values = images(70, 90)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values).logits, model(pixel_values).logits)

    segmenter = pipeline("image-segmentation", model=str(folder))
    image = Image.new("RGB", (61, 47), (120, 80, 40))
    segments = segmenter(image)
    assert segments and {s["mask"].size for s in segments} == {(61, 47)}
    # The labels are the classes of the processor + model + post-processing by hand.
    processor = OffSegImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
    segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=[(47, 61)])[0]
    assert sorted(s["label"] for s in segments) == sorted(LABELS[int(i)] for i in segmentation.unique())


@pytest.mark.slow
def test_remote_code_pipeline_without_the_package(saved_folder, tmp_path):
    model, folder = saved_folder
    pixel_values = images(70, 90)
    torch.save(pixel_values, tmp_path / "inputs.pt")
    arguments = [str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt")]
    report = json.loads(
        run_python_elsewhere(
            REMOTE_PIPELINE_SCRIPT, *arguments, cwd=tmp_path, HF_MODULES_CACHE=str(tmp_path / "modules")
        )
    )
    assert report["module"].startswith("transformers_modules"), report
    assert report["class"] == "OffSegMask2FormerForSemanticSegmentation"
    assert report["mask_sizes"] == [[61, 47]]
    assert report["labels"] and set(report["labels"]) <= set(LABELS.values())
    with torch.no_grad():
        expected = model(pixel_values).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-6)


def test_forward_refuses_keyword_arguments_it_does_not_take():
    model = OffSegMask2FormerForSemanticSegmentation(tiny_config()).eval()
    with pytest.raises(TypeError, match="output_hidden_state"):
        model(torch.randn(1, 3, 64, 64), output_hidden_state=True)
