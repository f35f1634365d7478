#!/usr/bin/env python
"""A Gradio demo of an OffSeg model: upload (or pick) an image, see the segmentation as a colour overlay with a
legend, the share of the image each class covers and, for offset-learning models, where a class's embedding
looks (the class attention of the coupled attention).

    pip install -e ".[demo]"          # or: pip install gradio transformers torch timm scipy
    python examples/app.py --model_name_or_path outputs/demo-segformer-b0-offset
    python examples/app.py --model_name_or_path org/offseg-t --allow_download   # a Hub repo (network)

Models load without network by default (local folders, or Hub repos already in the cache); `--allow_download`
lets the model box fetch Hub repos. Uploads are read from their header before any pixel is decoded: more than
`--max_image_pixels` pixels (default: app_config.json's "max_image_pixels", else $OFFSEG_MAX_IMAGE_PIXELS, else
4096 x 4096 = 16,777,216), an empty image, an animated or multi-frame file (an MPO photo counts as its first frame)
or a file that is not a readable image gets a one-line error on the page. Results go back to the image size in row
bands (the image processor's post-processing), so memory does not grow with the number of classes.

offseg-hf is optional: without it a model folder or Hub repo loads through its own code (`trust_remote_code=True`),
as on a Hugging Face Space (`examples/push_to_hub.py --space_dir` writes one, with this file as app.py and an
app_config.json giving the models and allowing downloads).
"""

from __future__ import annotations

import argparse
import colorsys
import html
import inspect
import json
import os
import struct
import tempfile
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network unless a model download is allowed

import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.nn import functional as F
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

try:  # registers OffSeg with the Auto classes; without it, models load through their own (remote) code
    import offseg_hf  # noqa: F401
    from offseg_hf.models.local_paths import missing_folder_message

    HAVE_OFFSEG = True
except ImportError:
    HAVE_OFFSEG = False

    def missing_folder_message(name: str, what: str = "model") -> None:
        """Without the package (a Space) the models are Hub repos; a load failure still gives one line."""
        return None


HERE = Path(__file__).resolve().parent
CONFIG_FILE = "app_config.json"  # next to app.py on a Space: {"models": [...], "allow_download": true}
EXAMPLES_DIR = "example_images"  # next to app.py on a Space; generated from offseg_hf.data.demo otherwise
DEFAULT_MODEL = "outputs/demo-segformer-b0-offset"  # what `accelerate launch examples/train.py` writes
OVERLAY_ALPHA = 0.55
MAX_PIXELS_ENV = "OFFSEG_MAX_IMAGE_PIXELS"  # the Inference Endpoints handler reads the same variable
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model_name_or_path",
        nargs="+",
        default=None,
        help=f"Model folder(s) or Hub repo id(s) for the model box; the first is the default (default: "
        f"{CONFIG_FILE}'s models, else {DEFAULT_MODEL}).",
    )
    parser.add_argument(
        "--port", type=int, default=None, help="Port to serve on (default: $GRADIO_SERVER_PORT, else 7860)."
    )
    parser.add_argument(
        "--server_name",
        default=None,
        help="Address to bind (default: $GRADIO_SERVER_NAME, which a Space sets to 0.0.0.0, else 127.0.0.1).",
    )
    parser.add_argument("--share", action="store_true", help="Also open a public gradio.live link (off by default).")
    parser.add_argument(
        "--allow_download",
        action="store_true",
        default=None,
        help=f"Let the model box download Hub repos (default: off, unless {CONFIG_FILE} says so).",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument(
        "--max_image_pixels",
        type=int,
        default=None,
        help=f"Largest upload, in pixels (default: {CONFIG_FILE}'s max_image_pixels, else ${MAX_PIXELS_ENV}, else "
        f"{DEFAULT_MAX_IMAGE_PIXELS:,} = 4096x4096).",
    )
    return parser


def read_app_config() -> dict:
    path = HERE / CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------------------------
# Model and prediction


def takes_class_attention(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `output_class_attention` (OffSeg models; it returns None where the model
    has no offset classifier). Older model code and Mask2Former do not."""
    return "output_class_attention" in inspect.signature(model.forward).parameters


class Segmenter:
    """One loaded model with its image processor; `predict` gives the label map at the image size."""

    def __init__(self, name_or_path: str, allow_download: bool = False, device: str | None = None):
        options = {"trust_remote_code": not HAVE_OFFSEG, "local_files_only": not allow_download}
        self.name = name_or_path
        self.processor = AutoImageProcessor.from_pretrained(name_or_path, **options)
        self.model = AutoModelForSemanticSegmentation.from_pretrained(name_or_path, **options)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.id2label = {int(index): label for index, label in self.model.config.id2label.items()}
        self.can_return_attention = takes_class_attention(self.model)

    @torch.inference_mode()
    def predict(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
        """(H, W) class ids at the image's size, and the class attention (K, h, w) or None."""
        pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.device)
        extra = {"output_class_attention": True} if self.can_return_attention else {}
        outputs = self.model(pixel_values=pixel_values, **extra)
        # The pipeline's post-processing: logits resized to the image before the argmax (an OffSeg processor does it
        # in row bands, without the (K, H, W) resized logits).
        (label_map,) = self.processor.post_process_semantic_segmentation(
            SimpleNamespace(logits=outputs.logits.float()), target_sizes=[(image.height, image.width)]
        )
        label_map = label_map.cpu().numpy()
        attention = getattr(outputs, "class_attention", None)
        return label_map, None if attention is None else attention[0].float().cpu().numpy()


def first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0]


