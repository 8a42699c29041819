import contextlib
import functools
import http.server
import shutil
import threading
import urllib.error
from collections import Counter
from pathlib import Path

import pytest
import torch

import tlkit
from tlkit.data import HYMENOPTERA_URL
from tlkit.transforms import IMAGENET_NORM


def test_digits_split_is_stratified_and_deterministic():
    a = tlkit.load_dataset("digits", seed=0)
    b = tlkit.load_dataset("digits", seed=0)
    c = tlkit.load_dataset("digits", seed=1)
    assert len(a.train) + len(a.val) == 1797 and a.classes == [str(i) for i in range(10)]
    assert a.val.indices == b.val.indices and a.val.indices != c.val.indices
    assert not set(a.train.indices) & set(a.val.indices)
    val_counts = Counter(a.val.targets)
    assert max(val_counts.values()) - min(val_counts.values()) <= 2
    image, label = a.train[0]
    assert image.mode == "RGB" and image.size == (8, 8) and 0 <= label < 10


def test_samples_per_class_limits_train_only():
    splits = tlkit.load_dataset("digits", seed=0, samples_per_class=3)
    assert Counter(splits.train.targets) == {k: 3 for k in range(10)}
    assert len(splits.val) == 360
    with pytest.raises(ValueError, match="samples_per_class"):
        splits.train.limit_per_class(0, seed=0)


def test_flat_class_folder_is_split_by_seed(class_folder):
    splits = tlkit.load_dataset(str(class_folder), seed=0, val_fraction=0.25)
    assert splits.classes == ["blue", "green", "red"]
    assert splits.summary()["val"] == {"blue": 3, "green": 3, "red": 3}
    assert splits.train[0][0].mode == "RGB"


def test_train_val_folders_are_used_as_given(split_folder):
    splits = tlkit.load_dataset(str(split_folder))
    assert splits.summary() == {"train": {"ants": 8, "bees": 8}, "val": {"ants": 4, "bees": 4}}


def test_train_and_val_with_different_classes_is_an_error(split_folder):
    (split_folder / "val" / "wasps").mkdir()
    with pytest.raises(tlkit.data.DatasetUnavailableError, match="different class folders"):
        tlkit.load_dataset(str(split_folder))


def test_unknown_dataset_names_the_registered_ones(tmp_path):
    with pytest.raises(tlkit.data.DatasetUnavailableError, match="Unknown dataset 'nope'.*clothing, clothing_full, digits, hymenoptera"):
        tlkit.load_dataset("nope", data_root=tmp_path)


def test_failed_download_says_where_to_put_the_data(monkeypatch, tmp_path):
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(tlkit.data.DatasetUnavailableError) as info:
        tlkit.load_dataset("hymenoptera", data_root=tmp_path)
    assert HYMENOPTERA_URL in str(info.value) and str(tmp_path) in str(info.value)
    assert "dataset='clothing'" in str(info.value)


def test_downloaded_dataset_already_on_disk_is_used(split_folder, tmp_path):
    split_folder.rename(tmp_path / "hymenoptera_data")
    splits = tlkit.load_dataset("hymenoptera", data_root=tmp_path)
    assert splits.classes == ["ants", "bees"] and len(splits.train) == 16


def test_eval_transform_is_deterministic_and_train_preset_can_augment(class_folder):
    image = tlkit.load_dataset(str(class_folder)).train[0][0]
    eval_tf = tlkit.eval_transform(32, IMAGENET_NORM)
    x = eval_tf(image)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, eval_tf(image))
    assert tlkit.transforms.is_deterministic(tlkit.train_transform(32, IMAGENET_NORM, "none"))
    assert not tlkit.transforms.is_deterministic(tlkit.train_transform(32, IMAGENET_NORM, "basic"))


def test_loader_order_depends_only_on_seed():
    ds = torch.utils.data.TensorDataset(torch.arange(20), torch.zeros(20, dtype=torch.long))
    order = lambda seed: torch.cat([x for x, _ in tlkit.make_loader(ds, None, 5, shuffle=True, seed=seed)]).tolist()
    assert order(3) == order(3) and order(3) != order(4)


def test_bundled_clothing_photos_load_offline_with_a_test_split_and_their_long_tail():
    splits = tlkit.load_dataset("clothing")
    assert splits.name == "clothing" and len(splits.classes) == 10 and splits.test is not None
    counts = splits.summary()
    assert sum(counts["validation" if "validation" in counts else "val"].values()) == 341
    assert sum(counts["test"].values()) == 372
    train = counts["train"]
    assert max(train.values()) / min(train.values()) > 5  # the natural long tail is kept (t-shirt vs skirt)
    image, label = splits.train[0]
    assert image.mode == "RGB" and min(image.size) == 160 and 0 <= label < 10


