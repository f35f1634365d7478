"""Hub repos for the variants: a folder with safetensors weights, config + `auto_map`, the modeling code, the
image processor config and a README rendered from MODEL_CARD.md."""

from __future__ import annotations

import hashlib
import math
import re
from importlib import resources
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import SegformerModel

from ..data.demo import DEMO_CLASSES
from ..presets import MASK2FORMER_FAMILY, has_offset_learning, paper_figures, variant_family
from .examples import RenderedExample, examples_section, widget_examples, widget_note

DESCRIPTIONS = {
    "segformer": "SegFormer ({size}: MiT-{size} encoder, mmseg's all-MLP head with 256 channels)",
    "offseg": "OffSeg-{size} (EfficientFormerV2 backbone, FreqFusion decoder)",
    "lightham": "SegNeXt-{size} (MSCAN-{size} encoder, LightHam decoder with matrix decomposition at 1/8)",
    MASK2FORMER_FAMILY: (
        "Mask2Former (Swin-{size} backbone, multi-scale deformable pixel decoder, masked-attention transformer "
        "decoder, 100 queries)"
    ),
}
# How a preset classifies: (offset learning, baseline) by family.
CLASSIFIER_DESCRIPTIONS = {
    "per_pixel": (
        "with **offset learning**",
        "with the **per-pixel** classifier (a 1x1 convolution, as originally published): the baseline the paper "
        "compares offset learning with",
    ),
    MASK2FORMER_FAMILY: (
        "with **offset learning** between the mask embeddings and the per-pixel mask features",
        "as originally published (mask classification without offsets): the baseline the paper compares offset "
        "learning with",
    ),
}


# Multiply-adds of the official mmseg modules (github.com/HVision-NKU/OffSeg) at 512x512 with 150 classes, counted
# by `torch.utils.flop_counter` on those modules themselves (CARAFE's multiply-adds, an mmcv op, not included).
OFFICIAL_GMAC_150 = {
    "segformer-b0-offset": 8.67,
    "segformer-b1-offset": 16.16,
    "segformer-b2-offset": 25.96,
    "segformer-b3-offset": 42.58,
    "segformer-b4-offset": 59.19,
    "segformer-b5-offset": 75.13,
    "offseg-t": 9.39,
    "offseg-b": 14.66,
    "offseg-l": 21.80,
    "segnext-t": 6.40,
    "segnext-t-offset": 7.15,
    "segnext-s": 15.65,
    "segnext-s-offset": 16.40,
    "segnext-b": 32.69,
    "segnext-b-offset": 34.74,
}

FLOPS_NOTES = {
    "segformer": (
        "This implementation computes the official model's function with fewer multiply-adds: the SegFormer "
        "head's 1x1 fusion convolution is applied to each stage before upsampling instead of to the concatenated "
        "upsampled maps, and offset learning's feature-offset term goes through a K x K matrix."
    ),
    "offseg": (
        "The paper's FLOPs leave out most of offset learning's matrix products, which OffSeg runs at 1/4 "
        "resolution (0.63 GMAC each at 512x512 and 150 classes); the count above includes every one. This "
        "implementation evaluates the feature-offset term through a K x K matrix. Neither count includes CARAFE's "
        "multiply-adds (about 0.1-0.2 GMAC)."
    ),
    "lightham": (
        "This implementation computes the official model's function with fewer multiply-adds: the LightHam head's "
        "1x1 squeeze convolution is applied to each stage before upsampling instead of to the concatenated "
        "upsampled maps, and offset learning's feature-offset term (where present) goes through a K x K matrix."
    ),
    MASK2FORMER_FAMILY: (
        "The paper gives no FLOPs for Mask2Former. The count above is this implementation's at 512x512, the semantic "
        "inference (every query's mask upsampled to the input) included; offset learning's feature-offset term goes "
        "through a Q x Q matrix (Q = 100 queries). The deformable attention's sampling is not counted."
    ),
}

