"""The OffSeg pieces trace into one graph for every input size (torch.export with dynamic shapes), and the graph
computes what eager does at sizes other than the traced one (even and odd, FreqFusion's padded case included).

The whole model exports the same way (about a minute on two cores, too slow for the suite); these exports of its
parts take seconds and cover what used to block it: CARAFE's loops, FreqFusion's size branch and size-built
tensors, and the attention-bias resize and cache of the backbone.

`export_friendly(model)` gives the export forms of transformers' modules to `model`'s instances only: another model
of the same architecture, run meanwhile in another thread, runs transformers' classes with its usual values.
"""

import threading

import pytest
import torch
from torch.export import Dim

from offseg_hf.export.mask2former import TRACEABLE_PIXEL_DECODER
from offseg_hf.export.onnx import export_friendly
from offseg_hf.export.segformer import CHANNELS_FIRST_MIX_FFN, ChannelsFirstMixFFN, channels_first_mix_ffn
from offseg_hf.export.swin import BRANCH_FREE_SWIN
from offseg_hf.models.backbone_efficientformer_v2 import EfficientFormerV2Backbone, _resized_bias
from offseg_hf.models.freqfusion import FreqFusion, carafe


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


class _Fusion(torch.nn.Module):
    """FreqFusion fed from one high-res map, as in the decoder (the low-res map is its stride-2 pooling)."""

    def __init__(self):
        super().__init__()
        self.fusion = FreqFusion(hr_channels=16, lr_channels=24, compressed_channels=8)
        self.lift = torch.nn.Conv2d(16, 24, 3, stride=2, padding=1)

    def forward(self, hr: torch.Tensor) -> torch.Tensor:
        hr_out, lr_out = self.fusion(hr, self.lift(hr))
        return hr_out + lr_out.sum(dim=1, keepdim=True)


@pytest.mark.slow
def test_freqfusion_exports_with_dynamic_sizes_and_matches_eager():
    torch.manual_seed(0)
    model = _Fusion().eval()
    _randomise(model)
    dims = {"hr": {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}}
    program = torch.export.export(model, (torch.randn(2, 16, 12, 14),), dynamic_shapes=dims)
    # torch.export records a memory-layout guard (the crop after FreqFusion's padding is contiguous at even sizes);
    # ONNX has no strides, and the values must not depend on it: run the one graph at odd sizes too.
    exported = program.module(check_guards=False)
    for size in [(12, 14), (9, 17), (20, 11)]:  # the traced size, odd sizes (padded), other even sizes
        hr = torch.randn(3, 16, *size)
        with torch.no_grad():
            torch.testing.assert_close(exported(hr), model(hr), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1, 2])
def test_carafe_exports_with_dynamic_sizes(scale):
    class Carafe(torch.nn.Module):
        def forward(self, features, masks):
            return carafe(features, masks.softmax(dim=1), 5, scale)

    height = Dim("height", min=2, max=64)
    width = Dim("width", min=2, max=64)
    dims = {
        "features": {2: height, 3: width},
        "masks": {2: height * scale, 3: width * scale} if scale > 1 else {2: height, 3: width},
    }
    program = torch.export.export(
        Carafe(), (torch.randn(1, 3, 6, 7), torch.randn(1, 25, 6 * scale, 7 * scale)), dynamic_shapes=dims
    )
    features, masks = torch.randn(1, 3, 9, 4), torch.randn(1, 25, 9 * scale, 4 * scale)
    torch.testing.assert_close(program.module()(features, masks), Carafe()(features, masks))


def test_bias_resize_exports_and_matches_eager_at_any_grid():
    backbone = EfficientFormerV2Backbone("efficientformerv2_s1").eval()
    attention = backbone.stages[3].blocks[-1].token_mixer
    with torch.no_grad():
        attention.attention_biases.normal_()

    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = attention

        def forward(self, x):
            return self.attention(x)

    mixer = Mixer().eval()
    dims = {"x": {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}}
    program = torch.export.export(mixer, (torch.randn(2, 224, 16, 16),), dynamic_shapes=dims)
    for size in [(16, 16), (12, 21), (7, 5)]:
        x = torch.randn(2, 224, *size)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), mixer(x), rtol=1e-5, atol=1e-5)
    # The eager memo is the plain resize, and a new table (as after load_state_dict) replaces it.
    with torch.no_grad():
        first = _resized_bias(attention, 80, 80).clone()
        attention.attention_biases.add_(1.0)
        table = attention.attention_biases[:, attention.attention_bias_idxs]
        expected = torch.nn.functional.interpolate(table[None], size=(80, 80), mode="bicubic", align_corners=False)
        torch.testing.assert_close(_resized_bias(attention, 80, 80), expected[0], rtol=0, atol=0)
    assert not torch.equal(first, expected[0])


