"""Shared fixtures: small image folders made on the fly, and a fixed thread count."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# make test runs two processes with OMP_NUM_THREADS=1; alone, tests use 2 threads like the notebooks.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

TOY_CLASSES = ["a", "b", "c", "d"]


def toy_tensors(seed: int = 0) -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    """64 train and 32 val random 32 px images whose 4 labels follow from their pixel means (learnable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 3, 32, 32, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean(dim=(1, 2)) > 0).long()
    return torch.utils.data.TensorDataset(x[:64], y[:64]), torch.utils.data.TensorDataset(x[64:], y[64:])


def toy_lite0():
    """EfficientNet-Lite0 (ImageNet) with a 4-class head, frozen up to stage6, same init every call."""
    import tlkit

    tlkit.set_seed(0)
    return tlkit.freeze(tlkit.create_model("efficientnet_lite0", 4, weights="imagenet"), up_to="stage6")


def write_images(folder: Path, n: int, color: tuple[int, int, int], seed: int, size: int = 24) -> None:
    """``n`` noisy images around ``color`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = np.clip(rng.normal(color, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """One folder of class folders (no train/val split): red 12, green 12, blue 12 images."""
    for k, (name, color) in enumerate({"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}.items()):
        write_images(tmp_path / "flat" / name, 12, color, seed=k)
    return tmp_path / "flat"


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """An ImageFolder root with train/ and val/."""
    for k, (name, color) in enumerate({"ants": (120, 60, 20), "bees": (220, 200, 40)}.items()):
        write_images(tmp_path / "split" / "train" / name, 8, color, seed=k)
        write_images(tmp_path / "split" / "val" / name, 4, color, seed=10 + k)
    return tmp_path / "split"
