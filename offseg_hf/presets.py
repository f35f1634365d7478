"""Every named preset, whatever its model class: one place that turns a variant name into a config and a model.

Two config classes carry the presets: `OffSegConfig` (SegFormer-offset, OffSeg, SegNeXt: `VARIANTS`) and
`OffSegMask2FormerConfig` (Mask2Former: `MASK2FORMER_VARIANTS`); `OffSegConfig.from_variant` builds either. Scripts
and tools that take `--variant` build models with `model_for_variant`, and group presets by `variant_family` (the
decode head; "mask2former" for Mask2Former).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from transformers import PreTrainedModel

from .models.configuration_mask2former import MASK2FORMER_PAPER_FIGURES, MASK2FORMER_VARIANTS, OffSegMask2FormerConfig
from .models.configuration_offseg import PAPER_FIGURES, VARIANTS, OffSegConfig, unknown_variant_message
from .models.modeling_mask2former import OffSegMask2FormerForSemanticSegmentation
from .models.modeling_offseg import ENCODERS, OffSegForSemanticSegmentation

MASK2FORMER_FAMILY = "mask2former"


def all_variant_names() -> list[str]:
    """Every preset (`OffSegConfig.variant_names()`): the `OffSegConfig` ones, then Mask2Former's."""
    return OffSegConfig.variant_names()


def paper_figures(name: str) -> dict[str, float]:
    """The paper's figures for a preset (empty when the paper reports none)."""
    return {**PAPER_FIGURES, **MASK2FORMER_PAPER_FIGURES}.get(name, {})


ALL_VARIANTS: tuple[str, ...] = tuple(all_variant_names())


def _check(name: str) -> None:
    if name not in VARIANTS and name not in MASK2FORMER_VARIANTS:
        raise ValueError(unknown_variant_message(name))


def variant_family(name: str) -> str:
    """The model family of a preset: its decode head ("segformer", "offseg", "lightham") or "mask2former"."""
    _check(name)
    return MASK2FORMER_FAMILY if name in MASK2FORMER_VARIANTS else VARIANTS[name]["decode_head"]


def has_offset_learning(name: str) -> bool:
    """Whether a preset classifies with offset learning (else it is a per-pixel or plain Mask2Former baseline)."""
    _check(name)
    if name in MASK2FORMER_VARIANTS:
        return MASK2FORMER_VARIANTS[name]["offset_learning"]
    return VARIANTS[name]["classifier"] == "offset"


def model_for_variant(name: str, **overrides) -> PreTrainedModel:
    """A fresh (randomly initialised) model of a preset: its config from `OffSegConfig.from_variant` (the one door to
    a preset's config), with overrides. `offseg_hf.convert.from_pretrained_encoder` starts one from ImageNet
    weights."""
    config = OffSegConfig.from_variant(name, **overrides)
    if isinstance(config, OffSegMask2FormerConfig):
        return OffSegMask2FormerForSemanticSegmentation(config)
    return OffSegForSemanticSegmentation(config)


# What `offseg_hf.convert.official.from_pretrained_encoder` takes for Mask2Former's Swin (`convert.load_swin_imagenet`).
_SWIN_SOURCES = "the official mmseg-format Swin-T ImageNet .pth file or a saved transformers Swin folder"


def encoder_sources(name: str) -> tuple[str, str, Callable[[str], bool]]:
    """For a preset's backbone: its name, what pretrained weights it takes (in words), and a check of a path/name."""
    if variant_family(name) == MASK2FORMER_FAMILY:
        return "Swin", _SWIN_SOURCES, os.path.exists
    encoder = ENCODERS[VARIANTS[name]["encoder_config"]["model_type"]]
    return encoder.display_name, encoder.pretrained_sources, encoder.accepts_pretrained


__all__ = [
    "ALL_VARIANTS",
    "MASK2FORMER_FAMILY",
    "all_variant_names",
    "encoder_sources",
    "has_offset_learning",
    "model_for_variant",
    "paper_figures",
    "variant_family",
]
