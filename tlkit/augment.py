"""Augmentation presets (torchvision transforms v2), MixUp/CutMix batches, uint8 images augmented on the device.

Every preset starts from the same deterministic steps as the eval transform (resize the short side,
center-crop a square), then applies its random steps, then scales to [0, 1] and normalizes. Split this
way, the same random steps run either per item in the DataLoader (PIL path) or on a batch of cached
uint8 images on the GPU (``InMemoryImages`` + ``DeviceBatches``), and both paths give the same eval
tensors.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2

from .data import BatchesOf, DatasetSplits, LabeledImages, TransformedDataset, Upright, eval_transform, make_loader
from .feature_store import AugmentationDisablesCacheWarning
from .models import Normalization, block_names, create_model, freeze, parameter_counts
from .plots import show_images
from .prefix_cache import PrefixBatches, PrefixCache
from .recipes import RunResult, train_head_on_features
from .train import Callback, FitState, below_head_frozen, fit, set_seed

PRESETS = ("none", "basic", "strong", "trivialaugment", "randaugment")
MIXES = ("mixup", "cutmix", "mixup_or_cutmix")


# --- presets ------------------------------------------------------------------------------------


def check_preset(preset: str) -> str:
    """``preset`` if it is a known preset name, else a ValueError listing the valid ones."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown augmentation preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    return preset


def random_steps(preset: str, image_size: int, *, hflip: bool = True) -> tuple[list[v2.Transform], list[v2.Transform]]:
    """The random steps of ``preset``: (steps on uint8 images, steps after normalization)."""
    check_preset(preset)
    if preset == "none":
        return [], []
    crop = [v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True)]
    flip = [v2.RandomHorizontalFlip()] if hflip else []
    policy = {
        "basic": [],
        "strong": [v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05)],
        "trivialaugment": [v2.TrivialAugmentWide()],
        "randaugment": [v2.RandAugment(num_ops=2, magnitude=9)],
    }[preset]
    after = [v2.RandomErasing(p=0.25, scale=(0.02, 0.15))] if preset == "strong" else []
    return crop + flip + policy, after


def _resize_steps(image_size: int) -> list[v2.Transform]:
    # Upright first, as in eval_transform: a phone photo opened directly is turned as its EXIF tag says.
    return [Upright(), v2.ToImage(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]


def _normalize_steps(norm: Normalization) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(norm.mean), list(norm.std))]


def train_preset(image_size: int, norm: Normalization, preset: str = "basic", *, hflip: bool = True) -> v2.Compose:
    """PIL image -> normalized float tensor with ``preset``'s augmentation; 'none' is exactly the eval transform."""
    if check_preset(preset) == "none":
        return eval_transform(image_size, norm)
    before, after = random_steps(preset, image_size, hflip=hflip)
    return v2.Compose(_resize_steps(image_size) + before + _normalize_steps(norm) + after)


def preset_table(image_size: int, *, hflip: bool = True) -> dict[str, str]:
    """For each preset, its random steps by name (what it adds to the eval transform)."""
    table = {}
    for preset in PRESETS:
        before, after = random_steps(preset, image_size, hflip=hflip)
        table[preset] = " -> ".join(type(step).__name__ for step in before + after) or "(eval transform only)"
    return table


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
        prepare = v2.Compose(_resize_steps(image_size))
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
        self.per_image = v2.Compose(before + _normalize_steps(norm) + after) if before or after else None
        self.normalize = v2.Compose(_normalize_steps(norm))
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


# --- recipe ---------------------------------------------------------------------------------------


def fine_tune_augmented(
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
    augment: str = "basic",
    hflip: bool = True,
    mix: str | None = None,
    freeze_up_to: str | None = None,
    on_device: bool | str = "auto",
    cache_features: bool = False,
    prefix_cache: bool = False,
    cache_dir: str | Path | None = None,
    name: str = "",
    progress: bool = False,
    callbacks: Sequence[Callback | Callable[[FitState], None]] = (),
) -> RunResult:
    """Fine-tune the blocks above ``freeze_up_to`` (default: the backbone's last block and the head) with ``augment``.

    ``on_device`` ('auto': on a GPU) decodes the images once into uint8 tensors and augments each batch on
    the device. ``cache_features`` trains the head on cached features when that is valid (head only, no
    augmentation) and warns, training uncached, when it is not. ``prefix_cache`` runs the frozen blocks once
    over the validation images (and, without augmentation, over the training images: ``PrefixCache``), and over
    each augmented training batch as it comes (``PrefixBatches``); ``cache_dir`` keeps those activations on disk.
    The numbers are those of the run without it, up to float noise.
    """
    check_preset(augment)
    set_seed(seed)
    model = create_model(backbone, len(splits.classes), weights)
    freeze(model, up_to=freeze_up_to or block_names(model)[-3])
    val_batch = max(batch_size, 128)
    start = time.perf_counter()
    if feature_cache_allowed(model, augment, mix=mix, cache_features=cache_features):
        history = train_head_on_features(model, splits, image_size, batch_size=batch_size, epochs=epochs, lr=lr, seed=seed,
                                         device=device, val_batch_size=val_batch, progress=progress, callbacks=callbacks)
    else:
        loaders = dict(image_size=image_size, batch_size=batch_size, seed=seed, device=device, hflip=hflip, mix=mix, on_device=on_device)
        if prefix_cache:
            stepper, train_loader, val_loader = _through_prefix_cache(
                model, splits, augment, val_batch=val_batch, cache_dir=cache_dir, progress=progress, **loaders)
        else:
            stepper = model
            train_loader = _augmented_train_loader(splits, model, augment, **loaders)
            val_loader = _val_loader(splits, model, image_size=image_size, val_batch=val_batch, device=device, on_device=on_device)
        history = fit(stepper, train_loader, val_loader, epochs=epochs, lr=lr, device=device,
                      progress=progress, callbacks=callbacks)
    seconds = time.perf_counter() - start
    label = name or f"{augment}{' + ' + mix if mix else ''}"
    return RunResult(label, model, history, seconds, parameter_counts(model)["total"]["trainable"])


