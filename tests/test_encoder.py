"""Every backbone meets the encoder contract of offseg_hf/models/encoder.py, and the model uses nothing else."""

import math

import pytest
import torch

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation
from offseg_hf.models.encoder import EncoderOutput
from offseg_hf.models.modeling_offseg import ENCODERS, build_encoder

from .conftest import tiny_config

CONFIGS = {
    "segformer": lambda: tiny_config(),
    "timm_backbone": lambda: OffSegConfig.from_variant("offseg-t", num_labels=4),
    "mscan": lambda: OffSegConfig.from_variant("segnext-t-offset", num_labels=4),
}


def test_every_registered_encoder_is_covered():
    assert set(ENCODERS) == set(CONFIGS)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_four_maps_at_strides_4_to_32_with_the_channels_known_from_the_config(model_type):
    config = CONFIGS[model_type]()
    encoder = build_encoder(config).eval()
    assert isinstance(encoder, ENCODERS[model_type])
    channels = list(encoder.channels)  # before any forward pass
    height, width = 70, 90
    with torch.no_grad():
        output = encoder(torch.randn(2, 3, height, width))
    assert isinstance(output, EncoderOutput) and output.attentions is None
    assert len(output.feature_maps) == 4
    for feature, stride, width_channels in zip(output.feature_maps, (4, 8, 16, 32), channels, strict=True):
        assert feature.shape == (2, width_channels, math.ceil(height / stride), math.ceil(width / stride))


def test_attentions_come_back_from_a_backbone_that_has_them():
    config = tiny_config()
    model = OffSegForSemanticSegmentation(config).eval()
    with pytest.raises(ValueError, match="needs eager attention, but the MiT encoder uses 'sdpa'"):
        model(torch.randn(1, 3, 64, 64), output_attentions=True)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 64), output_attentions=True)
    assert len(outputs.attentions) == sum(config.encoder_config.depths)
    first = outputs.attentions[0]  # stage 1: 16x16 queries over keys reduced 8x8 -> 2x2
    assert first.shape == (1, config.encoder_config.num_attention_heads[0], 256, 4)
    torch.testing.assert_close(first.sum(-1), torch.ones_like(first.sum(-1)))


@pytest.mark.parametrize(("model_type", "name"), [("timm_backbone", "EfficientFormerV2"), ("mscan", "MSCAN")])
def test_a_backbone_without_attention_maps_says_so(model_type, name):
    model = OffSegForSemanticSegmentation(CONFIGS[model_type]()).eval()
    assert not model.offseg.encoder.has_attentions
    with pytest.raises(ValueError, match=f"{name} backbone does not return attention maps"):
        model(torch.randn(1, 3, 64, 64), output_attentions=True)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).attentions is None


def test_unknown_encoder_type_is_named_with_the_supported_ones():
    config = tiny_config()
    config.encoder_config.model_type = "swin"
    with pytest.raises(
        ValueError, match=r"Unsupported encoder model type 'swin'; supported: segformer, timm_backbone, mscan"
    ):
        build_encoder(config)
