"""Conversion of official (mmseg) checkpoints. The official key lists below are written out from the official
code's module structure (mmseg MixVisionTransformer + SegformerHeadOffsetLearning; the OffSeg repo's
EfficientFormerV2 `*_feat` backbones + OffSegHead + FreqFusion; mmseg MSCAN + LightHamHead(OffsetLearning); mmseg
SwinTransformer + mmdet's Mask2FormerHead / the OffSeg repo's Mask2FormerHeadOffsetLearning), not derived from this
package's models."""

import json
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from offseg_hf import (
    MASK2FORMER_VARIANTS,
    VARIANTS,
    OffSegConfig,
    OffSegForSemanticSegmentation,
    OffSegMask2FormerForSemanticSegmentation,
)
from offseg_hf.convert.official import (
    convert_state_dict,
    load_official_checkpoint,
    load_swin_imagenet,
    main,
    official_key,
    read_official_checkpoint,
    to_official_state_dict,
)
from offseg_hf.presets import ALL_VARIANTS, has_offset_learning, model_for_variant, variant_family

from .conftest import randomize_attention_biases, randomize_norms

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
WB = ("weight", "bias")


def _keys(prefix, names):
    return [f"{prefix}.{name}" for name in names]


def official_segformer_keys(depths, num_stages=4, sr_ratios=(8, 4, 2, 1)):
    keys = []
    for i in range(num_stages):
        layer = f"backbone.layers.{i}"
        keys += _keys(f"{layer}.0.projection", WB) + _keys(f"{layer}.0.norm", WB)
        for j in range(depths[i]):
            block = f"{layer}.1.{j}"
            keys += _keys(f"{block}.norm1", WB) + _keys(f"{block}.norm2", WB)
            keys += [f"{block}.attn.attn.in_proj_weight", f"{block}.attn.attn.in_proj_bias"]
            keys += _keys(f"{block}.attn.attn.out_proj", WB)
            if sr_ratios[i] > 1:
                keys += _keys(f"{block}.attn.sr", WB) + _keys(f"{block}.attn.norm", WB)
            for index in (0, 1, 4):  # fc1, pe_conv, (activate, drop), fc2
                keys += _keys(f"{block}.ffn.layers.{index}", WB)
        keys += _keys(f"{layer}.2", WB)
    for i in range(num_stages):
        keys += [f"decode_head.convs.{i}.conv.weight"] + _keys(f"decode_head.convs.{i}.bn", BN)
    keys += ["decode_head.fusion_conv.conv.weight"] + _keys("decode_head.fusion_conv.bn", BN)
    return keys + official_offset_learning_keys()


def official_offset_learning_keys():
    keys = ["decode_head.offset_learning.cls_repr", "decode_head.offset_learning.cls_offset_proj.weight"]
    keys += ["decode_head.offset_learning.feat_offset_proj.weight"] + _keys("decode_head.offset_learning.mask_norm", WB)
    return keys + _keys("decode_head.conv_seg", WB)


# Official EfficientFormerV2 sizes: layers and vit_num (attention blocks at the end of stages 3 and 4).
EFFICIENTFORMER = {"offseg-t": ((3, 3, 9, 6), 2), "offseg-b": ((4, 4, 12, 8), 4), "offseg-l": ((5, 5, 15, 10), 6)}
ATTENTION_BUFFERS = ("attention_biases", "attention_bias_idxs", "attention_biases_seg", "attention_bias_idxs_seg")