def max_image_pixels(value: int | None = None, config: dict | None = None) -> int:
    """The upload limit: `value`, else app_config.json's, else $OFFSEG_MAX_IMAGE_PIXELS, else 4096 x 4096."""
    if value is None:
        value = (config or {}).get("max_image_pixels")
    if value is None:
        text = os.environ.get(MAX_PIXELS_ENV, "").strip()
        value = int(text.replace("_", "")) if text else DEFAULT_MAX_IMAGE_PIXELS
    if int(value) < 1:
        raise ValueError(f"the pixel limit must be a positive number of pixels; got {value}")
    return int(value)


def empty_png(path: str | Path) -> bool:
    """Whether the file is a PNG whose header gives it no pixels (Pillow refuses those without saying why)."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return False
    return 0 in struct.unpack(">II", head[16:24])


def open_upload(source: str | Path | Image.Image | None, limit: int) -> Image.Image:
    """The uploaded image in RGB, upright as its EXIF says; refused with a one-line gr.Error, from the header before
    its pixels are decoded, when it is too large, empty, animated or not a readable image."""
    if source is None:
        raise gr.Error("Upload an image or pick an example first.")
    if not isinstance(source, Image.Image) and empty_png(source):
        raise gr.Error("The image is empty (a PNG of 0 pixels).")
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
    except Image.DecompressionBombError as error:  # beyond Pillow's own guard
        raise gr.Error(f"The image is too large to decode safely: {first_line(error)}") from error
    except Exception as error:  # Pillow raises several types for data it cannot identify
        raise gr.Error("The file is not an image this app can read (try PNG, JPEG or WebP).") from error
    width, height = image.size
    if width == 0 or height == 0:
        raise gr.Error(f"The image is empty ({width}x{height} pixels).")
    if width * height > limit:
        raise gr.Error(
            f"The image has {width}x{height} = {width * height:,} pixels, more than this app's limit of {limit:,}; "
            "upload a smaller image."
        )
    # An MPO (a camera JPEG with extra frames such as a preview) is its first frame, the photo itself.
    if getattr(image, "is_animated", False) and image.format != "MPO":
        raise gr.Error("Animated or multi-frame images are not supported: upload a single frame (PNG or JPEG).")
    try:
        return ImageOps.exif_transpose(image).convert("RGB")
    except Exception as error:  # a truncated or corrupt file fails here, where its pixels are decoded
        raise gr.Error(f"The image could not be decoded (truncated or corrupt?): {first_line(error)}") from error


class ModelCache:
    """Models loaded so far, by name, so switching back and forth does not reload."""

    def __init__(self, allow_download: bool, device: str | None):
        self.allow_download, self.device, self.models = allow_download, device, {}

    def get(self, name_or_path: str) -> Segmenter:
        name_or_path = (name_or_path or "").strip()
        if not name_or_path:
            raise gr.Error("Choose a model: a local folder or a Hub repo id.")
        if name_or_path not in self.models:
            try:
                self.models[name_or_path] = Segmenter(name_or_path, self.allow_download, self.device)
            except Exception as error:  # a missing folder, an unknown repo, no network: say which and why
                hint = "" if self.allow_download else " (downloads are off: start the app with --allow_download)"
                reason = missing_folder_message(name_or_path) or first_line(error)
                raise gr.Error(f"Could not load {name_or_path!r}{hint}: {reason}") from error
        return self.models[name_or_path]


# ---------------------------------------------------------------------------------------------------------------
# Pictures


def palette(num_labels: int) -> np.ndarray:
    """(K, 3) uint8 colours, distinct neighbours: hues by the golden ratio, alternating lightness."""
    colours = [
        colorsys.hsv_to_rgb(
            (index * 0.618033988749895) % 1.0, 0.65 + 0.25 * (index % 2), 0.95 - 0.25 * (index % 3 == 2)
        )
        for index in range(num_labels)
    ]
    return (np.array(colours) * 255).round().astype(np.uint8).reshape(num_labels, 3)


def overlay(image: Image.Image, label_map: np.ndarray, colours: np.ndarray, alpha: float = OVERLAY_ALPHA):
    """The image with each pixel tinted by its class colour, at the image's size (blended by Pillow in uint8: no
    float copies of a large photo)."""
    return Image.blend(image.convert("RGB"), Image.fromarray(colours[label_map]), alpha)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB floats on a black-red-yellow-white ramp."""
    values = values[..., None]
    stops = np.array([[0, 0, 0], [180, 20, 20], [250, 200, 30], [255, 255, 255]], dtype=np.float32)
    position = values * (len(stops) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(stops) - 2)
    fraction = position - low
    return stops[low[..., 0]] * (1 - fraction) + stops[low[..., 0] + 1] * fraction