@pytest.mark.parametrize("case", ["offseg-t", "offseg-b", "offseg-l", "offseg-t/per_pixel"])
def test_export_friendly_model_keeps_the_reference_logits(case):
    """The reformulations (channels-last backbone, branch-free FreqFusion, CARAFE, bias resize) compute the same
    function: float64 logits agree with the fixture to summation-order rounding, float32 within float32's own error
    on these weights (about 3e-5 against float64)."""
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    fixtures = Path(__file__).with_name("fixtures")
    sys.path.insert(0, str(fixtures))
    from make_reference_logits import build, input_pixels

    reference = load_file(str(fixtures / "reference_logits.safetensors"))
    model = build(case, torch.float64)
    for dtype, tag, tolerance in ((torch.float64, "fp64", 1e-9), (torch.float32, "fp32", 1e-4)):
        model.to(dtype)
        with torch.no_grad():
            logits = model(input_pixels().to(dtype)).logits
        torch.testing.assert_close(logits, reference[f"{case}:{tag}"], rtol=0, atol=tolerance)


# --- The export forms of transformers' modules are given to the exported model only ---

EXPORT_FORMS = {**BRANCH_FREE_SWIN, **TRACEABLE_PIXEL_DECODER, **CHANNELS_FIRST_MIX_FFN}


def _two_models(family: str):
    from .conftest import build_model
    from .test_mask2former import tiny_model

    if family == "segformer":
        return build_model("segformer"), build_model("segformer")
    return tiny_model(), tiny_model()


def _classes(model: torch.nn.Module) -> list[type]:
    return [type(module) for module in model.modules()]


def _state_of_the_libraries() -> dict:
    """What a global patch would change: the `torch` functions the Mask2Former export needs in a traceable form, and
    the attributes of every transformers class that has an export form."""
    return {
        "torch": (torch.linspace, torch.as_tensor),
        **{original.__qualname__: dict(vars(original)) for original in EXPORT_FORMS},
    }


@pytest.mark.parametrize("family", ["mask2former", "segformer"])
def test_export_friendly_changes_the_exported_instance_only(family):
    """Inside `export_friendly(model_a)`, model_a's transformers modules run their export forms while model_b, the
    same architecture, runs transformers' classes, also in another thread, with its usual logits; neither torch nor
    the transformers classes change; model_a gets its classes back on exit, also when the block raises."""
    model_a, model_b = _two_models(family)
    originals_a, originals_b = _classes(model_a), _classes(model_b)
    swapped = {original for original in EXPORT_FORMS if original in originals_a}
    assert swapped  # this family has modules with export forms
    libraries = _state_of_the_libraries()
    attention_b = model_b.config._attn_implementation
    pixel_values = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_b = model_b(pixel_values=pixel_values).logits

    ran_in_b: set[type] = set()
    hooks = [module.register_forward_pre_hook(lambda m, _: ran_in_b.add(type(m))) for module in model_b.modules()]
    results = {}

    def run_b():
        with torch.no_grad():
            results["b"] = model_b(pixel_values=pixel_values).logits

    with export_friendly(model_a):
        forms_a = _classes(model_a)
        assert forms_a == [EXPORT_FORMS.get(cls, cls) for cls in originals_a]
        assert {EXPORT_FORMS[original] for original in swapped} <= set(forms_a)
        assert not swapped & set(forms_a)
        assert _classes(model_b) == originals_b and model_b.config._attn_implementation == attention_b
        thread = threading.Thread(target=run_b)
        thread.start()
        thread.join()
        assert _state_of_the_libraries() == libraries
    for hook in hooks:
        hook.remove()
    assert swapped <= ran_in_b and not ran_in_b & set(EXPORT_FORMS.values())
    assert torch.equal(results["b"], expected_b)
    assert _classes(model_a) == originals_a

    with pytest.raises(RuntimeError, match="inside the block"), export_friendly(model_a):
        assert _classes(model_a) != originals_a
        raise RuntimeError("inside the block")
    assert _classes(model_a) == originals_a
    assert _state_of_the_libraries() == libraries


def test_export_forms_are_given_to_exact_classes_only():
    """A subclass of a transformers module keeps its own class (the export form would drop its overrides), and a
    form that does not subclass the class it stands in for is refused."""
    from transformers.models.segformer.modeling_segformer import SegformerMixMLP

    from offseg_hf.export.subclasses import swapped_classes

    from .conftest import build_model

    class OwnMixFFN(SegformerMixMLP):
        pass

    model = build_model("segformer")
    mix_ffns = [module for module in model.modules() if type(module) is SegformerMixMLP]
    mix_ffns[0].__class__ = OwnMixFFN
    with channels_first_mix_ffn(model):
        assert type(mix_ffns[0]) is OwnMixFFN
        assert all(type(module) is ChannelsFirstMixFFN for module in mix_ffns[1:])
    assert type(mix_ffns[0]) is OwnMixFFN and all(type(module) is SegformerMixMLP for module in mix_ffns[1:])
    with pytest.raises(TypeError, match="Linear must subclass SegformerMixMLP"):
        with swapped_classes(model, {SegformerMixMLP: torch.nn.Linear}):
            pass
