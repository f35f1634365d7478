"""transformers' SegformerModel (MiT) as OffSeg's backbone (offseg_hf/models/backbone_mit.py)."""

import pytest
import torch
from transformers import SegformerConfig, SegformerModel

from offseg_hf import OffSegForSemanticSegmentation
from offseg_hf.convert import from_pretrained_encoder
from offseg_hf.models.backbone_mit import MixTransformerEncoder

from .conftest import TINY_ENCODER, tiny_config


def test_encoder_layernorm_eps_follows_config():
    model = OffSegForSemanticSegmentation(tiny_config(encoder_config={**TINY_ENCODER, "layer_norm_eps": 1e-6}))
    eps = {m.eps for m in model.offseg.encoder.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-6}


def test_start_from_a_saved_transformers_mit_checkpoint(tmp_path):
    """A folder saved from transformers' SegformerModel (e.g. nvidia/mit-b0) loads into the encoder unchanged."""
    torch.manual_seed(1)
    mit = SegformerModel(SegformerConfig(**TINY_ENCODER)).eval()
    mit.save_pretrained(tmp_path)
    model = from_pretrained_encoder(
        str(tmp_path), "segformer-b0-offset", num_labels=4, decoder_hidden_size=32, encoder_config=TINY_ENCODER
    )
    ours, theirs = model.offseg.encoder.state_dict(), mit.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    with pytest.raises(ValueError, match="hidden_sizes"):
        from_pretrained_encoder(str(tmp_path), "segformer-b0-offset")


def test_features_are_transformers_hidden_states_with_the_official_eps():
    """The encoder is SegformerModel itself: same parameter names, and its stage outputs are the feature maps."""
    config = SegformerConfig(**TINY_ENCODER, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    encoder = MixTransformerEncoder(config).eval()
    reference = SegformerModel(config).eval()
    for module in reference.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6  # what mmseg builds; transformers' own default is 1e-5
    reference.load_state_dict(encoder.state_dict())
    images = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        ours = encoder(images).feature_maps
        theirs = reference(images, output_hidden_states=True).hidden_states
    assert len(ours) == 4
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
