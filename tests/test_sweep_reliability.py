"""Sweep and course reliability (issue 32, cases 2, 6 and 12): a second sweep into the same folder extends the first or
is refused, an unwritable folder is one line and exit 2, course -p names are checked and reach only the notebooks that
have them, values reach a notebook with the same type one worker or several, long values make short folder names."""

import ast
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from papermill.iorw import NoDatesSafeLoader
from papermill.translators import PythonTranslator

from tlkit import course
from tlkit.course import course_parameters, run_parameters
from tlkit.sweep import (
    MAX_RUN_NAME_BYTES,
    STATUS_FILE,
    SweepConflict,
    main,
    papermill_command,
    plan_runs,
    run_name,
    run_tasks_of,
    sweep,
)


def write_notebook(path: Path, parameters: str, body: str) -> Path:
    """A notebook at ``path`` with a ``parameters`` cell and one code cell."""
    import nbformat

    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell(body)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


# x and seed make score_acc; x's type and label come back in the metrics, as the notebook received them.
TINY_PARAMETERS = "x = 1\nseed = 0\nlabel = 'none'\nresults_path = 'tiny.json'\noutput_dir = '.'\nprogress = True"
TINY_BODY = ("import json\n"
             "json.dump({'score_acc': min(float(x), 9) / 10 + seed / 100, 'x_type': type(x).__name__, 'label': label, "
             "'has_label': 'label' in globals()}, open(results_path, 'w'))")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_notebook(tmp_path_factory.mktemp("nb") / "tiny.ipynb", TINY_PARAMETERS, TINY_BODY)


def status_identity(run_dir: Path) -> tuple[int, int]:
    """The status file's inode and time: a kept run keeps its file, a rerun replaces it (a new inode)."""
    stat = (run_dir / STATUS_FILE).stat()
    return stat.st_ino, stat.st_mtime_ns


# --- case 2: a second sweep into the same --out ---------------------------------------------------------


