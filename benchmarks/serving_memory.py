"""Peak memory and latency of one request per serving path, each in a fresh process, for 1, 12 and 24 MP photos.

    python benchmarks/serving_memory.py                         # every path, 1 / 12 / 24 MP, 150 labels
    python benchmarks/serving_memory.py --sizes 12 --paths handler,pipeline --threads 2
    python benchmarks/serving_memory.py --workdir /tmp/serving  # keep (and reuse) the folders, photos and ONNX file

Paths (random weights, 150 labels; the folders are written as the project writes them: `save_pretrained`, the
image processor, and `offseg_hf.hub.repos.write_endpoint_files` for handler.py):
  handler          the folder's Inference Endpoints `handler.py` (`EndpointHandler(folder)({"inputs": JPEG bytes})`)
                   in a process where offseg_hf cannot be imported, as on an endpoint (the folder's own code).
  pipeline         `transformers.pipeline("image-segmentation", model=folder)(photo path)`.
  app              examples/app.py's Segment button (`segment_upload`: the upload's path -> overlay, legend,
                   areas, class attention).
  onnx             `offseg_hf.export.onnx.OnnxSegmenter(folder/model.onnx).pipeline_output(photo path)` (ONNX Runtime).
  hf-segformer-b0  the baseline: transformers' SegformerForSemanticSegmentation (MiT-B0, decoder 256) through the
                   same pipeline, with transformers' SegformerImageProcessor (whole (K, H, W) resize).
Every request starts from the JPEG file (so decoding counts) and ends with the path's full answer held.

Before the table: whether the banded post-processing's label map of the 1 MP photo is identical to the one
transformers' SegformerImageProcessor gives with the whole (K, H, W) resize, on the same logits.

Method: per path and size a fresh `python` process loads the path, serves one warm-up request on a 640x480 photo
(lazy initialisation, thread pools), resets the kernel's peak-RSS mark (writing 5 to /proc/self/clear_refs sets
VmHWM to the current VmRSS; where that is refused, a thread samples VmRSS every millisecond instead), then serves
the measured request: "peak growth" is VmHWM after it minus VmRSS before it; "latency" its wall time. The handler
and the app run with OFFSEG_MAX_IMAGE_PIXELS raised to the largest photo (their default limit, 4096 x 4096, refuses
24 MP). OFFSEG_RESIZE_BUDGET_MB (the band budget, default 256 MiB) passes through from the environment. The paths run
one at a time, so each can use the machine's memory (the baseline needs about 15 GB at 24 MP).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
APP = HERE.parent / "examples" / "app.py"
PATHS = ("handler", "pipeline", "app", "onnx", "hf-segformer-b0")
SIZES = {1: (1152, 864), 12: (4032, 3024), 24: (5664, 4248)}  # (width, height), 4:3 like a phone photo
WARMUP_SIZE = (640, 480)
VARIANT = "segformer-b0-offset"


# ---------------------------------------------------------------------------------------------------------------
# Setup (parent process)


def photo(width: int, height: int, seed: int = 0):
    """A photo-like RGB image: smooth colour fields with fine noise, so JPEG and the model see structure."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def prepare(workdir: Path, num_labels: int, paths: list[str], sizes: list[int]) -> dict[str, str]:
    """The folders, the ONNX file and the photos (reused when `workdir` already holds them)."""
    import torch

    files = {"offseg": workdir / VARIANT, "baseline": workdir / "hf-segformer-b0", "photos": workdir / "photos"}
    files["photos"].mkdir(parents=True, exist_ok=True)
    for size in {*sizes, 1, 0}:  # 1 MP for the label-map check, 0 for the warm-up
        width, height = SIZES.get(size, WARMUP_SIZE)
        path = files["photos"] / f"{width}x{height}.jpg"
        if not path.exists():
            photo(width, height, seed=size).save(path, quality=90)
    id2label = {i: f"class-{i}" for i in range(num_labels)}
    label2id = {label: i for i, label in id2label.items()}
    if not (files["offseg"] / "config.json").exists():
        from offseg_hf import OffSegImageProcessor
        from offseg_hf.hub.repos import write_endpoint_files
        from offseg_hf.presets import model_for_variant

        torch.manual_seed(0)
        model = model_for_variant(VARIANT, num_labels=num_labels, id2label=id2label, label2id=label2id).eval()
        model.save_pretrained(files["offseg"])
        OffSegImageProcessor().save_pretrained(files["offseg"])
        write_endpoint_files(files["offseg"], VARIANT)
    if "onnx" in paths and not (files["offseg"] / "model.onnx").exists():
        from transformers import AutoModelForSemanticSegmentation

        from offseg_hf.export.onnx import export_onnx

        print("exporting the ONNX file ...", flush=True)
        model = AutoModelForSemanticSegmentation.from_pretrained(files["offseg"]).eval()
        export_onnx(model, files["offseg"] / "model.onnx")
    if "hf-segformer-b0" in paths and not (files["baseline"] / "config.json").exists():
        from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

        torch.manual_seed(0)
        config = SegformerConfig(num_labels=num_labels, decoder_hidden_size=256, id2label=id2label, label2id=label2id)
        SegformerForSemanticSegmentation(config).eval().save_pretrained(files["baseline"])
        SegformerImageProcessor().save_pretrained(files["baseline"])
    return {name: str(path) for name, path in files.items()}


