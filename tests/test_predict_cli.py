"""python -m tlkit.predict as a careful user and a careless one use it (issue 32): nothing a user has is overwritten,
every problem is one line and exit 2 before anything is predicted, memory is bounded, folders are read as training
reads them, the training size comes from the checkpoint, and any file name works."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import weakref
import zlib
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import write_images
from PIL import Image

import tlkit
import tlkit.inference
from tlkit.checkpoints import read_checkpoint, save_checkpoint
from tlkit.inference import main, predict_files

CLASSES = ["red", "green", "blue"]
PROG = "python -m tlkit.inference"


@pytest.fixture(scope="module")
def model():
    tlkit.set_seed(0)
    return tlkit.create_model("efficientnet_lite0", len(CLASSES), weights=None)


@pytest.fixture
def checkpoint(model, tmp_path) -> Path:
    """A checkpoint that records its training size (64 px), in this test's own folder (some tests try to overwrite it)."""
    return save_checkpoint(tmp_path / "model.pt", model, classes=CLASSES, epoch=1, image_size=64)


@pytest.fixture
def images(tmp_path) -> Path:
    write_images(tmp_path / "new", 3, (200, 30, 30), seed=1, size=40)
    return tmp_path / "new"


def _run(*args: object) -> int:
    return main([str(a) for a in args] + ["--device", "cpu"], prog=PROG)


def _one_line(err: str) -> str:
    assert err.startswith(f"{PROG}: ") and err.count("\n") == 1, err
    return err


# --- case 1: --out never destroys the checkpoint, an input or a file that is not a CSV ----------------------------


def test_out_onto_the_checkpoint_or_an_input_image_is_refused_and_both_stay_whole(checkpoint, images, capsys):
    model_bytes, image = checkpoint.read_bytes(), images / "img_000.png"
    image_bytes = image.read_bytes()
    assert _run(checkpoint, images, "--out", checkpoint) == 2
    assert "is the checkpoint: writing the CSV would replace the model" in _one_line(capsys.readouterr().err)
    assert _run(checkpoint, images, "--out", image, "--force") == 2  # --force never allows destroying an input
    assert f"is one of the input images ({image})" in _one_line(capsys.readouterr().err)
    assert checkpoint.read_bytes() == model_bytes and image.read_bytes() == image_bytes


def test_an_existing_file_that_is_not_a_csv_is_replaced_only_with_force(checkpoint, images, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert _run(checkpoint, images, "--out", notes) == 2
    assert "exists and is not a CSV file (.csv): it is left alone. Name a .csv file, or pass --force" in _one_line(capsys.readouterr().err)
    assert notes.read_text() == "my notes"
    assert _run(checkpoint, images, "--out", notes, "--force") == 0
    assert len(pd.read_csv(notes)) == 3


def test_a_write_that_fails_leaves_the_previous_csv_whole(checkpoint, images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "predictions.csv"
    out.write_text("file,class_1\nold.png,red\n")

    def half_written(self, path, *args, **kwargs):  # a full disk after the first bytes
        Path(path).write_text("file,cla")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_written)
    assert _run(checkpoint, images, "--out", out) == 2
    assert f"Could not write {out} (No space left on device): the disk is full" in _one_line(capsys.readouterr().err)
    assert out.read_text() == "file,class_1\nold.png,red\n" and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))  == []


# --- case 6: an unwritable --out is refused first -----------------------------------------------------------------


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """The image files predict decodes (through tlkit.inference.read_image_file)."""
    done, real = [], tlkit.inference.read_image_file
    monkeypatch.setattr(tlkit.inference, "read_image_file", lambda path, *a, **k: done.append(path) or real(path, *a, **k))
    return done


def test_an_out_folder_that_cannot_be_made_is_refused_before_any_image_is_read(checkpoint, images, tmp_path, reads, capsys):
    (tmp_path / "a_file").write_text("")
    assert _run(checkpoint, images, "--out", tmp_path / "a_file" / "predictions.csv") == 2
    err = _one_line(capsys.readouterr().err)
    assert f"the folder of --out {tmp_path / 'a_file'} cannot be written to (Not a directory)" in err and reads == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a user the file permissions apply to")
def test_a_read_only_out_folder_is_refused_before_any_image_is_read(checkpoint, images, tmp_path, reads, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert _run(checkpoint, images, "--out", locked / "predictions.csv") == 2
    finally:
        locked.chmod(0o700)
    assert f"the folder of --out {locked} cannot be written to (Permission denied)" in _one_line(capsys.readouterr().err) and reads == []


# --- case 10: memory bounded by image size and batch ---------------------------------------------------------------


def test_one_full_size_image_is_decoded_at_a_time_whatever_the_batch(checkpoint, images, monkeypatch):
    decoded: list[weakref.ref] = []  # Pillow images are unhashable: no WeakSet
    most_alive_at_a_read, real = [], tlkit.inference.read_image_file

    def tracked(path, *args, **kwargs):
        most_alive_at_a_read.append(sum(ref() is not None for ref in decoded))
        image = real(path, *args, **kwargs)
        decoded.append(weakref.ref(image))
        return image

    monkeypatch.setattr(tlkit.inference, "read_image_file", tracked)
    table = predict_files(checkpoint, [images], batch_size=8, device="cpu")
    assert len(table) == 3 and (table["error"] == "").all()
    assert most_alive_at_a_read == [0, 0, 0]  # each decoded image was gone before the next one was read


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's shape)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_an_image_claiming_more_pixels_than_tlkit_decodes_is_listed_with_the_reason(checkpoint, images, capsys):
    _png_claiming(images / "bomb.png", 9000, 9000)
    assert _run(checkpoint, images, "--out", images.parent / "p.csv") == 0
    table = pd.read_csv(images.parent / "p.csv", keep_default_na=False)
    bomb = table[table["file"].str.endswith("bomb.png")].iloc[0]
    assert "ImageTooLargeError" in bomb["error"] and "MAX_DECODE_PIXELS" in bomb["error"] and bomb["class_1"] == ""
    assert (table["error"] == "").sum() == 3 and "unreadable: " in capsys.readouterr().err


# --- case 11: clear errors, checked arguments, the training size, folders as training reads them -----------------


class Payload:
    """Not a tensor or plain data: torch.load(weights_only=True) refuses it."""


def _bad_checkpoint(kind: str, good: Path) -> Path:
    path = good.with_name(f"{kind}.pt")
    if kind == "not_a_checkpoint":
        path.write_text("file,class_1\n")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "pickled_object":
        torch.save({"format": "tlkit-checkpoint-1", "model": Payload()}, path)
    return path


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", "No checkpoint at"),
    ("not_a_checkpoint", "could not be loaded safely"),
    ("truncated", "it is truncated or corrupted"),
    ("pickled_object", "it holds pickled Python objects"),
])
def test_a_missing_or_refused_checkpoint_is_one_line_and_exit_2(checkpoint, images, tmp_path, kind, message, capsys):
    bad = _bad_checkpoint(kind, checkpoint)
    assert _run(bad, images, "--out", tmp_path / "p.csv") == 2
    err = _one_line(capsys.readouterr().err)
    assert str(bad) in err and message in err and not (tmp_path / "p.csv").exists()


