"""The prefix cache: activations at the input of the first trainable block, computed once, so training runs only
the blocks above them.

When the blocks below the first trainable one are frozen and in eval mode (``eval_frozen_blocks``), they map
an image to the same activations every epoch. With a deterministic transform those activations can be kept
(in memory, or on disk keyed like ``feature_store``), and each epoch then runs only the rest of the network on
them: the suffix shares the model's own parameters, so training it trains the model. The model's output on
cached activations equals its full forward pass up to float noise.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ._cache import cache_path, content_key, load_or_compute
from ._runtime import amp_dtype, channels_last_batch, with_progress
from .data import BatchesOf, make_loader
from .models import HEAD, TransferModel
from .train import evaluate
from .transforms import is_deterministic

POOL = "pool"
# 2: (activations, labels, {"format", "checksum"}), checked for count, shape and content when read (as the
# feature cache); version 1 files (no checksum) have other keys, so they are simply computed again.
_FORMAT = b"tlkit-prefix-2"
# Layers whose output depends on train/eval mode: a stage holding one is cacheable only while in eval mode.
_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


class AugmentationDisablesCacheWarning(UserWarning):
    """A cache (of features or of prefix activations) and random augmentation were both asked for; the cache is switched off."""



class PrefixCacheTooLargeError(ValueError):
    """The prefix cache would take more memory than the budget (``max_bytes``) allows."""


# --- where the model is cut ---------------------------------------------------------------------


def stages(model: TransferModel) -> list[tuple[str, nn.Module]]:
    """The modules ``model.forward`` runs, in order, by name: the feature blocks, "pool", "head"."""
    return [*model.features.named_children(), (POOL, model.pool), (HEAD, model.head)]


def _stage_names(model: TransferModel) -> list[str]:
    return [name for name, _ in stages(model)]


def _fixed(model: TransferModel, module: nn.Module) -> bool:
    """True if ``module`` gives the same output for the same input during training (so its output can be cached)."""
    params = list(module.parameters())
    if params:
        # frozen blocks run in eval mode only while eval_frozen_blocks is on (bn="train" turns it off)
        return model.eval_frozen_blocks and not any(p.requires_grad for p in params)
    return not any(isinstance(m, _MODE_DEPENDENT) for m in module.modules())  # e.g. pooling: no parameters


def prefix_boundary(model: TransferModel) -> str | None:
    """The stage whose input is cached: the first one that trains (or runs in train mode); None when there is nothing below it.

    Every stage below it is frozen and runs in eval mode, so its output is the same every epoch. With only the
    head training this is "head" (the pooled features, as the feature cache); with a new conv block, "pool".
    """
    for i, (name, module) in enumerate(stages(model)):
        if name == HEAD or not _fixed(model, module):
            return name if i > 0 else None
    return None  # unreachable: the head is the last stage


def _check_boundary(model: TransferModel, boundary: str) -> int:
    names = _stage_names(model)
    if boundary not in names:
        raise ValueError(f"Unknown boundary {boundary!r} for {model.backbone}; valid stage names, in order: {names}.")
    return names.index(boundary)


def forward_from(model: TransferModel, boundary: str, x: torch.Tensor) -> torch.Tensor:
    """Run ``model`` from the input of stage ``boundary`` to the logits (the suffix of ``model.forward``)."""
    start = _check_boundary(model, boundary)
    for _, module in stages(model)[start:]:
        x = module(x)
    return x


def forward_prefix(model: TransferModel, boundary: str, x: torch.Tensor) -> torch.Tensor:
    """Run ``model`` from the images up to the input of stage ``boundary`` (the activations the cache keeps)."""
    return _run_stages(model, 0, _check_boundary(model, boundary), x)


def _run_stages(model: TransferModel, start: int, stop: int, x: torch.Tensor) -> torch.Tensor:
    for _, module in stages(model)[start:stop]:
        x = module(x)
    return x


# --- size and budget ---------------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    """``n`` bytes as a short text in decimal units (12.3 MB)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


