"""Datasets by name or folder, deterministic splits, train/eval transforms and loaders."""

from __future__ import annotations

import contextlib
import functools
import urllib.error
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from .models import Normalization

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"


class DatasetUnavailableError(RuntimeError):
    """A dataset could not be found locally nor downloaded."""


class LabeledImages(Dataset):
    """Images with integer labels; item ``i`` is ``(PIL RGB image, label)``. Subsets keep their labels."""

    def __init__(
        self,
        load: Callable[[int], Image.Image],
        targets: Sequence[int],
        classes: Sequence[str],
        indices: Sequence[int] | None = None,
    ) -> None:
        self._load = load
        self._all_targets = list(targets)
        self.classes = list(classes)
        self.indices = list(range(len(self._all_targets))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        j = self.indices[i]
        return self._load(j), self._all_targets[j]

    @property
    def targets(self) -> list[int]:
        """Label of every item, in item order."""
        return [self._all_targets[j] for j in self.indices]

    def subset(self, positions: Sequence[int]) -> "LabeledImages":
        """The items at ``positions`` (positions in this dataset, not in its source)."""
        return LabeledImages(self._load, self._all_targets, self.classes, [self.indices[p] for p in positions])


@dataclass
class DatasetSplits:
    """Train / val (/ test) splits of one dataset and its class names."""

    name: str
    train: LabeledImages
    val: LabeledImages
    classes: list[str]
    test: LabeledImages | None = None

    def summary(self) -> dict[str, dict[str, int]]:
        """Images per class in each split."""
        splits = {"train": self.train, "val": self.val}
        if self.test is not None:
            splits["test"] = self.test
        return {split: class_counts(ds) for split, ds in splits.items()}


def class_counts(ds: LabeledImages) -> dict[str, int]:
    """Number of images per class name, in class order."""
    counts = Counter(ds.targets)
    return {name: counts.get(i, 0) for i, name in enumerate(ds.classes)}


# --- loading images ---------------------------------------------------------------------------


def _open_rgb(paths: Sequence[Path], j: int) -> Image.Image:
    with Image.open(paths[j]) as img:
        return img.convert("RGB")


def _array_to_rgb(images: np.ndarray, j: int) -> Image.Image:
    return Image.fromarray(images[j]).convert("RGB")


def _torchvision_item(base: Dataset, j: int) -> Image.Image:
    return base[j][0].convert("RGB")


# --- splitting ----------------------------------------------------------------------------------


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic stratified (train positions, val positions) for ``targets``."""
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}.")
    positions = np.arange(len(targets))
    train, val = train_test_split(positions, test_size=val_fraction, stratify=list(targets), random_state=seed)
    return sorted(train.tolist()), sorted(val.tolist())


def limit_per_class(ds: LabeledImages, samples_per_class: int, seed: int) -> LabeledImages:
    """A deterministic random subset with at most ``samples_per_class`` images of each class."""
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class must be at least 1, got {samples_per_class}.")
    rng = np.random.default_rng(seed)
    targets = np.asarray(ds.targets)
    keep: list[int] = []
    for label in np.unique(targets):
        where = np.flatnonzero(targets == label)
        keep.extend(rng.permutation(where)[:samples_per_class].tolist())
    return ds.subset(sorted(keep))


# --- sources ------------------------------------------------------------------------------------


def digits_dataset() -> LabeledImages:
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes), shipped with the package: no network."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    return LabeledImages(functools.partial(_array_to_rgb, images), bunch.target.tolist(), [str(c) for c in bunch.target_names])


def _class_folder(root: Path) -> LabeledImages:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetUnavailableError(f"{root} has no class folders: expected {root}/<class name>/<image files>.")
    paths: list[Path] = []
    targets: list[int] = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                paths.append(path)
                targets.append(label)
    return LabeledImages(functools.partial(_open_rgb, paths), targets, classes)


def image_folder(root: str | Path, *, val_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """Splits from an ImageFolder root: ``train/`` + ``val/`` (or ``validation/``) [+ ``test/``], or class folders split by seed."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetUnavailableError(f"Dataset folder {root} does not exist.")
    val_dir = next((root / n for n in ("val", "validation", "valid") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        train, val = _class_folder(root / "train"), _class_folder(val_dir)
        if train.classes != val.classes:
            raise DatasetUnavailableError(
                f"{root}: train/ and {val_dir.name}/ have different class folders: {train.classes} vs {val.classes}."
            )
        test = _class_folder(root / "test") if (root / "test").is_dir() else None
    else:
        everything = _class_folder(root)
        train_pos, val_pos = stratified_split(everything.targets, val_fraction, seed)
        train, val, test = everything.subset(train_pos), everything.subset(val_pos), None
    return DatasetSplits(root.name, train, val, train.classes, test)


def _download_hymenoptera(data_root: Path) -> Path:
    from torchvision.datasets.utils import download_and_extract_archive

    target = data_root / "hymenoptera_data"
    if not target.is_dir():
        with _explain_download_failure("hymenoptera", HYMENOPTERA_URL, data_root):
            download_and_extract_archive(HYMENOPTERA_URL, download_root=str(data_root))
    return target


@contextlib.contextmanager
def _explain_download_failure(name: str, url: str, folder: Path) -> Iterator[None]:
    """Turn a failed download into a DatasetUnavailableError that says what to do."""
    try:
        yield
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise DatasetUnavailableError(
            f"Could not download dataset '{name}' from {url} ({err}). With no network, download it "
            f"elsewhere and unpack it into {folder}/, or use dataset='digits' (ships with scikit-learn) "
            f"or the path of an image folder of your own."
        ) from err


def _torchvision_splits(name: str, data_root: Path, seed: int, val_fraction: float) -> DatasetSplits:
    import torchvision.datasets as tvd

    folder = data_root / name
    if name == "cifar10":
        with _explain_download_failure(name, tvd.CIFAR10.url, folder):
            full = tvd.CIFAR10(str(folder), train=True, download=True)
            test_base = tvd.CIFAR10(str(folder), train=False, download=True)
        train_targets, classes = list(full.targets), list(full.classes)
        test = LabeledImages(functools.partial(_torchvision_item, test_base), test_base.targets, classes)
        everything = LabeledImages(functools.partial(_torchvision_item, full), train_targets, classes)
        train_pos, val_pos = stratified_split(train_targets, val_fraction, seed)
        return DatasetSplits(name, everything.subset(train_pos), everything.subset(val_pos), classes, test)
    split_names = {"oxford_pets": ("trainval", None, "test"), "flowers102": ("train", "val", "test")}[name]
    cls = {"oxford_pets": tvd.OxfordIIITPet, "flowers102": tvd.Flowers102}[name]
    url = getattr(cls, "_RESOURCES", None) or getattr(cls, "_download_url_prefix", "")
    with _explain_download_failure(name, str(url), folder):
        bases = {s: cls(str(folder), split=s, download=True) for s in split_names if s is not None}
    classes = list(getattr(bases[split_names[0]], "classes", [])) or [str(i) for i in range(102)]

    def wrap(split: str) -> LabeledImages:
        base = bases[split]
        return LabeledImages(functools.partial(_torchvision_item, base), list(base._labels), classes)

    train = wrap(split_names[0])
    if split_names[1] is None:
        train_pos, val_pos = stratified_split(train.targets, val_fraction, seed)
        train, val = train.subset(train_pos), train.subset(val_pos)
    else:
        val = wrap(split_names[1])
    return DatasetSplits(name, train, val, classes, wrap(split_names[2]))


REGISTERED_DATASETS = ("digits", "hymenoptera", "cifar10", "oxford_pets", "flowers102")


def load_dataset(
    dataset: str = "digits",
    *,
    data_root: str | Path = "data",
    seed: int = 0,
    val_fraction: float = 0.2,
    samples_per_class: int | None = None,
) -> DatasetSplits:
    """Load a registered dataset by name (downloading into ``data_root`` if needed) or an image folder by path.

    ``samples_per_class`` keeps at most that many training images per class (val is untouched).
    """
    data_root = Path(data_root).expanduser()
    if dataset == "digits":
        everything = digits_dataset()
        train_pos, val_pos = stratified_split(everything.targets, val_fraction, seed)
        splits = DatasetSplits("digits", everything.subset(train_pos), everything.subset(val_pos), everything.classes)
    elif dataset == "hymenoptera":
        splits = image_folder(_download_hymenoptera(data_root), val_fraction=val_fraction, seed=seed)
    elif dataset in ("cifar10", "oxford_pets", "flowers102"):
        splits = _torchvision_splits(dataset, data_root, seed, val_fraction)
    elif Path(dataset).expanduser().is_dir():
        splits = image_folder(dataset, val_fraction=val_fraction, seed=seed)
    else:
        raise DatasetUnavailableError(
            f"Unknown dataset '{dataset}': not a registered name ({', '.join(REGISTERED_DATASETS)}) "
            f"and not an existing folder."
        )
    if samples_per_class is not None:
        splits.train = limit_per_class(splits.train, samples_per_class, seed)
    return splits


# --- transforms and loaders -------------------------------------------------------------------------


def eval_transform(image_size: int, norm: Normalization) -> v2.Compose:
    """Deterministic preset: resize the short side, center-crop a square, scale to [0, 1], normalize."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(norm.mean), list(norm.std)),
        ]
    )


def train_transform(image_size: int, norm: Normalization, augment: str = "none") -> v2.Compose:
    """Training preset: ``augment='none'`` is the eval preset; 'basic' adds a random resized crop and a flip."""
    if augment == "none":
        return eval_transform(image_size, norm)
    if augment == "basic":
        return v2.Compose(
            [
                v2.ToImage(),
                v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(norm.mean), list(norm.std)),
            ]
        )
    raise ValueError(f"Unknown augment '{augment}'; choose 'none' or 'basic'.")


class TransformedDataset(Dataset):
    """Applies ``transform`` to the image of each ``(image, label)`` item."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label


def make_loader(
    ds: Dataset,
    transform: Callable | None,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader whose shuffling order depends only on ``seed`` (or a ``sampler`` instead of shuffling)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    source = ds if transform is None else TransformedDataset(ds, transform)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        source,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
