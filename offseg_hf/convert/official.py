"""Convert the official OffSeg / SegFormer-offset / SegNeXt-offset / Mask2Former-offset checkpoints (mmseg,
github.com/HVision-NKU/OffSeg) to offseg-hf; mmseg's own per-pixel SegNeXt and plain Mask2Former (Swin-T)
checkpoints convert to the baseline presets (`segnext-t/s/b`, `mask2former-swin-t`).

    python -m offseg_hf.convert --checkpoint segformer_b0_offset.pth --variant segformer-b0-offset --output_dir out/
    python -m offseg_hf.convert --checkpoint offseg_t_ade20k.pth --variant offseg-t --output_dir out/
    python -m offseg_hf.convert --checkpoint segnext_t_offset_ade20k.pth --variant segnext-t-offset --output_dir out/
    python -m offseg_hf.convert --checkpoint m2f_offset_swin_t.pth --variant mask2former-swin-t-offset --output_dir out/

From Python: `convert_state_dict(official_state_dict, variant)` returns our state dict, `to_official_state_dict`
goes back, `official_key(name, family)` gives the official name of one of our parameters/buffers, and
`load_official_checkpoint(path, variant, **config_overrides)` returns a ready model (`--config_overrides` on the
command line). `load_swin_imagenet(model, path)` starts a Mask2Former model's Swin backbone from the official
config's ImageNet weights (or a transformers Swin folder).

Reading a checkpoint never runs code from it, so files from file-sharing links are safe to convert. A `.pth` is a
pickle, and a plain `torch.load(weights_only=False)` runs whatever callables the pickle names (`os.system`, ...).
`read_official_checkpoint` uses torch's restricted loader as is (`weights_only=True`: tensors and plain
containers, no numpy) and, for mmengine runner checkpoints that also pickle numpy values and mmengine objects,
`offseg_hf.models.safe_pickle`: an unpickler that loads tensors (bounds-checked against their storage), OrderedDicts,
sets
and plain values as themselves and turns every other name -- numpy's arrays, scalars and dtypes included -- into
an inert placeholder that records its arguments (never imported, even when installed; no numpy code runs), and
checks every opcode that can call something. Only the state dict's dense CPU tensors and the class names in
`meta["dataset_meta"]["classes"]` (a list/tuple of str) are used. There is no fallback to an unrestricted
unpickler. What it does not bound is memory: a hostile file can still ask for huge storages.

Strict: every official key is used or explicitly ignored (mmseg's `conv_seg` next to offset learning, which never
calls it, EfficientFormerV2's ImageNet-sized attention-bias buffers and index tables, FreqFusion's constant hamming
windows and initial sampling positions, Swin's relative-position indices), and every parameter and buffer of ours
is filled but the few with no official counterpart (`NOT_IN_OFFICIAL`: Mask2Former's loss class weights and
SwinModel's final norm, which SwinBackbone never calls); otherwise a `ValueError` lists the keys.

Each model family registers its key rules in `FAMILIES`: an ordered list of (official regex, our template) pairs,
with tensor transforms where the layouts differ (mmseg packs q/k/v in one `in_proj_weight` or Swin `qkv`; its MixFFN
uses 1x1 convolutions where transformers uses Linear layers; EfficientFormerV2 layer scales are (C, 1, 1); Swin's
patch merging orders its 4 neighbours as nn.Unfold does). MSCAN keeps mmseg's names. The classifier comes from the
checkpoint: offset learning where it has `offset_learning` keys, else the per-pixel `conv_seg` (Mask2Former: the
offset module or none); it must be the variant's (or the `classifier` / `offset_learning` override's).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from ..data.datasets import ADE20K_CLASSES
from ..models import safe_pickle
from ..models.image_processing_offseg import OffSegImageProcessor
from ..models.state_dict_checks import read_state_dict_file, require_fit, unwrap_state_dict
from ..presets import (
    ALL_VARIANTS,
    MASK2FORMER_FAMILY,
    has_offset_learning,
    model_for_variant,
    variant_family,
)

Tensor = torch.Tensor


@dataclass(frozen=True)
class Rule:
    """Maps official keys matching `official` to `ours` (templates with regex groups \\1, \\2, ...).

    `to_ours` turns the official tensor into one tensor per template; `to_official` does the reverse.
    """

    official: str
    ours: tuple[str, ...]
    to_ours: Callable[[Tensor], tuple[Tensor, ...]] = field(default=lambda t: (t,))
    to_official: Callable[..., Tensor] = field(default=lambda t: t)


def _same(official: str, ours: str) -> Rule:
    return Rule(official, (ours,))


def _squeeze_1x1(official: str, ours: str) -> Rule:
    """A 1x1 convolution weight (O, I, 1, 1) in mmseg, a Linear weight (O, I) here; biases pass unchanged."""
    return Rule(
        official,
        (ours,),
        lambda t: (t.flatten(1) if t.ndim == 4 else t,),
        lambda t: t[:, :, None, None] if t.ndim == 2 else t,
    )


def _split_qkv(official: str, prefix: str, suffix: str) -> Rule:
    """nn.MultiheadAttention's packed [q; k; v] projection -> three Linear layers."""
    return Rule(
        official,
        tuple(f"{prefix}.{name}_proj.{suffix}" for name in ("q", "k", "v")),
        lambda t: tuple(t.chunk(3, dim=0)),
        lambda q, k, v: torch.cat([q, k, v], dim=0),
    )


_ENC, _HEAD = "offseg.encoder", "offseg.decode_head"
_MIT = r"backbone\.layers\.(\d+)"
_MIT_BLOCK = rf"{_MIT}\.1\.(\d+)"
_BLOCK = rf"{_ENC}.stages.\1.blocks.\2"  # our MiT block, groups: stage, block
_W = r"(weight|bias|running_mean|running_var|num_batches_tracked)"  # any norm / conv tensor

