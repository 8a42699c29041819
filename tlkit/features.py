"""Feature extraction (notebook 01): the frozen backbone runs once over the images, and its features are kept in
memory or on disk, keyed by backbone weights, transform and data, so a repeated run skips the backbone pass.
Also the two baselines notebook 01 places the pretrained features against: a k-nearest-neighbour vote on those
features (a head with no training) and a model whose "features" are the downsampled pixels themselves."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ._cache import cache_path, content_key, load_or_compute
from ._runtime import amp_dtype, channels_last_batch, channels_last_model, with_progress
from .models import TransferModel
from .train import with_classes_of
from .transforms import Normalization, is_deterministic

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
    """The cache key of ``model``'s features over ``loader``: backbone (name and weights), transform, data; None if the
    data has no fingerprint."""
    backbone = ((name, tensor) for name, tensor in model.state_dict().items() if not name.startswith("head."))  # the head does not change them
    return content_key(_FORMAT, f"{type(model).__name__}|{getattr(model, 'backbone', '')}", backbone, loader)


def cached_features(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    *,
    cache_dir: str | Path | None,
    progress: bool = True,
) -> TensorDataset:
    """``extract_features``, but read from ``cache_dir`` when the same backbone, transform and data were seen before.

    The same disk cache as the prefix cache's (``tlkit._cache``: key, checked file, atomic save), at the head's input."""
    path = cache_path(cache_dir, "features", lambda: features_key(model, loader), loader.dataset, "features")
    features, _ = load_or_compute(path, _FORMAT, lambda: extract_features(model, loader, device, progress=progress),
                                  lambda: (len(loader.dataset), (_feature_size(model),), torch.float32),
                                  cache_name="feature cache", what="features", saved_as="features")
    return with_classes_of(loader.dataset, features)


def _feature_size(model: nn.Module) -> int | None:
    """Length of the feature vector the head takes (what ``forward_features`` gives), None if unknown."""
    head = getattr(model, "head", None)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
    return linears[0].in_features if linears else None


class NearestNeighbours(nn.Module):
    """A head that trains nothing: the class most common among the ``k`` training feature vectors nearest to each input
    (cosine similarity), ties going to the class whose neighbours are nearer in sum. Its outputs are log vote shares,
    so accuracy, loss and ``evaluate_on`` work on it as on a linear head."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int = 5) -> None:
        super().__init__()
        if len(features) == 0 or k < 1:
            raise ValueError(f"NearestNeighbours needs at least one training vector and k >= 1 (got {len(features)} vectors, k={k}).")
        self.register_buffer("memory", nn.functional.normalize(features.float(), dim=1))
        self.register_buffer("labels", labels.long())
        self.num_classes, self.k = num_classes, min(k, len(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        similarity, nearest = (nn.functional.normalize(x.float(), dim=1) @ self.memory.T).topk(self.k, dim=1)
        votes = nn.functional.one_hot(self.labels[nearest], self.num_classes).float()  # (batch, k, classes)
        counts, closeness = votes.sum(1), (votes * similarity.unsqueeze(-1)).sum(1)
        shares = (counts + 1e-3 * closeness / self.k) / self.k  # the closeness term (< 1e-3) only breaks ties
        return shares.clamp_min(1e-6).log()


def pixel_model(num_classes: int, normalization: Normalization, *, size: int = 32) -> TransferModel:
    """A "backbone" with no weights: each image average-pooled to ``size`` x ``size`` and flattened (3 x size x size
    numbers), with a new linear head. How far a linear classifier gets on the photos without any learned features."""
    return TransferModel(nn.Sequential(nn.AdaptiveAvgPool2d(size)), nn.Flatten(), nn.Linear(3 * size * size, num_classes),
                         backbone=f"pixels{size}", weights=None, normalization=normalization, num_features=3 * size * size)


def nearest_mean_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> nn.Linear:
    """The nearest-class-mean classifier as a linear layer: logit ``2 mu_c . x - |mu_c|^2`` for each class's mean
    feature ``mu_c``, which ranks the classes as the squared Euclidean distance ``|x - mu_c|^2`` does (nearest first),
    ``|x|^2`` being the same for every class. It needs the class means only, not the images."""
    counts = torch.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes or not bool((counts > 0).all()):
        raise ValueError(f"Every class 0..{num_classes - 1} needs at least one feature vector; the counts per class are {counts.tolist()}.")
    means = torch.stack([features[labels == c].float().mean(0) for c in range(num_classes)])
    head = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(2 * means)
        head.bias.copy_(-(means**2).sum(1))
    return head
