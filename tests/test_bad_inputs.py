"""Bad data, bad parameters and unsafe files get a clear error or warning, and loading goes on where it safely can."""

import io
import os
import shlex
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_images
from PIL import Image

import tlkit
from tlkit.checkpoints import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from tlkit.data import SkippedFilesWarning, UnreadableImageError
from tlkit.models import check_image_size
from tlkit.transforms import IMAGENET_NORM, to_rgb


def _jpeg_bytes(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels: the shape of a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("1", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def _two_classes(root: Path, n: int = 6) -> Path:
    write_images(root / "cats", n, (200, 40, 40), seed=0)
    write_images(root / "dogs", n, (40, 40, 200), seed=1)
    return root


def _skipped_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, SkippedFilesWarning)]


# --- bad data ----------------------------------------------------------------------------------


def test_truncated_and_corrupt_images_are_skipped_with_one_warning_naming_them(tmp_path):
    root = _two_classes(tmp_path / "pets")
    truncated, garbage = root / "cats" / "half.jpg", root / "dogs" / "garbage.png"
    truncated.write_bytes(_jpeg_bytes()[: len(_jpeg_bytes()) // 2])
    garbage.write_bytes(b"\x89PNG this is not really a png" * 10)
    with pytest.warns(SkippedFilesWarning) as record:
        splits = tlkit.load_dataset(str(root), val_fraction=0.5)
    messages = _skipped_warnings(record)
    assert len(messages) == 1 and "Skipped 2 unreadable image file(s)" in messages[0]
    assert str(truncated) in messages[0] and str(garbage) in messages[0] and "truncated" in messages[0]
    assert len(splits.train) + len(splits.val) == 12
    assert all(image.mode == "RGB" for image, _ in splits.train)


def test_a_class_with_no_readable_image_is_an_error(tmp_path):
    root = _two_classes(tmp_path / "pets")
    for i in range(2):
        (root / "birds").mkdir(exist_ok=True)
        (root / "birds" / f"b{i}.jpg").write_bytes(_jpeg_bytes(i)[:300])
    with pytest.raises(tlkit.data.DatasetUnavailableError, match="No image in class folder .*birds could be read") as info:
        tlkit.load_dataset(str(root))
    assert str(root / "birds" / "b0.jpg") in str(info.value) and "delete the folder" in str(info.value)


def test_non_image_files_are_ignored_and_only_unexpected_ones_are_mentioned(tmp_path):
    root = _two_classes(tmp_path / "pets")
    (root / "cats" / "notes.txt").write_text("fluffy")
    (root / "cats" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "dogs" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "dogs" / "._img_000.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    with pytest.warns(SkippedFilesWarning) as record:
        splits = tlkit.load_dataset(str(root), val_fraction=0.5)
    messages = _skipped_warnings(record)
    assert len(messages) == 1 and "not images by their extension" in messages[0]
    assert str(root / "cats" / "notes.txt") in messages[0]
    assert "DS_Store" not in messages[0] and "Thumbs.db" not in messages[0] and "._img" not in messages[0]
    assert len(splits.train) + len(splits.val) == 12


def test_every_image_mode_becomes_rgb_and_transparency_is_white(tmp_path):
    root = _two_classes(tmp_path / "pets")
    modes = root / "cats"
    see_through = np.zeros((8, 8, 4), dtype=np.uint8)  # black, fully transparent
    Image.fromarray(see_through, "RGBA").save(modes / "rgba.png")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(modes / "white16.png")
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(modes / "gray16.png")
    Image.new("L", (8, 8), 77).save(modes / "gray.png")
    Image.new("LA", (8, 8), (0, 0)).save(modes / "la.png")
    Image.new("P", (8, 8), 3).save(modes / "palette.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(modes / "cmyk.jpg")
    Image.new("1", (8, 8), 1).save(modes / "bilevel.bmp")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedFilesWarning)  # every mode is readable: nothing left out
        splits = tlkit.load_dataset(str(root), val_fraction=0.5)
    assert len(splits.train) + len(splits.val) == 20
    assert all(image.mode == "RGB" for ds in (splits.train, splits.val) for image, _ in ds)
    rgb = {p.name: to_rgb(Image.open(p)).getpixel((0, 0)) for p in modes.iterdir()}
    assert rgb["rgba.png"] == rgb["la.png"] == rgb["white16.png"] == (255, 255, 255)
    assert rgb["gray16.png"] == (128, 128, 128) and rgb["gray.png"] == (77, 77, 77)
    red, green, blue = rgb["cmyk.jpg"]
    assert red > 200 and green < 60 and blue < 60


def test_huge_images_are_skipped_with_a_clear_message(tmp_path):
    root = _two_classes(tmp_path / "pets")
    over_limit = int(Image.MAX_IMAGE_PIXELS**0.5) + 10  # Pillow warns above the limit...
    far_over = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 10  # ...and refuses above twice the limit
    (root / "cats" / "big.png").write_bytes(_png_declaring(over_limit, over_limit))
    (root / "dogs" / "bomb.png").write_bytes(_png_declaring(far_over, far_over))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        splits = tlkit.load_dataset(str(root), val_fraction=0.5)
    assert not [w for w in record if issubclass(w.category, Image.DecompressionBombWarning)]
    (message,) = _skipped_warnings(record)
    for name in ("big.png", "bomb.png"):
        assert f"{name}: too large for Pillow's decompression-bomb guard" in message
    assert "PIL.Image.MAX_IMAGE_PIXELS" in message and len(splits.train) + len(splits.val) == 12


def test_an_empty_class_folder_is_an_error(tmp_path):
    root = _two_classes(tmp_path / "pets")
    (root / "birds").mkdir()
    (root / "birds" / "readme.txt").write_text("to do")
    with pytest.raises(tlkit.data.DatasetUnavailableError, match=r"Class folder .*birds holds no images .*readme.txt.*Add images"):
        tlkit.load_dataset(str(root))


def test_a_single_class_is_an_error_that_spots_a_nested_dataset(tmp_path):
    write_images(tmp_path / "only" / "cats", 4, (200, 40, 40), seed=0)
    with pytest.raises(tlkit.data.DatasetUnavailableError, match=r"single class folder \('cats'\).*at least two classes"):
        tlkit.load_dataset(str(tmp_path / "only"))
    _two_classes(tmp_path / "outer" / "pets" / "train")
    _two_classes(tmp_path / "outer" / "pets" / "val", n=2)
    with pytest.raises(tlkit.data.DatasetUnavailableError, match=r"If .*outer/pets holds the dataset itself, pass dataset="):
        tlkit.load_dataset(str(tmp_path / "outer"))
    assert tlkit.load_dataset(str(tmp_path / "outer" / "pets")).classes == ["cats", "dogs"]


def test_train_and_val_class_folders_that_differ_say_which(tmp_path):
    root = tmp_path / "pets"
    _two_classes(root / "train")
    write_images(root / "val" / "cats", 2, (200, 40, 40), seed=2)
    write_images(root / "val" / "birds", 2, (40, 200, 40), seed=3)
    with pytest.raises(tlkit.data.DatasetUnavailableError) as info:
        tlkit.load_dataset(str(root))
    assert "only in train/: ['dogs']; only in val/: ['birds']" in str(info.value)


def test_a_missing_train_folder_is_an_error_not_a_class(tmp_path):
    root = tmp_path / "pets"
    _two_classes(root / "val", n=2)
    _two_classes(root / "test", n=2)
    with pytest.raises(tlkit.data.DatasetUnavailableError, match=r"has val/ and test/ but no train/ folder"):
        tlkit.load_dataset(str(root))


def test_classes_called_valid_or_test_are_classes(tmp_path):
    write_images(tmp_path / "docs" / "valid", 4, (200, 40, 40), seed=0)
    write_images(tmp_path / "docs" / "invalid", 4, (40, 40, 200), seed=1)
    assert tlkit.load_dataset(str(tmp_path / "docs"), val_fraction=0.5).classes == ["invalid", "valid"]


def test_train_without_val_is_split_by_seed_and_keeps_test(tmp_path):
    root = tmp_path / "pets"
    _two_classes(root / "train", n=10)
    _two_classes(root / "test", n=3)
    splits = tlkit.load_dataset(str(root), val_fraction=0.2, seed=0)
    assert splits.summary() == {"train": {"cats": 8, "dogs": 8}, "val": {"cats": 2, "dogs": 2}, "test": {"cats": 3, "dogs": 3}}


def test_a_path_that_does_not_exist_or_is_an_archive(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(tlkit.data.DatasetUnavailableError, match=r"Dataset folder .*no/such does not exist .*check the spelling"):
        tlkit.load_dataset(str(missing))
    with pytest.raises(tlkit.data.DatasetUnavailableError, match="does not exist"):
        tlkit.data.image_folder(missing)
    (tmp_path / "pets.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(tlkit.data.DatasetUnavailableError, match="is a file, not a folder: unpack it first"):
        tlkit.load_dataset(str(tmp_path / "pets.zip"))


def test_too_few_images_to_split_says_what_to_do(tmp_path):
    root = _two_classes(tmp_path / "pets", n=1)
    with pytest.raises(ValueError, match=r"Cannot split 2 images of 2 classes.*the smallest has 1.*add images"):
        tlkit.load_dataset(str(root))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_image_that_breaks_after_loading_names_the_file(tmp_path, num_workers):
    root = _two_classes(tmp_path / "pets")
    splits = tlkit.load_dataset(str(root), val_fraction=0.5)
    broken = root / "dogs" / "img_001.png"
    broken.write_bytes(b"overwritten by a failed sync")
    transform = tlkit.eval_transform(8, IMAGENET_NORM)
    with pytest.raises(UnreadableImageError, match=r"Could not read image .*dogs/img_001.png.*Delete or replace the file"):
        for ds in (splits.train, splits.val):
            for _ in tlkit.make_loader(ds, transform, 4, shuffle=False, num_workers=num_workers):
                pass


# --- bad parameters ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0() -> tlkit.TransferModel:
    return tlkit.create_model("efficientnet_lite0", 2, weights=None)


def test_unknown_backbone_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"Unknown backbone 'resnet_18'. Did you mean 'resnet18'\? Choose one of: efficientnet_lite0, "):
        tlkit.create_model("resnet_18", 2, weights=None)


def test_unknown_torchvision_weights_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"Unknown weights 'IMAGENET1K_V9' for resnet18.*IMAGENET1K_V1"):
        tlkit.create_model("resnet18", 2, weights="IMAGENET1K_V9")


@pytest.mark.parametrize(
    "call",
    [lambda m: tlkit.freeze(m, up_to="layer4"), lambda m: tlkit.unfreeze(m, ["layer4"]), lambda m: tlkit.set_trainable(m, ["layer4"])],
)
def test_unknown_block_name_lists_the_valid_names_in_order(lite0, call):
    with pytest.raises(ValueError) as info:
        call(lite0)
    assert f"Valid names, in order: {tlkit.block_names(lite0)}" in str(info.value) and "['layer4']" in str(info.value)


def test_one_block_name_given_as_a_string_is_one_name(lite0):
    tlkit.freeze(lite0)
    tlkit.unfreeze(lite0, "top")
    assert tlkit.trainable_blocks(lite0) == ["top", "head"]


def test_unknown_dataset_lists_the_registered_names_and_accepts_a_path(tmp_path):
    with pytest.raises(tlkit.data.DatasetUnavailableError) as info:
        tlkit.load_dataset("CIFAR-10", data_root=tmp_path)
    message = str(info.value)
    assert ", ".join(tlkit.data.REGISTERED_DATASETS) in message and "Did you mean 'cifar10'?" in message
    assert "or the path of an image folder" in message


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18"])
def test_image_size_too_small_names_the_minimum(backbone):
    with pytest.raises(ValueError, match=f"image_size=16 is too small for {backbone}.*at least 32"):
        check_image_size(backbone, 16)
    assert check_image_size(backbone, 32) == 32
    model = tlkit.create_model(backbone, 2, weights=None).eval()
    with pytest.raises(ValueError, match=f"An image size of 16x16 pixels is too small for {backbone}.*at least 32"):
        model(torch.zeros(1, 3, 16, 16))
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


@pytest.mark.parametrize("image_size", [0, -5, 22.5, "224", True])
def test_transforms_refuse_an_image_size_that_is_not_a_positive_whole_number(image_size):
    with pytest.raises(ValueError, match="image_size must be a whole number"):
        tlkit.eval_transform(image_size, IMAGENET_NORM)
    with pytest.raises(ValueError, match="image_size must be a whole number"):
        tlkit.train_transform(image_size, IMAGENET_NORM, "basic")


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_samples_per_class_out_of_range(value):
    with pytest.raises(ValueError, match=r"samples_per_class must be a whole number >= 1 \(or None"):
        tlkit.load_dataset("digits", samples_per_class=value)


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.2, "0.2"])
def test_val_fraction_out_of_range_even_when_folders_fix_the_split(split_folder, value):
    for dataset in ("digits", str(split_folder)):
        with pytest.raises(ValueError, match=r"val_fraction must be a number between 0 and 1 \(exclusive\)"):
            tlkit.load_dataset(dataset, val_fraction=value)


@pytest.mark.parametrize("batch_size", [0, -4, 2.5])
def test_make_loader_needs_a_positive_whole_batch_size(batch_size):
    ds = torch.utils.data.TensorDataset(torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"batch_size must be a whole number >= 1 \(e.g. 32\)"):
        tlkit.make_loader(ds, None, batch_size, shuffle=False)


# --- unsafe files --------------------------------------------------------------------------------


class _WritesMarker:
    """Unpickling this runs code: it creates the marker file, with Python's exec or with a shell command."""

    def __init__(self, marker: Path, via_shell: bool = False) -> None:
        self.marker, self.via_shell = marker, via_shell

    def __reduce__(self):
        if self.via_shell:
            return (os.system, (f"touch {shlex.quote(str(self.marker))}",))
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("via_shell, refused", [(False, "exec"), (True, os.system.__module__ + ".system")])
def test_a_malicious_checkpoint_is_refused_without_running_its_code(tmp_path, via_shell, refused):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"format": "tlkit-checkpoint-1", "model": _WritesMarker(marker, via_shell)}, path)
    model = tlkit.create_model("efficientnet_lite0", 2, weights=None)
    for load in (read_checkpoint, lambda p: load_checkpoint(p, model)):
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert "could not be loaded safely" in str(info.value) and "It is not a tlkit checkpoint" in str(info.value)
        assert f"(global {refused})" in str(info.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what an unsafe loader would do: the payload is live
    assert marker.exists()


def test_an_incomplete_checkpoint_says_so(tmp_path):
    model = tlkit.create_model("efficientnet_lite0", 2, weights=None)
    save_checkpoint(tmp_path / "c.pt", model, classes=["a", "b"], epoch=1)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    del raw["history"]
    torch.save(raw, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"incomplete tlkit checkpoint \(no history\)"):
        read_checkpoint(tmp_path / "c.pt")


def test_code_in_a_dataset_folder_is_never_run(tmp_path):
    root = _two_classes(tmp_path / "pets")
    marker = tmp_path / "pwned"
    payload = f"open({str(marker)!r}, 'w').close()\n"
    for name in ("evil.py", "__init__.py", "fake.png"):
        (root / "cats" / name).write_text(payload)
    (root / "__init__.py").write_text(payload)
    (root / "dogs" / "weights.pt").write_bytes(b"")
    torch.save({"x": _WritesMarker(marker)}, root / "dogs" / "evil.pt")
    with pytest.warns(SkippedFilesWarning):
        splits = tlkit.load_dataset(str(root), val_fraction=0.5)
    for ds in (splits.train, splits.val):
        for _ in tlkit.make_loader(ds, tlkit.eval_transform(8, IMAGENET_NORM), 4, shuffle=False):
            pass
    assert not marker.exists()
    assert len(splits.train) + len(splits.val) == 12
