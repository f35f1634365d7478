"""OffSeg-T/B/L: EfficientFormerV2 backbone, CARAFE, FreqFusion, the OffSeg head."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation
from offseg_hf.backbone_efficientformer_v2 import BIAS_INPUT_SIZE, EfficientFormerV2Backbone, _resized_bias
from offseg_hf.decode_head_offseg import interleave_channels
from offseg_hf.freqfusion import FreqFusion, carafe, neighbour_cosine_similarity


def test_presets_hold_the_official_values():
    expected = {
        "offseg-t": ("efficientformerv2_s1", 0.0, [32, 32, 64, 128], [32, 48, 120, 224]),
        "offseg-b": ("efficientformerv2_s2", 0.02, [32, 64, 128, 256], [32, 64, 144, 288]),
        "offseg-l": ("efficientformerv2_l", 0.1, [32, 64, 128, 256], [40, 80, 192, 384]),
    }
    for variant, (backbone, drop_path, stage_channels, in_channels) in expected.items():
        config = OffSegConfig.from_variant(variant)
        assert config.encoder_config.backbone == backbone and config.encoder_config.drop_path_rate == drop_path
        assert config.decoder_stage_channels == stage_channels and config.decoder_hidden_size == 256
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


def naive_carafe(features, masks, kernel_size, scale):
    """Direct loop over output pixels and taps: the definition of CARAFE (mmcv's op)."""
    batch, channels, height, width = features.shape
    out = torch.zeros(batch, channels, height * scale, width * scale, dtype=features.dtype)
    r = kernel_size // 2
    for i in range(height * scale):
        for j in range(width * scale):
            ci, cj = i // scale, j // scale
            for a in range(kernel_size):
                for b in range(kernel_size):
                    y, x = ci + a - r, cj + b - r
                    if 0 <= y < height and 0 <= x < width:
                        out[:, :, i, j] += masks[:, a * kernel_size + b, i, j, None] * features[:, :, y, x]
    return out


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("scale", [1, 2])
def test_carafe_matches_naive_reference(kernel_size, scale):
    torch.manual_seed(0)
    features = torch.randn(2, 3, 5, 6)
    masks = torch.randn(2, kernel_size**2, 5 * scale, 6 * scale).softmax(dim=1)
    expected = naive_carafe(features, masks, kernel_size, scale)
    torch.testing.assert_close(carafe(features, masks, kernel_size, scale), expected, rtol=1e-5, atol=1e-5)


def test_carafe_rejects_mismatched_masks():
    with pytest.raises(ValueError, match="masks must have shape"):
        carafe(torch.randn(1, 2, 4, 4), torch.randn(1, 25, 7, 8), 5, 2)


def test_neighbour_similarity_matches_unfold_definition():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 7, 9)
    unfolded = F.unfold(x, 3, padding=2, dilation=2).view(2, 8, 9, 7, 9)
    reference = F.cosine_similarity(unfolded[:, :, 4:5], unfolded, dim=1)  # (B, 9, H, W)
    reference = torch.cat([reference[:, :4], reference[:, 5:]], dim=1)
    torch.testing.assert_close(neighbour_cosine_similarity(x), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hr_size", [(16, 20), (15, 19)])
def test_freqfusion_shapes_and_gradients(hr_size):
    torch.manual_seed(0)
    fusion = FreqFusion(hr_channels=32, lr_channels=64, compressed_channels=24)
    for param in fusion.parameters():  # away from the near-zero init so every path carries gradient
        param.data.normal_(0, 0.1)
    hr = torch.randn(2, 32, *hr_size, requires_grad=True)
    lr = torch.randn(2, 64, 8, 10, requires_grad=True)
    hr_out, lr_out = fusion(hr, lr)
    assert hr_out.shape == (2, 32, *hr_size) and lr_out.shape == (2, 64, *hr_size)
    (hr_out.square().mean() + lr_out.square().mean()).backward()
    for name, param in fusion.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert hr.grad.abs().sum() > 0 and lr.grad.abs().sum() > 0


def test_freqfusion_rejects_incompatible_sizes():
    fusion = FreqFusion(32, 64, 24)
    with pytest.raises(ValueError, match="twice the low-res size"):
        fusion(torch.randn(1, 32, 12, 12), torch.randn(1, 64, 8, 8))


def test_interleave_matches_official_reshape_order():
    hr, lr = torch.randn(2, 8, 3, 3), torch.randn(2, 12, 3, 3)
    b, _, h, w = hr.shape
    official = torch.cat([hr.reshape(b * 4, -1, h, w), lr.reshape(b * 4, -1, h, w)], dim=1).reshape(b, -1, h, w)
    assert torch.equal(interleave_channels(hr, lr), official)


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
        ours = backbone(images)
        theirs = reference.forward_intermediates(images, intermediates_only=True)
    assert [f.shape[1] for f in ours] == [32, 48, 120, 224]
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)  # the bias is not resized at 512x512: same computation as timm


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


def test_bias_is_resized_bicubically_for_other_grids():
    backbone = EfficientFormerV2Backbone("efficientformerv2_s1")
    attention = backbone.stages[3].blocks[-1].token_mixer
    with torch.no_grad():
        attention.attention_biases.normal_()
    table = attention.attention_biases[:, attention.attention_bias_idxs]  # (heads, 256, 256)
    assert torch.equal(_resized_bias(attention, 256, 256), table)
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
    model = OffSegForSemanticSegmentation.from_pretrained_encoder(str(path), "offseg-t", num_labels=3)
    ours = model.offseg.encoder.state_dict()
    for key, value in reference.state_dict().items():
        if key in ours and not key.endswith("attention_bias_idxs"):
            assert torch.equal(ours[key], value), key
    assert model.config.num_labels == 3