@dataclass(frozen=True)
class ActivationSize:
    """The shape and dtype of one image's cached activations, and what a set of them takes."""

    boundary: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    images: int

    @property
    def bytes_per_image(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.bytes_per_image * self.images

    def describe(self, images: str | None = None) -> str:
        """E.g. "activations at the input of 'stage7' (192x5x5 float32, 19.2 KB per image) for 341 images: 6.5 MB"."""
        dims = "x".join(map(str, self.shape))
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"activations at the input of {self.boundary!r} ({dims} {dtype}, {format_bytes(self.bytes_per_image)} "
                f"per image) for {images or self.images} images: {format_bytes(self.nbytes)}")


@torch.no_grad()
def activation_size(model: TransferModel, dataset: Dataset, device: torch.device | str = "cpu", *, boundary: str | None = None) -> ActivationSize:
    """What caching ``dataset`` at ``boundary`` (default: ``prefix_boundary(model)``) would take: one image goes through the prefix."""
    boundary = _resolved_boundary(model, boundary)
    device = torch.device(device)
    x = dataset[0][0].unsqueeze(0).to(device)
    with _eval_mode(model), _autocast(device):
        out = forward_prefix(model, boundary, x)
    return ActivationSize(boundary, tuple(out.shape[1:]), out.dtype, len(dataset))


def prefix_cache_bytes(model: TransferModel, loader: DataLoader, device: torch.device | str = "cpu", *, boundary: str | None = None) -> int:
    """Bytes the prefix cache of ``loader``'s images would take at ``boundary`` (default: ``prefix_boundary(model)``)."""
    return activation_size(model, loader.dataset, device, boundary=boundary).nbytes


def describe_sizes(sizes: list[ActivationSize]) -> str:
    """One text for the activations of several datasets at one boundary (e.g. train + val)."""
    first = sizes[0]
    if len(sizes) == 1 or any((s.boundary, s.shape, s.dtype) != (first.boundary, first.shape, first.dtype) for s in sizes):
        return " + ".join(s.describe() for s in sizes)
    images = " + ".join(str(s.images) for s in sizes)
    together = ActivationSize(first.boundary, first.shape, first.dtype, sum(s.images for s in sizes))
    return together.describe(images)


def check_budget(sizes: list[ActivationSize], max_bytes: float | None) -> None:
    """Raise ``PrefixCacheTooLargeError`` naming the size, the budget and the fixes when ``sizes`` exceed ``max_bytes``."""
    total = sum(s.nbytes for s in sizes)
    if max_bytes is None or total <= max_bytes:
        return
    first = sizes[0]
    raise PrefixCacheTooLargeError(
        f"The prefix cache would take {format_bytes(total)} ({describe_sizes(sizes)}), over the "
        f"memory budget max_bytes={format_bytes(max_bytes)}. Fixes: raise max_bytes if the machine has the memory; "
        f"freeze more blocks so the boundary ({first.boundary!r}) moves up to smaller activations; use a smaller "
        f"image_size or fewer images; or train without the prefix cache (prefix_cache=False)."
    )


def _budget_text(max_bytes: float | None) -> str:
    return "no budget given" if max_bytes is None else f"budget {format_bytes(max_bytes)}"


# --- computing and storing the activations -----------------------------------------------------------


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for a block of code, its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _autocast(device: torch.device):
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _resolved_boundary(model: TransferModel, boundary: str | None) -> str:
    boundary = prefix_boundary(model) if boundary is None else boundary
    if boundary is None:
        raise ValueError(
            "Nothing to cache: the first stage of the model trains (or runs in train mode, bn='train'). Freeze the "
            "blocks below the ones you train (tlkit.freeze(model, up_to=...)), keep eval_frozen_blocks=True, or "
            "train without the prefix cache."
        )
    _check_boundary(model, boundary)
    return boundary


