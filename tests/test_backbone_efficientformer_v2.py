"""timm's EfficientFormerV2 as OffSeg's backbone on any input size (offseg_hf/models/backbone_efficientformer_v2.py)."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation
from offseg_hf.convert import from_pretrained_encoder
from offseg_hf.models.backbone_efficientformer_v2 import BIAS_INPUT_SIZE, EfficientFormerV2Backbone, _resized_bias


def make_timm_reference(name="efficientformerv2_s1"):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=BIAS_INPUT_SIZE).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("attention_biases"):
                param.normal_()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def test_timm_state_dict_from_a_local_file_loads_and_matches_timm_at_512(tmp_path):
    reference = make_timm_reference()
    path = tmp_path / "efficientformerv2_s1.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))

    backbone = EfficientFormerV2Backbone("efficientformerv2_s1").eval()
    unused = backbone.load_timm_state_dict(timm.models.load_state_dict(str(path)))
    assert sorted(unused) == sorted(k for k in reference.state_dict() if k.startswith(("norm.", "head")))
    images = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        ours = backbone(images).feature_maps
        theirs = reference.forward_intermediates(images, intermediates_only=True)
    assert [f.shape[1] for f in ours] == [32, 48, 120, 224]
    for a, b in zip(ours, theirs, strict=True):
        # The bias resize at 512x512 is the identity: timm's computation, up to float32 summation order.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_imagenet_sized_biases_are_skipped_like_the_official_backbone():
    imagenet = timm.create_model("efficientformerv2_s1", pretrained=False, num_classes=1000)  # 224 -> 7x7 grid
    backbone = EfficientFormerV2Backbone("efficientformerv2_s1")
    before = {k: v.clone() for k, v in backbone.state_dict().items() if k.endswith("attention_biases")}
    unused = backbone.load_timm_state_dict(imagenet.state_dict())
    assert set(before) <= set(unused)
    for key, value in backbone.state_dict().items():
        if key in before:
            assert torch.equal(value, before[key])
        elif not key.endswith("attention_bias_idxs"):
            assert torch.equal(value, imagenet.state_dict()[key]), key
    with pytest.raises(ValueError, match="missing"):
        backbone.load_timm_state_dict({k: v for k, v in imagenet.state_dict().items() if "stem" not in k})


def table_grad_path(attention):
    """The bias through the traced graph's form: gather, then the identity-size bicubic resize."""
    table = attention.attention_biases[:, attention.attention_bias_idxs]
    return F.interpolate(table[None], size=table.shape[-2:], mode="bicubic", align_corners=False)[0]


def test_bias_is_resized_bicubically_for_other_grids():
    backbone = EfficientFormerV2Backbone("efficientformerv2_s1")
    attention = backbone.stages[3].blocks[-1].token_mixer
    with torch.no_grad():
        attention.attention_biases.normal_()
    table = attention.attention_biases[:, attention.attention_bias_idxs]  # (heads, 256, 256)
    assert torch.equal(_resized_bias(attention, 256, 256), table)
    # Skipping the resize at the table's size (plain eager) is exact: the traced graph's identity resize equals it.
    identity = F.interpolate(table[None], size=(256, 256), mode="bicubic", align_corners=False)[0]
    assert torch.equal(identity, table)
    weights = torch.randn(table.shape)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad((_resized_bias(attention, 256, 256) * weights).sum(), attention.attention_biases)
        (expected,) = torch.autograd.grad((table_grad_path(attention) * weights).sum(), attention.attention_biases)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    resized = _resized_bias(attention, 12, 12)
    expected = F.interpolate(table[None], size=(12, 12), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(resized, expected)


def test_norm_eval_keeps_backbone_batchnorm_in_eval_mode():
    for norm_eval in (False, True):
        config = OffSegConfig.from_variant("offseg-t", num_labels=4, encoder_config={"norm_eval": norm_eval})
        model = OffSegForSemanticSegmentation(config).train()
        modes = {m.training for m in model.offseg.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)}
        assert modes == ({False} if norm_eval else {True})
        assert model.offseg.decode_head.training


def test_cached_bias_follows_load_state_dict():
    """The eval-mode bias cache must not survive new weights (timm's own cache does)."""
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(OffSegConfig.from_variant("offseg-t", num_labels=4)).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        before = model(images).logits
    state = model.state_dict()
    for key in state:
        if key.endswith("attention_biases"):
            state[key] = torch.randn_like(state[key])
    model.load_state_dict(state)
    fresh = OffSegForSemanticSegmentation(model.config).eval()
    fresh.load_state_dict(state)
    with torch.inference_mode():
        after, expected = model(images).logits, fresh(images).logits
    assert not torch.allclose(before, after)
    assert torch.equal(after, expected)


def test_from_pretrained_encoder_with_a_local_timm_file(tmp_path):
    reference = make_timm_reference()
    path = tmp_path / "s1.pth"
    torch.save(reference.state_dict(), path)
    model = from_pretrained_encoder(str(path), "offseg-t", num_labels=3)
    ours = model.offseg.encoder.state_dict()
    for key, value in reference.state_dict().items():
        if key in ours and not key.endswith("attention_bias_idxs"):
            assert torch.equal(ours[key], value), key
    assert model.config.num_labels == 3
