"""Feature extraction (notebook 01): the frozen backbone runs once over the images, and its features are kept in
memory or on disk, keyed by backbone weights, transform and data, so a repeated run skips the backbone pass."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ._cache import (
    DamagedCache,
    cache_file_exists,
    cache_folder,
    checked_payload,
    content_key,
    read_checked,
    save_or_warn,
)
from ._runtime import amp_dtype, channels_last_batch, channels_last_model, with_progress
from .train import with_classes_of
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
    channels_last_model(model).to(device).eval()
    dtype = amp_dtype(device)
    feats, labels = [], []
    for x, y in with_progress(loader, "features", progress):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            feats.append(model.forward_features(channels_last_batch(x.to(device, non_blocking=True))).float().cpu())
        labels.append(y)
    return with_classes_of(loader.dataset, TensorDataset(torch.cat(feats), torch.cat(labels)))



def features_key(model: nn.Module, loader: DataLoader) -> str | None:
    """The cache key of ``model``'s features over ``loader``: backbone weights, transform, data; None if the data has no fingerprint."""
    backbone = ((name, tensor) for name, tensor in model.state_dict().items() if not name.startswith("head."))  # the head does not change them
    return content_key(_FORMAT, type(model).__name__, backbone, loader)


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
    path = cache_folder(cache_dir) / f"features-{key}.pt"
    if cache_file_exists(path):
        try:
            stored = read_checked(path, _FORMAT, count=len(loader.dataset), item_shape=(_feature_size(model),),
                                  dtype=torch.float32, what="features")
            return with_classes_of(loader.dataset, stored)
        except DamagedCache as err:  # a damaged cache file is recomputed, never trusted
            warnings.warn(f"Ignoring the damaged feature cache {path} ({err}); computing the features again.", stacklevel=2)
    computed = extract_features(model, loader, device, progress=progress)
    save_or_warn(checked_payload(_FORMAT, *computed.tensors), path, "features", stacklevel=2)
    return computed


def _feature_size(model: nn.Module) -> int | None:
    """Length of the feature vector the head takes (what ``forward_features`` gives), None if unknown."""
    head = getattr(model, "head", None)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
    return linears[0].in_features if linears else None
