"""Parameter sweeps: parsing, grid expansion, run names, parameter checks, result files; runs of a tiny notebook one
after another, on local workers and on a Dask cluster, resumed after a kill, locked, with seeds; 2x2 sweeps of two notebooks."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tlkit.course import NotebookRun
from tlkit.sweep import (
    STATUS_FILE,
    SweepBusy,
    SweepError,
    available_cores,
    dask_executor,
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
    run_key,
    run_name,
    seed_list,
    seed_summary,
    sweep,
    sweep_lock,
    worker_environment,
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
    md = markdown_rows((tmp_path / "results.md").read_text())
    assert md[0][:7] == ["run", "lr", "seed", "status", "error", "seconds", "val_acc"] and len(md) == 1 + 4
    assert md[3][:7] == ["lr=9.0,seed=0", "9", "0", "failed", "ValueError: loss is NaN", "3", ""]
    assert (tmp_path / "results.png").stat().st_size > 0


def test_one_grid_name_plots_bars_and_an_all_failed_sweep_writes_no_plot(tmp_path, capsys):
    rows = [result_row(name, {"lr": point["lr"]}, run) for name, point, run in _fake_runs()[:3:2]]
    table = results_table(rows)
    assert [p.name for p in write_results_files(table, tmp_path / "one", ["lr"], ["val_acc_scratch"], "")][-1] == "results.png"
    failed = results_table([result_row("lr=9.0", {"lr": 9.0}, NotebookRun("nb.ipynb", 1.0, {}, "boom"))])
    assert [p.name for p in write_results_files(failed, tmp_path / "none", ["lr"], None, "")] == ["results.csv", "results.md"]
    assert [p.name for p in write_results_files(table, tmp_path / "typo", ["lr"], ["val_accc"], "")] == ["results.csv", "results.md"]
    assert "no metric val_accc" in capsys.readouterr().err


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of the first Markdown pipe table in ``text``, header first (the |---| line left out)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= set("|:- "):
            if rows and not line.startswith("|"):
                break  # the first table ended
            continue
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
    return rows


def test_markdown_table_formats_numbers_and_escapes_pipes():
    table = pd.DataFrame({"a": [0.123456, float("nan")], "b": ["x|y", "z"], "c": pd.array([1, None], dtype="Int64")})
    text = markdown_table(table)
    assert set(text.splitlines()[1]) <= set("|:-")  # tabulate's |---|---| line
    assert markdown_rows(text) == [["a", "b", "c"], ["0.123", "x\\|y", "1"], ["", "z", ""]]


# --- seeds, reuse, workers, Dask, kill and lock (a tiny notebook that runs in well under a second) ---------


def write_tiny_notebook(folder: Path) -> Path:
    """A notebook with a ``parameters`` cell (x, seed) that writes ``score_acc`` from them, fails for x < 0, records its
    OMP_NUM_THREADS in ``threads.txt``, and sleeps TINY_PAUSE seconds (an environment variable, so not part of the run's key)."""
    import nbformat

    parameters = nbformat.v4.new_code_cell("x = 1\nseed = 0\nresults_path = 'tiny.json'\noutput_dir = '.'\nprogress = True")
    parameters.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import json, os, time\n"
        "time.sleep(float(os.environ.get('TINY_PAUSE', '0')))\n"
        "if x < 0:\n    raise ValueError(f'x must be >= 0, got {x}')\n"
        "os.makedirs(output_dir, exist_ok=True)\n"
        "open(os.path.join(output_dir, 'threads.txt'), 'w').write(os.environ.get('OMP_NUM_THREADS', ''))\n"
        "json.dump({'score_acc': x / 10 + seed / 100, 'label': f'x{x}'}, open(results_path, 'w'))"
    )
    nb = nbformat.v4.new_notebook(cells=[parameters, body])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / "tiny.ipynb")
    return folder / "tiny.ipynb"


TINY_GRID = {"x": [2, -1]}  # one point that works and one that fails, each with two seeds
TINY_SEEDS = [0, 1]


@pytest.fixture(scope="module")
def tiny_serial(tmp_path_factory):
    """The tiny notebook swept one run after another in this process: (notebook, out folder, table)."""
    root = tmp_path_factory.mktemp("tiny")
    notebook = write_tiny_notebook(root / "nb")
    table = sweep(notebook, {}, TINY_GRID, root / "serial", seeds=TINY_SEEDS, verbose=False)
    return notebook, root / "serial", table


def comparable(table: pd.DataFrame) -> pd.DataFrame:
    """The table without the wall times, which differ from run to run."""
    return table.drop(columns="seconds").reset_index(drop=True)