def check_deterministic(loader: DataLoader) -> None:
    """Raise a ValueError when ``loader``'s transform is random: a cache would freeze one random view of each image."""
    if not is_deterministic(getattr(loader.dataset, "transform", None)):
        raise ValueError(
            "The loader's transform is random (augmentation): cached activations would freeze one random view of "
            "each image. Use the eval transform for the prefix cache, or train without it."
        )


def prefix_key(model: TransferModel, loader: DataLoader, boundary: str, device: torch.device | str = "cpu") -> str | None:
    """The disk-cache key of the activations at ``boundary`` over ``loader``: the weights below the boundary, the
    boundary, the transform, the data and the precision (autocast on a GPU); None if the data has no fingerprint."""
    prefix = ((f"{name}.{key}", tensor) for name, module in stages(model)[: _check_boundary(model, boundary)]
              for key, tensor in module.state_dict().items())  # only the frozen prefix changes these activations
    return content_key(_FORMAT, f"{type(model).__name__}|{boundary}|{amp_dtype(torch.device(device))}", prefix, loader)


@torch.no_grad()
def _compute(model: TransferModel, loader: DataLoader, boundary: str, device: torch.device, progress: bool) -> TensorDataset:
    stop = _check_boundary(model, boundary)
    _prefix_in_channels_last(model, stop)
    acts, labels = [], []
    with _eval_mode(model):
        for x, y in with_progress(loader, f"prefix up to {boundary}", progress):
            with _autocast(device):
                acts.append(_run_stages(model, 0, stop, channels_last_batch(x.to(device, non_blocking=True))).contiguous().cpu())
            labels.append(y)
    return TensorDataset(torch.cat(acts), torch.cat(labels))


def _prefix_in_channels_last(model: TransferModel, stop: int) -> None:
    """Put the (frozen) stages below ``stop`` in channels_last: their convolutions over images run faster so, on CPUs
    (oneDNN) as on GPUs (bench/channels_last.py). The stages above, which train on small maps, keep their layout, and the
    activations are handed on contiguous (the usual layout), for the cache and for those stages."""
    for _, module in stages(model)[:stop]:
        module.to(memory_format=torch.channels_last)



def _load_or_compute(model: TransferModel, loader: DataLoader, boundary: str, device: torch.device,
                     cache_dir: str | Path | None, progress: bool, size: ActivationSize | None = None) -> tuple[TensorDataset, bool]:
    """The activations at ``boundary`` and whether they came from disk (``size``: what they should be, if known)."""
    path = cache_path(cache_dir, "prefix", lambda: prefix_key(model, loader, boundary, device), loader.dataset, "prefix activations", stacklevel=3)

    def expected() -> tuple[int, tuple[int, ...], torch.dtype]:
        found = size if size is not None else activation_size(model, loader.dataset, device, boundary=boundary)
        return found.images, found.shape, found.dtype

    return load_or_compute(path, _FORMAT, lambda: _compute(model, loader, boundary, device, progress), expected,
                           cache_name="prefix cache", what="activations", saved_as="prefix activations", stacklevel=3)


def cached_prefix(
    model: TransferModel,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    *,
    boundary: str | None = None,
    cache_dir: str | Path | None = None,
    max_bytes: float | None = None,
    progress: bool = True,
) -> TensorDataset:
    """(activation, label) pairs at the input of ``boundary`` (default: ``prefix_boundary(model)``) for every item of ``loader``.

    The size is printed before anything is computed, and a ``PrefixCacheTooLargeError`` is raised when it is over
    ``max_bytes``. With ``cache_dir`` the activations are read from / written to disk, keyed by the weights below
    the boundary, the boundary, the transform and the data. Train on them with ``forward_from(model, boundary, x)``
    or ``SuffixModel``.
    """
    check_deterministic(loader)
    boundary = _resolved_boundary(model, boundary)
    device = torch.device(device)
    model.to(device)
    size = activation_size(model, loader.dataset, device, boundary=boundary)
    print(f"Prefix cache: {describe_sizes([size])} ({_budget_text(max_bytes)}).", flush=True)
    check_budget([size], max_bytes)
    return _load_or_compute(model, loader, boundary, device, cache_dir, progress, size)[0]