def test_bundled_photos_are_small_files_with_their_licence():
    folder = tlkit.data.BUNDLED_CLOTHING
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert (folder / "LICENSE").read_text().startswith("Creative Commons Legal Code")
    assert "CC0" in (folder / "README.md").read_text()
    assert max(p.stat().st_size for p in files) < 2**20
    assert sum(p.stat().st_size for p in files) < 12 * 2**20


@contextlib.contextmanager
def served_folder(folder: Path):
    """An HTTP server on the loopback address serving ``folder``, stopped on exit."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_clothing_full_downloads_the_archive_once_through_the_download_path(monkeypatch, tmp_path, split_folder):
    source = tmp_path / "src" / "clothing-dataset-small-master"
    shutil.copytree(split_folder, source)
    served = tmp_path / "served"
    served.mkdir()
    shutil.make_archive(str(served / "master"), "zip", root_dir=tmp_path / "src")
    data_root = tmp_path / "data"
    with served_folder(served) as url:
        monkeypatch.setattr(tlkit.data, "CLOTHING_URL", f"{url}/master.zip")
        splits = tlkit.load_dataset("clothing_full", data_root=data_root)
    assert splits.name == "clothing_full" and splits.classes == ["ants", "bees"] and len(splits.train) == 16
    # a second load needs neither the server nor a network
    assert len(tlkit.load_dataset("clothing_full", data_root=data_root).val) == 8


def test_clothing_full_offline_names_the_archive_and_the_bundled_set(monkeypatch, tmp_path):
    with served_folder(tmp_path) as url:  # serves nothing called missing.zip: a 404
        monkeypatch.setattr(tlkit.data, "CLOTHING_URL", f"{url}/missing.zip")
        with pytest.raises(tlkit.data.DatasetUnavailableError) as info:
            tlkit.load_dataset("clothing_full", data_root=tmp_path / "data")
    message = str(info.value)
    assert "missing.zip" in message and str(tmp_path / "data") in message and "dataset='clothing'" in message


def test_a_folder_without_a_test_split_gets_a_stratified_one_the_same_for_every_seed(class_folder):
    a, b = (tlkit.load_dataset(str(class_folder), seed=s, val_fraction=0.25, test_fraction=0.25) for s in (0, 1))
    assert a.summary()["test"] == {"blue": 3, "green": 3, "red": 3}  # stratified: a quarter of each class's 12
    assert a.test.indices == b.test.indices and a.val.indices != b.val.indices  # the test split ignores the run seed
    for splits in (a, b):
        assert not set(splits.test.indices) & (set(splits.train.indices) | set(splits.val.indices))
        assert len(splits.train) + len(splits.val) + len(splits.test) == 36
    assert a.carved_test_fraction == 0.25 and "carved" in a.test_source and "9 images" in a.test_source


def test_digits_get_a_carved_test_split_only_when_asked():
    assert tlkit.load_dataset("digits", seed=0).test is None
    splits = tlkit.load_dataset("digits", seed=3, test_fraction=0.2)
    assert len(splits.test) == 360 and not set(splits.test.indices) & set(splits.train.indices + splits.val.indices)


def test_folders_with_a_test_split_keep_it_and_folders_with_val_only_carve_from_train(split_folder):
    bundled = tlkit.load_dataset("clothing", seed=1)
    carving = tlkit.load_dataset("clothing", seed=1, test_fraction=0.2)
    for split in ("train", "val", "test"):
        assert getattr(carving, split).indices == getattr(bundled, split).indices
        assert getattr(carving, split).files == getattr(bundled, split).files
    assert carving.carved_test_fraction is None and carving.test_source == "the dataset's own test split"
    given = tlkit.load_dataset(str(split_folder), test_fraction=0.25)
    assert given.summary() == {"train": {"ants": 6, "bees": 6}, "val": {"ants": 4, "bees": 4}, "test": {"ants": 2, "bees": 2}}


def test_a_class_too_small_to_carve_a_test_split_is_named(class_folder):
    for path in sorted((class_folder / "red").iterdir())[2:]:
        path.unlink()
    with pytest.raises(ValueError, match=r"at least 3 images.*'red' \(2\)"):
        tlkit.load_dataset(str(class_folder), test_fraction=0.2)
    with pytest.raises(ValueError, match="test_fraction must be a number between 0 and 1"):
        tlkit.load_dataset(str(class_folder), test_fraction=1.5)


def test_a_lesson_carves_the_test_split_of_a_plain_folder(class_folder, tmp_path):
    from tlkit.lesson import Lesson

    lesson = Lesson("05", torch.device("cpu"), tlkit.recipes.RunConfig(), tmp_path, tmp_path, None, dataset=str(class_folder))
    splits = lesson.splits(samples_per_class=None)
    assert splits.test is not None and splits.test.indices == lesson.splits(seed=5, samples_per_class=None).test.indices
    assert lesson.splits(samples_per_class=None).val.indices != lesson.splits(seed=5, samples_per_class=None).val.indices
