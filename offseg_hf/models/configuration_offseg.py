"""OffSeg model configuration and the named variant presets of the paper."""

from __future__ import annotations

import copy
import difflib
from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_mask2former import MASK2FORMER_VARIANTS, OffSegMask2FormerConfig, mask2former_preset_config
from .configuration_mscan import MSCANConfig

# How the LightHam head's NMF starts in evaluation (see `decode_head_lightham`): bases from a fixed seed, or drawn
# from the global RNG on every forward as the official code does (for parity runs only).
EVAL_BASES = ("seeded", "global_rng")
# The timm EfficientFormerV2 models an OffSeg encoder can be (checked here, when a config is made).
EFFICIENTFORMER_V2_MODELS = (
    "efficientformerv2_s0",
    "efficientformerv2_s1",
    "efficientformerv2_s2",
    "efficientformerv2_l",
)


def check_eval_bases(value: str) -> None:
    if value not in EVAL_BASES:
        raise ValueError(f"Unknown LightHam eval_bases {value!r}; known: {', '.join(EVAL_BASES)}.")


# Each decode head's own options (`OffSegConfig.decode_head_config`) and their defaults: what the head takes besides
# the encoder's channels and `decoder_hidden_size`.
DECODE_HEAD_OPTIONS: dict[str, dict[str, Any]] = {
    "segformer": {},
    # Per-stage widths of the OffSeg head (`new_channels` of the official config).
    "offseg": {"stage_channels": None},
    # LightHam's NMF: rank, multiplicative-update steps in training and evaluation, how evaluation's starting bases
    # are drawn (`EVAL_BASES`) and their seed.
    "lightham": {"rank": 16, "train_steps": 6, "eval_steps": 7, "eval_bases": "seeded", "seed": 0},
}
# Flat keys of configs saved before the head options had their own section, and the option each one is.
_LEGACY_HEAD_KEYS = {
    "decoder_stage_channels": "stage_channels",
    "nmf_rank": "rank",
    "nmf_train_steps": "train_steps",
    "nmf_eval_steps": "eval_steps",
    "nmf_eval_bases": "eval_bases",
    "nmf_seed": "seed",
}


# MiT encoder sizes of SegFormer B0..B5 (Xie et al. 2021, Table 6), shared by every size:
# overlapping patch embeddings 7/3/3/3 with strides 4/2/2/2, spatial reduction 8/4/2/1, heads 1/2/5/8.
_MIT_COMMON = {
    "model_type": "segformer",
    "num_encoder_blocks": 4,
    "sr_ratios": [8, 4, 2, 1],
    "patch_sizes": [7, 3, 3, 3],
    "strides": [4, 2, 2, 2],
    "num_attention_heads": [1, 2, 5, 8],
    "mlp_ratios": [4, 4, 4, 4],
    "drop_path_rate": 0.1,
    # mmseg and the original SegFormer build every encoder LayerNorm with eps 1e-6.
    "layer_norm_eps": 1e-6,
}
_MIT_SIZES = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2]},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2]},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3]},
    "b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3]},
    "b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3]},
    "b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3]},
}

# EfficientFormerV2 backbones of OffSeg-T/B/L (timm names, the official drop-path rates) and the decoder's
# per-stage widths (`new_channels` of the official OffSegHead).
_OFFSEG_SIZES = {
    "t": {"backbone": "efficientformerv2_s1", "drop_path_rate": 0.0, "stage_channels": [32, 32, 64, 128]},
    "b": {"backbone": "efficientformerv2_s2", "drop_path_rate": 0.02, "stage_channels": [32, 64, 128, 256]},
    "l": {"backbone": "efficientformerv2_l", "drop_path_rate": 0.1, "stage_channels": [32, 64, 128, 256]},
}

# MSCAN encoders of SegNeXt-T/S/B (the official configs: MLP ratios 8/8/4/4, drop path 0.1, BatchNorm) and the
# LightHam decoder width (`ham_channels` = `channels` of the official head).
_SEGNEXT_SIZES = {
    "t": {"hidden_sizes": [32, 64, 160, 256], "depths": [3, 3, 5, 2], "decoder_hidden_size": 256},
    "s": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 4, 2], "decoder_hidden_size": 256},
    "b": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 3, 12, 3], "decoder_hidden_size": 512},
}


