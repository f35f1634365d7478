"""CARAFE and FreqFusion (offseg_hf/models/freqfusion.py)."""

import pytest
import torch
from torch.nn import functional as F

from offseg_hf.models import fast_freqfusion
from offseg_hf.models.fast_freqfusion import (
    CarafeFunction,
    carafe_by_gather,
    carafe_by_taps,
    grid_sample_by_gather,
    neighbour_dots_by_gather,
    neighbour_dots_by_shifts,
)
from offseg_hf.models.forms import using_form
from offseg_hf.models.freqfusion import FreqFusion, SimilarityGuidedResampler, carafe, neighbour_cosine_similarity


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
    torch.testing.assert_close(
        fast_freqfusion.carafe(features, masks, kernel_size, scale), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("scale", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_carafe_backward_matches_the_recorded_tap_loop(kernel_size, scale, channels_last):
    """With gradients the op is one autograd node with a hand-written backward: gradcheck passes (float64), and both
    gradients equal those autograd records through the plain tap loop, on NCHW and channels-last features."""
    torch.manual_seed(0)
    features = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    features.requires_grad_()
    masks = torch.randn(2, kernel_size**2, 5 * scale, 6 * scale, dtype=torch.float64).softmax(dim=1)
    masks.requires_grad_()
    out = fast_freqfusion.carafe(features, masks, kernel_size, scale)
    assert out.grad_fn is not None and "CarafeFunction" in type(out.grad_fn).__name__
    assert torch.autograd.gradcheck(lambda f, m: fast_freqfusion.carafe(f, m, kernel_size, scale), (features, masks))
    weights = torch.randn_like(out)
    ours = torch.autograd.grad((out * weights).sum(), [features, masks])
    recorded = torch.autograd.grad(
        (carafe_by_taps(features, masks, kernel_size, scale) * weights).sum(), [features, masks]
    )
    for a, b in zip(ours, recorded, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # One input needing gradient only: the other's gradient is not computed.
    frozen = CarafeFunction.apply(features.detach(), masks, kernel_size, scale)
    (grad_masks,) = torch.autograd.grad((frozen * weights).sum(), [masks])
    torch.testing.assert_close(grad_masks, ours[1], rtol=0, atol=1e-12)


def test_carafe_without_gradients_is_the_plain_tap_loop():
    features, masks = torch.randn(1, 4, 6, 6, requires_grad=True), torch.rand(1, 9, 6, 6)
    with torch.no_grad():
        assert fast_freqfusion.carafe(features, masks, 3, 1).grad_fn is None
    fast = fast_freqfusion.carafe(features, masks, 3, 1).detach()
    assert torch.equal(fast, carafe_by_taps(features, masks, 3, 1).detach())


def test_carafe_rejects_mismatched_masks():
    with pytest.raises(ValueError, match="masks must have shape"):
        carafe(torch.randn(1, 2, 4, 4), torch.randn(1, 25, 7, 8), 5, 2)
    with pytest.raises(ValueError, match="masks must have shape"):
        fast_freqfusion.carafe(torch.randn(1, 2, 4, 4), torch.randn(1, 25, 7, 8), 5, 2)


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("scale", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_carafe_gather_form_matches_the_tap_loop(kernel_size, scale, channels_last):
    """The export form (window gather + batched product) equals the tap loop to float64 rounding, at a non-square
    size, batch 2, both memory layouts, and the reference form to the same rounding."""
    torch.manual_seed(0)
    features = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    masks = torch.randn(2, kernel_size**2, 5 * scale, 7 * scale, dtype=torch.float64).softmax(dim=1)
    expected = carafe_by_taps(features, masks, kernel_size, scale)
    gathered = carafe_by_gather(features, masks, kernel_size, scale)
    torch.testing.assert_close(gathered, expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(carafe(features, masks, kernel_size, scale), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("out_size", [(9, 11), (4, 3)])
def test_grid_sample_gather_form_matches_grid_sample(out_size):
    """Bilinear, border padding, align_corners=False, with sample points inside, on the borders exactly and far
    outside the map (clipped), up- and down-sampling; 2 images of 3 channel groups, each group sampled at its own
    points, read from the channels-last map."""
    torch.manual_seed(0)
    planes = torch.randn(6, 5, 6, 8, dtype=torch.float64)  # (B * groups, C / groups, H, W)
    grid = torch.rand(6, *out_size, 2, dtype=torch.float64) * 3 - 1.5
    grid[0, 0, 0] = torch.tensor([1.0, 1.0])
    grid[0, 0, 1] = torch.tensor([-1.0, -1.0])
    grid[4, 0, 0] = torch.tensor([7 / 8, 5 / 6])  # exactly the last pixel centre: the clamped neighbour has weight 0
    expected = F.grid_sample(planes, grid, mode="bilinear", padding_mode="border", align_corners=False)
    rows = planes.reshape(2, 15, 6, 8).permute(0, 2, 3, 1)  # (B, H, W, C), group g = channels 5g .. 5g + 4
    sampled = grid_sample_by_gather(rows, grid, groups=3)  # (B, oh, ow, C)
    torch.testing.assert_close(sampled.permute(0, 3, 1, 2).reshape(6, 5, *out_size), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dilation", [1, 2])
def test_neighbour_dots_gather_form_matches_the_loop(dilation):
    torch.manual_seed(0)
    unit = torch.randn(2, 5, 7, 9, dtype=torch.float64)
    expected = neighbour_dots_by_shifts(unit, 3, dilation)
    torch.testing.assert_close(neighbour_dots_by_gather(unit, 3, dilation), expected, rtol=0, atol=1e-13)


def test_freqfusion_gather_forms_match_eager():
    torch.manual_seed(0)
    fusion = FreqFusion(hr_channels=32, lr_channels=64, compressed_channels=24).double().eval()
    for param in fusion.parameters():
        param.data.normal_(0, 0.1)
    hr, lr = torch.randn(2, 32, 15, 18, dtype=torch.float64), torch.randn(2, 64, 8, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = fusion(hr, lr)
        with using_form(fusion, "export"):
            gathered = fusion(hr, lr)
        assert fusion.form == "fast" and fusion.resampler.form == "fast"  # restored
    for ours, reference in zip(gathered, expected, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


def test_neighbour_similarity_matches_unfold_definition():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 7, 9)
    unfolded = F.unfold(x, 3, padding=2, dilation=2).view(2, 8, 9, 7, 9)
    reference = F.cosine_similarity(unfolded[:, :, 4:5], unfolded, dim=1)  # (B, 9, H, W)
    reference = torch.cat([reference[:, :4], reference[:, 5:]], dim=1)
    for form in ("reference", "fast", "export"):
        torch.testing.assert_close(neighbour_cosine_similarity(x, form=form), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_neighbour_similarity_backward_matches_the_recorded_loop(channels_last):
    """With gradients the neighbour dot products are one autograd node with an in-place backward: gradcheck passes
    (float64) and the gradient equals the one autograd records through the plain loop."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = neighbour_cosine_similarity(x, form="fast")
    assert "NeighbourDots" in type(out.grad_fn).__name__
    assert torch.autograd.gradcheck(lambda y: neighbour_cosine_similarity(y, form="fast"), (x,))
    weights = torch.randn_like(out)
    (ours,) = torch.autograd.grad((out * weights).sum(), x)
    unit = x / x.square().sum(dim=1, keepdim=True).sqrt().clamp_min(1e-8)
    (recorded,) = torch.autograd.grad((neighbour_dots_by_shifts(unit, 3, 2) * weights).sum(), x)
    torch.testing.assert_close(ours, recorded, rtol=0, atol=1e-12)


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


def test_model_initialisation_gives_freqfusion_the_official_init():
    """Through the model's init (as `from_pretrained` runs it for missing weights): the resampler's scale convs start
    at zero, so sampling starts at the sub-pixel centres; kernel encoders and offset convs normal(0, 1e-3);
    compressors Xavier-uniform with zero bias."""
    from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation

    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(OffSegConfig.from_variant("offseg-t", num_labels=4))
    fusions = list(model.offseg.decode_head.fusions)
    assert len(fusions) == 3
    for fusion in fusions:
        resampler = fusion.resampler
        for conv in (resampler.direct_scale, resampler.hr_direct_scale):
            assert not conv.weight.any() and not conv.bias.any()
        for conv in (fusion.lowpass_encoder, fusion.highpass_encoder, resampler.offset, resampler.hr_offset):
            assert 5e-4 < conv.weight.std() < 2e-3 and not conv.bias.any()
        for conv in (fusion.hr_compressor, fusion.lr_compressor):
            fan_out, fan_in = conv.weight.shape[:2]
            bound = (6 / (fan_in + fan_out)) ** 0.5
            assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.5 * bound
            assert not conv.bias.any()


def test_resampler_samples_like_grid_sample_on_nchw_planes():
    """The resampler's grid (low-res centres plus per-group, per-phase offsets, normalised) against one built
    independently here: values and gradients equal, at batch 2."""
    torch.manual_seed(0)
    resampler = SimilarityGuidedResampler(channels=16, groups=4).double()
    x = torch.randn(2, 32, 10, 14, dtype=torch.float64, requires_grad=True)
    offsets = torch.randn(2, 2 * 4 * 4, 5, 7, dtype=torch.float64, requires_grad=True)
    ours = resampler.sample(x, offsets)

    # The same grid, built independently: per group and output pixel (2y + i, 2x + j), the low-res centre plus the
    # offset of phase (i, j), normalised to [-1, 1].
    off = offsets.view(2, 2, 4, 2, 2, 5, 7)  # (B, xy, G, i, j, h, w)
    xs = (torch.arange(7, dtype=torch.float64) + 0.5 + off[:, 0]) * 2 / 7 - 1  # (B, G, i, j, h, w)
    ys = (torch.arange(5, dtype=torch.float64).view(-1, 1) + 0.5 + off[:, 1]) * 2 / 5 - 1
    grid = torch.stack([xs, ys], dim=-1).permute(0, 1, 4, 2, 5, 3, 6).reshape(8, 10, 14, 2)
    reference = F.grid_sample(
        x.reshape(8, 8, 10, 14), grid, mode="bilinear", padding_mode="border", align_corners=False
    ).view(2, 32, 10, 14)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    channels_last = x.detach().permute(0, 2, 3, 1)  # (B, H, W, C), as the export form passes the upsampled map
    torch.testing.assert_close(resampler.sample(channels_last, offsets, channels_last=True), ours, rtol=0, atol=0)
    with using_form(resampler, "export"):
        torch.testing.assert_close(
            resampler.sample(channels_last, offsets, channels_last=True), ours, rtol=0, atol=1e-12
        )
    weights = torch.randn_like(ours)
    for a, b in zip(
        torch.autograd.grad((ours * weights).sum(), [x, offsets]),
        torch.autograd.grad((reference * weights).sum(), [x, offsets]),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
