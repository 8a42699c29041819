"""Whole training recipes in one call, for comparisons and batch runs."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .data import DatasetSplits, eval_transform, make_loader
from .feature_store import cached_features
from .models import TransferModel, create_model, freeze, parameter_counts, unfreeze
from .prefix_cache import PrefixCacheStats, evaluate_from_prefix
from .train import Callback, FitState, History, below_head_frozen, evaluate, fit, fit_head, set_seed


@dataclass
class RunResult:
    """What one recipe produced: the trained model, its history and the figures to compare."""

    name: str
    model: TransferModel
    history: History
    seconds: float
    trainable_params: int
    prefix_cache: PrefixCacheStats | None = None  # what run_strategy(prefix_cache=True)'s cache did; None: no cache

    @property
    def val_acc(self) -> float:
        """Validation accuracy after the last epoch (not the best epoch: that would be picked on val)."""
        return self.history.val_acc[-1]

    def row(self) -> dict[str, float | int | str]:
        """One table row: name, trainable parameters, seconds, final val accuracy."""
        return {
            "run": self.name,
            "trainable params": self.trainable_params,
            "train seconds": round(self.seconds, 1),
            "val acc": round(self.val_acc, 4),
        }


def train_head_on_features(
    model: TransferModel,
    splits: DatasetSplits,
    image_size: int,
    *,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int,
    device: torch.device | str = "cpu",
    val_batch_size: int | None = None,
    progress: bool = False,
    callbacks: Sequence[Callback | Callable[[FitState], None]] = (),
    cache_dir: str | Path | None = None,
) -> History:
    """Run ``model``'s frozen backbone once over both splits (eval transform), then train its head on those features.

    ``cache_dir``: keep the features on disk there (``tlkit.cached_features``), so runs that share a backbone
    and images (e.g. the same validation split over several seeds) compute them once.
    """
    transform = eval_transform(image_size, model.normalization)
    features = functools.partial(cached_features, device=device, cache_dir=cache_dir, progress=progress)
    train = features(model, make_loader(splits.train, transform, batch_size, shuffle=False))
    val = features(model, make_loader(splits.val, transform, val_batch_size or batch_size, shuffle=False))
    history = fit_head(
        model, train, val, epochs=epochs, batch_size=batch_size, seed=seed, lr=lr,
        device=device, progress=progress, callbacks=callbacks,
    )
    model.to(device)  # the backbone stayed where extraction put it; keep model and head together
    return history


def linear_probe(
    splits: DatasetSplits,
    *,
    backbone: str,
    weights: str | None,
    image_size: int,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int,
    device: torch.device | str = "cpu",
    name: str = "",
    progress: bool = False,
    callbacks: Sequence[Callback | Callable[[FitState], None]] = (),
    cache_dir: str | Path | None = None,
) -> RunResult:
    """Freeze the whole backbone, cache its features once (on disk too with ``cache_dir``), train a new linear head on them."""
    set_seed(seed)
    model = freeze(create_model(backbone, len(splits.classes), weights))
    start = time.perf_counter()
    history = train_head_on_features(
        model, splits, image_size, batch_size=batch_size, epochs=epochs, lr=lr, seed=seed,
        device=device, progress=progress, callbacks=callbacks, cache_dir=cache_dir,
    )
    seconds = time.perf_counter() - start
    return RunResult(name or f"{weights or 'random'} frozen + head", model, history, seconds, parameter_counts(model)["total"]["trainable"])


def train_all(
    splits: DatasetSplits,
    *,
    backbone: str,
    weights: str | None,
    image_size: int,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int,
    device: torch.device | str = "cpu",
    name: str = "",
    progress: bool = False,
    callbacks: Sequence[Callback | Callable[[FitState], None]] = (),
) -> RunResult:
    """Train every block of ``backbone`` (from ``weights``, or from random init when None) with a new head."""
    set_seed(seed)
    model = unfreeze(create_model(backbone, len(splits.classes), weights))
    transform = eval_transform(image_size, model.normalization)
    train_loader = make_loader(splits.train, transform, batch_size, shuffle=True, seed=seed)
    val_loader = make_loader(splits.val, transform, batch_size, shuffle=False)
    start = time.perf_counter()
    history = fit(
        model, train_loader, val_loader, epochs=epochs, lr=lr, device=device,
        progress=progress, callbacks=callbacks,
    )
    seconds = time.perf_counter() - start
    return RunResult(name or f"{weights or 'random'} init, all blocks train", model, history, seconds, parameter_counts(model)["total"]["trainable"])


def evaluate_on(
    model: TransferModel,
    dataset: Dataset,
    image_size: int,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``dataset`` with the eval transform (e.g. the test split, once at the end).

    A model whose blocks below the head are all frozen is evaluated on its backbone's features; one whose lower
    blocks are frozen, on the activations below its first trainable block (``evaluate_from_prefix``). Both are read
    from ``cache_dir`` when the same frozen blocks saw the same images before (e.g. the pretrained backbone of
    every seed), so scoring many runs on one test split runs the frozen blocks over it once.
    """
    transform = eval_transform(image_size, model.normalization)
    loader = make_loader(dataset, transform, batch_size, shuffle=False)
    if below_head_frozen(model):
        features = cached_features(model, loader, device, cache_dir=cache_dir, progress=False)
        return evaluate(model.head, make_loader(features, None, batch_size, shuffle=False), device)
    return evaluate_from_prefix(model, loader, device, cache_dir=cache_dir)
