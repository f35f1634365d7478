"""Shared pieces of the benchmark scripts: timing, FLOP counting, the official computation order, tables."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import time

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from offseg_hf import OffSegForSemanticSegmentation
from offseg_hf.hub.repos import count_gmac  # noqa: F401  (re-exported for the benchmark scripts)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def measure(models: dict[str, nn.Module], pixel_values: torch.Tensor, warmup: int, repeats: int, clock: str = "wall"):
    """Per model, `repeats` forward times in ms; models take turns within each round, so load drift on the
    machine hits all of them alike. `clock="process"` reads the CPU time of this process (all its threads) instead
    of wall time: on a CPU shared with other work, and with one torch thread, it does not count the time the
    process waits for a core (it still counts slower memory access under contention)."""
    device = pixel_values.device
    now = CLOCKS[clock]
    times = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(pixel_values)
        for _ in range(repeats):
            for name, model in models.items():
                synchronize(device)
                start = now()
                model(pixel_values)
                synchronize(device)
                times[name].append((now() - start) * 1e3)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


class ForwardTimer:
    """Wall time of every forward call of the given modules, from forward pre/post hooks that read
    `time.perf_counter()` (after a `torch.cuda.synchronize` on CUDA), so it can time parts of the very passes
    `measure` times. `times[name]` lists ms per call in call order; the hooks are removed when the block ends.

        with ForwardTimer({"nmf": model.offseg.decode_head.hamburger.nmf}, device) as timer:
            times = measure(models, pixel_values, warmup, repeats)
    """

    def __init__(self, modules: dict[str, nn.Module], device: torch.device):
        self.modules, self.device = modules, device
        self.times: dict[str, list[float]] = {name: [] for name in modules}
        self._handles = []

    def __enter__(self) -> ForwardTimer:
        for name, module in self.modules.items():
            starts = []

            def before(*_, starts=starts):
                synchronize(self.device)
                starts.append(time.perf_counter())

            def after(*_, name=name, starts=starts):
                synchronize(self.device)
                self.times[name].append((time.perf_counter() - starts.pop()) * 1e3)

            self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


HF_SEGFORMER_B0 = "hf-segformer-b0"
# Table 4's SegFormer-B0 (mmseg's figures), the per-pixel model transformers' SegFormer-B0 corresponds to.
HF_SEGFORMER_B0_PAPER = {"params_m": 3.8, "gflops": 8.4}


def hf_segformer_b0(num_labels: int) -> SegformerForSemanticSegmentation:
    """transformers' SegFormer-B0 with mmseg's decoder width (256), the baseline of the benchmark ratios."""
    return SegformerForSemanticSegmentation(SegformerConfig(num_labels=num_labels, decoder_hidden_size=256))


def add_input_arguments(parser: argparse.ArgumentParser, warmup: int = 3, repeats: int = 15) -> None:
    """The input and timing flags of the benchmarks: --height --width --batch_size --num_labels --warmup --repeats
    --threads --device."""
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--num_labels", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")


def literal_offset_learning(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Offset learning in the official code's order: E permuted to (B, HW, C), dE formed at (HW, C)."""
    b, c, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
    classes = module.class_embeddings.expand(b, -1, -1)  # (B, K, C)
    coupled = (pixels @ classes.transpose(1, 2)).transpose(1, 2)  # (B, K, HW)
    aligned_classes = classes + module.class_offset_proj(coupled.softmax(dim=2) @ pixels)
    aligned_pixels = pixels + module.feature_offset_proj(coupled.softmax(dim=1).transpose(1, 2) @ classes)
    masks = module.mask_norm(aligned_pixels @ aligned_classes.transpose(1, 2))  # (B, HW, K)
    return masks.transpose(1, 2).reshape(b, -1, h, w)


class OfficialOrder(nn.Module):
    """Runs an OffSegForSemanticSegmentation's weights in the official implementation's order: for the
    SegFormer head the concat of upsampled maps before the fusion conv, and literal offset learning."""

    def __init__(self, model: OffSegForSemanticSegmentation):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        offseg = self.model.offseg
        features = offseg.encoder(pixel_values).feature_maps
        if self.model.config.decode_head == "segformer":
            decoder = offseg.decode_head
            size = features[0].shape[-2:]
            upsampled = [
                F.interpolate(proj(x), size=size, mode="bilinear", align_corners=False)
                for x, proj in zip(features, decoder.stage_projections, strict=True)
            ]
            x = decoder.fusion(torch.cat(upsampled, dim=1))
        else:
            x = offseg.decode_head(features)
        return literal_offset_learning(self.model.classifier, offseg.pool(x))


