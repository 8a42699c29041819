"""What the feature cache and the prefix cache share: content fingerprints for their keys."""

from __future__ import annotations

import hashlib

import torch
from torch.utils.data import ConcatDataset, TensorDataset


def hash_tensor(h: hashlib._Hash, tensor: torch.Tensor) -> None:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    h.update(str((tuple(tensor.shape), tensor.dtype)).encode())
    h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def dataset_fingerprint(dataset) -> str | None:
    """A string that changes when the images or labels change; None when the dataset cannot tell."""
    if hasattr(dataset, "fingerprint"):
        return dataset.fingerprint()
    if isinstance(dataset, TensorDataset):
        h = hashlib.sha256()
        for tensor in dataset.tensors:
            hash_tensor(h, tensor)
        return h.hexdigest()
    if isinstance(dataset, ConcatDataset):  # e.g. new data + a replay sample (tlkit.incremental.with_replay)
        parts = [dataset_fingerprint(part) for part in dataset.datasets]
        return None if None in parts else hashlib.sha256("|".join(parts).encode()).hexdigest()
    return None

