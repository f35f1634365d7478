"""Convert the official OffSeg / SegFormer-offset / SegNeXt-offset checkpoints (mmseg, github.com/HVision-NKU/OffSeg)
to offseg-hf; mmseg's own per-pixel SegNeXt checkpoints convert to the baseline presets (`segnext-t/s/b`).

    python -m offseg_hf.convert --checkpoint segformer_b0_offset.pth --variant segformer-b0-offset --output_dir out/
    python -m offseg_hf.convert --checkpoint offseg_t_ade20k.pth --variant offseg-t --output_dir out/
    python -m offseg_hf.convert --checkpoint segnext_t_offset_ade20k.pth --variant segnext-t-offset --output_dir out/

From Python: `convert_state_dict(official_state_dict, variant)` returns our state dict, `to_official_state_dict`
goes back, `official_key(name, family)` gives the official name of one of our parameters/buffers, and
`load_official_checkpoint(path, variant, **config_overrides)` returns a ready model.

Reading a checkpoint never runs code from it, so files from file-sharing links are safe to convert. A `.pth` is a
pickle, and a plain `torch.load(weights_only=False)` runs whatever callables the pickle names (`os.system`, ...).
`read_official_checkpoint` uses torch's restricted loader as is (`weights_only=True`: tensors and plain
containers, no numpy) and, for mmengine runner checkpoints that also pickle numpy values and mmengine objects,
`offseg_hf.safe_pickle`: an unpickler that loads tensors (bounds-checked against their storage), OrderedDicts, sets
and plain values as themselves and turns every other name -- numpy's arrays, scalars and dtypes included -- into
an inert placeholder that records its arguments (never imported, even when installed; no numpy code runs), and
checks every opcode that can call something. Only the state dict's dense CPU tensors and the class names in
`meta["dataset_meta"]["classes"]` (a list/tuple of str) are used. There is no fallback to an unrestricted
unpickler. What it does not bound is memory: a hostile file can still ask for huge storages.

Strict: every official key is used or explicitly ignored (mmseg's `conv_seg` next to offset learning, which never
calls it, EfficientFormerV2's
ImageNet-sized attention-bias buffers and index tables, FreqFusion's constant hamming windows and initial sampling
positions), and every parameter and buffer of ours is filled; otherwise a `ValueError` lists the keys.

Each model family registers its key rules in `FAMILIES`: an ordered list of (official regex, our template) pairs,
with tensor transforms where the layouts differ (mmseg packs q/k/v in one `in_proj_weight`; its MixFFN uses 1x1
convolutions where transformers uses Linear layers; EfficientFormerV2 layer scales are (C, 1, 1)). MSCAN keeps
mmseg's names. The classifier comes from the checkpoint: offset learning where it has `offset_learning` keys, else
the per-pixel `conv_seg`; it must be the variant's (or the `classifier` override's).
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import safe_pickle
from .configuration_offseg import VARIANTS, OffSegConfig
from .data import ADE20K_CLASSES
from .image_processing_offseg import OffSegImageProcessor
from .modeling_offseg import OffSegForSemanticSegmentation
from .state_dict_checks import require_fit, unwrap_state_dict

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

# mmseg builds the 1x1 classifier `conv_seg` in every head; a head with offset learning never calls it.
UNUSED_CONV_SEG = r"decode_head\.conv_seg\.(weight|bias)"

# Official keys with no counterpart here, on purpose.
IGNORED = [
    r"backbone\.network\.\d+(\.\d+\.token_mixer|\.attn)\.(attention_biases|attention_bias_idxs|attention_bias_idxs_seg)",
    r"decode_head\.freqfusions\.\d+\.(hamming_lowpass|hamming_highpass)",  # constant 1.0: no window
    r"decode_head\.freqfusions\.\d+\.dysampler\.init_pos",  # computed (SimilarityGuidedResampler.initial_positions)
]

FAMILIES = {
    "segformer": MIT_RULES + SEGFORMER_HEAD_RULES + CLASSIFIER_RULES,
    "offseg": EFFICIENTFORMER_V2_RULES + OFFSEG_HEAD_RULES + CLASSIFIER_RULES,
    "lightham": MSCAN_RULES + LIGHTHAM_HEAD_RULES + CLASSIFIER_RULES,
}


def _family(variant: str) -> list[Rule]:
    if variant not in VARIANTS:
        raise ValueError(f"Unknown OffSeg variant {variant!r}. Known variants: {', '.join(sorted(VARIANTS))}.")
    return FAMILIES[VARIANTS[variant]["decode_head"]]


def _ignored(offset_learning: bool) -> list[str]:
    return IGNORED + [UNUSED_CONV_SEG] if offset_learning else IGNORED


def _is_ignored(key: str, offset_learning: bool) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in _ignored(offset_learning))


def _check_classifier(variant: str, offset_learning: bool, classifier: str | None) -> None:
    """Refuse a checkpoint whose classifier is not the one the model will have (`classifier`: the config's)."""
    expected = classifier or VARIANTS[variant]["classifier"]
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


def convert_state_dict(official: dict[str, Tensor], variant: str, classifier: str | None = None) -> dict[str, Tensor]:
    """Official (mmseg) state dict -> ours. Raises `ValueError` listing unmapped official keys.

    A checkpoint with `decode_head.offset_learning.*` keys has offset learning (its `conv_seg` is unused and
    ignored); one without has the per-pixel classifier `conv_seg`. That must be the model's classifier: the
    variant's, or `classifier` when given (a config override)."""
    rules = _family(variant)
    offset_learning = any(key.startswith("decode_head.offset_learning.") for key in official)
    _check_classifier(variant, offset_learning, classifier)
    ours, unmapped = {}, []
    for key, tensor in official.items():
        if _is_ignored(key, offset_learning):
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

    `family` is a key of `FAMILIES` ("segformer", "offseg", "lightham") or a variant name. The q/k/v projections of a
    MiT block all come from one packed official `in_proj_weight`/`in_proj_bias`, which is returned for each.
    """
    if family in VARIANTS:
        family = VARIANTS[family]["decode_head"]
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
    one tensor); a key of ours that no official key produces raises `ValueError`.
    """
    rules = _family(variant)
    offset_learning = "classifier.class_embeddings" in ours
    if official_keys is None:
        family = VARIANTS[variant]["decode_head"]
        names = {key: official_key(key, family) for key in ours}
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
    loader refuses (`UnpicklingError`), so it is then read with `offseg_hf.safe_pickle`: tensors, OrderedDicts,
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
    return state_dict, class_names


def load_official_checkpoint(path: str, variant: str, **config_overrides) -> OffSegForSemanticSegmentation:
    """Build `variant` (num_labels from the checkpoint) and fill it from an official checkpoint, strictly.

    Class names (`id2label`), unless given: the ones mmengine stored in the checkpoint's `meta["dataset_meta"]`,
    else ADE20K's 150 for a 150-class checkpoint (every official 150-class config is ADE20K), else `LABEL_i`.
    """
    official, class_names = read_official_checkpoint(path)
    converted = convert_state_dict(official, variant, config_overrides.get("classifier"))
    classifier = converted.get("classifier.class_embeddings", converted.get("classifier.classifier.weight"))
    num_labels = classifier.shape[0]
    if "id2label" not in config_overrides:
        if class_names is None and num_labels == len(ADE20K_CLASSES):
            class_names = list(ADE20K_CLASSES)
        if class_names is not None and len(class_names) == num_labels:
            config_overrides["id2label"] = dict(enumerate(class_names))
    config = OffSegConfig.from_variant(variant, **{"num_labels": num_labels, **config_overrides})
    model = OffSegForSemanticSegmentation(config)
    require_fit(model.state_dict(), converted, f"Converted checkpoint does not fit {variant!r}")
    model.load_state_dict(converted, strict=False)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m offseg_hf.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="Official mmseg checkpoint (.pth).")
    parser.add_argument(
        "--variant", required=True, choices=sorted(VARIANTS), help="The preset the checkpoint was trained as."
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
    args = parser.parse_args(argv)
    overrides = {}
    if args.id2label:
        import json

        with open(args.id2label) as handle:
            overrides["id2label"] = {int(k): v for k, v in json.load(handle).items()}
    model = load_official_checkpoint(args.checkpoint, args.variant, **overrides)
    model.save_pretrained(args.output_dir)
    OffSegImageProcessor().save_pretrained(args.output_dir)
    print(f"Converted {args.checkpoint} ({args.variant}, {model.config.num_labels} classes) to {args.output_dir}")


if __name__ == "__main__":
    main()