def official_offseg_keys(variant):
    layers, vit_num = EFFICIENTFORMER[variant]
    keys = _keys("backbone.patch_embed.0", WB) + _keys("backbone.patch_embed.1", BN)
    keys += _keys("backbone.patch_embed.3", WB) + _keys("backbone.patch_embed.4", BN)
    network = 0
    for stage, depth in enumerate(layers):
        for j in range(depth):
            block = f"backbone.network.{network}.{j}"
            for conv, norm in (("fc1", "norm1"), ("mid", "mid_norm"), ("fc2", "norm2")):
                keys += _keys(f"{block}.mlp.{conv}", WB) + _keys(f"{block}.mlp.{norm}", BN)
            keys.append(f"{block}.layer_scale_2")
            if stage >= 2 and j > depth - 1 - vit_num:  # AttnFFN
                mixer = f"{block}.token_mixer"
                keys.append(f"{block}.layer_scale_1")
                for name in ("q", "k", "v", "v_local") + (("stride_conv",) if stage == 2 else ()):
                    keys += _keys(f"{mixer}.{name}.0", WB) + _keys(f"{mixer}.{name}.1", BN)
                keys += _keys(f"{mixer}.talking_head1", WB) + _keys(f"{mixer}.talking_head2", WB)
                keys += _keys(f"{mixer}.proj.1", WB) + _keys(f"{mixer}.proj.2", BN)
                keys += [f"{mixer}.{name}" for name in ATTENTION_BUFFERS]
        network += 1
        if stage == len(layers) - 1:
            break
        embedding = f"backbone.network.{network}"
        if stage >= 2:  # Embedding with asub: attention downsample + conv + bn
            attn = f"{embedding}.attn"
            keys += _keys(f"{attn}.q.local.0", WB) + _keys(f"{attn}.q.proj.0", WB) + _keys(f"{attn}.q.proj.1", BN)
            for name in ("k", "v", "v_local"):
                keys += _keys(f"{attn}.{name}.0", WB) + _keys(f"{attn}.{name}.1", BN)
            keys += _keys(f"{attn}.proj.1", WB) + _keys(f"{attn}.proj.2", BN)
            keys += [f"{attn}.{name}" for name in ATTENTION_BUFFERS]
            keys += _keys(f"{embedding}.conv", WB) + _keys(f"{embedding}.bn", BN)
        else:
            keys += _keys(f"{embedding}.proj", WB) + _keys(f"{embedding}.norm", BN)
        network += 1
    for i in range(4):
        keys += [f"decode_head.pre.{i}.conv.weight"] + _keys(f"decode_head.pre.{i}.gn", WB)
    for f in range(3):
        fusion = f"decode_head.freqfusions.{f}"
        for name in ("hr_channel_compressor", "lr_channel_compressor", "content_encoder", "content_encoder2"):
            keys += _keys(f"{fusion}.{name}", WB)
        keys += [f"{fusion}.hamming_lowpass", f"{fusion}.hamming_highpass", f"{fusion}.dysampler.init_pos"]
        for name in ("offset", "direct_scale", "hr_offset", "hr_direct_scale", "norm_hr", "norm_lr"):
            keys += _keys(f"{fusion}.dysampler.{name}", WB)
    keys += ["decode_head.align.conv.weight"] + _keys("decode_head.align.gn", WB)
    return keys + official_offset_learning_keys()


MSCA_CONVS = ("conv0", "conv0_1", "conv0_2", "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3")


def official_segnext_keys(variant):
    """mmseg's MSCAN (StemConv / OverlapPatchEmbed, MSCABlock, a LayerNorm per stage) and LightHamHead; the
    offset variants add Offset_Learning and keep the head's conv_seg, the baselines classify with conv_seg."""
    depths = VARIANTS[variant]["encoder_config"]["depths"]
    keys = []
    for i, depth in enumerate(depths, start=1):
        if i == 1:
            keys += _keys("backbone.patch_embed1.proj.0", WB) + _keys("backbone.patch_embed1.proj.1", BN)
            keys += _keys("backbone.patch_embed1.proj.3", WB) + _keys("backbone.patch_embed1.proj.4", BN)
        else:
            keys += _keys(f"backbone.patch_embed{i}.proj", WB) + _keys(f"backbone.patch_embed{i}.norm", BN)
        for j in range(depth):
            block = f"backbone.block{i}.{j}"
            keys += [f"{block}.layer_scale_1", f"{block}.layer_scale_2"]
            keys += _keys(f"{block}.norm1", BN) + _keys(f"{block}.attn.proj_1", WB)
            for conv in MSCA_CONVS:
                keys += _keys(f"{block}.attn.spatial_gating_unit.{conv}", WB)
            keys += _keys(f"{block}.attn.proj_2", WB) + _keys(f"{block}.norm2", BN)
            keys += _keys(f"{block}.mlp.fc1", WB) + _keys(f"{block}.mlp.dwconv", WB) + _keys(f"{block}.mlp.fc2", WB)
        keys += _keys(f"backbone.norm{i}", WB)
    keys += ["decode_head.squeeze.conv.weight"] + _keys("decode_head.squeeze.gn", WB)
    keys += _keys("decode_head.hamburger.ham_in.conv", WB)
    keys += ["decode_head.hamburger.ham_out.conv.weight"] + _keys("decode_head.hamburger.ham_out.gn", WB)
    keys += ["decode_head.align.conv.weight"] + _keys("decode_head.align.gn", WB)
    if VARIANTS[variant]["classifier"] == "offset":
        return keys + official_offset_learning_keys()
    return keys + _keys("decode_head.conv_seg", WB)


