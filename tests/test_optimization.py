"""Optimizer parameter groups (the official runs' mmengine rule on official names, and the all-norms option) and
the warmup + poly schedule. Expected groups are written by hand from the official parameter names."""

import pytest
import torch
from torch import nn

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation
from offseg_hf.convert import official_key
from offseg_hf.training import (
    WarmupPolyFactor,
    build_optimizer,
    build_scheduler,
    first_matching_key,
    get_recipe,
    official_custom_keys,
    param_groups,
)

from .conftest import tiny_config


def treatment(model: nn.Module, rule: str, learning_rate=1.0, weight_decay=0.01) -> dict[str, tuple[float, bool]]:
    """Each parameter's (lr multiplier, decayed?) as the optimizer groups give them; every trainable parameter
    exactly once."""
    names = {id(param): name for name, param in model.named_parameters() if param.requires_grad}
    found = {}
    for group in param_groups(
        model, learning_rate, weight_decay, head_lr_mult=10.0, rule=rule, official_key=official_key
    ):
        for param in group["params"]:
            assert names[id(param)] not in found
            found[names[id(param)]] = (group["lr"] / learning_rate, group["weight_decay"] > 0)
    assert found.keys() == set(names.values())
    return found


LR1_DECAY, LR1_NO_DECAY, LR10_DECAY, LR10_NO_DECAY = (1.0, True), (1.0, False), (10.0, True), (10.0, False)


def test_mmengine_key_order():
    keys = official_custom_keys(10.0)
    assert keys == {"pos_block": (1.0, 0.0), "norm": (1.0, 0.0), "head": (10.0, 1.0)}
    # Longest first, then alphabetical: pos_block, head, norm.
    assert first_matching_key("backbone.pos_block.norm.weight", keys) == "pos_block"
    assert first_matching_key("decode_head.convs.0.bn.weight", keys) == "head"
    assert first_matching_key("decode_head.offset_learning.mask_norm.weight", keys) == "head"
    assert first_matching_key("backbone.layers.0.1.0.norm1.weight", keys) == "norm"
    assert first_matching_key("backbone.layers.0.2.weight", keys) is None


def test_official_groups_of_segformer_offset():
    found = treatment(OffSegForSemanticSegmentation(tiny_config()), "official")
    stage, block = "offseg.encoder.stages.0", "offseg.encoder.stages.0.blocks.0"
    expected = {
        f"{stage}.layer_norm.weight": LR1_DECAY,  # backbone.layers.0.2: no 'norm' in the official name
        f"{stage}.layer_norm.bias": LR1_DECAY,
        f"{stage}.patch_embeddings.layer_norm.weight": LR1_NO_DECAY,  # layers.0.0.norm
        f"{stage}.patch_embeddings.proj.weight": LR1_DECAY,
        f"{block}.layernorm_before.weight": LR1_NO_DECAY,  # norm1
        f"{block}.layernorm_after.bias": LR1_NO_DECAY,  # norm2
        f"{block}.attention.sequence_reduction.layer_norm.weight": LR1_NO_DECAY,  # attn.norm
        f"{block}.attention.q_proj.bias": LR1_DECAY,
        f"{block}.mlp.fc1.bias": LR1_DECAY,
        "offseg.decode_head.fusion.norm.weight": LR10_DECAY,  # decode_head.fusion_conv.bn: 'head' first
        "offseg.decode_head.stage_projections.2.norm.bias": LR10_DECAY,  # decode_head.convs.2.bn
        "offseg.decode_head.fusion.conv.weight": LR10_DECAY,
        "classifier.mask_norm.weight": LR10_DECAY,  # decode_head.offset_learning.mask_norm
        "classifier.class_embeddings": LR10_DECAY,
        "classifier.class_offset_proj.weight": LR10_DECAY,
    }
    assert {name: found[name] for name in expected} == expected
    assert LR10_NO_DECAY not in found.values()  # nothing in the official decode head escapes its decay


def test_official_groups_of_offseg_t():
    found = treatment(OffSegForSemanticSegmentation(OffSegConfig.from_variant("offseg-t", num_labels=6)), "official")
    block, attention_block = "offseg.encoder.stages.0.blocks.0", "offseg.encoder.stages.2.blocks.7"
    expected = {
        f"{attention_block}.token_mixer.talking_head1.weight": LR10_DECAY,  # 'head' in talking_head1
        f"{attention_block}.token_mixer.talking_head2.bias": LR10_DECAY,
        f"{attention_block}.token_mixer.q.bn.weight": LR1_DECAY,  # token_mixer.q.1
        f"{attention_block}.token_mixer.q.conv.weight": LR1_DECAY,
        f"{attention_block}.ls1.gamma": LR1_DECAY,  # layer_scale_1
        f"{block}.mlp.fc1.bn.weight": LR1_NO_DECAY,  # mlp.norm1
        f"{block}.mlp.mid.bn.bias": LR1_NO_DECAY,  # mlp.mid_norm
        f"{block}.mlp.fc2.bn.weight": LR1_NO_DECAY,  # mlp.norm2
        "offseg.encoder.stem.conv1.bn.weight": LR1_DECAY,  # patch_embed.1
        "offseg.encoder.stages.3.downsample.attn.q.proj.bn.weight": LR1_DECAY,  # attn.q.proj.1
        "offseg.decode_head.stage_projections.0.norm.weight": LR10_DECAY,  # decode_head.pre.0.gn
        "offseg.decode_head.align.norm.bias": LR10_DECAY,
        "offseg.decode_head.fusions.0.resampler.offset.weight": LR10_DECAY,
        "classifier.mask_norm.bias": LR10_DECAY,
    }
    assert {name: found[name] for name in expected} == expected