MIT_RULES = [
    _same(rf"{_MIT}\.0\.projection\.{_W}", rf"{_ENC}.stages.\1.patch_embeddings.proj.\2"),
    _same(rf"{_MIT}\.0\.norm\.{_W}", rf"{_ENC}.stages.\1.patch_embeddings.layer_norm.\2"),
    _same(rf"{_MIT_BLOCK}\.norm1\.{_W}", rf"{_BLOCK}.layernorm_before.\3"),
    _split_qkv(
        rf"{_MIT_BLOCK}\.attn\.attn\.in_proj_weight",
        rf"{_BLOCK}.attention",
        "weight",
    ),
    _split_qkv(rf"{_MIT_BLOCK}\.attn\.attn\.in_proj_bias", rf"{_BLOCK}.attention", "bias"),
    _same(
        rf"{_MIT_BLOCK}\.attn\.attn\.out_proj\.{_W}",
        rf"{_BLOCK}.attention.o_proj.\3",
    ),
    _same(
        rf"{_MIT_BLOCK}\.attn\.sr\.{_W}",
        rf"{_BLOCK}.attention.sequence_reduction.sequence_reduction.\3",
    ),
    _same(
        rf"{_MIT_BLOCK}\.attn\.norm\.{_W}",
        rf"{_BLOCK}.attention.sequence_reduction.layer_norm.\3",
    ),
    _same(rf"{_MIT_BLOCK}\.norm2\.{_W}", rf"{_BLOCK}.layernorm_after.\3"),
    _squeeze_1x1(rf"{_MIT_BLOCK}\.ffn\.layers\.0\.{_W}", rf"{_BLOCK}.mlp.fc1.\3"),
    _same(rf"{_MIT_BLOCK}\.ffn\.layers\.1\.{_W}", rf"{_BLOCK}.mlp.dwconv.dwconv.\3"),
    _squeeze_1x1(rf"{_MIT_BLOCK}\.ffn\.layers\.4\.{_W}", rf"{_BLOCK}.mlp.fc2.\3"),
    _same(rf"{_MIT}\.2\.{_W}", rf"{_ENC}.stages.\1.layer_norm.\2"),
]

SEGFORMER_HEAD_RULES = [
    _same(r"decode_head\.convs\.(\d+)\.conv\.weight", rf"{_HEAD}.stage_projections.\1.conv.weight"),
    _same(rf"decode_head\.convs\.(\d+)\.bn\.{_W}", rf"{_HEAD}.stage_projections.\1.norm.\2"),
    _same(r"decode_head\.fusion_conv\.conv\.weight", rf"{_HEAD}.fusion.conv.weight"),
    _same(rf"decode_head\.fusion_conv\.bn\.{_W}", rf"{_HEAD}.fusion.norm.\1"),
]

OFFSET_LEARNING_RULES = [
    Rule(
        r"decode_head\.offset_learning\.cls_repr",
        ("classifier.class_embeddings",),
        lambda t: (t[0],),
        lambda t: t[None],
    ),
    _same(r"decode_head\.offset_learning\.cls_offset_proj\.weight", "classifier.class_offset_proj.weight"),
    _same(r"decode_head\.offset_learning\.feat_offset_proj\.weight", "classifier.feature_offset_proj.weight"),
    _same(rf"decode_head\.offset_learning\.mask_norm\.{_W}", r"classifier.mask_norm.\1"),
]

# The per-pixel baselines' classifier: mmseg's `conv_seg` (dropout + 1x1 conv), our PerPixelClassifier.
PER_PIXEL_RULES = [_same(r"decode_head\.conv_seg\.(weight|bias)", r"classifier.classifier.\1")]
CLASSIFIER_RULES = OFFSET_LEARNING_RULES + PER_PIXEL_RULES


def _conv_gn(official: str, ours: str) -> list[Rule]:
    """mmcv's ConvModule with GroupNorm (`conv` without bias, `gn`) -> our ConvNormAct (`conv`, `norm`)."""
    norm_group = re.compile(official).groups + 1  # the group number of the tensor name after the prefix's own
    return [
        _same(rf"{official}\.conv\.weight", f"{ours}.conv.weight"),
        _same(rf"{official}\.gn\.{_W}", rf"{ours}.norm.\{norm_group}"),
    ]


# A 1x1 conv + GroupNorm + ReLU `align` closes both the OffSeg and the LightHam head.
ALIGN_RULES = _conv_gn(r"decode_head\.align", f"{_HEAD}.align")

_FF = r"decode_head\.freqfusions\.(\d+)"
OFFSEG_HEAD_RULES = [
    *_conv_gn(r"decode_head\.pre\.(\d+)", rf"{_HEAD}.stage_projections.\1"),
    _same(rf"{_FF}\.hr_channel_compressor\.{_W}", rf"{_HEAD}.fusions.\1.hr_compressor.\2"),
    _same(rf"{_FF}\.lr_channel_compressor\.{_W}", rf"{_HEAD}.fusions.\1.lr_compressor.\2"),
    _same(rf"{_FF}\.content_encoder2\.{_W}", rf"{_HEAD}.fusions.\1.highpass_encoder.\2"),
    _same(rf"{_FF}\.content_encoder\.{_W}", rf"{_HEAD}.fusions.\1.lowpass_encoder.\2"),
    _same(
        rf"{_FF}\.dysampler\.(offset|direct_scale|hr_offset|hr_direct_scale|norm_hr|norm_lr)\.{_W}",
        rf"{_HEAD}.fusions.\1.resampler.\2.\3",
    ),
    *ALIGN_RULES,
]

# EfficientFormerV2: the official `network` list alternates block stages (even indices 0, 2, 4, 6 -> timm's
# stages 0-3) and embeddings (odd indices 1, 3, 5 -> the downsample of timm's stages 1-3). The embeddings at 1 and
# 3 are a plain conv + norm (`proj`, `norm`); the one at 5 adds an attention downsample (`attn`, `conv`, `bn`), as
# the official code builds it with `asub=True` from its third stage on. The patterns spell these indices out so
# that every key of ours names exactly one official key (`official_key`).
_NET = r"backbone\.network\.([0246])"
_PLAIN_EMBEDDING = r"backbone\.network\.([13])"
_ATTENTION_EMBEDDING = r"backbone\.network\.(5)"
_CONV_NORM = r"(q|k|v|v_local|stride_conv)"  # Sequential(conv, BatchNorm) in the official code, ConvNorm in timm


def _block(official_rest: str, ours_rest: str, rule=_same) -> Rule:
    return rule(rf"{_NET}\.(\d+)\.{official_rest}", rf"{_ENC}.stages.<stage>.blocks.\2.{ours_rest}")


def _layer_scale(name: str, ours: str) -> Rule:
    return Rule(
        rf"{_NET}\.(\d+)\.{name}",
        (rf"{_ENC}.stages.<stage>.blocks.\2.{ours}",),
        lambda t: (t.flatten(),),
        lambda t: t[:, None, None],
    )


def _downsample(official_rest: str, ours_rest: str, embedding: str = _ATTENTION_EMBEDDING) -> Rule:
    return _same(rf"{embedding}\.{official_rest}", rf"{_ENC}.stages.<stage>.downsample.{ours_rest}")