def official_mask2former_keys(offset_learning, depths=(2, 2, 6, 2), encoder_layers=6, decoder_layers=9):
    """mmseg's SwinTransformer (PatchEmbed; per stage SwinBlocks of ShiftWindowMSA/WindowMSA and an FFN, then a
    PatchMerging but after the last; a LayerNorm `norm{i}` per output stage) and mmdet's Mask2FormerHead
    (MSDeformAttnPixelDecoder on the 3 coarsest levels plus one FPN level, Mask2FormerTransformerDecoder, query and
    level embeddings, class and mask predictors); the offset variant's Mask2FormerHeadOffsetLearning adds
    Offset_Learning_Mask. `decoder_layers` counts the official decoder layers (transformers' is one more)."""
    keys = _keys("backbone.patch_embed.projection", WB) + _keys("backbone.patch_embed.norm", WB)
    for i, depth in enumerate(depths):
        for j in range(depth):
            block, attn = f"backbone.stages.{i}.blocks.{j}", f"backbone.stages.{i}.blocks.{j}.attn.w_msa"
            keys += _keys(f"{block}.norm1", WB)
            keys += [f"{attn}.relative_position_bias_table", f"{attn}.relative_position_index"]
            keys += _keys(f"{attn}.qkv", WB) + _keys(f"{attn}.proj", WB) + _keys(f"{block}.norm2", WB)
            keys += _keys(f"{block}.ffn.layers.0.0", WB) + _keys(f"{block}.ffn.layers.1", WB)
        if i < len(depths) - 1:
            downsample = f"backbone.stages.{i}.downsample"
            keys += _keys(f"{downsample}.norm", WB) + [f"{downsample}.reduction.weight"]
    for i in range(len(depths)):
        keys += _keys(f"backbone.norm{i}", WB)
    decoder = "decode_head.pixel_decoder"
    for i in range(3):  # input_convs: the three coarsest levels, coarsest first
        keys += _keys(f"{decoder}.input_convs.{i}.conv", WB) + _keys(f"{decoder}.input_convs.{i}.gn", WB)
    for i in range(encoder_layers):
        layer = f"{decoder}.encoder.layers.{i}"
        for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            keys += _keys(f"{layer}.self_attn.{name}", WB)
        keys += _keys(f"{layer}.ffn.layers.0.0", WB) + _keys(f"{layer}.ffn.layers.1", WB)
        keys += _keys(f"{layer}.norms.0", WB) + _keys(f"{layer}.norms.1", WB)
    keys.append(f"{decoder}.level_encoding.weight")
    for conv in ("lateral_convs.0", "output_convs.0"):  # ConvModule with GroupNorm: no conv bias
        keys += [f"{decoder}.{conv}.conv.weight"] + _keys(f"{decoder}.{conv}.gn", WB)
    keys += _keys(f"{decoder}.mask_feature", WB)
    for i in range(decoder_layers):
        layer = f"decode_head.transformer_decoder.layers.{i}"
        for attention in ("self_attn", "cross_attn"):  # mmcv's MultiheadAttention wrapping nn.MultiheadAttention
            keys += [f"{layer}.{attention}.attn.in_proj_weight", f"{layer}.{attention}.attn.in_proj_bias"]
            keys += _keys(f"{layer}.{attention}.attn.out_proj", WB)
        keys += _keys(f"{layer}.ffn.layers.0.0", WB) + _keys(f"{layer}.ffn.layers.1", WB)
        for norm in range(3):
            keys += _keys(f"{layer}.norms.{norm}", WB)
    keys += _keys("decode_head.transformer_decoder.post_norm", WB)
    keys += ["decode_head.query_embed.weight", "decode_head.query_feat.weight", "decode_head.level_embed.weight"]
    keys += _keys("decode_head.cls_embed", WB)
    for index in (0, 2, 4):  # Linear, ReLU, Linear, ReLU, Linear
        keys += _keys(f"decode_head.mask_embed.{index}", WB)
    if offset_learning:
        keys += [f"decode_head.offset_learning.{name}_offset_proj.weight" for name in ("cls", "feat")]
    return keys


# Keys of our Mask2Former with no official counterpart: the loss's class weights and SwinModel's final norm.
MASK2FORMER_OURS_ONLY = {
    "criterion.empty_weight",
    "model.pixel_level_module.encoder.swin.layernorm.weight",
    "model.pixel_level_module.encoder.swin.layernorm.bias",
}


def ours_only(variant):
    return MASK2FORMER_OURS_ONLY if variant in MASK2FORMER_VARIANTS else set()


def official_keys(variant):
    if variant in MASK2FORMER_VARIANTS:
        return official_mask2former_keys(has_offset_learning(variant))
    if variant.startswith("offseg"):
        return official_offseg_keys(variant)
    if variant.startswith("segnext"):
        return official_segnext_keys(variant)
    return official_segformer_keys(VARIANTS[variant]["encoder_config"]["depths"])


IGNORED_EXAMPLES = ("hamming_", "init_pos", ".attention_biases", "attention_bias_idxs", "relative_position_index")


def is_ignored(key, variant):
    if "conv_seg" in key:  # unused next to offset learning, the classifier of a per-pixel baseline
        return has_offset_learning(variant)
    return any(part in key for part in IGNORED_EXAMPLES) and not key.endswith("attention_biases_seg")


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_official_key_set_maps_onto_ours_exactly(variant):
    with torch.device("meta"):
        model = model_for_variant(variant, num_labels=150)
    ours = model.state_dict()
    keys = official_keys(variant)
    assert len(keys) == len(set(keys))
    official = to_official_state_dict(ours, variant, keys)
    # Every official key is produced from ours, except the ones the converter ignores on purpose.
    assert set(official) == {k for k in keys if not is_ignored(k, variant)}
    back = convert_state_dict(official, variant)
    assert set(back) == set(ours) - ours_only(variant)
    for key in back:
        assert back[key].shape == ours[key].shape, key


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_official_key_names_every_parameter_and_buffer_by_its_official_key(variant):
    with torch.device("meta"):
        model = model_for_variant(variant, num_labels=150)
    keys = official_keys(variant)
    expected = {k for k in keys if not is_ignored(k, variant)}
    family = variant_family(variant)
    names = {key: official_key(key, family) for key in model.state_dict()}
    assert set(dict(model.named_parameters())) <= set(names)
    assert {key: names[key] for key in ours_only(variant)} == dict.fromkeys(ours_only(variant))
    names = {key: name for key, name in names.items() if key not in ours_only(variant)}
    assert {key: name for key, name in names.items() if name not in expected} == {}
    assert set(names.values()) == expected  # every official key is produced, none of the ignored ones
    assert all(official_key(key, variant) == name for key, name in names.items())
    with_list = to_official_state_dict(model.state_dict(), variant, keys)
    without_list = to_official_state_dict(model.state_dict(), variant)
    assert list(with_list) == [k for k in keys if k in without_list] and with_list.keys() == without_list.keys()
    for key, value in with_list.items():
        assert without_list[key].shape == value.shape, key


