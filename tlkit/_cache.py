"""The one disk cache behind the feature cache (features at the head's input) and the prefix cache (activations at a
block boundary): one key function over content fingerprints, one file path rule, one checked file format (tensors,
labels and a checksum, checked for count, shape and content when read), one way to save (write, or warn and go on
without the disk cache) and one read-or-compute step that ties them together."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, TensorDataset

from ._io import SaveError, torch_save_atomically, user_path


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


def content_key(file_format: bytes, description: str, weights: Iterable[tuple[str, torch.Tensor]], loader) -> str | None:
    """The disk-cache key of what ``loader``'s images become through some frozen weights: the file format, a
    ``description`` (model type, boundary, precision), the named ``weights`` that change the values, the loader's
    transform and the data's fingerprint. None if the data has no fingerprint (then nothing is cached on disk)."""
    base = getattr(loader.dataset, "base", loader.dataset)
    data = dataset_fingerprint(base)
    if data is None:
        return None
    h = hashlib.sha256(file_format)
    h.update(description.encode())
    for name, tensor in weights:
        h.update(name.encode())
        hash_tensor(h, tensor)
    h.update(repr(getattr(loader.dataset, "transform", None)).encode())
    h.update(data.encode())
    return h.hexdigest()[:32]


def cache_folder(cache_dir: str | os.PathLike) -> Path:
    """``cache_dir`` as a shell reads it (``~`` expanded), so a cache is found again where it was written."""
    return user_path(cache_dir)


# --- one checked file: (values, labels, {"format", "checksum"}) --------------------------------------


class DamagedCache(Exception):
    """A cache file that must not be used, and why (it is recomputed)."""


def checksum(file_format: bytes, values: torch.Tensor, labels: torch.Tensor) -> str:
    """The checksum written with a cache file: its format and the content of both tensors."""
    h = hashlib.sha256(file_format)
    hash_tensor(h, values)
    hash_tensor(h, labels)
    return h.hexdigest()


def checked_payload(file_format: bytes, values: torch.Tensor, labels: torch.Tensor) -> tuple:
    """What a cache file holds: the tensors and the checksum :func:`read_checked` verifies."""
    return values, labels, {"format": file_format.decode(), "checksum": checksum(file_format, values, labels)}


def _shape_text(count: int, item_shape: tuple[int | None, ...]) -> str:
    return str((count, *("D" if d is None else d for d in item_shape))).replace("'", "")


def read_checked(path: Path, file_format: bytes, *, count: int, item_shape: tuple[int | None, ...],
                 dtype: torch.dtype | None = None, what: str = "values") -> TensorDataset:
    """The (values, labels) in ``path`` if it is a ``file_format`` file of ``count`` items of ``item_shape`` (None: any
    length on that axis) and ``dtype``, whose content matches its checksum; else ``DamagedCache`` saying why."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a PyTorch file, refused by weights_only, unreadable
        raise DamagedCache(f"unreadable: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    if not (isinstance(raw, (tuple, list)) and len(raw) == 3 and isinstance(raw[2], dict)) or raw[2].get("format") != file_format.decode():
        raise DamagedCache(f"not a {file_format.decode()} file")
    values, labels, meta = raw
    if not isinstance(values, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise DamagedCache(f"no {what} or labels tensor")
    shape_fits = values.ndim == 1 + len(item_shape) and len(values) == count and all(
        want is None or got == want for got, want in zip(values.shape[1:], item_shape))
    if (dtype is not None and values.dtype != dtype) or not shape_fits:
        expected = f"{dtype if dtype is not None else 'any dtype'} {_shape_text(count, item_shape)}"
        raise DamagedCache(f"{what} are {values.dtype} {tuple(values.shape)}, expected {expected}")
    if labels.ndim == 0 or len(labels) != count:
        raise DamagedCache(f"{len(labels) if labels.ndim else 0} labels for {count} items")
    if meta.get("checksum") != checksum(file_format, values, labels):
        raise DamagedCache("its content does not match the checksum written with it")
    return TensorDataset(values, labels)


def cache_file_exists(path: Path) -> bool:
    """Whether ``path`` is there to read; a folder that cannot even be looked into counts as empty (recompute)."""
    try:
        return path.is_file()
    except OSError:
        return False


# --- saving: write, or warn and go on -----------------------------------------------------------------


_unsaved: set[tuple[Path, str]] = set()  # (folder, reason) already warned about in this process


def save_or_warn(payload: object, path: Path, what: str, *, stacklevel: int = 2) -> bool:
    """Write ``payload`` to ``path`` atomically; if that fails (unwritable folder, full disk) warn once per folder and
    reason, naming both and the fix, and go on: the values are fine, only the next run loses the shortcut. True if saved."""
    try:
        torch_save_atomically(payload, path)
        return True
    except SaveError as err:
        cause = err.__cause__ if isinstance(err.__cause__, OSError) else err
        key = (path.parent, cause.strerror or type(cause).__name__)
        if key not in _unsaved:
            _unsaved.add(key)
            warnings.warn(
                f"{err} The {what} are used, but not cached on disk: the next run computes them again "
                f"(cache_dir=None stops trying; this is said once per folder and reason).",
                UserWarning,
                stacklevel=stacklevel + 1,
            )
        return False


# --- the one read-or-compute step ------------------------------------------------------------------------


def cache_path(cache_dir: str | os.PathLike | None, stem: str, key: Callable[[], str | None], dataset: object, what: str,
               *, stacklevel: int = 2) -> Path | None:
    """``cache_dir/<stem>-<key>.pt``, or None when nothing is cached on disk: no ``cache_dir``, or data without a
    fingerprint (said in a warning naming the dataset's type)."""
    if cache_dir is None:
        return None
    found = key()
    if found is None:
        warnings.warn(f"{type(dataset).__name__} has no fingerprint: its {what} are not cached on disk.", stacklevel=stacklevel + 1)
        return None
    return cache_folder(cache_dir) / f"{stem}-{found}.pt"


def load_or_compute(path: Path | None, file_format: bytes, compute: Callable[[], TensorDataset],
                    expected: Callable[[], tuple[int, tuple[int | None, ...], torch.dtype | None]], *,
                    cache_name: str, what: str, saved_as: str, stacklevel: int = 2) -> tuple[TensorDataset, bool]:
    """The (values, labels) stored at ``path`` if they pass :func:`read_checked` against ``expected()`` (count, item
    shape, dtype; asked only when there is a file), else ``compute()``, then saved there (:func:`save_or_warn`).
    A damaged or altered file is recomputed, never trusted, with a warning naming it. Also says whether it was read."""
    if path is not None and cache_file_exists(path):
        count, item_shape, dtype = expected()
        try:
            return read_checked(path, file_format, count=count, item_shape=item_shape, dtype=dtype, what=what), True
        except DamagedCache as err:
            warnings.warn(f"Ignoring the damaged {cache_name} {path} ({err}); computing the {what} again.", stacklevel=stacklevel + 1)
    computed = compute()
    if path is not None:
        save_or_warn(checked_payload(file_format, *computed.tensors), path, saved_as, stacklevel=stacklevel + 1)
    return computed, False