EFFICIENTFORMER_V2_RULES = [
    _same(rf"backbone\.patch_embed\.0\.{_W}", rf"{_ENC}.stem.conv1.conv.\1"),
    _same(rf"backbone\.patch_embed\.1\.{_W}", rf"{_ENC}.stem.conv1.bn.\1"),
    _same(rf"backbone\.patch_embed\.3\.{_W}", rf"{_ENC}.stem.conv2.conv.\1"),
    _same(rf"backbone\.patch_embed\.4\.{_W}", rf"{_ENC}.stem.conv2.bn.\1"),
    _block(rf"mlp\.fc1\.{_W}", r"mlp.fc1.conv.\3"),
    _block(rf"mlp\.norm1\.{_W}", r"mlp.fc1.bn.\3"),
    _block(rf"mlp\.mid\.{_W}", r"mlp.mid.conv.\3"),
    _block(rf"mlp\.mid_norm\.{_W}", r"mlp.mid.bn.\3"),
    _block(rf"mlp\.fc2\.{_W}", r"mlp.fc2.conv.\3"),
    _block(rf"mlp\.norm2\.{_W}", r"mlp.fc2.bn.\3"),
    _layer_scale("layer_scale_1", "ls1.gamma"),
    _layer_scale("layer_scale_2", "ls2.gamma"),
    _block(rf"token_mixer\.{_CONV_NORM}\.0\.{_W}", r"token_mixer.\3.conv.\4"),
    _block(rf"token_mixer\.{_CONV_NORM}\.1\.{_W}", r"token_mixer.\3.bn.\4"),
    _block(rf"token_mixer\.proj\.1\.{_W}", r"token_mixer.proj.conv.\3"),
    _block(rf"token_mixer\.proj\.2\.{_W}", r"token_mixer.proj.bn.\3"),
    _block(rf"token_mixer\.(talking_head1|talking_head2)\.{_W}", r"token_mixer.\3.\4"),
    _block(r"token_mixer\.attention_biases_seg", r"token_mixer.attention_biases"),
    _downsample(rf"proj\.{_W}", r"conv.conv.\2", _PLAIN_EMBEDDING),
    _downsample(rf"norm\.{_W}", r"conv.bn.\2", _PLAIN_EMBEDDING),
    _downsample(rf"conv\.{_W}", r"conv.conv.\2"),
    _downsample(rf"bn\.{_W}", r"conv.bn.\2"),
    _downsample(rf"attn\.q\.local\.0\.{_W}", r"attn.q.local.\2"),
    _downsample(rf"attn\.q\.proj\.0\.{_W}", r"attn.q.proj.conv.\2"),
    _downsample(rf"attn\.q\.proj\.1\.{_W}", r"attn.q.proj.bn.\2"),
    _downsample(rf"attn\.(k|v|v_local)\.0\.{_W}", r"attn.\2.conv.\3"),
    _downsample(rf"attn\.(k|v|v_local)\.1\.{_W}", r"attn.\2.bn.\3"),
    _downsample(rf"attn\.proj\.1\.{_W}", r"attn.proj.conv.\2"),
    _downsample(rf"attn\.proj\.2\.{_W}", r"attn.proj.bn.\2"),
    _downsample(r"attn\.attention_biases_seg", r"attn.attention_biases"),
]

# MSCAN (SegNeXt's backbone) keeps mmseg's parameter names here: `backbone.` -> `offseg.encoder.`.
MSCAN_RULES = [_same(r"backbone\.((?:patch_embed|block|norm)[1-4]\..+)", rf"{_ENC}.\1")]

LIGHTHAM_HEAD_RULES = [
    *_conv_gn(r"decode_head\.squeeze", f"{_HEAD}.squeeze"),
    _same(r"decode_head\.hamburger\.ham_in\.conv\.(weight|bias)", rf"{_HEAD}.hamburger.ham_in.\1"),
    *_conv_gn(r"decode_head\.hamburger\.ham_out", f"{_HEAD}.hamburger.ham_out"),
    *ALIGN_RULES,
]

# Mask2Former (Swin): mmseg's SwinTransformer + mmdet's Mask2FormerHead (mmseg's Mask2FormerHeadOffsetLearning adds
# `offset_learning`) -> transformers' Mask2FormerForUniversalSegmentation (SwinBackbone, Mask2FormerPixelDecoder,
# Mask2FormerTransformerModule) with our offset module in its mask predictor.
_PIXEL_LEVEL = "model.pixel_level_module"
SWIN_ENCODER = f"{_PIXEL_LEVEL}.encoder"  # transformers' SwinBackbone
_SWIN = f"{SWIN_ENCODER}.swin"
_SWIN_STAGE = r"backbone\.stages\.(\d+)"
_SWIN_BLOCK = rf"{_SWIN_STAGE}\.blocks\.(\d+)"
_SWIN_LAYER = rf"{_SWIN}.encoder.layers.\1.blocks.\2"  # groups: stage, block
_WB = r"(weight|bias)"

# Patch merging concatenates the 4 neighbours of each 2x2 patch. transformers takes them as (row, col) = (0, 0),
# (1, 0), (0, 1), (1, 1), whole feature vectors one after the other: input channel j * C + c. mmcv's nn.Unfold puts
# the 4 positions (row * 2 + col) of each channel together: channel c * 4 + position. Neighbour j of ours is unfold
# position _UNFOLD_POSITION[j]; the merged LayerNorm and the reduction's input channels are permuted alike.
_UNFOLD_POSITION = (0, 2, 1, 3)
_NEIGHBOUR = tuple(_UNFOLD_POSITION.index(position) for position in range(4))