@pytest.mark.parametrize(
    ("family", "ours", "official"),
    [
        ("segformer", "offseg.encoder.stages.0.blocks.1.layernorm_before.weight", "backbone.layers.0.1.1.norm1.weight"),
        (
            "segformer",
            "offseg.encoder.stages.2.blocks.0.attention.k_proj.bias",
            "backbone.layers.2.1.0.attn.attn.in_proj_bias",
        ),
        ("segformer", "offseg.encoder.stages.1.blocks.0.mlp.fc2.weight", "backbone.layers.1.1.0.ffn.layers.4.weight"),
        ("segformer-b2-offset", "classifier.class_embeddings", "decode_head.offset_learning.cls_repr"),
        ("offseg", "offseg.encoder.stages.2.blocks.3.ls1.gamma", "backbone.network.4.3.layer_scale_1"),
        ("offseg", "offseg.encoder.stages.1.downsample.conv.bn.running_var", "backbone.network.1.norm.running_var"),
        ("offseg", "offseg.encoder.stages.2.downsample.conv.conv.weight", "backbone.network.3.proj.weight"),
        ("offseg", "offseg.encoder.stages.3.downsample.conv.bn.weight", "backbone.network.5.bn.weight"),
        (
            "offseg-t",
            "offseg.encoder.stages.3.downsample.attn.attention_biases",
            "backbone.network.5.attn.attention_biases_seg",
        ),
        (
            "offseg",
            "offseg.decode_head.fusions.2.resampler.hr_offset.bias",
            "decode_head.freqfusions.2.dysampler.hr_offset.bias",
        ),
        ("offseg", "offseg.encoder.stages.0.blocks.0.layernorm_before.weight", None),
        ("segformer", "offseg.encoder.stem.conv1.conv.weight", None),
        (
            "lightham",
            "offseg.encoder.block3.4.attn.spatial_gating_unit.conv2_1.weight",
            "backbone.block3.4.attn.spatial_gating_unit.conv2_1.weight",
        ),
        ("segnext-b", "offseg.encoder.patch_embed1.proj.4.running_var", "backbone.patch_embed1.proj.4.running_var"),
        ("lightham", "offseg.decode_head.hamburger.ham_in.bias", "decode_head.hamburger.ham_in.conv.bias"),
        ("lightham", "offseg.decode_head.hamburger.ham_out.norm.weight", "decode_head.hamburger.ham_out.gn.weight"),
        ("lightham", "offseg.decode_head.squeeze.norm.bias", "decode_head.squeeze.gn.bias"),
        ("segnext-t", "classifier.classifier.weight", "decode_head.conv_seg.weight"),
        ("lightham", "offseg.encoder.block5.0.norm1.weight", None),
        ("lightham", "offseg.decode_head.hamburger.nmf.eval_bases", None),
        ("segformer", "offseg.encoder.stages.0.blocks.1.layernorm_before.weight.extra", None),
        (
            "mask2former",
            "model.pixel_level_module.encoder.swin.encoder.layers.2.blocks.5.attention.k_proj.bias",
            "backbone.stages.2.blocks.5.attn.w_msa.qkv.bias",
        ),
        (
            "mask2former-swin-t",
            "model.pixel_level_module.encoder.swin.encoder.layers.1.downsample.reduction.weight",
            "backbone.stages.1.downsample.reduction.weight",
        ),
        ("mask2former", "model.pixel_level_module.encoder.hidden_states_norms.stage1.bias", "backbone.norm0.bias"),
        (
            "mask2former",
            "model.pixel_level_module.decoder.input_projections.2.1.weight",
            "decode_head.pixel_decoder.input_convs.2.gn.weight",
        ),
        (
            "mask2former",
            "model.pixel_level_module.decoder.level_embed",
            "decode_head.pixel_decoder.level_encoding.weight",
        ),
        (
            "mask2former",
            "model.pixel_level_module.decoder.adapter_1.1.bias",
            "decode_head.pixel_decoder.lateral_convs.0.gn.bias",
        ),
        (
            "mask2former",
            "model.transformer_module.decoder.layers.8.self_attn.v_proj.weight",
            "decode_head.transformer_decoder.layers.8.self_attn.attn.in_proj_weight",
        ),
        (
            "mask2former",
            "model.transformer_module.decoder.layers.0.cross_attn_layer_norm.weight",
            "decode_head.transformer_decoder.layers.0.norms.0.weight",
        ),
        (
            "mask2former",
            "model.transformer_module.decoder.mask_predictor.mask_embedder.1.0.weight",
            "decode_head.mask_embed.2.weight",
        ),
        (
            "mask2former-swin-t-offset",
            "model.transformer_module.decoder.mask_predictor.offset_learning.feature_offset_proj.weight",
            "decode_head.offset_learning.feat_offset_proj.weight",
        ),
        ("mask2former", "model.transformer_module.queries_embedder.weight", "decode_head.query_embed.weight"),
        ("mask2former", "class_predictor.bias", "decode_head.cls_embed.bias"),
        ("mask2former", "model.pixel_level_module.encoder.swin.layernorm.weight", None),
        ("mask2former", "criterion.empty_weight", None),
        ("mask2former", "model.pixel_level_module.decoder.adapter_2.1.bias", None),
    ],
)
def test_official_key_examples(family, ours, official):
    assert official_key(ours, family) == official