# The ramp in 256 steps: a large photo's heat map is a table lookup in uint8, not float arrays of it.
HEAT_TABLE = heat_colours(np.linspace(0, 1, 256, dtype=np.float32)).round().astype(np.uint8)  # (256, 3)


def attention_picture(image: Image.Image, attention: np.ndarray) -> Image.Image:
    """One class's attention (h, w), softmax over positions, scaled to its maximum and laid over the image."""
    scaled = torch.from_numpy(attention / max(float(attention.max()), 1e-12)).float()[None, None]
    resized = F.interpolate(scaled, size=(image.height, image.width), mode="bilinear", align_corners=False)[0, 0]
    levels = resized.clamp_(0, 1).mul_(255).round_().to(torch.uint8).numpy()  # (H, W)
    return Image.blend(image.convert("RGB"), Image.fromarray(HEAT_TABLE[levels]), 0.65)


def legend_html(class_ids: list[int], id2label: dict[int, str], colours: np.ndarray) -> str:
    items = "".join(
        f'<li class="legend-item" data-label="{html.escape(id2label[i])}" style="display:flex;align-items:center;'
        f'gap:0.4em;margin:0.15em 0.8em 0.15em 0">'
        f'<span class="swatch" style="display:inline-block;width:1em;height:1em;border-radius:2px;'
        f'background:rgb({",".join(str(int(c)) for c in colours[i])})"></span>'
        f'<span class="legend-name">{html.escape(id2label[i])}</span></li>'
        for i in class_ids
    )
    return f'<ul class="legend" style="list-style:none;display:flex;flex-wrap:wrap;padding:0;margin:0">{items}</ul>'


def area_rows(label_map: np.ndarray, id2label: dict[int, str]) -> list[list]:
    """[class, % of the image, pixels] per present class, largest first."""
    counts = np.bincount(label_map.ravel())  # no sort of the whole map, as np.unique would
    ids = np.flatnonzero(counts)
    order = ids[np.argsort(-counts[ids], kind="stable")]
    total = label_map.size
    return [[id2label[int(i)], round(100 * counts[i] / total, 2), int(counts[i])] for i in order]


# ---------------------------------------------------------------------------------------------------------------
# Example images


def example_images() -> list[str]:
    """PNG paths for gr.Examples: the Space's example_images/, else scenes from offseg_hf's demo set."""
    folder = HERE / EXAMPLES_DIR
    if folder.is_dir():
        return sorted(str(path) for path in folder.glob("*.png"))
    if not HAVE_OFFSEG:
        return []
    return write_example_images(Path(tempfile.gettempdir()) / "offseg_demo_examples")


def write_example_images(folder: Path, count: int = 3, size: int = 256) -> list[str]:
    """Validation scenes of the synthetic demo set (the data `examples/train.py` trains on by default)."""
    from offseg_hf.data.demo import generate_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"scene_{index}.png" for index in range(count)]
    for index, path in enumerate(paths):
        if not path.exists():
            pixels, _ = generate_scene(np.random.default_rng([7, 1, index]), size, size)  # seed 7, "validation"
            Image.fromarray(pixels).save(path)
    return [str(path) for path in paths]


# ---------------------------------------------------------------------------------------------------------------
# The page


CSS = """
#legend .legend { font-size: 0.95em; }
"""


def segment_outputs(segmenter: Segmenter, image: Image.Image) -> tuple:
    """What the page shows for one image: overlay, legend, area rows, the class-attention chooser and picture (shown
    only when the model returned the class attention) and the state the chooser reads."""
    label_map, attention = segmenter.predict(image)
    colours = palette(len(segmenter.id2label))
    present = np.flatnonzero(np.bincount(label_map.ravel())).tolist()
    state = {"image": image, "attention": attention, "id2label": segmenter.id2label}
    if attention is not None:
        names = [segmenter.id2label[i] for i in present]
        choice = gr.update(choices=names, value=names[0], visible=True)
        picture = gr.update(value=attention_picture(image, attention[present[0]]), visible=True)
    else:
        choice, picture = gr.update(choices=[], value=None, visible=False), gr.update(value=None, visible=False)
    legend = legend_html(present, segmenter.id2label, colours)
    areas = area_rows(label_map, segmenter.id2label)
    return overlay(image, label_map, colours), legend, areas, choice, picture, state


