"""Datasets by name or folder, deterministic splits, train/eval transforms and loaders."""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import numbers
import urllib.error
import warnings
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
# Files that operating systems drop into folders: left out without a warning (as are hidden files).
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})
SPLIT_FOLDERS = ("train", "val", "validation", "valid", "test")
HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
# The whole clothing set (CC0) as its author's GitHub archive; the course bundles a compact copy of it.
CLOTHING_URL = "https://github.com/alexeygrigorev/clothing-dataset-small/archive/refs/heads/master.zip"
BUNDLED_CLOTHING = Path(__file__).parent / "_bundled" / "clothing"
_LISTED_AT_MOST = 20


class DatasetUnavailableError(RuntimeError):
    """A dataset could not be found locally nor downloaded, or its folder is not laid out as expected."""


class UnreadableImageError(RuntimeError):
    """An image file could not be decoded while a batch was loaded."""


class SkippedFilesWarning(UserWarning):
    """Files in a dataset folder were left out: unreadable images, or files that are not images."""


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

    def fingerprint(self) -> str | None:
        """A hash of the source images (file paths, sizes, times; or pixels), labels and selection; None if the source is unknown."""
        source = _source_fingerprint(self._load)
        if source is None:
            return None
        h = hashlib.sha256(source.encode())
        h.update(np.asarray(self._all_targets, dtype=np.int64).tobytes())
        h.update(np.asarray(self.indices, dtype=np.int64).tobytes())
        return h.hexdigest()

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


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of any Pillow image: transparency composited on white, 16-bit grayscale scaled to 8 bits."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255, which turns most pixels white.
        pixels = np.asarray(image, dtype=np.float32) / 257
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # On white, as viewers show it: dropping the alpha channel would bring back whatever colour
        # transparent pixels happen to hold (often black), which the user never saw.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _open_rgb(paths: Sequence[Path], j: int) -> Image.Image:
    try:
        with Image.open(paths[j]) as image:
            return to_rgb(image)
    except Exception as err:  # any failure to decode a file must name the file
        raise UnreadableImageError(
            f"Could not read image {paths[j]} ({type(err).__name__}: {err}). Delete or replace the file, then "
            f"load the dataset again: loading checks every image and leaves out (with a warning) the ones it cannot read."
        ) from err


def _source_fingerprint(load: Callable) -> str | None:
    """What identifies the images behind a loader made in this module: file versions, pixel arrays or a torchvision set."""
    if not isinstance(load, functools.partial) or not load.args:
        return None
    source, h = load.args[0], hashlib.sha256(load.func.__name__.encode())
    if load.func is _open_rgb:
        for path in source:
            stat = Path(path).stat()
            h.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    elif load.func is _array_to_rgb:
        h.update(np.ascontiguousarray(source).tobytes())
    elif load.func is _torchvision_item:
        h.update(f"{type(source).__name__}|{getattr(source, 'root', '')}|{len(source)}".encode())
    else:
        return None
    return h.hexdigest()


def _array_to_rgb(images: np.ndarray, j: int) -> Image.Image:
    return to_rgb(Image.fromarray(images[j]))


def _torchvision_item(base: Dataset, j: int) -> Image.Image:
    return to_rgb(base[j][0])