def _segnext(size: str, classifier: str) -> dict[str, Any]:
    values = _SEGNEXT_SIZES[size]
    return {
        "encoder_config": {
            "model_type": "mscan",
            "hidden_sizes": values["hidden_sizes"],
            "depths": values["depths"],
            "mlp_ratios": [8, 8, 4, 4],
            "drop_path_rate": 0.1,
            "norm_eval": False,
        },
        "decode_head": "lightham",
        "decoder_hidden_size": values["decoder_hidden_size"],
        "decoder_max_pool": False,  # the LightHam output is already at 1/8
        "classifier": classifier,
    }


# One place per fact: every named variant is its full set of config values (ADE20K: 150 classes).
VARIANTS: dict[str, dict[str, Any]] = (
    {
        f"segformer-{size}-offset": {
            "encoder_config": {**_MIT_COMMON, **dims},
            "decode_head": "segformer",
            "decoder_hidden_size": 256,
            "decoder_max_pool": True,
            "classifier": "offset",
        }
        for size, dims in _MIT_SIZES.items()
    }
    | {
        f"offseg-{size}": {
            "encoder_config": {
                "model_type": "timm_backbone",
                "backbone": values["backbone"],
                "out_indices": [0, 1, 2, 3],
                "drop_path_rate": values["drop_path_rate"],
                # The official backbone trains its BatchNorms (SyncBN); set True for mmseg's `norm_eval` behaviour.
                "norm_eval": False,
            },
            "decode_head": "offseg",
            "decode_head_config": {"stage_channels": values["stage_channels"]},
            "decoder_hidden_size": 256,
            "decoder_max_pool": False,
            "classifier": "offset",
        }
        for size, values in _OFFSEG_SIZES.items()
    }
    | {
        # SegNeXt with offset learning, and the per-pixel SegNeXt the paper compares it with (Table 3).
        **{f"segnext-{size}-offset": _segnext(size, "offset") for size in _SEGNEXT_SIZES},
        **{f"segnext-{size}": _segnext(size, "per_pixel") for size in _SEGNEXT_SIZES},
    }
)

# The paper's figures: params (M) at 150 classes and, per data set, GFLOPs (512x512 input; Cityscapes 2048x1024) and
# single-scale mIoU. Table 4 (SegFormer-offset), Table 2 (OffSeg), Table 3 (SegNeXt with and without offset learning).
PAPER_FIGURES: dict[str, dict[str, float]] = {
    "segformer-b0-offset": {"params_m": 3.9, "gflops": 8.8, "ade20k_miou": 40.1},
    "segformer-b1-offset": {"params_m": 13.9, "gflops": 16.3, "ade20k_miou": 43.7},
    "segformer-b2-offset": {"params_m": 24.9, "gflops": 26.1, "ade20k_miou": 47.3},
    "segformer-b3-offset": {"params_m": 44.8, "gflops": 42.8, "ade20k_miou": 49.5},
    "segformer-b4-offset": {"params_m": 61.6, "gflops": 59.5, "ade20k_miou": 50.1},
    "segformer-b5-offset": {"params_m": 82.2, "gflops": 75.5, "ade20k_miou": 50.6},
    "offseg-t": {"params_m": 6.2, "gflops": 5.3, "ade20k_miou": 44.2},
    "offseg-b": {"params_m": 13.0, "gflops": 10.3, "ade20k_miou": 45.9},
    "offseg-l": {"params_m": 26.4, "gflops": 17.1, "ade20k_miou": 48.5},
} | {
    variant: dict(
        zip(
            (
                "params_m",
                "gflops",
                "ade20k_miou",
                "cityscapes_gflops",
                "cityscapes_miou",
                "pascal_context_gflops",
                "pascal_context_miou",
                "coco_stuff_gflops",
                "coco_stuff_miou",
            ),
            row,
            strict=True,
        )
    )
    for variant, row in {
        "segnext-t": (4.3, 6.6, 41.1, 50.5, 79.8, 6.6, 51.2, 6.6, 38.7),
        "segnext-t-offset": (4.4, 7.2, 43.0, 53.1, 80.0, 6.8, 53.2, 7.3, 40.0),
        "segnext-s": (13.9, 15.9, 44.3, 124.6, 81.3, 15.9, 54.2, 15.9, 42.2),
        "segnext-s-offset": (14.1, 16.5, 45.6, 127.2, 81.7, 16.1, 55.9, 16.6, 43.5),
        "segnext-b": (27.6, 34.9, 48.5, 275.7, 82.6, 34.9, 57.0, 34.9, 45.8),
        "segnext-b-offset": (28.2, 34.8, 49.4, 269.6, 82.8, 34.1, 58.0, 35.0, 45.8),
    }.items()
}

_CLASSIFIERS = ("offset", "per_pixel")

