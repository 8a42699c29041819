"""Benchmark: a comparison of arms over seeds in one process against the same comparison on worker processes.

Notebook 01's comparison (pretrained head, random-init head, nearest class mean; ``--seeds`` seeds) on the bundled
photos, with a warm feature cache (built by a first, untimed pass), so the time is what a rerun of the cell costs.
Run once with ``workers=1`` (one process, every core as its threads) and once with ``--workers`` processes (one
thread each on 2 cores); prints both times, whether the numbers agree, and, last, the speed-up.

    python bench/compare_workers.py                  # 2 workers, 5 seeds
    python bench/compare_workers.py --workers 4 --seeds 3
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import tlkit


def arms(config: tlkit.RunConfig, samples_per_class: int) -> dict:
    def data(seed: int) -> tlkit.DatasetSplits:
        return tlkit.load_dataset("clothing", seed=seed, samples_per_class=samples_per_class)

    return {
        "pretrained + head": lambda s: tlkit.linear_probe(config.replace(seed=s), data(s)),
        "random init + head": lambda s: tlkit.linear_probe(config.replace(seed=s, weights=None), data(s)),
        "nearest class mean": lambda s: tlkit.recipes.nearest_class_mean(config.replace(seed=s), data(s)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--samples-per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()

    seeds = list(range(args.seeds))
    with tempfile.TemporaryDirectory() as cache:
        config = tlkit.RunConfig(image_size=128, batch_size=32, epochs=args.epochs, lr=3e-3, cache_dir=cache)
        tlkit.compare_arms(arms(config, args.samples_per_class), seeds)  # warms the feature cache (untimed)
        timings, results = {}, {}
        for workers in (1, args.workers):
            start = time.perf_counter()
            results[workers] = tlkit.compare_arms(arms(config, args.samples_per_class), seeds, workers=workers)
            timings[workers] = time.perf_counter() - start
    same = all(abs(a["val_acc"] - b["val_acc"]) < 1e-6 for a, b in zip(results[1].rows, results[args.workers].rows))
    print(f"{len(seeds)} seeds x 3 arms, warm cache, torch threads in the main process: {torch.get_num_threads()}")
    print(f"workers=1: {timings[1]:.1f} s; workers={args.workers}: {timings[args.workers]:.1f} s; same val_acc per run: {same}")
    print(f"speed-up with {args.workers} workers: {timings[1] / timings[args.workers]:.2f}x")


if __name__ == "__main__":
    main()
