"""How closely each exported runtime reproduces a trained model on its held-out images: label maps and logits.

    accelerate launch examples/train.py   # trains the demo model into outputs/demo-segformer-b0-offset
    python benchmarks/runtime_agreement.py --model_name_or_path outputs/demo-segformer-b0-offset
    python benchmarks/runtime_agreement.py --model_name_or_path outputs/demo-segformer-b0-offset \\
        --runtimes executorch,executorch-int8 --num_images 20

The model is exported to each runtime at its image processor's size (the demo model's: 512x512): ONNX Runtime
(`offseg_hf.export.onnx`), OpenVINO (`offseg_hf.export.openvino`), ExecuTorch XNNPACK fp32 and int8
(`offseg_hf.export.executorch`; int8 calibrated on the default 4 generated demo images, none of them held out). Every
held-out image of the demo set (the split `examples/train.py` holds out, same seed and size) is prepared once by the
image processor; eager PyTorch and each runtime get the same pixel values. Per runtime the table gives:

* `pixels agreeing`: the share of image pixels whose label (the argmax of the logits resized to the image, as
  `pipeline("image-segmentation")` and the runtime segmenters compute it) equals eager PyTorch's, over all images;
* `images all equal`: images whose whole label map equals eager's;
* `max abs logit diff`: the largest |runtime - eager| logit over all images, and the largest |eager| logit for scale;
* `mIoU`: against the ground truth, computed like the evaluation script's (mmseg's definition), eager included.

`executorch-int8 vs executorch` compares the int8 program with the fp32 one the same way.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import machine_line, print_table

from offseg_hf import OffSegForSemanticSegmentation
from offseg_hf.data.demo import make_demo_splits
from offseg_hf.evaluation.metrics import SegmentationMetrics
from offseg_hf.export.runtime import RuntimeSegmenter, load_image_processor
from offseg_hf.models.resize_bands import resize_argmax

RUNTIMES = ("onnxruntime", "openvino", "executorch", "executorch-int8")


def runtime_segmenter(runtime: str, model, folder: Path, workdir: Path, size: tuple[int, int], threads: int):
    """Export `model` for `runtime` and load it in that runtime's segmenter (the model folder's image processor)."""
    if runtime == "onnxruntime":
        from offseg_hf.export.onnx import OnnxSegmenter, export_onnx

        path = export_onnx(model, workdir / "model.onnx", example_size=size)
        return OnnxSegmenter(path, image_processor=folder, threads=threads)
    if runtime == "openvino":
        from offseg_hf.export.openvino import OpenVinoSegmenter, export_openvino

        path = export_openvino(model, workdir / "openvino" / "model.xml", example_size=size)
        return OpenVinoSegmenter(path, image_processor=folder, threads=threads)
    if runtime in ("executorch", "executorch-int8"):
        from offseg_hf.export.executorch import ExecuTorchSegmenter, export_executorch

        quantize = "int8" if runtime.endswith("int8") else None
        path = export_executorch(model, workdir / f"{runtime}.pte", example_size=size, quantize=quantize)
        return ExecuTorchSegmenter(path, image_processor=folder, threads=threads)
    raise ValueError(f"unknown runtime {runtime!r}; the runtimes are {', '.join(RUNTIMES)}")


class Comparison:
    """Accumulates one runtime's agreement with a reference (label maps, logits) over images."""

    def __init__(self):
        self.pixels = self.agreeing = self.images = self.equal_images = 0
        self.max_difference = 0.0

    def add(self, logits: np.ndarray, labels: np.ndarray, reference_logits: np.ndarray, reference_labels: np.ndarray):
        self.max_difference = max(self.max_difference, float(np.abs(logits - reference_logits).max()))
        same = int((labels == reference_labels).sum())
        self.pixels += labels.size
        self.agreeing += same
        self.images += 1
        self.equal_images += same == labels.size

    def row(self, name: str, miou: str, scale: float) -> list[str]:
        share = 100.0 * self.agreeing / self.pixels
        disagreeing = self.pixels - self.agreeing
        return [
            name,
            f"{share:.4f}% ({disagreeing} of {self.pixels} differ)",
            f"{self.equal_images}/{self.images}",
            f"{self.max_difference:.2e} (|logit| <= {scale:.1f})",
            miou,
        ]


