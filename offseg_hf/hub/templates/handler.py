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

Limits: an image may have at most `max_image_pixels` pixels (width x height; default 16,777,216 = 4096 x 4096,
which a 12 MP photo fits; a deployer sets the environment variable OFFSEG_MAX_IMAGE_PIXELS, e.g. among the
endpoint's environment variables, or passes `EndpointHandler(path, max_image_pixels=...)`). The size is read from
the file's header, before any pixel is decoded; Pillow's own decompression-bomb guard stays on above that. Data that
is not an image, a truncated or corrupt file, an empty (0-pixel) image and an animated or multi-frame file (GIF,
APNG, WebP, multi-page TIFF; an MPO photo counts as its first, main frame) are refused: each raises a ValueError
whose one-line message the toolkit returns, and the next request is served as usual. Memory: the logits are resized
to the image in row bands (the image processor's `post_process_label_map_and_scores`), so a request's working memory
stays within the band budget (OFFSEG_RESIZE_BUDGET_MB, default 256 MiB) plus the label map (8 bytes a pixel) and the
masks, whatever the number of classes.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import struct
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

# The image-segmentation task's own parameters (huggingface_hub's InferenceClient sends them): accepted and ignored,
# since a semantic segmentation model gives exactly one mask per present class, with no thresholds to apply.
TASK_PARAMETERS = {"threshold", "mask_threshold", "overlap_mask_area_threshold", "subtask"}
MAX_PIXELS_ENV = "OFFSEG_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pixel_limit(value: int | None = None) -> int:
    """The pixel limit: `value`, else $OFFSEG_MAX_IMAGE_PIXELS, else 16,777,216 (4096 x 4096)."""
    if value is None:
        text = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_IMAGE_PIXELS
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise ValueError(f"{MAX_PIXELS_ENV}={text!r} is not a whole number of pixels") from None
    if value < 1:
        raise ValueError(f"the pixel limit must be a positive number of pixels; got {value}")
    return value


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _empty_png(data: bytes) -> bool:
    """Whether `data` is a PNG whose header gives it no pixels (Pillow refuses to open those without saying why)."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 24:
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width == 0 or height == 0


def _check_image(image: Image.Image, limit: int) -> Image.Image:
    """Refuse empty, oversized and multi-frame images from their header, before their pixels are decoded."""
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"the image is empty ({width}x{height} pixels)")
    if width * height > limit:
        raise ValueError(
            f"the image has {width}x{height} = {width * height:,} pixels, more than this endpoint's limit of "
            f"{limit:,} ({MAX_PIXELS_ENV}); send a smaller image"
        )
    # An MPO (a camera JPEG with extra frames such as a preview) is its first frame, the photo itself.
    if getattr(image, "is_animated", False) and image.format != "MPO":
        raise ValueError(
            f"animated or multi-frame images are not supported (a {image.format or 'multi-frame'} file with more "
            "than one frame); send a single image, e.g. one frame as PNG or JPEG"
        )
    return image


def _decode_image(inputs: Any, limit: int | None = None) -> Image.Image:
    """A decoded PIL image from a PIL image, bytes, a base64 string or a data URL (also under a dict's "image" key),
    refused with a one-line ValueError when it is not a readable, single-frame image of at most `limit` pixels."""
    limit = pixel_limit(limit)
    if isinstance(inputs, dict) and "image" in inputs:
        inputs = inputs["image"]
    if isinstance(inputs, str):
        text = inputs.strip()
        if text.startswith("data:"):
            header, _, text = text.partition(",")
            if ";base64" not in header:
                raise ValueError("a data URL input must be base64-encoded (data:image/...;base64,...)")
        try:
            inputs = base64.b64decode(text + "=" * (-len(text) % 4), validate=False)
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"inputs is a string but not base64 image data: {_first_line(error)}") from error
    if isinstance(inputs, (bytes, bytearray, memoryview)):
        data = bytes(inputs)
        if not data:
            raise ValueError("inputs is empty: no image data")
        if _empty_png(data):
            raise ValueError("the image is empty (a PNG of 0 pixels)")
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:  # larger than Pillow's guard (a limit raised above it)
            raise ValueError(f"the image is too large to decode safely: {_first_line(error)}") from error
        except Exception as error:  # Pillow raises several types for data it cannot identify
            raise ValueError(
                f"inputs could not be read as an image ({len(data):,} bytes that are not a known image format)"
            ) from error
    elif isinstance(inputs, Image.Image):
        image = inputs
    else:
        raise ValueError(
            f"inputs must be an image: a PIL image, bytes, a base64 string or a data URL; got {type(inputs).__name__}"
        )
    _check_image(image, limit)
    try:
        image.load()
    except Exception as error:  # a truncated or corrupt file fails here, where its pixels are decoded
        raise ValueError(f"the image could not be decoded (truncated or corrupt?): {_first_line(error)}") from error
    return image


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def score_kind(model: torch.nn.Module) -> str:
    """How a pixel's class score is read from the model's logits: Mask2Former's semantic maps are already sums of
    class probabilities times mask probabilities (non-negative), so they are normalised over the classes; the other
    models' logits go through a softmax."""
    return "normalised" if getattr(model.config, "num_queries", None) is not None else "softmax"


class EndpointHandler:
    def __init__(self, path: str = "", max_image_pixels: int | None = None):
        self.processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
        self.model = AutoModelForSemanticSegmentation.from_pretrained(path, trust_remote_code=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.id2label = {int(index): label for index, label in self.model.config.id2label.items()}
        self.max_image_pixels = pixel_limit(max_image_pixels)

    @torch.inference_mode()
    def predict(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """The label map (H, W) at the image's size and each class's mean probability over its pixels (K,)."""
        image = image.convert("RGB")
        pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.device)
        logits = self.model(pixel_values=pixel_values).logits[0].float()  # (K, h, w)
        # Resized to the image before the argmax, as the processor's post_process_semantic_segmentation does, a band
        # of rows at a time: never the (K, H, W) logits or probabilities of the whole image.
        return self.processor.post_process_label_map_and_scores(
            logits, (image.height, image.width), scores=score_kind(self.model)
        )

    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('the request must be a JSON object with "inputs" (and optional "parameters")')
        parameters = data.get("parameters") or {}
        unknown = set(parameters) - {"return_label_map"} - TASK_PARAMETERS
        if unknown:
            raise ValueError(f"unknown parameters {sorted(unknown)}; this handler takes return_label_map")
        if parameters.get("subtask") not in (None, "semantic"):
            raise ValueError(f"this model does semantic segmentation only; got subtask {parameters['subtask']!r}")
        label_map, scores = self.predict(_decode_image(data["inputs"], self.max_image_pixels))
        label_map = label_map.cpu()
        segments = []
        present = torch.bincount(label_map.flatten(), minlength=len(scores)).nonzero().flatten()
        for class_id in present.tolist():  # ascending ids
            inside = label_map == class_id  # (H, W)
            mask = Image.fromarray(inside.to(torch.uint8).mul_(255).numpy())  # uint8 (H, W): mode "L"
            segments.append(
                {
                    "label": self.id2label.get(class_id, str(class_id)),
                    "score": round(scores[class_id].item(), 4),
                    "mask": _png_base64(mask),
                }
            )
        if not parameters.get("return_label_map"):
            return segments
        ids = label_map.numpy()
        label_image = Image.fromarray(ids.astype("uint8" if len(self.id2label) <= 256 else "uint16"))  # L / I;16
        return {"segments": segments, "label_map": _png_base64(label_image)}
