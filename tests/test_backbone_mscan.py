"""SegNeXt's MSCAN backbone (offseg_hf/models/backbone_mscan.py): loading official-style checkpoints safely, norm_eval
and the
official initialisation. (Parameter counts against the paper are in test_config.py.)"""

import math
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation
from offseg_hf.convert import from_pretrained_encoder
from offseg_hf.models.backbone_mscan import MSCANConfig, MSCANEncoder

from .conftest import randomize_norms

SMALL_MSCAN = {"depths": [1, 1, 1, 1]}
IMAGENET_HEAD = ("head.weight", "head.bias")


def small_encoder(seed: int) -> MSCANEncoder:
    torch.manual_seed(seed)
    encoder = MSCANEncoder(MSCANConfig(**SMALL_MSCAN))
    randomize_norms(encoder, seed)
    return encoder


def official_checkpoint(encoder: MSCANEncoder, prefix: str = "backbone.", original_names: bool = False) -> dict:
    """The encoder's weights as mmseg / the SegNeXt release store them: under "state_dict", with a prefix, the
    original `mlp.dwconv.dwconv` names if asked, and an ImageNet classifier."""
    weights = {}
    for key, value in encoder.state_dict().items():
        if original_names:
            key = re.sub(r"\.mlp\.dwconv\.", ".mlp.dwconv.dwconv.", key)
        weights[prefix + key] = value.clone()
    weights["head.weight"] = torch.randn(1000, encoder.channels[-1])
    weights["head.bias"] = torch.zeros(1000)
    return {"meta": {"epoch": 300}, "state_dict": weights}


def assert_same_weights(encoder: MSCANEncoder, reference: MSCANEncoder) -> None:
    expected = reference.state_dict()
    loaded = encoder.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize(
    "prefix, original_names",
    [("backbone.", False), ("", True), ("module.", False)],
    ids=["mmseg", "original-release", "ddp"],
)
def test_load_pretrained_unwraps_official_checkpoints(tmp_path, prefix, original_names):
    reference = small_encoder(seed=0)
    checkpoint = official_checkpoint(reference, prefix, original_names)
    if original_names:
        assert "block1.0.mlp.dwconv.dwconv.weight" in checkpoint["state_dict"]
    path = tmp_path / "mscan.pth"
    torch.save(checkpoint, path)
    encoder = small_encoder(seed=1)
    assert not torch.equal(encoder.block1[0].mlp.fc1.weight, reference.block1[0].mlp.fc1.weight)
    unused = encoder.load_pretrained(str(path))
    assert sorted(unused) == sorted(IMAGENET_HEAD)
    assert_same_weights(encoder, reference)


def test_load_pretrained_reads_safetensors(tmp_path):
    reference = small_encoder(seed=0)
    path = tmp_path / "mscan.safetensors"
    save_file({k: v.contiguous() for k, v in official_checkpoint(reference)["state_dict"].items()}, str(path))
    encoder = small_encoder(seed=1)
    assert sorted(encoder.load_pretrained(str(path))) == sorted(IMAGENET_HEAD)
    assert_same_weights(encoder, reference)


def test_load_pretrained_names_a_missing_key_and_leaves_the_encoder_alone(tmp_path):
    checkpoint = official_checkpoint(small_encoder(seed=0))
    del checkpoint["state_dict"]["backbone.block2.0.attn.spatial_gating_unit.conv1_2.weight"]
    path = tmp_path / "incomplete.pth"
    torch.save(checkpoint, path)
    encoder = small_encoder(seed=1)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing \['block2\.0\.attn\.spatial_gating_unit\.conv1_2\.weight'\]"):
        encoder.load_pretrained(str(path))
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_load_pretrained_refuses_what_is_not_a_file(tmp_path):
    encoder = small_encoder(seed=0)
    for path in (tmp_path, tmp_path / "mscan_t_20230227-119e8c9f.pth", "mscan_t"):
        with pytest.raises(ValueError, match="local file"):
            encoder.load_pretrained(str(path))


