"""Batch runs: one notebook executed over a grid of parameters, every run's metrics in one table and a plot.

Usage: python -m tlkit.sweep NOTEBOOK [-p NAME VALUE ...] [--grid NAME=V1,V2,... ...] [--seeds 0,1,2] [--out DIR]
                             [--workers N | --dask ADDRESS [--shared-out]] [--force] [--metric NAME ...] [--dry-run]

Each point of the grid (the cartesian product of the --grid lists, in the order given; with --seeds, once per
seed) is one papermill run in its own folder DIR/<name>=<value>,... (executed notebook, metrics JSON, figures,
and the run's status, sweep-run.json, written when it ends; a name over 120 bytes is cut and ends in ~ and a hash
of all of it). The runs' metrics are collected into
DIR/results.csv, DIR/results.md and a plot, DIR/results.png; with --seeds the table and the plot show the mean
and standard deviation over the seeds of each point. Runs go one after another, on N local worker processes
(--workers), or to a running dask.distributed scheduler (--dask). The same command again reuses the runs that
finished (same notebook content and parameters) and reruns the others; --force reruns all. More values or seeds
for the same sweep (same notebook content, fixed parameters and grid names, as DIR/sweep.json records them) extend
it: its finished runs stay and the tables hold them all. A different sweep is refused in a folder that holds one
(give it another --out, or --force to replace that sweep). A failed run is reported and the sweep goes on; the exit
status is 1 when any run failed, 2 for a bad command line, a folder that cannot be written, holds a different sweep
or is being written by another live sweep, 130 when interrupted.
Values are read like papermill's -p (True/False/None, numbers, else text); lists and dicts as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import math
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ._extras import require
from ._io import SaveError, atomic_path, check_writable_folder, user_path, write_bytes_atomically, write_text_atomically
from .compare import summarize_seeds
from .course import (  # the -p values of python -m tlkit.course and of a sweep read alike
    NotebookRun,
    did_you_mean,
    parse_value,
    run_notebook,
    run_parameters,
)
from .plots import save_figure

# The sweep points these at each run's own folder, so that runs never overwrite each other's files.
PER_RUN_PARAMETERS = ("results_path", "output_dir")
# Written into a run's folder when the run ends (atomically): what a later sweep reads to reuse it.
STATUS_FILE = "sweep-run.json"
# The lock that keeps two live sweeps out of one folder, and who holds it (for the refusal message).
LOCK_FILE, OWNER_FILE = ".sweep.lock", ".sweep.owner.json"
# What the sweep in a folder is (notebook content, fixed parameters, grid, seeds, runs): a later sweep extends it or is refused.
SWEEP_FILE = "sweep.json"
# Run folder names longer than this are cut (file systems allow 255 bytes, and long values made runs fail after the first).
MAX_RUN_NAME_BYTES = 120


class SweepError(ValueError):
    """A sweep that cannot start: unknown notebook or parameter, malformed grid."""


class SweepBusy(SweepError):
    """The sweep's folder is held by another sweep that is still running."""


class SweepConflict(SweepError):
    """The sweep's folder holds a different sweep (other notebook content, fixed parameters or grid names)."""


# --- parsing the command line --------------------------------------------------------------------------


def parse_grid_option(text: str) -> tuple[str, list]:
    """``"lr=0.001,0.01"`` -> ``("lr", [0.001, 0.01])``; values that hold commas (lists) need the whole list as JSON: ``"data_curve=[5],[5,20]"``."""
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise SweepError(f"--grid {text!r}: expected NAME=V1,V2,... (e.g. --grid lr=0.001,0.01).")
    try:  # all values JSON (numbers, lists, quoted text): commas inside lists stay inside them
        parsed = json.loads(f"[{values}]")
    except json.JSONDecodeError:
        parsed = [parse_value(v.strip()) for v in values.split(",")]
    return name.strip(), parsed


def parse_grid(options: Sequence[str]) -> dict[str, list]:
    """All ``--grid`` options as one ordered ``{name: values}``; a name given twice is an error."""
    grid: dict[str, list] = {}
    for text in options:
        name, values = parse_grid_option(text)
        if name in grid:
            raise SweepError(f"--grid {name} is given twice; list all its values in one option: --grid {name}=V1,V2,...")
        grid[name] = values
    return grid


# --- planning the runs ---------------------------------------------------------------------------------


def format_value(value: object) -> str:
    """A parameter value as it appears in run names, tables and plot labels (lists as compact JSON)."""
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, tuple, dict)) else str(value)


def run_name(point: Mapping[str, object]) -> str:
    """A readable folder name for one grid point: ``lr=0.001,image_size=48`` (``default`` for an empty grid), cut to
    :data:`MAX_RUN_NAME_BYTES` by :func:`short_name`."""
    if not point:
        return "default"
    name = ",".join(f"{key}={format_value(value)}" for key, value in point.items())
    return short_name(re.sub(r"[^\w.=,+\-\[\]]", "_", name))  # no path separators, spaces, quotes or ~ in folder names


def short_name(name: str, limit: int = MAX_RUN_NAME_BYTES) -> str:
    """``name`` if it fits in ``limit`` bytes (UTF-8), else its start, ``~`` and 12 hex digits of its SHA-256: names
    that differ anywhere stay different (``~`` is in no value's part of a name, so a cut name is never a real one)."""
    encoded = name.encode()
    if len(encoded) <= limit:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    return f"{encoded[: limit - len(digest) - 1].decode('utf-8', 'ignore')}~{digest}"


def grid_lists(grid: Mapping[str, Iterable[object]]) -> dict[str, list]:
    """``grid`` with each value collection as a list (numpy scalars as Python numbers), after checking it is non-empty and repeat-free."""
    lists = {}
    for name, values in grid.items():
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
            raise SweepError(f"grid[{name!r}] = {values!r}: give a list of values, e.g. {{{name!r}: [1, 2]}}.")
        lists[name] = [v.item() if isinstance(v, np.generic) else v for v in values]
        names = [format_value(v) for v in lists[name]]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if not names or repeated:
            problem = f"lists {', '.join(repeated)} more than once" if repeated else "is empty"
            raise SweepError(f"grid[{name!r}] {problem}: give each value once, e.g. {{{name!r}: [1, 2]}}.")
    return lists