def check_label_maps(files: dict[str, str]) -> bool:
    """Whether the banded post-processing gives the label map of transformers' whole resize on the 1 MP photo
    (150 x 1 MP x 4 bytes = 0.6 GB, so the default budget does form bands)."""
    import torch
    from PIL import Image
    from transformers import AutoModelForSemanticSegmentation, SegformerImageProcessor

    from offseg_hf import OffSegImageProcessor

    processor = OffSegImageProcessor.from_pretrained(files["offseg"])
    model = AutoModelForSemanticSegmentation.from_pretrained(files["offseg"]).eval()
    image = Image.open(Path(files["photos"]) / "{}x{}.jpg".format(*SIZES[1])).convert("RGB")
    with torch.inference_mode():
        outputs = model(**processor(images=image, return_tensors="pt"))
    sizes = [(image.height, image.width)]
    (banded,) = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
    (whole,) = SegformerImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=sizes)
    return bool(torch.equal(banded, whole))


# ---------------------------------------------------------------------------------------------------------------
# One measurement (child process)


def status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakRss:
    """Peak resident memory while the block runs: the kernel's VmHWM after resetting it, else a sampling thread."""

    def __enter__(self) -> PeakRss:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.method, self.sampler = "VmHWM reset via /proc/self/clear_refs", None
        except OSError:
            self.method, self.samples, self.running = "VmRSS sampled every 1 ms", [], True
            self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.before = status_bytes("VmRSS")
        if self.sampler is not None:
            self.sampler.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.samples.append(status_bytes("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc_info) -> None:
        if self.sampler is None:
            self.peak = status_bytes("VmHWM")
        else:
            self.running = False
            self.sampler.join()
            self.peak = max([*self.samples, status_bytes("VmRSS")])
        self.growth = self.peak - self.before


def load_path(name: str, files: dict[str, str]):
    """A function serving one request from a photo's path, for the path `name`."""
    folder = files["offseg"]
    if name == "handler":
        import importlib.util

        sys.modules["offseg_hf"] = None  # as on an endpoint: transformers, torch and the folder's own code
        spec = importlib.util.spec_from_file_location("handler", os.path.join(folder, "handler.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        handler = module.EndpointHandler(path=folder)
        return lambda path: handler({"inputs": Path(path).read_bytes()})
    if name in ("pipeline", "hf-segformer-b0"):
        from transformers import pipeline

        if name == "pipeline":
            import offseg_hf  # noqa: F401  (registers the model type with transformers' Auto classes)
        segmenter = pipeline("image-segmentation", model=folder if name == "pipeline" else files["baseline"])
        return lambda path: segmenter(path)
    if name == "app":
        import importlib.util

        spec = importlib.util.spec_from_file_location("offseg_app", APP)
        app = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(app)
        cache = app.ModelCache(allow_download=False, device="cpu")
        limit = app.max_image_pixels()
        return lambda path: app.segment_upload(cache, limit, path, folder)
    if name == "onnx":
        from offseg_hf.export.onnx import OnnxSegmenter

        segmenter = OnnxSegmenter(os.path.join(folder, "model.onnx"))
        return lambda path: segmenter.pipeline_output(path)
    raise ValueError(f"unknown path {name!r}; choose from {', '.join(PATHS)}")


def child(name: str, size: int, files: dict[str, str], threads: int | None) -> dict:
    import gc

    import torch

    if threads:
        torch.set_num_threads(threads)
    serve = load_path(name, files)
    photos = Path(files["photos"])
    serve(str(photos / "{}x{}.jpg".format(*WARMUP_SIZE)))
    width, height = SIZES[size]
    gc.collect()
    with PeakRss() as peak:
        start = time.perf_counter()
        answer = serve(str(photos / f"{width}x{height}.jpg"))
        latency = time.perf_counter() - start
    entries = len(answer) if isinstance(answer, (list, tuple)) else 1
    return {"growth": peak.growth, "latency": latency, "method": peak.method, "entries": entries}


# ---------------------------------------------------------------------------------------------------------------
# The table


def run_child(name: str, size: int, files: dict[str, str], args) -> dict:
    largest = max(width * height for width, height in SIZES.values())
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OFFSEG_MAX_IMAGE_PIXELS": str(largest)}
    environment.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    command = [sys.executable, __file__, "--child", name, "--child_size", str(size), "--files", json.dumps(files)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=args.timeout)
    if completed.returncode:
        lines = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {completed.returncode}: {lines}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def machine() -> str:
    sys.path.insert(0, str(HERE))
    import torch
    from common import machine_line

    return machine_line(torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default=",".join(PATHS), help="Comma-separated, from: " + ", ".join(PATHS))
    parser.add_argument("--sizes", default="1,12,24", help="Comma-separated photo sizes in MP, from 1, 12, 24.")
    parser.add_argument("--num_labels", type=int, default=150)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--workdir", default=None, help="Keep the folders and photos here (default: a temp folder).")
    parser.add_argument("--timeout", type=int, default=1800, help="Seconds one request's process may take.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child_size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.child_size, json.loads(args.files), args.threads)))
        return
    paths = [name for name in args.paths.split(",") if name]
    sizes = [int(size) for size in args.sizes.split(",") if size]
    unknown = sorted(set(paths) - set(PATHS)) + [str(size) for size in sizes if size not in SIZES]
    if unknown:
        parser.error(f"unknown paths or sizes: {', '.join(unknown)}")
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(args.workdir or temporary)
        files = prepare(workdir, args.num_labels, paths, sizes)
        results: dict[str, dict[int, dict]] = {}
        for name in paths:
            for size in sizes:
                print(f"{name} at {size} MP ...", flush=True)
                results.setdefault(name, {})[size] = result = run_child(name, size, files, args)
                print("  " + json.dumps(result), flush=True)
        same = check_label_maps(files)
    print()
    print(machine())
    budget = os.environ.get("OFFSEG_RESIZE_BUDGET_MB", "256 (default)")
    methods = {r["method"] for sizes_ in results.values() for r in sizes_.values() if "method" in r}
    print(f"{args.num_labels} labels, band budget {budget} MiB; peak RSS: {'; '.join(sorted(methods))}")
    print(f"banded label map of the 1 MP photo identical to transformers' whole resize: {same}\n")
    columns = ["path"]
    for size in sizes:
        width, height = SIZES[size]
        columns.append(f"peak growth {width}x{height} ({width * height / 1e6:.1f} MP)")
    columns += [f"latency {size} MP" for size in sizes]
    rows = []
    for name in paths:
        cells = [name]
        for size in sizes:
            result = results[name][size]
            cells.append(f"{result['growth'] / 2**20:,.0f} MiB" if "growth" in result else result["error"][:60])
        for size in sizes:
            result = results[name][size]
            cells.append(f"{result['latency']:.1f} s" if "latency" in result else "-")
        rows.append(cells)
    sys.path.insert(0, str(HERE))
    from common import print_table

    print_table(columns, rows)


if __name__ == "__main__":
    main()
