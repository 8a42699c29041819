"""Predict with a saved model outside a notebook: the last step of the workflow (train, save, reload, predict).

    python -m tlkit.predict outputs/05_updated_model.pt photos/ --out predictions.csv
    python -m tlkit.predict model.pt a.jpg b.png --top-k 5 --image-size 160 --device cuda

Every image file in the folders (searched recursively, as training reads a class folder: links followed, hidden
and system files skipped) and every file named is read upright (EXIF orientation), as in training; the CSV has one
row per file: its top-k classes and probabilities. A file that cannot be read is listed in the CSV's ``error``
column and on stderr, and the others are still predicted. Images are resized to the size the model was trained at
(recorded in its checkpoint) unless ``--image-size`` says otherwise.

The CSV is written atomically, never over the checkpoint or an input, and never over an existing file that is not
a ``.csv`` unless ``--force``. File names are written as the file system holds them: a name whose bytes are not
UTF-8 keeps its bytes (Python's "surrogateescape"), so the ``file`` column always names the file; read such a CSV
with ``pd.read_csv(path, encoding_errors="surrogateescape")``. A problem with the arguments, the checkpoint or
``--out`` is one line on stderr and exit status 2, before anything is predicted.

``python -m tlkit.predict`` runs ``main``; so does ``python -m tlkit.inference``. The functions live here: the name
``tlkit.predict`` belongs to the function that predicts a loader, so ``tlkit/predict.py`` is a command only.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ._io import SaveError, atomic_path, check_writable_folder, user_path
from .checkpoints import Checkpoint, CheckpointError, model_from_checkpoint
from .data import HEIF_EXTENSIONS, IMAGE_EXTENSIONS, _broken_link_reason, _heif_hint, _is_image_name, _walk_files
from .models import check_image_size
from .train import get_device
from .transforms import _check_image_size, eval_transform, read_image_file

DEFAULT_IMAGE_SIZE = 128  # the course's training size: used when the checkpoint does not record its own
CSV_ERRORS = "surrogateescape"  # a file name's bytes that are not UTF-8 go into the CSV as they are


@dataclass
class Unreadable:
    path: Path
    reason: str


def _is_listed(path: Path) -> bool:
    # HEIF photos are listed even without the pillow-heif plugin, so that they appear in the CSV with the fix.
    return _is_image_name(path) or path.suffix.lower() in HEIF_EXTENSIONS


def image_files(inputs: list[str | Path]) -> list[Path]:
    """The image files named in ``inputs`` and those inside the folders among them, each once.

    Folders are read as training reads a class folder (``tlkit.data``): recursively, links followed, hidden files and
    folders and system files (Thumbs.db, desktop.ini) left out; a link to a missing image is listed (its error says so).
    """
    found: list[Path] = []
    for item in map(user_path, inputs):
        if item.is_dir():
            files, broken, _ = _walk_files(item)
            found += sorted(p for p in files + broken if _is_listed(p))
        elif item.exists():
            found.append(item)
        else:
            raise FileNotFoundError(f"{item} does not exist: pass image files or folders of images.")
    return list(dict.fromkeys(found))


def _listed_images(inputs: list[str | Path]) -> list[Path]:
    files = image_files(inputs)
    if not files:
        raise ValueError(f"No image files in {[str(i) for i in inputs]} (accepted: {', '.join(IMAGE_EXTENSIONS)}).")
    return files


def _check_at_least_one(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}.")


def _image_tensor(path: Path, transform) -> torch.Tensor | Unreadable:
    """``path`` decoded and transformed; only the (small) tensor outlives this call, never the full-size image."""
    if path.is_symlink() and not path.exists():
        return Unreadable(path, _broken_link_reason(path))
    if path.suffix.lower() in HEIF_EXTENSIONS and not _is_image_name(path):
        return Unreadable(path, _heif_hint([path]).strip())
    try:
        return transform(read_image_file(path))  # refused before decoding above MAX_DECODE_PIXELS
    except Exception as err:  # any file that does not decode is reported, not fatal
        return Unreadable(path, f"{type(err).__name__}: {err}")


@torch.inference_mode()
def _top_k(model: nn.Module, batch: torch.Tensor, classes: list[str], device: torch.device, top_k: int) -> list[list[tuple[str, float]]]:
    """The (class name, probability) pairs of each image of ``batch``, most likely first (as ``tlkit.predict_images``)."""
    probs = model(batch.to(device)).float().softmax(1).cpu()
    top = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [[(classes[i], float(p)) for p, i in zip(values, indices)] for values, indices in zip(top.values, top.indices)]


def _training_size(saved: Checkpoint, image_size: int | None) -> int:
    """``image_size`` if given, else the size the checkpoint says the model was trained at, else ``DEFAULT_IMAGE_SIZE``."""
    size = image_size if image_size is not None else saved.image_size or DEFAULT_IMAGE_SIZE
    return check_image_size(saved.backbone, size)


def _predict_listed(model: nn.Module, saved: Checkpoint, files: list[Path], *, top_k: int, image_size: int,
                    batch_size: int, device: str) -> pd.DataFrame:
    transform = eval_transform(image_size, model.normalization)
    dev = get_device(device)
    model.to(dev).eval()
    rows = []
    for start in range(0, len(files), batch_size):
        # One image decoded at a time: a batch costs batch_size resized tensors, not batch_size full-size photos.
        loaded = [(path, _image_tensor(path, transform)) for path in files[start : start + batch_size]]
        tensors = [tensor for _, tensor in loaded if not isinstance(tensor, Unreadable)]
        guesses = iter(_top_k(model, torch.stack(tensors), saved.classes, dev, top_k) if tensors else [])
        for path, tensor in loaded:
            row: dict[str, object] = {"file": str(path)}
            if not isinstance(tensor, Unreadable):
                for k, (name, prob) in enumerate(next(guesses), start=1):
                    row[f"class_{k}"], row[f"prob_{k}"] = name, round(prob, 4)
            row["error"] = tensor.reason if isinstance(tensor, Unreadable) else ""
            rows.append(row)
    columns = ["file"] + [c for k in range(1, min(top_k, len(saved.classes)) + 1) for c in (f"class_{k}", f"prob_{k}")] + ["error"]
    table = pd.DataFrame(rows).reindex(columns=columns)
    table.attrs["image_size"] = image_size
    return table


def predict_files(
    checkpoint: str | Path,
    inputs: list[str | Path],
    *,
    top_k: int = 3,
    image_size: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
) -> pd.DataFrame:
    """One row per file: ``file``, ``class_1``, ``prob_1`` ... ``class_k``, ``prob_k`` and ``error`` (empty when read).

    ``image_size`` None: the size recorded in the checkpoint (``DEFAULT_IMAGE_SIZE`` for a checkpoint that records
    none); the size used is in ``table.attrs["image_size"]``. Memory is bounded by ``batch_size`` and ``image_size``
    (one full-size image is decoded at a time, and files above ``tlkit.transforms.MAX_DECODE_PIXELS`` are refused,
    listed with their error).
    """
    _check_at_least_one(top_k=top_k, batch_size=batch_size)
    files = _listed_images(inputs)
    model, saved = model_from_checkpoint(user_path(checkpoint))
    return _predict_listed(model, saved, files, top_k=top_k, image_size=_training_size(saved, image_size),
                           batch_size=batch_size, device=device)


# --- the command line ---------------------------------------------------------------------------------------


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _at_least_one(text: str) -> int:
    """argparse type: a whole number >= 1 (a batch size or top-k of 0 or less would predict nothing)."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _image_size_arg(text: str) -> int:
    """argparse type: a size every tlkit transform accepts (1 to tlkit.transforms.MAX_IMAGE_SIZE pixels)."""
    value = _whole_number(text)
    try:
        _check_image_size(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (a broken link): not the same file
        return False


def _check_out(out: Path, checkpoint: Path, files: list[Path], *, force: bool) -> None:
    """Refuse an ``--out`` whose writing would destroy something: a folder, the checkpoint, an input, a non-CSV file."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: name the CSV file to write, e.g. --out {out / 'predictions.csv'}.")
    if not out.exists():
        return
    if _same_file(out, checkpoint):
        raise ValueError(f"--out {out} is the checkpoint: writing the CSV would replace the model. Name another file, e.g. --out predictions.csv.")
    same = next((f for f in files if _same_file(out, f)), None)
    if same is not None:
        raise ValueError(f"--out {out} is one of the input images ({same}): writing the CSV would replace it. Name another file, e.g. --out predictions.csv.")
    if out.suffix.lower() != ".csv" and not force:
        raise ValueError(f"--out {out} exists and is not a CSV file (.csv): it is left alone. Name a .csv file, or pass --force to replace it.")


def write_csv(table: pd.DataFrame, out: str | Path) -> Path:
    """Write ``table`` to ``out`` atomically (the old file stays whole if writing fails), file names' bytes kept."""
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False, errors=CSV_ERRORS)
    return user_path(out)


