"""Reliability round three, data and files: a full disk is named and loses nothing, both caches check what they read,
the dataset says when it is not what was asked for, and paths and file names behave as the user typed them.

A full disk is a real one for the process: a child Python with a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored), so
every write past the limit fails with the operating system's own error, as it would on a full disk.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_images
from PIL import Image
from torch.utils.data import TensorDataset

import tlkit
from tlkit.checkpoints import save_checkpoint
from tlkit.data import DatasetUnavailableError, DatasetWarning
from tlkit.prefix_cache import cached_prefix

FILE_SIZE_LIMIT = 256 * 1024  # bytes: any file the child writes past this fails, as on a full disk


def _with_full_disk(script: str, cwd: Path) -> dict:
    """Run ``script`` in a child Python whose files cannot grow past FILE_SIZE_LIMIT; the JSON it prints last."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "always"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, capture_output=True, text=True,
                          preexec_fn=limit_file_size, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_full_disk_is_named_for_checkpoints_and_loses_nothing_for_caches_results_and_figures(tmp_path):
    (tmp_path / "results.json").write_text('{"old": 1}\n')
    outcome = _with_full_disk(
        """
        import json, warnings
        import torch, tlkit
        from torch import nn
        from torch.utils.data import TensorDataset
        from tlkit.checkpoints import save_checkpoint
        from tlkit.prefix_cache import cached_prefix
        import matplotlib.pyplot as plt

        out = {}
        big = nn.Linear(400, 400)  # 640 KB of weights: past the limit
        try:
            save_checkpoint("model.pt", big, classes=["a", "b"], epoch=1)
        except tlkit.checkpoints.CheckpointSaveError as err:
            out["checkpoint"] = str(err)

        class Mean(nn.Module):
            def __init__(self):
                super().__init__()
                self.head = nn.Linear(300, 2)
            def forward_features(self, x):
                return x.flatten(1)
            def forward(self, x):
                return self.head(self.forward_features(x))

        data = TensorDataset(torch.rand(400, 3, 10, 10), torch.arange(400) % 2)  # 480 KB of features
        loader = tlkit.make_loader(data, None, 100, shuffle=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            feats = tlkit.cached_features(Mean(), loader, cache_dir="features", progress=False)
        out["features"] = [len(feats), [str(w.message) for w in caught]]

        model = tlkit.create_model("efficientnet_lite0", 2, weights=None)
        tlkit.apply_strategy(model, "last_n_blocks", n_blocks=1)
        images = TensorDataset(torch.rand(120, 3, 64, 64), torch.arange(120) % 2)  # 120 x 3 KB of activations: past the limit
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            acts = cached_prefix(model, tlkit.make_loader(images, None, 20, shuffle=False), cache_dir="prefix", progress=False)
        out["prefix"] = [len(acts), [str(w.message) for w in caught]]

        try:
            tlkit.write_results("results.json", {"note": "x" * 300_000})
        except OSError as err:
            out["results"] = str(err)
        fig = plt.figure(figsize=(40, 40), dpi=100)
        fig.gca().imshow(torch.rand(800, 800, 3).numpy())
        try:
            tlkit.save_figure(fig, "figure.png")
        except OSError as err:
            out["figure"] = str(err)
        print(json.dumps(out))
        """,
        tmp_path,
    )
    # the checkpoint: the operating system's reason, the path and the fix, not torch's "unexpected pos"
    assert outcome["checkpoint"].startswith("Could not write model.pt (File too large): the disk is full. Free some space")
    # both caches: the values are used, one warning names the folder and says the next run recomputes
    for name, count, what in (("features", 400, "features"), ("prefix", 120, "prefix activations")):
        size, messages = outcome[name]
        assert size == count
        (message,) = [m for m in messages if "disk is full" in m]
        assert message.startswith(f"Could not write {name}/") and f"The {what} are used, but not cached on disk" in message
    # results and figures: an error naming the file, the old results file untouched, no empty or temporary files left
    assert "results.json (File too large): the disk is full" in outcome["results"]
    assert "figure.png (File too large): the disk is full" in outcome["figure"]
    assert (tmp_path / "results.json").read_text() == '{"old": 1}\n'
    assert not (tmp_path / "figure.png").exists() and not (tmp_path / "model.pt").exists()
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "results.json"]
    assert leftovers == [], leftovers


def test_a_killed_save_leaves_no_temporary_file_behind_for_long(tmp_path):
    target = tmp_path / "model.pt"
    stale = tmp_path / f".model.{os.getpid() + 1}.deadbeef.tmp.pt"  # what a save killed an hour ago left
    fresh = tmp_path / f".model.{os.getpid() + 2}.cafebabe.tmp.pt"  # another process writing right now
    stale.write_bytes(b"x" * 1000)
    fresh.write_bytes(b"x" * 1000)
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    save_checkpoint(target, torch.nn.Linear(2, 2), classes=["a", "b"], epoch=1)
    assert target.is_file() and not stale.exists() and fresh.exists()


