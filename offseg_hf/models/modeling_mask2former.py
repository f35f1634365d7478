"""Mask2Former with offset learning (the paper's Table 5), on `transformers`' Mask2Former.

Everything but the offset module is `transformers`' `Mask2FormerForUniversalSegmentation` (Swin backbone,
multi-scale deformable pixel decoder, masked-attention decoder, Hungarian matcher and loss), unchanged. The paper
adds one module, shared by every mask prediction (the initial one and one after each decoder layer): it aligns the
mask embeddings and the per-pixel mask features before their product gives the masks
(`offseg_hf.models.offset_learning.MaskOffsetLearning`). Class logits use the queries without offset, and the next
layer's attention mask comes from the offset masks, as in the official head. In `transformers` that place is
`Mask2FormerMaskPredictor`, which this file subclasses. In evaluation without labels or auxiliary outputs the
intermediate mask predictions feed nothing but the next layers' attention masks, so the model runs `transformers`'
forward through its own copy (`inference_pass`, the same modules in the same order) that asks for them at the
attention-mask size only; training and the other passes run `transformers`' forward itself.

`OffSegMask2FormerForSemanticSegmentation` adds semantic segmentation as the official model does it:

* inputs are zero-padded to a multiple of `config.size_divisor` (32), as mmseg's test pipeline pads them;
* `logits` are the official semantic inference: the last prediction's masks upsampled (bilinear) to the padded
  input, `softmax(class logits)` without the no-object class times `sigmoid(masks)`, summed over queries, then
  cropped to the input. They are class scores in [0, 1] at the input size, which `pipeline("image-segmentation")`,
  `OffSegImageProcessor.post_process_semantic_segmentation` and the evaluation code resize and argmax like any
  other logits. (`transformers`' own `post_process_semantic_segmentation` resizes masks to 384x384 first: not
  used here.)
* `labels` (B, H, W) semantic maps become, per image, one binary mask and one class label for each class present
  (the ignore index dropped), for `transformers`' Mask2Former loss with the official weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import Mask2FormerForUniversalSegmentation
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerForUniversalSegmentationOutput,
    Mask2FormerMaskPredictor,
)

from .configuration_mask2former import OffSegMask2FormerConfig
from .fast_offset_learning import resize_features
from .image_processing_offseg import OffSegImageProcessor  # noqa: F401  (copied into saved folders: see the auto_map)
from .layers import INIT_RULE
from .offset_learning import MaskOffsetLearning


class OffsetMaskPredictor(Mask2FormerMaskPredictor):
    """`transformers`' mask predictor with the paper's offset module between mask embeddings and mask features.

    Called as the parent class is (by `transformers`' decoder), it returns the masks at the mask features' size and
    the next decoder layer's attention mask made from them. With `attention_only=True` (the inference pass of
    `OffSegMask2FormerForSemanticSegmentation`, for every prediction but the last) the masks come out at the
    attention-mask size instead: those intermediate predictions feed nothing but the attention masks, which the parent
    class derives by resizing the full masks, and `MaskOffsetLearning(..., size=...)` computes the resized masks
    directly (the same values up to float rounding), skipping most of the full-resolution products.
    `resized_features`, the mask features resized to that size, may be passed so that calls of one pass share them.
    """

    def __init__(self, hidden_size: int, num_heads: int, mask_feature_size: int, initializer_range: float = 0.02):
        super().__init__(hidden_size, num_heads, mask_feature_size)
        self.offset_learning = MaskOffsetLearning(mask_feature_size, initializer_range)

    def forward(
        self,
        outputs: torch.Tensor,
        pixel_embeddings: torch.Tensor,
        attention_mask_target_size: int | None = None,
        attention_only: bool = False,
        resized_features: torch.Tensor | None = None,
    ):
        mask_embeddings = self.mask_embedder(outputs.transpose(0, 1))  # (B, Q, C)
        if attention_only:
            outputs_mask = attention_mask = self.offset_learning(
                mask_embeddings,
                pixel_embeddings,
                size=tuple(attention_mask_target_size),
                resized_features=resized_features,
            )
        else:
            outputs_mask = self.offset_learning(mask_embeddings, pixel_embeddings)  # (B, Q, H/4, W/4)
            # The attention mask of the next decoder layer, from these masks, as the parent class derives it.
            attention_mask = F.interpolate(
                outputs_mask, size=attention_mask_target_size, mode="bilinear", align_corners=False
            )
        attention_mask = attention_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1)
        attention_mask = (attention_mask.flatten(0, 1) < 0.5).bool().detach()
        return outputs_mask, attention_mask


@dataclass
class OffSegMask2FormerOutput(Mask2FormerForUniversalSegmentationOutput):
    """`transformers`' Mask2Former output plus `logits` (B, num_labels, H, W): the official semantic inference at the
    input size (computed in evaluation mode, or when no labels are given)."""

    logits: torch.FloatTensor | None = None


def semantic_targets(labels: torch.Tensor, num_labels: int, ignore_index: int = 255):
    """Semantic maps (B, H, W) -> per image `mask_labels` (n, H, W) float and `class_labels` (n,) long, one entry per
    class present, the ignore index dropped (mmseg's semantic-to-instance conversion for Mask2Former)."""
    mask_labels, class_labels = [], []
    for label_map in labels:
        classes = torch.unique(label_map)
        classes = classes[classes != ignore_index]
        if ((classes < 0) | (classes >= num_labels)).any():
            bad = classes[(classes < 0) | (classes >= num_labels)].tolist()
            raise ValueError(
                f"labels contain ids {bad[:10]} that are neither in [0, {num_labels}) nor the ignore index "
                f"{ignore_index}."
            )
        mask_labels.append((label_map[None] == classes[:, None, None]).float())
        class_labels.append(classes.long())
    return mask_labels, class_labels


class OffSegMask2FormerForSemanticSegmentation(Mask2FormerForUniversalSegmentation):
    """Mask2Former (Swin) for semantic segmentation, with the paper's offset learning when
    `config.offset_learning` (see the module docstring)."""

    config_class = OffSegMask2FormerConfig

    def __init__(self, config: OffSegMask2FormerConfig):
        super().__init__(config)
        if config.offset_learning:
            decoder = self.model.transformer_module.decoder
            decoder.mask_predictor = OffsetMaskPredictor(
                config.hidden_dim, config.num_attention_heads, config.mask_feature_size, config.offset_initializer_range
            )
            self.post_init()

    @torch.no_grad()
    def initialize_weights(self):
        # transformers initialises the `model` sub-model (a `Mask2FormerModel`) with its own `_init_weights`, which
        # knows nothing of the offset projections' rule, and, for a model defined outside transformers, skips every
        # module without parameters of its own, such as the mask MLP's `Mask2FormerPredictionBlock`s (whose Linear
        # layers would then get the generic normal(0, init_std) instead of transformers' kaiming uniform). So the
        # offset predictor is initialised here first: the projections by their rule (truncated normal with
        # `offset_initializer_range`), the rest as transformers initialises the plain predictor. Weights already
        # initialised or loaded are flagged and left alone, at construction as for the keys a checkpoint lacks.
        predictor = self.model.transformer_module.decoder.mask_predictor
        # A loss (training, labels) or auxiliary outputs read the intermediate masks at full size: transformers' pass.
        if isinstance(predictor, OffsetMaskPredictor):
            for module in predictor.modules():
                rule = getattr(module, INIT_RULE, None)
                if rule is not None and not getattr(module, "_is_hf_initialized", False):
                    rule(module)
                    module._is_hf_initialized = True

            def initialise(module):  # transformers' post-order walk, without the custom-code skip
                for child in module.children():
                    initialise(child)
                self.model._initialize_weights(module)

            initialise(predictor)
        super().initialize_weights()

    def semantic_logits(
        self, class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """The official semantic inference: masks upsampled to `size`, softmax over classes without no-object times
        sigmoid masks, summed over the queries -> (B, num_labels, *size)."""
        masks = F.interpolate(masks_queries_logits, size=size, mode="bilinear", align_corners=False).sigmoid()
        classes = class_queries_logits.softmax(dim=-1)[..., :-1]  # (B, Q, K)
        return torch.einsum("bqk,bqhw->bkhw", classes, masks)

    def inference_pass(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> Mask2FormerForUniversalSegmentationOutput:
        """`transformers`' Mask2Former forward (`Mask2FormerModel`, its transformer module and masked-attention
        decoder, the class predictor) for inference without labels or auxiliary outputs: the same modules in the same
        order and the same outputs, except that every mask prediction but the last is made at its attention-mask size
        only (`OffsetMaskPredictor(..., attention_only=True)`; the same attention masks up to float rounding at the
        0.5 threshold). Which calls those are, and what they share (the mask features resized to each level's size),
        is decided and kept in this call, never on a module: one instance may serve several threads."""
        config = self.config
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        pixel_level = self.model.pixel_level_module(
            pixel_values=pixel_values, output_hidden_states=output_hidden_states
        )
        mask_features = pixel_level.decoder_last_hidden_state

        # Mask2FormerTransformerModule: per level, flattened (HW, B, C) keys and position embeddings, and the queries.
        transformer = self.model.transformer_module
        sizes, positions, keys = [], [], []
        for level in range(transformer.num_feature_levels):
            features = pixel_level.decoder_hidden_states[level]
            sizes.append(features.shape[-2:])
            embedding = transformer.position_embedder(features.shape, features.device, features.dtype, None)
            positions.append(embedding.flatten(2).permute(2, 0, 1))
            level_keys = transformer.input_projections[level](features).flatten(2)
            keys.append((level_keys + transformer.level_embed.weight[level][None, :, None]).permute(2, 0, 1))
        batch_size = keys[0].shape[1]
        query_positions = transformer.queries_embedder.weight.unsqueeze(1).repeat(1, batch_size, 1)
        hidden_states = transformer.queries_features.weight.unsqueeze(1).repeat(1, batch_size, 1)

        # Mask2FormerMaskedAttentionDecoder: a mask prediction before the first layer and after each.
        decoder = transformer.decoder
        num_levels, num_layers = decoder.num_feature_levels, len(decoder.layers)
        resized_features = {}  # level -> the mask features at that level's size, made once in this pass

        def predict(queries: torch.Tensor, level: int, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
            if last:
                return decoder.mask_predictor(queries, mask_features, sizes[level])
            if level not in resized_features:
                resized_features[level] = resize_features(mask_features, tuple(sizes[level]))
            return decoder.mask_predictor(
                queries, mask_features, sizes[level], attention_only=True, resized_features=resized_features[level]
            )

        all_hidden_states = () if output_hidden_states else None
        attentions = () if output_attentions else None
        queries = decoder.layernorm(hidden_states)
        masks, attention_mask = predict(queries, 0, last=num_layers == 0)
        for index, layer in enumerate(decoder.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            # As transformers does it: a query whose mask is empty everywhere attends to every position.
            where = (attention_mask.sum(-1) != attention_mask.shape[-1]).to(attention_mask.dtype)
            attention_mask = attention_mask * where.unsqueeze(-1)
            layer_outputs = layer(
                hidden_states,
                index % num_levels,
                None,
                positions,
                query_positions,
                keys,
                encoder_attention_mask=attention_mask,
                output_attentions=output_attentions,
            )
            hidden_states = layer_outputs[0]
            queries = decoder.layernorm(hidden_states)
            masks, attention_mask = predict(queries, (index + 1) % num_levels, last=index == num_layers - 1)
            if output_attentions:
                attentions += (layer_outputs[1],)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        return Mask2FormerForUniversalSegmentationOutput(
            class_queries_logits=self.class_predictor(queries.transpose(0, 1)),
            masks_queries_logits=masks,
            encoder_last_hidden_state=pixel_level.encoder_last_hidden_state,
            pixel_decoder_last_hidden_state=mask_features,
            transformer_decoder_last_hidden_state=hidden_states.transpose(1, 0),
            encoder_hidden_states=pixel_level.encoder_hidden_states if output_hidden_states else None,
            pixel_decoder_hidden_states=pixel_level.decoder_hidden_states if output_hidden_states else None,
            transformer_decoder_hidden_states=all_hidden_states,
            attentions=attentions,
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_auxiliary_logits: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> OffSegMask2FormerOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Semantic maps (class ids, `config.ignore_value` (255) ignored); turned into `mask_labels` and
            `class_labels` for the Mask2Former loss. Alternatively pass those two directly, as for `transformers`'
            Mask2Former.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.backbone_config.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.config.backbone_config.num_channels}, height, width); got "
                f"{tuple(pixel_values.shape)}. Convert grayscale or RGBA images to RGB first (the image processor "
                "does this)."
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        height, width = pixel_values.shape[-2:]
        divisor = self.config.size_divisor
        # The padded size as ceil(n / d) * d and, under torch.export, a pad even when it is zero: a branch on the sizes
        # would tie the exported graph to the example's.
        pad_h = (height + divisor - 1) // divisor * divisor - height
        pad_w = (width + divisor - 1) // divisor * divisor - width
        padding = torch.compiler.is_exporting() or pad_h or pad_w
        if padding:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))  # zeros after normalisation, as mmseg pads
        if labels is not None:
            if labels.ndim != 3 or labels.shape[0] != pixel_values.shape[0]:
                raise ValueError(f"labels must have shape (batch, height, width); got {tuple(labels.shape)}.")
            if padding:
                labels = F.pad(labels, (0, pad_w, 0, pad_h), value=self.config.ignore_value)
            mask_labels, class_labels = semantic_targets(labels, self.config.num_labels, self.config.ignore_value)
        auxiliary = self.config.output_auxiliary_logits if output_auxiliary_logits is None else output_auxiliary_logits
        predictor = self.model.transformer_module.decoder.mask_predictor
        # A loss (training, labels) or auxiliary outputs read the intermediate masks at full size: transformers' pass.
        if isinstance(predictor, OffsetMaskPredictor) and not (self.training or mask_labels is not None or auxiliary):
            outputs = self.inference_pass(pixel_values, output_hidden_states, output_attentions)
        else:
            outputs = super().forward(
                pixel_values,
                mask_labels=mask_labels,
                class_labels=class_labels,
                pixel_mask=pixel_mask,
                output_hidden_states=output_hidden_states,
                output_auxiliary_logits=output_auxiliary_logits,
                output_attentions=output_attentions,
                return_dict=True,
            )
        logits = None
        if not self.training or mask_labels is None:
            logits = self.semantic_logits(
                outputs.class_queries_logits, outputs.masks_queries_logits, tuple(pixel_values.shape[-2:])
            )
            if torch.compiler.is_exporting():
                # A crop by negative padding (a new tensor): traced, a slice's view asks whether it is contiguous,
                # that is whether the crop is empty, which would tie the graph to the example's sizes.
                logits = F.pad(logits, (0, width - logits.shape[-1], 0, height - logits.shape[-2]))
            else:
                logits = logits[..., :height, :width]
        output = OffSegMask2FormerOutput(**outputs, logits=logits)
        return output if return_dict else output.to_tuple()


__all__ = ["MaskOffsetLearning", "OffSegMask2FormerForSemanticSegmentation", "OffSegMask2FormerOutput"]
