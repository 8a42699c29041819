"""Datasets by name or folder, deterministic splits, train/eval transforms and loaders."""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import io
import numbers
import os
import re
import time
import urllib.error
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from tqdm.auto import tqdm

from ._io import user_path
from .params import check_seed
from .transforms import ImageTooLargeError, check_decode_size, read_image_file, to_rgb

# A GIF is read as its first frame.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# iPhone photos: Pillow reads them only with the pillow-heif plugin (used when it is installed).
HEIF_EXTENSIONS = (".heic", ".heif")
# Files that operating systems drop into folders: left out without a warning (as are hidden files).
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})
# Split folder names, in any letter case, and the split each one is; the first name of a split is preferred.
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "validation": "val", "valid": "val",
               "test": "test", "testing": "test"}
SPLIT_FOLDERS = tuple(SPLIT_NAMES)
# Folder names that read as a split ("Training_Set", "seg_test", "trainset"), for the layout check.
_SPLIT_LIKE = re.compile(r"(?<![a-z])(train(ing)?|val(id|idation)?|test(ing)?|eval(uation)?)(set|data|images?)?(?![a-z])")
# Checking images shows a progress bar, and a summary line, once it has taken this long (seconds).
PROGRESS_AFTER_S = 3.0
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
    """Files in a dataset folder were left out: unreadable images, broken links, or files that are not images."""


class NestedFoldersWarning(UserWarning):
    """A class folder holds subfolders (or links to folders) whose images are used as images of that class."""


class DatasetWarning(UserWarning):
    """The dataset is not quite what was asked for, or its scores could mislead: classes with fewer images than
    ``samples_per_class``, an empty split folder, the same image in two splits or two classes."""


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

    @property
    def files(self) -> list[Path] | None:
        """The image file of every item, in item order; None when the images are not files (digits, torchvision sets)."""
        if isinstance(self._load, functools.partial) and self._load.func is _open_rgb:
            return [Path(self._load.args[0][j]) for j in self.indices]
        return None

    def fingerprint(self) -> str | None:
        """A hash of the source images (file paths, sizes, times; or pixels), labels and selection; None if the source is unknown."""
        source = _source_fingerprint(self._load)
        if source is None:
            return None
        h = hashlib.sha256(source.encode())
        h.update(np.asarray(self._all_targets, dtype=np.int64).tobytes())
        h.update(np.asarray(self.indices, dtype=np.int64).tobytes())
        return h.hexdigest()

    def subset(self, positions: Sequence[int]) -> LabeledImages:
        """The items at ``positions`` (positions in this dataset, not in its source)."""
        return LabeledImages(self._load, self._all_targets, self.classes, [self.indices[p] for p in positions])

    def limit_per_class(self, samples_per_class: int, seed: int) -> LabeledImages:
        """A deterministic random subset with at most ``samples_per_class`` images of each class."""
        _check_samples_per_class(samples_per_class)
        rng = np.random.default_rng(seed)
        targets = np.asarray(self.targets)
        keep: list[int] = []
        for label in np.unique(targets):
            where = np.flatnonzero(targets == label)
            keep.extend(rng.permutation(where)[:samples_per_class].tolist())
        return self.subset(sorted(keep))

    def select_classes(self, classes: Sequence[str]) -> LabeledImages:
        """The images whose class is in ``classes``, relabelled by position in ``classes``."""
        unknown = [c for c in classes if c not in self.classes]
        if unknown:
            raise ValueError(f"Classes {unknown} are not in the dataset, whose classes are {self.classes}.")
        new_label = {self.classes.index(c): k for k, c in enumerate(classes)}
        relabelled = [new_label.get(t, -1) for t in self._all_targets]
        kept = [j for j in self.indices if relabelled[j] >= 0]
        return LabeledImages(self._load, relabelled, classes, kept)

    def with_classes(self, classes: Sequence[str]) -> LabeledImages:
        """The same images, labels re-indexed into a longer class list (old classes first, new ones appended)."""
        missing = [c for c in self.classes if c not in classes]
        if missing:
            raise ValueError(f"Classes {missing} of the dataset are missing from {list(classes)}.")
        position = {k: list(classes).index(c) for k, c in enumerate(self.classes)}
        return LabeledImages(self._load, [position.get(t, -1) if t >= 0 else -1 for t in self._all_targets], classes, self.indices)

    def without(self, used: LabeledImages) -> LabeledImages:
        """The images that are not in ``used`` (both drawn from the same source)."""
        taken = set(used.indices)
        return self.subset([p for p, j in enumerate(self.indices) if j not in taken])


