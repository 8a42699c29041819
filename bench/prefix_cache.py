"""Benchmark: "last blocks" fine-tuning with the prefix cache (tlkit) vs the frozen blocks run every epoch.

Both runs are ``tlkit.run_strategy`` with the same strategy, seed, data, batches and epochs ("last blocks":
stage7 + top + head train, everything below is frozen), once as it is and once with ``prefix_cache=True``,
which runs stem..stage6 once and trains the rest on their cached output. Prints the time and val accuracy of
each, the limit for this boundary (measured per batch: a training step and a validation pass of the suffix alone
vs the whole model, and loading the images, which the cache also skips) and, last, the speed-up.

    python bench/prefix_cache.py                                   # the bundled clothing photos, 160 px
    python bench/prefix_cache.py --dataset ../shared/data/clothing-dataset-small --samples-per-class 20
    python bench/prefix_cache.py --device cuda --image-size 224
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import tlkit
from tlkit.prefix_cache import forward_from, forward_prefix, prefix_boundary


def step_seconds(forward: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module, x: torch.Tensor,
                 y: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median seconds of one training step (``forward``, backward, AdamW step on ``model``'s trainable parameters)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)  # lr 0: timing only
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(forward(x), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    timed = sorted(times[1:])
    return timed[len(timed) // 2]


@torch.no_grad()
def forward_seconds(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median seconds of one forward pass without gradients (a validation batch)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        forward(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    timed = sorted(times[1:])
    return timed[len(timed) // 2]


def loading_seconds(loader, batches: int) -> float:
    """Mean seconds to decode and transform one batch of images (what the cache also skips)."""
    start, seen = time.perf_counter(), 0
    for seen, _ in enumerate(loader, start=1):
        if seen == batches:
            break
    return (time.perf_counter() - start) / max(seen, 1)


@dataclass
class Costs:
    """Measured seconds per batch: loading images, and a training step / a forward pass of the whole model and of the suffix."""

    boundary: str
    load: float
    step_whole: float
    step_suffix: float
    forward_whole: float
    forward_suffix: float
    forward_prefix: float

    def epoch_limit(self, train_batches: int, val_batches: int) -> float:
        """Per-epoch ratio, uncached / cached: loading, training and validation, without the one prefix pass."""
        plain = train_batches * (self.load + self.step_whole) + val_batches * (self.load + self.forward_whole)
        return plain / (train_batches * self.step_suffix + val_batches * self.forward_suffix)

    def run_limit(self, train_batches: int, val_batches: int, epochs: int) -> float:
        """The same for ``epochs`` epochs, counting one prefix pass over both splits."""
        plain = train_batches * (self.load + self.step_whole) + val_batches * (self.load + self.forward_whole)
        cached = train_batches * self.step_suffix + val_batches * self.forward_suffix
        prefix = (train_batches + val_batches) * (self.load + self.forward_prefix)
        return epochs * plain / (prefix + epochs * cached)


def measure_costs(splits, args, device: torch.device) -> Costs:
    """Per-batch costs on one batch of real images (same model, boundary and transform as the runs)."""
    tlkit.set_seed(0)
    model = tlkit.apply_strategy(tlkit.create_model(args.backbone, len(splits.classes), "imagenet"), "last_n_blocks", n_blocks=args.n_blocks)
    model.to(device)
    transform = tlkit.eval_transform(args.image_size, model.normalization)
    loader = tlkit.make_loader(splits.train, transform, args.batch_size, shuffle=False)
    load = loading_seconds(loader, batches=3)
    x, y = next(iter(loader))
    x, y = x.to(device), y.to(device)
    boundary = prefix_boundary(model)
    model.eval()
    with torch.no_grad():
        activations = forward_prefix(model, boundary, x)
    suffix = lambda a: forward_from(model, boundary, a)  # noqa: E731
    forwards = [forward_seconds(f, v, device, args.repeats) for f, v in
                ((model, x), (suffix, activations), (lambda i: forward_prefix(model, boundary, i), x))]
    model.train()  # frozen blocks stay in eval mode, as in fit
    steps = [step_seconds(model, model, x, y, device, args.repeats), step_seconds(suffix, model, activations, y, device, args.repeats)]
    return Costs(boundary, load, *steps, *forwards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="clothing")
    parser.add_argument("--backbone", default=tlkit.models.OFFLINE_BACKBONE)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-blocks", type=int, default=2, help="blocks below the head that train (2: stage7 and top)")
    parser.add_argument("--samples-per-class", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps for the per-batch limit")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = tlkit.get_device(args.device)
    splits = tlkit.load_dataset(args.dataset, data_root="data", seed=0, samples_per_class=args.samples_per_class)
    print(f"{splits.name}: {len(splits.train)} train / {len(splits.val)} val images, {args.backbone} at "
          f"{args.image_size}px, last {args.n_blocks} blocks + head train, batch {args.batch_size}, {args.epochs} epochs, "
          f"device {device}, {torch.get_num_threads()} threads", flush=True)

    costs = measure_costs(splits, args, device)
    train_batches, val_batches = (math.ceil(len(ds) / args.batch_size) for ds in (splits.train, splits.val))
    print(f"per batch of {args.batch_size}: loading images {costs.load:.3f}s; training step: whole model "
          f"{costs.step_whole:.3f}s, from {costs.boundary!r} up {costs.step_suffix:.3f}s; validation forward: "
          f"{costs.forward_whole:.3f}s vs {costs.forward_suffix:.3f}s", flush=True)
    print(f"limit for the boundary {costs.boundary!r}: {costs.step_whole / costs.step_suffix:.1f}x on the training step "
          f"alone; {costs.epoch_limit(train_batches, val_batches):.1f}x per epoch with the loading and validation the "
          f"cache also skips (many epochs); {costs.run_limit(train_batches, val_batches, args.epochs):.1f}x expected for "
          f"{args.epochs} epochs with one prefix pass", flush=True)

    config = tlkit.RunConfig(backbone=args.backbone, weights="imagenet", image_size=args.image_size, batch_size=args.batch_size,
                             epochs=args.epochs, lr=args.lr, seed=0, device=device)
    plain = tlkit.run_strategy(config, splits, "last_n_blocks", n_blocks=args.n_blocks)
    print(f"frozen blocks every epoch:   {plain.seconds:8.2f}s  val acc {plain.val_acc:.4f}", flush=True)
    cached = tlkit.run_strategy(config, splits, "last_n_blocks", n_blocks=args.n_blocks, prefix_cache=True)
    stats = cached.prefix_cache
    print(f"prefix cache (tlkit):        {cached.seconds:8.2f}s  val acc {cached.val_acc:.4f}  (prefix pass "
          f"{stats.prefix_seconds:.2f}s, training {cached.seconds - stats.prefix_seconds:.2f}s)")
    print(f"accuracy difference {100 * (cached.val_acc - plain.val_acc):+.2f} points")
    print(f"speedup {plain.seconds / cached.seconds:.1f}x")


if __name__ == "__main__":
    main()
