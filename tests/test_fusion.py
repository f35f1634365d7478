"""BatchNorm folding for inference (offseg_hf/export/batchnorm.py): on a small model of each family the folded model
gives the unfused logits, exactly the conv -> BatchNorm pairs are folded (counted independently from the module types),
training mode is refused, a fused model refuses to be saved or trained, and the unfused checkpoint still loads."""

import copy

import pytest
import timm.layers
import timm.models.efficientformer_v2 as efficientformer_v2
import torch
from torch import nn

from offseg_hf import (
    OffSegConfig,
    OffSegForSemanticSegmentation,
    OffSegMask2FormerForSemanticSegmentation,
)
from offseg_hf.export.batchnorm import (
    ConvActivation2d,
    FusedModelError,
    find_conv_bn_pairs,
    fuse_for_inference,
)
from offseg_hf.models import backbone_mscan, layers

from .conftest import build_model, randomize_norms
from .test_backbone_mscan import SMALL_MSCAN
from .test_mask2former import tiny_model as tiny_mask2former

FAMILIES = ["segformer", "offseg-t", "segnext", "mask2former"]


def small_model(family: str) -> nn.Module:
    if family in ("segformer", "offseg-t"):
        return build_model(family)
    if family == "segnext":
        torch.manual_seed(0)
        config = OffSegConfig.from_variant("segnext-t-offset", num_labels=5, encoder_config=dict(SMALL_MSCAN))
        model = OffSegForSemanticSegmentation(config).eval()
        with torch.no_grad():  # spread the class scores as conftest.build_model does (see there)
            model.classifier.class_embeddings.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    else:
        model = tiny_mask2former()
    randomize_norms(model)
    return model


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(seed))


def batch_norms(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


def expected_pairs(model: nn.Module) -> set[tuple[str, str]]:
    """The conv -> BatchNorm pairs, from the module types whose forward is `bn(conv(x))` (read off their code)."""
    pairs = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (efficientformer_v2.ConvNorm, timm.layers.ConvNormAct)):
            pairs.add((f"{prefix}conv", f"{prefix}bn"))
        elif isinstance(module, layers.ConvNormAct) and isinstance(module.norm, nn.BatchNorm2d):
            if not name.endswith("decode_head.fusion"):  # applied through resize_and_project, not its conv
                pairs.add((f"{prefix}conv", f"{prefix}norm"))
        elif isinstance(module, backbone_mscan.StemConv):
            pairs |= {(f"{prefix}proj.0", f"{prefix}proj.1"), (f"{prefix}proj.3", f"{prefix}proj.4")}
        elif isinstance(module, backbone_mscan.DownsampleEmbed):
            pairs.add((f"{prefix}proj", f"{prefix}norm"))
    return pairs