# --- training on cached activations ------------------------------------------------------------------


class CachedItems(Dataset):
    """Items of ``source`` (transformed images), or the cached activations standing in for them.

    A DataLoader over it keeps its sampler and shuffling generator when the cache is rebuilt at another
    boundary or dropped, so training sees the same batches either way.
    """

    def __init__(self, source: Dataset) -> None:
        self.source = source
        self.activations: TensorDataset | None = None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        return self.source[i] if self.activations is None else self.activations[i]


@dataclass
class PrefixCacheStats:
    """What the prefix cache did in one run: the boundaries it cached at, how long the prefix passes took, its size."""

    boundaries: list[str | None] = field(default_factory=list)  # in order; None: ran from the images
    prefix_seconds: float = 0.0  # computing (or reading) activations, all builds together
    builds: int = 0
    from_disk: int = 0  # builds read from cache_dir
    peak_bytes: int = 0

    def summary(self) -> str:
        """One line for a notebook or a log."""
        where = " -> ".join("images" if b is None else repr(b) for b in self.boundaries) or "(not built)"
        disk = f", {self.from_disk} read from disk" if self.from_disk else ""
        return (f"prefix cache at the input of {where}: {self.builds} build(s){disk} in {self.prefix_seconds:.1f} s, "
                f"at most {format_bytes(self.peak_bytes)}")