def test_official_key_rejects_unknown_families():
    with pytest.raises(ValueError, match="Unknown model family"):
        official_key("classifier.class_embeddings", "upernet")


@pytest.mark.parametrize("variant", ["segformer-b0-offset", "offseg-t"])
def test_to_official_state_dict_without_key_list_equals_the_listed_one(variant):
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(OffSegConfig.from_variant(variant, num_labels=4))
    randomize_norms(model)
    randomize_attention_biases(model)
    ours = model.state_dict()
    with_list = to_official_state_dict(ours, variant, official_keys(variant))
    without_list = to_official_state_dict(ours, variant)
    assert with_list.keys() == without_list.keys()
    for key, value in with_list.items():
        assert torch.equal(without_list[key], value), key
    with pytest.raises(ValueError, match="no official name"):
        to_official_state_dict({**ours, "offseg.extra.weight": torch.zeros(1)}, variant)


def test_to_official_state_dict_without_key_list_packs_qkv_in_order():
    torch.manual_seed(0)
    ours = OffSegForSemanticSegmentation(OffSegConfig.from_variant("segformer-b0-offset", num_labels=4)).state_dict()
    packed = to_official_state_dict(ours, "segformer-b0-offset")["backbone.layers.0.1.0.attn.attn.in_proj_weight"]
    prefix = "offseg.encoder.stages.0.blocks.0.attention"
    assert torch.equal(packed, torch.cat([ours[f"{prefix}.{name}_proj.weight"] for name in "qkv"]))


@pytest.mark.parametrize("variant", ["segformer-b0-offset", "offseg-t", "segnext-t-offset", "segnext-t"])
def test_round_trip_through_official_names_is_identical(variant, tmp_path):
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(OffSegConfig.from_variant(variant, num_labels=7)).eval()
    randomize_norms(model)
    randomize_attention_biases(model)
    ours = model.state_dict()
    official = to_official_state_dict(ours, variant, official_keys(variant))
    if VARIANTS[variant]["classifier"] == "offset":
        # Add the keys the converter must ignore, as a real checkpoint has them.
        assert "decode_head.conv_seg.weight" not in official
        official["decode_head.conv_seg.weight"] = torch.randn(7, 256, 1, 1)
        official["decode_head.conv_seg.bias"] = torch.zeros(7)
    else:
        assert torch.equal(official["decode_head.conv_seg.weight"], ours["classifier.classifier.weight"])
    back = convert_state_dict(official, variant)
    assert back.keys() == ours.keys()
    for key in ours:
        assert torch.equal(back[key], ours[key]), key

    path = tmp_path / "official.pth"
    torch.save({"state_dict": official, "meta": {}}, path)
    loaded = load_official_checkpoint(str(path), variant)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images).logits, model(images).logits)

    main(["--checkpoint", str(path), "--variant", variant, "--output_dir", str(tmp_path / "out")])
    reloaded = OffSegForSemanticSegmentation.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        # Same weights; oneDNN convolutions may sum in another order for differently aligned buffers (~1e-6).
        torch.testing.assert_close(reloaded(images).logits, model(images).logits, rtol=0, atol=1e-5)


# A small Mask2Former-offset (Swin with a shifted block in stage 3, one pixel-decoder layer, two decoder layers).
SMALL_MASK2FORMER = {
    "backbone_config": {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8]},
    "encoder_layers": 1,
    "decoder_layers": 3,  # transformers counts the prediction before the first layer
    "hidden_dim": 64,
    "feature_size": 64,
    "mask_feature_size": 64,
    "dim_feedforward": 128,
    "encoder_feedforward_dim": 128,
    "num_queries": 10,
}


def small_mask2former(seed=0, variant="mask2former-swin-t-offset", num_labels=7):
    torch.manual_seed(seed)
    model = model_for_variant(variant, num_labels=num_labels, **SMALL_MASK2FORMER).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every tensor away from its initial value (zero bias tables, unit norms ...)
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def small_official_keys(offset_learning=True):
    return official_mask2former_keys(offset_learning, depths=(1, 1, 2, 1), encoder_layers=1, decoder_layers=2)


