"""Predict with a saved model outside a notebook: the last step of the workflow (train, save, reload, predict).

    python -m tlkit.predict outputs/05_updated_model.pt photos/ --out predictions.csv
    python -m tlkit.predict model.pt a.jpg b.png --top-k 5 --image-size 160 --device cuda

Every image file in the folders (searched recursively) and every file named is read upright (EXIF orientation),
as in training; the CSV has one row per file: its top-k classes and probabilities. A file that cannot be read is
listed in the CSV's ``error`` column and on stderr, and the others are still predicted.

``python -m tlkit.predict`` runs ``main``; so does ``python -m tlkit.inference``. The functions live here: the name
``tlkit.predict`` belongs to the function that predicts a loader, so ``tlkit/predict.py`` is a command only.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from .checkpoints import model_from_checkpoint
from .data import HEIF_EXTENSIONS, IMAGE_EXTENSIONS
from .train import get_device, predict_images
from .transforms import eval_transform, read_image_file

DEFAULT_IMAGE_SIZE = 128  # the course's training size; pass the size the model was trained at


@dataclass
class Unreadable:
    path: Path
    reason: str


def image_files(inputs: list[str | Path]) -> list[Path]:
    """The image files named in ``inputs`` and those inside the folders among them (recursively, sorted), each once."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS + HEIF_EXTENSIONS)
        elif item.exists():
            found.append(item)
        else:
            raise FileNotFoundError(f"{item} does not exist: pass image files or folders of images.")
    return list(dict.fromkeys(found))


def _load(path: Path) -> Image.Image | Unreadable:
    try:
        return read_image_file(path)
    except Exception as err:  # any file that does not decode is reported, not fatal
        return Unreadable(path, f"{type(err).__name__}: {err}")


def predict_files(
    checkpoint: str | Path,
    inputs: list[str | Path],
    *,
    top_k: int = 3,
    image_size: int = DEFAULT_IMAGE_SIZE,
    batch_size: int = 32,
    device: str = "auto",
) -> pd.DataFrame:
    """One row per file: ``file``, ``class_1``, ``prob_1`` ... ``class_k``, ``prob_k`` and ``error`` (empty when read)."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    model, saved = model_from_checkpoint(checkpoint)
    transform = eval_transform(image_size, model.normalization)
    dev = get_device(device)
    files = image_files(inputs)
    if not files:
        raise ValueError(f"No image files in {[str(i) for i in inputs]} (accepted: {', '.join(IMAGE_EXTENSIONS)}).")
    rows = []
    for start in range(0, len(files), batch_size):
        loaded = [(path, _load(path)) for path in files[start : start + batch_size]]
        images = [(path, img) for path, img in loaded if not isinstance(img, Unreadable)]
        guesses = predict_images(model, [img for _, img in images], transform, saved.classes, device=dev, top_k=top_k) if images else []
        by_path = {path: guess for (path, _), guess in zip(images, guesses)}
        for path, img in loaded:
            row: dict[str, object] = {"file": str(path)}
            for k, (name, prob) in enumerate(by_path.get(path, []), start=1):
                row[f"class_{k}"], row[f"prob_{k}"] = name, round(prob, 4)
            row["error"] = img.reason if isinstance(img, Unreadable) else ""
            rows.append(row)
    columns = ["file"] + [c for k in range(1, min(top_k, len(saved.classes)) + 1) for c in (f"class_{k}", f"prob_{k}")] + ["error"]
    return pd.DataFrame(rows).reindex(columns=columns)


def main(argv: list[str] | None = None, prog: str = "python -m tlkit.inference") -> int:
    """The command line: parse ``argv`` (default: ``sys.argv[1:]``), write the CSV, return the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by tlkit (fit(callbacks=[SaveCheckpoint(...)]) or save_checkpoint)")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"))
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="the size the model was trained at")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help='"auto" (CUDA when present), "cpu" or "cuda"')
    args = parser.parse_args(argv)
    try:
        table = predict_files(args.checkpoint, args.inputs, top_k=args.top_k, image_size=args.image_size,
                              batch_size=args.batch_size, device=args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    failed = table[table["error"] != ""]
    for _, row in failed.iterrows():
        print(f"unreadable: {row['file']} ({row['error']})", file=sys.stderr)
    print(f"{len(table) - len(failed)} images predicted, {len(failed)} unreadable; top-{args.top_k} classes in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
