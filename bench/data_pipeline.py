"""Benchmark: is training bound by the data pipeline? Images/s of the loader alone, the model step alone, and both.

Two pipelines feed the same fine-tuning step (EfficientNet-Lite0, last blocks trainable, AMP on a GPU):
  * "PIL loader": the usual way, every epoch decodes each image and runs the 'basic' augmentation
    (RandomResizedCrop + flip) on the CPU in DataLoader workers;
  * "in-memory, on device": tlkit decodes each image once into a uint8 tensor and runs the same
    augmentation on the training device (``tlkit.augment.InMemoryImages`` + ``tlkit.augment.device_loader``).
The model-only rate repeats one batch already on the device. Prints, last, the loop's share of
the model-only rate for the in-memory pipeline (the issue's target on a GPU: at least 80%).

    python bench/data_pipeline.py                          # CPU, 64 px
    python bench/data_pipeline.py --device cuda --image-size 224 --workers 8
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import tlkit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(batches, device: torch.device, steps: int) -> float:
    """Images/s of iterating ``batches`` (moved to ``device``), no model."""
    seen, start = 0, time.perf_counter()
    for step, (x, _y) in enumerate(_cycle(batches)):
        if step == steps:
            break
        x = x.to(device, non_blocking=True)
        seen += len(x)
    _sync(device)
    return seen / (time.perf_counter() - start)


def train_rate(model: nn.Module, optimizer, batches, device: torch.device, steps: int) -> float:
    """Images/s of training steps fed by ``batches``."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    amp = torch.bfloat16 if device.type == "cuda" else None
    seen, start = 0, time.perf_counter()
    for step, (x, y) in enumerate(_cycle(batches)):
        if step == steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(x)
    _sync(device)
    return seen / (time.perf_counter() - start)


def _cycle(batches):
    while True:
        yield from batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the PIL loader")
    parser.add_argument("--frozen-up-to", default="stage5", help="blocks up to this one stay frozen; the later ones train")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = tlkit.get_device(args.device)
    splits = tlkit.load_dataset(args.dataset, data_root="data", seed=0)
    tlkit.set_seed(0)
    model = tlkit.freeze(tlkit.create_model(tlkit.models.OFFLINE_BACKBONE, len(splits.classes), "imagenet"), up_to=args.frozen_up_to)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    norm = model.normalization

    pil = tlkit.make_loader(splits.train, tlkit.train_transform(args.image_size, norm, "basic"), args.batch_size,
                            shuffle=True, seed=0, num_workers=args.workers, pin_memory=device.type == "cuda")
    start = time.perf_counter()
    cached = tlkit.augment.InMemoryImages.from_dataset(splits.train, args.image_size)
    decode_seconds = time.perf_counter() - start
    on_device = tlkit.augment.device_loader(cached, args.batch_size, device,
                                    tlkit.augment.BatchTransform(norm, "basic", image_size=args.image_size), shuffle=True, seed=0)
    fixed = next(iter(on_device))
    print(f"{splits.name}: {len(splits.train)} train images at {args.image_size}px, batch {args.batch_size}, device {device}, "
          f"{args.workers} PIL workers, {torch.get_num_threads()} threads; decoding once into memory took {decode_seconds:.2f}s")

    train_rate(model, optimizer, [fixed], device, 3)  # warm-up
    model_only = train_rate(model, optimizer, [fixed], device, args.steps)
    rows = {"model step alone (one batch on device)": model_only}
    for name, batches in (("PIL loader", pil), ("in-memory, on device", on_device)):
        rows[f"{name}: loader alone"] = loader_rate(batches, device, args.steps)
        rows[f"{name}: loader + model"] = train_rate(model, optimizer, batches, device, args.steps)
    for name, rate in rows.items():
        print(f"{name:42s} {rate:9.1f} images/s")
    print(f"PIL loader loop reaches {100 * rows['PIL loader: loader + model'] / model_only:.0f}% of the model-only rate")
    print(f"in-memory loop reaches {100 * rows['in-memory, on device: loader + model'] / model_only:.0f}% of the model-only rate")


if __name__ == "__main__":
    main()
