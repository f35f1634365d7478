"""The optimizer and schedule of the recipe: AdamW parameter groups as the official runs had them, and mmseg's
linear warmup + poly decay, iteration-based."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

# A parameter's treatment: (lr multiplier, weight-decay multiplier).
Multipliers = tuple[float, float]

NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
NO_DECAY_NAME_KEYS: tuple[str, ...] = ("pos_block", "norm")


def official_custom_keys(head_lr_mult: float = 10.0) -> dict[str, Multipliers]:
    """The official configs' `paramwise_cfg.custom_keys`: `pos_block` and `norm` without weight decay, `head` at
    `head_lr_mult` times the learning rate."""
    return {"pos_block": (1.0, 0.0), "norm": (1.0, 0.0), "head": (head_lr_mult, 1.0)}


def mask2former_custom_keys(backbone_lr_mult: float = 0.1, depths=(2, 2, 6, 2)) -> dict[str, Multipliers]:
    """The official Mask2Former(-offset) Swin config's custom keys: the backbone at `backbone_lr_mult`, its norms
    (patch embedding, every block's and downsample's, the per-stage outputs) and position bias tables also without
    decay, the query and level embeddings without decay. (Its `norm_decay_mult=0` then exempts every other norm
    layer: see `official_rule`.)"""
    backbone_no_decay = (backbone_lr_mult, 0.0)
    keys = {
        "backbone": (backbone_lr_mult, 1.0),
        "backbone.patch_embed.norm": backbone_no_decay,
        "backbone.norm": backbone_no_decay,
        "absolute_pos_embed": backbone_no_decay,
        "relative_position_bias_table": backbone_no_decay,
        "query_embed": (1.0, 0.0),
        "query_feat": (1.0, 0.0),
        "level_embed": (1.0, 0.0),
    }
    for stage, blocks in enumerate(depths):
        keys.update({f"backbone.stages.{stage}.blocks.{block}.norm": backbone_no_decay for block in range(blocks)})
    keys.update({f"backbone.stages.{stage}.downsample.norm": backbone_no_decay for stage in range(len(depths) - 1)})
    return keys


def first_matching_key(name: str, keys) -> str | None:
    """mmengine's `DefaultOptimWrapperConstructor` rule: the keys sorted alphabetically, then by length, longest
    first; the first one contained in the parameter's full name applies, and only that one."""
    for key in sorted(sorted(keys), key=len, reverse=True):
        if key in name:
            return key
    return None


def _is_norm_layer(module: nn.Module) -> bool:
    return isinstance(module, NORM_LAYERS) or (hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm))


def _trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Parameter]]:
    """(full name, owning module, parameter) once per trainable parameter, in module order."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                yield (f"{module_name}.{param_name}" if module_name else param_name), module, param


MASK2FORMER_ENCODER = "model.pixel_level_module.encoder"


def _family(model: nn.Module) -> str | None:
    """The model family whose official names `convert.official_key` knows, or None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "offseg_mask2former":
        return "mask2former"
    return getattr(config, "decode_head", None) if hasattr(model, "offseg") else None


def _encoder_prefix(model: nn.Module) -> str:
    if _family(model) == "mask2former":
        return MASK2FORMER_ENCODER
    return "offseg.encoder" if hasattr(model, "offseg") else "encoder"


def _in_encoder(name: str, encoder_prefix: str) -> bool:
    return name == encoder_prefix or name.startswith(encoder_prefix + ".")


# The official (mmseg) name of one of our parameter names in a model family, or None: `offseg_hf.convert.official_key`.
# Training takes it as an argument rather than importing the converter (the CLI, examples/train.py, passes it).
OfficialKey = Callable[[str, str], "str | None"]


