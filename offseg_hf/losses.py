"""The segmentation loss: cross entropy of logits upsampled bilinearly to the label size (mmseg's and transformers'
SegFormer loss), computed band by band with the upsampling as two small matrix products.

    loss = F.cross_entropy(F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False),
                           labels, ignore_index=ignore_index)

Written that way, a training step materialises the full-resolution logits, their log-softmax and two gradients of
that size (at batch 2, 150 classes and 512x512 crops, four 315 MB tensors, freshly allocated), and ATen's CPU
bilinear backward alone took about 200 ms of it. `upsampled_cross_entropy` computes the same mean over the
non-ignored pixels:

* Bilinear upsampling (align_corners=False) is separable: `up = R_h X R_w^T`, with R the (out, in) matrices of the 1-D
  linear interpolation weights, built by interpolating an identity matrix with `F.interpolate` itself (so the weights
  and the border clamping are PyTorch's). The products (and their gradients) run as GEMMs.
* The label rows are taken in bands; a band needs only the few logits rows its rows of R_h touch. Each band's
  full-resolution tensors are about 4 MB and die with it, and its gradient with respect to those logits rows is taken
  at once (`torch.autograd.grad` through PyTorch's own cross entropy), so the forward keeps only the gradient of the
  small logits map, which the backward scales.

Measured (batch 2, 150 classes, 128 -> 512 px, 2 CPU threads): 650 ms for the loss and its backward written as
above, 235 ms this way; loss within 3e-7 and gradients within 1e-6 relative of it. Under torch.compile the plain
formula runs (the compiler fuses it itself).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Full-resolution elements (batch x classes x rows x width) per band: about 4 MB of float32.
BAND_ELEMENTS = 1 << 20


def upsampled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean cross entropy of `logits` (B, K, h, w) bilinearly upsampled to the size of `labels` (B, H, W), pixels
    labelled `ignore_index` left out (nan if all are); equal to the plain formula (see the module docstring) up to
    float rounding."""
    if torch.compiler.is_compiling():
        upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(upsampled, labels, ignore_index=ignore_index)
    with_gradient = torch.is_grad_enabled() and logits.requires_grad
    return _BandedUpsampledCrossEntropy.apply(logits, labels, ignore_index, with_gradient)


def interpolation_matrix(out_size: int, in_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(out_size, in_size) weights of 1-D linear interpolation with align_corners=False: row i holds the (at most two)
    weights output i takes from the inputs, exactly those `F.interpolate` uses."""
    identity = torch.eye(in_size, device=device, dtype=dtype)[None]  # (1, in, in): one impulse per input
    return F.interpolate(identity, size=out_size, mode="linear", align_corners=False)[0].t().contiguous()


def _banded_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, with_gradient: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross entropy over the non-ignored pixels (float64) and, if asked, its gradient w.r.t. `logits`."""
    batch_size, num_classes, rows, width = logits.shape
    height, out_width = labels.shape[-2:]
    rows_matrix = interpolation_matrix(height, rows, logits.device, logits.dtype)  # R_h: (H, h)
    cols_matrix_t = interpolation_matrix(out_width, width, logits.device, logits.dtype).t()  # R_w^T: (w, W)
    band = max(1, BAND_ELEMENTS // (batch_size * num_classes * out_width))  # label rows per band
    grad = torch.zeros_like(logits) if with_gradient else None
    total = logits.new_zeros((), dtype=torch.float64)
    for top in range(0, height, band):
        bottom = min(top + band, height)
        used = rows_matrix[top:bottom].ne(0).any(dim=0).nonzero()  # the logits rows this band reads
        low, high = int(used[0]), int(used[-1]) + 1
        crop = logits[:, :, low:high]
        if with_gradient:
            crop = crop.detach().requires_grad_()
        with torch.set_grad_enabled(with_gradient):
            widened = torch.matmul(crop, cols_matrix_t)  # (B, K, rows used, W)
            upsampled = torch.matmul(rows_matrix[top:bottom, low:high], widened)  # (B, K, band, W)
            band_sum = F.cross_entropy(upsampled, labels[:, top:bottom], ignore_index=ignore_index, reduction="sum")
        if with_gradient:
            (band_grad,) = torch.autograd.grad(band_sum, crop)
            grad[:, :, low:high] += band_grad
        total += band_sum.detach()
    return total, grad


class _BandedUpsampledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, with_gradient):
        # At least float32 whatever the caller's autocast: the plain formula's cross entropy runs in float32 under
        # autocast too (and float64 logits stay float64).
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.autocast(logits.device.type, enabled=False):
            work = logits.detach().to(dtype).contiguous()
            total, grad = _banded_loss_sum(work, labels, ignore_index, with_gradient)
        count = (labels != ignore_index).sum()
        ctx.save_for_backward(grad.to(logits.dtype) if grad is not None else None, count)
        return (total / count).to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad, count = ctx.saved_tensors
        return grad * (grad_output / count).to(grad.dtype), None, None, None