def test_mask2former_round_trip_through_official_names_is_identical(tmp_path):
    variant = "mask2former-swin-t-offset"
    model = small_mask2former()
    ours = model.state_dict()
    keys = small_official_keys()
    official = to_official_state_dict(ours, variant, keys)
    assert list(official) == [key for key in keys if "relative_position_index" not in key]
    assert official.keys() == to_official_state_dict(ours, variant).keys()
    for key in keys:  # the computed buffers a real checkpoint has, which the converter ignores
        if key.endswith("relative_position_index"):
            official[key] = torch.zeros(49, 49, dtype=torch.long)
    back = convert_state_dict(official, variant)
    assert back.keys() == ours.keys() - MASK2FORMER_OURS_ONLY
    for key in back:
        assert torch.equal(back[key], ours[key]), key

    path = tmp_path / "official.pth"
    torch.save({"state_dict": official, "meta": {"dataset_meta": {"classes": [f"c{i}" for i in range(7)]}}}, path)
    loaded = load_official_checkpoint(str(path), variant, **SMALL_MASK2FORMER)
    assert isinstance(loaded, OffSegMask2FormerForSemanticSegmentation) and loaded.config.id2label[6] == "c6"
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(images)
        assert torch.equal(loaded(images).logits, expected.logits)

    overrides = json.dumps(SMALL_MASK2FORMER)
    main(
        ["--checkpoint", str(path), "--variant", variant, "--output_dir", str(tmp_path / "out")]
        + ["--config_overrides", overrides]
    )
    reloaded = OffSegMask2FormerForSemanticSegmentation.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        output = reloaded(images)
    for name in ("logits", "class_queries_logits", "masks_queries_logits"):
        torch.testing.assert_close(getattr(output, name), getattr(expected, name), rtol=0, atol=1e-5)


def test_mask2former_patch_merging_takes_mmcv_unfold_order():
    """mmseg's PatchMerging: nn.Unfold(2, stride 2) on (B, C, H, W) -> LayerNorm(4C) -> Linear(4C, 2C, no bias), here
    with the official-layout tensors `to_official_state_dict` writes; it must equal transformers' SwinPatchMerging."""
    model = small_mask2former()
    official = to_official_state_dict(model.state_dict(), "mask2former-swin-t-offset")
    merging = model.model.pixel_level_module.encoder.swin.encoder.layers[1].downsample
    height, width, channels = 6, 10, 64
    tokens = torch.randn(2, height * width, channels)
    prefix = "backbone.stages.1.downsample"
    unfolded = F.unfold(tokens.transpose(1, 2).reshape(2, channels, height, width), kernel_size=2, stride=2)
    normed = F.layer_norm(
        unfolded.transpose(1, 2), (4 * channels,), official[f"{prefix}.norm.weight"], official[f"{prefix}.norm.bias"]
    )
    with torch.no_grad():
        torch.testing.assert_close(
            merging(tokens, (height, width)), F.linear(normed, official[f"{prefix}.reduction.weight"])
        )
        assert not torch.equal(official[f"{prefix}.norm.weight"], merging.norm.weight)  # not the identity


def test_mask2former_checkpoint_without_offset_module_is_refused_for_the_offset_variant():
    baseline = small_mask2former(variant="mask2former-swin-t")
    official = to_official_state_dict(baseline.state_dict(), "mask2former-swin-t")
    assert not any("offset_learning" in key for key in official)
    with pytest.raises(ValueError, match="has no offset module, but 'mask2former-swin-t-offset' is built with it"):
        convert_state_dict(official, "mask2former-swin-t-offset")
    converted = convert_state_dict(official, "mask2former-swin-t-offset", offset_learning=False)
    assert converted.keys() == baseline.state_dict().keys() - MASK2FORMER_OURS_ONLY
    offset = to_official_state_dict(small_mask2former().state_dict(), "mask2former-swin-t-offset")
    with pytest.raises(ValueError, match="convert it as 'mask2former-swin-t-offset'"):
        convert_state_dict(offset, "mask2former-swin-t")


