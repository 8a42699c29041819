"""Benchmark: which image size do the bundled photos need? Accuracy and CPU seconds of notebook 01's recipe.

For each size, the pretrained frozen backbone + linear head (features computed once, head trained on them)
over several seeds, on the default data of the course (the bundled clothing photos, 20 images per class):

    python bench/image_size.py                       # 128, 160, 224 px; seeds 0, 1, 2
    python bench/image_size.py --sizes 128 160 --seeds 0 1

The bundled photos have a shorter side of 160 px, so 224 px upsamples them (it can still help: the
backbone was trained at 224 px). Prints one row per size, and last the size with the best accuracy per second.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import tlkit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="clothing")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 160, 224])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples-per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = tlkit.get_device(args.device)
    print(f"{args.dataset}, {args.samples_per_class} per class, seeds {args.seeds}, {args.epochs} head epochs, "
          f"device {device}, {torch.get_num_threads()} threads")
    print("| image size | val acc (mean ± std) | seconds per run (mean) | accuracy points per second |")
    print("| --- | --- | --- | --- |")
    rates = {}
    for size in args.sizes:
        accs, seconds = [], []
        for seed in args.seeds:
            splits = tlkit.load_dataset(args.dataset, seed=seed, samples_per_class=args.samples_per_class)
            config = tlkit.RunConfig(backbone="efficientnet_lite0", weights="imagenet", image_size=size, batch_size=32,
                                     epochs=args.epochs, lr=3e-3, seed=seed, device=device)
            run = tlkit.linear_probe(config, splits)
            accs.append(run.val_acc)
            seconds.append(run.seconds)
        mean, std, secs = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0, statistics.mean(seconds)
        rates[size] = 100 * mean / secs
        print(f"| {size} | {mean:.3f} ± {std:.3f} | {secs:.1f} | {rates[size]:.2f} |", flush=True)
    print(f"best accuracy per second: {max(rates, key=rates.get)} px")


if __name__ == "__main__":
    main()
