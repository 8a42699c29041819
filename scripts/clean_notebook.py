"""Make executed notebooks fit to commit: no saved widget state, no progress-bar widgets, ids on every cell.

    python scripts/clean_notebook.py notebooks/*.ipynb

Outputs from the real run stay (prose, tables, printed verdicts, figures); what goes is what a viewer without
a live kernel cannot show anyway: ipywidgets' saved state and the widget views of tqdm's progress bars
(their text fallback, "HBox(...)", tells a reader nothing). Papermill's per-cell timings go too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.validator import normalize

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def without_widgets(outputs: list) -> list:
    kept = []
    for output in outputs:
        data = output.get("data", {})
        if WIDGET_VIEW in data:
            data.pop(WIDGET_VIEW)
            if set(data) <= {"text/plain"} and "Box(" in str(data.get("text/plain", "")):
                continue  # only the widget's repr was left
        if output.get("name") == "stderr" and "it/s]" in str(output.get("text", "")):
            continue  # a text progress bar
        kept.append(output)
    return kept


def clean(path: Path) -> int:
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = without_widgets(cell.outputs)
    _, nb = normalize(nb)  # adds missing cell ids
    nbformat.write(nbformat.from_dict(nb), path)
    return path.stat().st_size


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"{name}: {clean(Path(name)) / 1024:.0f} KB")
