import json

import pytest
import torch
from transformers import AutoConfig

from offseg_hf import (
    MASK2FORMER_PAPER_FIGURES,
    PAPER_FIGURES,
    OffSegConfig,
    OffSegForSemanticSegmentation,
    OffSegMask2FormerConfig,
    OffSegMask2FormerForSemanticSegmentation,
)
from offseg_hf.models.configuration_mask2former import MASK2FORMER_AUTO_MAP
from offseg_hf.presets import all_variant_names

# The paper's parameter counts at 150 classes (M): Table 4 (SegFormer with offset learning), Table 2 (OffSeg),
# Table 3 (SegNeXt with offset learning and the per-pixel SegNeXt).
PAPER_PARAMS_M = {
    "segnext-t-offset": 4.4,
    "segnext-s-offset": 14.1,
    "segnext-b-offset": 28.2,
    "segnext-t": 4.3,
    "segnext-s": 13.9,
    "segnext-b": 27.6,
    "offseg-t": 6.2,
    "offseg-b": 13.0,
    "offseg-l": 26.4,
    "segformer-b0-offset": 3.9,
    "segformer-b1-offset": 13.9,
    "segformer-b2-offset": 24.9,
    "segformer-b3-offset": 44.8,
    "segformer-b4-offset": 61.6,
    "segformer-b5-offset": 82.2,
}


# Table 5: Mask2Former (Swin-T) without and with offset learning; measured 47.441 M and 47.572 M.
MASK2FORMER_PAPER_PARAMS_M = {"mask2former-swin-t": 47.4, "mask2former-swin-t-offset": 47.6}


def meta_model(variant: str, **overrides):
    """Built on the meta device: shapes only, no memory or init time, same modules."""
    with torch.device("meta"):
        if variant in MASK2FORMER_PAPER_PARAMS_M:
            return OffSegMask2FormerForSemanticSegmentation(OffSegConfig.from_variant(variant, **overrides))
        return OffSegForSemanticSegmentation(OffSegConfig.from_variant(variant, **overrides))


def count_m(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMS_M) + sorted(MASK2FORMER_PAPER_PARAMS_M))
def test_parameter_count_matches_the_paper(variant):
    params_m = count_m(meta_model(variant, num_labels=150))
    expected = {**PAPER_PARAMS_M, **MASK2FORMER_PAPER_PARAMS_M}[variant]
    assert abs(params_m - expected) <= 0.1, params_m
    assert {**PAPER_FIGURES, **MASK2FORMER_PAPER_FIGURES}[variant]["params_m"] == expected


def test_mask2former_offset_learning_adds_two_projections_only():
    added = count_m(meta_model("mask2former-swin-t-offset")) - count_m(meta_model("mask2former-swin-t"))
    assert round(added * 1e6) == 2 * 256 * 256


def test_variant_names_list_every_preset_and_from_variant_builds_each():
    names = OffSegConfig.variant_names()
    assert names == all_variant_names() and len(names) == 17
    assert set(names) == set(PAPER_PARAMS_M) | set(MASK2FORMER_PAPER_PARAMS_M)
    assert isinstance(OffSegConfig.from_variant("mask2former-swin-t-offset", num_labels=7), OffSegMask2FormerConfig)
    assert OffSegConfig.from_variant("mask2former-swin-t-offset", num_labels=7).num_labels == 7
    with pytest.raises(ValueError) as info:
        OffSegConfig.from_variant("segformer-b9-offset")
    for name in names:
        assert name in str(info.value)


def test_an_unknown_variant_suggests_the_closest_names():
    with pytest.raises(ValueError, match=r"Unknown variant 'offseg-s'\. Did you mean offseg-\w( or offseg-\w)*\?"):
        OffSegConfig.from_variant("offseg-s")
    with pytest.raises(
        ValueError, match="Unknown variant 'mask2former-swin-s-offset'. Did you mean mask2former-swin-t"
    ):
        OffSegConfig.from_variant("mask2former-swin-s-offset")


def test_presets_hold_the_official_values():
    b0 = OffSegConfig.from_variant("segformer-b0-offset")
    b5 = OffSegConfig.from_variant("segformer-b5-offset")
    assert b0.num_labels == 150 and b0.decoder_hidden_size == 256 and b5.decoder_hidden_size == 256
    assert list(b0.encoder_config.hidden_sizes) == [32, 64, 160, 256]
    assert list(b5.encoder_config.depths) == [3, 6, 40, 3]
    assert b0.encoder_config.layer_norm_eps == 1e-6
    assert b0.classifier == "offset" and b0.decoder_max_pool and b0.semantic_loss_ignore_index == 255


def test_overrides_and_labels():
    config = OffSegConfig.from_variant(
        "segformer-b1-offset", id2label={0: "road", 1: "car", 2: "sky"}, encoder_config={"drop_path_rate": 0.0}
    )
    assert config.num_labels == 3 and config.label2id["sky"] == 2
    assert config.encoder_config.drop_path_rate == 0.0 and list(config.encoder_config.depths) == [2, 2, 2, 2]
    assert OffSegConfig.from_variant("segformer-b0-offset", classifier="per_pixel").classifier == "per_pixel"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"classifier": "softmax"}, "Unknown classifier"),
        ({"decode_head": "uper"}, "Unknown decode_head"),
        ({"num_labels": 1}, "num_labels"),
        ({"encoder_config": {"model_type": "timm_backbone", "backbone": "resnet50"}}, "Unsupported timm encoder"),
    ],
)
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        OffSegConfig.from_variant("segformer-b0-offset", **overrides)


