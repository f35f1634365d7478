"""What a Hub model page shows: the predictions of the weights being published on photos shipped with offseg-hf.

`render_examples(folder)` loads the model and image processor from a built repo folder (the very files that are
uploaded), segments each photo of `offseg_hf/hub/example_images/` (public domain or CC0, credited in its README.md) and
writes the photo and its prediction into `folder/examples/`; `widget_examples` pairs them in the card's `widget:`
metadata (the Hub shows an example's `output.url` where no provider runs the model, which is the case for every
custom-code model) and `examples_section` is the card's gallery. Nothing here draws a picture the model did not
predict.
"""

from __future__ import annotations

import colorsys
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

EXAMPLES_DIR = "examples"  # in a repo folder: <name>.jpg (the input) and <name>_prediction.png
OVERLAY_ALPHA = 0.55  # the weight of the class colour over the photo, as in examples/app.py
LEGEND_CLASSES = 8  # classes named under a prediction (largest first); the rest are counted
LEGEND_FONT_PX = 14
LEGEND_ROW_PX = 22
LEGEND_PAD_PX = 8


@dataclass(frozen=True)
class ExamplePhoto:
    name: str  # offseg_hf/hub/example_images/<name>.jpg
    title: str  # the widget's example title and the gallery's alt text
    credit: str  # who made it and its licence (offseg_hf/hub/example_images/README.md quotes the source)


EXAMPLE_PHOTOS = (
    ExamplePhoto("astronaut", "Astronaut", "Eileen Collins by NASA (public domain)"),
    ExamplePhoto("chelsea", "Cat", "Chelsea the cat by Stefan van der Walt (CC0)"),
    ExamplePhoto("coffee", "Coffee", "coffee cup by Rachel Michetti, Pikolo Espresso Bar (CC0)"),
    ExamplePhoto("rocket", "Rocket launch", "DSCOVR launch by SpaceX (public domain)"),
)


@dataclass(frozen=True)
class RenderedExample:
    """One photo in a repo folder with the prediction rendered from that folder's weights."""

    photo: ExamplePhoto
    src: str  # the photo, relative to the repo folder
    output: str  # the prediction picture, relative to the repo folder
    classes: tuple[tuple[str, float], ...]  # (class name, share of the photo's pixels), largest first


def photo_bytes(photo: ExamplePhoto) -> bytes:
    return resources.files("offseg_hf.hub").joinpath("example_images", f"{photo.name}.jpg").read_bytes()


def palette(num_labels: int) -> np.ndarray:
    """(K, 3) uint8 class colours: the Gradio demo's (examples/app.py, which keeps its own copy because a Space runs it
    without offseg-hf), so that a class has one colour on the card and in the Space. Hues step by the golden ratio,
    so neighbouring ids differ; saturation and value alternate to separate hues that come round again."""
    index = np.arange(num_labels)
    hues = (index * 0.618033988749895) % 1.0
    saturations = 0.65 + 0.25 * (index % 2)
    values = 0.95 - 0.25 * (index % 3 == 2)
    colours = [colorsys.hsv_to_rgb(*hsv) for hsv in zip(hues, saturations, values, strict=True)]
    return (np.array(colours).reshape(num_labels, 3) * 255).round().astype(np.uint8)


def overlay(image: Image.Image, label_map: np.ndarray, colours: np.ndarray) -> Image.Image:
    """The photo with each pixel tinted by its class's colour, at the photo's size."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    tinted = (1 - OVERLAY_ALPHA) * pixels + OVERLAY_ALPHA * colours[label_map].astype(np.float32)
    return Image.fromarray(tinted.round().clip(0, 255).astype(np.uint8))


def class_shares(label_map: np.ndarray) -> list[tuple[int, float]]:
    """(class id, share of the pixels) of each class present, largest first (ties by id)."""
    ids, counts = np.unique(label_map, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return [(int(ids[i]), float(counts[i]) / label_map.size) for i in order]


def _font() -> ImageFont.ImageFont:
    try:  # Pillow >= 10.1 scales its built-in font
        return ImageFont.load_default(size=LEGEND_FONT_PX)
    except TypeError:
        return ImageFont.load_default()


def legend(width: int, shares: list[tuple[int, float]], id2label: dict[int, str], colours: np.ndarray) -> Image.Image:
    """A white strip `width` wide naming the classes of `shares` with their colour swatches, wrapped into rows: the
    widget shows the prediction picture alone, so the picture carries its own legend."""
    font, draw = _font(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items = [(colours[i], f"{id2label[i]} {100 * share:.1f}%") for i, share in shares[:LEGEND_CLASSES]]
    if len(shares) > LEGEND_CLASSES:
        rest = sum(share for _, share in shares[LEGEND_CLASSES:])
        items.append((None, f"+{len(shares) - LEGEND_CLASSES} more classes {100 * rest:.1f}%"))
    swatch = LEGEND_FONT_PX
    placed, x, row = [], LEGEND_PAD_PX, 0
    for colour, text in items:
        item_width = swatch + 4 + int(draw.textlength(text, font=font))
        if x > LEGEND_PAD_PX and x + item_width > width - LEGEND_PAD_PX:
            x, row = LEGEND_PAD_PX, row + 1
        placed.append((x, row, colour, text))
        x += item_width + 2 * LEGEND_PAD_PX
    strip = Image.new("RGB", (width, (row + 1) * LEGEND_ROW_PX + LEGEND_PAD_PX), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, row, colour, text in placed:
        top = LEGEND_PAD_PX // 2 + row * LEGEND_ROW_PX + (LEGEND_ROW_PX - swatch) // 2
        if colour is not None:
            draw.rectangle((x, top, x + swatch - 1, top + swatch - 1), fill=tuple(int(c) for c in colour))
        draw.text((x + swatch + 4, top + swatch // 2), text, fill=(30, 30, 30), font=font, anchor="lm")
    return strip


def prediction_picture(image: Image.Image, label_map: np.ndarray, id2label: dict[int, str]) -> Image.Image:
    """The overlay at the photo's size (rows 0..H-1, exactly `overlay(image, label_map, palette(K))`) above its
    legend."""
    colours = palette(len(id2label))
    tinted = overlay(image, label_map, colours)
    strip = legend(image.width, class_shares(label_map), id2label, colours)
    picture = Image.new("RGB", (image.width, image.height + strip.height), (255, 255, 255))
    picture.paste(tinted, (0, 0))
    picture.paste(strip, (0, image.height))
    return picture


def load_published(folder: str | Path):
    """(model in eval mode, image processor) from a saved folder's own config, weights and preprocessor config."""
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    return model, processor