class _RunsACommand:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_load_pretrained_never_runs_code_from_a_pickle(tmp_path):
    marker = tmp_path / "pwned"
    reference = small_encoder(seed=0)

    # Next to the weights: the weights load and the payload stays inert.
    beside = official_checkpoint(reference)
    beside["meta"]["hook"] = _RunsACommand(marker)
    torch.save(beside, tmp_path / "beside.pth")
    encoder = small_encoder(seed=1)
    assert sorted(encoder.load_pretrained(str(tmp_path / "beside.pth"))) == sorted(IMAGENET_HEAD)
    assert_same_weights(encoder, reference)

    # In place of a weight, or in place of the whole checkpoint: refused, not run.
    inside = official_checkpoint(reference)
    inside["state_dict"]["backbone.norm4.weight"] = _RunsACommand(marker)
    torch.save(inside, tmp_path / "inside.pth")
    torch.save(_RunsACommand(marker), tmp_path / "whole.pth")
    for name, message in (
        ("inside.pth", r"inside.pth'?: 1 state dict entries are not tensors: \{'backbone\.norm4\.weight'"),
        ("whole.pth", "whole.pth'?: Not a state dict"),
    ):
        with pytest.raises(ValueError, match=message):
            encoder.load_pretrained(str(tmp_path / name))
    assert not marker.exists()


def test_from_pretrained_encoder_loads_mscan_weights(tmp_path):
    reference = small_encoder(seed=0)
    path = tmp_path / "mscan_t.pth"
    torch.save(official_checkpoint(reference), path)
    model = from_pretrained_encoder(str(path), "segnext-t-offset", num_labels=4, encoder_config=dict(SMALL_MSCAN))
    assert model.config.num_labels == 4 and model.config.decode_head == "lightham"
    assert_same_weights(model.offseg.encoder, reference)


@pytest.mark.parametrize("norm_eval", [True, False])
def test_norm_eval_keeps_the_batchnorm_statistics(norm_eval):
    torch.manual_seed(0)
    config = OffSegConfig.from_variant(
        "segnext-t-offset", num_labels=4, encoder_config={**SMALL_MSCAN, "norm_eval": norm_eval}
    )
    model = OffSegForSemanticSegmentation(config).train()
    norms = [m for m in model.offseg.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 13  # stem 2, three downsamplings, two per block (4 blocks)
    assert {m.training for m in norms} == {not norm_eval}
    assert model.offseg.decode_head.training and model.offseg.encoder.training
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    model(torch.randn(2, 3, 64, 96))
    changed = [
        not (torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var))
        for m, (mean, var) in zip(norms, before, strict=True)
    ]
    assert all(changed) if not norm_eval else not any(changed)


def test_fresh_model_follows_the_official_mscan_init():
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(OffSegConfig.from_variant("segnext-t-offset", num_labels=150))
    encoder = model.offseg.encoder

    def std_ratio(conv: torch.nn.Conv2d) -> float:
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
        return conv.weight.std().item() / math.sqrt(2.0 / fan_out)

    # Measured ratios: fc1 (256x32 1x1) 0.996, depthwise 3x3 (fan_out 9) 1.022, strip 1x21 (fan_out 21) 1.013.
    named = dict(encoder.named_modules())
    for name in ("block1.0.mlp.fc1", "block1.0.mlp.dwconv", "block3.0.attn.spatial_gating_unit.conv2_1"):
        assert abs(std_ratio(named[name]) - 1) < 0.1, name
    assert abs(named["block1.0.mlp.dwconv"].weight.std().item() - math.sqrt(2 / 9)) < 0.05  # not the fan-in rule
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        assert not conv.bias.any()
        if conv.weight.numel() >= 2000:  # enough samples for the std to be within a few percent
            assert abs(std_ratio(conv) - 1) < 0.1
    scales = [p for n, p in encoder.named_parameters() if "layer_scale" in n]
    assert len(scales) == 2 * sum(encoder.config.depths)
    assert all(torch.equal(s, torch.full_like(s, 0.01)) for s in scales)