@dataclass
class DatasetSplits:
    """Train / val (/ test) splits of one dataset and its class names."""

    name: str
    train: LabeledImages
    val: LabeledImages
    classes: list[str]
    test: LabeledImages | None = None
    carved_test_fraction: float | None = None  # set when the test split was carved out of a dataset that had none

    @property
    def test_source(self) -> str:
        """Where the test images come from, for the data summary a notebook prints."""
        if self.test is None:
            return "no test split"
        if self.carved_test_fraction is None:
            return "the dataset's own test split"
        return (f"{len(self.test)} images carved out of a dataset without a test split: {self.carved_test_fraction:.0%} of "
                f"each class, stratified, fixed seed {CARVED_TEST_SEED}, the same for every run seed")

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
    if Path(paths[j]).suffix.lower() in HEIF_EXTENSIONS:
        _heif_supported()  # a DataLoader worker started by spawn has not registered the plugin yet
    try:
        return read_image_file(paths[j])
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
            # os.fsencode: a file name's own bytes, also where they are not UTF-8 (the same bytes as before where they are)
            h.update(os.fsencode(Path(path).resolve()) + f"|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
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


# Files up to this size are read once, hashed and decoded from memory; larger ones are hashed in chunks, then decoded.
_READ_WHOLE_AT_MOST = 64 * 2**20


@functools.cache
def _checked_file(path: str, size: int, mtime_ns: int, max_pixels: int | None) -> tuple[str | None, str | None]:
    """(why the image file at ``path`` cannot be used or None, a hash of its bytes), cached per file version (size,
    mtime) and pixel limit. The hash finds copies across splits and classes at almost no cost: the bytes are read anyway."""
    try:
        if size <= _READ_WHOLE_AT_MOST:
            with open(path, "rb") as handle:
                data = handle.read()
            return _unreadable_reason(io.BytesIO(data), max_pixels), _digest(data)
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, _new_hash).hexdigest()
        return _unreadable_reason(path, max_pixels), digest
    except OSError as err:
        return f"{type(err).__name__}: {err}", None


def _new_hash():
    return hashlib.blake2b(digest_size=16)


def _digest(data: bytes) -> str:
    h = _new_hash()
    h.update(data)
    return h.hexdigest()


def _unreadable_reason(source, max_pixels: int | None) -> str | None:
    """Why the image file ``source`` (a path or the file's bytes) cannot be used, or None."""
    try:
        with Image.open(source) as image:
            check_decode_size(image, "the file")
            image.draft(None, (1, 1))  # JPEG: decode at 1/8 scale, which still reads every byte, twice as fast
            image.load()
            to_rgb(image)
    except ImageTooLargeError as err:
        return str(err)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        return (
            f"too large for Pillow's decompression-bomb guard ({err}); downscale it, or raise "
            f"PIL.Image.MAX_IMAGE_PIXELS (now {max_pixels}) if you trust the file"
        )
    except Exception as err:  # whatever Pillow raises, the file is unusable
        return f"{type(err).__name__}: {err}"
    return None


def _inspect_image(path: Path) -> tuple[str | None, str | None]:
    """(why ``path`` cannot be used or None, a hash of its content); see ``_checked_file``."""
    stat = path.stat()
    return _checked_file(str(path), stat.st_size, stat.st_mtime_ns, Image.MAX_IMAGE_PIXELS)


def _image_problem(path: Path) -> str | None:
    return _inspect_image(path)[0]


# --- splitting ----------------------------------------------------------------------------------


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int, *, split: str = "val") -> tuple[list[int], list[int]]:
    """Deterministic stratified (kept positions, ``split`` positions) for ``targets``: ``val_fraction`` of them in ``split``."""
    from sklearn.model_selection import train_test_split

    _check_fraction(f"{split}_fraction", val_fraction)
    positions = np.arange(len(targets))
    try:
        train, val = train_test_split(positions, test_size=val_fraction, stratify=list(targets), random_state=seed)
    except ValueError as err:  # scikit-learn's reason, with what to do about it
        counts = Counter(targets)
        raise ValueError(
            f"Cannot split {len(targets)} images of {len(counts)} classes with {split}_fraction={val_fraction} so that "
            f"every class is in both splits ({err}). Each class needs at least 2 images (the smallest has "
            f"{min(counts.values(), default=0)}) and the {split} split one image per class: add images, raise "
            f"{split}_fraction, or give separate train/ and {split}/ folders."
        ) from err
    return sorted(train.tolist()), sorted(val.tolist())


