"""transformers' Mask2Former pixel-decoder encoder in a form whose level sizes stay symbolic under `torch.export`.

The deformable-attention encoder (`Mask2FormerPixelDecoderEncoderOnly`) builds its reference points with
`torch.linspace(0.5, h - 0.5, h)` per feature level; with a symbolic `h` (an export with dynamic height and width)
the exporter's decomposition of linspace bakes in the example's step count, and ONNX Runtime then fails at any other
size. `TraceablePixelDecoderEncoder` builds them with the same arithmetic on an arange, which the exporter follows
symbolically, and with `torch.linspace` itself when the sizes are plain integers, so eager values are bitwise
unchanged. (The pixel decoder also turns its list of level sizes into a tensor with `torch.as_tensor`; with torch
2.14 the export keeps those sizes symbolic, and the values are never read, so it needs no form: the Mask2Former
export test would show it if a torch version started fixing them.) `traceable_pixel_decoder(model)` gives the pixel
decoder of `model`, and of no other model, these classes for the duration of a block
(`offseg_hf.export.subclasses.swapped_classes`); neither `torch` nor `transformers` is modified.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn
from transformers.models.mask2former import modeling_mask2former as mask2former

from .subclasses import swapped_classes


def _is_symbolic(size) -> bool:
    return isinstance(size, torch.SymInt)


def linspace(start: float, end, steps, dtype: torch.dtype, device) -> torch.Tensor:
    """`torch.linspace(start, end, steps)`; for a symbolic `steps`, written with the arithmetic of torch's kernel
    (the first half counts up from `start`, the second half down from `end`, in steps of
    (end - start) / (steps - 1)) on an arange, which keeps the step count symbolic."""
    if not _is_symbolic(steps):
        return torch.linspace(start, end, steps, dtype=dtype, device=device)
    index = torch.arange(steps, dtype=dtype, device=device)
    step = (end - start) / torch.sym_max(steps - 1, 1)
    ascending = index * step + start
    descending = end - (steps - 1 - index) * step
    return torch.where(index < steps // 2, ascending, descending)


class TraceablePixelDecoderEncoder(mask2former.Mask2FormerPixelDecoderEncoderOnly):
    @staticmethod
    def get_reference_points(spatial_shapes_list, valid_ratios: torch.Tensor, device) -> torch.Tensor:
        """The parent's reference points (every level's cell centres, normalised by the valid size), with
        `linspace` above for the centres."""
        dtype = valid_ratios.dtype
        points = []
        for level, (height, width) in enumerate(spatial_shapes_list):
            ys, xs = torch.meshgrid(
                linspace(0.5, height - 0.5, height, dtype, device),
                linspace(0.5, width - 0.5, width, dtype, device),
                indexing="ij",
            )
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            points.append(torch.stack((xs, ys), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


TRACEABLE_PIXEL_DECODER: dict[type[nn.Module], type[nn.Module]] = {
    mask2former.Mask2FormerPixelDecoderEncoderOnly: TraceablePixelDecoderEncoder,
}


def traceable_pixel_decoder(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Within the block, the Mask2Former pixel decoder of `model` keeps its level sizes symbolic under
    `torch.export` (module docstring); restored on exit. Other models are unaffected."""
    return swapped_classes(model, TRACEABLE_PIXEL_DECODER)


__all__ = [
    "TRACEABLE_PIXEL_DECODER",
    "TraceablePixelDecoderEncoder",
    "linspace",
    "traceable_pixel_decoder",
]
