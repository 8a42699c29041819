"""Reliability round two (issue 17): phone photos, split folders, mismatched models, parameters checked up front,
caches and checkpoints that cannot lie, progress while checking images, and the smaller layout cases."""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_images
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import TensorDataset

import tlkit
import tlkit._io
import tlkit.checkpoints
import tlkit.data
from tlkit.transforms import IMAGENET_NORM

REPO = Path(__file__).resolve().parents[1]


def _two_classes(root: Path, n: int = 4) -> Path:
    write_images(root / "cats", n, (200, 40, 40), seed=0)
    write_images(root / "dogs", n, (40, 40, 200), seed=1)
    return root


def _categories(record, category) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, category)]


# --- 1. phone photos: EXIF orientation ------------------------------------------------------------


def _sideways_photo(path: Path) -> None:
    """A 32 x 16 JPEG (red top half, blue bottom half as stored) whose EXIF says: rotate 90 degrees to view it."""
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:8] = (220, 20, 20)
    pixels[8:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def test_phone_photos_are_loaded_and_predicted_upright(tmp_path):
    root = tmp_path / "phone"
    for cls in ("cats", "dogs"):
        for i in range(2):
            _sideways_photo(root / cls / f"IMG_{i}.jpg")
    splits = tlkit.load_dataset(str(root), val_fraction=0.5)
    with Image.open(root / "cats" / "IMG_0.jpg") as stored:
        viewed = ImageOps.exif_transpose(stored).convert("RGB")
    image, _ = splits.train[0]
    assert image.size == viewed.size == (16, 32)  # portrait, as a viewer shows it (stored landscape)
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(viewed, dtype=int)).max() <= 2

    seen = []

    def transform(img):
        seen.append(img.size)
        return torch.zeros(3, 4, 4)

    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    with Image.open(root / "dogs" / "IMG_0.jpg") as photo:
        tlkit.predict_images(model, [photo], transform, ["cats", "dogs"])
    assert seen == [(16, 32)]

    eval_tf = tlkit.eval_transform(16, IMAGENET_NORM)  # on a photo opened directly, too
    with Image.open(root / "dogs" / "IMG_0.jpg") as photo:
        assert torch.equal(eval_tf(photo), eval_tf(ImageOps.exif_transpose(photo)))
    assert tlkit.transforms.is_deterministic(eval_tf)


# --- 2. split folders in any case, and split-like folders that are not classes -------------------------


def test_split_folders_are_recognised_in_any_letter_case(tmp_path):
    kaggle = tmp_path / "kaggle"
    _two_classes(kaggle / "Training", n=10)
    _two_classes(kaggle / "Testing", n=3)
    splits = tlkit.load_dataset(str(kaggle), val_fraction=0.2)
    assert splits.classes == ["cats", "dogs"]
    assert splits.summary() == {"train": {"cats": 8, "dogs": 8}, "val": {"cats": 2, "dogs": 2}, "test": {"cats": 3, "dogs": 3}}

    shouting = tmp_path / "shouting"
    _two_classes(shouting / "TRAIN")
    _two_classes(shouting / "VAL", n=2)
    splits = tlkit.load_dataset(str(shouting))
    assert splits.classes == ["cats", "dogs"] and splits.summary()["val"] == {"cats": 2, "dogs": 2}


@pytest.mark.parametrize(
    "layout, message",
    [
        (("training_set", "test_set"), r"look like split folders holding class folders \(cats/, dogs/\)"),
        (("2019", "2020"), r"every folder found as a class \(2019/, 2020/\) holds the same subfolders \(cats/, dogs/\)"),
    ],
)
def test_folders_that_hold_class_folders_are_not_classes(tmp_path, layout, message):
    root = tmp_path / "nested"
    for split in layout:
        _two_classes(root / split)
    with pytest.raises(tlkit.data.DatasetUnavailableError, match=message) as info:
        tlkit.load_dataset(str(root))
    assert "train/ and val/ (optionally test/" in str(info.value)


def test_split_folders_holding_images_directly_are_not_classes(tmp_path):
    root = tmp_path / "flat_splits"
    write_images(root / "train", 4, (200, 40, 40), seed=0)
    write_images(root / "test", 4, (40, 40, 200), seed=1)
    with pytest.raises(tlkit.data.DatasetUnavailableError, match=r"\(test/, train/\) look like split folders, not classes"):
        tlkit.load_dataset(str(root))


