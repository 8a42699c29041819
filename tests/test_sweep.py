"""Parameter sweeps: parsing, grid expansion, run names, parameter checks, result files; and 2x2 sweeps of two notebooks."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tlkit.course import NotebookRun
from tlkit.sweep import (
    SweepError,
    expand_grid,
    headline_metrics,
    main,
    markdown_table,
    parse_grid,
    parse_grid_option,
    parse_value,
    plan_runs,
    result_row,
    results_table,
    run_name,
    sweep,
    write_results_files,
)

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NB01 = NOTEBOOKS / "01_feature_extraction.ipynb"
NB04 = NOTEBOOKS / "04_class_imbalance.ipynb"


# --- parsing -------------------------------------------------------------------------------------------


def test_values_are_read_like_papermill_and_json():
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("1e-3") == 0.001 and parse_value(".5") == 0.5
    assert parse_value("True") is True and parse_value("False") is False and parse_value("None") is None
    assert parse_value("true") is True and parse_value("null") is None
    assert parse_value("[]") == [] and parse_value("[5, 20]") == [5, 20] and parse_value('["none"]') == ["none"]
    assert parse_value("resnet18") == "resnet18" and parse_value("../data/my photos") == "../data/my photos"
    assert parse_value("__import__('os')") == "__import__('os')"  # text, never evaluated
    from tlkit.course import parse_value as course_parse_value

    assert course_parse_value is parse_value  # python -m tlkit.course -p reads values the same way


def test_grid_options_split_at_commas_or_read_as_json():
    assert parse_grid_option("lr=0.001,1e-2") == ("lr", [0.001, 0.01])
    assert parse_grid_option("backbone=efficientnet_lite0,resnet18") == ("backbone", ["efficientnet_lite0", "resnet18"])
    assert parse_grid_option("augment=True,False") == ("augment", [True, False])
    assert parse_grid_option("data_curve=[],[5,20]") == ("data_curve", [[], [5, 20]])
    assert parse_grid_option(" seed = 0 ") == ("seed", [0])
    assert list(parse_grid(["lr=1,2", "seed=0"])) == ["lr", "seed"]
    for bad in ("lr", "lr=", "=1,2"):
        with pytest.raises(SweepError, match="NAME=V1,V2"):
            parse_grid_option(bad)
    with pytest.raises(SweepError, match="given twice"):
        parse_grid(["lr=1", "lr=2"])


# --- planning ------------------------------------------------------------------------------------------


def test_grid_expands_to_the_cartesian_product_last_name_fastest():
    points = expand_grid({"lr": [0.1, 0.01], "image_size": [48, 64], "seed": [0]})
    assert points == [
        {"lr": 0.1, "image_size": 48, "seed": 0}, {"lr": 0.1, "image_size": 64, "seed": 0},
        {"lr": 0.01, "image_size": 48, "seed": 0}, {"lr": 0.01, "image_size": 64, "seed": 0},
    ]
    assert expand_grid({}) == [{}]
    from_numpy = expand_grid({"lr": np.geomspace(0.1, 0.001, 3)})
    assert [p["lr"] for p in from_numpy] == pytest.approx([0.1, 0.01, 0.001]) and type(from_numpy[0]["lr"]) is float
    with pytest.raises(SweepError, match="is empty"):
        expand_grid({"lr": []})
    with pytest.raises(SweepError, match="give a list of values"):
        expand_grid({"backbone": "resnet18"})  # a string is not a list of values
    with pytest.raises(SweepError, match="more than once"):
        expand_grid({"lr": [0.1, 0.1]})


def test_run_names_are_readable_and_file_safe():
    assert run_name({"lr": 0.001, "image_size": 48}) == "lr=0.001,image_size=48"
    assert run_name({"data_curve": [5, 20], "augment": True}) == "data_curve=[5,20],augment=True"
    assert run_name({"dataset": "../shared/my photos"}) == "dataset=.._shared_my_photos"
    assert run_name({}) == "default"


def test_unknown_parameters_are_refused_before_any_run_with_the_valid_names():
    with pytest.raises(SweepError) as err:
        plan_runs(NB01, {"epoch": 3}, {"lr": [0.1]})
    message = str(err.value)
    assert "'epoch'" in message and "did you mean 'epochs'" in message
    assert "Its parameters are: dataset, backbone" in message and "samples_per_class" in message
    with pytest.raises(SweepError, match="sets results_path and output_dir itself"):
        plan_runs(NB01, {}, {"output_dir": ["a", "b"]})
    with pytest.raises(SweepError, match="both fixed"):
        plan_runs(NB01, {"lr": 0.1}, {"lr": [0.1, 0.2]})
    with pytest.raises(SweepError, match="No notebook at .*01_feature_extraction.ipynb"):
        plan_runs(NOTEBOOKS / "01_nope.ipynb", {}, {})
    runs = plan_runs(NB04, {"epochs": 2}, {"remedy": ["none", "focal"], "seed": [0, 1]})
    assert [name for name, _ in runs] == ["remedy=none,seed=0", "remedy=none,seed=1", "remedy=focal,seed=0", "remedy=focal,seed=1"]


def test_python_m_runs_the_module_once_without_a_runpy_warning():
    # importing tlkit must not import tlkit.sweep, or runpy warns that the module is executed twice
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "tlkit.sweep", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--grid" in done.stdout


def test_dry_run_lists_the_runs_and_a_bad_name_exits_2(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [str(NB01), "-p", "epochs", "3", "-p", "data_curve", "[]", "--grid", "lr=0.001,0.01", "--grid", "image_size=48,64", "--out", str(out)]
    assert main([*argv, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "4 run(s)" in printed and "'data_curve': []" in printed
    assert printed.index("lr=0.001,image_size=48") < printed.index("lr=0.001,image_size=64") < printed.index("lr=0.01,image_size=48")
    assert not out.exists()
    assert main([str(NB01), "--grid", "lrr=0.1,0.2", "--out", str(out)]) == 2
    assert "has no parameter 'lrr'" in capsys.readouterr().err and not out.exists()


# --- collecting ----------------------------------------------------------------------------------------


def _fake_runs():
    ok = {"val_acc": 0.9, "val_acc_scratch": 0.5, "train_images": 30, "dataset": "digits"}
    return [
        ("lr=0.1,seed=0", {"lr": 0.1, "seed": 0}, NotebookRun("nb.ipynb", 10.0, dict(ok))),
        ("lr=0.1,seed=1", {"lr": 0.1, "seed": 1}, NotebookRun("nb.ipynb", 12.0, {**ok, "val_acc": 0.8})),
        ("lr=9.0,seed=0", {"lr": 9.0, "seed": 0}, NotebookRun("nb.ipynb", 3.0, {}, "ValueError: loss is NaN")),
        ("lr=9.0,seed=1", {"lr": 9.0, "seed": 1}, NotebookRun("nb.ipynb", 11.0, {**ok, "val_acc": 0.1})),
    ]


def test_results_table_has_one_row_per_run_with_status_and_metrics(tmp_path):
    table = results_table([result_row(*run) for run in _fake_runs()])
    assert list(table.columns[:6]) == ["run", "lr", "seed", "status", "error", "seconds"]
    assert table["status"].tolist() == ["ok", "ok", "failed", "ok"]
    assert table.loc[2, "error"] == "ValueError: loss is NaN" and pd.isna(table.loc[2, "val_acc"])
    assert table["val_acc"].tolist()[:2] == [0.9, 0.8]
    assert str(table["train_images"].dtype) == "Int64"  # integers stay integers despite the failed run's gap
    assert headline_metrics(table, ["lr", "seed"]) == ["val_acc"]

    written = write_results_files(table, tmp_path, ["lr", "seed"], None, "fake")
    assert [p.name for p in written] == ["results.csv", "results.md", "results.png"]
    assert pd.read_csv(tmp_path / "results.csv")["run"].tolist() == [name for name, _, _ in _fake_runs()]
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0].startswith("| run | lr | seed | status | error | seconds | val_acc |") and len(md) == 2 + 4
    assert "| lr=9.0,seed=0 | 9 | 0 | failed | ValueError: loss is NaN | 3 |  |" in md[4]
    assert (tmp_path / "results.png").stat().st_size > 0


def test_one_grid_name_plots_bars_and_an_all_failed_sweep_writes_no_plot(tmp_path, capsys):
    rows = [result_row(name, {"lr": point["lr"]}, run) for name, point, run in _fake_runs()[:3:2]]
    table = results_table(rows)
    assert [p.name for p in write_results_files(table, tmp_path / "one", ["lr"], ["val_acc_scratch"], "")][-1] == "results.png"
    failed = results_table([result_row("lr=9.0", {"lr": 9.0}, NotebookRun("nb.ipynb", 1.0, {}, "boom"))])
    assert [p.name for p in write_results_files(failed, tmp_path / "none", ["lr"], None, "")] == ["results.csv", "results.md"]
    assert [p.name for p in write_results_files(table, tmp_path / "typo", ["lr"], ["val_accc"], "")] == ["results.csv", "results.md"]
    assert "no metric val_accc" in capsys.readouterr().err


def test_markdown_table_formats_numbers_and_escapes_pipes():
    table = pd.DataFrame({"a": [0.123456, float("nan")], "b": ["x|y", "z"], "c": pd.array([1, None], dtype="Int64")})
    assert markdown_table(table).splitlines() == ["| a | b | c |", "|---|---|---|", "| 0.123 | x\\|y | 1 |", "|  | z |  |"]


# --- real sweeps (papermill) ---------------------------------------------------------------------------


@pytest.mark.notebook
def test_a_2x2_sweep_of_notebook_01_runs_every_point_in_its_own_folder(tmp_path):
    tiny = {"samples_per_class": 3, "epochs": 2, "scratch_epochs": 1, "data_curve": [], "image_size": 32}
    table = sweep(NB01, tiny, {"lr": [0.01, 0.003], "seed": [0, 1]}, tmp_path, verbose=False)
    assert table["run"].tolist() == ["lr=0.01,seed=0", "lr=0.01,seed=1", "lr=0.003,seed=0", "lr=0.003,seed=1"]
    assert table["status"].tolist() == ["ok"] * 4, table["error"].tolist()
    assert table["val_acc"].between(0, 1).all() and (table["samples_per_class"] == 3).all()
    for name in table["run"]:
        metrics = json.loads((tmp_path / name / "01_feature_extraction.json").read_text())
        assert metrics["val_acc"] == pytest.approx(table.set_index("run").loc[name, "val_acc"])
        assert (tmp_path / name / "01_feature_extraction.ipynb").exists()
        assert (tmp_path / name / "figures" / "01" / "curves.png").stat().st_size > 0
    assert pd.read_csv(tmp_path / "results.csv")["val_acc"].tolist() == pytest.approx(table["val_acc"].tolist())
    assert (tmp_path / "results.png").stat().st_size > 0
    assert json.loads((tmp_path / "sweep.json").read_text())["grid"] == {"lr": [0.01, 0.003], "seed": [0, 1]}


@pytest.mark.notebook
def test_a_2x2_sweep_of_notebook_04_reports_failed_runs_and_goes_on(tmp_path, capsys):
    argv = [str(NB04), "-p", "epochs", "2", "-p", "image_size", "32", "-p", "remedies", '["none"]',
            "--grid", "remedy=logit_adjustment,no_such_remedy", "--grid", "seed=0,1", "--out", str(tmp_path)]
    assert main(argv) == 1  # some runs failed
    table = pd.read_csv(tmp_path / "results.csv")
    assert table["run"].tolist() == [f"remedy={r},seed={s}" for r in ("logit_adjustment", "no_such_remedy") for s in (0, 1)]
    assert table["status"].tolist() == ["ok", "ok", "failed", "failed"]
    ok, failed = table[table["status"] == "ok"], table[table["status"] == "failed"]
    assert ok["balanced_acc"].between(0, 1).all() and ok["val_acc_none"].between(0, 1).all()
    assert failed["error"].str.contains("Unknown remedy 'no_such_remedy'").all() and failed["balanced_acc"].isna().all()
    assert (tmp_path / "remedy=logit_adjustment,seed=1" / "figures" / "04" / "curves.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "2 of 4 runs FAILED" in printed and "remedy=no_such_remedy,seed=0/04_class_imbalance.ipynb" in printed
    assert (tmp_path / "results.md").read_text().count("| failed |") == 2