class Autocast(nn.Module):
    """Runs `model` under `torch.autocast(device_type, dtype)`; `measure` times it like any model."""

    def __init__(self, model: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.model, self.device_type, self.dtype = model, device_type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.model(*args, **kwargs)


def logits_of(output) -> torch.Tensor:
    """The semantic logits of a model output (a `...Output` with `logits`, or a tensor)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(max |other - reference|, share of positions whose argmax over classes agrees), in float32."""
    reference, other = reference.float(), other.float()
    same = (reference.argmax(dim=1) == other.argmax(dim=1)).float().mean().item()
    return (other - reference).abs().max().item(), same


# CPU features that change which kernels torch, oneDNN and ONNX Runtime pick, and so the timings (and the last bits of
# float32 results): a table is only comparable with tables measured on the same kind.
ISA_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512-BF16", "amx_tile": "AMX"}


def cpu_description() -> str:
    """The CPU model, its x86 family and model numbers and the ISA extensions that matter here, e.g. "AMD EPYC
    (family 23 model 1; AVX2; torch: AVX2)". Virtual machines often name only the vendor's line ("AMD EPYC"): the
    family and model numbers tell its generations apart (family 23 is Zen to Zen 2, 25 Zen 3 and 4, 26 Zen 5)."""
    model, numbers, flags = platform.processor() or platform.machine(), {}, set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("cpu family", "model"):
                    numbers[key] = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the model name from platform is what there is
        pass
    extensions = [name for flag, name in ISA_FLAGS.items() if flag in flags]
    generation = f"family {numbers['cpu family']} model {numbers['model']}; " if len(numbers) == 2 else ""
    isa = ", ".join(extensions) or "no AVX2"
    return f"{model} ({generation}{isa}; torch: {torch.backends.cpu.get_cpu_capability()})"


def gemm_rate(size: int = 1024, repeats: int = 10) -> float:
    """float32 matrix-multiply rate of this machine in GFLOP/s (median of `repeats` size^3 products on torch's
    current threads): a yardstick for comparing tables across machines, since a model's milliseconds scale with it
    more than with the CPU's name (an EPYC of family 23 model 1 gave 67 on 2 threads, one with AVX-512 167)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    times_ms = measure({"gemm": a.matmul}, b, warmup=3, repeats=repeats)["gemm"]
    return 2 * size**3 / median(times_ms) / 1e6


def library_versions() -> str:
    """Versions of the libraries a benchmark's figures depend on (those importable here)."""
    versions = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for name in ("timm", "onnxruntime", "openvino", "executorch"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(versions)


# glibc malloc told to keep freed memory in the process: large buffers freed in one forward are handed back warm in
# the next instead of being unmapped and faulted in again. Models that allocate large fresh buffers every pass
# (transformers' SegFormer-B0 head: 64 MB at 512x512) run much faster with it, so it moves every "x HF B0" ratio
# (docs/speed.md). glibc reads these when the process starts.
KEEP_FREED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "268435456",
}


def add_allocator_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allocator",
        choices=("default", "keep"),
        default="default",
        help="glibc malloc as it is ('default') or told to keep freed memory ('keep': the script restarts itself "
        "with " + " ".join(f"{k}={v}" for k, v in KEEP_FREED_MEMORY.items()) + ").",
    )


def apply_allocator(choice: str) -> None:
    """For `--allocator keep`, restart this script (the process's own command line, `sys.argv`) with
    `KEEP_FREED_MEMORY` in its environment, unless it is there already."""
    if choice == "keep" and any(os.environ.get(key) != value for key, value in KEEP_FREED_MEMORY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})


def allocator_description() -> str:
    settings = [f"{key}={os.environ[key]}" for key in sorted(os.environ) if key.startswith("MALLOC_")]
    return "malloc " + (" ".join(settings) if settings else "defaults")


def machine_line(device: torch.device) -> str:
    """Where a table was measured: CPU model, generation and ISA, thread count and the fp32 GEMM rate on them, device,
    the malloc settings, library versions (printed by every benchmark above its tables)."""
    threads = torch.get_num_threads()
    line = f"CPU {cpu_description()}, {threads} torch threads ({gemm_rate():.0f} GFLOP/s fp32 GEMM), device {device}"
    if device.type == "cuda":
        line += f" ({torch.cuda.get_device_name(device)})"
    return f"{line}, {allocator_description()}; {library_versions()}"


def parameters_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    """A Markdown table; the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns))]

    def line(cells):
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(padded) + " |"

    print(line(columns))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


# The presets whose speed the docs quote: OffSeg-T/B/L and one of each other family.
FAMILY_PRESETS = (
    "offseg-t",
    "offseg-b",
    "offseg-l",
    "segformer-b0-offset",
    "segnext-t-offset",
    "mask2former-swin-t-offset",
)
