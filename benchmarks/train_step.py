"""Training-step time and peak memory of every preset next to transformers' SegFormer-B0, in one run; optionally
the demo training run's steps per second.

    python benchmarks/train_step.py                                   # every preset, fp32 and bf16, CPU
    python benchmarks/train_step.py --variants offseg-t segformer-b0-offset --repeats 3
    python benchmarks/train_step.py --variants offseg-t --demo_steps 30   # + examples/train.py's demo steps/s
    python benchmarks/train_step.py --device cuda --repeats 20

One step is what a training loop does: `zero_grad`, forward with labels (the model's own loss: cross entropy with
ignore index 255 for SegFormer / OffSeg / SegNeXt, the matched mask losses for Mask2Former), backward, AdamW step
(lr 6e-5, weight decay 0.01). Inputs are random 512x512 crops (`--height/--width`) of random images, batch 2
(`--batch_size`), with random labels over 150 classes and a band of ignored pixels (255) in each crop; a new batch
every step (drawn before timing). Precisions: fp32, and bf16 autocast around the forward pass (the backward and the
optimizer in fp32 weights, as Accelerate's `--mixed_precision bf16` does).

Each (model, precision) runs in a fresh process (spawned), so memory figures do not mix: `--warmup` untimed steps
(the first step allocates the optimizer state), then `--repeats` timed ones; the median step time is reported, in
wall time or, with `--clock process --threads 1` on a CPU shared with other work, in the process's CPU time.
Peak memory: on CPU the peak resident set size (`resource.getrusage(...).ru_maxrss`) minus the resident size after
the model and the batches were built, so it counts gradients, optimizer state and activations; on CUDA
`torch.cuda.max_memory_allocated` minus the memory allocated after building. Ratios are against hf-segformer-b0 in
the same precision, measured in this run (processes run one after another, so machine load can differ between
them: read ratios from one run only).

`--demo_steps N` also runs `examples/train.py --variant V --max_train_steps N` on the default offline demo set
(no evaluation or checkpoint within the N steps; the device is Accelerate's choice) for each of `--demo_variants`,
and reports its steps per second from the progress bar (tqdm with `TQDM_SMOOTHING=0`: steps over the time since
the loop started).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import CLOCKS, HF_SEGFORMER_B0, hf_segformer_b0, machine_line, print_table, synchronize

from offseg_hf.presets import all_variant_names, model_for_variant

PRECISIONS = ("fp32", "bf16")
IGNORE_INDEX = 255
REPOSITORY = Path(__file__).resolve().parent.parent


def build(name: str, num_labels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == HF_SEGFORMER_B0:
        return hf_segformer_b0(num_labels)
    return model_for_variant(name, num_labels=num_labels)


def random_batches(count: int, batch: int, height: int, width: int, num_labels: int, device) -> list:
    """`count` batches of random images and labels; rows 3/8..1/2 of each label map are ignored (255)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        images = torch.randn(batch, 3, height, width, generator=generator)
        labels = torch.randint(0, num_labels, (batch, height, width), generator=generator)
        labels[:, 3 * height // 8 : height // 2] = IGNORE_INDEX
        batches.append((images.to(device), labels.to(device)))
    return batches


def _worker(name: str, precision: str, args: dict, queue) -> None:
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    model = build(name, args["num_labels"]).train().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)
    steps = args["warmup"] + args["repeats"]
    batches = random_batches(steps, args["batch_size"], args["height"], args["width"], args["num_labels"], device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times, losses = [], []
    now = CLOCKS[args["clock"]]
    for images, labels in batches:
        synchronize(device)
        start = now()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(pixel_values=images, labels=labels).loss
        loss.backward()
        optimizer.step()
        synchronize(device)
        times.append((now() - start) * 1e3)
        losses.append(loss.item())
    if device.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    timed = times[args["warmup"] :]
    queue.put({"ms": statistics.median(timed), "first_ms": times[0], "peak_mib": peak_mib, "loss": losses[-1]})


def run_isolated(name: str, precision: str, args: dict) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(name, precision, args, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{name} ({precision}) failed with exit code {process.exitcode}.")
    return queue.get()


_RATE = re.compile(r"train:.*?(\d+)/(\d+) \[([\d:]+)<[^,]*,\s*([\d.]+)(it/s|s/it)")


def demo_steps_per_second(variant: str, steps: int) -> tuple[float, float]:
    """(steps/s of the training loop from its progress bar, wall seconds of the whole command)."""
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, str(REPOSITORY / "examples" / "train.py"), "--variant", variant]
        command += ["--output_dir", output_dir, "--max_train_steps", str(steps)]
        command += ["--eval_steps", str(10 * steps), "--checkpointing_steps", str(10 * steps)]
        environment = {**os.environ, "TQDM_SMOOTHING": "0", "TQDM_MININTERVAL": "0", "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPOSITORY)
        wall = time.perf_counter() - start
    if completed.returncode:
        raise RuntimeError(f"examples/train.py --variant {variant} failed:\n{completed.stderr[-3000:]}")
    matches = _RATE.findall(completed.stderr.replace("\r", "\n"))
    done = [m for m in matches if m[0] == m[1] == str(steps)]
    if not done:
        raise RuntimeError(f"no final progress line for {variant} in:\n{completed.stderr[-2000:]}")
    *_, value, unit = done[-1]
    rate = float(value) if unit == "it/s" else 1.0 / float(value)
    return rate, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--num_labels", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall time, or the process's CPU time (CPU only; with --threads 1 on a shared machine)",
    )
    names = all_variant_names()
    parser.add_argument("--variants", nargs="+", choices=names, default=names, metavar="VARIANT")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--demo_steps", type=int, default=0, help="also time examples/train.py's demo (0: skip)")
    parser.add_argument("--demo_variants", nargs="+", choices=names, default=["segformer-b0-offset", "offseg-t"])
    args = parser.parse_args()
    worker_args = {k: getattr(args, k) for k in ("height", "width", "batch_size", "num_labels", "warmup", "repeats")}
    worker_args |= {"threads": args.threads, "device": args.device, "clock": args.clock}
    if args.clock == "process" and args.device != "cpu":
        parser.error("--clock process measures CPU time: CPU only.")

    results = {}
    for name in [HF_SEGFORMER_B0, *dict.fromkeys(args.variants)]:
        for precision in args.precisions:
            results[name, precision] = result = run_isolated(name, precision, worker_args)
            print(f"# {name} {precision}: {result['ms']:.0f} ms/step, peak {result['peak_mib']:.0f} MiB", flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"\n# training step: batch {args.batch_size} x {args.height}x{args.width}, {args.num_labels} classes, "
        f"AdamW; median of {args.repeats} after {args.warmup}, {args.clock} clock; "
        f"{machine_line(torch.device(args.device))}\n"
    )
    memory = "peak RSS delta MiB" if args.device == "cpu" else "peak allocated delta MiB"
    columns = ["model", "precision", "median ms/step", "first step ms", "ratio vs HF B0", memory, "memory vs HF B0"]
    rows = []
    for (name, precision), result in results.items():
        baseline = results[HF_SEGFORMER_B0, precision]
        rows.append(
            [name, precision, f"{result['ms']:.0f}", f"{result['first_ms']:.0f}"]
            + [f"{result['ms'] / baseline['ms']:.3f}", f"{result['peak_mib']:.0f}"]
            + [f"{result['peak_mib'] / baseline['peak_mib']:.2f}"]
        )
    print_table(columns, rows)

    if args.demo_steps:
        print(f"\n## examples/train.py demo (default offline demo set and recipe), {args.demo_steps} steps\n")
        rows = []
        for variant in args.demo_variants:
            rate, wall = demo_steps_per_second(variant, args.demo_steps)
            rows.append([variant, f"{rate:.2f}", f"{wall:.0f}"])
        print_table(["variant", "steps/s (training loop)", "whole command s"], rows)


if __name__ == "__main__":
    main()