def test_an_unwritable_prefix_cache_folder_warns_like_the_feature_cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir()
    real = open

    def refuse(file, mode="r", *args, **kwargs):
        if "w" in mode and Path(file).parent == folder:
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(tlkit._io, "open", refuse, raising=False)
    model = _lite0()
    with pytest.warns(UserWarning, match=r"cannot be written.*prefix activations are used, but not cached on disk"):
        acts = cached_prefix(model, _loader(), cache_dir=folder, progress=False)
    assert len(acts) == 12


# --- the prefix cache checks what it reads ---------------------------------------------------------


def _lite0() -> tlkit.TransferModel:
    tlkit.set_seed(0)
    model = tlkit.create_model("efficientnet_lite0", 2, weights=None)
    return tlkit.apply_strategy(model, "last_n_blocks", n_blocks=1)


def _loader(n: int = 12):
    g = torch.Generator().manual_seed(n)
    data = TensorDataset(torch.rand(n, 3, 64, 64, generator=g), torch.arange(n) % 2)
    return tlkit.make_loader(data, None, 6, shuffle=False)


@pytest.mark.parametrize(
    "alter, reason",
    [
        (lambda acts, labels: (acts + 0.5, labels), "does not match the checksum"),
        (lambda acts, labels: (acts[:8], 1 - labels[:8]), r"activations are torch.float32 \(8, 320, 2, 2\), expected"),
        (lambda acts, labels: (acts.reshape(12, 160, 4, 2), labels), r"\(12, 160, 4, 2\), expected torch.float32 \(12, 320, 2, 2\)"),
    ],
    ids=["altered values", "fewer items and flipped labels", "wrong shape"],
)
def test_an_altered_prefix_cache_file_is_recomputed_with_a_warning(tmp_path, alter, reason):
    model = _lite0()
    good = cached_prefix(model, _loader(), cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("prefix-*.pt")
    acts, labels, meta = torch.load(path, weights_only=True)
    acts, labels = alter(acts, labels)
    if "checksum" not in reason:  # a consistent file, for other data: only the count and shape checks can catch it
        meta["checksum"] = tlkit._cache.checksum(tlkit.prefix_cache._FORMAT, acts, labels)
    torch.save((acts, labels, meta), path)
    with pytest.warns(UserWarning, match=f"damaged prefix cache .*{reason}"):
        again = cached_prefix(model, _loader(), cache_dir=tmp_path, progress=False)
    assert torch.equal(again.tensors[0], good.tensors[0]) and torch.equal(again.tensors[1], good.tensors[1])


# --- the dataset says when it is not what was asked for -------------------------------------------------


def test_samples_per_class_says_which_classes_have_fewer(tmp_path):
    write_images(tmp_path / "shop" / "coats", 12, (200, 30, 30), seed=0)
    write_images(tmp_path / "shop" / "hats", 12, (30, 200, 30), seed=1)
    write_images(tmp_path / "shop" / "socks", 3, (30, 30, 200), seed=2)
    with pytest.warns(DatasetWarning, match=r"samples_per_class=5: 1 of 3 classes have fewer training images .*'socks' [23]\); the others keep 5"):
        splits = tlkit.load_dataset(str(tmp_path / "shop"), samples_per_class=5)
    counts = tlkit.data.class_counts(splits.train)
    assert counts['coats'] == counts['hats'] == 5 and counts['socks'] < 5


def test_an_empty_val_folder_is_named_and_validation_is_carved_from_train(tmp_path):
    for k, name in enumerate(["cats", "dogs"]):
        write_images(tmp_path / "pets" / "train" / name, 10, (50 + 100 * k, 80, 80), seed=k)
    (tmp_path / "pets" / "val").mkdir()
    with pytest.warns(DatasetWarning, match=r"val holds no class folders, so it is not used: validation images are carved from train/"):
        splits = tlkit.load_dataset(str(tmp_path / "pets"))
    assert len(splits.val) > 0


def test_copies_across_splits_and_classes_are_named_once(tmp_path):
    root = tmp_path / "pets"
    for k, name in enumerate(["cats", "dogs"]):
        write_images(root / "train" / name, 6, (50 + 100 * k, 80, 80), seed=k)
        write_images(root / "val" / name, 3, (50 + 100 * k, 80, 80), seed=10 + k)
    (root / "test").mkdir()
    for name in ("cats", "dogs"):  # test/ is a copy of train/
        (root / "test" / name).mkdir()
        for image in (root / "train" / name).iterdir():
            (root / "test" / name / image.name).write_bytes(image.read_bytes())
    (root / "train" / "dogs" / "also_a_cat.png").write_bytes((root / "train" / "cats" / "img_000.png").read_bytes())
    with pytest.warns(DatasetWarning) as caught:
        tlkit.load_dataset(str(root))
    (message,) = [str(w.message) for w in caught if "identical content" in str(w.message)]
    assert "in more than one split (test/ and train/: 12)" in message and "inflated" in message
    assert "1 image(s) are in more than one class" in message and "train/dogs/also_a_cat.png" in message


def test_copies_within_one_class_are_not_reported(tmp_path, recwarn):
    root = tmp_path / "pets"
    for k, name in enumerate(["cats", "dogs"]):
        write_images(root / name, 6, (50 + 100 * k, 80, 80), seed=k)
    (root / "cats" / "again.png").write_bytes((root / "cats" / "img_000.png").read_bytes())
    tlkit.load_dataset(str(root))
    assert not [w for w in recwarn if issubclass(w.category, DatasetWarning)]


# --- bounded cost ------------------------------------------------------------------------------------


def test_an_image_over_the_decode_limit_is_skipped_before_it_is_decoded(tmp_path):
    root = tmp_path / "pets"
    for k, name in enumerate(["cats", "dogs"]):
        write_images(root / name, 6, (50 + 100 * k, 80, 80), seed=k)
    # 8,200 x 8,200 = 67 M pixels, under PIL's own bomb limit (89 M) but over tlkit's; a few hundred KB on disk
    Image.new("L", (8200, 8200)).save(root / "cats" / "huge.png")
    with pytest.warns(UserWarning, match=r"huge.png"):
        splits = tlkit.load_dataset(str(root), val_fraction=0.25)
    assert "huge.png" not in {p.name for p in splits.train.files + splits.val.files}
    with pytest.raises(tlkit.transforms.ImageTooLargeError, match=r"claims 8,200 x 8,200 pixels, more than tlkit decodes \(64,000,000"):
        tlkit.transforms.read_image_file(root / "cats" / "huge.png")


@pytest.mark.parametrize("size", [1025, 4096])
def test_image_size_has_an_upper_bound_with_its_reason(size):
    with pytest.raises(ValueError, match=rf"image_size={size} is over the largest tlkit accepts, 1024 pixels"):
        tlkit.eval_transform(size, tlkit.transforms.IMAGENET_NORM)


# --- paths and file names as the user typed them ---------------------------------------------------


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_file_names_that_are_not_utf8_load_and_cache(tmp_path):
    root = tmp_path / "pets"
    for k, name in enumerate(["cats", "dogs"]):
        write_images(root / name, 6, (50 + 100 * k, 80, 80), seed=k)
    odd = os.fsdecode(b"caf\xe9-latin1.png")  # a name written by an old Windows tool: not UTF-8
    Image.fromarray(np.full((24, 24, 3), 60, np.uint8)).save(os.path.join(root / "cats", odd))
    splits = tlkit.load_dataset(str(root), val_fraction=0.25)
    assert odd in {p.name for p in splits.train.files + splits.val.files}
    model = tlkit.create_model("efficientnet_lite0", 2, weights=None)
    loader = tlkit.make_loader(splits.train, tlkit.eval_transform(64, model.normalization), 4, shuffle=False)
    features = tlkit.cached_features(model, loader, cache_dir=tmp_path / "cache", progress=False)
    assert len(features) == len(splits.train) and list((tmp_path / "cache").glob("features-*.pt"))


@pytest.mark.parametrize("root", ["/", "~"])
def test_the_filesystem_root_and_the_home_folder_are_refused_before_walking_them(root):
    with pytest.raises(DatasetUnavailableError, match=r"loading it would read every file below it.*unset or empty shell variable"):
        tlkit.load_dataset(root)


def test_a_tilde_in_cache_and_checkpoint_paths_means_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    save_checkpoint("~/models/m.pt", torch.nn.Linear(2, 2), classes=["a", "b"], epoch=1)
    assert tlkit.read_checkpoint("~/models/m.pt").epoch == 1
    data = TensorDataset(torch.rand(8, 3, 4, 4), torch.arange(8) % 2)

    class Mean(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 2)

        def forward_features(self, x):
            return x.mean(dim=(2, 3))

    tlkit.cached_features(Mean(), tlkit.make_loader(data, None, 4, shuffle=False), cache_dir="~/cache", progress=False)
    assert (tmp_path / "home" / "models" / "m.pt").is_file() and list((tmp_path / "home" / "cache").glob("features-*.pt"))
    assert not (tmp_path / "~").exists()