# --- 3. a model that does not match the data ---------------------------------------------------------


def _image_loader(tmp_path: Path, shuffle: bool = False):
    splits = tlkit.load_dataset(str(_two_classes(tmp_path / "pets")), val_fraction=0.5)
    return tlkit.make_loader(splits.train, tlkit.eval_transform(8, IMAGENET_NORM), 4, shuffle=shuffle)


def _tiny(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))


def test_a_model_with_more_outputs_than_classes_is_refused_before_training(tmp_path):
    loader = _image_loader(tmp_path)
    model = _tiny(10)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"fit \(train_loader\): the model's head has 10 outputs but the data has 2 classes") as info:
        tlkit.fit(model, loader, loader, epochs=1, progress=False)
    assert "tlkit.create_model(backbone, 2, ...)" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no batch ran
    with pytest.raises(ValueError, match="predict: the model's head has 10 outputs but the data has 2 classes"):
        tlkit.predict(model, loader)
    with pytest.raises(ValueError, match="predict_images: the model's head has 10 outputs but 2 class names"):
        tlkit.predict_images(model, [Image.new("RGB", (8, 8))], tlkit.eval_transform(8, IMAGENET_NORM), ["cats", "dogs"])


def test_a_model_with_fewer_outputs_than_labels_names_expand_head():
    data = TensorDataset(torch.randn(16, 5), torch.arange(16) % 4)
    loader = tlkit.make_loader(data, None, 4, shuffle=True, seed=0)
    with pytest.raises(ValueError, match=r"head has 2 outputs but the data has labels up to 3, so at least 4 classes") as info:
        tlkit.fit(nn.Linear(5, 2), loader, loader, epochs=1, progress=False)
    assert "tlkit.incremental.expand_head(model, 2)" in str(info.value)
    with pytest.raises(ValueError, match="evaluate: the model's head has 2 outputs"):
        tlkit.evaluate(nn.Linear(5, 2), loader)


def test_fit_head_checks_the_head_against_the_classes_of_the_features():
    model = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 10, weights=None))
    features = TensorDataset(torch.randn(8, model.num_features), torch.arange(8) % 2)
    features.classes = ["cats", "dogs"]  # as extract_features and cached_features name them
    with pytest.raises(ValueError, match="fit_head \\(train_features\\): the model's head has 10 outputs but the data has 2 classes"):
        tlkit.fit_head(model, features, features, epochs=1, batch_size=4, progress=False)


def test_the_head_check_goes_through_wrappers_and_soft_labels_without_reading_an_item():
    class Untouchable(torch.utils.data.Dataset):
        classes = ["a", "b", "c"]

        def __len__(self):
            return 6

        def __getitem__(self, i):
            raise AssertionError("the head check must not load items")

    class Wrapper(nn.Module):  # like tlkit.prefix_cache.SuffixModel: the TransferModel is .model
        def __init__(self, model):
            super().__init__()
            self.model = model

    inner = nn.Module()
    inner.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 3))
    loader = tlkit.make_loader(Untouchable(), lambda x: x, 2, shuffle=True)
    tlkit.train.check_head_fits(Wrapper(inner), loader)  # 3 outputs, 3 classes: passes without loading anything
    inner.head = nn.Linear(4, 5)
    with pytest.raises(ValueError, match="5 outputs but the data has 3 classes"):
        tlkit.train.check_head_fits(Wrapper(inner), loader)
    soft = TensorDataset(torch.randn(4, 2), torch.softmax(torch.randn(4, 6), 1))  # MixUp-style targets
    tlkit.train.check_head_fits(nn.Linear(2, 6), tlkit.make_loader(soft, None, 2, shuffle=False))
    with pytest.raises(ValueError, match="4 outputs but the data has 6 classes"):
        tlkit.train.check_head_fits(nn.Linear(2, 4), tlkit.make_loader(soft, None, 2, shuffle=False))


# --- 4. parameters checked before the long run ---------------------------------------------------------


