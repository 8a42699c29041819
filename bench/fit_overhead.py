"""Benchmark: the overhead of ``tlkit.fit`` over a bare PyTorch loop on the identical model, data and batches.

Both loops train the same partly frozen EfficientNet-Lite0 (same initial weights) on the same
pre-transformed tensors, with the same batches, optimizer, AMP/channels_last settings, and a
validation pass per epoch. Runs alternate (tlkit, bare, tlkit, bare, ...) after a warm-up so that
clock drift and caches hit both alike; the median of each is compared. Prints the overhead last.

    python bench/fit_overhead.py                      # CPU: digits at 64 px
    python bench/fit_overhead.py --device cuda --image-size 224 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import tlkit


def bare_loop(model, train_loader, val_loader, *, epochs: int, lr: float, device: torch.device, channels_last: bool) -> float:
    """The plain-PyTorch loop of the tutorials, with the same AMP as tlkit.fit; returns the final val accuracy."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)  # fit's default
    amp = torch.bfloat16 if device.type == "cuda" else None
    loss_fn = nn.CrossEntropyLoss()
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    acc = 0.0
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()  # tlkit.fit reads the loss every batch too
        model.eval()
        correct = seen = 0
        with torch.no_grad():
            for x, y in val_loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = model(x)
                loss_fn(logits, y).item()
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
        acc = correct / seen
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples-per-class", type=int, default=40)
    parser.add_argument("--frozen-up-to", default="stage5", help="blocks up to this one stay frozen; the later ones train")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = tlkit.get_device(args.device)
    channels_last = True  # tlkit.fit always trains in channels_last: the bare loop does too
    splits = tlkit.load_dataset(args.dataset, data_root="data", seed=0, samples_per_class=args.samples_per_class)
    tlkit.set_seed(0)
    template = tlkit.freeze(tlkit.create_model(tlkit.models.OFFLINE_BACKBONE, len(splits.classes), "imagenet"), up_to=args.frozen_up_to)
    transform = tlkit.eval_transform(args.image_size, template.normalization)

    def as_tensors(ds):  # decode once: both loops then see the very same tensors
        items = [transform(ds[i][0]) for i in range(len(ds))]
        return torch.utils.data.TensorDataset(torch.stack(items), torch.tensor(ds.targets))

    train, val = as_tensors(splits.train), as_tensors(splits.val)
    pin = device.type == "cuda"

    def loaders():
        return (tlkit.make_loader(train, None, args.batch_size, shuffle=True, seed=0, pin_memory=pin),
                tlkit.make_loader(val, None, args.batch_size, shuffle=False, pin_memory=pin))

    def run_tlkit() -> tuple[float, float]:
        model = copy.deepcopy(template)
        tlkit.set_seed(1)  # the same dropout masks in both loops
        start = time.perf_counter()
        history = tlkit.fit(model, *loaders(), epochs=args.epochs, lr=1e-3, device=device, progress=False)
        _sync(device)
        return time.perf_counter() - start, history.val_acc[-1]

    def run_bare() -> tuple[float, float]:
        model = copy.deepcopy(template)
        tlkit.set_seed(1)
        start = time.perf_counter()
        acc = bare_loop(model, *loaders(), epochs=args.epochs, lr=1e-3, device=device, channels_last=channels_last)
        _sync(device)
        return time.perf_counter() - start, acc

    print(f"{splits.name}: {len(train)} train / {len(val)} val images at {args.image_size}px, batch {args.batch_size}, "
          f"{args.epochs} epochs, blocks up to {args.frozen_up_to} frozen, device {device}, {torch.get_num_threads()} threads")
    run_tlkit(), run_bare()  # warm-up (allocator, cuDNN autotuning, caches)
    times: dict[str, list[float]] = {"tlkit": [], "bare": []}
    accs: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, run in (("tlkit", run_tlkit), ("bare", run_bare)):
            seconds, accs[name] = run()
            times[name].append(seconds)
    for name in times:
        print(f"{name:6s} median {statistics.median(times[name]):7.3f}s  runs {[f'{t:.3f}' for t in times[name]]}  val acc {accs[name]:.4f}")
    overhead = statistics.median(times["tlkit"]) / statistics.median(times["bare"]) - 1
    print(f"overhead {100 * overhead:+.1f}%")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
