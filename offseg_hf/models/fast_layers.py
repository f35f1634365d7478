"""The fast form of a 1x1 convolution (`layers.py` and the EfficientFormerV2 attention hold the reference,
`nn.Conv2d`; `forms.py` says how a module chooses).

A 1x1 convolution with stride 1 and one group is a matrix product over the channels: out[b, :, p] = W x[b, :, p]
(+ bias) at every position p. On a channels-first (NCHW) map, `x[b]` viewed as (C_in, H*W) is already the right
operand, so `pointwise_conv` computes `W @ x.flatten(2)` as one batched product, with no copy in or out.

Why (measured on a 2-core AMD EPYC, docs/speed.md, `benchmarks/pointwise_conv.py`): with more than one thread, ATen
runs such a convolution through oneDNN, which copies the map into its blocked layout and the result back out. Those
copies touch about three times the memory the product does, and in a model forward the large buffers are fresh pages
(glibc gives freed memory back), where every first touch is a page fault. Inside OffSeg-T at 512x512 the decoder's
256 -> 256 align convolution at 1/4 scale took 23 ms as a convolution and 16 ms as the product (the whole forward
4% less); EfficientFormerV2's talking heads (8 -> 8 channels over a 256 x 256 attention map) about a third of the
convolution's time. With one thread ATen already computes the convolution as this product. Channels-last maps are
oneDNN's own layout and keep the convolution, as do exported graphs (ONNX Runtime and XNNPACK run 1x1 convolutions as
GEMMs themselves) and other devices (not measured).
"""

from __future__ import annotations

import torch
from torch import nn

from .forms import pointwise_as_matmul


def is_pointwise(conv: nn.Conv2d) -> bool:
    """Whether `conv` is a plain 1x1 convolution: `nn.Conv2d`'s own forward (not a subclass that adds to it, such
    as BatchNorm folding's convolution + activation), stride 1, no padding, one group, zero padding mode."""
    return (
        type(conv).forward is nn.Conv2d.forward
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def pointwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a 1x1 `conv`, as one matrix product of its (C_out, C_in) weight with the (B, C_in, H*W) view of
    `x` where `forms.pointwise_as_matmul(x)` allows it (and `conv` is a plain 1x1 convolution), else `conv(x)`. The
    same values up to float rounding; the output is channels-first (B, C_out, H, W)."""
    if not (pointwise_as_matmul(x) and is_pointwise(conv)):
        return conv(x)
    batch_size, _, height, width = x.shape
    weight = conv.weight.flatten(1)  # (C_out, C_in)
    # bmm with the weight broadcast over the batch writes (B, C_out, H*W) directly; `torch.matmul` of the 2-D weight
    # would fold the batch into a transposed product and copy the result back.
    out = torch.bmm(weight.expand(batch_size, *weight.shape), x.flatten(2))
    if conv.bias is not None:
        # The bias in the product's dtype: under autocast the product is bf16/fp16, as the convolution's output is.
        out = out + conv.bias.to(out.dtype)[:, None]
    return out.view(batch_size, -1, height, width)


__all__ = ["is_pointwise", "pointwise_conv"]