def test_config_round_trip_through_autoconfig(tmp_path):
    config = OffSegConfig.from_variant("segformer-b2-offset", num_labels=19, feature_offset=False)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, OffSegConfig)
    assert loaded.num_labels == 19 and not loaded.feature_offset
    assert list(loaded.encoder_config.depths) == [3, 4, 6, 3] and loaded.encoder_config.layer_norm_eps == 1e-6


def test_offseg_presets_hold_the_official_values():
    expected = {
        "offseg-t": ("efficientformerv2_s1", 0.0, [32, 32, 64, 128], [32, 48, 120, 224]),
        "offseg-b": ("efficientformerv2_s2", 0.02, [32, 64, 128, 256], [32, 64, 144, 288]),
        "offseg-l": ("efficientformerv2_l", 0.1, [32, 64, 128, 256], [40, 80, 192, 384]),
    }
    for variant, (backbone, drop_path, stage_channels, in_channels) in expected.items():
        config = OffSegConfig.from_variant(variant)
        assert config.encoder_config.backbone == backbone and config.encoder_config.drop_path_rate == drop_path
        assert config.decode_head_config == {"stage_channels": stage_channels} and config.decoder_hidden_size == 256
        assert not config.decoder_max_pool and config.classifier == "offset"
        with torch.device("meta"):
            model = OffSegForSemanticSegmentation(config)
        assert model.offseg.encoder.channels == in_channels
        compressed = [f.hr_compressor.out_channels for f in model.offseg.decode_head.fusions]
        lr, expected_compressed = stage_channels[-1], []
        for hr in reversed(stage_channels[:-1]):
            expected_compressed.append((lr + hr) // 4)
            lr += hr
        assert compressed == expected_compressed


def test_mask2former_presets_hold_the_official_values():
    offset = OffSegConfig.from_variant("mask2former-swin-t-offset")
    baseline = OffSegConfig.from_variant("mask2former-swin-t")
    assert offset.offset_learning and not baseline.offset_learning
    for config in (offset, baseline):
        swin = config.backbone_config
        assert swin.model_type == "swin" and swin.embed_dim == 96 and list(swin.depths) == [2, 2, 6, 2]
        assert list(swin.num_heads) == [3, 6, 12, 24] and swin.window_size == 7 and swin.drop_path_rate == 0.3
        assert config.num_labels == 150 and config.num_queries == 100 and config.decoder_layers == 10
        assert config.hidden_dim == config.mask_feature_size == 256 and config.size_divisor == 32
        assert config.offset_initializer_range == 0.02
        assert (config.class_weight, config.mask_weight, config.dice_weight, config.no_object_weight) == (2, 5, 5, 0.1)
        assert (config.train_num_points, config.oversample_ratio, config.importance_sample_ratio) == (12544, 3, 0.75)


def test_mask2former_unknown_variant_lists_the_known_ones():
    assert OffSegConfig.variant_names()[-2:] == sorted(MASK2FORMER_PAPER_PARAMS_M)
    assert not hasattr(OffSegMask2FormerConfig, "from_variant")  # one door: OffSegConfig.from_variant
    with pytest.raises(
        ValueError, match="Unknown variant 'mask2former-swin-b'. Did you mean mask2former-swin-t"
    ) as info:
        OffSegConfig.from_variant("mask2former-swin-b")
    for name in MASK2FORMER_PAPER_PARAMS_M:
        assert name in str(info.value)


def test_mask2former_overrides_and_labels():
    labels = {0: "road", 1: "car", 2: "sky"}
    config = OffSegConfig.from_variant(
        "mask2former-swin-t-offset", id2label=labels, backbone_config={"depths": [1, 1, 1, 1], "drop_path_rate": 0.0}
    )
    assert config.num_labels == 3 and config.id2label == labels
    # The backbone override merges into the Swin-T preset.
    swin = config.backbone_config
    assert list(swin.depths) == [1, 1, 1, 1] and swin.drop_path_rate == 0.0
    assert swin.embed_dim == 96 and list(swin.num_heads) == [3, 6, 12, 24] and swin.window_size == 7
    cityscapes = OffSegConfig.from_variant("mask2former-swin-t", num_labels=19, size_divisor=64)
    assert cityscapes.num_labels == 19 and len(cityscapes.id2label) == 19 and cityscapes.size_divisor == 64
    assert not cityscapes.offset_learning and list(cityscapes.backbone_config.depths) == [2, 2, 6, 2]


def test_mask2former_id2label_gives_label2id():
    config = OffSegConfig.from_variant("mask2former-swin-t-offset", id2label={0: "road", 1: "sky"})
    assert config.label2id == {"road": 0, "sky": 1}


@pytest.mark.parametrize("variant", ["mask2former-swin-t-offset", "mask2former-swin-t"])
def test_mask2former_config_round_trip_and_auto_map(variant, tmp_path):
    config = OffSegConfig.from_variant(
        variant, num_labels=19, offset_initializer_range=0.05, backbone_config={"drop_path_rate": 0.2}
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "offseg_mask2former" and saved["auto_map"] == MASK2FORMER_AUTO_MAP
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, OffSegMask2FormerConfig)
    assert loaded.offset_learning == (variant == "mask2former-swin-t-offset")
    assert loaded.num_labels == 19 and loaded.offset_initializer_range == 0.05 and loaded.size_divisor == 32
    swin = loaded.backbone_config
    assert swin.model_type == "swin" and swin.embed_dim == 96 and list(swin.depths) == [2, 2, 6, 2]
    assert list(swin.num_heads) == [3, 6, 12, 24] and swin.window_size == 7 and swin.drop_path_rate == 0.2
    assert loaded.auto_map == MASK2FORMER_AUTO_MAP