def test_seeds_run_each_point_once_per_seed_and_the_table_shows_mean_and_std(tiny_serial):
    _, out, table = tiny_serial
    assert table["run"].tolist() == ["x=2,seed=0", "x=2,seed=1", "x=-1,seed=0", "x=-1,seed=1"]
    assert table["status"].tolist() == ["ok", "ok", "failed", "failed"]
    assert table["score_acc"].tolist()[:2] == pytest.approx([0.2, 0.21])
    assert table["error"].tolist()[2:] == ["ValueError: x must be >= 0, got -1"] * 2
    raw = pd.read_csv(out / "results.csv")  # the per-seed rows stay in the CSV
    assert raw["seed"].tolist() == [0, 1, 0, 1] and raw["score_acc"].tolist()[:2] == pytest.approx([0.2, 0.21])
    summary = seed_summary(table, ["x"])
    assert summary["point"].tolist() == ["x=2", "x=-1"] and summary["seeds ok"].tolist() == ["2/2", "0/2"]
    assert summary.loc[0, "score_acc"] == pytest.approx(0.205) and summary.loc[0, "score_acc_std"] == pytest.approx(np.std([0.2, 0.21], ddof=1))
    assert pd.isna(summary.loc[1, "score_acc"])
    md = markdown_rows((out / "results.md").read_text())
    assert md[0] == ["point", "x", "seeds ok", "seconds", "score_acc"]
    assert md[1][0] == "x=2" and md[1][2] == "2/2" and md[1][4] == "0.205 ± 0.00707"
    assert "Per seed:" in (out / "results.md").read_text() and (out / "results.png").stat().st_size > 0
    assert json.loads((out / "sweep.json").read_text())["seeds"] == TINY_SEEDS


def test_seed_options_are_checked():
    assert seed_list("0,1,2") == [0, 1, 2] and seed_list(None) == [] and seed_list(np.arange(2)) == [0, 1]
    for bad in ("0,0", "a,b", "0.5"):
        with pytest.raises(SweepError, match="distinct integers"):
            seed_list(bad)
    with pytest.raises(SweepError, match="--seeds sets seed"):
        plan_runs(NB04, {}, {"seed": [0, 1]}, [0, 1])


def test_a_run_key_changes_with_the_notebook_or_any_parameter():
    key = run_key(b"notebook", {"lr": 0.1, "seed": 0})
    assert key == run_key(b"notebook", {"seed": 0, "lr": 0.1})  # order does not matter
    assert key != run_key(b"notebook!", {"lr": 0.1, "seed": 0}) and key != run_key(b"notebook", {"lr": 0.1, "seed": 1})


def test_local_workers_share_the_cores_and_take_the_gpus_round_robin():
    env = worker_environment(0, 2, 16, [], base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "8"}  # one GPU or none: CUDA_VISIBLE_DEVICES is left alone
    assert [worker_environment(s, 3, 2, ["0", "1"], base={})["CUDA_VISIBLE_DEVICES"] for s in range(3)] == ["0", "1", "0"]
    assert worker_environment(1, 3, 2, ["0", "1"], base={})["OMP_NUM_THREADS"] == "1"  # never 0 threads


def status_identity(run_dir: Path) -> tuple[int, int]:
    """The status file's inode and time: a reused run keeps its file, a rerun replaces it (an atomic rename, a new inode)."""
    stat = (run_dir / STATUS_FILE).stat()
    return stat.st_ino, stat.st_mtime_ns


def test_finished_runs_are_reused_failed_ones_rerun_and_force_reruns_all(tiny_serial, tmp_path, capsys):
    notebook, _, _ = tiny_serial
    out = tmp_path / "sweep"
    sweep(notebook, {}, {"x": [1, -1, 3]}, out, verbose=False)
    before = {name: status_identity(out / name) for name in ("x=1", "x=-1", "x=3")}
    table = sweep(notebook, {}, {"x": [1, -1, 3]}, out)
    assert "reused 2 finished runs" in capsys.readouterr().out
    assert table["status"].tolist() == ["ok", "failed", "ok"] and table["score_acc"].tolist()[::2] == pytest.approx([0.1, 0.3])
    after = {name: status_identity(out / name) for name in before}
    assert after["x=1"] == before["x=1"] and after["x=3"] == before["x=3"] and after["x=-1"] != before["x=-1"]
    assert pd.read_csv(out / "results.csv")["run"].tolist() == ["x=1", "x=-1", "x=3"]  # the table is rebuilt from every run
    sweep(notebook, {}, {"x": [1]}, out, force=True)
    assert "finished run" not in capsys.readouterr().out and status_identity(out / "x=1") != before["x=1"]