# The official training recipe of each family, for the card.
TRAINING_RECIPES = {
    "per_pixel": (
        "AdamW (lr 6e-5, weight decay 0.01; the official parameter groups: decode head at 10x the lr, no decay on "
        "the backbone's layers named `norm`), 1500 warmup iterations then poly decay, 160k iterations at batch 16, "
        "crop 512, mmseg augmentation (random resize 0.5-2.0, crop with the 75% single-class limit, flip, "
        "photometric distortion)."
    ),
    MASK2FORMER_FAMILY: (
        "AdamW (lr 1e-4, weight decay 0.05; backbone at 0.1x the lr; no decay on norms, position bias tables and "
        "query/level embeddings), gradients clipped to L2 norm 0.01, poly decay (power 0.9) without warmup, 160k "
        "iterations at batch 16, crop 512, mmseg augmentation; Mask2Former's loss (class 2.0 with no-object 0.1, "
        "mask 5.0, dice 5.0, 12544 sampled points)."
    ),
}


def _kind(variant: str) -> str:
    """The key of the per-kind tables: "mask2former", or "per_pixel" for the families with a pixel classifier."""
    return MASK2FORMER_FAMILY if variant_family(variant) == MASK2FORMER_FAMILY else "per_pixel"


def flops_note(variant: str, num_labels: int) -> str:
    """Why the counted multiply-adds differ from the paper's FLOPs, with the official modules' count."""
    note = FLOPS_NOTES[variant_family(variant)]
    official = OFFICIAL_GMAC_150.get(variant)
    if official is not None and num_labels == 150:
        note += f" The official modules count {official:.2f} GMAC at 512x512 with 150 classes."
    return note


# The paper's other data sets (`PAPER_FIGURES` keys `<key>_miou`, `<key>_gflops`), with the input its FLOPs are for.
_OTHER_DATA_SETS = (
    ("cityscapes", "Cityscapes", "2048x1024"),
    ("pascal_context", "Pascal Context 59", "512x512"),
    ("coco_stuff", "COCO-Stuff-164k", "512x512"),
)
# How the official configs test on ADE20K: SegNeXt's and Mask2Former's whole images, the others' sliding windows.
_ADE20K_INFERENCE = {"lightham": "whole image", MASK2FORMER_FAMILY: "whole image"}


def paper_section(variant: str) -> str:
    paper = paper_figures(variant)
    if not paper:
        return "The paper reports no figures for this variant."
    inference = _ADE20K_INFERENCE.get(variant_family(variant), "sliding window")
    others = [
        f"{paper[f'{key}_miou']} on {name} ({paper[f'{key}_gflops']} GFLOPs at {size})"
        for key, name, size in _OTHER_DATA_SETS
        if f"{key}_miou" in paper
    ]
    more = f"; mIoU {', '.join(others)}" if others else ""
    flops = f", {paper['gflops']} GFLOPs at 512x512" if "gflops" in paper else ""
    return (
        f"{paper['ade20k_miou']} mIoU on ADE20K (single scale, {inference}){more}; {paper['params_m']} M "
        f"parameters{flops}. These are the paper's numbers, not measurements of the weights in this repository."
    )


def variant_description(variant: str) -> str:
    """What the model is: its family and size, and its classifier."""
    family = variant_family(variant)
    size = variant.split("-")[2 if family == MASK2FORMER_FAMILY else 1].upper()  # mask2former-swin-t: "T"
    offset, baseline = CLASSIFIER_DESCRIPTIONS[_kind(variant)]
    return f"{DESCRIPTIONS[family].format(size=size)} {offset if has_offset_learning(variant) else baseline}"


def parameters_note(variant: str) -> str:
    """What the parameter count leaves out: mmseg builds a `conv_seg` that offset learning never uses."""
    offset_head = has_offset_learning(variant) and _kind(variant) == "per_pixel"
    return "; without mmseg's unused `conv_seg`" if offset_head else ""


# What a repo's `handler.py` needs on Inference Endpoints beyond its base image (which has torch and Pillow; its
# transformers may predate 5, which the remote code needs). timm: EfficientFormerV2 and the layers every OffSeg
# modeling file imports; scipy: transformers' Mask2Former (its matcher imports it).
ENDPOINT_REQUIREMENTS = ("transformers>=5", "timm>=1.0", "safetensors>=0.4")
MASK2FORMER_REQUIREMENTS = ("scipy>=1.10",)
HANDLER_FILE = "handler.py"


def handler_source() -> str:
    """The source of the Inference Endpoints handler (`offseg_hf/hub/templates/handler.py`) that every repo carries."""
    return resources.files("offseg_hf.hub").joinpath("templates", HANDLER_FILE).read_text()


