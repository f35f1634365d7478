"""The README's picture: held-out demo images, their ground truth and a trained model's predictions.

    accelerate launch examples/train.py                   # trains outputs/demo-segformer-b0-offset
    python docs/make_readme_figure.py --model_dir outputs/demo-segformer-b0-offset

The images are the first `--num_images` of the demo set's held-out split exactly as `examples/train.py` draws it
(`make_demo_splits(seed=--seed)`, 100 held-out images by default: each image depends only on the seed and its
index). The predictions come from `pipeline("image-segmentation")` on the model folder, the way a user runs it.
Writes a PNG (default docs/images/demo_predictions.png) and prints the pixel accuracy of the images shown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from transformers import pipeline  # noqa: E402

import offseg_hf  # noqa: E402, F401  (registers OffSeg with the Auto classes)
from offseg_hf.data.demo import make_demo_splits  # noqa: E402

# One colour per demo class (background, ellipse, rectangle, triangle, diamond).
PALETTE = np.array([[40, 40, 40], [230, 159, 0], [86, 180, 233], [0, 158, 115], [204, 121, 167]], dtype=np.uint8)


def label_map(segments: list[dict], label2id: dict[str, int], shape: tuple[int, int]) -> np.ndarray:
    """The pipeline's one-mask-per-label output as one (H, W) map of class ids."""
    labels = np.zeros(shape, dtype=np.int64)
    for segment in segments:
        labels[np.asarray(segment["mask"]) > 0] = label2id[segment["label"]]
    return labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="outputs/demo-segformer-b0-offset", help="A trained demo model folder.")
    parser.add_argument("--output", default="docs/images/demo_predictions.png", help="Where the PNG goes.")
    parser.add_argument("--num_images", type=int, default=6, help="Held-out images shown (the split's first N).")
    parser.add_argument("--seed", type=int, default=0, help="train.py's --seed (the demo set's).")
    parser.add_argument("--demo_image_size", type=int, default=128, help="train.py's --demo_image_size.")
    args = parser.parse_args(argv)

    splits, id2label = make_demo_splits(
        seed=args.seed, num_train=0, num_validation=args.num_images, image_size=args.demo_image_size
    )
    label2id = {name: index for index, name in id2label.items()}
    segmenter = pipeline("image-segmentation", model=args.model_dir)

    rows = {"image": [], "ground truth": [], "prediction": []}
    correct = total = 0
    for sample in splits["validation"]:
        image = sample["image"]
        truth = np.asarray(sample["annotation"], dtype=np.int64)
        predicted = label_map(segmenter(image), label2id, truth.shape)
        correct, total = correct + int((predicted == truth).sum()), total + truth.size
        rows["image"].append(np.asarray(image))
        rows["ground truth"].append(PALETTE[truth])
        rows["prediction"].append(PALETTE[predicted])

    figure, axes = plt.subplots(3, args.num_images, figsize=(1.5 * args.num_images, 4.9), squeeze=False)
    for row, (name, pictures) in enumerate(rows.items()):
        for column, picture in enumerate(pictures):
            axis = axes[row][column]
            axis.imshow(picture, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(name, fontsize=10)
    handles = [Patch(color=PALETTE[index] / 255, label=name) for index, name in sorted(id2label.items())]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    figure.tight_layout(rect=(0, 0.06, 1, 1), pad=0.3)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=80)
    print(f"{output}: {args.num_images} held-out images, pixel accuracy {100 * correct / total:.2f}%")


if __name__ == "__main__":
    main()