def label_map(logits: np.ndarray, height: int, width: int, budget_mb) -> np.ndarray:
    return resize_argmax(torch.from_numpy(logits[0]), (height, width), budget_mb=budget_mb).label_map.numpy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="A trained model folder (the demo model's).")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="Comma-separated, of: " + ", ".join(RUNTIMES))
    parser.add_argument("--num_images", type=int, default=100, help="Held-out demo images to compare (default all).")
    parser.add_argument("--demo_image_size", type=int, default=128, help="As train.py's (default 128).")
    parser.add_argument("--seed", type=int, default=0, help="The demo set's seed, as train.py's (default 0).")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    runtimes = [name for name in args.runtimes.split(",") if name]
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        parser.error(f"unknown runtimes {', '.join(unknown)}; the runtimes are {', '.join(RUNTIMES)}")
    torch.set_num_threads(args.threads)
    print(machine_line(torch.device("cpu")), flush=True)

    folder = Path(args.model_name_or_path)
    model = OffSegForSemanticSegmentation.from_pretrained(folder).eval()
    processor = load_image_processor(folder)
    size = (processor.size["height"], processor.size["width"])
    splits, _ = make_demo_splits(
        seed=args.seed, num_train=0, num_validation=args.num_images, image_size=args.demo_image_size
    )
    held_out = splits["validation"]
    budget = getattr(processor, "resize_budget_mb", None)

    with tempfile.TemporaryDirectory() as scratch:
        segmenters: dict[str, RuntimeSegmenter] = {}
        for runtime in runtimes:
            print(f"exporting {runtime} ...", flush=True)
            workdir = Path(scratch) / runtime
            workdir.mkdir()
            segmenters[runtime] = runtime_segmenter(runtime, model, folder, workdir, size, args.threads)

        comparisons = {runtime: Comparison() for runtime in runtimes}
        int8_vs_fp32 = Comparison() if {"executorch", "executorch-int8"} <= set(runtimes) else None
        metrics = {name: SegmentationMetrics(model.config.num_labels) for name in ["eager", *runtimes]}
        scale = 0.0
        for index, example in enumerate(held_out):
            image, truth = example["image"], torch.from_numpy(np.array(example["annotation"], dtype=np.int64))
            height, width = image.height, image.width
            # What every segmenter's `preprocess` gives: the folder's processor at its size.
            pixel_values = processor(images=[image], return_tensors="np")["pixel_values"].astype(np.float32)
            with torch.inference_mode():
                eager = model(pixel_values=torch.from_numpy(pixel_values)).logits.numpy()
            eager_labels = label_map(eager, height, width, budget)
            scale = max(scale, float(np.abs(eager).max()))
            metrics["eager"].update(torch.from_numpy(eager_labels), truth)
            outputs = {}
            for runtime, segmenter in segmenters.items():
                logits = segmenter.logits(pixel_values)
                labels = label_map(logits, height, width, budget)
                outputs[runtime] = (logits, labels)
                comparisons[runtime].add(logits, labels, eager, eager_labels)
                metrics[runtime].update(torch.from_numpy(labels), truth)
            if int8_vs_fp32 is not None:
                int8_vs_fp32.add(*outputs["executorch-int8"], *outputs["executorch"])
            if (index + 1) % 20 == 0:
                print(f"  {index + 1} images", flush=True)

    def miou(name: str) -> str:
        return f"{100 * metrics[name].compute()['mean_iou']:.2f}"

    print(
        f"\n{folder}: {len(held_out)} held-out demo images ({args.demo_image_size}x{args.demo_image_size}, seed "
        f"{args.seed}), model input {size[0]}x{size[1]}, {args.threads} threads; eager PyTorch mIoU {miou('eager')}\n"
    )
    rows = [comparisons[runtime].row(f"{runtime} vs eager", miou(runtime), scale) for runtime in runtimes]
    if int8_vs_fp32 is not None:
        rows.append(int8_vs_fp32.row("executorch-int8 vs executorch", miou("executorch-int8"), scale))
    print_table(["runtime", "pixels agreeing", "images all equal", "max abs logit diff", "mIoU"], rows)


if __name__ == "__main__":
    main()
