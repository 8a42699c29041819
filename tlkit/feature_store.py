"""Backbone features kept on disk, keyed by backbone weights, transform and data, so a repeated run skips the backbone pass."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .checkpoints import save_atomically
from .train import extract_features

_FORMAT = b"tlkit-features-1"


def _hash_tensor(h: "hashlib._Hash", tensor: torch.Tensor) -> None:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    h.update(str((tuple(tensor.shape), tensor.dtype)).encode())
    h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def _dataset_fingerprint(dataset) -> str | None:
    """A string that changes when the images or labels change; None when the dataset cannot tell."""
    if hasattr(dataset, "fingerprint"):
        return dataset.fingerprint()
    if isinstance(dataset, TensorDataset):
        h = hashlib.sha256()
        for tensor in dataset.tensors:
            _hash_tensor(h, tensor)
        return h.hexdigest()
    return None


def features_key(model: nn.Module, loader: DataLoader) -> str | None:
    """The cache key of ``model``'s features over ``loader``: backbone weights, transform, data; None if the data has no fingerprint."""
    base = getattr(loader.dataset, "base", loader.dataset)
    data = _dataset_fingerprint(base)
    if data is None:
        return None
    h = hashlib.sha256(_FORMAT)
    h.update(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        if not name.startswith("head."):  # the head does not change the features
            h.update(name.encode())
            _hash_tensor(h, tensor)
    h.update(repr(getattr(loader.dataset, "transform", None)).encode())
    h.update(data.encode())
    return h.hexdigest()[:32]


def cached_features(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    *,
    cache_dir: str | Path | None,
    progress: bool = True,
) -> TensorDataset:
    """``extract_features``, but read from ``cache_dir`` when the same backbone, transform and data were seen before."""
    key = None if cache_dir is None else features_key(model, loader)
    if key is None:
        if cache_dir is not None:
            warnings.warn(f"{type(loader.dataset).__name__} has no fingerprint: its features are not cached on disk.", stacklevel=2)
        return extract_features(model, loader, device, progress=progress)
    path = Path(cache_dir) / f"features-{key}.pt"
    if path.exists():
        try:
            features, labels = torch.load(path, weights_only=True)
            return TensorDataset(features, labels)
        except Exception as err:  # a damaged cache file is recomputed, never trusted
            warnings.warn(f"Ignoring the damaged feature cache {path} ({err}); computing the features again.", stacklevel=2)
    computed = extract_features(model, loader, device, progress=progress)
    save_atomically(tuple(computed.tensors), path)
    return computed
