"""The mmseg training pipeline: geometry keeps image and mask aligned, the 75% crop rule, padding, photometrics."""

import colorsys

import numpy as np
import pytest
import torch

from offseg_hf.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    hsv_to_rgb,
    largest_class_fraction,
    pad_to,
    photometric_distortion,
    random_crop,
    random_resize,
    rescale_size,
    rgb_to_hsv,
)

# Class k is drawn in a pure colour; the mask is a function of the pixel colour.
CLASS_COLORS = torch.tensor(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], dtype=torch.uint8
)  # (K, 3)


def block_scene(height: int, width: int, block: int, seed: int):
    """Random blocks of pure class colours: image (3, H, W) uint8 and labels (H, W) = class of the colour."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randint(
        0, len(CLASS_COLORS), ((height + block - 1) // block, (width + block - 1) // block), generator=generator
    )
    labels = grid.repeat_interleave(block, 0).repeat_interleave(block, 1)[:height, :width]
    image = CLASS_COLORS[labels].permute(2, 0, 1).contiguous()
    return image, labels.long()


def denormalize(pixel_values: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixel_values * std + mean).round().clamp(0, 255).to(torch.uint8)


def classes_of(image: torch.Tensor) -> torch.Tensor:
    """Class of each pixel whose colour is a pure class colour, -1 elsewhere."""
    matches = (image.permute(1, 2, 0)[:, :, None, :] == CLASS_COLORS).all(-1)  # (H, W, K)
    return torch.where(matches.any(-1), matches.float().argmax(-1), torch.full(matches.shape[:2], -1))


@pytest.mark.parametrize("size", [(50, 70), (20, 24)])  # larger than the crop, and smaller (padded)
def test_crop_flip_pad_keep_image_and_mask_aligned_pixel_exactly(size):
    # Identity resize (the scale is the image size, ratio 1), so every output pixel must carry its label exactly.
    height, width = size
    transform = TrainTransform(
        crop_size=(32, 32), scale=(max(size), min(size)), ratio_range=(1.0, 1.0), photometric=False
    )
    for seed in range(20):
        image, labels = block_scene(height, width, block=3, seed=seed)
        pixel_values, out_labels = transform(image, labels, np.random.default_rng(seed))
        assert pixel_values.shape == (3, 32, 32) and out_labels.shape == (32, 32)
        padded = out_labels == 255
        recovered = classes_of(denormalize(pixel_values))
        assert torch.equal(recovered[~padded], out_labels[~padded])
        assert int((~padded).sum()) == min(height, 32) * min(width, 32)
        # Padding: the normalised image is 0 there (mmseg pads after normalising), the labels the ignore index.
        assert torch.all(pixel_values[:, padded] == 0)


def test_random_resize_keeps_alignment():
    # Bilinear image / nearest mask can disagree only where the image blends two colours; every pixel that keeps a
    # pure class colour must carry that class, for up- and down-scaling.
    agree, total = 0, 0
    for seed in range(10):
        image, labels = block_scene(60, 80, block=8, seed=seed)
        rng = np.random.default_rng(seed)
        resized, resized_labels = random_resize(image, labels, rng, scale=(80, 60), ratio_range=(0.5, 2.0))
        assert resized.shape[-2:] == resized_labels.shape
        pure = classes_of(resized)
        known = pure >= 0
        agree += int((pure[known] == resized_labels[known]).sum())
        total += int(known.sum())
    assert total > 10_000
    assert agree / total > 0.995


def test_upscale_by_two_is_exact_on_pure_pixels():
    image, labels = block_scene(40, 40, block=4, seed=0)
    resized, resized_labels = random_resize(image, labels, np.random.default_rng(0), scale=(80, 80), ratio_range=(1, 1))
    assert resized.shape[-2:] == (80, 80)
    pure = classes_of(resized)
    assert torch.equal(pure[pure >= 0], resized_labels[pure >= 0])
    assert torch.equal(resized_labels, labels.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_rescale_size_follows_mmcv():
    # ADE20K-like 683x512 image to the (2048, 512) scale: the short edge binds.
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(256, 341, (2048, 512)) == (512, 682)
    # A very wide image: the long edge binds.
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)
    # Ratio 2.0 of the scale (4096, 1024).
    assert rescale_size(512, 683, (4096, 1024)) == (1024, 1366)


def mostly_one_class(seed: int) -> torch.Tensor:
    """80x80 labels: class 0 everywhere except a 30x30 patch of 1/2 stripes somewhere."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(80, 80, dtype=torch.long)
    top, left = torch.randint(0, 50, (2,), generator=generator).tolist()
    patch = torch.arange(30).remainder(2).add(1).expand(30, 30)
    labels[top : top + 30, left : left + 30] = patch
    return labels