def test_lists_given_as_text_are_parsed_or_explained():
    assert tlkit.params.parse_list("data_curve", "[]") == []
    assert tlkit.params.parse_list("data_curve", "[5, 10, null]") == [5, 10, None]
    assert tlkit.params.parse_list("data_curve", "[5, 10, None]") == [5, 10, None]
    assert tlkit.params.parse_list("data_curve", "5,10") == [5, 10]
    assert tlkit.params.parse_list("compare", "head, full") == ["head", "full"]
    assert tlkit.params.parse_list("data_curve", [5, None]) == [5, None]
    with pytest.raises(ValueError) as info:
        tlkit.params.parse_list("data_curve", "[5, 10")
    message = str(info.value)
    assert "data_curve must be a list" in message and "-y 'data_curve: [5, 10]'" in message and "-r data_curve '[5, 10]'" in message
    with pytest.raises(ValueError, match=r"data_curve\[1\] must be a whole number of at least 1 \(or None\), got 'x'"):
        tlkit.params.parse_list("data_curve", "[5, 'x']", item=tlkit.params.rule(tlkit.params.check_int, minimum=1, allow_none=True))


def test_numbers_seeds_and_text_are_checked_with_their_names():
    assert tlkit.params.check_int("epochs", "5", minimum=1) == 5
    with pytest.raises(ValueError, match="epochs must be a whole number of at least 1, got 0"):
        tlkit.params.check_int("epochs", 0, minimum=1)
    with pytest.raises(ValueError, match="batch_size must be a whole number of at least 1, got 3.5"):
        tlkit.params.check_int("batch_size", 3.5, minimum=1)
    assert tlkit.params.check_float("lr", "1e-3", positive=True) == 1e-3
    with pytest.raises(ValueError, match="lr must be a positive number, got -0.001"):
        tlkit.params.check_float("lr", -1e-3, positive=True)
    assert tlkit.params.check_seed_list("seeds", "0,1,2") == [0, 1, 2]
    for bad in ([0, 2**32], [-1], [0, 0], []):
        with pytest.raises(ValueError, match="seeds"):
            tlkit.params.check_seed_list("seeds", bad)
    assert tlkit.params.check_seed_list("scratch_seeds", "[]", allow_empty=True) == []
    with pytest.raises(ValueError, match=r"dataset must be a registered dataset name .* got ''"):
        tlkit.data.check_dataset("")
    assert tlkit.params.check_bool("progress", "false") is False


def _notebook_defaults(path: Path) -> dict:
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code" and "parameters" in c["metadata"].get("tags", []))
    values: dict = {}
    for node in ast.parse("".join(cell["source"])).body:  # only plain assignments: nothing to run
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


@pytest.mark.parametrize("notebook", sorted(p.name for p in (REPO / "notebooks").glob("0*.ipynb")))
def test_every_notebook_parameter_has_a_check_and_the_defaults_pass(notebook):
    defaults = _notebook_defaults(REPO / "notebooks" / notebook)
    assert set(tlkit.notebook_params.notebook_spec(notebook)) == set(defaults), "the spec in tlkit/notebook_params.py and the parameters cell differ"
    assert tlkit.check_notebook_parameters(notebook, defaults) == defaults


def test_a_bad_notebook_parameter_fails_with_its_name():
    defaults = _notebook_defaults(REPO / "notebooks" / "01_feature_extraction.ipynb")
    assert tlkit.check_notebook_parameters("01", {**defaults, "data_curve": "[]"})["data_curve"] == []
    assert tlkit.check_notebook_parameters("01", {**defaults, "data_curve": "[5, 10]"})["data_curve"] == [5, 10]
    for name, bad, message in [
        ("data_curve", "[", "data_curve must be a list"),
        ("seed", 2**32, "seed must be a whole number between 0 and 2\\*\\*32 - 1"),
        ("dataset", "", "dataset must be a registered dataset name"),
        ("epochs", 0, "epochs must be a whole number of at least 1"),
        ("image_size", 16, "too small for efficientnet_lite0"),
        ("larger_image_size", 16, "larger_image_size: image_size=16 is too small for efficientnet_lite0"),
    ]:
        with pytest.raises(ValueError, match=message):
            tlkit.check_notebook_parameters("01", {**defaults, name: bad})
    assert tlkit.check_notebook_parameters("01", {**defaults, "larger_image_size": None})["larger_image_size"] is None


def test_seeds_outside_numpys_range_and_an_empty_dataset_are_refused_up_front():
    for seed in (-1, 2**32):
        with pytest.raises(ValueError, match="seed must be a whole number between 0 and 2\\*\\*32 - 1"):
            tlkit.set_seed(seed)
    with pytest.raises(ValueError, match="seed must be a whole number between 0 and 2\\*\\*32 - 1"):
        tlkit.load_dataset("digits", seed=2**32)
    with pytest.raises(ValueError, match="dataset must be a registered dataset name"):
        tlkit.load_dataset("")


