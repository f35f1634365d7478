"""Every fast and export form against the reference form it stands for (offseg_hf/models/forms.py), and the choice of
form: per model instance, restored after a block, never global."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from offseg_hf import MaskOffsetLearning, OffSegConfig, OffSegForSemanticSegmentation, OffsetLearning
from offseg_hf.models import fast_freqfusion
from offseg_hf.models.fast_layers import is_pointwise, pointwise_conv
from offseg_hf.models.forms import FORMS, HasForms, pointwise_as_matmul, set_form, using_form
from offseg_hf.models.freqfusion import FreqFusion, carafe, neighbour_cosine_similarity
from offseg_hf.models.losses import upsampled_cross_entropy

from .conftest import randomize_norms, tiny_config

F64 = torch.float64


def gradients(output: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=output.dtype)
    return list(torch.autograd.grad((output * weights).sum(), inputs))


@pytest.mark.parametrize("kernel_size, scale", [(3, 1), (5, 2)])
def test_carafe_forms_match_the_reference_values_and_gradients(kernel_size, scale):
    torch.manual_seed(0)
    features = torch.randn(2, 6, 5, 7, dtype=F64, requires_grad=True)
    masks = torch.randn(2, kernel_size**2, 5 * scale, 7 * scale, dtype=F64).softmax(dim=1).requires_grad_()
    reference = carafe(features, masks, kernel_size, scale)
    expected = gradients(reference, [features, masks])
    forms = (fast_freqfusion.carafe, fast_freqfusion.carafe_by_taps, fast_freqfusion.carafe_by_gather)
    for form in (*forms, fast_freqfusion.carafe_by_rows):  # the last one uncompiled (the same graph inductor gets)
        out = form(features, masks, kernel_size, scale)
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-13)
        for ours, theirs in zip(gradients(out, [features, masks]), expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_neighbour_similarity_forms_match_the_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 9, dtype=F64, requires_grad=True)
    reference = neighbour_cosine_similarity(x, form="reference")
    expected = gradients(reference, [x])
    for form in ("fast", "export"):
        out = neighbour_cosine_similarity(x, form=form)
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-13)
        torch.testing.assert_close(gradients(out, [x])[0], expected[0], rtol=0, atol=1e-12)


def test_a_pointwise_convolution_runs_as_a_matrix_product_with_the_convolutions_values():
    """`fast_layers.pointwise_conv` on a channels-first CPU map: the product (the module is not called), float64
    values and gradients of the convolution, with and without a bias; under bf16 autocast the convolution's dtype."""
    torch.manual_seed(0)
    for bias in (False, True):
        conv = torch.nn.Conv2d(6, 5, kernel_size=1, bias=bias).double()
        calls = []
        conv.register_forward_hook(lambda *args, calls=calls: calls.append(args))
        x = torch.randn(2, 6, 7, 9, dtype=F64, requires_grad=True)
        assert pointwise_as_matmul(x) and is_pointwise(conv)
        out = pointwise_conv(conv, x)
        assert not calls and out.is_contiguous()
        reference = conv(x)
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-13)
        inputs = [x, *conv.parameters()]
        for ours, theirs in zip(gradients(out, inputs), gradients(reference, inputs), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    conv = conv.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pointwise_conv(conv, x.detach().float()).dtype == conv(x.detach().float()).dtype == torch.bfloat16


def test_a_pointwise_convolution_stays_a_convolution_where_the_product_does_not_apply():
    """Channels-last maps (oneDNN's own layout), other kernels, strides and groups, subclasses with their own forward,
    and graphs for `torch.export` (ONNX, ExecuTorch) run the module itself."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 8, 8)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    pointwise = torch.nn.Conv2d(6, 6, kernel_size=1)
    assert not pointwise_as_matmul(channels_last)
    assert torch.equal(pointwise_conv(pointwise, channels_last), pointwise(channels_last))

    class Activated(torch.nn.Conv2d):
        def forward(self, x):
            return super().forward(x).relu()

    others = [
        torch.nn.Conv2d(6, 6, kernel_size=3, padding=1),
        torch.nn.Conv2d(6, 6, kernel_size=1, stride=2),
        torch.nn.Conv2d(6, 6, kernel_size=1, groups=2),
        Activated(6, 6, kernel_size=1),
    ]
    for conv in others:
        assert not is_pointwise(conv)
        assert torch.equal(pointwise_conv(conv, x), conv(x))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = pointwise

        def forward(self, x):
            return pointwise_conv(self.conv, x)

    graph = torch.export.export(Block(), (x,)).graph
    targets = {node.target for node in graph.nodes if node.op == "call_function"}
    assert torch.ops.aten.conv2d.default in targets and torch.ops.aten.bmm.default not in targets


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.3)
    return module


def test_freqfusion_forms_match_the_reference():
    fusion = randomized(FreqFusion(hr_channels=16, lr_channels=32, compressed_channels=16).double())
    hr = torch.randn(2, 16, 11, 14, dtype=F64, requires_grad=True)
    lr = torch.randn(2, 32, 6, 7, dtype=F64, requires_grad=True)
    with using_form(fusion, "reference"):
        reference = torch.cat([out.flatten(1) for out in fusion(hr, lr)], dim=1)
    expected = gradients(reference, [hr, lr])
    for form in ("fast", "export"):
        with using_form(fusion, form):
            out = torch.cat([out.flatten(1) for out in fusion(hr, lr)], dim=1)
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-11)
        for ours, theirs in zip(gradients(out, [hr, lr]), expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("class_offset, feature_offset", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("num_classes", [7, 16])
def test_offset_learning_forms_match_the_reference(class_offset, feature_offset, num_classes):
    module = randomized(OffsetLearning(num_classes, 12, class_offset, feature_offset).double())
    features = torch.randn(2, 12, 5, 6, dtype=F64, requires_grad=True)
    module.form = "reference"
    reference, reference_attention = module(features, output_class_attention=True)
    expected = gradients(reference, [features, *module.parameters()])
    for form in ("fast", "export"):
        module.form = form
        scores, attention = module(features, output_class_attention=True)
        torch.testing.assert_close(scores, reference, rtol=0, atol=1e-12)
        torch.testing.assert_close(attention, reference_attention, rtol=0, atol=1e-14)
        for ours, theirs in zip(gradients(scores, [features, *module.parameters()]), expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-11)


@pytest.mark.parametrize("size", [None, (6, 8), (3, 4), (5, 7)], ids=["full", "half", "quarter", "odd"])
def test_mask_offset_learning_forms_match_the_reference(size):
    module = randomized(MaskOffsetLearning(12).double())
    embeddings = torch.randn(2, 5, 12, dtype=F64, requires_grad=True)
    features = torch.randn(2, 12, 12, 16, dtype=F64, requires_grad=True)
    module.form = "reference"
    reference = module(embeddings, features, size=size)
    expected = gradients(reference, [embeddings, features])
    module.form = "fast"
    masks = module(embeddings, features, size=size)
    assert masks.shape == reference.shape
    torch.testing.assert_close(masks, reference, rtol=0, atol=1e-12)
    for ours, theirs in zip(gradients(masks, [embeddings, features]), expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-11)


def test_loss_forms_match_the_reference():
    logits = torch.randn(2, 5, 8, 10, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 29, 37), generator=torch.Generator().manual_seed(0))
    labels[:, :4] = 255
    reference = upsampled_cross_entropy(logits, labels, form="reference")
    fast = upsampled_cross_entropy(logits, labels, form="fast")
    torch.testing.assert_close(fast, reference, rtol=1e-13, atol=0)
    torch.testing.assert_close(gradients(fast, [logits])[0], gradients(reference, [logits])[0], rtol=0, atol=1e-15)


def offseg_t() -> OffSegForSemanticSegmentation:
    torch.manual_seed(0)
    config = OffSegConfig.from_variant("offseg-t", num_labels=5, decoder_hidden_size=32)
    model = OffSegForSemanticSegmentation(config).double()
    randomize_norms(model)
    return model


@pytest.mark.slow
def test_whole_models_give_the_reference_logits_and_loss_in_every_form():
    """OffSeg-T (FreqFusion, offset learning, the loss) and SegFormer-offset, float64, with gradients."""
    pixels = torch.randn(2, 3, 64, 96, dtype=F64)
    labels = torch.randint(0, 5, (2, 64, 96), generator=torch.Generator().manual_seed(0))
    for model in (offseg_t(), OffSegForSemanticSegmentation(tiny_config(num_labels=5)).double()):
        model.eval()
        with using_form(model, "reference"):
            reference = model(pixels, labels=labels)
        expected = gradients(reference.loss, list(model.parameters()))
        for form in ("fast", "export"):
            with using_form(model, form):
                output = model(pixels, labels=labels)
            torch.testing.assert_close(output.logits, reference.logits, rtol=0, atol=1e-11)
            torch.testing.assert_close(output.loss, reference.loss, rtol=1e-12, atol=0)
            for ours, theirs in zip(gradients(output.loss, list(model.parameters())), expected, strict=True):
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_the_compiled_form_runs_inductor_kernels_with_the_reference_values():
    """CARAFE through inductor (a C++ compiler is needed, as for any `torch.compile` on the CPU): float64 within
    rounding of the reference, channels-last output; with a gradient the fast form's backward runs instead of a
    compiled one; a whole OffSeg-T in the compiled form gives the reference logits in float32."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    for kernel_size, scale in [(3, 1), (5, 2)]:
        features = torch.randn(2, 6, 5, 7, dtype=F64)
        masks = torch.randn(2, kernel_size**2, 5 * scale, 7 * scale, dtype=F64).softmax(dim=1)
        with torch.no_grad():
            out = fast_freqfusion.compiled_carafe(features, masks, kernel_size, scale)
        torch.testing.assert_close(out, carafe(features, masks, kernel_size, scale), rtol=0, atol=1e-13)
        assert out.is_contiguous(memory_format=torch.channels_last)
    compiled_graphs = counters["stats"]["unique_graphs"]
    assert compiled_graphs >= 2  # one per (k, s), at least

    # With a gradient: the hand-written backward, nothing compiled.
    features.requires_grad_()
    masks.requires_grad_()
    out = fast_freqfusion.compiled_carafe(features, masks, 5, 2)
    assert type(out.grad_fn).__name__ == "CarafeFunctionBackward"
    expected = gradients(carafe(features, masks, 5, 2), [features, masks])
    for ours, theirs in zip(gradients(out, [features, masks]), expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    assert counters["stats"]["unique_graphs"] == compiled_graphs

    # The model's calls (other sizes and channel counts, the same dtype) reuse or add dynamic-shape graphs.
    model = offseg_t().eval()
    pixels = torch.randn(2, 3, 64, 96, dtype=F64)
    with torch.no_grad(), using_form(model, "reference"):
        reference = model(pixels).logits
    with torch.no_grad(), using_form(model, "compiled"):
        logits = model(pixels).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-11)


def test_a_form_is_set_per_instance_and_restored():
    model, other = offseg_t(), offseg_t()
    modules = [module for module in model.modules() if isinstance(module, HasForms)]
    # The top model (its loss), offset learning, each FreqFusion with its resampler, the decoder's ConvNormAct blocks
    # (one per stage and the align) and the encoder's talking-head attentions.
    decoder = model.offseg.decode_head
    attentions = [module for module in model.offseg.encoder.modules() if hasattr(module, "talking_head1")]
    assert len(attentions) == 4  # OffSeg-T: EfficientFormerV2-S1's last two blocks of stages 3 and 4
    assert len(modules) == 2 + 2 * len(decoder.fusions) + len(decoder.stage_projections) + 1 + len(attentions)
    assert {module.form for module in modules} == {"fast"}
    with pytest.raises(RuntimeError, match="inside"):
        with using_form(model, "export"):
            assert {module.form for module in modules} == {"export"}
            assert {module.form for module in other.modules() if isinstance(module, HasForms)} == {"fast"}
            assert "form" not in vars(type(model.classifier))  # the class default is never written
            raise RuntimeError("inside")
    assert {module.form for module in modules} == {"fast"}
    set_form(model, "reference")
    assert {module.form for module in modules} == {"reference"} and HasForms.form == "fast"
    with pytest.raises(ValueError, match=r"Unknown form 'slow'; the forms are reference, fast, compiled, export"):
        set_form(model, "slow")
    assert FORMS == ("reference", "fast", "compiled", "export")
