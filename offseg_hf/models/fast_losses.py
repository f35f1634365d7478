"""The fast form of the segmentation loss (`losses.py` holds the reference form; `forms.py` says how it is chosen):
cross entropy of logits upsampled bilinearly to the label size, computed band by band with the upsampling as two
small matrix products.

Written plainly (`losses.upsampled_cross_entropy` with `form="reference"`), a training step materialises the
full-resolution logits, their log-softmax and two gradients of that size (at batch 2, 150 classes and 512x512 crops,
four 315 MB tensors, freshly allocated), and ATen's CPU bilinear backward is slow on them. This computes the same
mean over the non-ignored pixels:

* Bilinear upsampling (align_corners=False) is separable: `up = R_h X R_w^T`, with R the (out, in) matrices of the 1-D
  linear interpolation weights, built by interpolating an identity matrix with `F.interpolate` itself (so the weights
  and the border clamping are PyTorch's). The products (and their gradients) run as GEMMs.
* The label rows are taken in bands; a band needs only the few logits rows its rows of R_h touch. Each band's
  full-resolution scores (classes last, about 8 MB) die with it, and its gradient with respect to those logits rows
  (softmax - one_hot, back through the transposed products) is taken at once, so the forward keeps only the
  gradient of the small logits map, which the backward scales.

Loss and gradients equal the plain formula's up to float rounding (tests/test_losses.py); the time each takes is
measured by benchmarks/train_step.py (docs/speed.md). Under torch.compile the plain formula runs (the compiler fuses
it itself).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Full-resolution elements (batch x rows x width x classes) per band: about 8 MB of float32.
BAND_ELEMENTS = 1 << 21


def banded_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean cross entropy of `logits` (B, K, h, w) bilinearly upsampled to the size of `labels` (B, H, W), pixels
    labelled `ignore_index` left out (nan if all are), band by band (module docstring)."""
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
    """Summed cross entropy over the non-ignored pixels (float64) and, if asked, its gradient w.r.t. `logits`.

    The work runs with the classes last, (B, rows, W, K), so every pixel's scores are contiguous for the
    log-sum-exp; the gradient of the band's mean-free sum is softmax - one_hot on non-ignored pixels, taken back
    through the two products by their transposes.
    """
    batch_size, num_classes, rows, width = logits.shape
    height, out_width = labels.shape[-2:]
    rows_matrix = interpolation_matrix(height, rows, logits.device, logits.dtype)  # R_h: (H, h)
    cols_matrix = interpolation_matrix(out_width, width, logits.device, logits.dtype)  # R_w: (W, w)
    scores = logits.permute(0, 2, 3, 1).contiguous()  # (B, h, w, K); no copy for offset learning's channels-last logits
    grad = torch.zeros_like(scores) if with_gradient else None
    band = max(1, BAND_ELEMENTS // (batch_size * num_classes * out_width))  # label rows per band
    total = logits.new_zeros((), dtype=torch.float64)
    # The first and last logits row each label row reads (one host transfer for all bands, not one per band).
    reads = rows_matrix.ne(0)
    first_read = reads.int().argmax(dim=1).tolist()
    last_read = (rows - 1 - reads.flip(1).int().argmax(dim=1)).tolist()
    for top in range(0, height, band):
        bottom = min(top + band, height)
        low, high = min(first_read[top:bottom]), max(last_read[top:bottom]) + 1  # the logits rows this band reads
        band_rows = rows_matrix[top:bottom, low:high]  # (band, r)
        widened = torch.matmul(cols_matrix, scores[:, low:high])  # (B, r, W, K)
        upsampled = torch.matmul(band_rows, widened.flatten(2)).view(batch_size, bottom - top, out_width, -1)
        band_labels = labels[:, top:bottom]  # (B, band, W)
        valid = band_labels != ignore_index
        targets = torch.where(valid, band_labels, 0).unsqueeze(-1)  # (B, band, W, 1)
        picked = upsampled.gather(-1, targets)  # (B, band, W, 1)
        # log-sum-exp and softmax in the band's buffer (torch.logsumexp makes two more full-size temporaries).
        peak = upsampled.amax(dim=-1, keepdim=True)
        exps = upsampled.sub_(peak).exp_()  # (B, band, W, K)
        norm = exps.sum(dim=-1, keepdim=True)
        losses = torch.where(valid.unsqueeze(-1), norm.log() + peak - picked, 0)
        total += losses.sum(dtype=torch.float64)
        if with_gradient:
            band_grad = exps.div_(norm)  # softmax
            band_grad.scatter_add_(-1, targets, -valid.unsqueeze(-1).to(band_grad.dtype))
            band_grad.mul_(valid.unsqueeze(-1))
            widened_grad = torch.matmul(band_rows.t(), band_grad.flatten(2))  # (B, r, W*K)
            grad[:, low:high] += torch.matmul(cols_matrix.t(), widened_grad.view(widened.shape))  # (B, r, w, K)
    return total, (grad.permute(0, 3, 1, 2) if with_gradient else None)  # (B, K, h, w), channels-last memory


class _BandedUpsampledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, with_gradient):
        # At least float32 whatever the caller's autocast: the plain formula's cross entropy runs in float32 under
        # autocast too (and float64 logits stay float64).
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.autocast(logits.device.type, enabled=False):
            work = logits.detach().to(dtype)  # any layout: the bands read it classes-last
            total, grad = _banded_loss_sum(work, labels, ignore_index, with_gradient)
        count = (labels != ignore_index).sum()
        ctx.save_for_backward(grad.to(logits.dtype) if grad is not None else None, count)
        return (total / count).to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad, count = ctx.saved_tensors
        return grad * (grad_output / count).to(grad.dtype), None, None, None
