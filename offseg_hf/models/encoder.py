"""The contract every OffSeg backbone meets, so the model never asks which backbone it has.

An encoder is an `nn.Module` built from the model config's `encoder_config` (`Encoder.from_encoder_config`) with

* `channels`: the widths of its four output maps (known from the config alone, before any forward pass);
* `has_attentions`: whether `forward(..., output_attentions=True)` can return attention maps;
* `forward(pixel_values, output_attentions=False) -> EncoderOutput`: the maps at strides 4, 8, 16 and 32, finest
  first, and the attention maps when asked for (an encoder without them raises `ValueError` instead);
* `load_pretrained(name_or_path)`: start from pretrained (e.g. ImageNet) weights, strictly;
* `display_name`, `pretrained_sources` (what `load_pretrained` takes, in words, for help and error messages) and
  `accepts_pretrained(name_or_path)` (whether a name or path is of that kind, checked before any work is done).

Fixes that one backbone needs to match the official model (MiT's LayerNorm eps, EfficientFormerV2's resizable
attention biases) live in that backbone's module. `OffSegModel` looks up the class by the encoder config's
`model_type` in `modeling_offseg.ENCODERS`.

transformers' own backbone API (`BackboneMixin`, `load_backbone`) is not used: it builds a backbone through
`AutoBackbone`, which has no MiT backbone class, and a timm backbone through `timm.create_model(features_only=True)`,
which renames the parameters (checkpoints would no longer load) and builds EfficientFormerV2 for one input size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class EncoderOutput(ModelOutput):
    """
    Args:
        feature_maps (`tuple(torch.FloatTensor)`): four maps `(batch_size, channels[i], height / s, width / s)` for
            strides s = 4, 8, 16, 32.
        attentions (`tuple(torch.FloatTensor)`, *optional*): attention weights, when asked for and available.
    """

    feature_maps: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def no_attentions_error(encoder_name: str) -> ValueError:
    return ValueError(
        f"output_attentions=True, but the {encoder_name} backbone does not return attention maps; leave "
        "output_attentions unset (or False) for this model."
    )


__all__ = ["EncoderOutput", "no_attentions_error"]
