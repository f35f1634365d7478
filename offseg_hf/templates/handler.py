"""Inference Endpoints handler of an offseg-hf model repo (custom handler: `handler.py` at the repo root).

Hub model pages run no widget for custom-code models (Inference Providers do not deploy them); a dedicated
Inference Endpoint does, through this file. It needs only `transformers`, `torch` and Pillow (plus the repo's
requirements.txt): the modeling code comes from the repo itself (`trust_remote_code=True`), offseg-hf need not be
installed.

Request: `{"inputs": IMAGE, "parameters": {...}}` where IMAGE is a PIL image (what the toolkit hands over for an
`image/*` request body), raw bytes, a base64 string or a `data:image/...;base64,` URL (JSON requests). Parameters
(all optional):
  - `return_label_map` (bool): also return the label map, a base64 PNG with one class id per pixel.
  - the task's `threshold`, `mask_threshold`, `overlap_mask_area_threshold` and `subtask` ("semantic") are
    accepted and have no effect: every pixel gets exactly one class.
Response: the image-segmentation task's list `[{"label": str, "score": float, "mask": base64 PNG}]`, one entry
per class present in the prediction, masks mode "L" (255 inside, 0 outside) at the input image's size. A pixel
belongs to exactly one mask. `score` is the mean probability of the class over its mask. With
`return_label_map`, `{"segments": [...that list...], "label_map": base64 PNG}` (mode "L", or 16-bit "I;16" for
more than 256 classes).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import torch
from PIL import Image
from torch.nn import functional as F
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

# The image-segmentation task's own parameters (huggingface_hub's InferenceClient sends them): accepted and ignored,
# since a semantic segmentation model gives exactly one mask per present class, with no thresholds to apply.
TASK_PARAMETERS = {"threshold", "mask_threshold", "overlap_mask_area_threshold", "subtask"}


def _decode_image(inputs: Any) -> Image.Image:
    """A PIL image from a PIL image, bytes, a base64 string or a data URL (also under a dict's "image" key)."""
    if isinstance(inputs, dict) and "image" in inputs:
        inputs = inputs["image"]
    if isinstance(inputs, Image.Image):
        return inputs
    if isinstance(inputs, str):
        text = inputs.strip()
        if text.startswith("data:"):
            header, _, text = text.partition(",")
            if ";base64" not in header:
                raise ValueError("a data URL input must be base64-encoded (data:image/...;base64,...)")
        try:
            inputs = base64.b64decode(text + "=" * (-len(text) % 4), validate=False)
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"inputs is a string but not base64 image data: {error}") from error
    if isinstance(inputs, (bytes, bytearray, memoryview)):
        try:
            image = Image.open(io.BytesIO(bytes(inputs)))
            image.load()
        except Exception as error:  # PIL raises several types for data it cannot read
            raise ValueError(f"inputs could not be read as an image: {error}") from error
        return image
    raise ValueError(
        f"inputs must be an image: a PIL image, bytes, a base64 string or a data URL; got {type(inputs).__name__}"
    )


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def class_probabilities(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) logits -> per-pixel class probabilities. Mask2Former's semantic maps are already sums of
    class probabilities times mask probabilities (non-negative), so they are normalised over K; the other models'
    logits go through a softmax."""
    if getattr(model.config, "num_queries", None) is not None:  # Mask2Former
        return logits / logits.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return logits.softmax(dim=1)


class EndpointHandler:
    def __init__(self, path: str = ""):
        self.processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
        self.model = AutoModelForSemanticSegmentation.from_pretrained(path, trust_remote_code=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.id2label = {int(index): label for index, label in self.model.config.id2label.items()}

    @torch.inference_mode()
    def predict(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """The label map (H, W) at the image's size and the class probabilities (K, H, W) it is the argmax of."""
        image = image.convert("RGB")
        pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.device)
        logits = self.model(pixel_values=pixel_values).logits.float()  # (1, K, h, w)
        # Resized to the image before the argmax, as the processor's post_process_semantic_segmentation does.
        logits = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
        probabilities = class_probabilities(self.model, logits)[0]  # (K, H, W)
        return logits[0].argmax(dim=0), probabilities

    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('the request must be a JSON object with "inputs" (and optional "parameters")')
        parameters = data.get("parameters") or {}
        unknown = set(parameters) - {"return_label_map"} - TASK_PARAMETERS
        if unknown:
            raise ValueError(f"unknown parameters {sorted(unknown)}; this handler takes return_label_map")
        if parameters.get("subtask") not in (None, "semantic"):
            raise ValueError(f"this model does semantic segmentation only; got subtask {parameters['subtask']!r}")
        label_map, probabilities = self.predict(_decode_image(data["inputs"]))
        segments = []
        for class_id in torch.unique(label_map).tolist():  # ascending ids
            inside = label_map == class_id  # (H, W)
            mask = Image.fromarray(inside.to(torch.uint8).mul(255).cpu().numpy())  # uint8 (H, W): mode "L"
            segments.append(
                {
                    "label": self.id2label.get(class_id, str(class_id)),
                    "score": round(probabilities[class_id][inside].mean().item(), 4),
                    "mask": _png_base64(mask),
                }
            )
        if not parameters.get("return_label_map"):
            return segments
        ids = label_map.cpu().numpy()
        label_image = Image.fromarray(ids.astype("uint8" if len(self.id2label) <= 256 else "uint16"))  # L / I;16
        return {"segments": segments, "label_map": _png_base64(label_image)}