class PrefixCache:
    """Cached activations at the model's prefix boundary for several loaders, and the suffix model that trains on them.

    ``loaders`` maps a name ("train", "val") to a loader over the images in a fixed order (shuffle=False, the eval
    transform). ``loader(name, ...)`` gives batches of activations (or of images, where no cache applies) with
    ``make_loader``'s seeded shuffling, so the batches match those of the same loader over the images;
    ``suffix`` is the module to give to ``fit``. ``report`` prints the size of each build (``stats`` keeps it too).

    The cache follows the model: whenever the suffix is put in train or eval mode (``fit`` does so every epoch),
    it checks ``prefix_boundary(model)``. When a block below the boundary was unfrozen (gradual unfreezing, the
    freeze panel) the activations are computed again at the new, lower boundary; when blocks above it were
    frozen, the cached activations are run through them; when nothing can be cached any more, the images are used.
    """

    def __init__(
        self,
        model: TransferModel,
        loaders: Mapping[str, DataLoader],
        device: torch.device | str = "cpu",
        *,
        cache_dir: str | Path | None = None,
        max_bytes: float | None = None,
        progress: bool = True,
        report: bool = True,
    ) -> None:
        for loader in loaders.values():
            check_deterministic(loader)
        self.model, self.loaders, self.device = model, dict(loaders), torch.device(device)
        self.cache_dir, self.max_bytes, self.progress, self.report = cache_dir, max_bytes, progress, report
        self.items = {name: CachedItems(loader.dataset) for name, loader in self.loaders.items()}
        self.boundary: str | None = None
        self._refused: set[str] = set()  # boundaries whose activations were over max_bytes
        self.stats = PrefixCacheStats()
        self.suffix = SuffixModel(model, self)
        model.to(self.device)
        self._build(_resolved_boundary(model, None), on_budget="raise")

    def loader(self, name: str, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
        """A ``make_loader`` over the cached items of ``name`` (same batches as the same call over the images)."""
        return make_loader(self.items[name], None, batch_size, shuffle=shuffle, seed=seed)

    @property
    def nbytes(self) -> int:
        """Bytes the cached activations take now."""
        return sum(item.activations.tensors[0].nbytes for item in self.items.values() if item.activations is not None)

    def refresh(self) -> bool:
        """Follow the model's prefix boundary; True if the cache changed."""
        boundary = prefix_boundary(self.model)
        if boundary in self._refused:
            boundary = None  # over the budget once: not tried again every epoch
        if boundary == self.boundary:
            return False
        names = _stage_names(self.model)
        if boundary is not None and self.boundary is not None and names.index(boundary) > names.index(self.boundary):
            self._advance(boundary)
        else:
            self._build(boundary, on_budget="warn")
        return True

    def __call__(self, state=None) -> None:
        """``fit(callbacks=[cache])``: refresh after an epoch (the suffix also refreshes on its own at the next one)."""
        self.refresh()

    def _sizes(self, boundary: str) -> list[ActivationSize]:
        return [activation_size(self.model, loader.dataset, self.device, boundary=boundary) for loader in self.loaders.values()]

    def _build(self, boundary: str | None, *, on_budget: str) -> None:
        sizes: list[ActivationSize | None] = [None] * len(self.loaders)
        if boundary is not None:
            sizes = self._sizes(boundary)
            if self.report:
                print(f"Prefix cache: {describe_sizes(sizes)} ({_budget_text(self.max_bytes)}).", flush=True)
            try:
                check_budget(sizes, self.max_bytes)
            except PrefixCacheTooLargeError as err:
                if on_budget == "raise":
                    raise
                warnings.warn(f"{err} Training goes on from the images.", UserWarning, stacklevel=4)
                self._refused.add(boundary)
                boundary = None
        start = time.perf_counter()
        for (name, loader), size in zip(self.loaders.items(), sizes):
            self.items[name].activations = None  # free the old activations before computing the new ones
            if boundary is not None:
                acts, from_disk = _load_or_compute(self.model, loader, boundary, self.device, self.cache_dir, self.progress, size)
                self.items[name].activations = acts
                self.stats.from_disk += from_disk
        self._finish(boundary, start)

    @torch.no_grad()
    def _advance(self, boundary: str) -> None:
        """Blocks above the old boundary were frozen: run the cached activations through them instead of the images."""
        names = _stage_names(self.model)
        start, stop = names.index(self.boundary), names.index(boundary)
        begin = time.perf_counter()
        with _eval_mode(self.model), _autocast(self.device):
            for item in self.items.values():
                acts, labels = item.activations.tensors
                out = [_run_stages(self.model, start, stop, chunk.to(self.device)).cpu() for chunk in acts.split(64)]
                item.activations = TensorDataset(torch.cat(out), labels)
        self._finish(boundary, begin)

    def _finish(self, boundary: str | None, start: float) -> None:
        self.boundary = boundary
        self.stats.boundaries.append(boundary)
        self.stats.builds += boundary is not None
        self.stats.prefix_seconds += time.perf_counter() - start
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.nbytes)


class SuffixModel(nn.Module):
    """``model`` run from the cache's boundary up: the same parameters, so training it trains ``model``.

    Its input is what the cache's loaders give: activations at ``cache.boundary``, or images when that is None.
    Putting it in train or eval mode (``fit`` does every epoch) first lets the cache follow the model's boundary.
    """

    def __init__(self, model: TransferModel, cache: PrefixCache) -> None:
        super().__init__()
        self.model = model
        self.cache = cache  # a plain attribute, not a submodule

    @property
    def boundary(self) -> str | None:
        return self.cache.boundary

    def train(self, mode: bool = True) -> SuffixModel:
        super().train(mode)
        self.cache.refresh()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if self.boundary is None else forward_from(self.model, self.boundary, x)

    # A checkpoint written while training the suffix must hold the whole model, loadable without the cache.
    @property
    def backbone(self) -> str:
        return self.model.backbone

    @property
    def weights(self) -> str | None:
        return getattr(self.model, "weights", None)

    @property
    def head(self) -> nn.Module:
        return self.model.head

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)


