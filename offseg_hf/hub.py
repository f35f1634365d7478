"""Hub repos for the variants: a folder with safetensors weights, config + `auto_map`, the modeling code, the
image processor config and a README rendered from MODEL_CARD.md."""

from __future__ import annotations

import hashlib
import re

import torch
from huggingface_hub import EvalResult, ModelCard
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import SegformerModel

from .configuration_offseg import PAPER_FIGURES, VARIANTS

DESCRIPTIONS = {
    "segformer": "SegFormer ({size}: MiT-{size} encoder, mmseg's all-MLP head with 256 channels)",
    "offseg": "OffSeg-{size} (EfficientFormerV2 backbone, FreqFusion decoder)",
}


def variant_description(variant: str) -> str:
    family = VARIANTS[variant]["decode_head"]
    size = variant.split("-")[1].upper()
    return DESCRIPTIONS[family].format(size=size)


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and values, in name order). `examples/evaluate.py`
    records it with its results; `examples/push_to_hub.py` writes a `model-index` only from results whose
    fingerprint is that of the weights it publishes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_measured_on(result: dict, model: nn.Module, source: str) -> None:
    """Raise `ValueError` unless `result` (an evaluate.py JSON) was measured on exactly `model`'s weights."""
    expected, recorded = weights_fingerprint(model), result.get("weights_sha256")
    if recorded != expected:
        raise ValueError(
            f"{source} was not measured on these weights (its weights_sha256 is {recorded}, these weights' is "
            f"{expected}). Evaluate the weights being published with examples/evaluate.py, or leave the result out."
        )


def count_gmac(model: nn.Module, pixel_values: torch.Tensor | None = None) -> float:
    """Multiply-accumulates (FLOPs / 2) that `torch.utils.flop_counter` sees in one forward pass (default input
    1x3x512x512), with eager attention in MiT encoders (the counter does not know every sdpa kernel)."""
    if pixel_values is None:
        pixel_values = torch.zeros(1, 3, 512, 512)
    encoders = [m for m in model.modules() if isinstance(m, SegformerModel)]
    for encoder in encoders:
        encoder.set_attn_implementation("eager")
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(pixel_values)
    finally:
        for encoder in encoders:
            encoder.set_attn_implementation("sdpa")
    return counter.get_total_flops() / 2e9


def render_template(template: str, values: dict[str, object]) -> str:
    """Fill `{name}` placeholders whose name is in `values`; other braces (e.g. BibTeX) stay as they are."""
    return re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


def eval_results(result: dict, dataset_id: str, dataset_name: str) -> list[EvalResult]:
    """model-index entries for a result of `examples/evaluate.py` (fractions -> percent)."""
    return [
        EvalResult(
            task_type="image-segmentation",
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_split="validation",
            metric_type=metric,
            metric_name=name,
            metric_value=round(100 * result[key], 2),
        )
        for metric, name, key in (
            ("mean_iou", "mIoU", "mean_iou"),
            ("accuracy", "mAcc", "mean_accuracy"),
            ("accuracy", "aAcc", "overall_accuracy"),
        )
    ]


def render_card(
    template: str,
    variant: str,
    repo_id: str,
    params_m: float,
    gmac: float,
    num_labels: int,
    dataset_id: str,
    dataset_name: str,
    weights_source: str,
    result: dict | None = None,
) -> ModelCard:
    """The model card of one variant. `model-index` is written only from `result` (measured on these weights)."""
    paper = PAPER_FIGURES[variant]
    if result is None:
        results_section = "Not evaluated yet: no measurement on these weights is claimed here."
    else:
        results_section = (
            f"mIoU {100 * result['mean_iou']:.2f}, mAcc {100 * result['mean_accuracy']:.2f}, "
            f"aAcc {100 * result['overall_accuracy']:.2f} on {dataset_name} validation "
            f"({result.get('num_images', '?')} images, {result.get('mode', 'slide')} inference, single scale), "
            "measured with offseg-hf's `examples/evaluate.py`."
        )
    text = render_template(
        template,
        {
            "model_name": repo_id.split("/")[-1],
            "variant_description": variant_description(variant),
            "repo_id": repo_id,
            "variant": variant,
            "params_m": f"{params_m:.2f}",
            "paper_params_m": paper["params_m"],
            "gmac": f"{gmac:.2f}",
            "paper_gflops": paper["gflops"],
            "paper_miou": paper["ade20k_miou"],
            "num_labels": num_labels,
            "dataset_id": dataset_id,
            "dataset_name": dataset_name,
            "weights_source": weights_source,
            "results_section": results_section,
        },
    )
    card = ModelCard(text)
    if result is not None:
        card.data.model_name = repo_id.split("/")[-1]
        card.data.eval_results = eval_results(result, dataset_id, dataset_name)
        card = ModelCard(str(card))  # re-render so the YAML block holds model-index
    return card
