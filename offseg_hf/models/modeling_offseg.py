"""OffSeg models: backbone -> pixel decoder -> offset learning (or the per-pixel baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.utils import ModelOutput

from .backbone_efficientformer_v2 import EfficientFormerV2Backbone
from .backbone_mit import MixTransformerEncoder
from .backbone_mscan import MSCANEncoder
from .configuration_offseg import OffSegConfig
from .decode_head_lightham import LightHamPixelDecoder
from .decode_head_offseg import OffSegPixelDecoder
from .decode_head_segformer import SegformerPixelDecoder
from .forms import HasForms
from .image_processing_offseg import OffSegImageProcessor  # noqa: F401  (copied into saved folders: see AUTO_MAP)
from .layers import INIT_RULE
from .local_paths import check_local_folder
from .losses import upsampled_cross_entropy
from .offset_learning import OffsetLearning, PerPixelClassifier

# Backbones by the `model_type` of `config.encoder_config`; each meets the contract in `encoder.py`. A new backbone
# is one entry here.
ENCODERS: dict[str, type[nn.Module]] = {
    "segformer": MixTransformerEncoder,
    "timm_backbone": EfficientFormerV2Backbone,
    "mscan": MSCANEncoder,
}

# Pixel decoders by `config.decode_head`, each built as `Decoder(encoder channels, config.decoder_hidden_size,
# **config.decode_head_config)`. A new decode head is one entry here and its options in the config's
# `DECODE_HEAD_OPTIONS`.
DECODE_HEADS: dict[str, type[nn.Module]] = {
    "segformer": SegformerPixelDecoder,
    "offseg": OffSegPixelDecoder,
    "lightham": LightHamPixelDecoder,
}


@dataclass
class OffSegModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, decoder_hidden_size, height, width)`):
            Pixel embeddings E from the decoder, at the resolution the classifier sees (1/8 of the input for
            SegFormer-offset).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The backbone's multi-scale feature maps, finest first.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            The backbone's attention weights.
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class OffSegSemanticSegmenterOutput(SemanticSegmenterOutput):
    """
    `SemanticSegmenterOutput` (loss, logits, hidden_states, attentions) plus:

    Args:
        class_attention (`torch.FloatTensor` of shape `(batch_size, num_labels, height, width)`, *optional*, returned
            when `output_class_attention=True` and the classifier is offset learning):
            Softmax over positions of the coupled attention A = W E^T between the class embeddings W and the pixel
            embeddings E (the paper's Eq. 4-5): for each class, a distribution over the classifier's positions
            (each map sums to 1) showing where the class offset gathers the class's context from. At the
            classifier's resolution, the same as `logits` (1/4 of the input for OffSeg, 1/8 for SegFormer-offset).
            `None` for the per-pixel classifier.
    """

    class_attention: torch.FloatTensor | None = None


class OffSegPreTrainedModel(PreTrainedModel):
    config: OffSegConfig
    config_class = OffSegConfig
    base_model_prefix = "offseg"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["SegformerStage"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        check_local_folder(str(pretrained_model_name_or_path))  # a mistyped folder: say so, with no Hub round trip
        if not kwargs.get("ignore_mismatched_sizes", False):
            _check_num_labels(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _init_weights(self, module):
        rule = getattr(module, INIT_RULE, None)  # set by `layers.initialise_with` where a module declares its init
        if rule is not None:
            rule(module)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)


# Keyword arguments of `from_pretrained` that say where a folder is; the saved config is read with the same ones.
_LOCATION_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def _check_num_labels(pretrained_model_name_or_path, kwargs: dict) -> None:
    """Refuse, before any weight is read, a requested label count that the saved classifier does not have."""
    config = kwargs.get("config")
    # By model type, not class: with remote code, AutoConfig's OffSegConfig comes from another dynamic module than
    # the one this file imports, so isinstance would miss it.
    if getattr(config, "model_type", None) == OffSegConfig.model_type:
        requested = config.num_labels
    elif "id2label" in kwargs:
        requested = len(kwargs["id2label"])
    else:
        requested = kwargs.get("num_labels")
    if requested is None:
        return
    location = {key: kwargs[key] for key in _LOCATION_KWARGS if key in kwargs}
    saved = OffSegConfig.from_pretrained(pretrained_model_name_or_path, **location)
    if saved.num_labels != requested:
        raise ValueError(
            f"The checkpoint at {pretrained_model_name_or_path!r} has num_labels={saved.num_labels} but "
            f"num_labels={requested} was requested, so its classifier weights do not fit. Pass "
            "ignore_mismatched_sizes=True to start the classifier afresh for the new labels."
        )


def build_encoder(config: OffSegConfig) -> nn.Module:
    """The backbone named by `config.encoder_config` (see `ENCODERS`)."""
    model_type = config.encoder_config.model_type
    if model_type not in ENCODERS:
        raise ValueError(f"Unsupported encoder model type {model_type!r}; supported: {', '.join(ENCODERS)}.")
    return ENCODERS[model_type].from_encoder_config(config.encoder_config)


class OffSegModel(OffSegPreTrainedModel):
    """Backbone + pixel decoder: returns the pixel embeddings E that a classifier turns into class scores."""

    def __init__(self, config: OffSegConfig):
        super().__init__(config)
        self.encoder = build_encoder(config)
        decoder = DECODE_HEADS[config.decode_head]
        self.decode_head = decoder(self.encoder.channels, config.decoder_hidden_size, **config.decode_head_config)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2) if config.decoder_max_pool else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> OffSegModelOutput | tuple:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.config.num_channels}, height, width); got "
                f"{tuple(pixel_values.shape)}. Convert grayscale or RGBA images to RGB first (the image processor "
                "does this)."
            )
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        encoder_outputs = self.encoder(pixel_values, output_attentions=bool(output_attentions))
        features = encoder_outputs.feature_maps  # 4 maps, strides 4/8/16/32
        embeddings = self.pool(self.decode_head(features))  # (B, C, h, w)
        output = OffSegModelOutput(
            last_hidden_state=embeddings,
            hidden_states=features if output_hidden_states else None,
            attentions=encoder_outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


class OffSegForSemanticSegmentation(HasForms, OffSegPreTrainedModel):
    """OffSeg with its classifier: offset learning (the paper) or the per-pixel baseline. Its loss, offset learning
    and FreqFusion run their fast forms unless another is set (`forms.set_form`)."""

    def __init__(self, config: OffSegConfig):
        super().__init__(config)
        self.offseg = OffSegModel(config)
        if config.classifier == "offset":
            self.classifier = OffsetLearning(
                config.num_labels,
                config.decoder_hidden_size,
                class_offset=config.class_offset,
                feature_offset=config.feature_offset,
                initializer_range=config.initializer_range,
            )
        else:
            self.classifier = PerPixelClassifier(
                config.num_labels, config.decoder_hidden_size, dropout=config.classifier_dropout_prob
            )
        self.post_init()

    def _check_labels(self, labels: torch.Tensor) -> None:
        ignore_index = self.config.semantic_loss_ignore_index
        invalid = (labels != ignore_index) & ((labels < 0) | (labels >= self.config.num_labels))
        if invalid.any():
            bad = torch.unique(labels[invalid]).tolist()
            raise ValueError(
                f"labels contain ids {bad[:10]} that are neither in [0, {self.config.num_labels}) nor the ignore "
                f"index {ignore_index}."
            )

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        output_class_attention: bool = False,
    ) -> OffSegSemanticSegmenterOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Ground-truth class ids; `config.semantic_loss_ignore_index` marks pixels to ignore. The loss is cross
            entropy on the logits upsampled (bilinear) to the label size.
        output_class_attention (`bool`, *optional*, defaults to `False`):
            Also return `class_attention`, the offset-learning classifier's Softmax over positions of A = W E^T
            (`None` for the per-pixel classifier). Costs nothing extra when not requested.

        Returns `OffSegSemanticSegmenterOutput` with `logits` of shape `(batch_size, num_labels, height, width)` at
        the classifier's resolution (1/8 of the input for SegFormer-offset).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.offseg(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        class_attention = None
        if output_class_attention and isinstance(self.classifier, OffsetLearning):
            logits, class_attention = self.classifier(outputs.last_hidden_state, output_class_attention=True)
        else:
            logits = self.classifier(outputs.last_hidden_state)  # (B, K, h, w)

        loss = None
        if labels is not None:
            if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
                raise ValueError(f"labels must have shape (batch, height, width); got {tuple(labels.shape)}.")
            self._check_labels(labels)
            loss = upsampled_cross_entropy(
                logits, labels.long(), ignore_index=self.config.semantic_loss_ignore_index, form=self.form
            )

        output = OffSegSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            class_attention=class_attention,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "OffSegModel",
    "OffSegForSemanticSegmentation",
    "OffSegPreTrainedModel",
    "OffSegModelOutput",
    "OffSegSemanticSegmenterOutput",
]