def expand_grid(grid: Mapping[str, Iterable[object]]) -> list[dict[str, object]]:
    """The cartesian product of ``grid``'s value lists, the last name varying fastest; one empty point for an empty grid."""
    lists = grid_lists(grid)
    return [dict(zip(lists, combination)) for combination in itertools.product(*lists.values())]


def notebook_parameters(notebook: Path) -> list[str]:
    """The names in ``notebook``'s ``parameters`` cell, in order (read by papermill, no kernel started)."""
    pm = require("papermill", "A sweep of the course's notebooks")

    if not notebook.is_file():
        siblings = sorted(p.name for p in notebook.parent.glob("*.ipynb")) if notebook.parent.is_dir() else []
        hint = f"; notebooks in {notebook.parent}/: {', '.join(siblings)}" if siblings else ""
        raise SweepError(f"No notebook at {notebook}: give the path of an .ipynb file{hint}.")
    return list(pm.inspect_notebook(str(notebook)))


def check_parameters(notebook: Path, params: Mapping[str, object], grid: Mapping[str, Iterable[object]]) -> None:
    """Raise :class:`SweepError` for names the notebook does not take, names the sweep sets itself, or names fixed and swept at once."""
    valid = notebook_parameters(notebook)
    unknown = [name for name in [*params, *grid] if name not in valid]
    if unknown:
        raise SweepError(
            f"{notebook.name} has no parameter {', '.join(map(repr, unknown))}{did_you_mean(unknown, valid)}. "
            + (f"Its parameters are: {', '.join(valid)}." if valid else "It has no code cell tagged 'parameters': tag its first code cell.")
        )
    reserved = [name for name in [*params, *grid] if name in PER_RUN_PARAMETERS]
    if reserved:
        raise SweepError(
            f"The sweep sets {' and '.join(PER_RUN_PARAMETERS)} itself (each run writes into its own folder); "
            f"leave out {', '.join(reserved)} and choose the sweep's folder with --out (out_dir)."
        )
    both = [name for name in params if name in grid]
    if both:
        raise SweepError(f"{', '.join(both)} is both fixed (-p) and swept (--grid); keep only one of them.")


def seed_list(seeds: Iterable[object] | str | None) -> list[int]:
    """``--seeds 0,1,2`` (or a list) as distinct integers; empty for no seeds."""
    if seeds is None:
        return []
    values = [parse_value(v.strip()) for v in seeds.split(",")] if isinstance(seeds, str) else list(seeds)
    values = [v.item() if isinstance(v, np.generic) else v for v in values]
    whole = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if isinstance(seeds, str) and not seeds.strip() or not whole or len(set(values)) < len(values):
        raise SweepError(f"--seeds {seeds!r}: give distinct integers separated by commas, e.g. --seeds 0,1,2.")
    return values


def plan_runs(
    notebook: Path, params: Mapping[str, object], grid: Mapping[str, Iterable[object]], seeds: Sequence[int] = ()
) -> list[tuple[str, dict[str, object]]]:
    """The sweep's runs as ``(run name, point)`` pairs (with seeds: each grid point once per seed, ``seed`` last), after checking every name and value list."""
    if seeds and "seed" in [*params, *grid]:
        where = "-p seed" if "seed" in params else "--grid seed"
        raise SweepError(f"--seeds sets seed for every run; leave out {where} (or drop --seeds and keep {where}).")
    check_parameters(notebook, params, {**grid, **({"seed": list(seeds)} if seeds else {})})
    points = expand_grid(grid)
    if seeds:
        points = [{**point, "seed": seed} for point in points for seed in seeds]
    runs = [(run_name(point), point) for point in points]
    names = [name for name, _ in runs]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise SweepError(f"Grid points share the folder name {', '.join(clashes)} once made file-safe; give values that differ in letters or digits.")
    return runs


# --- collecting the results ----------------------------------------------------------------------------


def result_row(name: str, point: Mapping[str, object], run: NotebookRun) -> dict[str, object]:
    """One table row: run name, grid values, status, error, wall time, then the run's metrics (grid values win on a shared name)."""
    row: dict[str, object] = {"run": name, **{k: format_value(v) if isinstance(v, (list, tuple, dict)) else v for k, v in point.items()}}
    row.update(status="failed" if run.error else "ok", error=run.error, seconds=round(run.seconds, 2))
    row.update({key: value for key, value in run.metrics.items() if key not in row})
    return row


def results_table(rows: Sequence[Mapping[str, object]]) -> pd.DataFrame:
    """The rows as a DataFrame; columns whose values are all integers stay integers (Int64) where failed runs leave gaps."""
    table = pd.DataFrame(list(rows))
    for column in table.columns:
        present = [row[column] for row in rows if column in row]
        if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
            table[column] = table[column].astype("Int64")
    return table


def metric_columns(table: pd.DataFrame, grid_keys: Sequence[str]) -> list[str]:
    """The table's metric columns: everything after run, grid values, status, error and seconds."""
    fixed = {"run", "point", "status", "error", "seconds", "seeds ok", "seed", *grid_keys}
    return [c for c in table.columns if c not in fixed and not (c.endswith("_std") and c[: -len("_std")] in table.columns)]


def numeric_metrics(table: pd.DataFrame, grid_keys: Sequence[str]) -> list[str]:
    """The metric columns that hold numbers (at least one)."""
    return [c for c in metric_columns(table, grid_keys) if pd.api.types.is_numeric_dtype(table[c]) and table[c].notna().any()]


def headline_metrics(table: pd.DataFrame, grid_keys: Sequence[str]) -> list[str]:
    """The metric to plot by default: the first numeric one with ``acc`` in its name (else the first numeric one)."""
    numeric = numeric_metrics(table, grid_keys)
    accuracies = [c for c in numeric if "acc" in c]
    return (accuracies or numeric)[:1]