def imagenet_swin_checkpoint(model):
    """What mmseg's swin2mmseg.py makes of the Swin release: the backbone's keys without `backbone.` and without the
    per-stage output norms, plus the classifier's final `norm`, the relative-position indices and the shifted
    blocks' attention masks (buffers), and an ImageNet head (which swin2mmseg drops; other copies keep it)."""
    official = to_official_state_dict(model.state_dict(), "mask2former-swin-t-offset")
    state_dict = {}
    for key, value in official.items():
        if key.startswith("backbone.") and not key.startswith("backbone.norm"):
            state_dict[key.removeprefix("backbone.")] = value
            if key.endswith("attn.w_msa.proj.bias"):
                block = key.removeprefix("backbone.").removesuffix(".attn.w_msa.proj.bias")
                state_dict[f"{block}.attn.w_msa.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
                if block.endswith("1"):
                    state_dict[f"{block}.attn_mask"] = torch.zeros(4, 49, 49)
    state_dict["norm.weight"], state_dict["norm.bias"] = torch.rand(256) + 0.5, torch.randn(256)
    state_dict["head.weight"], state_dict["head.bias"] = torch.randn(1000, 256), torch.zeros(1000)
    return state_dict


def test_load_swin_imagenet_fills_the_backbone_from_mmseg_format_weights(tmp_path):
    source = small_mask2former(seed=1)
    state_dict = imagenet_swin_checkpoint(source)
    torch.save({"state_dict": state_dict}, tmp_path / "swin.pth")
    model = small_mask2former(seed=2)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    unused = load_swin_imagenet(model, str(tmp_path / "swin.pth"))
    assert sorted(unused) == sorted(k for k in state_dict if k.startswith("head.") or "attn_mask" in k or "index" in k)
    encoder = "model.pixel_level_module.encoder."
    for key, value in model.state_dict().items():
        if key.startswith(f"{encoder}hidden_states_norms."):  # not in ImageNet checkpoints: kept, as in mmseg
            assert torch.equal(value, before[key]), key
        elif key.startswith(f"{encoder}swin.layernorm."):  # the classifier's final norm, unused by the backbone
            assert torch.equal(value, state_dict[f"norm.{key.rsplit('.', 1)[1]}"]), key
        elif key.startswith(encoder):
            assert torch.equal(value, source.state_dict()[key]), key
        else:  # the rest of the model is untouched
            assert torch.equal(value, before[key]), key

    for name, broken in [
        ("extra", {**state_dict, "stages.0.blocks.0.extra.weight": torch.zeros(1)}),
        ("missing", {k: v for k, v in state_dict.items() if "stages.3.blocks.0.norm2" not in k}),
    ]:
        torch.save(broken, tmp_path / f"{name}.pth")
        with pytest.raises(
            ValueError, match="extra.weight" if name == "extra" else "layers.3.blocks.0.layernorm_after"
        ):
            load_swin_imagenet(model, str(tmp_path / f"{name}.pth"))


def test_load_swin_imagenet_takes_a_transformers_swin_folder(tmp_path):
    from transformers import SwinConfig, SwinForImageClassification

    model = small_mask2former(seed=2)
    backbone_config = model.config.backbone_config.to_dict()
    config = SwinConfig(**{k: backbone_config[k] for k in ("embed_dim", "depths", "num_heads", "window_size")})
    torch.manual_seed(3)
    classifier = SwinForImageClassification(SwinConfig(**config.to_dict(), num_labels=5))
    classifier.save_pretrained(tmp_path / "swin")
    assert load_swin_imagenet(model, str(tmp_path / "swin")) == ["classifier.bias", "classifier.weight"]
    ours = model.model.pixel_level_module.encoder.swin.state_dict()
    for key, value in classifier.swin.state_dict().items():
        assert torch.equal(ours[key], value), key
    SwinForImageClassification(SwinConfig(**{**config.to_dict(), "window_size": 4})).save_pretrained(tmp_path / "w4")
    with pytest.raises(ValueError, match="another Swin"):
        load_swin_imagenet(model, str(tmp_path / "w4"))


def test_a_checkpoint_with_the_other_classifier_is_refused_with_the_variant_to_use():
    torch.manual_seed(0)
    baseline = OffSegForSemanticSegmentation(OffSegConfig.from_variant("segnext-t", num_labels=5))
    official = to_official_state_dict(baseline.state_dict(), "segnext-t")
    with pytest.raises(ValueError, match="has a per-pixel classifier .conv_seg., but 'segnext-t-offset' is built"):
        convert_state_dict(official, "segnext-t-offset")
    converted = convert_state_dict(official, "segnext-t-offset", classifier="per_pixel")
    assert torch.equal(converted["classifier.classifier.bias"], baseline.state_dict()["classifier.classifier.bias"])
    offset = OffSegForSemanticSegmentation(OffSegConfig.from_variant("segnext-t-offset", num_labels=5))
    with pytest.raises(ValueError, match="has offset learning, but 'segnext-t' is built with a per-pixel"):
        convert_state_dict(to_official_state_dict(offset.state_dict(), "segnext-t-offset"), "segnext-t")


def test_unknown_and_missing_keys_are_listed():
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(OffSegConfig.from_variant("segformer-b0-offset", num_labels=3))
    official = to_official_state_dict(model.state_dict(), "segformer-b0-offset", official_keys("segformer-b0-offset"))
    with pytest.raises(ValueError, match="backbone.extra.weight"):
        convert_state_dict({**official, "backbone.extra.weight": torch.zeros(1)}, "segformer-b0-offset")
    with pytest.raises(ValueError, match="Unknown OffSeg variant"):
        convert_state_dict(official, "segformer-b9-offset")


FAKE_MMENGINE = "absent_mmengine_for_offseg_tests"


def fake_mmengine(marker) -> types.ModuleType:
    """A stand-in for mmengine with the kinds of objects its runner pickles next to the weights: message hub
    buffers (methods pickled as `getattr(cls, name)`), dict subclasses (configs) and objects rebuilt by calling
    their class (hooks). Their own code writes `marker` wherever a plain unpickler would run it: `__setstate__`,
    `__setitem__`, `__init__`."""
    module = types.ModuleType(FAKE_MMENGINE)

    class HistoryBuffer:
        def __init__(self):
            self._log_history = np.array([1.5, 0.5])
            self.statistics_methods = {"min": HistoryBuffer.min}

        def min(self):
            return self._log_history.min()

        def __setstate__(self, state):
            open(marker, "w").close()

    class ConfigDict(dict):
        def __setitem__(self, key, value):
            open(marker, "w").close()

    class Hook:
        def __init__(self, name):
            open(marker, "w").close()

        def __reduce__(self):
            return Hook, ("checkpoint",)

    for cls in (HistoryBuffer, ConfigDict, Hook):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    HistoryBuffer.min.__module__, HistoryBuffer.min.__qualname__ = module.__name__, "HistoryBuffer.min"
    return module


def runner_checkpoint(module, state_dict, class_names) -> dict:
    """What mmengine's runner saves: the weights, numpy values and objects of `module` (see `fake_mmengine`)."""
    config = module.ConfigDict()
    dict.__setitem__(config, "crop_size", (512, 512))  # not the overridden __setitem__, which writes the marker
    palette = [[128, 64, 128], [0, 0, 142], [70, 130, 180]][: len(class_names)]
    meta = {
        "dataset_meta": {"classes": tuple(class_names), "palette": palette},
        "mmengine_version": "0.10.4",
        "seed": np.int64(1234),
        "experiment_name": "segformer_b0_offset_20250101",
        "time": np.float64(0.25),
        "iter_times": np.array([0.5, 0.25], dtype=np.float32),
        "cfg": config,
    }
    return {
        "meta": meta,
        "state_dict": OrderedDict(state_dict),
        "message_hub": {"log_scalars": {"train/loss": module.HistoryBuffer()}, "runtime_info": {"iter": 160000}},
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
            "param_groups": [{"lr": 6e-5, "betas": (0.9, 0.999), "params": [0]}],
        },
        "hooks": [object.__new__(module.Hook)],  # without running __init__
    }