def _unfold_to_neighbours(t: Tensor) -> Tensor:
    """Last dimension from mmcv's unfold order (c * 4 + position) to transformers' (j * C + c)."""
    *rest, channels = t.shape
    return t.reshape(*rest, channels // 4, 4)[..., list(_UNFOLD_POSITION)].transpose(-1, -2).reshape(t.shape)


def _neighbours_to_unfold(t: Tensor) -> Tensor:
    *rest, channels = t.shape
    return t.reshape(*rest, 4, channels // 4).transpose(-1, -2)[..., list(_NEIGHBOUR)].reshape(t.shape)


def _patch_merging(official: str, ours: str) -> Rule:
    return Rule(official, (ours,), lambda t: (_unfold_to_neighbours(t),), _neighbours_to_unfold)


SWIN_RULES = [
    _same(rf"backbone\.patch_embed\.projection\.{_WB}", rf"{_SWIN}.embeddings.patch_embeddings.projection.\1"),
    _same(rf"backbone\.patch_embed\.norm\.{_WB}", rf"{_SWIN}.embeddings.norm.\1"),
    _same(rf"{_SWIN_BLOCK}\.norm1\.{_WB}", rf"{_SWIN_LAYER}.layernorm_before.\3"),
    _split_qkv(rf"{_SWIN_BLOCK}\.attn\.w_msa\.qkv\.{_WB}", rf"{_SWIN_LAYER}.attention", r"\3"),
    _same(rf"{_SWIN_BLOCK}\.attn\.w_msa\.proj\.{_WB}", rf"{_SWIN_LAYER}.attention.o_proj.\3"),
    _same(
        rf"{_SWIN_BLOCK}\.attn\.w_msa\.relative_position_bias_table",
        rf"{_SWIN_LAYER}.attention.relative_position_bias.relative_position_bias_table",
    ),
    _same(rf"{_SWIN_BLOCK}\.norm2\.{_WB}", rf"{_SWIN_LAYER}.layernorm_after.\3"),
    _same(rf"{_SWIN_BLOCK}\.ffn\.layers\.0\.0\.{_WB}", rf"{_SWIN_LAYER}.mlp.fc1.\3"),
    _same(rf"{_SWIN_BLOCK}\.ffn\.layers\.1\.{_WB}", rf"{_SWIN_LAYER}.mlp.fc2.\3"),
    _patch_merging(
        rf"{_SWIN_STAGE}\.downsample\.reduction\.weight", rf"{_SWIN}.encoder.layers.\1.downsample.reduction.weight"
    ),
    _patch_merging(rf"{_SWIN_STAGE}\.downsample\.norm\.{_WB}", rf"{_SWIN}.encoder.layers.\1.downsample.norm.\2"),
    # The LayerNorm of each stage's output: mmseg's `norm{i}` (stage i from 0), SwinBackbone's `stage{i+1}`.
    *(_same(rf"backbone\.norm{i}\.{_WB}", rf"{SWIN_ENCODER}.hidden_states_norms.stage{i + 1}.\1") for i in range(4)),
]

_PIXEL_DECODER = r"decode_head\.pixel_decoder"
_PD = f"{_PIXEL_LEVEL}.decoder"
_PD_LAYER = rf"{_PIXEL_DECODER}\.encoder\.layers\.(\d+)"
_DECODER = r"decode_head\.transformer_decoder"
_TM = "model.transformer_module"
_TM_LAYER = rf"{_TM}.decoder.layers.\1"
_DECODER_LAYER = rf"{_DECODER}\.layers\.(\d+)"
_MASK_PREDICTOR = f"{_TM}.decoder.mask_predictor"

MASK2FORMER_HEAD_RULES = [
    # mmdet's input_convs run from the coarsest level (stride 32) to the finest, as transformers' input_projections
    # do; `level_encoding` is indexed the same way.
    _same(rf"{_PIXEL_DECODER}\.input_convs\.(\d+)\.conv\.{_WB}", rf"{_PD}.input_projections.\1.0.\2"),
    _same(rf"{_PIXEL_DECODER}\.input_convs\.(\d+)\.gn\.{_WB}", rf"{_PD}.input_projections.\1.1.\2"),
    _same(
        rf"{_PD_LAYER}\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.{_WB}",
        rf"{_PD}.encoder.layers.\1.self_attn.\2.\3",
    ),
    _same(rf"{_PD_LAYER}\.norms\.0\.{_WB}", rf"{_PD}.encoder.layers.\1.self_attn_layer_norm.\2"),
    _same(rf"{_PD_LAYER}\.ffn\.layers\.0\.0\.{_WB}", rf"{_PD}.encoder.layers.\1.fc1.\2"),
    _same(rf"{_PD_LAYER}\.ffn\.layers\.1\.{_WB}", rf"{_PD}.encoder.layers.\1.fc2.\2"),
    _same(rf"{_PD_LAYER}\.norms\.1\.{_WB}", rf"{_PD}.encoder.layers.\1.final_layer_norm.\2"),
    _same(rf"{_PIXEL_DECODER}\.level_encoding\.weight", f"{_PD}.level_embed"),
    # One FPN level below the encoder's three (stride 4): mmdet's lateral/output conv 0, transformers' adapter_1 and
    # layer_1 (ConvModule with GroupNorm, no conv bias; nn.Sequential(conv, GroupNorm[, ReLU]) here).
    _same(rf"{_PIXEL_DECODER}\.lateral_convs\.0\.conv\.weight", f"{_PD}.adapter_1.0.weight"),
    _same(rf"{_PIXEL_DECODER}\.lateral_convs\.0\.gn\.{_WB}", rf"{_PD}.adapter_1.1.\1"),
    _same(rf"{_PIXEL_DECODER}\.output_convs\.0\.conv\.weight", f"{_PD}.layer_1.0.weight"),
    _same(rf"{_PIXEL_DECODER}\.output_convs\.0\.gn\.{_WB}", rf"{_PD}.layer_1.1.\1"),
    _same(rf"{_PIXEL_DECODER}\.mask_feature\.{_WB}", rf"{_PD}.mask_projection.\1"),
    # Masked-attention decoder layers: cross-attention (`norms.0`), self-attention (`norms.1`), FFN (`norms.2`).
    # transformers keeps nn.MultiheadAttention's packed projection for cross-attention only.
    _same(rf"{_DECODER_LAYER}\.cross_attn\.attn\.in_proj_{_WB}", rf"{_TM_LAYER}.cross_attn.in_proj_\2"),
    _same(rf"{_DECODER_LAYER}\.cross_attn\.attn\.out_proj\.{_WB}", rf"{_TM_LAYER}.cross_attn.out_proj.\2"),
    _same(rf"{_DECODER_LAYER}\.norms\.0\.{_WB}", rf"{_TM_LAYER}.cross_attn_layer_norm.\2"),
    _split_qkv(rf"{_DECODER_LAYER}\.self_attn\.attn\.in_proj_{_WB}", rf"{_TM_LAYER}.self_attn", r"\2"),
    _same(rf"{_DECODER_LAYER}\.self_attn\.attn\.out_proj\.{_WB}", rf"{_TM_LAYER}.self_attn.out_proj.\2"),
    _same(rf"{_DECODER_LAYER}\.norms\.1\.{_WB}", rf"{_TM_LAYER}.self_attn_layer_norm.\2"),
    _same(rf"{_DECODER_LAYER}\.ffn\.layers\.0\.0\.{_WB}", rf"{_TM_LAYER}.fc1.\2"),
    _same(rf"{_DECODER_LAYER}\.ffn\.layers\.1\.{_WB}", rf"{_TM_LAYER}.fc2.\2"),
    _same(rf"{_DECODER_LAYER}\.norms\.2\.{_WB}", rf"{_TM_LAYER}.final_layer_norm.\2"),
    _same(rf"{_DECODER}\.post_norm\.{_WB}", rf"{_TM}.decoder.layernorm.\1"),
    _same(r"decode_head\.query_embed\.weight", f"{_TM}.queries_embedder.weight"),
    _same(r"decode_head\.query_feat\.weight", f"{_TM}.queries_features.weight"),
    _same(r"decode_head\.level_embed\.weight", f"{_TM}.level_embed.weight"),
    _same(rf"decode_head\.cls_embed\.{_WB}", r"class_predictor.\1"),
    # mmdet's mask_embed is Sequential(Linear, ReLU, Linear, ReLU, Linear); transformers' mask_embedder has one block
    # (Linear + activation) per Linear.
    *(
        _same(rf"decode_head\.mask_embed\.{2 * i}\.{_WB}", rf"{_MASK_PREDICTOR}.mask_embedder.{i}.0.\1")
        for i in range(3)
    ),
    _same(
        r"decode_head\.offset_learning\.cls_offset_proj\.weight",
        f"{_MASK_PREDICTOR}.offset_learning.class_offset_proj.weight",
    ),
    _same(
        r"decode_head\.offset_learning\.feat_offset_proj\.weight",
        f"{_MASK_PREDICTOR}.offset_learning.feature_offset_proj.weight",
    ),
]

# mmseg builds the 1x1 classifier `conv_seg` in every head; a head with offset learning never calls it.
UNUSED_CONV_SEG = r"decode_head\.conv_seg\.(weight|bias)"

# Official keys with no counterpart here, on purpose.
IGNORED = [
    r"backbone\.network\.\d+(\.\d+\.token_mixer|\.attn)\.(attention_biases|attention_bias_idxs|attention_bias_idxs_seg)",
    r"decode_head\.freqfusions\.\d+\.(hamming_lowpass|hamming_highpass)",  # constant 1.0: no window
    r"decode_head\.freqfusions\.\d+\.dysampler\.init_pos",  # computed (SimilarityGuidedResampler.initial_positions)
    r"backbone\.stages\.\d+\.blocks\.\d+\.attn\.w_msa\.relative_position_index",  # computed (non-persistent in Swin)
]

# Keys of ours that no official key fills, per family: kept as the model initialises them. Mask2Former's
# `criterion.empty_weight` is the loss's class weights (from `no_object_weight`), and SwinBackbone keeps SwinModel's
# final `layernorm`, which only the ImageNet classifier uses (`load_swin_imagenet` fills it from such a checkpoint).
NOT_IN_OFFICIAL = {
    MASK2FORMER_FAMILY: (r"criterion\.empty_weight", re.escape(f"{_SWIN}.layernorm.") + "(weight|bias)"),
}

FAMILIES = {
    "segformer": MIT_RULES + SEGFORMER_HEAD_RULES + CLASSIFIER_RULES,
    "offseg": EFFICIENTFORMER_V2_RULES + OFFSEG_HEAD_RULES + CLASSIFIER_RULES,
    "lightham": MSCAN_RULES + LIGHTHAM_HEAD_RULES + CLASSIFIER_RULES,
    MASK2FORMER_FAMILY: SWIN_RULES + MASK2FORMER_HEAD_RULES,
}


def _family_name(variant: str) -> str:
    if variant not in ALL_VARIANTS:
        raise ValueError(f"Unknown OffSeg variant {variant!r}. Known variants: {', '.join(ALL_VARIANTS)}.")
    return variant_family(variant)


def _family(variant: str) -> list[Rule]:
    return FAMILIES[_family_name(variant)]


def _not_in_official(key: str, family: str) -> bool:
    """Whether our `key` has no official counterpart in `family` (kept as the model initialises it)."""
    return any(re.fullmatch(pattern, key) for pattern in NOT_IN_OFFICIAL.get(family, ()))


def _ignored(offset_learning: bool) -> list[str]:
    return IGNORED + [UNUSED_CONV_SEG] if offset_learning else IGNORED


def _is_ignored(key: str, offset_learning: bool) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in _ignored(offset_learning))


def _has_offset_learning(official: dict[str, Tensor]) -> bool:
    return any(key.startswith("decode_head.offset_learning.") for key in official)


def _check_classifier(
    variant: str, offset_learning: bool, classifier: str | None, with_offset_learning: bool | None = None
) -> None:
    """Refuse a checkpoint whose classifier is not the one the model will have: offset learning or mmseg's per-pixel
    `conv_seg` (`classifier`: the config's) or, for Mask2Former, with or without the offset module
    (`with_offset_learning`: the config's `offset_learning`)."""
    if variant_family(variant) == MASK2FORMER_FAMILY:
        expected = has_offset_learning(variant) if with_offset_learning is None else bool(with_offset_learning)
        if offset_learning != expected:
            found = (
                "has the offset module (decode_head.offset_learning.*)" if offset_learning else "has no offset module"
            )
            built = "with" if expected else "without"
            others = [v for v in ALL_VARIANTS if variant_family(v) == MASK2FORMER_FAMILY]
            matching = [v for v in others if has_offset_learning(v) == offset_learning]
            raise ValueError(
                f"The checkpoint {found}, but {variant!r} is built {built} it: convert it as {matching[0]!r} (or pass "
                f"offset_learning={offset_learning})."
            )
        return
    expected = classifier or ("offset" if has_offset_learning(variant) else "per_pixel")
    found = "offset" if offset_learning else "per_pixel"
    if found != expected:
        kinds = {"offset": "offset learning", "per_pixel": "a per-pixel classifier (conv_seg)"}
        raise ValueError(
            f"The checkpoint has {kinds[found]}, but {variant!r} is built with {kinds[expected]}: convert it as a "
            f"variant with {kinds[found]} (or pass classifier={found!r})."
        )


def _fill(template: str, match: re.Match) -> str:
    """Expand regex groups in `template`; `<stage>` is the timm stage of an official `network` index."""
    key = match.expand(template)
    if "<stage>" in key:
        network_index = int(match.group(1))
        key = key.replace("<stage>", str((network_index + 1) // 2))
    return key


def _official_rule(key: str, rules: list[Rule]) -> tuple[Rule, re.Match] | None:
    """The rule that converts official `key` (the first whose pattern matches), or None if it is ignored/unknown."""
    if any(re.fullmatch(pattern, key) for pattern in IGNORED):
        return None
    for rule in rules:
        match = re.fullmatch(rule.official, key)
        if match:
            return rule, match
    return None


def convert_state_dict(
    official: dict[str, Tensor],
    variant: str,
    classifier: str | None = None,
    offset_learning: bool | None = None,
) -> dict[str, Tensor]:
    """Official (mmseg) state dict -> ours. Raises `ValueError` listing unmapped official keys.

    A checkpoint with `decode_head.offset_learning.*` keys has offset learning (its `conv_seg` is unused and
    ignored); one without has the per-pixel classifier `conv_seg` (Mask2Former: no offset module). That must be the
    model's: the variant's, or the config override when given (`classifier`; Mask2Former's `offset_learning`).

    Keys of ours that no official key fills (`NOT_IN_OFFICIAL`: Mask2Former's loss weights and SwinModel's unused
    final norm) are not in the result."""
    rules = _family(variant)
    found_offset_learning = _has_offset_learning(official)
    _check_classifier(variant, found_offset_learning, classifier, offset_learning)
    ours, unmapped = {}, []
    for key, tensor in official.items():
        if _is_ignored(key, found_offset_learning):
            continue
        found = _official_rule(key, rules)
        if found is None:
            unmapped.append(key)
            continue
        rule, match = found
        for template, value in zip(rule.ours, rule.to_ours(tensor), strict=True):
            ours[_fill(template, match)] = value.clone()
    if unmapped:
        raise ValueError(f"{len(unmapped)} official keys have no mapping for {variant!r}: {unmapped[:20]}")
    return ours


# The inverse mapping (ours -> official) is derived from the same rules: each `ours` template becomes a regex
# over our keys (a group reference matches what that group of the official pattern matches; `<stage>` any number),
# and the official pattern, whose only regex syntax outside its groups is escaped literals, is filled back in
# with the captured values. Every candidate is checked by running the forward rule on it.


def _capturing_groups(pattern: str) -> list[tuple[int, int]]:
    """(start, end) of the text inside each capturing group of `pattern`, in group-number order."""
    spans: dict[int, tuple[int, int]] = {}
    stack: list[tuple[int | None, int]] = []
    count, i = 0, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 1
        elif char == "[":
            i = pattern.index("]", i + 2)  # a class never starts with "]" in these patterns
        elif char == "(":
            capturing = not pattern.startswith("(?", i) or pattern.startswith("(?P<", i)
            if capturing:
                count += 1
            stack.append((count if capturing else None, i + 1))
        elif char == ")":
            number, start = stack.pop()
            if number is not None:
                spans[number] = (start, i)
        i += 1
    return [spans[number] for number in range(1, count + 1)]


@dataclass(frozen=True)
class _Inverse:
    """One `ours` template of a rule, as a regex over our keys, with the official key as literal pieces and
    group numbers."""

    rule: Rule
    ours: re.Pattern
    official: tuple[str | int, ...]


def _inverse(rule: Rule, template: str) -> _Inverse:
    groups = _capturing_groups(rule.official)
    official: list[str | int] = []
    i = 0
    while i < len(rule.official):
        number = next((n for n, (start, _) in enumerate(groups, 1) if start == i + 1), None)
        if number is not None:
            end = groups[number - 1][1]
            if any(start < end for start, _ in groups[number:]):  # a group opened inside this one
                raise ValueError(f"Nested groups are not invertible: {rule.official!r}")
            official.append(number)
            i = end + 1
        elif rule.official[i] == "\\" and not rule.official[i + 1].isalnum():
            official.append(rule.official[i + 1])
            i += 2
        elif rule.official[i] in "\\.^$*+?{}[]|()":
            raise ValueError(f"Regex syntax outside a group is not invertible: {rule.official!r}")
        else:
            official.append(rule.official[i])
            i += 1
    parts, seen = [], set()
    for piece in re.split(r"(\\\d+|<stage>)", template):
        if piece == "<stage>":
            parts.append(r"(?P<stage>\d+)")
        elif piece.startswith("\\"):
            number = int(piece[1:])
            start, end = groups[number - 1]
            parts.append(f"(?P=g{number})" if number in seen else f"(?P<g{number}>{rule.official[start:end]})")
            seen.add(number)
        else:
            parts.append(re.escape(piece))
    # `<stage>` stands for group 1 (the official `network` index); any other group must appear in the template.
    undetermined = {p for p in official if isinstance(p, int)} - seen - ({1} if "<stage>" in template else set())
    if undetermined:
        raise ValueError(f"{template!r} does not determine groups {sorted(undetermined)} of {rule.official!r}")
    return _Inverse(rule, re.compile("".join(parts)), tuple(official))


@functools.cache
def _inverses(family: str) -> tuple[_Inverse, ...]:
    return tuple(_inverse(rule, template) for rule in FAMILIES[family] for template in rule.ours)


def official_key(key: str, family: str) -> str | None:
    """The official (mmseg) key whose conversion produces our `key`, or None if no rule produces it.

    `family` is a key of `FAMILIES` ("segformer", "offseg", "lightham", "mask2former") or a variant name. The q/k/v
    projections of a MiT or Swin block or of a Mask2Former decoder self-attention all come from one packed official
    tensor, which is returned for each. Keys in `NOT_IN_OFFICIAL` (e.g. SwinBackbone's unused `swin.layernorm`) give
    None.
    """
    if family in ALL_VARIANTS:
        family = variant_family(family)
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}: one of {sorted(FAMILIES)} or a variant name.")
    rules = FAMILIES[family]
    for inverse in _inverses(family):
        match = inverse.ours.fullmatch(key)
        if match is None:
            continue
        values = {int(name[1:]): value for name, value in match.groupdict().items() if name.startswith("g")}
        # An EfficientFormerV2 stage's blocks sit at official index 2 * stage, its downsample at 2 * stage - 1.
        stage = match.groupdict().get("stage")
        for network_index in [None] if stage is None else [2 * int(stage), 2 * int(stage) - 1]:
            if network_index is not None:
                values[1] = str(network_index)
            candidate = "".join(values[p] if isinstance(p, int) else p for p in inverse.official)
            found = _official_rule(candidate, rules)
            if found and found[0] is inverse.rule and key in (_fill(t, found[1]) for t in inverse.rule.ours):
                return candidate
    return None


def to_official_state_dict(
    ours: dict[str, Tensor], variant: str, official_keys: list[str] | None = None
) -> dict[str, Tensor]:
    """Ours -> official names (the inverse of `convert_state_dict`).

    Without `official_keys`, the keys are the `official_key` of each of ours, in our order (q/k/v packed back into
    one tensor); a key of ours that no official key produces raises `ValueError`, except the ones in
    `NOT_IN_OFFICIAL`, which are left out.
    """
    rules = _family(variant)
    family = _family_name(variant)
    offset_learning = "classifier.class_embeddings" in ours
    if official_keys is None:
        names = {key: official_key(key, family) for key in ours if not _not_in_official(key, family)}
        unmapped = [key for key, name in names.items() if name is None]
        if unmapped:
            raise ValueError(f"{len(unmapped)} keys have no official name for {variant!r}: {unmapped[:20]}")
        official_keys = list(dict.fromkeys(names.values()))
    result = {}
    for key in official_keys:
        if _is_ignored(key, offset_learning):
            continue
        found = _official_rule(key, rules)
        if found is None:
            raise ValueError(f"Official key {key!r} has no mapping for {variant!r}.")
        rule, match = found
        result[key] = rule.to_official(*[ours[_fill(template, match)] for template in rule.ours])
    return result


def strip_checkpoint(checkpoint) -> dict[str, Tensor]:
    """The state dict of an mmseg checkpoint (`{"state_dict": ..., "meta": ...}`) or a bare state dict."""
    return unwrap_state_dict(checkpoint)


def read_official_checkpoint(path: str) -> tuple[dict[str, Tensor], list[str] | None]:
    """The state dict of an official checkpoint and, where mmengine recorded them, its class names.

    Never runs code from the file. First torch's own restricted loader, as is (`weights_only=True`, with no globals
    added; ones the caller registered with `torch.serialization.add_safe_globals` do apply): tensors and plain
    containers. A checkpoint saved by mmengine's runner also pickles numpy values and mmengine objects, which that
    loader refuses (`UnpicklingError`), so it is then read with `offseg_hf.models.safe_pickle`: tensors, OrderedDicts,
    sets and plain values load as themselves, and every other global (numpy's arrays, scalars and dtypes included)
    becomes an inert placeholder that only records its arguments, so no numpy, mmengine or mmseg code runs (and
    neither package is needed). Only that refusal leads to the second reader: anything else torch rejects up front,
    such as a TorchScript archive (which `weights_only=False` would hand to `torch.jit.load`) or a legacy tar file,
    is raised. The class names are read from `meta["dataset_meta"]["classes"]` when that is a list/tuple of str.
    Raises `ValueError` unless the state dict holds only dense CPU tensors.
    """
    checkpoint = safe_pickle.read_checkpoint(path)
    class_names = None
    meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
    dataset_meta = meta.get("dataset_meta") if isinstance(meta, dict) else None
    classes = dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None
    if isinstance(classes, (list, tuple)) and all(isinstance(name, str) for name in classes):
        class_names = list(classes)
    state_dict = strip_checkpoint(checkpoint)
    _require_dense(state_dict)
    return state_dict, class_names


def _require_dense(state_dict: dict[str, Tensor]) -> None:
    # torch's loader also rebuilds sparse, quantized, nested and meta tensors and tensor subclasses; weights are none.
    unusual = [
        key
        for key, value in state_dict.items()
        if type(value) not in (Tensor, torch.nn.Parameter)
        or value.layout != torch.strided
        or value.device.type != "cpu"
        or value.is_quantized
        or value.is_nested
    ]
    if unusual:
        raise ValueError(f"{len(unusual)} state dict entries are not dense CPU tensors: {unusual[:20]}")


def _num_labels(converted: dict[str, Tensor]) -> int:
    if "class_predictor.weight" in converted:  # Mask2Former: the classes plus "no object"
        return converted["class_predictor.weight"].shape[0] - 1
    return converted.get("classifier.class_embeddings", converted.get("classifier.classifier.weight")).shape[0]


def load_official_checkpoint(path: str, variant: str, **config_overrides) -> PreTrainedModel:
    """Build `variant` (num_labels from the checkpoint) and fill it from an official checkpoint, strictly: an
    `OffSegForSemanticSegmentation`, or an `OffSegMask2FormerForSemanticSegmentation` for the Mask2Former presets.

    Class names (`id2label`), unless given: the ones mmengine stored in the checkpoint's `meta["dataset_meta"]`,
    else ADE20K's 150 for a 150-class checkpoint (every official 150-class config is ADE20K), else `LABEL_i`.
    """
    official, class_names = read_official_checkpoint(path)
    family = _family_name(variant)
    converted = convert_state_dict(
        official, variant, config_overrides.get("classifier"), config_overrides.get("offset_learning")
    )
    num_labels = _num_labels(converted)
    if "id2label" not in config_overrides:
        if class_names is None and num_labels == len(ADE20K_CLASSES):
            class_names = list(ADE20K_CLASSES)
        if class_names is not None and len(class_names) == num_labels:
            config_overrides["id2label"] = dict(enumerate(class_names))
    model = model_for_variant(variant, **{"num_labels": num_labels, **config_overrides})
    require_fit(
        model.state_dict(),
        converted,
        f"Converted checkpoint does not fit {variant!r}",
        functools.partial(_not_in_official, family=family),
    )
    model.load_state_dict(converted, strict=False)
    return model.eval()


# ImageNet Swin weights for a Mask2Former model's backbone. The official config starts from mmseg's conversion of
# the Swin release (`swin_tiny_patch4_window7_224_20220317-1cdeb081.pth`, tools/model_converters/swin2mmseg.py):
# the backbone's names without `backbone.`, plus the classifier's final `norm` (and possibly `head`), the
# relative-position indices and the shifted blocks' attention masks at 224x224 (buffers). mmseg loads it with
# `strict=False`: the per-stage output norms `norm0..3`, absent there, keep their initialisation.
_IMAGENET_SWIN_UNUSED = (
    r"head\..+",  # the ImageNet classifier
    r"stages\.\d+\.blocks\.\d+\.attn\.w_msa\.relative_position_index",  # computed here
    r"stages\.\d+\.blocks\.\d+\.attn_mask",  # the original release's shifted-window masks for 224x224
)
# The classifier's final LayerNorm: SwinModel's `layernorm`, which SwinBackbone keeps but never calls.
_IMAGENET_SWIN_NORM = _same(rf"norm\.{_WB}", rf"{_SWIN}.layernorm.\1")
# Config fields a transformers Swin checkpoint must share with the model's backbone (shapes alone miss some).
_SWIN_CONFIG_FIELDS = (
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "patch_size",
    "mlp_ratio",
    "qkv_bias",
    "hidden_act",
    "use_absolute_embeddings",
    "layer_norm_eps",
)


def _initialised_here(key: str) -> bool:
    """Backbone keys an ImageNet checkpoint may lack: the per-stage output norms and SwinModel's final norm."""
    return key.startswith(("hidden_states_norms.", "swin.layernorm."))


def _imagenet_swin_weights(path: str) -> tuple[dict[str, Tensor], list[str]]:
    """An mmseg-format Swin state dict -> our SwinBackbone's keys, and the checkpoint keys not used."""
    state_dict = read_state_dict_file(path)
    _require_dense(state_dict)
    prefix = f"{SWIN_ENCODER}."
    weights, unused, unknown = {}, [], []
    for key, tensor in state_dict.items():
        name = key.removeprefix("backbone.")
        if any(re.fullmatch(pattern, name) for pattern in _IMAGENET_SWIN_UNUSED):
            unused.append(key)
            continue
        found = _official_rule(f"backbone.{name}", SWIN_RULES)
        if found is None and re.fullmatch(_IMAGENET_SWIN_NORM.official, name):
            found = _IMAGENET_SWIN_NORM, re.fullmatch(_IMAGENET_SWIN_NORM.official, name)
        if found is None:
            unknown.append(key)
            continue
        rule, match = found
        for template, value in zip(rule.ours, rule.to_ours(tensor), strict=True):
            weights[_fill(template, match).removeprefix(prefix)] = value.clone()
    if unknown:
        raise ValueError(
            f"{path!r}: {len(unknown)} keys are not mmseg Swin backbone keys: {unknown[:20]}. Expected the official "
            "config's ImageNet checkpoint (mmseg's swin2mmseg.py conversion: `patch_embed.projection.weight`, "
            "`stages.0.blocks.0.attn.w_msa.qkv.weight`, ...) or a saved transformers Swin folder."
        )
    return weights, unused


def _transformers_swin_weights(path: str, config) -> tuple[dict[str, Tensor], list[str]]:
    """A saved transformers Swin folder (SwinModel, SwinForImageClassification or SwinBackbone) -> our
    SwinBackbone's keys, and the checkpoint keys not used (an image classifier's head)."""
    from transformers import SwinBackbone, SwinConfig

    saved = SwinConfig.from_pretrained(path)
    different = {
        name: (getattr(saved, name), getattr(config, name))
        for name in _SWIN_CONFIG_FIELDS
        if getattr(saved, name) != getattr(config, name)
    }
    if different:
        raise ValueError(f"{path!r} is another Swin than this model's backbone (saved, ours): {different}")
    backbone, info = SwinBackbone.from_pretrained(
        path, out_features=list(config.out_features), output_loading_info=True
    )
    unused = sorted(key for key in info["unexpected_keys"] if key.startswith("classifier."))  # a set in transformers
    unknown = sorted(key for key in info["unexpected_keys"] if key not in unused)
    missing = [key for key in info["missing_keys"] if not _initialised_here(key)]
    if unknown or missing or info["mismatched_keys"]:
        raise ValueError(
            f"{path!r} does not fit this Swin backbone: unexpected {unknown[:20]}, missing {missing[:20]}, "
            f"shape mismatch {list(info['mismatched_keys'])[:20]}."
        )
    weights = {key: value for key, value in backbone.state_dict().items() if key not in info["missing_keys"]}
    return weights, unused


def load_swin_imagenet(model: PreTrainedModel, path: str) -> list[str]:
    """Start a Mask2Former model's Swin backbone (`model.model.pixel_level_module.encoder`) from pretrained weights:
    the official config's mmseg-format ImageNet checkpoint (`swin_tiny_patch4_window7_224_20220317-1cdeb081.pth`;
    `.pth`, `.bin` or `.safetensors`, read without running code from it; wrappers `state_dict`/`model` and a
    `backbone.` prefix accepted) converted by the same rules as official Mask2Former checkpoints, or a folder
    saved by transformers (`SwinModel`, `SwinForImageClassification`, `SwinBackbone`) for the same Swin.

    Strict: every backbone key is filled except the per-stage output norms (`hidden_states_norms`, mmseg's
    `norm0..3`, which ImageNet checkpoints do not have and mmseg leaves initialised too); a key that fits nowhere, a
    missing key or a shape mismatch raises `ValueError`. Returns the checkpoint keys not used (the ImageNet
    classifier, relative-position indices and shifted-window masks, which are computed here).
    """
    encoder = model.model.pixel_level_module.encoder
    if os.path.isdir(path):
        weights, unused = _transformers_swin_weights(path, encoder.config)
    else:
        weights, unused = _imagenet_swin_weights(path)
    require_fit(encoder.state_dict(), weights, f"{path!r} does not fit this Swin backbone", _initialised_here)
    encoder.load_state_dict(weights, strict=False)
    return unused


def from_pretrained_encoder(encoder_name_or_path: str, name: str, **overrides) -> PreTrainedModel:
    """A fresh model of any preset whose backbone starts from pretrained (ImageNet) weights: the one door for every
    family (MiT and EfficientFormerV2 through `transformers`/`timm` checkpoints, MSCAN and Swin from the official
    files, read safely)."""
    if variant_family(name) == MASK2FORMER_FAMILY:
        model = model_for_variant(name, **overrides)
        load_swin_imagenet(model, encoder_name_or_path)
        return model
    model = model_for_variant(name, **overrides)
    model.offseg.encoder.load_pretrained(encoder_name_or_path)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m offseg_hf.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="Official mmseg checkpoint (.pth).")
    parser.add_argument(
        "--variant", required=True, choices=ALL_VARIANTS, help="The preset the checkpoint was trained as."
    )
    parser.add_argument(
        "--output_dir", required=True, help="Folder for the converted model (safetensors, config, code, processor)."
    )
    parser.add_argument(
        "--id2label",
        default=None,
        help="JSON file mapping class ids to names (default: the names mmengine stored in the checkpoint, else "
        "ADE20K's for a 150-class checkpoint).",
    )
    parser.add_argument(
        "--config_overrides",
        default=None,
        help="JSON object of config values that differ from the preset's, for a checkpoint trained with another "
        "configuration, e.g. '{\"decoder_layers\": 7}' (a `backbone_config` object is merged into the preset's).",
    )
    args = parser.parse_args(argv)
    for flag, path in (("--checkpoint", args.checkpoint), ("--id2label", args.id2label)):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{flag} {path}: no such file.")
    overrides = {}
    if args.config_overrides:
        try:
            overrides = json.loads(args.config_overrides)
        except json.JSONDecodeError as error:
            parser.error(f"--config_overrides is not JSON: {error}")
        if not isinstance(overrides, dict):
            parser.error("--config_overrides must be a JSON object.")
    if args.id2label:
        with open(args.id2label) as handle:
            overrides["id2label"] = {int(k): v for k, v in json.load(handle).items()}
    try:
        model = load_official_checkpoint(args.checkpoint, args.variant, **overrides)
    except (ValueError, pickle.UnpicklingError) as error:  # a file that is no checkpoint, or not of this variant
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    model.save_pretrained(args.output_dir)
    OffSegImageProcessor().save_pretrained(args.output_dir)
    print(f"Converted {args.checkpoint} ({args.variant}, {model.config.num_labels} classes) to {args.output_dir}")


if __name__ == "__main__":
    main()
