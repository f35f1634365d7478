"""A synthetic segmentation data set that trains offline in minutes: textured shapes on textured backgrounds.

Each scene is a background texture (a smooth two-colour gradient of low saturation with fine noise) and a few
shapes drawn over it, later shapes on top. A class is a shape *and* a look: its own hue family and its own
texture (stripes, dots, checks, waves), so a small network learns it from local appearance, and the label map
follows the exact shape outline. Everything is drawn with numpy from `np.random.default_rng([seed, split, index])`,
so a seed gives the same images on every machine, and the validation split never shares a scene with training.

The splits have the schema of `scene_parse_150` ("image": RGB, "annotation": mode "L" ids), with ids 0..K-1 for
the K classes below and no "other" class, so they need no label reduction.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# (name, hue in degrees, texture) of each foreground class; class 0 is the background.
DEMO_SHAPES: tuple[tuple[str, float, str], ...] = (
    ("ellipse", 10.0, "dots"),
    ("rectangle", 100.0, "stripes"),
    ("triangle", 200.0, "checks"),
    ("diamond", 290.0, "waves"),
)
DEMO_CLASSES: tuple[str, ...] = ("background",) + tuple(name for name, _, _ in DEMO_SHAPES)

_SPLIT_IDS = {"train": 0, "validation": 1}


def demo_id2label() -> dict[int, str]:
    return dict(enumerate(DEMO_CLASSES))


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; hue in degrees, saturation and value in [0, 1]. Returns (..., 3) floats in [0, 1]."""
    hue = np.mod(hue, 360.0) / 60.0
    chroma = value * saturation
    second = chroma * (1 - np.abs(np.mod(hue, 2.0) - 1))
    sector = np.floor(hue).astype(np.int64) % 6
    zeros = np.zeros_like(chroma)
    # (R, G, B) before adding the minimum, per hue sector
    table = [
        (chroma, second, zeros),
        (second, chroma, zeros),
        (zeros, chroma, second),
        (zeros, second, chroma),
        (second, zeros, chroma),
        (chroma, zeros, second),
    ]
    rgb = np.zeros(hue.shape + (3,))
    for index, channels in enumerate(table):
        selected = sector == index
        for channel in range(3):
            rgb[..., channel] = np.where(selected, channels[channel], rgb[..., channel])
    return rgb + (value - chroma)[..., None]


def _texture(kind: str, ys: np.ndarray, xs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A pattern in [0, 1] over the pixel grid with a random period, phase and orientation."""
    period = rng.uniform(5.0, 9.0)
    angle = rng.uniform(0, np.pi)
    u = xs * np.cos(angle) + ys * np.sin(angle)
    v = -xs * np.sin(angle) + ys * np.cos(angle)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        return (np.sin(2 * np.pi * u / period + phase) > 0).astype(np.float64)
    if kind == "checks":
        return ((np.floor(u / period * 2) + np.floor(v / period * 2)) % 2).astype(np.float64)
    if kind == "dots":
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        return (du**2 + dv**2 < (period / 3.2) ** 2).astype(np.float64)
    if kind == "grain":
        # A sum of three long random sinusoids: blotches, unlike any class texture.
        grain = sum(
            np.sin(2 * np.pi * (xs * np.cos(a) + ys * np.sin(a)) / p + q)
            for a, p, q in zip(
                rng.uniform(0, np.pi, 3), rng.uniform(10, 30, 3), rng.uniform(0, 2 * np.pi, 3), strict=True
            )
        )
        return 0.5 + grain / 6
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (u + 2.0 * np.sin(2 * np.pi * v / (3 * period))) / period + phase)
    raise ValueError(f"unknown texture {kind!r}")


def _shape_mask(shape: str, ys: np.ndarray, xs: np.ndarray, height: int, width: int, rng: np.random.Generator):
    size = min(height, width)
    cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
    ry, rx = rng.uniform(0.12, 0.28, size=2) * size
    angle = rng.uniform(0, np.pi)
    dy, dx = ys - cy, xs - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if shape == "ellipse":
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1
    if shape == "rectangle":
        return (np.abs(u) <= rx) & (np.abs(v) <= ry)
    if shape == "diamond":
        return np.abs(u) / rx + np.abs(v) / ry <= 1
    if shape == "triangle":
        # Apex up in the rotated frame: |u| shrinks linearly from the base (v = ry) to the apex (v = -ry).
        return (v <= ry) & (v >= -ry) & (np.abs(u) <= rx * (v + ry) / (2 * ry))
    raise ValueError(f"unknown shape {shape!r}")


def generate_scene(rng: np.random.Generator, height: int = 128, width: int = 128, max_shapes: int = 4):
    """One scene: (RGB uint8 array (H, W, 3), label ids uint8 (H, W))."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    # Background: a low-saturation gradient between two random hues, with fine noise.
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (xs * np.cos(direction) + ys * np.sin(direction)) / max(height, width)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    hue_a, hue_b = rng.uniform(0, 360, size=2)
    hue = hue_a + (hue_b - hue_a) * ramp
    saturation = np.full_like(ramp, rng.uniform(0.0, 0.25))
    value = rng.uniform(0.35, 0.8) + 0.12 * _texture("grain", ys, xs, rng) - 0.06
    labels = np.zeros((height, width), dtype=np.uint8)

    num_shapes = int(rng.integers(1, max_shapes + 1))
    for _ in range(num_shapes):
        class_id = int(rng.integers(1, len(DEMO_CLASSES)))
        shape, class_hue, texture_kind = DEMO_SHAPES[class_id - 1]
        inside = _shape_mask(shape, ys, xs, height, width, rng)
        pattern = _texture(texture_kind, ys, xs, rng)
        shape_hue = class_hue + rng.uniform(-20, 20)
        shape_saturation = rng.uniform(0.55, 0.95)
        shape_value = rng.uniform(0.45, 0.75) + 0.25 * pattern
        hue = np.where(inside, shape_hue, hue)
        saturation = np.where(inside, shape_saturation * (0.75 + 0.25 * pattern), saturation)
        value = np.where(inside, shape_value, value)
        labels[inside] = class_id

    rgb = _hsv_to_rgb(hue, np.clip(saturation, 0, 1), np.clip(value, 0, 1))
    rgb = rgb + rng.normal(0, 0.02, size=rgb.shape)  # sensor noise
    image = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
    return image, labels


def make_demo_splits(
    seed: int = 0,
    num_train: int = 400,
    num_validation: int = 100,
    image_size: int | tuple[int, int] = 128,
    max_shapes: int = 4,
):
    """The demo set as a `datasets.DatasetDict` ("train", "validation") and its id2label.

    `image_size` is an int (square) or (height, width). Deterministic from `seed`.
    """
    import datasets

    def png(array: np.ndarray) -> dict:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        return {"bytes": buffer.getvalue(), "path": None}

    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    features = datasets.Features({"image": datasets.Image(mode="RGB"), "annotation": datasets.Image()})
    splits = {}
    for split, count in (("train", num_train), ("validation", num_validation)):
        images, annotations = [], []
        for index in range(count):
            rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
            image, labels = generate_scene(rng, height, width, max_shapes=max_shapes)
            images.append(png(image))
            annotations.append(png(labels))
        splits[split] = datasets.Dataset.from_dict({"image": images, "annotation": annotations}, features=features)
    return datasets.DatasetDict(splits), demo_id2label()


__all__ = ["DEMO_CLASSES", "DEMO_SHAPES", "demo_id2label", "generate_scene", "make_demo_splits"]