def test_mmengine_checkpoints_load_without_mmengine_and_keep_their_class_names(tmp_path):
    variant = "segformer-b0-offset"
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(OffSegConfig.from_variant(variant, num_labels=3)).eval()
    official = to_official_state_dict(model.state_dict(), variant, official_keys(variant))
    path, marker = tmp_path / "iter_160000.pth", tmp_path / "ran"
    module = fake_mmengine(marker)
    sys.modules[module.__name__] = module  # importable while saving, as on a machine with mmengine
    try:
        torch.save(runner_checkpoint(module, official, ["road", "car", "sky"]), path)
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(ModuleNotFoundError):
        torch.load(path, weights_only=False)  # what a plain load does without the package
    state_dict, class_names = read_official_checkpoint(str(path))
    assert class_names == ["road", "car", "sky"] and state_dict.keys() == official.keys()
    loaded = load_official_checkpoint(str(path), variant)
    assert loaded.config.id2label == {0: "road", 1: "car", 2: "sky"}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not marker.exists()


@pytest.mark.parametrize("odd", ["sparse", "meta", "quantized"])
def test_state_dicts_hold_only_dense_cpu_tensors(tmp_path, odd):
    """torch's restricted reader also rebuilds these; no checkpoint's weights are any of them."""
    tensor = {
        "sparse": lambda: torch.eye(2).to_sparse(),
        "meta": lambda: torch.empty(2, device="meta"),
        "quantized": lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8),
    }[odd]()
    torch.save({"state_dict": {"w": torch.zeros(2), "odd": tensor}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"not dense CPU tensors: \['odd'\]"):
        read_official_checkpoint(str(tmp_path / "odd.pth"))


def test_class_names_default_to_ade20k_for_150_classes_and_can_be_given(tmp_path):
    variant = "segformer-b0-offset"
    with torch.device("meta"):
        ours = OffSegForSemanticSegmentation(OffSegConfig.from_variant(variant, num_labels=150)).state_dict()
    official = {
        k: torch.zeros(v.shape) for k, v in to_official_state_dict(ours, variant, official_keys(variant)).items()
    }
    torch.save({"state_dict": official}, tmp_path / "plain.pth")  # no meta: a stripped checkpoint
    assert load_official_checkpoint(str(tmp_path / "plain.pth"), variant).config.id2label[0] == "wall"
    names = {i: f"class {i}" for i in range(150)}
    given = load_official_checkpoint(str(tmp_path / "plain.pth"), variant, id2label=names)
    assert given.config.id2label[149] == "class 149"


def test_help_names_its_own_command_and_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m offseg_hf.convert")
    options = text[text.index("options:") :]
    for flag in ("--checkpoint", "--variant", "--output_dir", "--id2label", "--config_overrides"):
        # each flag's line (or the next) carries its help text
        after = options[options.index(flag) :].split("\n", 2)
        assert any(len(line.split()) > 3 for line in after[:2]), flag