def test_two_local_workers_give_the_serial_table_with_a_share_of_the_cores_each(tiny_serial, tmp_path):
    notebook, serial_out, _ = tiny_serial
    assert main([str(notebook), "--grid", "x=2,-1", "--seeds", "0", "--workers", "2", "--out", str(tmp_path)]) == 1  # a run failed
    serial = pd.read_csv(serial_out / "results.csv")
    pd.testing.assert_frame_equal(comparable(pd.read_csv(tmp_path / "results.csv")), comparable(serial[serial["seed"] == 0]))
    assert (tmp_path / "x=2,seed=0" / "threads.txt").read_text() == str(max(1, available_cores() // 2))
    assert (tmp_path / "x=-1,seed=0" / "tiny.ipynb").exists()  # the failed run's executed notebook, with its traceback


def test_a_dask_cluster_gives_the_serial_table_and_sends_the_files_back(tiny_serial, tmp_path):
    distributed = pytest.importorskip("distributed")
    notebook, serial_out, _ = tiny_serial
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        argv = [str(notebook), "--grid", "x=2,-1", "--seeds", "0,1", "--dask", cluster.scheduler_address, "--out", str(tmp_path)]
        assert main(argv) == 1
    pd.testing.assert_frame_equal(comparable(pd.read_csv(tmp_path / "results.csv")), comparable(pd.read_csv(serial_out / "results.csv")))
    for name in ("x=2,seed=0", "x=-1,seed=1"):  # executed notebook, metrics and status came back into --out
        assert {p.name for p in (tmp_path / name).iterdir()} >= {"tiny.ipynb", STATUS_FILE}
    assert json.loads((tmp_path / "x=2,seed=0" / "tiny.json").read_text())["score_acc"] == pytest.approx(0.2)
    with pytest.raises(SweepError, match="Could not reach a Dask scheduler at 'tcp://127.0.0.1:9'"):
        with dask_executor("tcp://127.0.0.1:9", timeout="1s"):  # nothing listens there
            pass


def test_a_folder_held_by_a_live_sweep_is_refused(tiny_serial, tmp_path, capsys):
    notebook, _, _ = tiny_serial
    with sweep_lock(tmp_path):
        assert main([str(notebook), "--out", str(tmp_path)]) == 2
        with pytest.raises(SweepBusy, match=f"still running \\(pid {os.getpid()} on "):
            sweep(notebook, {}, {}, tmp_path, verbose=False)
    assert "another --out" in capsys.readouterr().err and not (tmp_path / "default").exists()
    assert sweep(notebook, {}, {}, tmp_path, verbose=False)["status"].tolist() == ["ok"]  # released at the end of the block


def test_a_sweep_killed_after_its_first_run_is_resumed_and_reuses_that_run(tiny_serial, tmp_path, capsys):
    notebook, _, _ = tiny_serial
    argv = [str(notebook), "--grid", "x=1,2,3", "--out", str(tmp_path)]
    env = {**os.environ, "TINY_PAUSE": "1"}  # every run sleeps: the kill lands while the second one runs
    sweeper = subprocess.Popen([sys.executable, "-m", "tlkit.sweep", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = tmp_path / "x=1" / STATUS_FILE
        deadline = time.monotonic() + 120
        while not first.exists() and sweeper.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.exists(), sweeper.stderr.read().decode() if sweeper.poll() is not None else "no run finished in 120 s"
        assert main(argv) == 2  # the live sweep holds the folder
        assert f"pid {sweeper.pid} on" in capsys.readouterr().err
    finally:
        sweeper.send_signal(signal.SIGKILL)
        sweeper.wait(timeout=30)
        sweeper.stderr.close()
    assert not (tmp_path / "x=3" / STATUS_FILE).exists() and not (tmp_path / "results.csv").exists()
    assert not list(tmp_path.rglob("*.tmp*"))  # no half-written file anywhere
    before = status_identity(first.parent)
    assert main(argv) == 0  # the dead sweep's lock went with it
    assert re.search(r"reused [12] finished runs?", capsys.readouterr().out)
    assert status_identity(first.parent) == before
    table = pd.read_csv(tmp_path / "results.csv")
    assert table["status"].tolist() == ["ok"] * 3 and table["score_acc"].tolist() == pytest.approx([0.1, 0.2, 0.3])


# --- real sweeps (papermill) ---------------------------------------------------------------------------


@pytest.mark.notebook
def test_a_2x2_sweep_of_notebook_01_runs_every_point_in_its_own_folder(tmp_path):
    tiny = {"samples_per_class": 3, "epochs": 2, "data_curve": [], "image_size": 32}
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
    assert [row[3] for row in markdown_rows((tmp_path / "results.md").read_text())[1:]] == ["ok", "ok", "failed", "failed"]
