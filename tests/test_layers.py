"""Shared blocks and declared initialisation (offseg_hf/models/layers.py), as the model's init applies them."""

import pytest
import torch
from torch.nn import functional as F

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation
from offseg_hf.models.layers import ConvNormAct, resize_and_project

from .conftest import tiny_config


def test_conv_norm_act_convs_get_mmcv_kaiming_init_through_the_model():
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(OffSegConfig.from_variant("segformer-b0-offset", num_labels=4))
    blocks = [m for m in model.modules() if isinstance(m, ConvNormAct)]
    assert len(blocks) == 5  # four stage projections and the fusion
    for block in blocks:
        weight = block.conv.weight
        expected_std = (2 / weight.shape[0]) ** 0.5  # Kaiming normal, fan_out = out channels x 1 x 1, ReLU gain
        assert abs(weight.std().item() / expected_std - 1) < 0.05


@pytest.mark.parametrize("classifier", ["offset", "per_pixel"])
def test_weights_a_checkpoint_lacks_get_the_official_init(classifier, tmp_path):
    """Loading with other labels (ignore_mismatched_sizes) starts the classifier from the official init, not from
    uninitialised memory: per-pixel normal(0, 0.01) with zero bias; offset learning's W truncated normal(0, 0.02)."""
    torch.manual_seed(0)
    OffSegForSemanticSegmentation(tiny_config(classifier=classifier, num_labels=6)).save_pretrained(tmp_path)
    loaded = OffSegForSemanticSegmentation.from_pretrained(tmp_path, num_labels=150, ignore_mismatched_sizes=True)
    if classifier == "per_pixel":
        weight, bias = loaded.classifier.classifier.weight, loaded.classifier.classifier.bias
        assert weight.shape[0] == 150 and 0.009 < weight.std() < 0.011 and not bias.any()
    else:
        weight = loaded.classifier.class_embeddings
        assert weight.shape[0] == 150 and 0.018 < weight.std() < 0.022 and weight.abs().max() < 0.1


def test_resize_and_project_equals_resize_then_concat_then_conv():
    """The blockwise projection (each map projected at its own resolution, then resized) is mmseg's
    resize-concat-conv1x1, up to float rounding, for odd sizes that do not halve exactly."""
    generator = torch.Generator().manual_seed(0)
    sizes, channels = [(23, 37), (12, 19), (6, 10)], [8, 12, 16]
    features = [torch.randn(2, c, h, w, generator=generator) for c, (h, w) in zip(channels, sizes, strict=True)]
    weight = torch.randn(20, sum(channels), 1, 1, generator=generator) / sum(channels) ** 0.5
    size = features[0].shape[-2:]
    resized = [
        f if f.shape[-2:] == size else F.interpolate(f, size, mode="bilinear", align_corners=False) for f in features
    ]
    expected = F.conv2d(torch.cat(resized, dim=1), weight)
    result = resize_and_project(features, weight, size)
    assert result.shape == (2, 20, 23, 37)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)
