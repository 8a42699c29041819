"""Build the course's bundled photo set, ``tlkit/_bundled/clothing``, from the full clothing-dataset-small.

The full set (CC0, 10 classes, train 3,068 / validation 341 / test 372) is Alexey Grigorev's
github.com/alexeygrigorev/clothing-dataset-small. The bundle keeps every class, a seeded share of each
training class (so the natural long tail stays, for notebook 04), the whole validation and test splits,
each photo resized to ``--short-side`` pixels on its shorter side and re-encoded as JPEG.

    python scripts/bundle_clothing.py --source ../shared/data/clothing-dataset-small

Deterministic: the same source and options give the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

from PIL import Image, ImageOps

SPLITS = ("train", "validation", "test")
OUT = Path(__file__).resolve().parents[1] / "tlkit" / "_bundled" / "clothing"
SOURCE_URL = "https://github.com/alexeygrigorev/clothing-dataset-small"


def chosen_files(folder: Path, fraction: float, seed: int) -> list[Path]:
    """A seeded ``fraction`` of a class folder's images (all of them for fraction 1), in name order."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if fraction >= 1:
        return files
    keep = max(1, round(len(files) * fraction))
    return sorted(random.Random(f"{seed}/{folder.name}").sample(files, keep))


def shrink(source: Path, target: Path, short_side: int, quality: int) -> None:
    """The photo as a viewer shows it (EXIF orientation applied), shorter side ``short_side``, baseline JPEG."""
    with Image.open(source) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    scale = short_side / min(im.size)
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    im.save(target, "JPEG", quality=quality, optimize=True)


def readme(counts: dict[str, dict[str, int]], args: argparse.Namespace, total_bytes: int) -> str:
    classes = sorted(counts["train"])
    header = "| class | " + " | ".join(SPLITS) + " |\n|---|" + "---:|" * len(SPLITS) + "\n"
    rows = "".join(f"| {c} | " + " | ".join(str(counts[s][c]) for s in SPLITS) + " |\n" for c in classes)
    totals = "| **all** | " + " | ".join(str(sum(counts[s].values())) for s in SPLITS) + " |\n"
    return (
        "# clothing: the course's bundled photos\n\n"
        f"Photos of clothes in 10 classes from Alexey Grigorev's *clothing-dataset-small* ({SOURCE_URL}),\n"
        "released under CC0 1.0 (public domain dedication; see LICENSE, copied from the source). Thanks to the\n"
        "dataset's author and its contributors (Kenes Shangereyev and Tagias.com, and the 32 people who gave\n"
        "their photos).\n\n"
        f"Made by `python scripts/bundle_clothing.py` (seed {args.seed}): {args.train_fraction:.0%} of each training class,\n"
        f"the whole validation and test splits, shorter side {args.short_side} px, JPEG quality {args.quality};\n"
        f"{total_bytes / 2**20:.1f} MiB in all. `tlkit.load_dataset(\"clothing\")` loads it; `\"clothing_full\"` downloads the\n"
        "whole set (3,068 training photos).\n\n" + header + rows + totals
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="the unpacked clothing-dataset-small folder")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--train-fraction", type=float, default=0.25)
    parser.add_argument("--short-side", type=int, default=160)
    parser.add_argument("--quality", type=int, default=70)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        fraction = args.train_fraction if split == "train" else 1.0
        counts[split] = {}
        for folder in sorted(p for p in (args.source / split).iterdir() if p.is_dir()):
            files = chosen_files(folder, fraction, args.seed)
            for f in files:
                shrink(f, args.out / split / folder.name / f"{f.stem}.jpg", args.short_side, args.quality)
            counts[split][folder.name] = len(files)
    shutil.copy(args.source / "LICENSE", args.out / "LICENSE")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    (args.out / "README.md").write_text(readme(counts, args, total))
    largest = max(p.stat().st_size for p in args.out.rglob("*.jpg"))
    print(f"wrote {args.out}: {sum(sum(c.values()) for c in counts.values())} photos, {total / 2**20:.1f} MiB, largest {largest / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