def _augmented_train_loader(splits: DatasetSplits, model, augment: str, *, image_size: int, batch_size: int, seed: int,
                            device, hflip: bool, mix: str | None, on_device: bool | str):
    """The training loader of ``fine_tune_augmented``: PIL per item, or uint8 batches augmented on the device."""
    norm = model.normalization
    if augment_on_device(on_device, device):
        mixer = batch_mix(mix, len(splits.classes)) if mix is not None else None
        transform = BatchTransform(norm, augment, image_size=image_size, hflip=hflip, mix=mixer)
        return device_loader(InMemoryImages.from_dataset(splits.train, image_size), batch_size, device,
                             transform, shuffle=True, seed=seed)
    return augmented_loader(splits.train, train_preset(image_size, norm, augment, hflip=hflip), batch_size,
                            seed=seed, mix=mix, num_classes=len(splits.classes))


def _val_loader(splits: DatasetSplits, model, *, image_size: int, val_batch: int, device, on_device: bool | str):
    """The validation loader of ``fine_tune_augmented`` without the prefix cache: PIL, or uint8 batches on the device."""
    norm = model.normalization
    if augment_on_device(on_device, device):
        return device_loader(InMemoryImages.from_dataset(splits.val, image_size), val_batch, device,
                             BatchTransform(norm, image_size=image_size), shuffle=False)
    return make_loader(splits.val, eval_transform(image_size, norm), val_batch, shuffle=False)


def _through_prefix_cache(model, splits: DatasetSplits, augment: str, *, image_size: int, batch_size: int, val_batch: int,
                          seed: int, device, hflip: bool, mix: str | None, on_device: bool | str, cache_dir, progress: bool):
    """(suffix, train loader, val loader) that run the frozen blocks once per image set where the images do not change."""
    plain = augment == "none" and mix is None  # no augmentation: the training images' activations are the same every epoch
    transform = eval_transform(image_size, model.normalization)
    fixed = {"val": make_loader(splits.val, transform, val_batch, shuffle=False)}
    if plain:
        fixed["train"] = make_loader(splits.train, transform, batch_size, shuffle=False)
    cache = PrefixCache(model, fixed, device, cache_dir=cache_dir, progress=progress, report=False)
    if plain:
        train = cache.loader("train", batch_size, shuffle=True, seed=seed)
    else:  # built only here, so that a plain run decodes no training images it would not use
        augmented = _augmented_train_loader(splits, model, augment, image_size=image_size, batch_size=batch_size, seed=seed,
                                            device=device, hflip=hflip, mix=mix, on_device=on_device)
        train = PrefixBatches(augmented, cache)
    return cache.suffix, train, cache.loader("val", val_batch, shuffle=False)


# --- pictures -------------------------------------------------------------------------------------


def to_pil(x: torch.Tensor, norm: Normalization) -> Image.Image:
    """Undo ``norm`` on one (C, H, W) float tensor (or take a uint8 one as is) and return a PIL image."""
    x = x.detach().cpu()
    if x.dtype != torch.uint8:
        mean = torch.tensor(norm.mean).view(-1, 1, 1)
        std = torch.tensor(norm.std).view(-1, 1, 1)
        x = ((x.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return v2.functional.to_pil_image(x)


def augmentation_grid(
    image: Image.Image, transforms: Mapping[str, Callable], norm: Normalization, *, n: int = 8, seed: int = 0
) -> Figure:
    """One image under many augmentations: a row of ``n`` random draws per named transform."""
    torch.manual_seed(seed)
    rows = list(transforms.items())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
    for (name, transform), row in zip(rows, axes):
        for ax in row:
            ax.imshow(to_pil(transform(image), norm))
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def target_title(target: torch.Tensor, classes: Sequence[str]) -> str:
    """A hard label's class name, or a soft label's two largest shares (e.g. '3 62% + 8 38%')."""
    if target.ndim == 0:
        return classes[int(target)]
    top = target.topk(min(2, len(target)))
    parts = [f"{classes[int(i)]} {p:.0%}" for p, i in zip(top.values.tolist(), top.indices.tolist()) if p > 0.005]
    return " + ".join(parts)


def show_batch(images: torch.Tensor, targets: torch.Tensor, classes: Sequence[str], norm: Normalization, *, ncols: int = 8, suptitle: str = "") -> Figure:
    """A batch as the model sees it (augmented, maybe mixed), titled with its (soft) labels."""
    pictures = [to_pil(x, norm) for x in images]
    titles = [target_title(t, classes) for t in targets.detach().cpu()]
    return show_images(pictures, titles, ncols=ncols, suptitle=suptitle)
