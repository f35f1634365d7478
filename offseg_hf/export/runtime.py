"""What every exported-graph segmenter shares: the image processor's pre-processing, the label map at the image size,
the pipeline's output format and the class names. A runtime (OpenVINO, ExecuTorch) only supplies `_run`: prepared
pixel values (batch, 3, height, width) float32 in, logits (batch, num_labels, h, w) out.

The label map is the argmax of the logits resized bilinearly to the image
(`offseg_hf.models.resize_bands.resize_argmax`, in row bands), which is what `OffSegImageProcessor`'s
`post_process_semantic_segmentation` and so `pipeline("image-segmentation")` compute: the same logits give the same
label map as the pipeline.

A graph with a fixed input size (an ExecuTorch program is exported for one size) sets `input_size`; the images are
then resized to that size by the image processor, as it resizes every image to its own `size` (512x512 by default),
and `logits` refuses pixel values of another size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..models.resize_bands import resize_argmax

# Class names by id, where a caller gives them.
Labels = dict[int, str] | None


def load_image_processor(image_processor=None, beside: Path | None = None):
    """An image processor: the one given, one loaded from a folder, the one saved beside an exported file
    (`beside`'s `preprocessor_config.json`), else the default `OffSegImageProcessor`."""
    from ..models.image_processing_offseg import OffSegImageProcessor

    if image_processor is None and beside is not None and (beside / "preprocessor_config.json").is_file():
        image_processor = beside
    if image_processor is None:
        return OffSegImageProcessor()
    if isinstance(image_processor, (str, Path)):
        return OffSegImageProcessor.from_pretrained(str(image_processor))
    return image_processor


def id2label_from_config(folder: Path) -> dict[int, str] | None:
    """The class names of a model folder's `config.json`, if it has one."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    id2label = json.loads(config.read_text()).get("id2label")
    return {int(k): v for k, v in id2label.items()} if id2label else None


def as_pil_image(image):
    """A PIL image from a PIL image, a numpy array (H, W[, C]) or a path / URL."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        from transformers.image_utils import load_image

        return load_image(str(image))
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    return image


def checked_pixel_values(pixel_values, num_channels: int = 3) -> np.ndarray:
    """Contiguous float32 (batch, channels, height, width), or a ValueError that says what the input was."""
    if isinstance(pixel_values, torch.Tensor):
        pixel_values = pixel_values.detach().cpu().numpy()
    pixel_values = np.asarray(pixel_values)
    if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values must have shape (batch, {num_channels}, height, width); got {tuple(pixel_values.shape)}. "
            "Convert grayscale or RGBA images to RGB first (the image processor does this)."
        )
    return np.ascontiguousarray(pixel_values, dtype=np.float32)


class RuntimeSegmenter:
    """Semantic segmentation with an exported graph, pre- and post-processed as `pipeline("image-segmentation")`
    does it. Subclasses set `path`, `runtime_name` and, where the graph fixes them, `input_size` / `minimum_size`,
    and implement `_run`.

        label_map = segmenter.segment(image)  # (H, W) int64 at the image size
        segments = segmenter.pipeline_output(image)  # [{"label", "score": None, "mask": PIL "L"}], as the pipeline
    """

    runtime_name = "runtime"
    # (height, width) of a graph exported for one input size; None when height and width are dynamic.
    input_size: tuple[int, int] | None = None
    # The smallest height and width a dynamic graph holds for (Mask2Former's Swin); 0 for any.
    minimum_size: int = 0

    def __init__(self, path: Path, image_processor=None, id2label: dict[int, str] | None = None):
        self.path = path
        self.image_processor = load_image_processor(image_processor, beside=path.parent)
        self.id2label = id2label or self._stored_id2label() or id2label_from_config(path.parent)

    def _stored_id2label(self) -> dict[int, str] | None:
        """The class names the exported file carries, if any (each runtime stores them its own way)."""
        return None

    def _run(self, pixel_values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def preprocess(self, images) -> np.ndarray:
        """Images (PIL, numpy, or a list of them) -> float32 pixel values, as the pipeline prepares them (at the
        graph's input size where it has one)."""
        options = {}
        if self.input_size is not None:
            options["size"] = {"height": self.input_size[0], "width": self.input_size[1]}
        prepared = self.image_processor(images=images, return_tensors="np", **options)["pixel_values"]
        return prepared.astype(np.float32, copy=False)

    def logits(self, pixel_values) -> np.ndarray:
        """The model's logits (batch, num_labels, h, w) for prepared pixel values (batch, 3, height, width)."""
        pixel_values = checked_pixel_values(pixel_values)
        size = tuple(pixel_values.shape[-2:])
        if self.input_size is not None and size != tuple(self.input_size):
            height, width = self.input_size
            raise ValueError(
                f"This {self.runtime_name} graph was exported for {height}x{width} inputs; got {size[0]}x{size[1]} "
                "(segment() and preprocess() resize images to it)."
            )
        if min(size) < self.minimum_size:
            raise ValueError(
                f"This {self.runtime_name} graph holds for inputs of at least {self.minimum_size}x{self.minimum_size} "
                f"pixels; got {size[0]}x{size[1]} (resize the image up, as the image processor does)."
            )
        return self._run(pixel_values)

    def segment(self, image) -> np.ndarray:
        """The label map (height, width) int64 of one image at its own size."""
        image = as_pil_image(image)
        logits = torch.from_numpy(self.logits(self.preprocess([image]))[0])
        budget = getattr(self.image_processor, "resize_budget_mb", None)
        return resize_argmax(logits, (image.height, image.width), budget_mb=budget).label_map.numpy()

    def pipeline_output(self, image) -> list[dict]:
        """What `pipeline("image-segmentation")` returns for a semantic model: per label present (ascending),
        {"score": None, "label": name, "mask": PIL image "L" (255 where the label is)}."""
        from PIL import Image

        label_map = self.segment(image)
        segments = []
        for label in np.flatnonzero(np.bincount(label_map.ravel())):  # the labels present, ascending
            mask = Image.fromarray((label_map == label).view(np.uint8) * np.uint8(255), mode="L")
            name = self.id2label[int(label)] if self.id2label else str(int(label))
            segments.append({"score": None, "label": name, "mask": mask})
        return segments

    def __call__(self, image, return_masks: bool = False):
        return self.pipeline_output(image) if return_masks else self.segment(image)


def existing_file(path: str | Path, default_name: str, suffixes: tuple[str, ...], what: str) -> Path:
    """`path`, or `default_name` inside it when it is a folder, checked to exist with one of `suffixes`."""
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected {what} there.")
    if path.suffix not in suffixes:
        raise ValueError(f"{path} does not look like {what}: expected a file ending in {' or '.join(suffixes)}.")
    return path


__all__ = [
    "RuntimeSegmenter",
    "as_pil_image",
    "checked_pixel_values",
    "existing_file",
    "id2label_from_config",
    "load_image_processor",
]