def _shown(path: Path | str) -> str:
    """``path`` printable on any terminal: bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _not_utf8(names: pd.Series) -> int:
    """How many names hold bytes that are not UTF-8 (surrogate-escaped by Python)."""
    return sum(1 for name in names if not name.isascii() and _shown(name) != name)


def _size_note(size: int, saved: Checkpoint, given: int | None) -> str:
    if given is not None:
        return f"images resized to {size} px (--image-size)"
    if saved.image_size is not None:
        return f"images resized to {size} px (the checkpoint's training size)"
    return f"images resized to {size} px (the checkpoint does not record its training size: pass --image-size if it was another)"


def main(argv: list[str] | None = None, prog: str = "python -m tlkit.inference") -> int:
    """The command line: parse ``argv`` (default: ``sys.argv[1:]``), write the CSV, return the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=user_path, help="a checkpoint written by tlkit (fit(callbacks=[SaveCheckpoint(...)]) or save_checkpoint)")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--out", type=user_path, default=Path("predictions.csv"), help="the CSV to write (default: predictions.csv)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file that is not a .csv")
    parser.add_argument("--top-k", type=_at_least_one, default=3)
    parser.add_argument("--image-size", type=_image_size_arg, default=None,
                        help=f"the size the model was trained at (default: the size its checkpoint records, else {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--batch-size", type=_at_least_one, default=32)
    parser.add_argument("--device", default="auto", help='"auto" (CUDA when present), "cpu" or "cuda"')
    args = parser.parse_args(argv)
    try:
        files = _listed_images(args.inputs)
        _check_out(args.out, args.checkpoint, files, force=args.force)
        check_writable_folder(args.out.parent, what="the folder of --out")
        model, saved = model_from_checkpoint(args.checkpoint)
        size = _training_size(saved, args.image_size)
        table = _predict_listed(model, saved, files, top_k=args.top_k, image_size=size, batch_size=args.batch_size, device=args.device)
        write_csv(table, args.out)
    except (FileNotFoundError, ValueError, CheckpointError, SaveError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    failed = table[table["error"] != ""]
    for _, row in failed.iterrows():
        print(f"unreadable: {_shown(row['file'])} ({_shown(row['error'])})", file=sys.stderr)
    odd = _not_utf8(table["file"])
    if odd:
        print(f"note: {odd} file name(s) are not UTF-8; {_shown(args.out)} keeps their bytes as the file system holds them: "
              f"read it with pd.read_csv(path, encoding_errors=\"surrogateescape\").", file=sys.stderr)
    print(f"{len(table) - len(failed)} images predicted, {len(failed)} unreadable; top-{args.top_k} classes in {_shown(args.out)}; "
          f"{_size_note(size, saved, args.image_size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