def test_official_groups_of_segnext():
    config = OffSegConfig.from_variant("segnext-t-offset", num_labels=6, encoder_config={"depths": [1, 1, 1, 1]})
    found = treatment(OffSegForSemanticSegmentation(config), "official")
    block = "offseg.encoder.block2.0"
    expected = {
        f"{block}.norm1.weight": LR1_NO_DECAY,  # backbone.block2.0.norm1
        f"{block}.norm2.bias": LR1_NO_DECAY,
        f"{block}.layer_scale_1": LR1_DECAY,
        f"{block}.attn.spatial_gating_unit.conv0_1.weight": LR1_DECAY,
        "offseg.encoder.patch_embed1.proj.1.weight": LR1_DECAY,  # the stem's BatchNorm: no 'norm' in its name
        "offseg.encoder.patch_embed2.norm.weight": LR1_NO_DECAY,
        "offseg.encoder.norm4.bias": LR1_NO_DECAY,  # the end-of-stage LayerNorm
        "offseg.decode_head.squeeze.norm.weight": LR10_DECAY,  # decode_head.squeeze.gn
        "offseg.decode_head.hamburger.ham_in.bias": LR10_DECAY,
        "offseg.decode_head.hamburger.ham_out.norm.bias": LR10_DECAY,
        "classifier.feature_offset_proj.weight": LR10_DECAY,
    }
    assert {name: found[name] for name in expected} == expected


def test_official_groups_of_mask2former():
    from offseg_hf.presets import model_for_variant

    # The official Swin-T Mask2Former(-offset) rule on the official names (custom keys, longest first, then
    # norm_decay_mult=0 for the norm layers no key matched), at the recipe's backbone multiplier 0.1.
    small = {"backbone_config": {"depths": [1, 1, 1, 1]}, "encoder_layers": 1, "decoder_layers": 3}
    model = model_for_variant("mask2former-swin-t-offset", num_labels=4, **small)
    names = {id(param): name for name, param in model.named_parameters()}
    found = {}
    for group in param_groups(
        model, 1.0, 0.05, head_lr_mult=1.0, rule="official", backbone_lr_mult=0.1, official_key=official_key
    ):
        for param in group["params"]:
            found[names[id(param)]] = (group["lr"], group["weight_decay"] > 0)
    swin, decoder = "model.pixel_level_module.encoder", "model.transformer_module.decoder"
    backbone_decay, backbone_no_decay = (0.1, True), (0.1, False)
    expected = {
        f"{swin}.swin.encoder.layers.1.blocks.0.attention.q_proj.weight": backbone_decay,  # backbone
        f"{swin}.swin.encoder.layers.1.blocks.0.layernorm_before.weight": backbone_no_decay,  # blocks.N.norm1
        f"{swin}.swin.encoder.layers.0.downsample.norm.bias": backbone_no_decay,  # stages.0.downsample.norm
        f"{swin}.swin.encoder.layers.0.blocks.0.attention.relative_position_bias.relative_position_bias_table": (
            backbone_no_decay
        ),
        f"{swin}.swin.embeddings.norm.weight": backbone_no_decay,  # patch_embed.norm
        f"{swin}.hidden_states_norms.stage4.weight": backbone_no_decay,  # backbone.norm3
        "model.pixel_level_module.decoder.level_embed": (1.0, True),  # level_encoding: no custom key matches
        "model.pixel_level_module.decoder.input_projections.0.1.weight": (1.0, False),  # a GroupNorm
        "model.transformer_module.queries_features.weight": (1.0, False),  # query_feat
        "model.transformer_module.level_embed.weight": (1.0, False),  # level_embed
        f"{decoder}.layers.0.self_attn_layer_norm.weight": (1.0, False),  # a LayerNorm of the head
        f"{decoder}.mask_predictor.offset_learning.class_offset_proj.weight": (1.0, True),
        "class_predictor.weight": (1.0, True),
    }
    assert {name: found[name] for name in expected} == expected
    # Full size, on the meta device: the official constructor's groups (47.571M parameters; ours add transformers'
    # unused final Swin LayerNorm, 1536 parameters, to the decayed backbone group).
    with torch.device("meta"):
        full = model_for_variant("mask2former-swin-t-offset")
    sizes = {
        group["name"]: sum(p.numel() for p in group["params"])
        for group in param_groups(
            full, 1e-4, 0.05, head_lr_mult=1.0, rule="official", backbone_lr_mult=0.1, official_key=official_key
        )
    }
    assert sizes == {
        "lr_x0.1_decay": 27_471_264 + 1536,
        "lr_x0.1_no_decay": 49_434,
        "lr_x1_decay": 19_974_999,
        "lr_x1_no_decay": 75_008,
    }