def official_names(
    model: nn.Module, encoder_prefix: str | None = None, official_key: OfficialKey | None = None
) -> dict[str, str]:
    """Each trainable parameter's name in the official mmseg model, by `official_key(name, family)` (for OffSeg
    models it is required: `offseg_hf.convert.official_key`).

    A parameter the official model does not have (or a model that is not an `OffSegForSemanticSegmentation`)
    keeps its own name under the official top-level module of its part: `backbone.<name inside the encoder>` for
    encoder parameters, `decode_head.<name>` for the rest (mmseg's `EncoderDecoder` has only these two), so the
    custom keys treat it as they treat its part of the official model.
    """
    encoder_prefix = encoder_prefix or _encoder_prefix(model)
    family = _family(model)
    lookup = None
    if family is not None:
        if official_key is None:
            raise ValueError(
                "The official parameter-group rule needs each parameter's official name: pass "
                "official_key=offseg_hf.convert.official_key (or rule='all_norms')."
            )
        lookup = partial(official_key, family=family)
    names = {}
    for name, _, _ in _trainable_parameters(model):
        official = lookup(name) if lookup is not None else None
        if official is None:
            inside = _in_encoder(name, encoder_prefix)
            official = f"backbone.{name[len(encoder_prefix) + 1 :]}" if inside else f"decode_head.{name}"
        names[name] = official
    return names


def official_rule(
    model: nn.Module,
    head_lr_mult: float = 10.0,
    encoder_prefix: str | None = None,
    backbone_lr_mult: float = 1.0,
    official_key: OfficialKey | None = None,
):
    """The official runs' parameter treatment: `first_matching_key` over the family's custom keys, applied to each
    parameter's official name (`official_names`).

    OffSeg, SegFormer-offset and SegNeXt (`official_custom_keys`): on the official names this gives every
    `decode_head.*` parameter (its BatchNorm/GroupNorm layers and offset learning's `mask_norm` included)
    `head_lr_mult` x lr WITH weight decay ('head' comes before 'norm'); MiT's `norm1`/`norm2`/`attn.norm`/patch-
    embedding norms no decay, but its end-of-stage norms (`layers.N.2`, no 'norm' in the name) decayed;
    EfficientFormerV2's `talking_head1/2` at the head lr with decay, its BatchNorms named `norm1`/`norm2`/
    `mid_norm`/`norm` no decay and those inside Sequentials (`q.1`, `patch_embed.1`, ...) decayed.

    Mask2Former (`mask2former_custom_keys`, with `backbone_lr_mult`): the backbone at that multiple of the lr, its
    norms and bias tables and the query/level embeddings without decay; and, as its `norm_decay_mult=0`, every
    other norm layer (LayerNorm, GroupNorm, BatchNorm) that no key matched without decay.
    """
    family = _family(model)
    if family == "mask2former":
        depths = tuple(model.config.backbone_config.depths)
        keys, norm_decay_mult = mask2former_custom_keys(backbone_lr_mult, depths), 0.0
    else:
        keys, norm_decay_mult = official_custom_keys(head_lr_mult), None
    names = official_names(model, encoder_prefix, official_key)

    def multipliers(name: str, module: nn.Module) -> Multipliers:
        key = first_matching_key(names[name], keys)
        if key is not None:
            return keys[key]
        if norm_decay_mult is not None and _is_norm_layer(module):
            return 1.0, norm_decay_mult
        return 1.0, 1.0

    return multipliers


def all_norms_rule(
    model: nn.Module, head_lr_mult: float = 10.0, encoder_prefix: str | None = None, backbone_lr_mult: float = 1.0
):
    """The paper's recipe as written rather than as run: no weight decay for the parameters of every norm layer
    (LayerNorm, BatchNorm/SyncBatchNorm, GroupNorm, ..., found by module type) and for names containing
    'pos_block' or 'norm'; `head_lr_mult` x lr for everything outside the encoder (`offseg.encoder`, or `encoder`
    for an `OffSegModel`). Other biases keep their decay, as the custom keys exempt only those names."""
    encoder_prefix = encoder_prefix or _encoder_prefix(model)

    def multipliers(name: str, module: nn.Module) -> Multipliers:
        lr_mult = backbone_lr_mult if _in_encoder(name, encoder_prefix) else head_lr_mult
        no_decay = _is_norm_layer(module) or any(key in name for key in NO_DECAY_NAME_KEYS)
        return lr_mult, 0.0 if no_decay else 1.0

    return multipliers


