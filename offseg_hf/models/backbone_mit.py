"""MiT (Mix Transformer), SegFormer's encoder, from `transformers`' SegformerModel, as an OffSeg backbone."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import SegformerConfig, SegformerModel

from .encoder import EncoderOutput

# Encoder sizes a pretrained checkpoint must share with the variant to load.
_SIZE_FIELDS = ("hidden_sizes", "depths", "num_attention_heads", "sr_ratios", "patch_sizes", "strides")


class MixTransformerEncoder(SegformerModel):
    """transformers' `SegformerModel` with mmseg's LayerNorm eps, returning the four stage maps.

    transformers builds the MiT LayerNorms with torch's default eps (1e-5); mmseg and the original SegFormer use the
    config's `layer_norm_eps` (1e-6) for every one of them, and converted official weights need it. Parameter names
    are SegformerModel's, so `nvidia/mit-b*` weights load unchanged.
    """

    has_attentions = True
    display_name = "MiT"
    pretrained_sources = "a Hub id like nvidia/mit-b0 or a saved SegformerModel folder"

    @staticmethod
    def accepts_pretrained(name_or_path: str) -> bool:
        return not os.path.isfile(name_or_path) and "efficientformer" not in name_or_path.lower()

    def __init__(self, config: SegformerConfig):
        super().__init__(config)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = config.layer_norm_eps

    @classmethod
    def from_encoder_config(cls, config: SegformerConfig) -> MixTransformerEncoder:
        return cls(config)

    @property
    def channels(self) -> list[int]:
        return list(self.config.hidden_sizes)

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> EncoderOutput:
        if output_attentions and self.config._attn_implementation != "eager":
            # Fused attention kernels never form the weights; returning an empty tuple would look like success.
            raise ValueError(
                f"output_attentions=True needs eager attention, but the MiT encoder uses "
                f"{self.config._attn_implementation!r}: load the model with attn_implementation='eager' or call "
                "model.set_attn_implementation('eager') first."
            )
        outputs = super().forward(
            pixel_values, output_hidden_states=True, output_attentions=output_attentions, return_dict=True
        )
        return EncoderOutput(feature_maps=tuple(outputs.hidden_states), attentions=outputs.attentions)

    def load_pretrained(self, name_or_path: str) -> None:
        """Weights of a `SegformerModel` (a Hub id such as `"nvidia/mit-b0"`, or a folder saved from one) of the same
        size as this encoder; raises `ValueError` naming the first size field that differs."""
        pretrained = SegformerModel.from_pretrained(name_or_path)
        for field in _SIZE_FIELDS:
            ours, theirs = list(getattr(self.config, field)), list(getattr(pretrained.config, field))
            if ours != theirs:
                raise ValueError(
                    f"Encoder checkpoint {name_or_path!r} has {field}={theirs}, but this model needs {ours}."
                )
        self.load_state_dict(pretrained.state_dict(), strict=True)


__all__ = ["MixTransformerEncoder"]