@pytest.mark.parametrize("variant", ["segformer", "offseg-t"])
def test_all_norms_rule_exempts_every_norm_layer(variant):
    config = tiny_config() if variant == "segformer" else OffSegConfig.from_variant("offseg-t", num_labels=6)
    model = OffSegForSemanticSegmentation(config)
    found = treatment(model, "all_norms")
    norm_params = {
        f"{module_name}.{param_name}"
        for module_name, module in model.named_modules()
        if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm))
        for param_name, _ in module.named_parameters(recurse=False)
    }
    assert {name for name, (_, decayed) in found.items() if not decayed} == norm_params
    assert {name for name, (lr_mult, _) in found.items() if lr_mult == 1} == {
        name for name in found if name.startswith("offseg.encoder.")
    }
    assert found["classifier.mask_norm.weight"] == LR10_NO_DECAY
    assert found["offseg.decode_head.stage_projections.0.norm.weight"] == LR10_NO_DECAY
    assert found["classifier.class_embeddings"] == LR10_DECAY  # biases and embeddings keep their decay


def test_a_model_without_official_names_uses_its_own_under_the_official_parts():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.pos_block = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))  # PVT-style positional conv
            self.final = nn.LayerNorm(4)

    model = nn.Module()
    model.encoder, model.decode_head = Encoder(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4))
    model.decode_head[0].weight.requires_grad_(False)  # frozen: in no group
    official = treatment(model, "official")
    assert official == {
        "encoder.proj.weight": LR1_DECAY,
        "encoder.proj.bias": LR1_DECAY,
        "encoder.pos_block.0.weight": LR1_NO_DECAY,
        "encoder.pos_block.0.bias": LR1_NO_DECAY,
        "encoder.final.weight": LR1_DECAY,  # backbone.final.weight: no key
        "encoder.final.bias": LR1_DECAY,
        "decode_head.0.bias": LR10_DECAY,
        "decode_head.1.weight": LR10_DECAY,
        "decode_head.1.bias": LR10_DECAY,
    }
    all_norms = treatment(model, "all_norms")
    assert all_norms["encoder.final.weight"] == LR1_NO_DECAY and all_norms["decode_head.1.bias"] == LR10_NO_DECAY
    assert all_norms["encoder.pos_block.0.weight"] == LR1_NO_DECAY and all_norms["decode_head.0.bias"] == LR10_DECAY
    with pytest.raises(ValueError, match="Unknown parameter-group rule 'mmseg'"):
        param_groups(model, 1.0, 0.01, rule="mmseg")


def test_warmup_then_poly_schedule():
    factor = WarmupPolyFactor(total_steps=160_000, warmup_steps=1500, start_factor=1e-6, power=1.0)
    assert factor(0) == pytest.approx(1e-6)
    assert factor(750) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert factor(1500) == pytest.approx(1.0)
    assert factor(1500 + 158_500 // 2) == pytest.approx(0.5)
    assert factor(159_999) == pytest.approx(1 / 158_500) and factor(160_000) == 0.0
    assert WarmupPolyFactor(100, 10, power=0.9)(55) == pytest.approx(0.5**0.9)

    model = OffSegForSemanticSegmentation(tiny_config())
    settings = {**get_recipe("ade20k-160k"), "max_train_steps": 20, "warmup_steps": 5}
    optimizer = build_optimizer(model, settings, official_key)
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    assert sorted(group["name"] for group in optimizer.param_groups) == [
        "lr_x10_decay",
        "lr_x1_decay",
        "lr_x1_no_decay",
    ]
    scheduler = build_scheduler(optimizer, settings)
    seen = []
    for _ in range(20):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    warmup_5_of_20 = [1e-6 + (1 - 1e-6) * step / 5 for step in range(5)] + [1 - step / 15 for step in range(15)]
    for step, lrs in enumerate(seen):
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            assert lr == pytest.approx(6e-5 * group["lr_mult"] * warmup_5_of_20[step])  # the head stays at 10x
    assert all(group["lr"] == 0 for group in optimizer.param_groups)
    # The schedule survives a state_dict round trip (resume).
    longer = {**settings, "max_train_steps": 999}
    restored = build_scheduler(build_optimizer(model, longer, official_key), longer)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.lr_lambdas[0].total_steps == 20 and restored.last_epoch == 20
    assert isinstance(optimizer, torch.optim.AdamW)


def test_the_official_rule_needs_the_official_names():
    """Without the converter's names the official rule would group by our names and silently train another recipe."""
    model = OffSegForSemanticSegmentation(tiny_config())
    with pytest.raises(ValueError, match="official_key=offseg_hf.convert.official_key"):
        param_groups(model, 1.0, 0.01, rule="official")
    assert param_groups(model, 1.0, 0.01, rule="all_norms")  # needs no names