# What a saved folder's config.json names for `trust_remote_code=True` loading where offseg-hf is not installed.
# transformers writes only the class being saved (plus AutoConfig); a folder saved from the segmentation model should
# also load with AutoModel, and AutoImageProcessor reads its class from here (see OffSegImageProcessor.to_dict).
# The modules named here travel with `save_pretrained` as the relative imports of modeling_offseg.py.
AUTO_MAP = {
    "AutoConfig": "configuration_offseg.OffSegConfig",
    "AutoModel": "modeling_offseg.OffSegModel",
    "AutoModelForSemanticSegmentation": "modeling_offseg.OffSegForSemanticSegmentation",
    "AutoImageProcessor": "image_processing_offseg.OffSegImageProcessor",
}


class OffSegConfig(PreTrainedConfig):
    r"""
    Configuration of an OffSeg model: a backbone, a pixel decoder and a classifier that is either the paper's
    offset learning or the per-pixel (1x1 convolution) baseline.

    Args:
        encoder_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the backbone. A `SegformerConfig` (model type `"segformer"`) builds the MiT encoder
            of `transformers`' `SegformerModel`; a `TimmBackboneConfig` (model type `"timm_backbone"`) with
            `backbone="efficientformerv2_s1"` (or `_s0`, `_s2`, `_l`) builds timm's EfficientFormerV2 adapted to
            any input size (extra keys: `drop_path_rate`, `norm_eval`). Defaults to MiT-B0.
        decode_head (`str`, *optional*, defaults to `"segformer"`):
            The pixel decoder: `"segformer"` is mmseg's SegformerHead (per stage 1x1 conv + BN + ReLU to
            `decoder_hidden_size`, bilinear resize to 1/4, 1x1 fusion conv + BN + ReLU); `"offseg"` is the OffSeg
            head (per stage 1x1 conv + GN + ReLU to `decoder_stage_channels`, FreqFusion cascade 1/32 -> 1/4,
            1x1 align to `decoder_hidden_size`).
        decode_head_config (`dict`, *optional*):
            The decode head's own options, defaults in `DECODE_HEAD_OPTIONS`: `stage_channels` of the OffSeg head
            (per-stage widths, `new_channels` of the official config); `rank`, `train_steps`, `eval_steps`,
            `eval_bases` and `seed` of LightHam's NMF. Configs saved with the earlier flat keys
            (`decoder_stage_channels`, `nmf_*`) load into this section.
        decoder_hidden_size (`int`, *optional*, defaults to 256):
            Channels of the decoder output (the `C` of the pixel embeddings E).
        decoder_max_pool (`bool`, *optional*, defaults to `True`):
            Max-pool (kernel 2, stride 2) the decoder output before the classifier. SegFormer-offset does this,
            so its logits come out at 1/8 of the input.
        classifier (`str`, *optional*, defaults to `"offset"`):
            `"offset"` (class + feature offset learning, LayerNorm over class scores) or `"per_pixel"` (dropout +
            1x1 convolution, the baseline the paper compares against).
        class_offset (`bool`, *optional*, defaults to `True`):
            Use the class-offset branch (W' = W + dW). Table 6 ablation switch.
        feature_offset (`bool`, *optional*, defaults to `True`):
            Use the feature-offset branch (E' = E + dE). Table 6 ablation switch.
        classifier_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout before the per-pixel classifier (unused by offset learning, as in the official head).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the truncated normal init of the class embeddings and offset projections.
        semantic_loss_ignore_index (`int`, *optional*, defaults to 255):
            Label value ignored by the loss.

    Example:

    ```python
    >>> from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation
    >>> config = OffSegConfig.from_variant("segformer-b0-offset", num_labels=150)
    >>> model = OffSegForSemanticSegmentation(config)
    ```
    """

    model_type = "offseg"
    sub_configs_defaults: ClassVar = {
        "encoder_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="segformer",
            init_kwargs={k: v for k, v in _MIT_COMMON.items() if k != "model_type"} | _MIT_SIZES["b0"],
        )
    }

    encoder_config: dict | PreTrainedConfig | None = None
    decode_head: str = "segformer"
    decode_head_config: dict | None = None
    decoder_hidden_size: int = 256
    decoder_max_pool: bool = True
    classifier: str = "offset"
    class_offset: bool = True
    feature_offset: bool = True
    classifier_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    semantic_loss_ignore_index: int = 255

    def __post_init__(self, **kwargs):
        legacy = {_LEGACY_HEAD_KEYS[key]: kwargs.pop(key) for key in list(kwargs) if key in _LEGACY_HEAD_KEYS}
        if isinstance(self.encoder_config, dict) and self.encoder_config.get("model_type") == MSCANConfig.model_type:
            # MSCAN is not a transformers model type; build its config here rather than through AutoConfig, so
            # that a saved folder loads with remote code too (where no registration has run).
            self.encoder_config = MSCANConfig(**{k: v for k, v in self.encoder_config.items() if k != "model_type"})
        super().__post_init__(**kwargs)
        # Entries already present (e.g. "repo--module.Class" of a Hub repo's code) are kept.
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        if self.id2label is not None and self.label2id is None:
            self.label2id = {label: index for index, label in self.id2label.items()}
        if self.decode_head not in DECODE_HEAD_OPTIONS:
            raise ValueError(f"Unknown decode_head {self.decode_head!r}; known: {', '.join(DECODE_HEAD_OPTIONS)}.")
        options = DECODE_HEAD_OPTIONS[self.decode_head]
        given = {**legacy, **(self.decode_head_config or {})}
        unknown = sorted(set(given) - set(options))
        if unknown:
            known = sorted(options) or "none"
            raise ValueError(f"decode_head {self.decode_head!r} has no option(s) {unknown}; its options: {known}.")
        self.decode_head_config = {**options, **given}
        if self.classifier not in _CLASSIFIERS:
            raise ValueError(f"Unknown classifier {self.classifier!r}; known: {', '.join(_CLASSIFIERS)}.")
        if self.encoder_config.model_type == "timm_backbone":
            if self.encoder_config.backbone not in EFFICIENTFORMER_V2_MODELS:
                raise ValueError(
                    f"Unsupported timm encoder {self.encoder_config.backbone!r}; supported: "
                    f"{', '.join(EFFICIENTFORMER_V2_MODELS)}."
                )
        if self.decode_head == "lightham":
            check_eval_bases(self.decode_head_config["eval_bases"])
        if self.decode_head == "offseg" and not self.decode_head_config["stage_channels"]:
            raise ValueError("decode_head='offseg' needs decode_head_config['stage_channels'] (a width per stage).")
        if self.num_labels < 2:
            # With one class the LayerNorm over class scores (offset learning) is constant, and the loss is a
            # K-way cross entropy: a foreground/background task is num_labels=2.
            raise ValueError(f"num_labels must be at least 2, got {self.num_labels}.")

    @property
    def num_channels(self) -> int:
        """Channels of the input images (RGB)."""
        return self.encoder_config.num_channels

    @staticmethod
    def variant_names() -> list[str]:
        """Every preset `from_variant` builds: this class's (SegFormer-offset, OffSeg, SegNeXt), then Mask2Former's."""
        return [*sorted(VARIANTS), *sorted(MASK2FORMER_VARIANTS)]

    @classmethod
    def from_variant(cls, name: str, **overrides) -> OffSegConfig | OffSegMask2FormerConfig:
        """Build the config of a named preset, e.g. `"segformer-b0-offset"`; the one door for every preset, so
        Mask2Former's come back as `OffSegMask2FormerConfig`.

        Keyword overrides replace preset values (`num_labels`, `id2label`, `classifier`, ...). An
        `encoder_config` or `decode_head_config` dict is merged into the preset's values rather than replacing them.
        """
        if name in MASK2FORMER_VARIANTS:
            return mask2former_preset_config(name, **overrides)
        if name not in VARIANTS:
            raise ValueError(unknown_variant_message(name))
        values = copy.deepcopy(VARIANTS[name])
        values["encoder_config"].update(overrides.pop("encoder_config", None) or {})
        head_overrides = overrides.pop("decode_head_config", None)
        if head_overrides is not None:
            values["decode_head_config"] = {**values.get("decode_head_config", {}), **head_overrides}
        values.update(overrides)
        if "id2label" in values and "num_labels" not in overrides:
            values["num_labels"] = len(values["id2label"])
        elif "id2label" not in values:
            values.setdefault("num_labels", 150)
        return cls(**values)


def unknown_variant_message(name: str) -> str:
    """One line for a preset name that does not exist, with the closest names first."""
    known = OffSegConfig.variant_names()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return f"Unknown variant {name!r}.{hint} Known variants: {', '.join(known)}."


__all__ = [
    "AUTO_MAP",
    "EFFICIENTFORMER_V2_MODELS",
    "DECODE_HEAD_OPTIONS",
    "EVAL_BASES",
    "OffSegConfig",
    "PAPER_FIGURES",
    "VARIANTS",
    "check_eval_bases",
    "unknown_variant_message",
]
