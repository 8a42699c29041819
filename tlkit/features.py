"""Feature extraction (notebook 01): the frozen backbone runs once over the images, and its features are kept in
memory or on disk, keyed by backbone weights, transform and data, so a repeated run skips the backbone pass."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ._cache import dataset_fingerprint, hash_tensor
from .checkpoints import CheckpointSaveError, save_atomically
from .train import _amp_dtype, _channels_last_batch, _channels_last_model, _with_progress, with_classes_of
from .transforms import is_deterministic

# 2: (features, labels, {"format", "checksum"}): a checksum of the content, checked when read.
_FORMAT = b"tlkit-features-2"


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", *, progress: bool = True) -> TensorDataset:
    """Run everything below the head once over ``loader``: a TensorDataset of (features, labels) on the CPU."""
    if not is_deterministic(getattr(loader.dataset, "transform", None)):
        raise ValueError(
            "The loader's transform is random (augmentation): cached features would freeze one random "
            "view of each image. Use the eval transform for feature extraction, or train without caching."
        )
    device = torch.device(device)
    _channels_last_model(model).to(device).eval()
    amp_dtype = _amp_dtype(device)
    feats, labels = [], []
    for x, y in _with_progress(loader, "features", progress):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            feats.append(model.forward_features(_channels_last_batch(x.to(device, non_blocking=True))).float().cpu())
        labels.append(y)
    return with_classes_of(loader.dataset, TensorDataset(torch.cat(feats), torch.cat(labels)))



def features_key(model: nn.Module, loader: DataLoader) -> str | None:
    """The cache key of ``model``'s features over ``loader``: backbone weights, transform, data; None if the data has no fingerprint."""
    base = getattr(loader.dataset, "base", loader.dataset)
    data = dataset_fingerprint(base)
    if data is None:
        return None
    h = hashlib.sha256(_FORMAT)
    h.update(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        if not name.startswith("head."):  # the head does not change the features
            h.update(name.encode())
            hash_tensor(h, tensor)
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
            return with_classes_of(loader.dataset, _read_cache(path, len(loader.dataset), _feature_size(model)))
        except _DamagedCache as err:  # a damaged cache file is recomputed, never trusted
            warnings.warn(f"Ignoring the damaged feature cache {path} ({err}); computing the features again.", stacklevel=2)
    computed = extract_features(model, loader, device, progress=progress)
    features, labels = computed.tensors
    payload = (features, labels, {"format": _FORMAT.decode(), "checksum": _checksum(features, labels)})
    try:
        save_atomically(payload, path)
    except CheckpointSaveError as err:  # the features are fine; only the next run loses the shortcut
        warnings.warn(f"{err} The features are used, but not cached: the next run computes them again.", stacklevel=2)
    return computed


class _DamagedCache(Exception):
    """A feature cache file that must not be used, and why."""


def _checksum(features: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256(_FORMAT)
    hash_tensor(h, features)
    hash_tensor(h, labels)
    return h.hexdigest()


def _feature_size(model: nn.Module) -> int | None:
    """Length of the feature vector the head takes (what ``forward_features`` gives), None if unknown."""
    head = getattr(model, "head", None)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
    return linears[0].in_features if linears else None


def _read_cache(path: Path, count: int, size: int | None) -> TensorDataset:
    """The features in ``path`` if they are what this cache wrote for ``count`` items of ``size`` features; else _DamagedCache."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a PyTorch file, or refused by weights_only
        raise _DamagedCache(f"unreadable: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    if not (isinstance(raw, (tuple, list)) and len(raw) == 3 and isinstance(raw[2], dict)) or raw[2].get("format") != _FORMAT.decode():
        raise _DamagedCache(f"not a {_FORMAT.decode()} file")
    features, labels, meta = raw
    if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise _DamagedCache("no features or labels tensor")
    expected = f"({count}, {size if size is not None else 'D'})"
    if features.dtype != torch.float32 or features.ndim != 2 or len(features) != count or (size is not None and features.shape[1] != size):
        raise _DamagedCache(f"features are {features.dtype} {tuple(features.shape)}, expected torch.float32 {expected}")
    if len(labels) != count:
        raise _DamagedCache(f"{len(labels)} labels for {count} items")
    if meta.get("checksum") != _checksum(features, labels):
        raise _DamagedCache("its content does not match the checksum written with it")
    return TensorDataset(features, labels)