# The test split carved out of a dataset that has none is drawn with this seed, whatever the run's seed: scores of
# different seeds are then on the same images, and no seed's training or validation images are another seed's test.
CARVED_TEST_SEED = 0


def carve_splits(pool: LabeledImages, *, val_fraction: float, seed: int,
                 test_fraction: float | None = None) -> tuple[LabeledImages, LabeledImages, LabeledImages | None]:
    """(train, val, test) of ``pool``: with ``test_fraction``, a stratified test split drawn with ``CARVED_TEST_SEED``
    (the same for every ``seed``), then validation carved from the rest with ``seed``; without it, test is None."""
    test = None
    if test_fraction is not None:
        _check_fraction("test_fraction", test_fraction)
        _check_class_sizes_for_test(pool, test_fraction)
        rest, held_out = stratified_split(pool.targets, test_fraction, CARVED_TEST_SEED, split="test")
        pool, test = pool.subset(rest), pool.subset(held_out)
    train_pos, val_pos = stratified_split(pool.targets, val_fraction, seed)
    return pool.subset(train_pos), pool.subset(val_pos), test


def _check_class_sizes_for_test(pool: LabeledImages, test_fraction: float) -> None:
    """Carving test, then validation, out of one folder needs at least 3 images per class (one for each split)."""
    small = {name: n for name, n in class_counts(pool).items() if n < 3}
    if small:
        listed = ", ".join(f"{name!r} ({n})" for name, n in small.items())
        raise ValueError(
            f"Cannot carve a test split (test_fraction={test_fraction}) and a validation split out of the training images: "
            f"every class needs at least 3 images, one for each of train, val and test, and {listed} have fewer. Add images "
            f"to those classes, or give a test/ folder next to train/ (its images are used as the test split)."
        )


def _check_val_fraction(val_fraction: float) -> None:
    _check_fraction("val_fraction", val_fraction)


def _check_fraction(name: str, fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
        raise ValueError(f"{name} must be a number between 0 and 1 (exclusive), e.g. 0.2; got {fraction!r}.")


def _check_samples_per_class(samples_per_class: int) -> None:
    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, numbers.Integral) or samples_per_class < 1:
        raise ValueError(
            f"samples_per_class must be a whole number >= 1 (or None to keep every training image), got {samples_per_class!r}."
        )


# --- sources ------------------------------------------------------------------------------------


def digits_dataset() -> LabeledImages:
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes), shipped with the package: no network."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    return LabeledImages(functools.partial(_array_to_rgb, images), bunch.target.tolist(), [str(c) for c in bunch.target_names])