def test_crop_follows_mmseg_category_ratio_rule():
    # Replay mmseg's rule with the same random draws: the crop is the first of up to 10 windows whose largest
    # class is below 75% (with 2+ classes), else one more window taken as it is.
    crop = (32, 32)
    for seed in range(30):
        labels = mostly_one_class(seed)
        image = torch.zeros(3, 80, 80, dtype=torch.uint8)
        image[0] = torch.arange(80).view(80, 1)  # row index
        image[1] = torch.arange(80).view(1, 80)  # column index
        _, cropped = random_crop(image, labels, np.random.default_rng(seed), crop, cat_max_ratio=0.75)

        rng = np.random.default_rng(seed)
        windows = [(int(rng.integers(0, 49)), int(rng.integers(0, 49))) for _ in range(11)]
        expected = windows[10]
        for top, left in windows[:10]:
            share, present = largest_class_fraction(labels[top : top + 32, left : left + 32])
            if present > 1 and share < 0.75:
                expected = (top, left)
                break
        assert torch.equal(cropped, labels[expected[0] : expected[0] + 32, expected[1] : expected[1] + 32])


def test_crop_rule_changes_the_statistics():
    def violation_rate(ratio: float) -> float:
        violations = 0
        for seed in range(200):
            labels = mostly_one_class(seed)
            _, cropped = random_crop(labels[None], labels, np.random.default_rng(seed), (32, 32), cat_max_ratio=ratio)
            share, present = largest_class_fraction(cropped)
            violations += present < 2 or share >= 0.75
        return violations / 200

    with_rule, without_rule = violation_rate(0.75), violation_rate(1.0)
    assert without_rule > 0.5  # most random windows are nearly all background
    assert with_rule < without_rule / 3


def test_crop_ratio_ignores_the_ignore_index():
    # 90% ignore, the rest split evenly between two classes: the share counts labelled pixels only (50%).
    labels = torch.full((40, 40), 255, dtype=torch.long)
    labels[:4, :20], labels[:4, 20:] = 1, 2
    share, present = largest_class_fraction(labels)
    assert present == 2 and share == pytest.approx(0.5)
    # A crop that is ignore + one class never passes; the rule keeps looking.
    labels[:4, :] = 1
    assert largest_class_fraction(labels) == (1.0, 1)


def test_ignore_index_survives_resize_crop_flip_and_pad():
    image, labels = block_scene(20, 30, block=5, seed=1)
    labels[5:10, :] = 255
    transform = TrainTransform(crop_size=(64, 64), scale=(30, 20), ratio_range=(1.0, 1.5), photometric=True)
    for seed in range(10):
        _, out = transform(image, labels, np.random.default_rng(seed))
        values = set(torch.unique(out).tolist())
        assert 255 in values and values <= {0, 1, 2, 3, 4, 255}
    pixel_values, padded = pad_to(torch.zeros(3, 2, 3), torch.ones(2, 3, dtype=torch.long), (4, 4))
    assert padded.tolist() == [[1, 1, 1, 255], [1, 1, 1, 255], [255] * 4, [255] * 4]


