"""Batch runs: one notebook executed over a grid of parameters, every run's metrics in one table and a plot.

Usage: python -m tlkit.sweep NOTEBOOK [-p NAME VALUE ...] [--grid NAME=V1,V2,... ...] [--out DIR]
                             [--metric NAME ...] [--dry-run]

Each point of the grid (the cartesian product of the --grid lists, in the order given) is one papermill
run in its own folder DIR/<name>=<value>,... (executed notebook, metrics JSON, figures). The runs'
metrics are collected into DIR/results.csv, DIR/results.md and a plot, DIR/results.png. A failed run is
reported and the sweep goes on; the exit status is 1 when any run failed, 2 for a bad command line.
Values are read like papermill's -p (True/False/None, numbers, else text); lists and dicts as JSON.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import math
import re
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .course import NotebookRun, parse_value, run_notebook  # the -p values of python -m tlkit.course and of a sweep read alike
from .plots import save_figure

# The sweep points these at each run's own folder, so that runs never overwrite each other's files.
PER_RUN_PARAMETERS = ("results_path", "output_dir")


class SweepError(ValueError):
    """A sweep that cannot start: unknown notebook or parameter, malformed grid."""


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
    """A readable folder name for one grid point: ``lr=0.001,image_size=48`` (``default`` for an empty grid)."""
    if not point:
        return "default"
    name = ",".join(f"{key}={format_value(value)}" for key, value in point.items())
    return re.sub(r"[^\w.=,+\-\[\]]", "_", name)  # no path separators, spaces or quotes in folder names


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
    import papermill as pm

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
        guesses = {name: difflib.get_close_matches(name, valid, n=1) for name in unknown}
        did_you_mean = "".join(f" ({name}: did you mean {g[0]!r}?)" for name, g in guesses.items() if g)
        raise SweepError(
            f"{notebook.name} has no parameter {', '.join(map(repr, unknown))}{did_you_mean}. "
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


def plan_runs(notebook: Path, params: Mapping[str, object], grid: Mapping[str, Iterable[object]]) -> list[tuple[str, dict[str, object]]]:
    """The sweep's runs as ``(run name, grid point)`` pairs, after checking every parameter name and value list."""
    check_parameters(notebook, params, grid)
    runs = [(run_name(point), point) for point in expand_grid(grid)]
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
    fixed = {"run", "status", "error", "seconds", *grid_keys}
    return [c for c in table.columns if c not in fixed]


def headline_metrics(table: pd.DataFrame, grid_keys: Sequence[str]) -> list[str]:
    """The metric to plot by default: the first numeric one with ``acc`` in its name (else the first numeric one)."""
    numeric = [c for c in metric_columns(table, grid_keys) if pd.api.types.is_numeric_dtype(table[c]) and table[c].notna().any()]
    accuracies = [c for c in numeric if "acc" in c]
    return (accuracies or numeric)[:1]


