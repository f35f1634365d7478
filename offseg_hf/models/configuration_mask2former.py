"""Configuration of Mask2Former with offset learning (the paper's Table 5), on `transformers`' Mask2Former."""

from __future__ import annotations

import copy
from typing import Any

from transformers import Mask2FormerConfig

# The official config (`mask2former_offset_learning_swin-t_8xb2-160k_ade20k-512x512`): Swin-T (96 channels, depths
# 2/2/6/2, heads 3/6/12/24, window 7, drop path 0.3), a 6-layer multi-scale deformable pixel decoder on 3 levels,
# 100 queries, 9 masked-attention decoder layers (transformers counts the initial prediction: 10), 256 channels.
_SWIN_T = {
    "model_type": "swin",
    "embed_dim": 96,
    "depths": [2, 2, 6, 2],
    "num_heads": [3, 6, 12, 24],
    "window_size": 7,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "drop_path_rate": 0.3,
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}

MASK2FORMER_VARIANTS: dict[str, dict[str, Any]] = {
    "mask2former-swin-t-offset": {"backbone_config": _SWIN_T, "offset_learning": True},
    "mask2former-swin-t": {"backbone_config": _SWIN_T, "offset_learning": False},
}

# Table 5 of the paper: params (M) at 150 classes, ADE20K mIoU (single scale).
MASK2FORMER_PAPER_FIGURES: dict[str, dict[str, float]] = {
    "mask2former-swin-t": {"params_m": 47.4, "ade20k_miou": 47.7},
    "mask2former-swin-t-offset": {"params_m": 47.6, "ade20k_miou": 50.3},
}

# What a saved folder's config.json names for `trust_remote_code=True` loading where offseg-hf is not installed.
MASK2FORMER_AUTO_MAP = {
    "AutoConfig": "configuration_mask2former.OffSegMask2FormerConfig",
    "AutoModelForSemanticSegmentation": "modeling_mask2former.OffSegMask2FormerForSemanticSegmentation",
    "AutoImageProcessor": "image_processing_offseg.OffSegImageProcessor",
}


class OffSegMask2FormerConfig(Mask2FormerConfig):
    r"""
    `transformers`' `Mask2FormerConfig` plus the paper's offset learning between mask embeddings and mask features.

    Args:
        offset_learning (`bool`, *optional*, defaults to `True`):
            Align the mask embeddings (class side) and the per-pixel mask features with one offset module shared by
            every mask prediction (`offseg_hf.models.offset_learning.MaskOffsetLearning`); `False` is plain Mask2Former.
        offset_initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the truncated-normal init of the two offset projections (the official `init_std`).
        size_divisor (`int`, *optional*, defaults to 32):
            Inputs are zero-padded (after normalisation) to a multiple of this, as mmseg's test pipeline pads them;
            semantic logits are computed at the padded size and cropped back.

    Every other argument is `Mask2FormerConfig`'s; its loss weights (class 2.0 with no-object 0.1, mask 5.0, dice
    5.0, 12544 points, oversampling 3.0, importance 0.75) are the official config's.
    """

    model_type = "offseg_mask2former"

    offset_learning: bool = True
    offset_initializer_range: float = 0.02
    size_divisor: int = 32

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.auto_map = {**MASK2FORMER_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        if self.id2label is not None and self.label2id is None:
            self.label2id = {label: index for index, label in self.id2label.items()}


def mask2former_preset_config(name: str, **overrides) -> OffSegMask2FormerConfig:
    """The config of a Mask2Former preset (`mask2former-swin-t-offset`, `mask2former-swin-t`), for
    `OffSegConfig.from_variant`, the one door to every preset's config: keyword overrides replace preset values, a
    `backbone_config` dict is merged into the preset's."""
    values = copy.deepcopy(MASK2FORMER_VARIANTS[name])
    values["backbone_config"].update(overrides.pop("backbone_config", None) or {})
    values.update(overrides)
    if "id2label" in values and "num_labels" not in overrides:
        values["num_labels"] = len(values["id2label"])
    values.setdefault("num_labels", 150)
    return OffSegMask2FormerConfig(**values)


__all__ = ["MASK2FORMER_PAPER_FIGURES", "MASK2FORMER_VARIANTS", "OffSegMask2FormerConfig", "mask2former_preset_config"]
