"""Augmentation presets (torchvision transforms v2), MixUp/CutMix batches, uint8 images augmented on the device.

Every preset starts from the same deterministic steps as the eval transform (resize the short side,
center-crop a square), then applies its random steps, then scales to [0, 1] and normalizes. Split this
way, the same random steps run either per item in the DataLoader (PIL path) or on a batch of cached
uint8 images on the GPU (``InMemoryImages`` + ``DeviceBatches``), and both paths give the same eval
tensors.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2

from .data import BatchesOf, LabeledImages, TransformedDataset, _array_to_rgb, make_loader
from .models import below_head_frozen
from .prefix_cache import AugmentationDisablesCacheWarning
from .transforms import Normalization, check_preset, normalize_steps, random_steps, reframe, reframing, resize_steps

MIXES = ("mixup", "cutmix", "mixup_or_cutmix")


# --- MixUp / CutMix ------------------------------------------------------------------------------


def batch_mix(mix: str, num_classes: int, alpha: float = 1.0) -> v2.Transform:
    """MixUp, CutMix or a random choice of the two per batch: (images, int labels) -> (mixed images, soft labels)."""
    makers = {
        "mixup": lambda: v2.MixUp(alpha=alpha, num_classes=num_classes),
        "cutmix": lambda: v2.CutMix(alpha=alpha, num_classes=num_classes),
        "mixup_or_cutmix": lambda: v2.RandomChoice(
            [v2.MixUp(alpha=alpha, num_classes=num_classes), v2.CutMix(alpha=alpha, num_classes=num_classes)]
        ),
    }
    if mix not in makers:
        raise ValueError(f"Unknown mix {mix!r}; choose one of: {', '.join(MIXES)} (or None for no mixing).")
    return makers[mix]()


def _collate_and_mix(mix: Callable, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    return mix(*default_collate(batch))


def mix_collate(mix: Callable) -> Callable[[list], tuple[torch.Tensor, torch.Tensor]]:
    """A DataLoader ``collate_fn`` that stacks a batch and then applies the batch transform ``mix``."""
    return functools.partial(_collate_and_mix, mix)


def augmented_loader(
    ds: Dataset,
    transform: Callable,
    batch_size: int,
    *,
    seed: int = 0,
    mix: str | None = None,
    num_classes: int | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """A shuffled training loader (order fixed by ``seed``) that applies ``transform`` per item and optionally MixUp/CutMix per batch."""
    if mix is None:
        return make_loader(ds, transform, batch_size, shuffle=True, seed=seed, num_workers=num_workers)
    if num_classes is None:
        raise ValueError("MixUp/CutMix make one-hot soft labels: give num_classes=len(splits.classes).")
    return DataLoader(
        TransformedDataset(ds, transform),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=mix_collate(batch_mix(mix, num_classes)),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


# --- uint8 images in memory, augmented on the device ------------------------------------------------


class InMemoryImages(Dataset):
    """Every image decoded once, resized and center-cropped to ``image_size``, kept as one uint8 tensor (N, 3, S, S)."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], classes: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"InMemoryImages holds uint8 images of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}.")
        self.images = images
        self.labels = torch.as_tensor(list(targets), dtype=torch.long)
        self.classes = list(classes)

    @classmethod
    def from_dataset(cls, ds: LabeledImages, image_size: int) -> InMemoryImages:
        """Decode and resize every image of ``ds`` once (the eval transform's deterministic steps)."""
        prepare = v2.Compose(resize_steps(image_size))
        images = torch.stack([prepare(ds[i][0]).as_subclass(torch.Tensor) for i in range(len(ds))])
        return cls(images, ds.targets, ds.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    @property
    def targets(self) -> list[int]:
        """Label of every item, in item order."""
        return self.labels.tolist()


class BatchTransform:
    """uint8 batch (N, C, H, W) -> normalized float batch; random steps run per image, MixUp/CutMix per batch."""

    def __init__(
        self, norm: Normalization, preset: str = "none", *, image_size: int, hflip: bool = True, mix: Callable | None = None
    ) -> None:
        before, after = random_steps(preset, image_size, hflip=hflip)
        self.per_image = v2.Compose(before + normalize_steps(norm) + after) if before or after else None
        self.normalize = v2.Compose(normalize_steps(norm))
        self.mix = mix

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_image is None:
            x = self.normalize(images)
        else:
            # v2 draws one set of random parameters per call: a batched call would crop and flip
            # every image of the batch the same way, so each image gets its own call.
            x = torch.stack([self.per_image(image) for image in images])
        return self.mix(x, labels) if self.mix is not None else (x, labels)


class DeviceBatches(BatchesOf):
    """Wraps a loader of uint8 batches: moves each batch to ``device`` as uint8, then transforms it there."""

    def __init__(self, loader: DataLoader, device: torch.device | str, transform: BatchTransform) -> None:
        super().__init__(loader)
        self.device, self.transform = torch.device(device), transform

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            yield self.transform(images, labels)


def device_loader(
    images: InMemoryImages,
    batch_size: int,
    device: torch.device | str,
    transform: BatchTransform,
    *,
    shuffle: bool,
    seed: int = 0,
) -> DeviceBatches:
    """Batches of cached uint8 images, augmented and normalized on ``device`` (works on the CPU too)."""
    pin = torch.device(device).type == "cuda"
    return DeviceBatches(make_loader(images, None, batch_size, shuffle=shuffle, seed=seed, pin_memory=pin), device, transform)


def augment_on_device(on_device: bool | str, device: torch.device | str) -> bool:
    """Resolve ``on_device``: 'auto' means yes on a GPU (decoding once and augmenting there), no on the CPU."""
    if on_device == "auto":
        return torch.device(device).type == "cuda"
    if isinstance(on_device, bool):
        return on_device
    raise ValueError(f"on_device must be 'auto', True or False, got {on_device!r}.")


# --- cached features vs augmentation ---------------------------------------------------------------


def feature_cache_allowed(model: nn.Module, augment: str, *, mix: str | None = None, cache_features: bool = True) -> bool:
    """Whether the cached-feature fast path applies; warns when caching is asked for together with augmentation."""
    check_preset(augment)
    if not cache_features:
        return False
    if augment != "none" or mix is not None:
        warnings.warn(
            f"augment={augment!r}, mix={mix!r} with cached features: the cache would store one fixed view of each "
            "image, so every epoch would see the same pixels and the augmentation would do nothing. The "
            "cached-feature path is switched off; the backbone runs on fresh augmented images every epoch "
            "(slower). Use augment='none' to train on cached features.",
            AugmentationDisablesCacheWarning,
            stacklevel=2,
        )
        return False
    if not below_head_frozen(model):
        warnings.warn(
            "cache_features=True needs every block below the head frozen (trainable blocks change their "
            "features every step); training without the cache.",
            UserWarning,
            stacklevel=2,
        )
        return False
    return True


# --- a test set framed differently -----------------------------------------------------------------


def shifted_test_set(dataset: LabeledImages, size: int, *, seed: int = 0) -> LabeledImages:
    """``dataset``'s images re-framed once each (``tlkit.transforms.reframing(seed, i)``: zoom, shift, a small turn,
    a mirror half the time, colour changes), as ``size`` x ``size`` images with the same labels.

    The same ``dataset`` and ``seed`` give the same pixels on every run (a test checks it), so every arm is scored on
    the same shifted photos; the result is held in memory (3 bytes a pixel) and has a fingerprint, so scores over it
    can use the prefix cache like any dataset.
    """
    if len(dataset) == 0:
        raise ValueError("shifted_test_set: the dataset is empty; give it the test split (splits.test) or another split with images.")
    pixels = np.stack([np.asarray(reframe(dataset[i][0], reframing(seed, i), size)) for i in range(len(dataset))])
    return LabeledImages(functools.partial(_array_to_rgb, pixels), dataset.targets, dataset.classes)
