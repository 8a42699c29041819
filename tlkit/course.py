"""Run the course: every numbered notebook in order with papermill, then a one-screen summary.

Usage: python -m tlkit.course [--notebooks DIR] [--output-dir DIR] [--only PATTERN] [-p NAME VALUE ...]

Each -p goes to the notebooks whose parameters cell has that name; a name none of them has is refused before
anything runs (exit 2), as is an --output-dir that cannot be written.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._extras import require
from ._io import SaveError, check_writable_folder

# run_parameters points these at --output-dir; a -p could only break where the metrics are looked for.
COURSE_SETS = ("results_path", "output_dir")


class ParameterError(ValueError):
    """A -p that the notebooks to run do not take."""


@dataclass
class NotebookRun:
    """Outcome of one executed notebook."""

    notebook: str
    seconds: float
    metrics: dict
    error: str = ""

    def headline(self) -> str:
        """The first accuracy in the notebook's metrics, or its error."""
        if self.error:
            return f"FAILED: {self.error}"
        accs = [(k, v) for k, v in self.metrics.items() if "acc" in k and isinstance(v, (int, float))]
        return f"{accs[0][0]} = {accs[0][1]:.3f}" if accs else "(no accuracy reported)"


def course_notebooks(folder: Path, only: str = "*") -> list[Path]:
    """Numbered notebooks (``NN_name.ipynb``) in order."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb") if p.match(only if only.endswith(".ipynb") else f"{only}*"))


# papermill's -p spells these the Python way.
_PYTHON_WORDS = {"True": True, "False": False, "None": None}


def parse_value(text: str) -> object:
    """One parameter value as papermill's ``-p`` reads it (True/False/None, int, float), else JSON (lists, dicts), else the text."""
    if text in _PYTHON_WORDS:
        return _PYTHON_WORDS[text]
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def notebook_parameter_names(notebook: Path) -> list[str]:
    """The names in ``notebook``'s ``parameters`` cell, in order (read by papermill, no kernel started)."""
    pm = require("papermill", "Running the course's notebooks")

    return list(pm.inspect_notebook(str(notebook)))


def did_you_mean(unknown: Sequence[str], valid: Sequence[str]) -> str:
    """`` (epoch: did you mean 'epochs'?)`` for each unknown name with a close valid one; empty when none is close."""
    guesses = {name: difflib.get_close_matches(name, valid, n=1) for name in unknown}
    return "".join(f" ({name}: did you mean {g[0]!r}?)" for name, g in guesses.items() if g)


def course_parameters(notebooks: Sequence[Path], params: Mapping[str, object]) -> dict[Path, dict]:
    """Each notebook's share of ``params``: the names in its parameters cell. Raise :class:`ParameterError` for a name
    none of them takes (papermill would only warn, and paste the name into the notebook as code) or one the course sets."""
    taken = [name for name in params if name in COURSE_SETS]
    if taken:
        raise ParameterError(f"-p {', '.join(taken)}: the course sets {' and '.join(COURSE_SETS)} itself (each notebook's metrics and figures "
                             "go into --output-dir); leave it out and choose the folder with --output-dir.")
    names = {notebook: notebook_parameter_names(notebook) for notebook in notebooks}
    valid = [name for name in dict.fromkeys(n for found in names.values() for n in found) if name not in COURSE_SETS]
    unknown = [name for name in params if name not in valid]
    if unknown:
        which = f"{notebooks[0].name} has no" if len(notebooks) == 1 else f"none of {', '.join(nb.name for nb in notebooks)} has a"
        raise ParameterError(
            f"-p {', '.join(map(repr, unknown))}: {which} parameter of that name{did_you_mean(unknown, valid)}. "
            + (f"The parameters are: {', '.join(valid)}." if valid else "No code cell is tagged 'parameters': tag each notebook's first code cell.")
        )
    return {notebook: {name: value for name, value in params.items() if name in names[notebook]} for notebook in notebooks}


def run_parameters(notebook: Path, output_dir: Path, parameters: dict | None = None) -> dict:
    """The parameters a run of ``notebook`` gets: its metrics file and figures in ``output_dir``, no progress bars, then ``parameters``."""
    results = output_dir / f"{notebook.stem}.json"
    params = {"results_path": str(results.resolve()), "output_dir": str(output_dir.resolve()), "progress": False}
    params.update(parameters or {})
    return params


def run_notebook(notebook: Path, output_dir: Path, parameters: dict | None = None, *, cwd: Path | None = None) -> NotebookRun:
    """Execute ``notebook`` with papermill into ``output_dir`` (started in ``cwd``, default its folder); it writes its metrics to ``<name>.json`` there."""
    pm = require("papermill", "Running the course's notebooks")

    output_dir.mkdir(parents=True, exist_ok=True)
    results = output_dir / f"{notebook.stem}.json"
    results.unlink(missing_ok=True)
    params = run_parameters(notebook, output_dir, parameters)
    start = time.perf_counter()
    error = ""
    try:
        pm.execute_notebook(
            str(notebook), str(output_dir / notebook.name), parameters=params,
            cwd=str(cwd or notebook.parent), kernel_name="python3", progress_bar=False,
        )
    except Exception as err:  # papermill raises PapermillExecutionError with the cell's traceback
        error = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    seconds = time.perf_counter() - start
    metrics = json.loads(results.read_text()) if results.exists() and not error else {}
    return NotebookRun(notebook.name, seconds, metrics, error)


def summary_table(runs: list[NotebookRun]) -> str:
    """A plain-text table: notebook, wall time, headline metric."""
    width = max([len(r.notebook) for r in runs] + [8])
    lines = [f"{'notebook':<{width}}  {'wall time':>9}  headline", "-" * (width + 40)]
    lines += [f"{r.notebook:<{width}}  {r.seconds:>8.1f}s  {r.headline()}" for r in runs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notebooks", type=Path, default=Path("notebooks"))
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--only", default="*", help="run only notebooks whose name starts with this (e.g. 01)")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="parameter for every notebook")
    args = parser.parse_args(argv)
    notebooks = course_notebooks(args.notebooks, args.only)
    if not notebooks:
        print(f"No notebooks matching {args.only!r} in {args.notebooks}/", file=sys.stderr)
        return 2
    params = {name: parse_value(value) for name, value in args.p}
    try:
        shares = course_parameters(notebooks, params)
        output_dir = check_writable_folder(args.output_dir, what="--output-dir")
    except (ParameterError, SaveError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name in params:  # a name only some notebooks have: say where it goes, once
        takers = [nb.name for nb, share in shares.items() if name in share]
        if len(takers) < len(notebooks):
            print(f"-p {name} goes to {', '.join(takers)} only (the other notebooks have no such parameter)", flush=True)
    runs = []
    for nb in notebooks:
        print(f"running {nb} ...", flush=True)
        runs.append(run_notebook(nb, output_dir, shares[nb]))
        print(f"  {runs[-1].seconds:.1f}s  {runs[-1].headline()}", flush=True)
    print()
    print(summary_table(runs))
    print(f"\nExecuted notebooks, figures and metrics are in {output_dir}/")
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