def endpoint_requirements(variant: str) -> list[str]:
    """requirements.txt of a repo: what `handler.py` and the remote code need beyond the Endpoints base image."""
    extra = MASK2FORMER_REQUIREMENTS if variant_family(variant) == MASK2FORMER_FAMILY else ()
    return [*ENDPOINT_REQUIREMENTS, *extra]


def write_endpoint_files(folder: str | Path, variant: str) -> list[Path]:
    """Write `handler.py` and `requirements.txt` into a saved model folder; return their paths."""
    folder = Path(folder)
    handler = folder / HANDLER_FILE
    handler.write_text(handler_source())
    requirements = folder / "requirements.txt"
    requirements.write_text("\n".join(endpoint_requirements(variant)) + "\n")
    return [handler, requirements]


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and values, in name order).
    `examples/evaluate_segmentation.py` records it with its results; `examples/push_to_hub.py` writes a
    `model-index` only from results whose fingerprint is that of the weights it publishes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_measured_on(result: dict, model: nn.Module, source: str) -> None:
    """Raise `ValueError` unless `result` (an evaluate_segmentation.py eval_results.json) was measured on exactly
    `model`'s weights."""
    expected, recorded = weights_fingerprint(model), result.get("weights_sha256")
    if recorded != expected:
        raise ValueError(
            f"{source} was not measured on these weights (its weights_sha256 is {recorded}, these weights' is "
            f"{expected}). Evaluate the weights being published with examples/evaluate_segmentation.py, or leave "
            "the result out."
        )


def _in_place_product_flops(bias_shape, first_shape, second_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of bias + ([b,] m, k) @ ([b,] k, n): 2 * [b *] m * k * n (the addition is not counted, as for the
    out-of-place `addmm` and `baddbmm`)."""
    return 2 * math.prod(first_shape) * second_shape[-1]


# The counter's own formulas cover the out-of-place products only; an in-place one would count as nothing (offset
# learning's fast form adds its feature-offset term with `baddbmm_`: 0.37 GMAC of OffSeg-T at 512x512). Given to each
# counter (`custom_mapping`), not registered globally.
IN_PLACE_PRODUCTS = {torch.ops.aten.baddbmm_: _in_place_product_flops, torch.ops.aten.addmm_: _in_place_product_flops}


def count_gmac(model: nn.Module, pixel_values: torch.Tensor | None = None) -> float:
    """Multiply-accumulates (FLOPs / 2) of the matrix products and convolutions in one forward pass (default input
    1x3x512x512), counted by `torch.utils.flop_counter` with eager attention in MiT encoders (the counter does not
    know every sdpa kernel) and with the in-place products counted too (`IN_PLACE_PRODUCTS`)."""
    if pixel_values is None:
        pixel_values = torch.zeros(1, 3, 512, 512)
    encoders = [m for m in model.modules() if isinstance(m, SegformerModel)]
    for encoder in encoders:
        encoder.set_attn_implementation("eager")
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=IN_PLACE_PRODUCTS) as counter:
            model(pixel_values)
    finally:
        for encoder in encoders:
            encoder.set_attn_implementation("sdpa")
    return counter.get_total_flops() / 2e9


def render_template(template: str, values: dict[str, object]) -> str:
    """Fill `{name}` placeholders whose name is in `values`; other braces (e.g. BibTeX) stay as they are."""
    return re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


# What a card names as the training data when examples/push_to_hub.py is told none: the synthetic demo set for a
# model with its classes (what train.py's default run trains), else ADE20K, the data set of the official weights.
# "offseg-demo" is evaluate_segmentation.py's name for the demo set, which offseg_hf.data.demo draws: no Hub data set.
DEMO_DATA_SET = ("offseg-demo", "offseg-hf's synthetic demo scenes")
ADE20K_DATA_SET = ("scene_parse_150", "ADE20K")


def default_data_set(id2label: dict) -> tuple[str, str]:
    """(Hub id or name, name on the card) of the data set a model with these classes was most likely trained on."""
    names = [id2label[key] for key in sorted(id2label, key=int)]
    return DEMO_DATA_SET if tuple(names) == DEMO_CLASSES else ADE20K_DATA_SET


def eval_results(result: dict, dataset_name: str, dataset_pretty_name: str) -> list[EvalResult]:
    """model-index entries for a result of `examples/evaluate_segmentation.py` (fractions -> percent) on the Hub
    data set `dataset_name`, shown as `dataset_pretty_name`."""
    return [
        EvalResult(
            task_type="image-segmentation",
            dataset_type=dataset_name,
            dataset_name=dataset_pretty_name,
            dataset_split=result.get("split", "validation"),
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


def results_sentence(result: dict, dataset_pretty_name: str) -> str:
    """The card's results line: the figures and the protocol they were measured with (`eval_protocol` of an
    eval_results.json)."""
    protocol = result.get("eval_protocol", {})
    mode = protocol.get("mode", "slide")
    details = [f"{result.get('num_images', '?')} images", f"{mode} inference", "single scale"]
    if protocol.get("scale"):
        details.append(f"keep-ratio resize to {tuple(protocol['scale'])}")
    if mode == "slide" and protocol.get("crop_size") and protocol.get("stride"):
        details.append(f"windows {tuple(protocol['crop_size'])} every {tuple(protocol['stride'])}")
    measured_by = result.get("measured_by", "examples/evaluate_segmentation.py")
    return (
        f"mIoU {100 * result['mean_iou']:.2f}, mAcc {100 * result['mean_accuracy']:.2f}, "
        f"aAcc {100 * result['overall_accuracy']:.2f} on {dataset_pretty_name} {result.get('split', 'validation')} "
        f"({', '.join(details)}), measured by offseg-hf's `{measured_by}`."
    )


SPACE_SDK_PYTHON = "3.11"  # transformers 5 needs Python >= 3.10
# What the Space's app.py needs beyond the Gradio SDK image (gradio itself is pinned by `sdk_version`).
SPACE_REQUIREMENTS = ("torch>=2.4", "transformers>=5", "timm>=1.0", "safetensors>=0.4")


def space_section(space_id: str | None) -> str:
    """The card's line about the demo Space (or, without one, how to run the same demo locally)."""
    if space_id:
        return (
            f"**Demo Space**: [{space_id}](https://huggingface.co/spaces/{space_id}) runs this model in a Gradio app "
            "(upload an image; colour overlay, legend, per-class area and, for offset-learning models, the class "
            "attention)."
        )
    return (
        "**Demo**: offseg-hf's Gradio app runs it locally: `pip install gradio` and "
        "`python examples/app.py --model_name_or_path {repo_id} --allow_download`."
    )


