"""transformers' Mask2Former pixel decoder in a form whose level sizes stay symbolic under `torch.export`.

The pixel decoder (`Mask2FormerPixelDecoder`) and its deformable-attention encoder
(`Mask2FormerPixelDecoderEncoderOnly`) turn the sizes of their feature levels, Python integers in eager mode and
symbolic sizes while exporting with dynamic height and width, into tensors in two places:

* the encoder's reference points are `torch.linspace(0.5, h - 0.5, h)` per level; with a symbolic `h` the exporter's
  decomposition of linspace bakes in the example's step count;
* the decoder turns its list of level sizes into a tensor with `torch.as_tensor` (for the levels' start indices),
  which bakes the example's sizes into the graph and makes the capture add guards on them.

`TraceablePixelDecoderEncoder` and `TraceablePixelDecoder` are subclasses that build those tensors with arithmetic
the exporter follows symbolically (an arange, scalar tensors stacked), and with torch's own functions when the
sizes are plain integers, so eager values are bitwise unchanged. `traceable_pixel_decoder(model)` gives the pixel
decoder of `model`, and of no other model, these classes for the duration of a block
(`offseg_hf.export.swin.swapped_classes`); neither `torch` nor `transformers` is modified.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.mask2former import modeling_mask2former as mask2former

from .swin import swapped_classes


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


def long_tensor(sizes: list, device) -> torch.Tensor:
    """A 1-D int64 tensor of `sizes`; symbolic sizes become stacked scalar tensors, which stay symbolic where
    `torch.as_tensor` would read them as the example's values."""
    if not any(_is_symbolic(size) for size in sizes):
        return torch.as_tensor(sizes, dtype=torch.long, device=device)
    return torch.stack([torch.full((), size, dtype=torch.long, device=device) for size in sizes])


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


class TraceablePixelDecoder(mask2former.Mask2FormerPixelDecoder):
    def forward(
        self, features, encoder_outputs=None, output_attentions=None, output_hidden_states=None, return_dict=None
    ):
        """The parent's pixel decoder: the coarsest `num_feature_levels` backbone maps, projected, through the
        deformable-attention encoder, then the FPN levels up to the mask features. The level start indices are
        built from the Python sizes (`long_tensor`) instead of `torch.as_tensor` of the size list."""
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        levels = features[::-1][: self.num_feature_levels]
        embeds = [projection(x) for projection, x in zip(self.input_projections, levels, strict=False)]
        positions = [self.position_embedding(x.shape, x.device, x.dtype) for x in levels]
        masks = [torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool) for x in embeds]

        sizes = [(embed.shape[2], embed.shape[3]) for embed in embeds]
        starts = [0]
        for height, width in sizes[:-1]:
            starts.append(starts[-1] + height * width)
        tokens = torch.cat([embed.flatten(2).transpose(1, 2) for embed in embeds], 1)
        level_positions = torch.cat(
            [
                position.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
                for level, position in enumerate(positions)
            ],
            1,
        )
        valid_ratios = torch.stack([self.get_valid_ratio(mask, dtype=tokens.dtype) for mask in masks], 1)
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                inputs_embeds=tokens,
                attention_mask=torch.cat([mask.flatten(1) for mask in masks], 1),
                position_embeddings=level_positions,
                spatial_shapes_list=sizes,
                level_start_index=long_tensor(starts, tokens.device),
                valid_ratios=valid_ratios,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
            )

        encoded = encoder_outputs.last_hidden_state
        batch_size, length = encoded.shape[:2]
        # The last level's length is what remains of the sequence, as the parent splits it: the same symbolic
        # expression, hence the same graph.
        lengths = [later - earlier for earlier, later in zip(starts, starts[1:], strict=False)]
        lengths.append(length - starts[-1])
        outputs = [
            level.transpose(1, 2).view(batch_size, -1, height, width)
            for level, (height, width) in zip(torch.split(encoded, lengths, dim=1), sizes, strict=True)
        ]
        fpn = zip(
            features[: self.num_fpn_levels][::-1], self.lateral_convolutions, self.output_convolutions, strict=False
        )
        for feature, lateral, output in fpn:
            lateral_feature = lateral(feature)
            coarser = F.interpolate(outputs[-1], size=lateral_feature.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(output(lateral_feature + coarser))

        return mask2former.Mask2FormerPixelDecoderOutput(
            mask_features=self.mask_projection(outputs[-1]),
            multi_scale_features=tuple(outputs[: self.num_feature_levels]),
            attentions=encoder_outputs.attentions,
        )


TRACEABLE_PIXEL_DECODER: dict[type[nn.Module], type[nn.Module]] = {
    mask2former.Mask2FormerPixelDecoder: TraceablePixelDecoder,
    mask2former.Mask2FormerPixelDecoderEncoderOnly: TraceablePixelDecoderEncoder,
}


def traceable_pixel_decoder(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Within the block, the Mask2Former pixel decoder of `model` keeps its level sizes symbolic under
    `torch.export` (module docstring); restored on exit. Other models are unaffected."""
    return swapped_classes(model, TRACEABLE_PIXEL_DECODER)


__all__ = [
    "TRACEABLE_PIXEL_DECODER",
    "TraceablePixelDecoder",
    "TraceablePixelDecoderEncoder",
    "linspace",
    "long_tensor",
    "traceable_pixel_decoder",
]
