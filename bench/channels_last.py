"""Benchmark: images per second of EfficientNet-Lite0 in PyTorch's default (NCHW) and channels_last memory formats.

Three workloads of the course, each timed in both formats, alternating after a warm-up (median of the repeats):
the frozen backbone's forward pass (feature extraction, the prefix cache), training every block (notebook 01's
from-scratch baseline, notebook 02's "full"), and training the last block on cached activations (the prefix
cache's suffix). Prints the speed-up of channels_last last; tlkit uses it wherever it is faster.

    python bench/channels_last.py                              # CPU, 128 px, batch 32
    python bench/channels_last.py --device cuda --image-size 224 --batch-size 128
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import tlkit
from tlkit.prefix_cache import forward_from, forward_prefix


def _timed(step: Callable[[], None], repeats: int, device: torch.device) -> float:
    step()  # warm-up: oneDNN / cuDNN pick their kernels on the first call
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def workloads(image_size: int, batch_size: int, device: torch.device, channels_last: bool) -> dict[str, Callable[[], None]]:
    """The three steps, on a model and batch in the given memory format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch_size,), device=device)

    frozen = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 10, "imagenet")).to(device, memory_format=fmt).eval()
    full = tlkit.create_model("efficientnet_lite0", 10, None).to(device, memory_format=fmt).train()
    full_opt = torch.optim.AdamW(full.parameters(), 1e-3)
    top = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 10, "imagenet"), up_to="stage7").to(device, memory_format=fmt).train()
    with torch.no_grad():
        acts = forward_prefix(top, "top", x).contiguous(memory_format=fmt)
    top_opt = torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], 1e-3)

    def forward_frozen() -> None:
        with torch.inference_mode():
            frozen(x)

    def train(model: nn.Module, optimizer: torch.optim.Optimizer, run: Callable[[], torch.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(run(), y).backward()
        optimizer.step()

    return {
        "frozen backbone forward": forward_frozen,
        "train every block": lambda: train(full, full_opt, lambda: full(x)),
        "train top + head on cached activations": lambda: train(top, top_opt, lambda: forward_from(top, "top", acts)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = tlkit.get_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"EfficientNet-Lite0, {args.image_size} px, batch {args.batch_size}, {name}, torch {torch.__version__}")
    formats = {fmt: workloads(args.image_size, args.batch_size, device, fmt) for fmt in (False, True)}
    speedups = {}
    for workload in formats[False]:
        seconds = {fmt: [] for fmt in formats}
        for _ in range(args.repeats):  # alternate the formats so that drift hits both alike
            for fmt, steps in formats.items():
                seconds[fmt].append(_timed(steps[workload], 1, device))
        rate = {fmt: args.batch_size / statistics.median(s) for fmt, s in seconds.items()}
        speedups[workload] = rate[True] / rate[False]
        print(f"  {workload:40s} NCHW {rate[False]:8.1f} img/s   channels_last {rate[True]:8.1f} img/s   x{speedups[workload]:.2f}")
    print("channels_last speed-up: " + ", ".join(f"{w} x{s:.2f}" for w, s in speedups.items()))


if __name__ == "__main__":
    main()