def segment_upload(cache: ModelCache, limit: int, image, model_name: str) -> tuple:
    """The Segment button: an upload's path (or a PIL image) and a model name -> what the page shows, or a one-line
    gr.Error for an upload it refuses (see `open_upload`)."""
    return segment_outputs(cache.get(model_name), open_upload(image, limit))


def show_attention(class_name: str | None, state: dict | None):
    """The class-attention picture of another class of the last segmented image."""
    if not state or state.get("attention") is None or not class_name:
        return gr.update()
    label2id = {label: index for index, label in state["id2label"].items()}
    return attention_picture(state["image"], state["attention"][label2id[class_name]])


def build_demo(
    models: list[str],
    allow_download: bool = False,
    device: str | None = None,
    cache: ModelCache | None = None,
    max_pixels: int | None = None,
) -> gr.Blocks:
    cache = cache or ModelCache(allow_download, device)
    limit = max_image_pixels(max_pixels)

    def segment(image, model_name):
        return segment_upload(cache, limit, image, model_name)

    with gr.Blocks(title="OffSeg semantic segmentation") as demo:
        gr.Markdown(
            "# OffSeg: semantic segmentation with offset learning\n"
            "Upload an image or pick an example, choose a model (a local folder or a Hub repo id) and press "
            "**Segment**. The overlay tints each pixel with its class colour; the table gives each class's share "
            "of the image. For offset-learning models, pick a class to see its class attention: where the class "
            "embedding gathers the features its offset is computed from (ICCV 2025, "
            "[HVision-NKU/OffSeg](https://github.com/HVision-NKU/OffSeg))."
        )
        with gr.Row():
            with gr.Column():
                # The upload's path, undecoded (image_mode=None): open_upload checks its header first.
                image_input = gr.Image(
                    type="filepath",
                    image_mode=None,
                    label="Image",
                    sources=["upload", "clipboard"],
                    height=360,
                    elem_id="input",
                )
                model_box = gr.Dropdown(
                    choices=models,
                    value=models[0] if models else None,
                    allow_custom_value=True,
                    label="Model (local folder or Hub repo id)",
                    elem_id="model",
                )
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                examples = example_images()
                if examples:
                    gr.Examples(
                        examples=examples,
                        inputs=image_input,
                        label="Examples (synthetic demo scenes)",
                        elem_id="examples",
                    )
            with gr.Column():
                overlay_output = gr.Image(type="pil", label="Segmentation", format="png", height=360, elem_id="overlay")
                legend = gr.HTML(elem_id="legend")
                areas = gr.Dataframe(
                    headers=["class", "area (%)", "pixels"], label="Area per class", elem_id="areas", interactive=False
                )
                attention_class = gr.Dropdown(
                    label="Class attention of", visible=False, elem_id="attention-class", interactive=True
                )
                attention_output = gr.Image(
                    type="pil",
                    label="Class attention (softmax over positions)",
                    format="png",
                    height=360,
                    visible=False,
                    elem_id="attention",
                )
        state = gr.State()
        outputs = [overlay_output, legend, areas, attention_class, attention_output, state]
        button.click(segment, inputs=[image_input, model_box], outputs=outputs)
        attention_class.change(show_attention, inputs=[attention_class, state], outputs=attention_output)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = read_app_config()
    models = args.model_name_or_path or config.get("models") or [DEFAULT_MODEL]
    allow_download = args.allow_download if args.allow_download is not None else config.get("allow_download", False)
    for name in models:
        message = missing_folder_message(name, "--model_name_or_path")
        if message:
            parser.error(message)
    # The default model is loaded before the page is served, so a model that cannot load stops the app here with
    # one line instead of at a visitor's first click.
    cache = ModelCache(allow_download, args.device)
    try:
        cache.get(models[0])
    except gr.Error as error:
        parser.exit(1, f"{parser.prog}: error: {first_line(error.message)}\n")
    try:
        limit = max_image_pixels(args.max_image_pixels, config)
    except ValueError as error:
        parser.error(f"--max_image_pixels / {MAX_PIXELS_ENV}: {error}")
    demo = build_demo(models, allow_download=allow_download, device=args.device, cache=cache, max_pixels=limit)
    demo.queue().launch(server_name=args.server_name, server_port=args.port, share=args.share, css=CSS)


if __name__ == "__main__":
    main()