def test_a_second_fit_on_the_same_model_says_that_the_epoch_count_restarts():
    data = TensorDataset(torch.randn(16, 3), torch.arange(16) % 2)
    loader = tlkit.make_loader(data, None, 8, shuffle=False)
    model = nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tlkit.train.RepeatedFitWarning)
        first = tlkit.fit(model, loader, loader, epochs=2, progress=False)
    with pytest.warns(tlkit.train.RepeatedFitWarning, match=r"already trained this model for 2 epoch\(s\).*resume_from=") as record:
        tlkit.fit(model, loader, loader, epochs=1, progress=False)
    assert len(_categories(record, tlkit.train.RepeatedFitWarning)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", tlkit.train.RepeatedFitWarning)
        continued = tlkit.fit(model, loader, loader, epochs=1, progress=False, resume_from=first)
        assert continued.epoch == [1, 2, 3]  # the count goes on
        model.reset_parameters()  # a fresh start (as tlkit.fit_head_with_remedy does): no warning
        tlkit.fit(model, loader, loader, epochs=1, progress=False)


# --- 5. caches and checkpoints that cannot lie -----------------------------------------------------------


class _MeanFeatures(nn.Module):
    """A stand-in backbone: the feature vector is each channel's mean."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 2)

    def forward_features(self, x):
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.forward_features(x))


def _features(n: int, cache_dir: Path, model: nn.Module):
    g = torch.Generator().manual_seed(n)
    data = TensorDataset(torch.rand(n, 3, 4, 4, generator=g), torch.arange(n) % 2)
    return tlkit.cached_features(model, tlkit.make_loader(data, None, 4, shuffle=False), cache_dir=cache_dir, progress=False)


def test_a_feature_cache_with_altered_content_is_recomputed(tmp_path):
    model = _MeanFeatures()
    good = _features(12, tmp_path, model)
    (path,) = tmp_path.glob("features-*.pt")
    raw = torch.load(path, weights_only=True)
    raw[0][0, 0] += 1.0  # a flipped value: the file still loads fine
    torch.save(raw, path)
    with pytest.warns(UserWarning, match="damaged feature cache .*does not match the checksum"):
        again = _features(12, tmp_path, model)
    assert torch.equal(again.tensors[0], good.tensors[0])


def test_a_feature_cache_for_another_item_count_is_recomputed(tmp_path):
    model = _MeanFeatures()
    _features(12, tmp_path, model)
    (twelve,) = tmp_path.glob("features-*.pt")
    good = _features(8, tmp_path, model)
    (eight,) = set(tmp_path.glob("features-*.pt")) - {twelve}
    shutil.copy(twelve, eight)  # a consistent file, for other data
    with pytest.warns(UserWarning, match=r"features are torch.float32 \(12, 3\), expected torch.float32 \(8, 3\)"):
        again = _features(8, tmp_path, model)
    assert torch.equal(again.tensors[0], good.tensors[0])


@pytest.fixture
def unwritable(monkeypatch):
    """Make a folder unwritable: by its permissions, or, for root (whom permissions do not stop), as the OS would refuse it."""

    def make(folder: Path) -> None:
        if os.geteuid() != 0:
            folder.chmod(0o500)
            return
        real = open

        def refuse(file, mode="r", *args, **kwargs):
            if "w" in mode and Path(file).parent == folder:
                raise PermissionError(13, "Permission denied", str(file))
            return real(file, mode, *args, **kwargs)

        monkeypatch.setattr(tlkit._io, "open", refuse, raising=False)  # tlkit._io writes every file tlkit saves

    yield make


def test_a_checkpoint_into_an_unwritable_folder_names_the_target_and_fit_keeps_the_epochs(tmp_path, unwritable):
    folder = tmp_path / "readonly"
    folder.mkdir()
    target = folder / "model.pt"
    data = TensorDataset(torch.randn(16, 3), torch.arange(16) % 2)
    loader = tlkit.make_loader(data, None, 8, shuffle=False)

    def lock_after_epoch_2(state):
        if len(state.history) == 2:
            unwritable(folder)

    with pytest.raises(tlkit.checkpoints.CheckpointSaveError) as info:
        tlkit.fit(nn.Linear(3, 2), loader, loader, epochs=5, progress=False,
                  callbacks=[tlkit.SaveCheckpoint(target, ["x", "y"]), lock_after_epoch_2])
    message = str(info.value)
    assert message.startswith(f"Could not write {target} (Permission denied)") and ".tmp" not in message
    assert info.value.history.epoch == [1, 2, 3]  # the epochs done are not lost
    assert "Training stopped after epoch 3" in message and "err.history" in message
    assert tlkit.read_checkpoint(target).epoch == 2  # the last checkpoint that could be written


def test_checkpoints_and_caches_get_the_users_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = tlkit.checkpoints.save_checkpoint(tmp_path / "c.pt", nn.Linear(3, 2), classes=["x", "y"], epoch=1)
        _features(4, tmp_path / "cache", _MeanFeatures())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    (cache,) = (tmp_path / "cache").glob("features-*.pt")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o644


# --- 6. a progress bar and a summary while images are checked --------------------------------------------


def test_a_slow_image_check_shows_progress_and_says_what_was_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tlkit.data, "PROGRESS_AFTER_S", 0.0)  # as if the folder were large
    root = _two_classes(tmp_path / "pets")
    tlkit.load_dataset(str(root), val_fraction=0.5)
    out, err = capsys.readouterr()
    assert f"Checked 8 images in {root} in " in out and "each was decoded once" in out
    assert f"checking images in {root}" in err  # the progress bar


# --- 7. nested folders, links, GIF and HEIC, and where the outputs go -----------------------------------------


def test_nested_and_linked_subfolders_are_used_with_one_warning_and_broken_links_are_listed(tmp_path):
    root = _two_classes(tmp_path / "pets")
    write_images(root / "cats" / "2019", 3, (200, 40, 40), seed=5)
    write_images(tmp_path / "elsewhere", 2, (40, 40, 200), seed=6)
    (root / "dogs" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "dogs" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (root / "cats" / "loop").symlink_to(root / "cats", target_is_directory=True)  # must not recurse forever
    with pytest.warns(UserWarning) as record:
        splits = tlkit.load_dataset(str(root), val_fraction=0.5)
    (nested,) = _categories(record, tlkit.data.NestedFoldersWarning)
    assert f"{root / 'cats' / '2019'}: 3 image(s)" in nested
    assert f"{root / 'dogs' / 'more'}: 2 image(s) (through a link: {tmp_path / 'elsewhere'})" in nested
    (skipped,) = _categories(record, tlkit.data.SkippedFilesWarning)
    assert f"{root / 'dogs' / 'gone.jpg'}: broken link" in skipped
    summary = splits.summary()
    assert {c: summary["train"][c] + summary["val"][c] for c in splits.classes} == {"cats": 4 + 3, "dogs": 4 + 2}


def test_gif_is_read_as_its_first_frame_and_heic_gets_a_converter_hint(tmp_path):
    root = _two_classes(tmp_path / "pets")
    frames = [Image.new("RGB", (16, 16), (230, 20, 20)), Image.new("RGB", (16, 16), (20, 20, 230))]
    frames[0].save(root / "cats" / "wave.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (root / "dogs" / "IMG_1234.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.warns(tlkit.data.SkippedFilesWarning) as record:
        splits = tlkit.load_dataset(str(root), val_fraction=0.5)
    (skipped,) = _categories(record, tlkit.data.SkippedFilesWarning)
    assert "IMG_1234.HEIC" in skipped and "pip install pillow-heif" in skipped and "sips -s format jpeg" in skipped
    everything = [image for ds in (splits.train, splits.val) for image, _ in ds]
    assert len(everything) == 9
    gif = [image for image in everything if image.size == (16, 16)]
    assert len(gif) == 1 and gif[0].mode == "RGB" and gif[0].getpixel((8, 8))[0] > 200  # the first (red) frame


def test_notebook_paths_are_resolved_against_the_notebooks_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # e.g. papermill started from the repository root, or anywhere else
    assert tlkit.resolve_path("../outputs").resolve() == REPO / "outputs"
    assert tlkit.resolve_path("../data").resolve() == REPO / "data"
    assert tlkit.resolve_path(tmp_path / "out") == tmp_path / "out"
    assert tlkit.resolve_path("out", base=tmp_path) == Path("out")  # relative to the current folder: short to print
    monkeypatch.chdir(REPO / "notebooks")  # where Jupyter runs the notebooks: the defaults stay as they are
    assert tlkit.resolve_path("../outputs") == Path("../outputs")