def onnx_section(onnx_opset: int | None) -> str:
    """The card's paragraph about `onnx/model.onnx` (or that the repository has none)."""
    if onnx_opset is None:
        return (
            "**ONNX**: this repository has no ONNX export (offseg-hf's `examples/push_to_hub.py --onnx` writes "
            "`onnx/model.onnx` where the exporter handles the model)."
        )
    return (
        f"**ONNX**: `onnx/model.onnx` (opset {onnx_opset}, dynamic batch, height and width) takes `pixel_values` "
        "(batch, 3, height, width), normalised as `preprocessor_config.json` says, and gives `logits`, the class "
        "scores at reduced resolution (the model's `outputs.logits`; the file's metadata holds `id2label`): resize "
        "them to the image and take the argmax over classes. With offseg-hf installed, "
        "`offseg_hf.export.onnx.OnnxSegmenter` does exactly that; with ONNX Runtime alone:\n\n"
        "```python\n"
        "import numpy as np, onnxruntime as ort\n"
        "from huggingface_hub import hf_hub_download\n"
        "from transformers import AutoImageProcessor\n\n"
        'processor = AutoImageProcessor.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        'session = ort.InferenceSession(hf_hub_download("{repo_id}", "onnx/model.onnx"))\n'
        'pixel_values = processor(images=image, return_tensors="np")["pixel_values"]\n'
        'logits = session.run(["logits"], {"pixel_values": pixel_values})[0]  # (1, K, h, w)\n'
        "```"
    )