def seed_summary(table: pd.DataFrame, grid_keys: Sequence[str]) -> pd.DataFrame:
    """One row per grid point over its seeds: ``point``, grid values, ``seeds ok`` (e.g. 3/3), mean ``seconds``, then each
    numeric metric's mean and ``<metric>_std`` (the sample std over the runs that finished; NaN with fewer than two).

    The means and stds are ``tlkit.compare.summarize_seeds``'s, the one seed summary of the package; only the column
    names follow the results files' ``<metric>_std``.
    """
    metrics = numeric_metrics(table, [*grid_keys, "seed"])
    keys = table[list(grid_keys)].map(format_value) if grid_keys else pd.DataFrame({"point": ["default"] * len(table)}, index=table.index)
    rows = []
    for _, group in keys.groupby(list(keys.columns), sort=False):
        runs = table.loc[group.index]
        ok = runs[runs["status"] == "ok"]
        first = runs.iloc[0]
        row: dict[str, object] = {"point": run_name({k: first[k] for k in grid_keys}), **{k: first[k] for k in grid_keys}}
        row.update({"seeds ok": f"{len(ok)}/{len(runs)}", "seconds": round(float(runs["seconds"].mean()), 2)})
        for metric in metrics:
            values = pd.to_numeric(ok[metric], errors="coerce").astype(float).dropna()
            if values.empty:
                row[metric], row[f"{metric}_std"] = math.nan, math.nan
                continue
            summary = summarize_seeds([{"point": 0, metric: v} for v in values], "point", [metric]).iloc[0]
            row[metric] = summary[metric]
            row[f"{metric}_std"] = summary[f"{metric} std"] if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame, digits: int = 3) -> str:
    """``table`` as a Markdown pipe table (tabulate, through ``DataFrame.to_markdown``), floats to ``digits`` significant digits, missing values empty."""

    def cell(value: object) -> object:
        if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
            return ""  # tabulate takes empty cells as missing: numbers stay right-aligned and formatted
        return value.replace("|", "\\|").replace("\n", " ") if isinstance(value, str) else value  # a | would end the cell

    return table.astype(object).map(cell).to_markdown(index=False, floatfmt=f".{digits}g", missingval="")


def mean_std_text(mean: float, std: float, digits: int = 3) -> str | None:
    """``0.812 ± 0.0141``; only the mean when there is no spread (one seed finished), nothing when none did."""
    if math.isnan(mean):
        return None
    return f"{mean:.{digits}g}" if math.isnan(std) else f"{mean:.{digits}g} ± {std:.{digits}g}"


def summary_markdown(summary: pd.DataFrame, digits: int = 3) -> str:
    """A :func:`seed_summary` as a Markdown table, each metric with a ``<metric>_std`` column shown as ``mean ± std``."""
    shown = summary.copy()
    for column in [c for c in summary.columns if f"{c}_std" in summary.columns]:
        shown[column] = [mean_std_text(m, s, digits) for m, s in zip(summary[column].astype(float), summary[f"{column}_std"].astype(float))]
        shown = shown.drop(columns=f"{column}_std")
    return markdown_table(shown, digits)


def value_label(value: object) -> str:
    """A grid value as a tick or legend label: :func:`format_value`, long ones cut (and kept distinct) by :func:`short_name`."""
    return short_name(format_value(value), 40)


