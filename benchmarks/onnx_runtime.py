"""ONNX export and ONNX Runtime latency of every preset against eager PyTorch and transformers' SegFormer-B0.

    python benchmarks/onnx_runtime.py                                  # every preset, 512x512, batch 1, 150 labels
    python benchmarks/onnx_runtime.py --variants offseg-t,segformer-b0-offset --threads 2
    python benchmarks/onnx_runtime.py --variants segformer-b0-offset --check_sizes   # + ORT-vs-PyTorch at 3 sizes
    python benchmarks/onnx_runtime.py --demo_miou /tmp/demo_b0_pp      # int8 mIoU change on the demo set

Per preset (random weights, eval mode): the export time (`offseg_hf.export.onnx.export_onnx`, dynamic
batch/height/width),
then the median forward latency over `--repeats` rounds of eager PyTorch, ORT fp32 and ORT int8 (`--int8`: dynamic
= `quantize_dynamic`, static = QDQ `quantize_static` calibrated on 4 demo images; both by default), with
`hf-segformer-b0` (transformers' SegformerForSemanticSegmentation, MiT-B0, decoder 256) eager as the reference row.
Within a preset the runtimes take turns in every round (with the reference), so machine-load drift hits them alike.
ORT runs on the CPU with as many intra-op threads as torch uses (`--threads`, default torch's).

`--check_sizes` adds the largest |ORT fp32 - PyTorch| logit difference at 512x512, 480x640 and 333x517, and the
share of pixels whose int8 argmax equals fp32's at 512x512. `--demo_miou DIR` evaluates a trained model folder
(e.g. `examples/train.py --output_dir DIR`) on the demo set's held-out split with ORT fp32 and int8 (`OnnxSegmenter`,
whole image, the folder's processor) and prints both mIoUs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import HF_SEGFORMER_B0, add_input_arguments, hf_segformer_b0, machine_line, measure, median, print_table

from offseg_hf import presets
from offseg_hf.export.onnx import (
    DEFAULT_OPSET,
    DEFAULT_VERIFY_SIZES,
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxSegmenter,
    calibration_batches,
    compare_with_pytorch,
    export_onnx,
    inference_session,
    quantize_int8,
)


class OrtRunner:
    """A session called like a model on a torch tensor (the latency helpers time `model(pixel_values)`)."""

    def __init__(self, session):
        self.session = session

    def __call__(self, pixel_values: torch.Tensor) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: pixel_values.numpy()})[0]


def eager(model: torch.nn.Module):
    return lambda pixel_values: model(pixel_values=pixel_values).logits


def benchmark_variant(variant: str, args, workdir: Path, pixel_values: torch.Tensor, reference) -> dict:
    torch.manual_seed(0)
    model = presets.model_for_variant(variant, num_labels=args.num_labels).eval()
    path = workdir / f"{variant}.onnx"
    start = time.perf_counter()
    export_onnx(model, path, opset=args.opset, dynamic=True, example_size=(args.height, args.width))
    result = {"export_s": time.perf_counter() - start}
    runners = {
        "eager": eager(model),
        HF_SEGFORMER_B0: reference,
        "ort fp32": OrtRunner(inference_session(path, args.threads)),
    }
    for mode in args.int8:
        calibration = calibration_batches(count=4) if mode == "static" else None
        if calibration is not None:
            calibration = [
                torch.nn.functional.interpolate(
                    torch.from_numpy(c), size=(args.height, args.width), mode="bilinear"
                ).numpy()
                for c in calibration
            ]
        quantized = quantize_int8(path, workdir / f"{variant}.{mode}.int8.onnx", mode=mode, calibration=calibration)
        runners[f"ort int8 {mode}"] = OrtRunner(inference_session(quantized, args.threads))
    times = measure(runners, pixel_values, args.warmup, args.repeats)
    result.update({name: median(values) for name, values in times.items()})
    if args.check_sizes:
        result["diffs"] = compare_with_pytorch(model, path, DEFAULT_VERIFY_SIZES)
        with torch.no_grad():
            fp32 = runners["ort fp32"](pixel_values).argmax(1)
            for mode in args.int8:
                result[f"agree {mode}"] = float((runners[f"ort int8 {mode}"](pixel_values).argmax(1) == fp32).mean())
    return result


def demo_miou(folder: str, workdir: Path, args) -> None:
    """mIoU of ORT fp32 and int8 on the demo set's held-out split, whole images through OnnxSegmenter."""
    from transformers import AutoModelForSemanticSegmentation

    from offseg_hf.data.demo import make_demo_splits
    from offseg_hf.evaluation.metrics import SegmentationMetrics

    model = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    path = export_onnx(model, workdir / "demo.onnx", opset=args.opset)
    splits, _ = make_demo_splits(seed=0, num_train=0)
    validation = splits["validation"]
    files = {"fp32": path}
    for mode in args.int8:
        calibration = calibration_batches(folder, count=8) if mode == "static" else None
        files[f"int8 {mode}"] = quantize_int8(path, workdir / f"demo.{mode}.int8.onnx", mode, calibration)
    segmenters = {
        name: OnnxSegmenter(file, image_processor=folder, threads=args.threads) for name, file in files.items()
    }
    metrics = {name: SegmentationMetrics(model.config.num_labels) for name in segmenters}
    maps = {name: [] for name in segmenters}
    for sample in validation:
        labels = torch.from_numpy(np.asarray(sample["annotation"], dtype=np.int64))
        for name, segmenter in segmenters.items():
            label_map = segmenter.segment(sample["image"])
            maps[name].append(label_map)
            metrics[name].update(torch.from_numpy(label_map), labels)
    rows = []
    for name in segmenters:
        agree = np.mean([(a == b).mean() for a, b in zip(maps[name], maps["fp32"], strict=True)])
        rows.append([name, f"{100 * metrics[name].compute()['mean_iou']:.2f}", f"{100 * agree:.2f}"])
    print(f"\nDemo set ({len(validation)} held-out images), {folder}, ORT whole-image:\n")
    print_table(["model", "mIoU %", "pixels = fp32 %"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(presets.all_variant_names()), help="Comma-separated presets.")
    add_input_arguments(parser, warmup=2, repeats=10)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--int8", default="dynamic,static", help="Int8 methods to time: dynamic, static or both.")
    parser.add_argument("--check_sizes", action="store_true", help="ORT vs PyTorch at 512x512, 480x640, 333x517.")
    parser.add_argument("--demo_miou", metavar="MODEL_DIR", help="Only: int8 mIoU change of a trained demo model.")
    parser.add_argument("--workdir", default=None, help="Where the .onnx files go (default a temporary folder).")
    args = parser.parse_args()
    args.int8 = [mode for mode in args.int8.split(",") if mode]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = args.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(args.workdir or temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.demo_miou:
            demo_miou(args.demo_miou, workdir, args)
            return
        pixel_values = torch.randn(
            args.batch_size, 3, args.height, args.width, generator=torch.Generator().manual_seed(0)
        )
        reference_model = hf_segformer_b0(args.num_labels).eval()
        reference = eager(reference_model)
        results = {}
        for variant in args.variants.split(","):
            print(f"{variant} ...", flush=True)
            try:
                results[variant] = benchmark_variant(variant, args, workdir, pixel_values, reference)
            except Exception as error:  # one variant's failure should not lose the others' figures
                print(f"  {variant} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
                results[variant] = None
            print(f"  {results[variant]}", flush=True)
    int8_columns = [f"ort int8 {mode}" for mode in args.int8]
    print(
        f"\n{args.height}x{args.width}, batch {args.batch_size}, fp32, {args.num_labels} labels, "
        f"{args.threads} threads, "
        f"{args.repeats} repeats (median ms); ratios against eager of the same preset and against {HF_SEGFORMER_B0} "
        "eager timed in the same rounds:"
    )
    print(f"{machine_line(torch.device('cpu'))}\n")
    columns = [
        "variant",
        "export s",
        "eager ms",
        "ORT fp32 ms",
        *[c.replace("ort ", "ORT ") + " ms" for c in int8_columns],
        "fp32/eager",
        *[f"{c.split()[-1]} int8/eager" for c in int8_columns],
        "fp32 vs HF B0",
        "HF B0 ms",
    ]
    rows = []
    for variant, r in results.items():
        if r is None:
            rows.append([variant, "failed", *["-"] * (len(columns) - 2)])
            continue
        rows.append(
            [
                variant,
                f"{r['export_s']:.0f}",
                f"{r['eager']:.1f}",
                f"{r['ort fp32']:.1f}",
                *[f"{r[c]:.1f}" for c in int8_columns],
                f"{r['ort fp32'] / r['eager']:.2f}",
                *[f"{r[c] / r['eager']:.2f}" for c in int8_columns],
                f"{r['ort fp32'] / r[HF_SEGFORMER_B0]:.2f}",
                f"{r[HF_SEGFORMER_B0]:.1f}",
            ]
        )
    print_table(columns, rows)
    if args.check_sizes:
        size_names = [f"{h}x{w}" for h, w in DEFAULT_VERIFY_SIZES]
        print("\nLargest |ORT fp32 - PyTorch| logit difference; int8 argmax = fp32 argmax at the benchmark size:\n")
        rows = [
            [
                variant,
                *[f"{r['diffs'][size]:.1e}" for size in DEFAULT_VERIFY_SIZES],
                *[f"{100 * r[f'agree {mode}']:.1f}%" for mode in args.int8],
            ]
            for variant, r in results.items()
            if r is not None
        ]
        print_table(["variant", *size_names, *[f"{mode} int8 agree" for mode in args.int8]], rows)


if __name__ == "__main__":
    main()