def space_readme(space_id: str, model_ids: list[str], gradio_version: str) -> str:
    """README.md of the demo Space: Space metadata (`models:` links it from each model page) and a short text."""
    title = space_id.split("/")[-1]
    models = "\n".join(f"  - {model_id}" for model_id in model_ids)
    listing = "\n".join(f"- [{model_id}](https://huggingface.co/{model_id})" for model_id in model_ids)
    return (
        "---\n"
        f"title: {title}\n"
        "emoji: 🎯\n"
        "colorFrom: indigo\n"
        "colorTo: yellow\n"
        "sdk: gradio\n"
        f"sdk_version: {gradio_version}\n"
        f'python_version: "{SPACE_SDK_PYTHON}"\n'
        "app_file: app.py\n"
        "license: apache-2.0\n"
        "short_description: OffSeg semantic segmentation with offset learning\n"
        f"models:\n{models}\n"
        "tags:\n  - image-segmentation\n  - semantic-segmentation\n  - offseg\n"
        "---\n\n"
        "# OffSeg semantic segmentation\n\n"
        'A Gradio demo of the models of "Revisiting Efficient Semantic Segmentation: Learning Offsets for Better '
        "Spatial and Class Feature Alignment\" (ICCV 2025), packaged for Transformers by offseg-hf. The model pages' "
        "widgets cannot run these models (Inference Providers do not run custom-code models); this Space does, "
        "through each repository's own code (`trust_remote_code=True`).\n\n"
        f"Models:\n\n{listing}\n\n"
        "`app.py` is offseg-hf's `examples/app.py`; `app_config.json` names the models and allows downloading them.\n"
    )


def space_requirements(variants: list[str]) -> list[str]:
    """requirements.txt of the demo Space (scipy where a Mask2Former model is among its models)."""
    extra = MASK2FORMER_REQUIREMENTS if any(variant_family(v) == MASK2FORMER_FAMILY for v in variants) else ()
    return [*SPACE_REQUIREMENTS, *extra]


def render_card(
    template: str,
    variant: str,
    repo_id: str,
    params_m: float,
    gmac: float,
    num_labels: int,
    dataset_name: str,
    dataset_pretty_name: str,
    weights_source: str,
    result: dict | None = None,
    space_id: str | None = None,
    onnx_opset: int | None = None,
    examples: list[RenderedExample] | None = None,
    random_weights: bool = False,
) -> ModelCard:
    """The model card of one variant, trained on the Hub data set `dataset_name` (shown as `dataset_pretty_name`).
    `model-index` is written only from `result` (measured on these weights). `space_id`: the demo Space the card
    links; `onnx_opset`: the opset of the repo's `onnx/model.onnx` (None: the repo has none); `examples`: the
    predictions `hub_examples.render_examples` wrote into the repo (the widget's examples and the card's gallery;
    `random_weights` says they come from untrained weights)."""
    examples = examples or []
    paper = paper_figures(variant)
    results_section = (
        "Not evaluated yet: no measurement on these weights is claimed here."
        if result is None
        else results_sentence(result, dataset_pretty_name)
    )
    text = render_template(
        template,
        {
            "model_name": repo_id.split("/")[-1],
            "variant_description": variant_description(variant),
            "repo_id": repo_id,
            "variant": variant,
            "params_m": f"{params_m:.2f}",
            "paper_params_m": paper.get("params_m", "n/a"),
            "parameters_note": parameters_note(variant),
            "gmac": f"{gmac:.2f}",
            "paper_gflops": paper.get("gflops", "n/a"),
            "paper_section": paper_section(variant),
            "flops_note": flops_note(variant, num_labels),
            "num_labels": num_labels,
            "dataset_name": dataset_name,
            "dataset_pretty_name": dataset_pretty_name,
            "weights_source": weights_source,
            "results_section": results_section,
            "training_recipe": TRAINING_RECIPES[_kind(variant)],
            # Rendered first so that their own {repo_id} is filled too.
            "space_section": render_template(space_section(space_id), {"repo_id": repo_id}),
            "onnx_section": render_template(onnx_section(onnx_opset), {"repo_id": repo_id}),
            "examples_section": examples_section(examples, random_weights),
            "widget_note": widget_note(examples),
        },
    )
    card = ModelCard(re.sub(r"\n{3,}", "\n\n", text))  # an empty section leaves its line blank: one blank line
    if dataset_name == DEMO_DATA_SET[0]:  # no Hub data set for the metadata to link
        card.data.datasets = None
    if result is not None:
        card.data.model_name = repo_id.split("/")[-1]
        card.data.eval_results = eval_results(result, dataset_name, dataset_pretty_name)
    # Only examples whose output was rendered from these weights: no widget input that nothing answers.
    card.data.widget = widget_examples(examples) or None
    return ModelCard(str(card))  # re-render so the YAML block holds the metadata set here