# Per family: BatchNorms that must stay (not after a conv module), as name suffixes.
STAYING = {
    "segformer": ("decode_head.fusion.norm",),
    "offseg-t": (),
    "segnext": (".norm1", ".norm2"),
    "mask2former": (),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_logits_match_and_exactly_the_conv_bn_pairs_fold(family):
    model = small_model(family)
    pixel_values = images()
    with torch.no_grad():
        reference = model(pixel_values).logits
        model64, small64 = copy.deepcopy(model).double(), pixel_values[:1, :, :64, :64].double()
        reference64 = model64(small64).logits
    before = batch_norms(model)
    expected = expected_pairs(model)
    # EfficientFormerV2's ConvNormAct ends in timm's BatchNormAct2d: its activation moves into the folded conv.
    with_act = {n: type(m.bn.act) for n, m in model.named_modules() if isinstance(m, timm.layers.ConvNormAct)}
    assert (family == "offseg-t") == bool(with_act) and nn.Identity not in with_act.values()
    assert fuse_for_inference(model, pixel_values[:1]) is model and model.is_fused
    assert set(model.fused_conv_bn_pairs) == expected
    assert len(model.fused_conv_bn_pairs) == len(expected)
    left = batch_norms(model)
    assert len(left) == len(before) - len(expected)
    assert all(name.endswith(STAYING[family]) for name in left)
    if family == "offseg-t":
        assert not left and len(expected) == 95  # every BatchNorm of EfficientFormerV2-S0 folds
    if family == "mask2former":
        assert not before and not expected  # Swin and the pixel decoder have no BatchNorm: fusing is a no-op
    for name, act in with_act.items():
        conv = model.get_submodule(f"{name}.conv")
        assert isinstance(model.get_submodule(f"{name}.bn"), nn.Identity)
        assert type(conv) is ConvActivation2d and type(conv.fused_activation) is act
    fused_convs = [name for name, m in model.named_modules() if isinstance(m, ConvActivation2d)]
    assert sorted(fused_convs) == sorted(f"{name}.conv" for name in with_act)
    for conv_name, _ in model.fused_conv_bn_pairs:
        assert model.get_submodule(conv_name).bias is not None
    with torch.no_grad():
        fused = model(pixel_values).logits
        fused64 = fuse_for_inference(model64, small64)(small64).logits
    error = (fused - reference).abs().max().item()
    relative = error / reference.abs().max().item()
    print(
        f"{family}: {len(expected)} pairs folded, {len(left)} BatchNorms left, max abs {error:.2e}, rel {relative:.2e}"
    )
    # The algebra is exact: fused in float64, the models agree to float64 rounding (about 1e-14).
    torch.testing.assert_close(fused64, reference64, atol=1e-10, rtol=0)
    # In float32, a few ulps of rounding per folded layer; MSCAN's stage LayerNorms magnify them on the segnext
    # model (1.3e-5 at logits of magnitude 2.6 in this test), hence the relative term.
    # (1.05e-5 seen on an AVX2 CPU, whose MKL rounds differently; the float64 check above is the exactness test.)
    torch.testing.assert_close(fused, reference, atol=2e-5, rtol=1e-5)


class _Residual(nn.Module):
    """conv -> BN, but the conv output also feeds a residual: folding would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _SharedWeight(nn.Module):
    """conv -> BN, but the conv weight is also applied functionally elsewhere."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + nn.functional.conv2d(x, self.conv.weight)


class _ActBetween(nn.Module):
    """conv -> ReLU -> BN (no op may sit between), then a valid conv -> BN pair."""

    def __init__(self):
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm2d(4))
        self.second = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.second(self.first(x))


@pytest.mark.parametrize(
    ("module", "pairs"),
    [(_Residual, []), (_SharedWeight, []), (_ActBetween, [("second.0", "second.1")])],
)
def test_only_a_bn_reading_nothing_but_a_conv_output_folds(module, pairs):
    torch.manual_seed(0)
    model = module().eval()
    randomize_norms(model)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        reference = model(x)
    assert find_conv_bn_pairs(model, x) == pairs
    fuse_for_inference(model, x)
    assert len(batch_norms(model)) == (2 if module is _ActBetween else 1) - len(pairs)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)


def test_training_mode_is_refused_and_a_fused_model_stays_in_eval():
    model = small_model("segformer").train()
    with pytest.raises(FusedModelError, match="eval mode"):
        fuse_for_inference(model)
    assert len(batch_norms(model)) == 5  # nothing was touched
    model.eval().offseg.decode_head.stage_projections[0].norm.train()  # one BatchNorm still training
    with pytest.raises(FusedModelError, match="stage_projections.0.norm"):
        fuse_for_inference(model)
    fuse_for_inference(model.eval())
    with pytest.raises(FusedModelError, match="training mode"):
        model.train()
    assert model.eval() is model and not model.training