def plot_sweep(table: pd.DataFrame, grid_keys: Sequence[str], metrics: Sequence[str], title: str = "") -> Figure:
    """Each metric against the grid: bars for one grid name, else x = the first name and one line per value of the others;
    error bars where ``table`` has ``<metric>_std`` (a :func:`seed_summary`)."""
    fig = Figure(figsize=(5.5 * len(metrics), 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        values = pd.to_numeric(table[metric], errors="coerce").astype(float)  # failed runs: NaN
        spread = pd.to_numeric(table[f"{metric}_std"], errors="coerce").astype(float).fillna(0.0) if f"{metric}_std" in table.columns else None
        labels = table[list(grid_keys)].map(value_label) if grid_keys else table.iloc[:, :1]  # no grid: the run (or point) names
        x_name, *others = labels.columns
        x_labels = list(dict.fromkeys(labels[x_name]))
        if not others:
            ax.bar(range(len(labels)), values.fillna(0.0), yerr=spread, capsize=4, color="tab:blue")
            for i in [i for i, v in enumerate(values) if math.isnan(v)]:
                ax.text(i, 0, "failed", rotation=90, ha="center", va="bottom", color="tab:red")
        else:
            for group, rows in labels.groupby(others, sort=False):
                group = group if isinstance(group, tuple) else (group,)
                ax.errorbar([x_labels.index(x) for x in rows[x_name]], values[rows.index], yerr=None if spread is None else spread[rows.index],
                            fmt="o-", capsize=3, label=", ".join(f"{k}={v}" for k, v in zip(others, group)))
            ax.legend(fontsize=8)
        failed = int(values.isna().sum())
        ax.set_xticks(range(len(x_labels)), x_labels)
        spread_note = " (mean ± std over seeds)" if spread is not None else ""
        ax.set(xlabel=x_name, ylabel=metric, title=metric + spread_note + (f" ({failed} failed point(s) not shown)" if failed else ""))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def write_results_files(
    table: pd.DataFrame, out_dir: Path, grid_keys: Sequence[str], metrics: Sequence[str] | None, title: str, *, seeds: Sequence[int] = ()
) -> list[Path]:
    """Write results.csv (one row per run), results.md and (when there is a metric to plot) results.png into ``out_dir``, each atomically; return their paths.

    With ``seeds`` the Markdown table and the plot show each grid point's mean ± std over its seeds (the per-seed rows follow in results.md)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [*grid_keys, "seed"] if seeds else list(grid_keys)
    plotted = seed_summary(table, grid_keys) if seeds else table
    with atomic_path(out_dir / "results.csv") as tmp:
        table.to_csv(tmp, index=False)
    if seeds:
        markdown = (f"Mean ± std over seeds {', '.join(map(str, seeds))} (sample std of the runs that finished):\n\n"
                    f"{summary_markdown(plotted)}\n\nPer seed:\n\n{markdown_table(table)}")
    else:
        markdown = markdown_table(table)
    write_text_atomically(out_dir / "results.md", markdown + "\n")
    written = [out_dir / "results.csv", out_dir / "results.md"]
    metrics = list(metrics) if metrics else headline_metrics(table, keys)
    missing = [m for m in metrics if m not in plotted.columns]
    if missing:
        available = ", ".join(metric_columns(plotted, keys)) or "none: every run failed"
        print(f"No plot: no {'numeric ' if seeds else ''}metric {', '.join(missing)} in the runs' results (they have: {available}); "
              "pick one of those with --metric, or plot the table with tlkit.sweep.plot_sweep.", file=sys.stderr)
    elif metrics and plotted[metrics].notna().any().any():
        fig = plot_sweep(plotted, grid_keys, metrics, title)
        with atomic_path(out_dir / "results.png") as tmp:
            save_figure(fig, tmp)
        written.append(out_dir / "results.png")
    return written


# --- one run, wherever it executes ---------------------------------------------------------------------


@dataclass(frozen=True)
class RunTask:
    """One run as it travels to where it executes (this process, a local worker, a Dask worker): the notebook itself, its parameters, where its files go."""

    name: str
    key: str  # hash of the notebook's content and the parameters: what a later sweep compares before reusing the run
    parameters: dict
    notebook_name: str
    notebook_source: bytes
    notebook_dir: str  # the notebook's folder here: the run starts in it where it exists there too, so relative data paths hold
    run_dir: str | None = None  # the run writes its files and status here itself; None: they come back with the outcome


@dataclass
class RunOutcome:
    """What a run sends back: its status record and, unless it wrote into its folder itself, its files (path in the folder -> bytes)."""

    record: dict
    files: dict[str, bytes] = field(default_factory=dict)


def notebook_values(value: object) -> object:
    """``value`` as plain data that papermill writes into a notebook as a literal of the same type, in this process and
    through :func:`parameters_yaml` alike: numpy scalars and arrays as Python numbers and lists, tuples as lists, mapping
    keys as text, anything else (a Path) as its text, never pasted in unquoted."""
    if isinstance(value, np.generic | np.ndarray):
        value = value.tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(key): notebook_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [notebook_values(item) for item in value]
    return str(value)


def parameters_yaml(parameters: Mapping[str, object]) -> str:
    """``parameters`` as the YAML of papermill's ``-y``, which it reads back as the same values with the same types
    (``1e-05``, ``inf`` and ``nan`` stay floats, the text ``"1e-05"`` or ``"yes"`` stays text): one typing for runs in
    this process and in a process of their own."""
    import yaml  # papermill's own dependency, and its reader of -y

    return yaml.safe_dump(notebook_values(dict(parameters)), sort_keys=False, allow_unicode=True, width=math.inf)


def run_key(notebook_source: bytes, parameters: Mapping[str, object]) -> str:
    """SHA-256 of the notebook's bytes and its parameters (canonical JSON): equal keys, same run."""
    digest = hashlib.sha256(notebook_source)
    digest.update(json.dumps(parameters, sort_keys=True, separators=(",", ":"), default=str).encode())
    return digest.hexdigest()


def now_text() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def status_record(task: RunTask, run: NotebookRun) -> dict:
    """What sweep-run.json holds for a run that ended: status, error, wall time, metrics, and the key and parameters it ran with."""
    return {
        "run": task.name, "key": task.key, "status": "failed" if run.error else "ok", "error": run.error,
        "seconds": round(run.seconds, 2), "metrics": run.metrics, "parameters": task.parameters,
        "host": socket.gethostname(), "finished": now_text(),
    }


def write_status(run_dir: Path, record: Mapping[str, object]) -> None:
    """Write a run's status file atomically: it exists only for runs that ended, and is never half-written."""
    write_text_atomically(run_dir / STATUS_FILE, json.dumps(record, indent=2, default=str) + "\n")


def read_status(run_dir: Path) -> dict | None:
    """A run folder's status record, or None for a run that never ended (or an unreadable file)."""
    try:
        record = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def finished_runs(tasks: Sequence[RunTask], out_dir: Path) -> dict[str, dict]:
    """The status records of the tasks whose folder holds a run that finished ``ok`` with the same key (same notebook content and parameters)."""
    records = {task.name: read_status(out_dir / task.name) for task in tasks}
    keys = {task.name: task.key for task in tasks}
    return {name: r for name, r in records.items() if r and r.get("status") == "ok" and r.get("key") == keys[name]}


def notebook_error(executed: Path, stderr: str) -> str:
    """A failed run's error as :func:`tlkit.course.run_notebook` reports it (``ValueError: ...``): from the executed
    notebook's failed cell, else papermill's last words."""
    try:
        cells = json.loads(executed.read_text())["cells"]
        errors = [out for cell in cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    except (OSError, ValueError, KeyError, TypeError):
        errors = []
    text = f"{errors[-1]['ename']}: {errors[-1]['evalue']}".strip() if errors else stderr.strip()
    return text.splitlines()[-1] if text else "papermill failed without a message"


def run_notebook_process(notebook: Path, output_dir: Path, parameters: Mapping[str, object], *, cwd: Path, env: Mapping[str, str]) -> NotebookRun:
    """:func:`tlkit.course.run_notebook` in a papermill process of its own started with ``env``, so that local workers
    each get their share of threads and GPUs."""
    output_dir.mkdir(parents=True, exist_ok=True)
    results, executed = output_dir / f"{notebook.stem}.json", output_dir / notebook.name
    results.unlink(missing_ok=True)
    start = time.perf_counter()
    done = subprocess.run(papermill_command(notebook, output_dir, parameters, cwd=cwd), env=dict(env), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    error = notebook_error(executed, done.stderr) if done.returncode else ""
    metrics = json.loads(results.read_text()) if results.exists() and not error else {}
    return NotebookRun(notebook.name, seconds, metrics, error)


def papermill_command(notebook: Path, output_dir: Path, parameters: Mapping[str, object], *, cwd: Path) -> list[str]:
    """The papermill command line that runs ``notebook`` into ``output_dir`` with the parameters a run in this process
    gets (:func:`tlkit.course.run_parameters`), as YAML that papermill reads back with their types."""
    params = parameters_yaml(run_parameters(notebook, output_dir, dict(parameters)))
    executed = output_dir / notebook.name
    return [sys.executable, "-m", "papermill", str(notebook), str(executed), "-y", params, "--cwd", str(cwd), "-k", "python3", "--no-progress-bar"]


def execute_run(task: RunTask, env: Mapping[str, str] | None = None) -> RunOutcome:
    """Run one task here: in this process, or with ``env`` in a papermill process of its own; write its folder and status, or send them back.

    The notebook runs from its bytes in the task (the content the sweep hashed), started in the notebook's
    original folder where that exists on this machine (relative data paths then hold), else beside the copy."""
    with tempfile.TemporaryDirectory(prefix="tlkit-sweep-") as scratch:
        source = Path(scratch) / "notebook" / task.notebook_name
        source.parent.mkdir()
        source.write_bytes(task.notebook_source)
        cwd = Path(task.notebook_dir) if Path(task.notebook_dir).is_dir() else source.parent
        run_dir = Path(task.run_dir) if task.run_dir else Path(scratch) / "run"
        shutil.rmtree(run_dir, ignore_errors=True)  # an earlier, failed or unfinished try's files (and status) go first
        if env is None:
            run = run_notebook(source, run_dir, dict(task.parameters), cwd=cwd)
        else:
            run = run_notebook_process(source, run_dir, task.parameters, cwd=cwd, env=env)
        record = status_record(task, run)
        if task.run_dir:
            write_status(run_dir, record)
            return RunOutcome(record)
        return RunOutcome(record, {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()})


def store_outcome(run_dir: Path, outcome: RunOutcome) -> None:
    """Write a run's returned files into its folder here, then its status last (a sweep killed in between reruns it)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    root = run_dir.resolve()
    for relative, data in outcome.files.items():
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            raise SweepError(f"A worker sent back {relative!r}, which lies outside the run's folder {root}; nothing of that run was kept.")
        write_bytes_atomically(path, data)  # a full disk is a SaveError naming the file, never a truncated one
    write_status(run_dir, outcome.record)


# --- where the runs execute ----------------------------------------------------------------------------


def available_cores() -> int:
    """The CPU cores this process may use (its affinity, e.g. a container's or a batch job's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def visible_gpus() -> list[str]:
    """The CUDA devices runs may share: those in CUDA_VISIBLE_DEVICES where it is set, else every one torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_environment(slot: int, workers: int, cores: int, gpus: Sequence[str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of local worker ``slot`` of ``workers``: OMP_NUM_THREADS = cores / workers, and with several GPUs one of them (round-robin)."""
    env = dict(os.environ if base is None else base)
    env["OMP_NUM_THREADS"] = str(max(1, cores // workers))
    if len(gpus) > 1:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


class LocalWorkers:
    """``workers`` runs at once on this machine, each in a papermill process (and kernel) of its own with its worker slot's environment."""

    def __init__(self, workers: int) -> None:
        self.workers, self.cores, self.gpus = workers, available_cores(), visible_gpus()
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(workers):
            self._slots.put(slot)

    def describe(self) -> str:
        gpus = f", one of GPUs {','.join(self.gpus)} each" if len(self.gpus) > 1 else ""
        return f"{self.workers} local workers (OMP_NUM_THREADS={max(1, self.cores // self.workers)} of {self.cores} cores each{gpus})"

    def run(self, task: RunTask) -> RunOutcome:
        """Run ``task`` in a free slot (the slot fixes its GPU, so two runs never share one while another idles)."""
        slot = self._slots.get()
        try:
            return execute_run(task, worker_environment(slot, self.workers, self.cores, self.gpus))
        finally:
            self._slots.put(slot)


def lost_record(task: RunTask, err: BaseException) -> dict:
    """A status record for a run whose worker raised instead of returning (lost worker, unpicklable task): failed, rerun next time."""
    return {"run": task.name, "key": task.key, "status": "failed", "error": f"{type(err).__name__}: {err}".splitlines()[0],
            "seconds": 0.0, "metrics": {}, "parameters": task.parameters}


def run_tasks(
    tasks: Sequence[RunTask], out_dir: Path, *, workers: int = 1, executor: Executor | None = None, verbose: bool = True
) -> Iterator[tuple[RunTask, dict]]:
    """Execute ``tasks`` one after another here, on ``workers`` local workers, or on ``executor``; yield each ``(task, status record)`` as it ends."""

    def report(i: int, task: RunTask, record: Mapping[str, object]) -> None:
        if verbose:
            run = NotebookRun(task.notebook_name, float(record["seconds"]), dict(record["metrics"]), str(record["error"]))
            print(f"[{i}/{len(tasks)}] {task.name}: {run.seconds:.1f}s  {run.headline()}", flush=True)

    if executor is None and workers == 1:
        for i, task in enumerate(tasks, 1):
            record = execute_run(task).record
            report(i, task, record)
            yield task, record
        return
    local = LocalWorkers(workers) if executor is None else None
    pool = executor or ThreadPoolExecutor(workers, thread_name_prefix="tlkit-sweep")  # threads only wait: each run is its own papermill process
    submit: Callable[[RunTask], RunOutcome] = local.run if local else execute_run
    if verbose:
        print(f"{len(tasks)} run(s) on {local.describe() if local else f'the executor ({type(pool).__name__})'}", flush=True)
    futures: dict[Future, RunTask] = {pool.submit(submit, task): task for task in tasks}
    try:
        for i, future in enumerate(as_completed(futures), 1):
            task = futures[future]
            try:
                outcome = future.result()
            except Exception as err:  # the worker, not the notebook, failed: nothing of the run is on disk
                outcome = None
                record = lost_record(task, err)
            else:
                record = outcome.record
                if task.run_dir is None:
                    store_outcome(out_dir / task.name, outcome)
            report(i, task, record)
            yield task, record
    finally:  # also on Ctrl-C: runs not started yet are dropped; finished ones are on disk already
        for future in futures:
            future.cancel()
        if local:
            pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def sweep_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir`` for this sweep, or raise :class:`SweepBusy` while a live sweep holds it; the OS drops the lock
    with its process, so a killed sweep leaves none."""
    filelock = require("filelock", "The lock on a sweep's folder")
    FileLock, Timeout = filelock.FileLock, filelock.Timeout

    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise SweepBusy(
            f"{out_dir}/ is being written by another sweep that is still running ({lock_owner(out_dir)}). "
            "Wait for it to end (or stop it), or give this sweep another --out; a sweep that ended or was killed holds no lock."
        ) from None
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_text(), "command": " ".join(sys.argv)}
        write_text_atomically(out_dir / OWNER_FILE, json.dumps(owner) + "\n")
        yield
    finally:
        (out_dir / OWNER_FILE).unlink(missing_ok=True)
        lock.release()


def lock_owner(out_dir: Path) -> str:
    """Who holds ``out_dir``'s lock, as written by :func:`sweep_lock`."""
    try:
        owner = json.loads((out_dir / OWNER_FILE).read_text())
        return f"pid {owner['pid']} on {owner['host']}, since {owner['started']}: {owner['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its owner did not say who it is yet"


@contextlib.contextmanager
def dask_executor(address: str, timeout: str = "30s") -> Iterator[Executor]:
    """A ``concurrent.futures`` executor on the running dask.distributed scheduler at ``address`` (reached within ``timeout``); the client closes afterwards."""
    Client = require("distributed", "python -m tlkit.sweep --dask").Client
    try:
        client = Client(address, timeout=timeout)
    except (OSError, ValueError) as err:
        raise SweepError(
            f"Could not reach a Dask scheduler at {address!r} ({err}). Start one first (`dask scheduler` and `dask worker ADDRESS`, "
            "or dask-jobqueue's SLURMCluster/PBSCluster, or the Dask Kubernetes operator) and give its address, e.g. tcp://10.0.0.5:8786."
        ) from err
    try:
        yield client.get_executor(pure=False)  # pure=False: a run is never taken from the scheduler's cache
    finally:
        client.close()


# --- the sweep a folder holds: extended by more values or seeds, refused when it is another one -----------


def unique_values(values: Iterable[object]) -> list:
    """``values`` without repeats (as :func:`format_value` writes them), in the order they first appear."""
    first: dict[str, object] = {}
    for value in values:
        first.setdefault(format_value(value), value)
    return list(first.values())


def sweep_config(notebook: Path, source: bytes, params: Mapping[str, object], grid_keys: Sequence[str], seeded: bool,
                 runs: Sequence[tuple[str, Mapping[str, object]]]) -> dict:
    """What sweep.json records: the notebook and its content's hash, the fixed parameters, each grid name with the
    values of ``runs``, their seeds, and the runs in table order."""
    return {
        "notebook": str(notebook), "notebook_sha256": hashlib.sha256(source).hexdigest(), "params": notebook_values(dict(params)),
        "grid": {key: unique_values(point[key] for _, point in runs) for key in grid_keys},
        "seeds": unique_values(point["seed"] for _, point in runs) if seeded else [], "runs": [name for name, _ in runs],
    }


def swept_names(config: Mapping[str, object]) -> list[str]:
    """The grid names of a sweep.json, ``seed`` last where it had seeds: what a run's folder name is made of."""
    return [*dict(config.get("grid") or {}), *(["seed"] if config.get("seeds") else [])]


def canonical(value: object) -> str:
    return json.dumps(notebook_values(value), sort_keys=True, default=str)


def sweep_differences(previous: Mapping[str, object], current: Mapping[str, object]) -> list[str]:
    """How the sweep ``previous`` (a sweep.json) differs from ``current``: notebook content, fixed parameters, grid names."""

    def fixed(config: Mapping[str, object]) -> str:
        return ", ".join(f"{k}={format_value(v)}" for k, v in dict(config.get("params") or {}).items()) or "none"

    def swept(config: Mapping[str, object]) -> str:
        return ", ".join(swept_names(config)) or "none"

    differences = []
    if previous.get("notebook_sha256") != current["notebook_sha256"]:
        differences.append(f"it ran {previous.get('notebook', 'a notebook')} with other content than {current['notebook']} has now")
    if canonical(previous.get("params") or {}) != canonical(current["params"]):
        differences.append(f"its fixed parameters (-p) were {fixed(previous)}, now {fixed(current)}")
    if swept_names(previous) != swept_names(current):
        differences.append(f"its grid names were {swept(previous)}, now {swept(current)}")
    return differences


def read_sweep_file(out_dir: Path, *, force: bool = False) -> dict | None:
    """The sweep.json in ``out_dir``; None where there is none. :class:`SweepConflict` where it cannot be read (unless
    ``force``: then None), as then nothing tells whether the sweep there is this one."""
    path = out_dir / SWEEP_FILE
    try:
        config = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as err:
        config = err
    if not isinstance(config, dict) and force:
        return None
    if not isinstance(config, dict):
        raise SweepConflict(f"{path} cannot be read ({config}), so it is unknown which sweep {out_dir}/ holds. "
                            "Give this sweep a folder of its own with --out (out_dir), or add --force (force=True) to replace what is there.")
    return config


def previous_finished_runs(previous: Mapping[str, object], out_dir: Path, source: bytes, grid_keys: Sequence[str]) -> dict[str, tuple[dict, dict]]:
    """``{name: (point, status record)}`` of the runs ``previous`` lists that finished ``ok`` with the key this sweep
    would give them (same notebook content and parameters): what an extension of that sweep keeps."""
    kept = {}
    for name in previous.get("runs") or []:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            continue  # a hand-edited sweep.json: only folders inside out_dir count
        record = read_status(out_dir / name)
        parameters = record.get("parameters") if record and record.get("status") == "ok" else None
        if not isinstance(parameters, dict) or any(key not in parameters for key in grid_keys):
            continue
        point = {key: parameters[key] for key in grid_keys}
        if run_name(point) == name and record.get("key") == run_key(source, parameters):
            kept[name] = (point, record)
    return kept


def runs_to_keep(
    previous: Mapping[str, object] | None, out_dir: Path, notebook: Path, source: bytes, params: Mapping[str, object], grid_keys: Sequence[str],
    seeded: bool, runs: Sequence[tuple[str, Mapping[str, object]]], *, force: bool = False,
) -> dict[str, tuple[dict, dict]]:
    """The finished runs of the sweep ``previous`` (``out_dir``'s sweep.json) that this one does not plan but keeps, as it
    extends that sweep; :class:`SweepConflict` where that is a different sweep (its runs would be replaced), unless ``force``
    (then none is kept)."""
    if previous is None:
        return {}
    current = sweep_config(notebook, source, params, grid_keys, seeded, runs)
    differences = sweep_differences(previous, current)
    if differences and force:
        return {}
    if differences:
        raise SweepConflict(
            f"{out_dir}/ holds a different sweep ({'; '.join(differences)}): running this one there would replace that sweep's finished runs "
            "and tables. Give this sweep a folder of its own with --out (out_dir), or add --force (force=True) to replace that sweep."
        )
    planned = {name for name, _ in runs}
    return {name: kept for name, kept in previous_finished_runs(previous, out_dir, source, swept_names(current)).items() if name not in planned}


def table_runs(previous: Mapping[str, object] | None, kept: Mapping[str, tuple[dict, dict]], runs: Sequence[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The runs the tables show: the kept ones and the planned ones, in the grid's order (the last name varying fastest)
    with the values of ``previous`` (the sweep extended) first and new values after them."""
    if not kept:
        return list(runs)
    points = {**{name: point for name, (point, _) in kept.items()}, **dict(runs)}
    earlier = {**dict(previous.get("grid") or {}), "seed": previous.get("seeds") or []} if previous else {}
    order = {key: [format_value(v) for v in unique_values([*earlier.get(key, []), *(point[key] for point in points.values())])]
             for key in next(iter(points.values()))}
    return sorted(points.items(), key=lambda run: tuple(order[key].index(format_value(value)) for key, value in run[1].items()))


def run_tasks_of(notebook: Path, source: bytes, params: Mapping[str, object], runs: Sequence[tuple[str, Mapping[str, object]]],
                 out_dir: Path, shared_out: bool) -> list[RunTask]:
    """One :class:`RunTask` per run: its parameters as :func:`notebook_values` (the values every way of running gets), its key, its folder."""
    tasks = []
    for name, point in runs:
        parameters = notebook_values({**params, **point})
        tasks.append(RunTask(name, run_key(source, parameters), parameters, notebook.name, source, str(notebook.resolve().parent),
                             str((out_dir / name).resolve()) if shared_out else None))
    return tasks


# --- running -------------------------------------------------------------------------------------------


def sweep(
    notebook: str | Path,
    params: Mapping[str, object] | None = None,
    grid: Mapping[str, Iterable[object]] | None = None,
    out_dir: str | Path | None = None,
    *,
    seeds: Iterable[int] | str | None = None,
    metrics: Sequence[str] | None = None,
    workers: int = 1,
    executor: Executor | None = None,
    shared_out: bool | None = None,
    force: bool = False,
    verbose: bool = True,
) -> pd.DataFrame:
    """Run ``notebook`` once per point of ``grid`` (and per seed of ``seeds``) with ``params`` fixed, each in
    ``out_dir/<run name>/``; return (and write) one result row per run.

    Runs go one after another in this process, ``workers`` at once on this machine, or to ``executor``: any
    ``concurrent.futures.Executor``, e.g. a dask.distributed ``Client.get_executor()`` or a process pool. With
    ``shared_out`` (default: True for local pools, False for other executors) the runs write into ``out_dir``
    themselves, which must then be the same path where they execute (a shared filesystem); otherwise their
    files come back with their results. Runs that finished before with the same notebook content and
    parameters are reused unless ``force``; a folder another live sweep holds raises :class:`SweepBusy`.

    A folder that holds the same sweep (notebook content, ``params`` and grid names, seeds or not, as its sweep.json
    says) is extended: its finished runs that this call does not list stay in the table. A folder that holds a
    different sweep raises :class:`SweepConflict` (nothing is run or removed) unless ``force``, which replaces that
    sweep; a folder that cannot be written raises :class:`tlkit._io.SaveError` before anything runs.
    """
    notebook = user_path(notebook)
    params, grid, seeds = dict(params or {}), grid_lists(grid or {}), seed_list(seeds)
    if workers < 1 or (executor is not None and workers != 1):
        raise SweepError(f"workers={workers}: give a number of local workers >= 1, or an executor (and leave workers at 1).")
    out_dir = default_out_dir(notebook) if out_dir is None else user_path(out_dir)
    runs = plan_runs(notebook, params, grid, seeds)
    if shared_out is None:
        shared_out = executor is None or isinstance(executor, (ThreadPoolExecutor, ProcessPoolExecutor))
    source = notebook.read_bytes()
    check_writable_folder(out_dir, what="The sweep's folder (--out)")
    with sweep_lock(out_dir):
        previous = read_sweep_file(out_dir, force=force)
        kept = runs_to_keep(previous, out_dir, notebook, source, params, list(grid), bool(seeds), runs, force=force)
        shown = table_runs(previous, kept, runs)
        config = sweep_config(notebook, source, params, list(grid), bool(seeds), shown)
        write_text_atomically(out_dir / SWEEP_FILE, json.dumps(config, indent=2, default=str) + "\n")
        tasks = run_tasks_of(notebook, source, params, runs, out_dir, shared_out)
        records = {} if force else finished_runs(tasks, out_dir)
        if verbose and records:
            print(f"reused {len(records)} finished run{'s' if len(records) != 1 else ''} in {out_dir}/ "
                  f"(same notebook and parameters; --force reruns them)", flush=True)
        if verbose and kept:
            print(f"kept {len(kept)} earlier run{'s' if len(kept) != 1 else ''} of the same sweep in {out_dir}/ (ended ok, not listed "
                  "this time); the tables show them too", flush=True)
        records.update({name: record for name, (_, record) in kept.items()})
        try:
            for task, record in run_tasks([t for t in tasks if t.name not in records], out_dir, workers=workers, executor=executor, verbose=verbose):
                records[task.name] = record
        except KeyboardInterrupt:
            finished = sum(r.get("status") == "ok" for r in records.values())
            print(f"\nInterrupted: {finished} of {len(shown)} runs have finished and are kept in {out_dir}/; "
                  "run the same command again to go on (it reuses them).", file=sys.stderr, flush=True)
            raise
        rows = [result_row(name, point, record_run(records[name], notebook.name)) for name, point in shown]
        table = results_table(rows)
        title = f"{notebook.name}: {len(shown)} runs" + (f" ({len(config['seeds'])} seeds per point)" if seeds else "")
        written = write_results_files(table, out_dir, list(grid), metrics, title, seeds=config["seeds"])
    if verbose:
        print_summary(table, list(grid), notebook.name, metrics, written, seeds=seeds)
    return table


def default_out_dir(notebook: Path) -> Path:
    """Where a sweep of ``notebook`` goes without --out: a folder per notebook."""
    return Path("outputs") / "sweeps" / notebook.stem


def record_run(record: Mapping[str, object], notebook_name: str) -> NotebookRun:
    """A status record as the :class:`NotebookRun` it came from."""
    return NotebookRun(notebook_name, float(record["seconds"]), dict(record["metrics"] or {}), str(record["error"] or ""))


def print_summary(
    table: pd.DataFrame, grid_keys: Sequence[str], notebook_name: str, metrics: Sequence[str] | None, written: Sequence[Path], *, seeds: Sequence[int] = ()
) -> None:
    """Print the short table (grid values, status, time, plotted metrics; with seeds their mean ± std per point), the files written and the failed runs."""
    keys = [*grid_keys, "seed"] if seeds else list(grid_keys)
    shown = [m for m in (metrics or headline_metrics(table, keys)) if m in table.columns]
    print()
    if seeds:
        summary = seed_summary(table, grid_keys)
        shown = [m for m in shown if m in summary.columns]
        print(summary_markdown(summary[["point", *grid_keys, "seeds ok", "seconds", *shown, *[f"{m}_std" for m in shown]]]))
    else:
        print(markdown_table(table[["run", *grid_keys, "status", "seconds", *shown]]))
    print(f"\nWritten: {', '.join(map(str, written))} (one folder per run beside them).")
    failed = table[table["status"] != "ok"]
    if len(failed):
        print(f"\n{len(failed)} of {len(table)} runs FAILED; each one's executed notebook shows the traceback:")
        for name, error in zip(failed["run"], failed["error"]):
            print(f"  {name}/{notebook_name}: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tlkit.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook", type=Path)
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="a parameter fixed for every run")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2", help="a parameter swept over these values")
    parser.add_argument("--seeds", metavar="S1,S2", help="run each grid point once per seed; the table shows mean ± std per point")
    parser.add_argument("--out", type=Path, help="folder for the runs and results (default: outputs/sweeps/<notebook name>)")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="runs at once on this machine (each with OMP_NUM_THREADS = cores / N)")
    parser.add_argument("--dask", metavar="ADDRESS", help="send the runs to the running dask.distributed scheduler at ADDRESS (tcp://HOST:PORT)")
    parser.add_argument("--shared-out", action="store_true", help="with --dask: --out is on a filesystem the workers see at the same path; they write there")
    parser.add_argument("--force", action="store_true", help="rerun every run, also those that finished before")
    parser.add_argument("--metric", action="append", help="metric to plot (repeatable; default: the first with 'acc' in its name)")
    parser.add_argument("--dry-run", action="store_true", help="check the parameters and list the runs without running them")
    args = parser.parse_args(argv)
    try:
        params = {name: parse_value(value) for name, value in args.p}
        grid, seeds = parse_grid(args.grid), seed_list(args.seeds)
        if args.dask and args.workers != 1:
            raise SweepError("--workers runs on this machine and --dask on a cluster's workers: give one of them.")
        if args.shared_out and not args.dask:
            raise SweepError("--shared-out goes with --dask (local workers always write into --out themselves).")
        if args.dry_run:
            return dry_run(user_path(args.notebook), params, grid, seeds, args.out, force=args.force)
        with contextlib.ExitStack() as stack:
            executor = stack.enter_context(dask_executor(args.dask)) if args.dask else None
            if executor is not None:
                print(f"sending the runs to the Dask scheduler at {args.dask}", flush=True)
            table = sweep(args.notebook, params, grid, args.out, seeds=seeds, metrics=args.metric, workers=args.workers,
                          executor=executor, shared_out=args.shared_out if args.dask else None, force=args.force)
    except (SweepError, SaveError) as err:  # SaveError: --out cannot be written (checked first), or a disk filled up
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1 if (table["status"] != "ok").any() else 0


def dry_run(notebook: Path, params: dict, grid: dict, seeds: list[int], out: Path | None, *, force: bool = False) -> int:
    """Print the runs (their folder names as the sweep will make them) and the finished runs an extension keeps; raise
    :class:`SweepConflict` as the sweep would. Nothing is written."""
    runs = plan_runs(notebook, params, grid, seeds)
    out = default_out_dir(notebook) if out is None else user_path(out)
    kept = runs_to_keep(read_sweep_file(out, force=force), out, notebook, notebook.read_bytes(), params, list(grid), bool(seeds), runs, force=force)
    print(f"{len(runs)} run(s) of {notebook} into {out}/, each with {params or 'the default parameters'} and:")
    for name, point in runs:
        print(f"  {name}: {point}")
    if kept:
        print(f"and {len(kept)} earlier run(s) of the same sweep in {out}/ (ended ok, not listed this time) stay in the tables.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
