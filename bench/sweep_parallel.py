"""Benchmark: a 4-run sweep with ``--workers 1`` and ``--workers 2`` on this machine; prints the speedup last.

The swept notebook (written to a temporary folder) trains a small conv net on random 32 px images with
batch 32 for a fixed number of steps, the kind of small-tensor CPU work the course notebooks do, so its
time is CPU-bound and follows OMP_NUM_THREADS. One worker runs the 4 runs one after another, each with
every core (OMP_NUM_THREADS = cores); two workers run two at a time with cores / 2 threads each, as
``python -m tlkit.sweep --workers 2`` does. Both sweeps go through ``tlkit.sweep.sweep`` in this process
(tlkit imported once), each into a fresh folder (no reuse), and the tables are checked to agree.

    python bench/sweep_parallel.py              # 4 runs of 200 steps each
    python bench/sweep_parallel.py --steps 100  # a quick look
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nbformat

from tlkit.sweep import available_cores, sweep

TRAIN_CELL = """\
import json, os, time
import torch
from torch import nn

torch.manual_seed(seed)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
start = time.perf_counter()
for _ in range(steps):
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
json.dump({"loss": loss.item(), "train_seconds": time.perf_counter() - start, "threads": torch.get_num_threads()},
          open(results_path, "w"))
"""


def write_notebook(folder: Path) -> Path:
    """The benchmark notebook: a ``parameters`` cell (seed, steps, and the paths a sweep sets), then the training cell."""
    parameters = nbformat.v4.new_code_cell("seed = 0\nsteps = 200\nresults_path = 'train.json'\noutput_dir = '.'\nprogress = True")
    parameters.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[parameters, nbformat.v4.new_code_cell(TRAIN_CELL)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "train.ipynb")
    return folder / "train.ipynb"


def timed_sweep(notebook: Path, out: Path, steps: int, workers: int):
    """Wall time and table of the 4-run sweep (seeds 0-3) with ``workers`` local workers."""
    start = time.perf_counter()
    table = sweep(notebook, {"steps": steps}, {"seed": [0, 1, 2, 3]}, out, workers=workers, verbose=False)
    return time.perf_counter() - start, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    args = parser.parse_args()
    cores = available_cores()
    # One worker runs in this process's kernels: give them every core, the cores / 1 that --workers 1 means.
    os.environ["OMP_NUM_THREADS"] = str(cores)
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        notebook = write_notebook(Path(tmp))
        serial_s, serial = timed_sweep(notebook, Path(tmp) / "workers1", args.steps, workers=1)
        parallel_s, parallel = timed_sweep(notebook, Path(tmp) / "workers2", args.steps, workers=2)
    for name, table in (("serial", serial), ("parallel", parallel)):
        if (table["status"] != "ok").any():
            raise SystemExit(f"the {name} sweep had failed runs: {table['error'].tolist()}")
    if (serial["loss"] - parallel["loss"]).abs().max() > 1e-4:
        print(f"note: the losses differ between the two sweeps (threads change float sums): {serial['loss'].tolist()} vs {parallel['loss'].tolist()}")
    print(f"{cores} cores; 4 runs of {args.steps} steps (conv net, batch 32, 32 px)")
    for name, seconds, table in (("--workers 1", serial_s, serial), ("--workers 2", parallel_s, parallel)):
        print(f"{name}: {seconds:6.1f} s in all; per run {table['seconds'].mean():.1f} s wall, "
              f"{table['train_seconds'].mean():.1f} s training on {int(table['threads'].iloc[0])} thread(s)")
    print(f"speedup {serial_s / parallel_s:.1f}x")


if __name__ == "__main__":
    main()
