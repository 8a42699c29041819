"""Papermill runs of every notebook with small parameters, asserting on the metrics each one writes."""

import json
from pathlib import Path

import pytest

from tlkit.course import course_notebooks, run_notebook, summary_table

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_every_notebook_is_numbered_and_has_a_parameters_cell():
    import nbformat

    notebooks = course_notebooks(NOTEBOOKS)
    assert notebooks and notebooks[0].name == "01_feature_extraction.ipynb"
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata["kernelspec"]["name"] == "python3"
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert "parameters" in first_code.metadata.get("tags", []), path.name
        for name in ("dataset", "backbone", "weights", "image_size", "batch_size", "epochs", "lr", "seed", "device", "results_path"):
            assert f"\n{name} = " in "\n" + first_code.source, f"{path.name} lacks parameter {name}"


@pytest.mark.notebook
def test_notebook_01_pretrained_beats_random_init(tmp_path):
    run = run_notebook(
        NOTEBOOKS / "01_feature_extraction.ipynb", tmp_path,
        {"samples_per_class": 5, "epochs": 15, "data_curve": [5], "image_size": 64, "larger_image_size": 96, "seeds": [0, 1, 2]},
    )
    assert run.error == "", run.error
    m = run.metrics
    assert m["dataset"] == "clothing" and m["samples_per_class"] == 5 and m["seeds"] == 3
    assert 0.0 <= m["val_acc"] <= 1.0 and m["val_acc_std"] >= 0.0
    assert m["val_acc"] == m["val_pretrained_head"]
    # the lesson's claim on photos, paired over the seeds: pretrained features far above random ones and the floor
    for baseline in ("random_init_head", "majority_class"):  # far below, and below on every reading of the interval
        assert m[f"val_{baseline}_minus_pretrained_head"] < -0.15 and m[f"val_{baseline}_minus_pretrained_head_high"] < 0
    assert m["val_majority_class"] < m["val_nearest_class_mean"]
    assert 0.0 <= m["test_acc"] <= 1.0 and "test_acc_std" in m and "test_random_init_head_minus_pretrained_head" in m
    assert m["val_5_per_class_pretrained_head"] == m["val_acc"]  # same seeds, same data, same runs
    assert (tmp_path / "figures" / "01" / "baselines.png").stat().st_size > 0
    assert (tmp_path / "figures" / "01" / "curves.png").stat().st_size > 0
    assert 0.0 <= m["ece_head"] <= 1.0 and 0.0 <= m["ece_head_temperature"] <= 1.0 and m["temperature"] > 0  # calibration, section 10
    # the baselines by their short names, each one of section 6's arms, and the image sizes of section 8
    assert m["val_acc_majority"] == m["val_majority_class"] and m["val_acc_ncm"] == m["val_nearest_class_mean"]
    assert m["val_acc_knn"] == m["val_k_nearest_neighbours"] and m["val_acc_pixels"] == m["val_raw_pixels_head"]
    assert m["val_acc_pixels"] < m["val_acc"] and m["val_acc_knn"] < m["val_acc"] + 0.1
    assert m["val_size_64_px"] == m["val_acc"] and 0.0 <= m["val_size_96_px"] <= 1.0
    assert m["backbone_ms_per_photo_96px"] > 0 and (tmp_path / "figures" / "01" / "grad_cam.png").stat().st_size > 0
    assert (tmp_path / "figures" / "01" / "reliability.png").stat().st_size > 0
    assert "01_feature_extraction.ipynb" in summary_table([run])


@pytest.mark.notebook
def test_a_bad_parameter_fails_the_run_with_its_message(tmp_path):
    run = run_notebook(NOTEBOOKS / "01_feature_extraction.ipynb", tmp_path, {"backbone": "resnet1800"})
    assert "Unknown backbone 'resnet1800'" in run.error
    assert "FAILED" in run.headline()


@pytest.mark.notebook
@pytest.mark.parametrize("notebook, name, value, message", [
    ("01_feature_extraction.ipynb", "data_curve", "[5, 10", "data_curve must be a list such as"),
    ("03_augmentation.ipynb", "seeds", "[0, 4294967296]", "seeds[1] must be a whole number between 0 and 2**32 - 1"),
    ("05_adding_samples.ipynb", "new_sample_classes", 9, "new_sample_classes (9) must be at most old_classes (7)"),
])
def test_a_bad_parameter_fails_in_the_first_code_cell_by_name(tmp_path, notebook, name, value, message):
    """Passed as papermill's -p would (lists as text), a bad value stops the run before any data is loaded."""
    run = run_notebook(NOTEBOOKS / notebook, tmp_path, {name: value})
    assert message in run.error, run.error
    executed = json.loads((tmp_path / notebook).read_text())
    ran = [c for c in executed["cells"] if c["cell_type"] == "code" and c.get("execution_count")]
    assert "start_lesson" in "".join(ran[-1]["source"])  # the failing cell is the setup, which checks the parameters


@pytest.mark.notebook
def test_a_list_given_as_text_is_parsed(tmp_path):
    # papermill -p data_curve '[]' gives the text "[]": read as the empty list (section skipped), not as "[" and "]"
    run = run_notebook(NOTEBOOKS / "01_feature_extraction.ipynb", tmp_path,
                       {"data_curve": "[]", "seeds": "[0]", "samples_per_class": 2, "epochs": 1, "image_size": 32})
    assert run.error == "", run.error
    assert run.metrics["seeds"] == 1 and not any(k.startswith(("val_all_photos", "val_2_per_class")) for k in run.metrics)
    assert "val_pretrained_head" in run.metrics
