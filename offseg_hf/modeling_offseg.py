"""OffSeg models: backbone -> pixel decoder -> offset learning (or the per-pixel baseline)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel, SegformerModel
from transformers import initialization as init
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.utils import ModelOutput

from .backbone_efficientformer_v2 import (
    EfficientFormerV2Backbone,
    ResizableAttention2d,
    ResizableAttention2dDownsample,
)
from .configuration_offseg import OffSegConfig
from .decode_head_offseg import OffSegPixelDecoder
from .decode_head_segformer import ConvNormAct, SegformerPixelDecoder
from .freqfusion import FreqFusion
from .offset_learning import OffsetLearning, PerPixelClassifier


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
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            saved = OffSegConfig.from_pretrained(pretrained_model_name_or_path)
            requested = kwargs.get("num_labels", getattr(kwargs.get("config"), "num_labels", saved.num_labels))
            raise ValueError(
                f"The checkpoint at {pretrained_model_name_or_path!r} has num_labels={saved.num_labels} but "
                f"num_labels={requested} was requested, so its classifier weights do not fit. Pass "
                "ignore_mismatched_sizes=True to start the classifier afresh for the new labels."
            ) from error

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Both Auto classes resolve to this code in the saved folder (transformers records only the saved class),
        # and so does AutoImageProcessor (see OffSegImageProcessor.to_dict), whose module travels with the model.
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoModel": "modeling_offseg.OffSegModel",
            "AutoModelForSemanticSegmentation": "modeling_offseg.OffSegForSemanticSegmentation",
            "AutoImageProcessor": "image_processing_offseg.OffSegImageProcessor",
        }
        result = super().save_pretrained(save_directory, *args, **kwargs)
        processor_module = Path(__file__).with_name("image_processing_offseg.py")
        if processor_module.exists():
            shutil.copyfile(processor_module, Path(save_directory) / processor_module.name)
        return result

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, OffsetLearning):
            # As the official head: truncated normal (std 0.02) for W and both offset projections.
            init.trunc_normal_(module.class_embeddings, std=std)
            for projection in (module.class_offset_proj, module.feature_offset_proj):
                if projection is not None:
                    init.trunc_normal_(projection.weight, std=std)
        elif isinstance(module, ConvNormAct):
            # mmcv ConvModule: Kaiming normal, fan_out, for ReLU.
            init.kaiming_normal_(module.conv.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, PerPixelClassifier):
            # mmseg BaseDecodeHead.conv_seg: normal(0, 0.01), zero bias.
            init.normal_(module.classifier.weight, mean=0.0, std=0.01)
            init.zeros_(module.classifier.bias)
        elif isinstance(module, (ResizableAttention2d, ResizableAttention2dDownsample)):
            # timm: zero biases; the index buffer is not saved, so it is rebuilt here after loading.
            init.zeros_(module.attention_biases)
            indices = module.attention_bias_idxs
            init.copy_(indices, module._compute_attention_bias_idxs(device=indices.device))
        elif isinstance(module, FreqFusion):
            # As the official FreqFusion: Xavier-uniform convs, kernel encoders normal(0, 1e-3), the resampler's
            # offset convs normal(0, 1e-3) and its scale convs zero, so it starts at the sub-pixel centres.
            for conv in (module.hr_compressor, module.lr_compressor):
                init.xavier_uniform_(conv.weight)
                init.zeros_(conv.bias)
            resampler = module.resampler
            for conv in (module.lowpass_encoder, module.highpass_encoder, resampler.offset, resampler.hr_offset):
                init.normal_(conv.weight, mean=0.0, std=0.001)
                init.zeros_(conv.bias)
            for conv in (resampler.direct_scale, resampler.hr_direct_scale):
                init.zeros_(conv.weight)
                init.zeros_(conv.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)


def _build_encoder(config: OffSegConfig) -> tuple[nn.Module, list[int]]:
    """The backbone and the channels of its four output maps."""
    encoder_config = config.encoder_config
    if encoder_config.model_type == "timm_backbone":
        encoder = EfficientFormerV2Backbone(
            encoder_config.backbone,
            drop_path_rate=getattr(encoder_config, "drop_path_rate", 0.0),
            norm_eval=getattr(encoder_config, "norm_eval", False),
        )
        return encoder, encoder.channels
    encoder = SegformerModel(encoder_config)
    # transformers builds the MiT LayerNorms with torch's default eps (1e-5); mmseg and the original SegFormer
    # use the encoder config's eps (1e-6) for all of them.
    for module in encoder.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = encoder_config.layer_norm_eps
    return encoder, list(encoder_config.hidden_sizes)


class OffSegModel(OffSegPreTrainedModel):
    """Backbone + pixel decoder: returns the pixel embeddings E that a classifier turns into class scores."""

    def __init__(self, config: OffSegConfig):
        super().__init__(config)
        self.encoder, encoder_channels = _build_encoder(config)
        if config.decode_head == "offseg":
            self.decode_head = OffSegPixelDecoder(
                encoder_channels, list(config.decoder_stage_channels), config.decoder_hidden_size
            )
        else:
            self.decode_head = SegformerPixelDecoder(encoder_channels, config.decoder_hidden_size)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2) if config.decoder_max_pool else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
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
        attentions = None
        if isinstance(self.encoder, SegformerModel):
            encoder_outputs = self.encoder(
                pixel_values, output_hidden_states=True, output_attentions=output_attentions, return_dict=True
            )
            features, attentions = encoder_outputs.hidden_states, encoder_outputs.attentions
        else:
            features = self.encoder(pixel_values)
        # features: 4 maps, strides 4/8/16/32
        embeddings = self.pool(self.decode_head(features))  # (B, C, h, w)
        output = OffSegModelOutput(
            last_hidden_state=embeddings,
            hidden_states=features if output_hidden_states else None,
            attentions=attentions,
        )
        return output if return_dict else output.to_tuple()


class OffSegForSemanticSegmentation(OffSegPreTrainedModel):
    """OffSeg with its classifier: offset learning (the paper) or the per-pixel baseline."""

    def __init__(self, config: OffSegConfig):
        super().__init__(config)
        self.offseg = OffSegModel(config)
        if config.classifier == "offset":
            self.classifier = OffsetLearning(
                config.num_labels,
                config.decoder_hidden_size,
                class_offset=config.class_offset,
                feature_offset=config.feature_offset,
            )
        else:
            self.classifier = PerPixelClassifier(
                config.num_labels, config.decoder_hidden_size, dropout=config.classifier_dropout_prob
            )
        self.post_init()

    @classmethod
    def from_pretrained_encoder(
        cls, encoder_name_or_path: str, variant: str, **config_overrides
    ) -> OffSegForSemanticSegmentation:
        """A fresh model of `variant` whose backbone starts from pretrained (e.g. ImageNet) weights.

        - MiT variants (`segformer-b*-offset`): anything `SegformerModel.from_pretrained` takes, a Hub id such as
          `"nvidia/mit-b0"` or a folder saved from it; the encoder sizes must match the variant's.
        - EfficientFormerV2 variants (`offseg-*`): a local timm state-dict file (`.safetensors`, `.pth`, `.bin`),
          or a timm model name such as `"efficientformerv2_s1.snap_dist_in1k"` that timm downloads. Attention
          biases sized for another input are skipped, as the official backbone does (see
          `EfficientFormerV2Backbone.load_timm_state_dict`).
        """
        config = OffSegConfig.from_variant(variant, **config_overrides)
        model = cls(config)
        encoder = model.offseg.encoder
        if isinstance(encoder, EfficientFormerV2Backbone):
            if os.path.isfile(encoder_name_or_path):
                state_dict = timm.models.load_state_dict(encoder_name_or_path)
            else:
                state_dict = timm.create_model(encoder_name_or_path, pretrained=True).state_dict()
            encoder.load_timm_state_dict(state_dict)
            return model
        pretrained = SegformerModel.from_pretrained(encoder_name_or_path)
        for field in ("hidden_sizes", "depths", "num_attention_heads", "sr_ratios", "patch_sizes", "strides"):
            ours, theirs = list(getattr(config.encoder_config, field)), list(getattr(pretrained.config, field))
            if ours != theirs:
                raise ValueError(
                    f"Encoder checkpoint {encoder_name_or_path!r} has {field}={theirs}, but variant {variant!r} "
                    f"needs {ours}."
                )
        encoder.load_state_dict(pretrained.state_dict(), strict=True)
        return model

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
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Ground-truth class ids; `config.semantic_loss_ignore_index` marks pixels to ignore. The loss is cross
            entropy on the logits upsampled (bilinear) to the label size.

        Returns `SemanticSegmenterOutput` with `logits` of shape `(batch_size, num_labels, height, width)` at the
        classifier's resolution (1/8 of the input for SegFormer-offset).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.offseg(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        logits = self.classifier(outputs.last_hidden_state)  # (B, K, h, w)

        loss = None
        if labels is not None:
            if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
                raise ValueError(f"labels must have shape (batch, height, width); got {tuple(labels.shape)}.")
            self._check_labels(labels)
            upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(upsampled, labels.long(), ignore_index=self.config.semantic_loss_ignore_index)

        output = SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()


__all__ = ["OffSegModel", "OffSegForSemanticSegmentation", "OffSegPreTrainedModel", "OffSegModelOutput"]