def markdown_table(table: pd.DataFrame, digits: int = 3) -> str:
    """``table`` as a Markdown pipe table, floats to ``digits`` significant digits, missing values empty."""

    def cell(value: object) -> str:
        if value is pd.NA or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float):
            return f"{value:.{digits}g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def plot_sweep(table: pd.DataFrame, grid_keys: Sequence[str], metrics: Sequence[str], title: str = "") -> Figure:
    """Each metric against the grid: bars for one grid name, else x = the first name and one line per value of the others."""
    fig = Figure(figsize=(5.5 * len(metrics), 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        values = pd.to_numeric(table[metric], errors="coerce").astype(float)  # failed runs: NaN
        labels = table[list(grid_keys)].map(format_value) if grid_keys else pd.DataFrame({"run": table["run"]})
        x_name, *others = labels.columns
        x_labels = list(dict.fromkeys(labels[x_name]))
        if not others:
            ax.bar(range(len(labels)), values.fillna(0.0), color="tab:blue")
            for i in [i for i, v in enumerate(values) if math.isnan(v)]:
                ax.text(i, 0, "failed", rotation=90, ha="center", va="bottom", color="tab:red")
        else:
            for group, rows in labels.groupby(others, sort=False):
                group = group if isinstance(group, tuple) else (group,)
                ax.plot([x_labels.index(x) for x in rows[x_name]], values[rows.index], "o-",
                        label=", ".join(f"{k}={v}" for k, v in zip(others, group)))
            ax.legend(fontsize=8)
        failed = int(values.isna().sum())
        ax.set_xticks(range(len(x_labels)), x_labels)
        ax.set(xlabel=x_name, ylabel=metric, title=metric + (f" ({failed} failed run(s) not shown)" if failed else ""))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def write_results_files(table: pd.DataFrame, out_dir: Path, grid_keys: Sequence[str], metrics: Sequence[str] | None, title: str) -> list[Path]:
    """Write results.csv, results.md and (when there is a metric to plot) results.png into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "results.csv", index=False)
    (out_dir / "results.md").write_text(markdown_table(table) + "\n")
    written = [out_dir / "results.csv", out_dir / "results.md"]
    metrics = list(metrics) if metrics else headline_metrics(table, grid_keys)
    missing = [m for m in metrics if m not in table.columns]
    if missing:
        available = ", ".join(metric_columns(table, grid_keys)) or "none: every run failed"
        print(f"No plot: no metric {', '.join(missing)} in the runs' results (they have: {available}); "
              "pick one of those with --metric, or plot the table with tlkit.sweep.plot_sweep.", file=sys.stderr)
    elif metrics and table[metrics].notna().any().any():
        fig = plot_sweep(table, grid_keys, metrics, title)
        written.append(save_figure(fig, out_dir / "results.png"))
    return written


# --- running -------------------------------------------------------------------------------------------


def sweep(
    notebook: str | Path,
    params: Mapping[str, object] | None = None,
    grid: Mapping[str, Iterable[object]] | None = None,
    out_dir: str | Path | None = None,
    *,
    metrics: Sequence[str] | None = None,
    verbose: bool = True,
) -> pd.DataFrame:
    """Run ``notebook`` once per point of ``grid`` with ``params`` fixed, each in ``out_dir/<run name>/``; return (and write) one result row per run."""
    notebook = Path(notebook)
    params, grid = dict(params or {}), grid_lists(grid or {})
    out_dir = Path(out_dir) if out_dir is not None else Path("outputs") / "sweeps" / notebook.stem
    runs = plan_runs(notebook, params, grid)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"notebook": str(notebook), "params": params, "grid": grid, "runs": [name for name, _ in runs]}
    (out_dir / "sweep.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    rows = []
    for i, (name, point) in enumerate(runs, 1):
        if verbose:
            print(f"[{i}/{len(runs)}] {name} ...", flush=True)
        run = run_notebook(notebook, out_dir / name, {**params, **point})
        if verbose:
            print(f"      {run.seconds:.1f}s  {run.headline()}", flush=True)
        rows.append(result_row(name, point, run))
    table = results_table(rows)
    written = write_results_files(table, out_dir, list(grid), metrics, f"{notebook.name}: {len(runs)} runs")
    if verbose:
        print_summary(table, list(grid), notebook.name, metrics, written)
    return table


def print_summary(table: pd.DataFrame, grid_keys: Sequence[str], notebook_name: str, metrics: Sequence[str] | None, written: Sequence[Path]) -> None:
    """Print the short table (grid values, status, time, plotted metrics), the files written and the failed runs."""
    shown = [m for m in (metrics or headline_metrics(table, grid_keys)) if m in table.columns]
    print()
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
    parser.add_argument("--out", type=Path, help="folder for the runs and results (default: outputs/sweeps/<notebook name>)")
    parser.add_argument("--metric", action="append", help="metric to plot (repeatable; default: the first with 'acc' in its name)")
    parser.add_argument("--dry-run", action="store_true", help="check the parameters and list the runs without running them")
    args = parser.parse_args(argv)
    try:
        params = {name: parse_value(value) for name, value in args.p}
        grid = parse_grid(args.grid)
        if args.dry_run:
            runs = plan_runs(args.notebook, params, grid)
            out = args.out or Path("outputs") / "sweeps" / args.notebook.stem
            print(f"{len(runs)} run(s) of {args.notebook} into {out}/, each with {params or 'the default parameters'} and:")
            for name, point in runs:
                print(f"  {name}: {point}")
            return 0
        table = sweep(args.notebook, params, grid, args.out, metrics=args.metric)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if (table["status"] != "ok").any() else 0


if __name__ == "__main__":
    sys.exit(main())
