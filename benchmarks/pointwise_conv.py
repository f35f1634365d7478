"""1x1 convolutions: `nn.Conv2d` (oneDNN on the CPU) against the fast form's batched product
(`offseg_hf.models.fast_layers.pointwise_conv`), on the channels-first maps OffSeg-T meets, at 1 and 2 threads.

    python benchmarks/pointwise_conv.py                     # 1 and 2 threads, median of 21 calls
    python benchmarks/pointwise_conv.py --threads 4 --repeats 51

Each shape is timed twice: first as glibc's malloc behaves in a loop that frees and allocates the same sizes (it
raises its mmap threshold and hands the same warm pages back), then with every buffer of 128 KiB or more mapped fresh
(`mallopt(M_MMAP_THRESHOLD, 128 KiB)`, this process only), as a model forward meets its large buffers when freed memory
has gone back to the system: each first touch of a page is a page fault. oneDNN's convolution on a channels-first map
writes blocked-layout copies of its input and output, so it touches about three times the memory the product does.

The shapes (batch 1, a 512x512 input): the OffSeg decoder's align convolution (256 -> 256 at 1/4 scale), the same at
batch 2 and at 1/4 of 384x384, EfficientFormerV2's talking heads (8 -> 8 heads over a 256 x 256 attention map), and a
SegFormer-style 32 -> 256 stage projection at 1/4 scale. The two take turns call by call, so drift in machine load
hits both alike; the ratio is product / convolution. The whole-model effect is measured by
`benchmarks/against_checkout.py` (this checkout against one before the fast form).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
from functools import partial

import torch
from common import machine_line, measure, median, print_table
from torch import nn

from offseg_hf.models.fast_layers import pointwise_conv

SHAPES = {  # name: (batch, in channels, out channels, height, width, bias)
    "align 256->256, 128x128": (1, 256, 256, 128, 128, False),
    "align 256->256, 128x128, batch 2": (2, 256, 256, 128, 128, False),
    "align 256->256, 96x96": (1, 256, 256, 96, 96, False),
    "talking head 8->8, 256x256": (1, 8, 8, 256, 256, True),
    "projection 32->256, 128x128": (1, 32, 256, 128, 128, False),
}


M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


def map_large_buffers_fresh() -> bool:
    """Make glibc map every allocation of 128 KiB or more anew (and unmap it when freed); False where that is not
    glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024))
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    print(machine_line(torch.device("cpu")))
    rows = []
    for allocator in ("reused pages", "fresh pages"):
        if allocator == "fresh pages" and not map_large_buffers_fresh():
            print("(not glibc: the fresh-pages rows are left out)")
            break
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, (batch, c_in, c_out, height, width, bias) in SHAPES.items():
                rows.append(
                    [name, allocator, str(threads), *time_shape(batch, c_in, c_out, height, width, bias, args.repeats)]
                )
    print(f"\nmedian of {args.repeats} calls each (ms), float32, channels-first input:\n")
    print_table(["shape", "allocator", "threads", "conv ms", "product ms", "product / conv", "max abs diff"], rows)


def time_shape(batch, c_in, c_out, height, width, bias, repeats: int) -> list[str]:
    """[conv ms, product ms, ratio, max abs diff] for one shape: the two forms called in turns (`common.measure`)."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=bias).eval()
    x = torch.randn(batch, c_in, height, width)
    with torch.inference_mode():
        difference = (pointwise_conv(conv, x) - conv(x)).abs().max().item()
    times = measure({"conv": conv, "product": partial(pointwise_conv, conv)}, x, warmup=3, repeats=repeats)
    conv_ms, product_ms = median(times["conv"]), median(times["product"])
    return [f"{conv_ms:.2f}", f"{product_ms:.2f}", f"{product_ms / conv_ms:.2f}", f"{difference:.1e}"]


if __name__ == "__main__":
    main()