PARAM_GROUP_RULES: dict[str, Callable[..., Callable[[str, nn.Module], Multipliers]]] = {
    "official": official_rule,
    "all_norms": all_norms_rule,
}


def param_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    head_lr_mult: float = 10.0,
    rule: str = "official",
    encoder_prefix: str | None = None,
    backbone_lr_mult: float = 1.0,
    official_key: OfficialKey | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: parameters grouped by their (lr multiplier, decay multiplier) under `rule`
    ("official": `official_rule`, "all_norms": `all_norms_rule`), each group with lr = `learning_rate` x lr
    multiplier and weight_decay = `weight_decay` x decay multiplier. Frozen parameters are left out. Each group
    carries its "lr_mult", "decay_mult" and a "name" such as "lr_x10_decay" (for logging)."""
    if rule not in PARAM_GROUP_RULES:
        raise ValueError(f"Unknown parameter-group rule {rule!r}; known: {', '.join(PARAM_GROUP_RULES)}.")
    names = {"official_key": official_key} if rule == "official" else {}  # the only rule that reads official names
    multipliers_of = PARAM_GROUP_RULES[rule](model, head_lr_mult, encoder_prefix, backbone_lr_mult, **names)
    grouped: dict[Multipliers, list[nn.Parameter]] = {}
    for name, module, param in _trainable_parameters(model):
        grouped.setdefault(multipliers_of(name, module), []).append(param)
    return [
        {
            "params": params,
            "lr": learning_rate * lr_mult,
            "weight_decay": weight_decay * decay_mult,
            "lr_mult": lr_mult,
            "decay_mult": decay_mult,
            "name": f"lr_x{lr_mult:g}_{'decay' if decay_mult else 'no_decay'}",
        }
        for (lr_mult, decay_mult), params in sorted(grouped.items(), key=lambda item: (item[0][0], -item[0][1]))
    ]


def build_optimizer(
    model: nn.Module, settings: dict[str, Any], official_key: OfficialKey | None = None
) -> torch.optim.AdamW:
    """AdamW over `param_groups` with the recipe's learning rate, betas, weight decay and parameter-group rule
    (`official_key`: see `official_names`)."""
    groups = param_groups(
        model,
        settings["learning_rate"],
        settings["weight_decay"],
        settings["head_lr_mult"],
        rule=settings.get("param_group_rule", "official"),
        backbone_lr_mult=settings.get("backbone_lr_mult", 1.0),
        official_key=official_key,
    )
    return torch.optim.AdamW(
        groups,
        lr=settings["learning_rate"],
        betas=(settings["adam_beta1"], settings["adam_beta2"]),
        weight_decay=settings["weight_decay"],
    )


@dataclass
class WarmupPolyFactor:
    """Learning-rate factor at a step: mmseg's LinearLR warmup then PolyLR, iteration-based.

    For step t (0-based, the optimizer steps already taken): `start + (1 - start) * t / warmup` while t < warmup,
    then `(1 - (t - warmup) / (total - warmup)) ** power`, reaching 0 after the last step (t = total).
    A dataclass so `LambdaLR.state_dict()` saves it.
    """

    total_steps: int
    warmup_steps: int = 1500
    start_factor: float = 1e-6
    power: float = 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        return max(0.0, 1.0 - (step - self.warmup_steps) / decay_steps) ** self.power


def build_scheduler(optimizer: torch.optim.Optimizer, settings: dict[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
    """Step it once per optimizer step; every group keeps its own base lr (so the head stays at 10x)."""
    factor = WarmupPolyFactor(
        total_steps=settings["max_train_steps"],
        warmup_steps=settings["warmup_steps"],
        start_factor=settings["warmup_start_factor"],
        power=settings["poly_power"],
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)
