"""`output_class_attention`: the offset-learning classifier's Softmax_HW(W E^T) (the paper's Eq. 4-5)."""

import pytest
import torch

from offseg_hf.models.modeling_offseg import OffSegSemanticSegmenterOutput
from offseg_hf.models.offset_learning import OffsetLearning

from .conftest import tiny_config


def _model(**overrides):
    from offseg_hf import OffSegForSemanticSegmentation

    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(tiny_config(**overrides)).eval()
    if isinstance(model.classifier, OffsetLearning):
        with torch.no_grad():
            model.classifier.class_embeddings.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize(
    "branches", [(True, True), (True, False), (False, True), (False, False)], ids=["both", "cls", "feat", "none"]
)
def test_class_attention_is_softmax_over_positions_of_w_e_t(branches):
    class_offset, feature_offset = branches
    model = _model(class_offset=class_offset, feature_offset=feature_offset)
    pixel_values = torch.randn(2, 3, 72, 88)
    with torch.no_grad():
        plain = model(pixel_values)
        output = model(pixel_values, output_class_attention=True)
        embeddings = model.offseg(pixel_values).last_hidden_state  # E: (B, C, h, w)
    assert isinstance(output, OffSegSemanticSegmenterOutput)
    attention = output.class_attention
    batch, _, height, width = output.logits.shape
    assert attention.shape == (batch, model.config.num_labels, height, width)
    torch.testing.assert_close(attention.sum(dim=(2, 3)), torch.ones(batch, model.config.num_labels))
    coupled = torch.einsum("kc,bchw->bkhw", model.classifier.class_embeddings, embeddings)  # A = W E^T
    expected = coupled.flatten(2).softmax(dim=-1).view_as(coupled)
    torch.testing.assert_close(attention, expected, rtol=1e-5, atol=1e-7)
    # The flag changes nothing else, and without it there is no class attention.
    assert torch.equal(output.logits, plain.logits)
    assert plain.class_attention is None
    assert len(plain.to_tuple()) == 1


def test_class_attention_is_none_for_the_per_pixel_classifier():
    model = _model(classifier="per_pixel")
    with torch.no_grad():
        output = model(torch.randn(1, 3, 64, 64), output_class_attention=True)
    assert output.class_attention is None and output.logits.shape[1] == model.config.num_labels


def test_offset_learning_forward_keeps_its_single_output():
    torch.manual_seed(0)
    module = OffsetLearning(5, 8).eval()
    features = torch.randn(2, 8, 6, 7)
    scores = module(features)
    both = module(features, output_class_attention=True)
    assert isinstance(scores, torch.Tensor) and torch.equal(both[0], scores)
    assert both[1].shape == (2, 5, 6, 7)


def test_class_attention_in_the_tuple_output_and_with_gradients():
    model = _model().train()
    output = model(torch.randn(1, 3, 64, 64), output_class_attention=True, return_dict=False)
    logits, attention = output
    (logits.square().mean() + attention.square().mean()).backward()
    assert model.classifier.class_embeddings.grad is not None