def test_out_naming_an_existing_folder_is_one_line_and_exit_2(checkpoint, images, tmp_path, capsys):
    assert _run(checkpoint, images, "--out", tmp_path) == 2
    assert f"--out {tmp_path} is a folder: name the CSV file to write, e.g. --out {tmp_path / 'predictions.csv'}" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--batch-size", "0", "argument --batch-size: must be at least 1, got 0"),
    ("--batch-size", "-1", "argument --batch-size: must be at least 1, got -1"),
    ("--top-k", "0", "argument --top-k: must be at least 1, got 0"),
    ("--image-size", "5000", "argument --image-size: image_size=5000 is over the largest tlkit accepts"),
])
def test_counts_and_sizes_out_of_range_are_refused_by_argparse(checkpoint, images, option, value, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        _run(checkpoint, images, option, value)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_the_training_size_recorded_in_the_checkpoint_is_the_default_and_image_size_wins(model, checkpoint, images, tmp_path, capsys):
    assert read_checkpoint(checkpoint).image_size == 64
    recorded = predict_files(checkpoint, [images], device="cpu")
    assert recorded.attrs["image_size"] == 64 and recorded.equals(predict_files(checkpoint, [images], image_size=64, device="cpu"))
    assert predict_files(checkpoint, [images], image_size=96, device="cpu").attrs["image_size"] == 96
    assert _run(checkpoint, images, "--out", tmp_path / "p.csv") == 0
    assert "images resized to 64 px (the checkpoint's training size)" in capsys.readouterr().out
    unrecorded = save_checkpoint(tmp_path / "old.pt", model, classes=CLASSES, epoch=1)  # as checkpoints saved before
    assert read_checkpoint(unrecorded).image_size is None
    assert predict_files(unrecorded, [images], device="cpu").attrs["image_size"] == tlkit.inference.DEFAULT_IMAGE_SIZE
    with pytest.raises(ValueError, match="image_size must be a whole number of pixels"):
        save_checkpoint(tmp_path / "bad.pt", model, classes=CLASSES, epoch=1, image_size=0)


def test_folders_are_read_as_training_reads_them(checkpoint, tmp_path):
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    write_images(photos, 1, (200, 30, 30), seed=1)
    write_images(elsewhere, 2, (30, 30, 200), seed=2)
    write_images(photos / ".thumbnails", 1, (30, 200, 30), seed=3)  # a hidden folder
    shutil.copy(photos / "img_000.png", photos / ".hidden.png")
    (photos / "._img_000.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # AppleDouble file beside a copy
    for name in ("Thumbs.db", "desktop.ini", ".DS_Store"):
        (photos / name).write_bytes(b"system file")
    (photos / "linked_folder").symlink_to(elsewhere, target_is_directory=True)
    (photos / "linked.png").symlink_to(elsewhere / "img_000.png")
    (photos / "gone.png").symlink_to(tmp_path / "deleted.png")
    table = predict_files(checkpoint, [photos], device="cpu").set_index("file")
    expected = ["gone.png", "img_000.png", "linked.png", "linked_folder/img_000.png", "linked_folder/img_001.png"]
    assert sorted(str(Path(f).relative_to(photos)) for f in table.index) == expected
    assert table.loc[str(photos / "gone.png"), "error"].startswith("broken link: it points to")
    assert (table.drop(str(photos / "gone.png"))["error"] == "").all()


# --- case 13: any file name the file system holds -----------------------------------------------------------------


def test_a_file_name_whose_bytes_are_not_utf8_is_predicted_and_named_in_the_csv(checkpoint, images, tmp_path, capsys):
    odd = images / os.fsdecode(b"bad\xff.png")
    shutil.copy(images / "img_000.png", odd)
    out = tmp_path / "p.csv"
    assert _run(checkpoint, images, "--out", out) == 0
    assert 'note: 1 file name(s) are not UTF-8' in capsys.readouterr().err
    assert b"bad\xff.png" in out.read_bytes()  # the name's own bytes, as the file system holds them
    table = pd.read_csv(out, keep_default_na=False, encoding_errors="surrogateescape").set_index("file")
    assert table.loc[str(odd), "error"] == "" and table.loc[str(odd), "class_1"] in CLASSES
    assert Path(table.index[0]).exists()  # each row opens its file again
