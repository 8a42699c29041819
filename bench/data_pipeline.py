"""Benchmark: is training bound by the data pipeline? Images/s of the loader alone, the model step alone, and both.

Two pipelines feed the same fine-tuning step (EfficientNet-Lite0, last blocks trainable, AMP on a GPU):
  * "PIL loader": the usual way, every epoch decodes each image and runs the 'basic' augmentation
    (RandomResizedCrop + flip) on the CPU in DataLoader workers;
  * "in-memory, on device": tlkit decodes each image once into a uint8 tensor and runs the same
    augmentation on the training device (``tlkit.augment.InMemoryImages`` + ``tlkit.augment.device_loader``).
The model-only rate repeats one batch already on the device. Every dataset given is measured in the same run,
one after the other, so the ratios compare like with like. Prints a table per dataset, then, last, the ratios:
in-memory over PIL for the loader alone and for the training loop, and each loop's share of the model-only
rate (the issue's target on a GPU: at least 80% for the in-memory pipeline).

    python bench/data_pipeline.py                                        # bundled clothing photos and digits, CPU, 128 px
    python bench/data_pipeline.py --dataset digits --image-size 64       # the 2026-11-23 row
    python bench/data_pipeline.py --device cuda --image-size 224 --workers 8
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

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


@dataclass
class PipelineRates:
    """Images/s measured for one dataset: the model alone, and each pipeline's loader alone and loader + model."""

    dataset: str
    decode_seconds: float
    model_only: float
    pil_loader: float
    pil_loop: float
    memory_loader: float
    memory_loop: float

    def rows(self) -> dict[str, float]:
        return {
            "model step alone (one batch on device)": self.model_only,
            "PIL loader: loader alone": self.pil_loader,
            "PIL loader: loader + model": self.pil_loop,
            "in-memory, on device: loader alone": self.memory_loader,
            "in-memory, on device: loader + model": self.memory_loop,
        }

    def ratios(self) -> str:
        return (f"{self.dataset}: in-memory / PIL: loader alone x{self.memory_loader / self.pil_loader:.2f}, "
                f"loader + model x{self.memory_loop / self.pil_loop:.2f}; loop share of the model-only rate: "
                f"PIL {100 * self.pil_loop / self.model_only:.0f}%, in-memory {100 * self.memory_loop / self.model_only:.0f}%")


def measure(dataset: str, args: argparse.Namespace, device: torch.device) -> PipelineRates:
    """Both pipelines on ``dataset``'s training split, feeding the same model (same start, same optimizer)."""
    splits = tlkit.load_dataset(dataset, data_root="data", seed=0)
    tlkit.set_seed(0)
    model = tlkit.freeze(tlkit.create_model(tlkit.models.OFFLINE_BACKBONE, len(splits.classes), "imagenet"), up_to=args.frozen_up_to)
    model.to(device).to(memory_format=torch.channels_last)  # as tlkit.fit runs it on every device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    norm = model.normalization

    pil = tlkit.make_loader(splits.train, tlkit.train_transform(args.image_size, norm, "basic"), args.batch_size,
                            shuffle=True, seed=0, num_workers=args.workers, pin_memory=device.type == "cuda")
    start = time.perf_counter()
    cached = tlkit.augment.InMemoryImages.from_dataset(splits.train, args.image_size)
    decode_seconds = time.perf_counter() - start
    on_device = tlkit.augment.device_loader(cached, args.batch_size, device,
                                            tlkit.augment.BatchTransform(norm, "basic", image_size=args.image_size),
                                            shuffle=True, seed=0)
    fixed = next(iter(on_device))
    print(f"{splits.name}: {len(splits.train)} train images at {args.image_size}px, batch {args.batch_size}, device {device}, "
          f"{args.workers} PIL workers, {torch.get_num_threads()} threads; decoding once into memory took "
          f"{decode_seconds:.2f}s ({cached.images.nbytes / 2**20:.1f} MiB of uint8)", flush=True)

    train_rate(model, optimizer, [fixed], device, 3)  # warm-up
    model_only = train_rate(model, optimizer, [fixed], device, args.steps)
    rates = PipelineRates(
        splits.name, decode_seconds, model_only,
        pil_loader=loader_rate(pil, device, args.steps), pil_loop=train_rate(model, optimizer, pil, device, args.steps),
        memory_loader=loader_rate(on_device, device, args.steps),
        memory_loop=train_rate(model, optimizer, on_device, device, args.steps),
    )
    for name, rate in rates.rows().items():
        print(f"  {name:42s} {rate:9.1f} images/s", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", default=["clothing", "digits"], help="registered names, measured in this order")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the PIL loader")
    parser.add_argument("--frozen-up-to", default="stage5", help="blocks up to this one stay frozen; the later ones train")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = tlkit.get_device(args.device)
    measured = [measure(dataset, args, device) for dataset in args.dataset]
    print()
    for rates in measured:
        print(rates.ratios())


if __name__ == "__main__":
    main()
