"""python -m tlkit.predict (and tlkit.inference): a saved model predicts on a folder of new images, unreadable files listed, not fatal."""

import importlib
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_images
from PIL import Image

import tlkit
from tlkit.inference import main, predict_files

CLASSES = ["red", "green", "blue"]


@pytest.fixture
def saved_model(tmp_path):
    tlkit.set_seed(0)
    model = tlkit.create_model("efficientnet_lite0", len(CLASSES), "imagenet")
    return model, tlkit.checkpoints.save_checkpoint(tmp_path / "model.pt", model, classes=CLASSES, epoch=1)


@pytest.fixture
def new_images(tmp_path):
    folder = tmp_path / "new"
    write_images(folder, 3, (200, 30, 30), seed=1, size=40)
    write_images(folder / "more", 2, (30, 30, 200), seed=2, size=40)  # a subfolder is searched too
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("not an image by its extension: ignored")
    return folder


def test_every_file_gets_its_top_k_and_a_broken_one_its_error(saved_model, new_images):
    model, path = saved_model
    table = predict_files(path, [new_images], top_k=2, image_size=64)
    assert list(table.columns) == ["file", "class_1", "prob_1", "class_2", "prob_2", "error"]
    assert len(table) == 6 and not table["file"].str.endswith("notes.txt").any()
    broken = table[table["file"].str.endswith("broken.jpg")].iloc[0]
    assert broken["error"] and pd.isna(broken["class_1"])
    good = table[table["error"] == ""]
    assert len(good) == 5 and (good["prob_1"] >= good["prob_2"]).all() and set(good["class_1"]) <= set(CLASSES)
    # the same numbers as predict_images on the reloaded model
    reloaded, _ = tlkit.model_from_checkpoint(path)
    first = good.iloc[0]
    expected = tlkit.predict_images(reloaded, [Image.open(first["file"])], tlkit.eval_transform(64, reloaded.normalization), CLASSES, top_k=2)[0]
    assert first["class_1"] == expected[0][0] and first["prob_1"] == pytest.approx(expected[0][1], abs=1e-4)


def test_the_command_writes_the_csv_and_lists_unreadable_files(saved_model, new_images, tmp_path, capsys):
    _, path = saved_model
    out = tmp_path / "out" / "predictions.csv"
    assert main([str(path), str(new_images), "--out", str(out), "--image-size", "64", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "5 images predicted, 1 unreadable" in captured.out and "broken.jpg" in captured.err
    assert len(pd.read_csv(out)) == 6


def test_a_missing_input_is_a_clear_error(saved_model, tmp_path, capsys):
    _, path = saved_model
    assert main([str(path), str(tmp_path / "nowhere")]) == 2
    assert "does not exist: pass image files or folders of images" in capsys.readouterr().err


def test_python_m_tlkit_inference_runs(saved_model, new_images, tmp_path):
    _, path = saved_model
    out = tmp_path / "p.csv"
    done = subprocess.run([sys.executable, "-m", "tlkit.inference", str(path), str(new_images / "more"), "--out", str(out),
                           "--image-size", "64", "--top-k", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "RuntimeWarning" not in done.stderr, done.stderr
    assert list(pd.read_csv(out).columns) == ["file", "class_1", "prob_1", "error"]


def test_python_m_tlkit_predict_writes_top_k_and_lists_unreadable_files(saved_model, new_images, tmp_path):
    _, path = saved_model
    out = tmp_path / "predictions.csv"
    done = subprocess.run([sys.executable, "-m", "tlkit.predict", str(path), str(new_images), "--out", str(out),
                           "--image-size", "64", "--top-k", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "RuntimeWarning" not in done.stderr, done.stderr
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["file", "class_1", "prob_1", "class_2", "prob_2", "error"]
    broken = table[table["error"] != ""]
    assert [Path(f).name for f in broken["file"]] == ["broken.jpg"] and "broken.jpg" in done.stderr
    assert (table.loc[table["error"] == "", "prob_1"] >= table.loc[table["error"] == "", "prob_2"]).all()
    missing = subprocess.run([sys.executable, "-m", "tlkit.predict", str(path), str(tmp_path / "nowhere")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.startswith("python -m tlkit.predict: ") and "does not exist" in missing.stderr


def test_tlkit_predict_stays_the_function_when_the_command_module_is_imported():
    with pytest.raises(ImportError, match="python -m tlkit.predict"):
        importlib.import_module("tlkit.predict")
    assert callable(tlkit.predict) and "tlkit.predict" not in sys.modules