def _subfolder_names(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


@functools.cache
def _heif_supported() -> bool:
    """True if the pillow-heif plugin is installed; it is then registered with Pillow (also in DataLoader workers)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _is_image_name(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in IMAGE_EXTENSIONS or (suffix in HEIF_EXTENSIONS and _heif_supported())


_HEIF_HINT = (
    "HEIC/HEIF photos (as iPhones save them) need a converter: pip install pillow-heif, and tlkit reads them; "
    "or convert them to JPEG (macOS: sips -s format jpeg IMG.HEIC --out IMG.jpg; Linux: heif-convert IMG.HEIC IMG.jpg)."
)


def _heif_hint(files: Sequence[Path]) -> str:
    return f"\n{_HEIF_HINT}" if any(p.suffix.lower() in HEIF_EXTENSIONS for p in files) else ""


def _class_names(root: Path) -> list[str]:
    """The class folder names in ``root``, sorted; an error unless there are at least two that do not look like splits."""
    classes = _subfolder_names(root)
    if not classes:
        loose = sum(1 for p in root.iterdir() if _is_image_name(p))
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
    problem = _split_layout_problem(root, classes)
    if problem is not None:
        raise DatasetUnavailableError(problem)
    return classes


_SPLIT_NAMING = "train/ and val/ (optionally test/; training/, validation/, valid/ and testing/ work too, in any letter case)"


def _split_layout_problem(root: Path, classes: Sequence[str]) -> str | None:
    """Why the folders found as classes are splits rather than classes, or None.

    They are taken for splits when every name reads as one (``Training_Set``, ``seg_test``), or when every
    one holds the same two or more subfolders and no images of its own (splits holding class folders).
    """
    split_like = all(_SPLIT_LIKE.search(c.lower()) for c in classes)
    common: set[str] | None = None
    for c in classes:  # stops at the first class folder without the subfolders of the others
        names = set(_subfolder_names(root / c))
        common = names if common is None else common & names
        if len(common) < 2:
            break
    shared = sorted(common or ())
    holds_classes = len(shared) >= 2 and not any(_holds_images(root / c) for c in classes)
    if not (holds_classes or split_like):
        return None
    found = ", ".join(f"{c}/" for c in classes)
    made = f"loaded as they are, they would make a {len(classes)}-class dataset of those names"
    inside = ", ".join(f"{c}/" for c in shared[:_LISTED_AT_MOST]) + (", ..." if len(shared) > _LISTED_AT_MOST else "")
    if holds_classes and split_like:
        example = next((c for c in classes if "train" in c.lower()), classes[0])
        return (
            f"{root}: the folders found as classes ({found}) look like split folders holding class folders ({inside}), "
            f"not classes: {made}, with every real class merged. Name the split folders {_SPLIT_NAMING}, or pass one "
            f"split folder as the dataset, e.g. dataset='{root / example}'."
        )
    if holds_classes:
        return (
            f"{root}: every folder found as a class ({found}) holds the same subfolders ({inside}) and no images of "
            f"its own, as split folders holding class folders do: {made}, with every real class merged. If they are "
            f"splits, name them {_SPLIT_NAMING}; if they are classes whose images lie in subfolders, move the images "
            f"up into {root}/<class name>/."
        )
    return (
        f"{root}: the folders found as classes ({found}) look like split folders, not classes: {made}. Give each "
        f"split a folder per class ({root}/<split>/<class name>/<image files>) and name the split folders "
        f"{_SPLIT_NAMING}; if they really are your classes, give them names that do not read as splits."
    )


def _holds_images(folder: Path) -> bool:
    return any(_is_image_name(p) for p in folder.iterdir() if p.is_file())


def _split_folders(root: Path) -> dict[str, Path]:
    """The split folders of ``root`` by split ('train', 'val', 'test'): folders named as in ``SPLIT_NAMES``, in any
    letter case, that hold class folders (a class that happens to be called "valid" or "test" holds images)."""
    preference = list(SPLIT_NAMES)
    named = [d for d in root.iterdir() if d.is_dir() and d.name.lower() in SPLIT_NAMES and _subfolder_names(d)]
    found: dict[str, Path] = {}
    for folder in sorted(named, key=lambda d: (preference.index(d.name.lower()), d.name)):
        found.setdefault(SPLIT_NAMES[folder.name.lower()], folder)
    return found


@dataclass
class _ClassFiles:
    """The files of one folder of class folders, listed but not decoded yet (per class, in class order)."""

    root: Path
    classes: list[str]
    images: list[list[Path]]
    others: list[list[Path]]  # files that are not images by their extension
    broken: list[list[Path]]  # links to image files that do not exist
    nested: list[str]  # subfolders whose images are used, for the warning


def _walk_files(folder: Path) -> tuple[list[Path], list[Path], list[str]]:
    """Files under ``folder`` (sorted), broken links, and a line for each subfolder whose images are used.

    Subfolders, and links to folders, are followed (each real folder once, so a link loop ends); hidden files and
    folders (.DS_Store, macOS's ._photo.jpg) and SYSTEM_FILES are left out.
    """
    files, broken, nested = [], [], []
    seen = {os.path.realpath(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        kept = []
        for name in sorted(dirnames):
            real = os.path.realpath(here / name)
            if not name.startswith(".") and real not in seen:
                seen.add(real)
                kept.append(name)
        dirnames[:] = kept
        found = [here / name for name in filenames if not name.startswith(".") and name.lower() not in SYSTEM_FILES]
        files += [p for p in found if p.is_file()]
        broken += [p for p in found if p.is_symlink() and not p.exists()]
        images = sum(1 for p in found if p.is_file() and _is_image_name(p))
        if here != folder and images:
            expected = os.path.join(os.path.realpath(folder), os.path.relpath(here, folder))
            link = f" (through a link: {os.path.realpath(here)})" if os.path.realpath(here) != expected else ""
            nested.append(f"{here}: {images} image(s){link}")
    return sorted(files), sorted(broken), nested


def _list_class_files(root: Path, classes: Sequence[str]) -> _ClassFiles:
    listing = _ClassFiles(root, list(classes), [], [], [], [])
    for name in classes:
        files, broken, nested = _walk_files(root / name)
        listing.images.append([p for p in files if _is_image_name(p)])
        listing.others.append([p for p in files if not _is_image_name(p)])
        listing.broken.append([p for p in broken if _is_image_name(p)])
        listing.nested += nested
    return listing


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
        f"Add images to it, or delete the folder to drop the class.{_heif_hint(files)}"
    )


def _warn_left_out(root: Path, problems: dict[Path, str], not_images: list[Path], kept: int) -> None:
    if problems:
        warnings.warn(
            f"Skipped {len(problems)} unreadable image file(s) in {root} (kept {kept} images); delete or replace them:\n"
            + _listing([f"{p}: {r}" for p, r in problems.items()]),
            SkippedFilesWarning,
            stacklevel=6,  # through _labeled_images, _read_class_folders, image_folder, load_dataset: the caller
        )
    if not_images:
        warnings.warn(
            f"Ignored {len(not_images)} file(s) in {root} that are not images by their extension "
            f"(accepted: {', '.join(IMAGE_EXTENSIONS)}):\n" + _listing([str(p) for p in not_images]) + _heif_hint(not_images),
            SkippedFilesWarning,
            stacklevel=6,  # through _labeled_images, _read_class_folders, image_folder, load_dataset: the caller
        )


def _check_images(paths: Sequence[Path], where: Path) -> tuple[dict[Path, str], dict[Path, str]]:
    """Why each unusable file of ``paths`` cannot be used, and a content digest of each usable one (to find copies);
    a progress bar and a summary when checking takes a while."""
    problems: dict[Path, str] = {}
    digests: dict[Path, str] = {}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # huge images are reported, not decoded
        with tqdm(total=len(paths), desc=f"checking images in {where}", unit="img", delay=PROGRESS_AFTER_S, leave=False) as bar:
            for path in paths:
                reason, digest = _inspect_image(path)
                if reason is not None:
                    problems[path] = reason
                elif digest is not None:
                    digests[path] = digest
                bar.update()
    seconds = time.perf_counter() - start
    if seconds >= PROGRESS_AFTER_S:
        print(
            f"Checked {len(paths):,} images in {where} in {seconds:.1f} s: each was decoded once, so that unreadable "
            "files are left out now (and listed) rather than failing mid-training, and its bytes hashed, to find "
            "copies across splits and classes. Loading the same files again in this session skips the check.",
            flush=True,
        )
    return problems, digests


def _broken_link_reason(path: Path) -> str:
    return f"broken link: it points to {os.readlink(path)}, which does not exist"


def _labeled_images(listing: _ClassFiles, problems: dict[Path, str]) -> LabeledImages:
    """Every readable image of ``listing``, labelled by class; files left out are warned about."""
    paths: list[Path] = []
    targets: list[int] = []
    left_out: dict[Path, str] = {}
    for label, (name, images, others, broken) in enumerate(zip(listing.classes, listing.images, listing.others, listing.broken)):
        bad = {p: problems[p] for p in images if p in problems} | {p: _broken_link_reason(p) for p in broken}
        if len(bad) == len(images) + len(broken):
            raise DatasetUnavailableError(_no_usable_images_message(listing.root / name, images + others, bad))
        left_out.update(bad)
        good = [p for p in images if p not in bad]
        paths += good
        targets += [label] * len(good)
    _warn_left_out(listing.root, left_out, [p for others in listing.others for p in others], len(paths))
    return LabeledImages(functools.partial(_open_rgb, paths), targets, listing.classes)


def _read_class_folders(root: Path, folders: Sequence[Path], classes: Sequence[str]) -> list[LabeledImages]:
    """Each of ``folders`` (folders of ``classes`` folders) as LabeledImages.

    Each image is decoded once here, so a corrupt file is left out up front rather than failing in a
    DataLoader worker mid-epoch. Nothing in the folders is ever imported or unpickled: only image files are opened.
    """
    listings = [_list_class_files(folder, classes) for folder in folders]
    problems, digests = _check_images([p for listing in listings for images in listing.images for p in images], root)
    _warn_copies(root, listings, digests)
    nested = [line for listing in listings for line in listing.nested]
    if nested:
        warnings.warn(
            f"Images in subfolders of class folders in {root} are used as images of that class (a subfolder is not a "
            f"class of its own; links to folders are followed):\n{_listing(nested)}\n"
            f"Move a subfolder out of its class folder if its images are not of that class.",
            NestedFoldersWarning,
            stacklevel=4,  # through image_folder and load_dataset: the caller
        )
    return [_labeled_images(listing, problems) for listing in listings]


def _warn_copies(root: Path, listings: Sequence[_ClassFiles], digests: dict[Path, str]) -> None:
    """Warn once when files with the same content are in two splits (val/test scores would be inflated: the model
    trains on those very images) or in two classes (one image, two labels). Copies within one class are left alone."""
    places: dict[str, list[tuple[str, str, Path]]] = {}
    for listing in listings:
        for name, images in zip(listing.classes, listing.images):
            for path in images:
                if path in digests:
                    places.setdefault(digests[path], []).append((listing.root.name, name, path))
    in_two_splits, in_two_classes, across_splits = [], [], 0
    shared: Counter[str] = Counter()  # "train/ and test/" -> images in both
    for group in places.values():
        splits, classes = sorted({s for s, _, _ in group}), {c for _, c, _ in group}
        if len(splits) < 2 and len(classes) < 2:
            continue
        line = " = ".join(os.path.relpath(path, root) for _, _, path in group)
        (in_two_classes if len(classes) > 1 else in_two_splits).append(line)
        shared.update(f"{a}/ and {b}/" for i, a in enumerate(splits) for b in splits[i + 1:])
        across_splits += len(splits) > 1
    if not (in_two_splits or in_two_classes):
        return
    parts = []
    if shared:
        pairs = ", ".join(f"{pair}: {n}" for pair, n in shared.items())
        parts.append(f"{across_splits} image(s) are in more than one split ({pairs}): the scores on the split "
                     f"that holds a copy would be inflated, as the model is scored on images it trained on (or was "
                     f"chosen on). Keep each image in one split.")
    if in_two_classes:
        parts.append(f"{len(in_two_classes)} image(s) are in more than one class, so one image has two labels. Keep "
                     f"each in the class it belongs to.")
    warnings.warn(
        f"Files with identical content in {root}: " + " ".join(parts) + "\n" + _listing(in_two_classes + in_two_splits),
        DatasetWarning,
        stacklevel=4,  # through image_folder and load_dataset: the caller
    )


def _missing_folder_message(folder: Path) -> str:
    return (
        f"Dataset folder {folder} does not exist (absolute path: {folder.resolve()}): check the spelling and the "
        f"current folder, or use a registered dataset name ({', '.join(REGISTERED_DATASETS)})."
    )


def _refuse_whole_tree(root: Path) -> None:
    """Refuse the filesystem root and the home folder itself before walking them: every file of the machine (or of
    the user) would be listed and decoded, to end in a PermissionError or a dataset of whatever lies there."""
    real = root.resolve()
    if real == Path(real.anchor):
        what = "the filesystem root"
    elif real == Path.home().resolve():
        what = "your home folder itself"
    else:
        return
    raise DatasetUnavailableError(
        f"Dataset folder {root} is {what}: loading it would read every file below it. This usually comes from an "
        f"unset or empty shell variable (\"$DATA/\" with DATA unset is \"/\"). Pass the folder that holds the class "
        f"folders (or train/ and val/ folders), e.g. dataset='~/data/pets'."
    )


def _check_same_classes(root: Path, train: Path, classes: list[str], other: Path) -> None:
    theirs = _subfolder_names(other)
    if theirs != classes:
        raise DatasetUnavailableError(
            f"{root}: {train.name}/ and {other.name}/ have different class folders (only in {train.name}/: "
            f"{sorted(set(classes) - set(theirs))}; only in {other.name}/: {sorted(set(theirs) - set(classes))}). "
            f"Give both the same class folders, or put all images in one folder of class folders to split by seed."
        )


def image_folder(root: str | Path, *, val_fraction: float = 0.2, seed: int = 0, test_fraction: float | None = None) -> DatasetSplits:
    """Splits from an ImageFolder root: ``train/`` + ``val/`` [+ ``test/``], or class folders split by seed.

    Split folders are recognised in any letter case: train/training, val/valid/validation, test/testing.
    A train folder without a val folder is split by seed. Images that cannot be decoded, broken links and
    files that are not images are left out, listed in a ``SkippedFilesWarning``. Images in subfolders of a
    class folder (links to folders included) belong to that class, listed once in a ``NestedFoldersWarning``.
    Class folders that look like splits (``Training_Set/``, or folders that all hold the same class folders)
    are an error that says how to lay them out. Without a test/ folder, ``test_fraction`` carves a test split out of
    the images, stratified, with a fixed seed (``carve_splits``); the validation split is then carved from the rest.
    """
    root = user_path(root)
    _refuse_whole_tree(root)
    if not root.is_dir():
        raise DatasetUnavailableError(_missing_folder_message(root))
    _check_val_fraction(val_fraction)
    seed = check_seed("seed", seed)
    splits = _split_folders(root)
    if not splits:
        (everything,) = _read_class_folders(root, [root], _class_names(root))
        train, val, test = carve_splits(everything, val_fraction=val_fraction, seed=seed, test_fraction=test_fraction)
        return DatasetSplits(root.name, train, val, everything.classes, test, test_fraction if test is not None else None)
    if "train" not in splits:
        found = " and ".join(f"{folder.name}/" for folder in splits.values())
        raise DatasetUnavailableError(
            f"{root} has {found} but no train/ folder: expected {root}/train/<class name>/<image files> next to it "
            f"(or the class folders directly in {root}, split by seed)."
        )
    _warn_empty_split_folders(root, splits, val_fraction)
    classes = _class_names(splits["train"])
    others = [splits[name] for name in ("val", "test") if name in splits]
    for other in others:
        _check_same_classes(root, splits["train"], classes, other)
    train, *rest = _read_class_folders(root, [splits["train"], *others], classes)
    read = dict(zip([name for name in ("val", "test") if name in splits], rest))
    carve = test_fraction if "test" not in read else None
    if "val" in read:
        val, test = read["val"], read.get("test")
        if carve is not None:  # train/ and val/ only: the test images come out of train/, with the fixed seed
            _check_class_sizes_for_test(train, carve)
            kept, held_out = stratified_split(train.targets, carve, CARVED_TEST_SEED, split="test")
            train, test = train.subset(kept), train.subset(held_out)
    else:
        train, val, test = carve_splits(train, val_fraction=val_fraction, seed=seed, test_fraction=carve)
        test = read.get("test", test)
    return DatasetSplits(root.name, train, val, classes, test, carve)


def _warn_empty_split_folders(root: Path, splits: dict[str, Path], val_fraction: float) -> None:
    """A val/ or test/ folder without class folders next to train/ is not used: say so, and what happens instead.

    Warning rather than refusing: the run is still sound (validation carved from train/ is what a layout without
    val/ gets), and an empty placeholder folder is common; the warning says why the folder's images were not used.
    """
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and d.name.lower() in SPLIT_NAMES):
        split = SPLIT_NAMES[folder.name.lower()]
        if split == "train" or split in splits:
            continue
        images = sum(1 for p in folder.iterdir() if p.is_file() and _is_image_name(p))
        holds = f"holds {images} image(s) but no class folders" if images else "holds no class folders"
        instead = (f"validation images are carved from {splits['train'].name}/ instead (val_fraction={val_fraction}, "
                   f"stratified by seed)") if split == "val" else "there is no test split (splits.test is None)"
        warnings.warn(
            f"{folder} {holds}, so it is not used: {instead}. To use it, put the images in class folders, "
            f"{folder}/<class name>/<image files>, as in {splits['train'].name}/; or delete it.",
            DatasetWarning,
            stacklevel=4,  # through image_folder and load_dataset: the caller
        )


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


def check_dataset(value: object, name: str = "dataset") -> str:
    """``value`` as a dataset name or folder path: non-empty text (an empty path would load the current folder)."""
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"{name} must be a registered dataset name ({', '.join(REGISTERED_DATASETS)}) or the path of an image "
            f"folder, got {value!r}."
        )
    return value


def _unknown_dataset_message(dataset: str) -> str:
    path = user_path(dataset)
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
    test_fraction: float | None = None,
) -> DatasetSplits:
    """Load a registered dataset by name (downloading into ``data_root`` if needed) or an image folder by path.

    The default, ``"clothing"``, is the photo set bundled with tlkit (10 classes, natural long tail, with a
    test split); ``"clothing_full"`` downloads the whole set once. ``samples_per_class`` keeps at most that many training images per class (val is untouched).
    ``test_fraction`` carves a test split out of a dataset that has none (``digits``, a folder without test/):
    stratified, with the same fixed seed for every ``seed`` (``carve_splits``); datasets with a test split keep theirs.
    """
    dataset = check_dataset(dataset)  # an empty path would load the current folder
    seed = check_seed("seed", seed)
    _check_val_fraction(val_fraction)
    if samples_per_class is not None:
        _check_samples_per_class(samples_per_class)
    if test_fraction is not None:
        _check_fraction("test_fraction", test_fraction)
    data_root = user_path(data_root)
    if dataset == "clothing":
        splits = image_folder(BUNDLED_CLOTHING, val_fraction=val_fraction, seed=seed, test_fraction=test_fraction)
    elif dataset == "clothing_full":
        splits = image_folder(_download_clothing(data_root), val_fraction=val_fraction, seed=seed, test_fraction=test_fraction)
        splits.name = "clothing_full"
    elif dataset == "digits":
        everything = digits_dataset()
        train, val, test = carve_splits(everything, val_fraction=val_fraction, seed=seed, test_fraction=test_fraction)
        splits = DatasetSplits("digits", train, val, everything.classes, test, test_fraction)
    elif dataset == "hymenoptera":
        splits = image_folder(_download_hymenoptera(data_root), val_fraction=val_fraction, seed=seed, test_fraction=test_fraction)
    elif dataset in ("cifar10", "oxford_pets", "flowers102"):
        splits = _torchvision_splits(dataset, data_root, seed, val_fraction)
    elif user_path(dataset).is_dir():
        splits = image_folder(dataset, val_fraction=val_fraction, seed=seed, test_fraction=test_fraction)
    else:
        raise DatasetUnavailableError(_unknown_dataset_message(str(dataset)))
    if samples_per_class is not None:
        _warn_short_classes(splits.train, samples_per_class)
        splits.train = splits.train.limit_per_class(samples_per_class, seed)
    return splits


def _warn_short_classes(train: LabeledImages, samples_per_class: int) -> None:
    """Say which classes have fewer training images than ``samples_per_class`` asks for (they keep all of theirs)."""
    counts = class_counts(train)
    short = {name: n for name, n in counts.items() if n < samples_per_class}
    if not short:
        return
    listed = ", ".join(f"{name!r} {n}" for name, n in sorted(short.items(), key=lambda item: item[1]))
    warnings.warn(
        f"samples_per_class={samples_per_class}: {len(short)} of {len(counts)} classes have fewer training images and "
        f"keep all they have ({listed}); the others keep {samples_per_class}. For the same number in every class, use "
        f"samples_per_class={min(short.values())} or less; or add images to those classes.",
        DatasetWarning,
        stacklevel=3,  # through load_dataset: the caller
    )


# --- transforms and loaders -------------------------------------------------------------------------


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


def repeated_passes_sampler(n_items: int, num_samples: int, seed: int) -> RandomSampler:
    """Draws ``num_samples`` positions of ``0..n_items-1`` as successive shuffled passes (no repeat within a pass).

    For equal optimizer steps over training sets of different sizes: a smaller set is gone through several times
    per epoch, each pass in a new order (undersampling in notebook 04, the few new images of notebook 05).
    """
    if n_items < 1 or num_samples < 1:
        raise ValueError(f"n_items and num_samples must be at least 1, got {n_items} and {num_samples}.")
    return RandomSampler(range(n_items), num_samples=num_samples, generator=torch.Generator().manual_seed(seed))


class BatchesOf:
    """Base of iterables that wrap a loader and change its batches on the way (``DeviceBatches``, ``PrefixBatches``).

    It answers what ``fit`` asks of a loader besides iteration: ``len``, ``dataset`` (the head-size check) and
    ``generator`` (the shuffling state a checkpoint keeps), all from the wrapped loader.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self) -> Dataset:
        """The wrapped loader's dataset."""
        return self.loader.dataset

    @property
    def generator(self) -> torch.Generator | None:
        """The wrapped loader's shuffling generator (saved in checkpoints)."""
        return getattr(self.loader, "generator", None)

