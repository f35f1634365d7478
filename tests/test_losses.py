"""The banded, GEMM-upsampled segmentation loss (offseg_hf/models/fast_losses.py, the default form of
`losses.upsampled_cross_entropy`) against the plain formula (its reference form)."""

import pytest
import torch
from torch.nn import functional as F

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation
from offseg_hf.models import fast_losses
from offseg_hf.models.fast_losses import interpolation_matrix
from offseg_hf.models.losses import upsampled_cross_entropy


def plain_loss(logits, labels, ignore_index=255):
    upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(upsampled, labels, ignore_index=ignore_index)
    # The package's reference form is this formula, term for term.
    reference = upsampled_cross_entropy(logits, labels, ignore_index, form="reference")
    torch.testing.assert_close(reference, loss, rtol=0, atol=0, equal_nan=True)
    return loss


def labelled(batch, classes, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (batch, height, width), generator=generator)
    labels[:, :3] = 255  # an ignored band
    labels[0, -1, : width // 2] = 255
    return labels


@pytest.mark.parametrize(
    "logits_size, label_size",
    [((16, 24), (64, 96)), ((8, 8), (64, 64)), ((10, 13), (31, 27)), ((9, 9), (9, 9)), ((20, 20), (7, 5))],
    ids=["x4", "x8", "non-integer", "same", "downsampling"],
)
def test_loss_and_gradient_equal_the_plain_formula(logits_size, label_size, monkeypatch):
    """float64, so any difference beyond rounding would show; bands of a few rows (the margin rows at every band
    edge are exercised)."""
    monkeypatch.setattr(fast_losses, "BAND_ELEMENTS", 2 * 5 * label_size[1] * 3)  # 3 label rows per band
    torch.manual_seed(0)
    logits = torch.randn(2, 5, *logits_size, dtype=torch.float64, requires_grad=True)
    labels = labelled(2, 5, *label_size)
    ours = upsampled_cross_entropy(logits, labels)
    (ours_grad,) = torch.autograd.grad(ours * 3.0, logits)
    reference = plain_loss(logits, labels)
    (reference_grad,) = torch.autograd.grad(reference * 3.0, logits)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=0, atol=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(upsampled_cross_entropy(logits, labels), reference.detach(), rtol=1e-12, atol=0)


def test_interpolation_matrix_reproduces_bilinear_upsampling():
    torch.manual_seed(0)
    image = torch.randn(1, 2, 7, 11, dtype=torch.float64)
    rows, cols = interpolation_matrix(20, 7, dtype=torch.float64), interpolation_matrix(33, 11, dtype=torch.float64)
    assert rows.shape == (20, 7) and (rows.ne(0).sum(dim=1) <= 2).all()
    torch.testing.assert_close(rows.sum(dim=1), torch.ones(20, dtype=torch.float64))
    expected = F.interpolate(image, size=(20, 33), mode="bilinear", align_corners=False)
    torch.testing.assert_close(rows @ image @ cols.t(), expected, rtol=0, atol=1e-14)


def test_every_pixel_ignored_gives_nan_like_cross_entropy():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.full((1, 8, 8), 255)
    assert torch.isnan(upsampled_cross_entropy(logits, labels)) and torch.isnan(plain_loss(logits, labels))


def test_float32_and_bf16_autocast():
    torch.manual_seed(0)
    logits = torch.randn(2, 150, 32, 32, requires_grad=True)
    labels = labelled(2, 150, 128, 128)
    torch.testing.assert_close(upsampled_cross_entropy(logits, labels), plain_loss(logits, labels), rtol=1e-6, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = logits.to(torch.bfloat16)
        ours = upsampled_cross_entropy(low, labels)
        reference = plain_loss(low, labels)
    assert ours.dtype == torch.float32 and reference.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=2e-2, atol=0)  # bf16 rounding of the upsampled map
    (grad,) = torch.autograd.grad(ours, logits)
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


def test_model_loss_is_the_plain_formula_on_its_logits():
    config = OffSegConfig.from_variant("segformer-b0-offset", num_labels=7)
    model = OffSegForSemanticSegmentation(config).double().train()
    pixels = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    labels = labelled(2, 7, 64, 96)
    output = model(pixels, labels=labels)
    torch.testing.assert_close(output.loss, plain_loss(output.logits, labels), rtol=1e-12, atol=0)
    output.loss.backward()
    assert all(p.grad is not None for p in model.classifier.parameters())