def test_a_different_sweep_into_the_same_out_is_refused_and_the_first_one_is_kept(tiny, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main([str(tiny), "-p", "label", "first", "--grid", "x=1,2", "--out", str(out)]) == 0
    before = {name: status_identity(out / name) for name in ("x=1", "x=2")}
    table_before = (out / "results.csv").read_bytes()
    capsys.readouterr()

    changed = write_notebook(tmp_path / "changed" / "tiny.ipynb", TINY_PARAMETERS, TINY_BODY + "\n# edited")
    refused = {
        "fixed parameters": [str(tiny), "-p", "label", "second", "--grid", "x=1,2"],
        "other content": [str(changed), "-p", "label", "first", "--grid", "x=1,2"],
        "grid names were x, now x, seed": [str(tiny), "-p", "label", "first", "--grid", "x=1,2", "--seeds", "0"],
    }
    for why, argv in refused.items():
        for dry in ([], ["--dry-run"]):
            assert main([*argv, "--out", str(out), *dry]) == 2, why
            err = capsys.readouterr().err
            assert why in err and "--out" in err and "--force" in err and f"{out}/ holds a different sweep" in err, err
    assert {name: status_identity(out / name) for name in before} == before  # nothing was rerun or removed
    assert (out / "results.csv").read_bytes() == table_before
    with pytest.raises(SweepConflict):
        sweep(tiny, {"label": "second"}, {"x": [1, 2]}, out, verbose=False)

    assert main([*refused["fixed parameters"], "--out", str(out), "--force"]) == 0  # --force replaces that sweep
    assert pd.read_csv(out / "results.csv")["label"].tolist() == ["second", "second"]
    assert json.loads((out / "sweep.json").read_text())["params"] == {"label": "second"}


def test_more_values_or_seeds_extend_the_same_sweep_and_the_tables_hold_every_run(tiny, tmp_path, capsys):
    out = tmp_path / "sweep"
    sweep(tiny, {"label": "a"}, {"x": [1, 2]}, out, seeds=[0], verbose=False)
    before = {name: status_identity(out / name) for name in ("x=1,seed=0", "x=2,seed=0")}

    assert main([str(tiny), "-p", "label", "a", "--grid", "x=3", "--seeds", "0", "--out", str(out), "--dry-run"]) == 0
    assert "and 2 earlier run(s) of the same sweep in" in capsys.readouterr().out
    table = sweep(tiny, {"label": "a"}, {"x": [3]}, out, seeds=[0])  # a new value
    assert "kept 2 earlier runs of the same sweep" in capsys.readouterr().out
    assert table["run"].tolist() == ["x=1,seed=0", "x=2,seed=0", "x=3,seed=0"]
    table = sweep(tiny, {"label": "a"}, {"x": [1]}, out, seeds=[1], verbose=False)  # a new seed
    expected = ["x=1,seed=0", "x=1,seed=1", "x=2,seed=0", "x=3,seed=0"]
    assert table["run"].tolist() == expected and table["status"].tolist() == ["ok"] * 4
    assert table["score_acc"].tolist() == pytest.approx([0.1, 0.11, 0.2, 0.3])
    assert pd.read_csv(out / "results.csv")["run"].tolist() == expected
    assert {name: status_identity(out / name) for name in before} == before  # the first sweep's runs were kept, not rerun
    config = json.loads((out / "sweep.json").read_text())
    assert config["grid"] == {"x": [1, 2, 3]} and config["seeds"] == [0, 1] and config["runs"] == expected


# --- case 6: an --out that cannot be written ----------------------------------------------------------


def unwritable_folders(tmp_path: Path) -> list[Path]:
    """Folders no file can be made in: below a file, a file itself, and a read-only place (a 0o555 folder; as root /sys)."""
    (tmp_path / "a_file").write_text("not a folder")
    folders = [tmp_path / "a_file" / "out", tmp_path / "a_file"]
    if os.geteuid() != 0:
        (tmp_path / "read_only").mkdir(mode=0o555)
        folders.append(tmp_path / "read_only" / "out")
    elif Path("/sys/kernel").is_dir():  # root may write anywhere but in sysfs
        folders.append(Path("/sys/tlkit-cannot-write-here"))
    return folders


def test_an_unwritable_out_is_one_line_and_exit_2_before_any_run(tiny, tmp_path, capsys):
    for folder in unwritable_folders(tmp_path):
        assert main([str(tiny), "--grid", "x=1", "--out", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: The sweep's folder (--out) {folder} cannot be written to (") and len(err.strip().splitlines()) == 1, err
        assert "Choose a folder you can write to" in err


def test_the_course_refuses_an_unwritable_output_dir_before_running(tiny, tmp_path, capsys):
    notebooks = tmp_path / "course"
    write_notebook(notebooks / "01_tiny.ipynb", TINY_PARAMETERS, TINY_BODY)
    for folder in unwritable_folders(tmp_path):
        assert course.main(["--notebooks", str(notebooks), "--output-dir", str(folder)]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: --output-dir {folder} cannot be written to (") and len(captured.err.strip().splitlines()) == 1
        assert "running" not in captured.out


# --- case 12: course -p names, one typing for every worker, long values ------------------------------


@pytest.fixture
def two_notebooks(tmp_path) -> Path:
    """A course folder: 01 has label, 02 has x and seed but no label."""
    folder = tmp_path / "course"
    write_notebook(folder / "01_tiny.ipynb", TINY_PARAMETERS, TINY_BODY)
    write_notebook(folder / "02_other.ipynb", "x = 1\nseed = 0\nresults_path = 'o.json'\noutput_dir = '.'",
                   "import json\njson.dump({'has_label': 'label' in globals(), 'x_type': type(x).__name__}, open(results_path, 'w'))")
    return folder


def test_course_refuses_a_parameter_no_notebook_has_with_the_known_names(two_notebooks, tmp_path, capsys):
    out = tmp_path / "outputs"
    for name in ("lable", "x=0;import os;os.system('touch pwned')#"):
        assert course.main(["--notebooks", str(two_notebooks), "--output-dir", str(out), "-p", name, "1"]) == 2
        err = capsys.readouterr().err
        assert f"-p {name!r}: none of 01_tiny.ipynb, 02_other.ipynb has a parameter of that name" in err, err
        assert "The parameters are: x, seed, label, progress." in err
    assert "(lable: did you mean 'label'?)" in course_error(two_notebooks, {"lable": 1})
    assert "--output-dir" in course_error(two_notebooks, {"output_dir": "elsewhere"})
    assert not out.exists() and not (two_notebooks / "pwned").exists()  # refused before anything ran


def course_error(notebooks: Path, params: dict) -> str:
    with pytest.raises(course.ParameterError) as err:
        course_parameters(course.course_notebooks(notebooks), params)
    return str(err.value)


def test_course_parameters_reach_only_the_notebooks_that_have_them_as_values(two_notebooks, tmp_path, capsys):
    shares = course_parameters(course.course_notebooks(two_notebooks), {"label": "hi", "x": 2})
    assert [share for share in shares.values()] == [{"label": "hi", "x": 2}, {"x": 2}]
    sneaky = "a\"); open('pwned', 'w'); (\"\n'b' \\ é"  # quotes, a newline, a backslash: text, never code
    out = tmp_path / "outputs"
    assert course.main(["--notebooks", str(two_notebooks), "--output-dir", str(out), "-p", "label", sneaky, "-p", "x", "1e-05"]) == 0
    assert "-p label goes to 01_tiny.ipynb only" in capsys.readouterr().out
    first, second = (json.loads((out / f"{stem}.json").read_text()) for stem in ("01_tiny", "02_other"))
    assert first["label"] == sneaky and first["x_type"] == "float" and second == {"has_label": False, "x_type": "float"}
    assert not (two_notebooks / "pwned").exists() and not (out / "pwned").exists()


def typed(value: object) -> object:
    """``value`` with each number tagged by its type (and NaN made comparable), to compare two parameter sets exactly."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, value)


def test_a_worker_process_gets_the_very_values_a_run_in_this_process_gets(tiny, tmp_path):
    grid = {"x": [1e-05, math.inf, -math.inf, math.nan, np.float32(0.5), 3]}
    fixed = {"label": "1e-05", "seeds": (0, 1), "curve": [5, None, 2.5], "lr_mult": {"stage6": 1e-3}, "text": "yes", "day": "2020-01-01",
             "none": "null", "spaced": "a b " * 40, "quoted": "it's \"x\"\n\\", "unicode": "é", "folder": Path('my "data"'), "sizes": np.arange(2)}
    runs = [(f"run{i}", {"x": x}) for i, x in enumerate(grid["x"])]
    for task in run_tasks_of(tiny, tiny.read_bytes(), fixed, runs, tmp_path, shared_out=True):
        in_process = run_parameters(tiny, tmp_path / task.name, dict(task.parameters))  # what tlkit.course.run_notebook hands papermill
        command = papermill_command(tiny, tmp_path / task.name, task.parameters, cwd=tmp_path)
        in_worker = yaml.load(command[command.index("-y") + 1], Loader=NoDatesSafeLoader)  # how papermill's -y reads it
        assert typed(in_worker) == typed(in_process)
        assert type(in_process["x"]) is (int if task.name == "run5" else float) and in_process["seeds"] == [0, 1]
        assert in_process["folder"] == 'my "data"' and in_process["sizes"] == [0, 1]  # a Path as text, an array as a list
        for value in in_process.values():  # papermill writes each one as a literal: text stays text, never code
            if not isinstance(value, float):
                assert ast.literal_eval(PythonTranslator.translate(value)) == value


def test_float_grid_values_reach_the_notebook_as_floats_with_one_worker_or_two(tiny, tmp_path):
    for workers in ("1", "2"):
        out = tmp_path / workers
        assert main([str(tiny), "--grid", "x=1e-05,inf", "--workers", workers, "--out", str(out)]) == 0
        table = pd.read_csv(out / "results.csv")
        assert table["x_type"].tolist() == ["float", "float"], workers
        assert table["score_acc"].tolist() == pytest.approx([1e-06, 0.9])


def test_long_values_make_short_distinct_run_names_and_dry_run_shows_them(tiny, tmp_path, capsys):
    long, other = "L" * 300, "L" * 299 + "M"
    names = [run_name({"label": long}), run_name({"label": other}), run_name({"label": "é" * 200})]
    assert all(len(name.encode()) <= MAX_RUN_NAME_BYTES for name in names) and len(set(names)) == 3
    assert names[0].startswith("label=LLLL") and "~" in names[0]
    assert run_name({"label": "short"}) == "label=short"  # names that fit stay as they were
    assert names[2].startswith("label=éé") and len(names[2].encode()) > MAX_RUN_NAME_BYTES - 16  # cut between characters, not inside one

    out = tmp_path / "sweep"
    argv = [str(tiny), "--grid", f"label=short,{long}", "--out", str(out)]
    assert main([*argv, "--dry-run"]) == 0
    listed = [line.split(":")[0].strip() for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == [name for name, _ in plan_runs(tiny, {}, {"label": ["short", long]})] == ["label=short", names[0]]
    assert main(argv) == 0  # both run: no "File name too long"
    table = pd.read_csv(out / "results.csv")
    assert table["run"].tolist() == listed and table["label"].tolist() == ["short", long] and table["status"].tolist() == ["ok", "ok"]
    assert all((out / name / STATUS_FILE).exists() for name in listed)