@torch.inference_mode()
def predict_label_map(model, processor, image: Image.Image) -> np.ndarray:
    """(H, W) class ids at the image's size: the processor's input, the model's logits and the processor's
    `post_process_semantic_segmentation`, as a user of the repository gets them."""
    inputs = processor(images=image, return_tensors="pt")
    outputs = model(pixel_values=inputs["pixel_values"])
    (label_map,) = processor.post_process_semantic_segmentation(outputs, target_sizes=[(image.height, image.width)])
    return label_map.cpu().numpy()


def render_examples(folder: str | Path, photos: tuple[ExamplePhoto, ...] = EXAMPLE_PHOTOS) -> list[RenderedExample]:
    """Segment each photo with the model saved in `folder` and write folder/examples/<name>.jpg (the photo's bytes,
    the very input segmented) and <name>_prediction.png (lossless: the overlay's colours are the prediction)."""
    folder = Path(folder)
    model, processor = load_published(folder)
    id2label = {int(index): label for index, label in model.config.id2label.items()}
    (folder / EXAMPLES_DIR).mkdir(exist_ok=True)
    rendered = []
    for photo in photos:
        data = photo_bytes(photo)
        src, output = f"{EXAMPLES_DIR}/{photo.name}.jpg", f"{EXAMPLES_DIR}/{photo.name}_prediction.png"
        (folder / src).write_bytes(data)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        label_map = predict_label_map(model, processor, image)
        prediction_picture(image, label_map, id2label).save(folder / output)
        classes = tuple((id2label[index], share) for index, share in class_shares(label_map))
        rendered.append(RenderedExample(photo, src, output, classes))
    return rendered


def widget_examples(examples: list[RenderedExample]) -> list[dict]:
    """The card's `widget:` entries: each photo (`src`) with its prediction (`output.url`), both paths inside the
    repository, which the Hub resolves against the repository itself (hub-docs, models-widgets.md, "Example
    outputs")."""
    return [
        {"src": example.src, "example_title": example.photo.title, "output": {"url": example.output}}
        for example in examples
    ]


def _classes_cell(classes: tuple[tuple[str, float], ...]) -> str:
    named = [f"{name} {100 * share:.1f}%" for name, share in classes[:LEGEND_CLASSES]]
    if len(classes) > LEGEND_CLASSES:
        named.append(f"{len(classes) - LEGEND_CLASSES} more")
    return ", ".join(named).replace("|", "\\|")


def examples_section(examples: list[RenderedExample], random_weights: bool) -> str:
    """The card's gallery of the rendered examples ("" without examples)."""
    if not examples:
        return ""
    rows = "\n".join(
        f"| ![{e.photo.title}]({e.src}) | ![{e.photo.title}: prediction]({e.output}) | {_classes_cell(e.classes)} |"
        for e in examples
    )
    credits = "; ".join(e.photo.credit for e in examples)
    caveat = (
        "**These weights are random (not trained)**: the pictures show that this repository's files run end to end, "
        "not what a trained model segments.\n\n"
        if random_weights
        else ""
    )
    return (
        "## Predictions of these weights\n\n"
        f"{caveat}What the weights in this repository predict for {len(examples)} photos shipped with offseg-hf, "
        "rendered by offseg-hf's `examples/push_to_hub.py` when this repository was built: the model and image "
        "processor loaded from this repository's files, the label map from the processor's "
        "`post_process_semantic_segmentation` at the photo's size, each pixel tinted with its class's colour and the "
        "legend of the classes shown (largest first) under each picture. The widget on this page shows the same "
        f"pairs.\n\n| photo | prediction | classes (share of the photo) |\n|---|---|---|\n{rows}\n\n"
        f"Photos (public domain or CC0, from scikit-image's sample data): {credits}.\n"
    )


def widget_note(examples: list[RenderedExample]) -> str:
    """What the card says the widget shows ("" without examples)."""
    if not examples:
        return ""
    return (
        "It displays the example predictions above, rendered when this repository was built, and cannot segment "
        "other images. "
    )