class PrefixBatches(BatchesOf):
    """The batches of ``loader`` (e.g. augmented images) run through the frozen blocks below ``cache.boundary`` as they come.

    A random transform rules out caching the training images' activations (every epoch brings new views), but
    the validation images can still be cached: ``fit(cache.suffix, PrefixBatches(train_loader, cache),
    cache.loader("val", ...))`` then trains exactly as ``fit(model, train_loader, val_loader)`` does, while the
    frozen blocks run once over the validation images instead of every epoch.
    """

    def __init__(self, loader: DataLoader, cache: PrefixCache) -> None:
        super().__init__(loader)
        self.cache = cache

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        model, device = self.cache.model, self.cache.device
        for x, y in self.loader:
            boundary = self.cache.boundary
            if boundary is not None:  # frozen blocks run in eval mode (eval_frozen_blocks), so this is their training output
                _prefix_in_channels_last(model, _check_boundary(model, boundary))
                with torch.no_grad(), _autocast(device):
                    x = forward_prefix(model, boundary, channels_last_batch(x.to(device, non_blocking=True))).contiguous()
            yield x, y


class Suffix(nn.Module):
    """``model`` run from the input of stage ``boundary`` up (``forward_from``), as a module: same parameters."""

    def __init__(self, model: TransferModel, boundary: str) -> None:
        super().__init__()
        _check_boundary(model, boundary)
        self.model, self.boundary = model, boundary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_from(self.model, self.boundary, x)


def prefix_activations(
    model: TransferModel, loader: DataLoader, device: torch.device | str = "cpu", *, cache_dir: str | Path | None = None
) -> tuple[Suffix, DataLoader] | None:
    """The suffix of ``model`` above its frozen blocks and a loader of ``loader``'s activations at that boundary
    (read from ``cache_dir`` when the same frozen blocks saw the same images), in ``loader``'s order and batch size;
    None when nothing below the first trainable block is frozen. For scoring: ``evaluate(*prefix_activations(...))``."""
    boundary = prefix_boundary(model)
    if boundary is None:
        return None
    check_deterministic(loader)
    device = torch.device(device)
    model.to(device)
    acts, _ = _load_or_compute(model, loader, boundary, device, cache_dir, progress=False)
    return Suffix(model, boundary), make_loader(acts, None, loader.batch_size, shuffle=False)


def evaluate_from_prefix(
    model: TransferModel, loader: DataLoader, device: torch.device | str = "cpu", *, cache_dir: str | Path | None = None
) -> dict[str, float]:
    """``evaluate(model, loader)`` with the frozen blocks run once per image set (``prefix_activations``): same numbers
    up to float noise; many runs scored on one split with ``cache_dir`` pass the frozen blocks over it once."""
    cached = prefix_activations(model, loader, device, cache_dir=cache_dir)
    return evaluate(model, loader, device) if cached is None else evaluate(*cached, device)


# --- when it applies ---------------------------------------------------------------------------------


def prefix_cache_allowed(model: TransferModel, train_transform: Callable | None) -> bool:
    """Whether the prefix cache applies: something below the first trainable block to cache, and a deterministic train
    transform. A random transform (augmentation) warns with ``AugmentationDisablesCacheWarning``."""
    if not is_deterministic(train_transform):
        warnings.warn(
            "A random train transform (augmentation) with the prefix cache: the cache would store one fixed view of "
            "each image, so every epoch would see the same pixels and the augmentation would do nothing. The prefix "
            "cache is switched off; the frozen blocks run on fresh augmented images every epoch (slower). Use the "
            "eval transform (augment='none') to train on cached activations.",
            AugmentationDisablesCacheWarning,
            stacklevel=2,
        )
        return False
    return prefix_boundary(model) is not None