def test_transform_is_deterministic_for_a_generator():
    image, labels = block_scene(60, 60, block=4, seed=2)
    transform = TrainTransform(crop_size=(32, 32), scale=(120, 60))
    first = transform(image, labels, np.random.default_rng([7, 3]))
    second = transform(image, labels, np.random.default_rng([7, 3]))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_hsv_matches_colorsys_with_opencv_ranges():
    rgb = torch.randint(0, 256, (3, 7, 9)).float()
    hsv = rgb_to_hsv(rgb)
    for y, x in [(0, 0), (3, 4), (6, 8)]:
        h, s, v = colorsys.rgb_to_hsv(*(rgb[:, y, x] / 255).tolist())
        assert hsv[:, y, x].tolist() == pytest.approx([h * 180, s * 255, v * 255], abs=1e-3)
    assert torch.allclose(hsv_to_rgb(hsv), rgb, atol=1e-3)


def test_photometric_distortion_ranges():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    outputs = [photometric_distortion(image, np.random.default_rng(seed)) for seed in range(40)]
    assert all(out.dtype == torch.uint8 and out.shape == image.shape for out in outputs)
    assert sum(not torch.equal(out, image) for out in outputs) > 30  # 4 coin flips: unchanged 1 time in 16
    # Brightness alone shifts by at most 32.
    grey = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    for seed in range(40):
        out = photometric_distortion(
            grey, np.random.default_rng(seed), contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=1
        )
        assert (out.int() - 100).abs().max() <= 32


def test_hue_shift_is_in_opencv_units():
    # A hue-only distortion moves a saturated colour's hue by an integer number of 2-degree units in [-18, 18).
    red = torch.tensor([200, 40, 40], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2).contiguous()
    base = rgb_to_hsv(red.float())[0, 0, 0]
    shifts = set()
    for seed in range(60):
        out = photometric_distortion(
            red, np.random.default_rng(seed), brightness_delta=0, contrast_range=(1, 1), saturation_range=(1, 1)
        )
        hue = rgb_to_hsv(out.float())[0, 0, 0]
        shift = float((hue - base + 90) % 180 - 90)
        assert abs(shift - round(shift)) < 0.7 and -18.7 <= shift < 18.7
        shifts.add(round(shift))
    assert len(shifts) > 5


def test_eval_transform_resizes_image_only():
    image, labels = block_scene(30, 40, block=5, seed=3)
    pixel_values, out_labels = EvalTransform(scale=(120, 60))(image, labels)
    assert pixel_values.shape == (3, 60, 80)
    assert torch.equal(out_labels, labels)


def test_shortest_edge_resize_is_the_mask2former_configs_random_choice_resize():
    from offseg_hf.data.transforms import (
        TrainTransform,
        random_shortest_edge_resize,
        shortest_edge_choices,
        shortest_edge_size,
    )

    # RandomChoiceResize(scales=[int(512 * x * 0.1) for x in range(5, 21)], ResizeShortestEdge, max_size=2048).
    assert shortest_edge_choices((2048, 512), (0.5, 2.0)) == [int(512 * x * 0.1) for x in range(5, 21)]
    assert shortest_edge_size(512, 683, 1024, 2048) == (1024, 1366)  # short edge to 1024, ratio kept
    assert shortest_edge_size(683, 512, 256, 2048) == (342, 256)
    assert shortest_edge_size(300, 2000, 1024, 2048) == (307, 2048)  # the long edge capped at max_size
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    labels = torch.zeros(40, 60, dtype=torch.long)
    short_edges = set()
    for seed in range(200):
        resized, resized_labels = random_shortest_edge_resize(image, labels, np.random.default_rng(seed), (512, 128))
        assert resized.shape[-2:] == resized_labels.shape
        short_edges.add(min(resized.shape[-2:]))
    assert short_edges == set(shortest_edge_choices((512, 128), (0.5, 2.0)))  # every choice drawn, nothing else
    out, out_labels = TrainTransform(crop_size=(32, 32), scale=(512, 128), resize_mode="shortest_edge")(
        image, labels, np.random.default_rng(0)
    )
    assert out.shape == (3, 32, 32) and out_labels.shape == (32, 32)