def test_fused_model_refuses_saving_and_the_unfused_checkpoint_still_loads(tmp_path):
    model = small_model("segformer")
    model.save_pretrained(tmp_path / "unfused")
    pixel_values = images(1)
    with torch.no_grad():
        reference = model(pixel_values).logits
    fuse_for_inference(model)
    with pytest.raises(FusedModelError, match="save_pretrained|Save the model before fusing"):
        model.save_pretrained(tmp_path / "fused")
    assert not (tmp_path / "fused").exists()
    loaded, info = OffSegForSemanticSegmentation.from_pretrained(tmp_path / "unfused", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not getattr(loaded, "is_fused", False) and len(batch_norms(loaded)) > 0
    loaded.eval()
    with torch.no_grad():
        # Same weights, but not bitwise the same logits on every CPU: MKL's GEMM kernels may split their reductions
        # by the buffers' memory alignment, which differs between the built and the loaded (safetensors) weights
        # (3.6e-7 seen on an AVX2 machine).
        torch.testing.assert_close(loaded(pixel_values).logits, reference, atol=1e-6, rtol=0)
        torch.testing.assert_close(fuse_for_inference(loaded)(pixel_values).logits, reference, atol=1e-5, rtol=0)


def test_folding_guards_the_fused_instance_only(tmp_path):
    """The model classes know nothing of folding (nothing of it ships in a saved folder's code); the fused instance
    refuses to be saved or trained, while another instance of the same class saves and trains as usual."""
    for model_class in (OffSegForSemanticSegmentation, OffSegMask2FormerForSemanticSegmentation):
        assert not any("fuse" in name for name in dir(model_class)), model_class
    model = OffSegForSemanticSegmentation(small_model("segformer").config).eval()
    other = OffSegForSemanticSegmentation(model.config).eval()
    model.save_pretrained(tmp_path / "before")  # unfused: saves as usual
    assert fuse_for_inference(model) is model and model.is_fused
    with pytest.raises(FusedModelError, match="Save the model before fusing"):
        model.save_pretrained(tmp_path / "after")
    with pytest.raises(FusedModelError, match="training mode"):
        model.train()
    assert model.eval() is model and not model.training  # evaluation mode stays allowed
    other.save_pretrained(tmp_path / "other")
    assert other.train().training and not getattr(other, "is_fused", False)


def test_activations_can_stay_apart():
    model = small_model("offseg-t")
    pixel_values = images()
    with torch.no_grad():
        reference = model(pixel_values).logits
    fuse_for_inference(model, pixel_values[:1], fuse_activations=False)
    assert not any(isinstance(m, ConvActivation2d) for m in model.modules())
    acts = [m.bn for m in model.modules() if isinstance(m, timm.layers.ConvNormAct)]
    assert acts and all(isinstance(act, timm.layers.activations.GELU) for act in acts)  # in the BatchNorm's place
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, reference, atol=1e-5, rtol=1e-5)


def _conv_activation(activation: nn.Module, **conv_kwargs) -> tuple[nn.Conv2d, ConvActivation2d]:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16 if conv_kwargs.get("groups", 1) == 1 else 8, **conv_kwargs).eval()
    fused = copy.deepcopy(conv)
    fused.__class__ = ConvActivation2d
    fused.fused_activation = activation
    return conv, fused


@pytest.mark.parametrize(
    "activation", [nn.ReLU(), nn.GELU(), nn.GELU(approximate="tanh"), timm.layers.activations.GELU()], ids=repr
)
@pytest.mark.parametrize(
    "conv_kwargs",
    [dict(kernel_size=1), dict(kernel_size=3, padding=1, groups=8), dict(kernel_size=3, stride=2, padding=1)],
    ids=["1x1", "depthwise", "stride2"],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_activation_runs_one_op_with_the_values_of_conv_then_activation(activation, conv_kwargs, channels_last):
    conv, fused = _conv_activation(activation, **conv_kwargs)
    x = torch.randn(2, 8, 13, 17)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = activation(conv(x))
        assert fused._runs_onednn(x) == torch.backends.mkldnn.is_available()
        with torch.profiler.profile() as profile:
            out = fused(x)
    ops = {event.name for event in profile.events()}
    assert "mkldnn::_convolution_pointwise" in ops or not torch.backends.mkldnn.is_available()
    assert not ops & {"aten::gelu", "aten::relu"}  # the activation ran inside the convolution
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_conv_activation_falls_back_where_onednn_does_not_apply():
    conv, fused = _conv_activation(nn.GELU(), kernel_size=3, padding=1)
    x = torch.randn(1, 8, 9, 9, requires_grad=True)
    assert not fused._runs_onednn(x)  # autograd: the fused op has no backward
    out = fused(x)
    out.sum().backward()
    torch.testing.assert_close(out, nn.functional.gelu(conv(x)), atol=0, rtol=0)
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert not fused._runs_onednn(x.double()) and fused.double()(x.double()).dtype == torch.float64
        fused.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused._runs_onednn(x)
            assert fused(x).dtype == torch.bfloat16  # autocast's bf16 convolution, as the unfused model