@functools.lru_cache(maxsize=None)
def _unreadable_reason(path: str, size: int, mtime_ns: int, max_pixels: int | None) -> str | None:
    """Why the image file at ``path`` cannot be used, or None; cached per file version (size, mtime) and pixel limit."""
    try:
        with Image.open(path) as image:
            image.draft(None, (1, 1))  # JPEG: decode at 1/8 scale, which still reads every byte, twice as fast
            image.load()
            to_rgb(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        return (
            f"too large for Pillow's decompression-bomb guard ({err}); downscale it, or raise "
            f"PIL.Image.MAX_IMAGE_PIXELS (now {max_pixels}) if you trust the file"
        )
    except Exception as err:  # whatever Pillow raises, the file is unusable
        return f"{type(err).__name__}: {err}"
    return None


def _image_problem(path: Path) -> str | None:
    stat = path.stat()
    return _unreadable_reason(str(path), stat.st_size, stat.st_mtime_ns, Image.MAX_IMAGE_PIXELS)


# --- splitting ----------------------------------------------------------------------------------


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic stratified (train positions, val positions) for ``targets``."""
    from sklearn.model_selection import train_test_split

    _check_val_fraction(val_fraction)
    positions = np.arange(len(targets))
    try:
        train, val = train_test_split(positions, test_size=val_fraction, stratify=list(targets), random_state=seed)
    except ValueError as err:  # scikit-learn's reason, with what to do about it
        counts = Counter(targets)
        raise ValueError(
            f"Cannot split {len(targets)} images of {len(counts)} classes with val_fraction={val_fraction} so that "
            f"every class is in both splits ({err}). Each class needs at least 2 images (the smallest has "
            f"{min(counts.values(), default=0)}) and the val split one image per class: add images, raise "
            f"val_fraction, or give separate train/ and val/ folders."
        ) from err
    return sorted(train.tolist()), sorted(val.tolist())


def _check_val_fraction(val_fraction: float) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number between 0 and 1 (exclusive), e.g. 0.2; got {val_fraction!r}.")


def _check_samples_per_class(samples_per_class: int) -> None:
    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, numbers.Integral) or samples_per_class < 1:
        raise ValueError(
            f"samples_per_class must be a whole number >= 1 (or None to keep every training image), got {samples_per_class!r}."
        )


def limit_per_class(ds: LabeledImages, samples_per_class: int, seed: int) -> LabeledImages:
    """A deterministic random subset with at most ``samples_per_class`` images of each class."""
    _check_samples_per_class(samples_per_class)
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


def _subfolder_names(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_names(root: Path) -> list[str]:
    """The class folder names in ``root``, sorted; an error unless there are at least two."""
    classes = _subfolder_names(root)
    if not classes:
        loose = sum(1 for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        where = f" ({loose} images lie directly in it)" if loose else ""
        raise DatasetUnavailableError(
            f"{root} has no class folders{where}: put the images of each class in a folder of their own, "
            f"{root}/<class name>/<image files>."
        )
    if len(classes) == 1:
        only = root / classes[0]
        nested = f" If {only} holds the dataset itself, pass dataset='{only}'." if _subfolder_names(only) else ""
        raise DatasetUnavailableError(
            f"{root} has a single class folder ('{classes[0]}'), and a classifier needs at least two classes: "
            f"add one folder per class next to it, {root}/<class name>/<image files>.{nested}"
        )
    return classes


def _files_in(folder: Path) -> list[Path]:
    """Files under ``folder``, sorted, without hidden ones (.DS_Store, macOS's ._photo.jpg) and SYSTEM_FILES."""
    return [
        p for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.name.lower() not in SYSTEM_FILES
    ]


def _listing(lines: Sequence[str]) -> str:
    shown = [f"  {line}" for line in lines[:_LISTED_AT_MOST]]
    if len(lines) > _LISTED_AT_MOST:
        shown.append(f"  ... and {len(lines) - _LISTED_AT_MOST} more")
    return "\n".join(shown)


def _no_usable_images_message(folder: Path, files: Sequence[Path], problems: dict[Path, str]) -> str:
    if problems:
        return (
            f"No image in class folder {folder} could be read:\n{_listing([f'{p}: {r}' for p, r in problems.items()])}\n"
            f"Replace them with readable files (e.g. re-export them as JPEG or PNG), or delete the folder to drop the class."
        )
    found = f" It holds only: {', '.join(p.name for p in files[:_LISTED_AT_MOST])}." if files else ""
    return (
        f"Class folder {folder} holds no images (accepted extensions: {', '.join(IMAGE_EXTENSIONS)}).{found} "
        f"Add images to it, or delete the folder to drop the class."
    )


def _warn_left_out(root: Path, problems: dict[Path, str], not_images: list[Path], kept: int) -> None:
    if problems:
        warnings.warn(
            f"Skipped {len(problems)} unreadable image file(s) in {root} (kept {kept} images); delete or replace them:\n"
            + _listing([f"{p}: {r}" for p, r in problems.items()]),
            SkippedFilesWarning,
            stacklevel=4,
        )
    if not_images:
        warnings.warn(
            f"Ignored {len(not_images)} file(s) in {root} that are not images by their extension "
            f"(accepted: {', '.join(IMAGE_EXTENSIONS)}):\n" + _listing([str(p) for p in not_images]),
            SkippedFilesWarning,
            stacklevel=4,
        )


def _class_folder(root: Path, classes: Sequence[str]) -> LabeledImages:
    """Every readable image in ``root/<class>/`` for ``classes``, labelled by class; files left out are warned about.

    Each image is decoded once here, so a corrupt file is left out up front rather than failing in a
    DataLoader worker mid-epoch. Nothing in the folder is ever imported or unpickled: only image files are opened.
    """
    paths: list[Path] = []
    targets: list[int] = []
    problems: dict[Path, str] = {}
    not_images: list[Path] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # huge images are reported, not decoded
        for label, name in enumerate(classes):
            files = _files_in(root / name)
            images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            not_images += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
            bad = {p: reason for p in images if (reason := _image_problem(p)) is not None}
            if len(bad) == len(images):
                raise DatasetUnavailableError(_no_usable_images_message(root / name, files, bad))
            problems.update(bad)
            good = [p for p in images if p not in bad]
            paths += good
            targets += [label] * len(good)
    _warn_left_out(root, problems, not_images, len(paths))
    return LabeledImages(functools.partial(_open_rgb, paths), targets, classes)


def _missing_folder_message(folder: Path) -> str:
    return (
        f"Dataset folder {folder} does not exist (absolute path: {folder.resolve()}): check the spelling and the "
        f"current folder, or use a registered dataset name ({', '.join(REGISTERED_DATASETS)})."
    )


def _check_same_classes(root: Path, classes: list[str], other: Path) -> None:
    theirs = _subfolder_names(other)
    if theirs != classes:
        raise DatasetUnavailableError(
            f"{root}: train/ and {other.name}/ have different class folders (only in train/: "
            f"{sorted(set(classes) - set(theirs))}; only in {other.name}/: {sorted(set(theirs) - set(classes))}). "
            f"Give both the same class folders, or put all images in one folder of class folders to split by seed."
        )


def image_folder(root: str | Path, *, val_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """Splits from an ImageFolder root: ``train/`` + ``val/`` (or ``validation/``) [+ ``test/``], or class folders split by seed.

    A ``train/`` without a val folder is split by seed. Images that cannot be decoded and files that
    are not images are left out, listed in a ``SkippedFilesWarning``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetUnavailableError(_missing_folder_message(root))
    _check_val_fraction(val_fraction)
    # A split folder holds class folders; a class that happens to be called "valid" or "test" holds images.
    splits = {n: root / n for n in SPLIT_FOLDERS if (root / n).is_dir() and _subfolder_names(root / n)}
    if not splits:
        everything = _class_folder(root, _class_names(root))
        train_pos, val_pos = stratified_split(everything.targets, val_fraction, seed)
        return DatasetSplits(root.name, everything.subset(train_pos), everything.subset(val_pos), everything.classes)
    if "train" not in splits:
        found = " and ".join(f"{n}/" for n in splits)
        raise DatasetUnavailableError(
            f"{root} has {found} but no train/ folder: expected {root}/train/<class name>/<image files> next to it "
            f"(or the class folders directly in {root}, split by seed)."
        )
    classes = _class_names(splits["train"])
    val_dir = next((splits[n] for n in ("val", "validation", "valid") if n in splits), None)
    for other in (val_dir, splits.get("test")):
        if other is not None:
            _check_same_classes(root, classes, other)
    train = _class_folder(splits["train"], classes)
    if val_dir is None:
        train_pos, val_pos = stratified_split(train.targets, val_fraction, seed)
        train, val = train.subset(train_pos), train.subset(val_pos)
    else:
        val = _class_folder(val_dir, classes)
    test = _class_folder(splits["test"], classes) if "test" in splits else None
    return DatasetSplits(root.name, train, val, classes, test)


def _download_archive(name: str, url: str, data_root: Path, unpacks_to: str) -> Path:
    """The folder ``unpacks_to`` in ``data_root``, downloading and unpacking ``url`` there the first time."""
    from torchvision.datasets.utils import download_and_extract_archive

    target = data_root / unpacks_to
    if not target.is_dir():
        with _explain_download_failure(name, url, data_root):
            download_and_extract_archive(url, download_root=str(data_root), filename=f"{unpacks_to}.zip")
    return target


def _download_hymenoptera(data_root: Path) -> Path:
    return _download_archive("hymenoptera", HYMENOPTERA_URL, data_root, "hymenoptera_data")


def _download_clothing(data_root: Path) -> Path:
    # GitHub names the archive's top folder <repository>-<branch>.
    return _download_archive("clothing_full", CLOTHING_URL, data_root, "clothing-dataset-small-master")


@contextlib.contextmanager
def _explain_download_failure(name: str, url: str, folder: Path) -> Iterator[None]:
    """Turn a failed download into a DatasetUnavailableError that says what to do."""
    try:
        yield
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise DatasetUnavailableError(
            f"Could not download dataset '{name}' from {url} ({err}). With no network, download it "
            f"elsewhere and unpack it into {folder}/, or use dataset='clothing' (photos bundled with tlkit), "
            f"'digits' (ships with scikit-learn) or the path of an image folder of your own."
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


REGISTERED_DATASETS = ("clothing", "clothing_full", "digits", "hymenoptera", "cifar10", "oxford_pets", "flowers102")


def _unknown_dataset_message(dataset: str) -> str:
    path = Path(dataset).expanduser()
    if path.is_file():
        return f"Dataset {dataset} is a file, not a folder: unpack it first and pass the folder it unpacks to."
    if any(sep in dataset for sep in ("/", "\\")) or dataset.startswith(("~", ".")):
        return _missing_folder_message(path)
    close = difflib.get_close_matches(dataset.lower(), REGISTERED_DATASETS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return (
        f"Unknown dataset '{dataset}': not a registered name ({', '.join(REGISTERED_DATASETS)}) and not an existing "
        f"folder.{hint} Pass a registered name, or the path of an image folder (<folder>/<class name>/<image files>, "
        f"or train/ and val/ folders holding class folders)."
    )


def load_dataset(
    dataset: str = "clothing",
    *,
    data_root: str | Path = "data",
    seed: int = 0,
    val_fraction: float = 0.2,
    samples_per_class: int | None = None,
) -> DatasetSplits:
    """Load a registered dataset by name (downloading into ``data_root`` if needed) or an image folder by path.

    The default, ``"clothing"``, is the photo set bundled with tlkit (10 classes, natural long tail, with a
    test split); ``"clothing_full"`` downloads the whole set once. ``samples_per_class`` keeps at most that many training images per class (val is untouched).
    """
    _check_val_fraction(val_fraction)
    if samples_per_class is not None:
        _check_samples_per_class(samples_per_class)
    data_root = Path(data_root).expanduser()
    if dataset == "clothing":
        splits = image_folder(BUNDLED_CLOTHING, val_fraction=val_fraction, seed=seed)
    elif dataset == "clothing_full":
        splits = image_folder(_download_clothing(data_root), val_fraction=val_fraction, seed=seed)
        splits.name = "clothing_full"
    elif dataset == "digits":
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
        raise DatasetUnavailableError(_unknown_dataset_message(str(dataset)))
    if samples_per_class is not None:
        splits.train = limit_per_class(splits.train, samples_per_class, seed)
    return splits


# --- transforms and loaders -------------------------------------------------------------------------


def _check_image_size(image_size: int) -> None:
    # The backbone's own minimum (tlkit.models.check_image_size) is checked when the model sees the images.
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise ValueError(f"image_size must be a whole number of pixels >= 1 (e.g. 224), got {image_size!r}.")


def eval_transform(image_size: int, norm: Normalization) -> v2.Compose:
    """Deterministic preset: resize the short side, center-crop a square, scale to [0, 1], normalize.

    The resize follows the weights' own preprocessing (``norm.crop_pct`` and ``norm.interpolation``, from timm's
    config for ``timm:`` backbones; the built-in backbones resize straight to ``image_size``, bilinear).
    """
    _check_image_size(image_size)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(norm.resize_size(image_size), interpolation=norm.interpolation_mode, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(norm.mean), list(norm.std)),
        ]
    )


def train_transform(image_size: int, norm: Normalization, augment: str = "none") -> v2.Compose:
    """Training preset by name (``tlkit.augment.PRESETS``): 'none' is the eval preset; 'basic' adds a random resized crop and a flip."""
    from .augment import train_preset  # augment builds on this module, so it is imported when used

    _check_image_size(image_size)
    return train_preset(image_size, norm, augment)


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
    pin_memory: bool | None = None,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader whose shuffling order depends only on ``seed`` (or a ``sampler`` instead of shuffling)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1 (e.g. 32), got {batch_size!r}.")
    source = ds if transform is None else TransformedDataset(ds, transform)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        source,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,  # page-locked: faster, async copies to a GPU
        persistent_workers=num_workers > 0,
    )
