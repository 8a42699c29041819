"""Every figure function lives in tlkit.plots: the other modules return numbers and never import matplotlib or plots."""

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

import tlkit
from tlkit.train import History

# Modules below plots in the layers of the package: they may not draw (lazy imports count).
NUMBERS_ONLY = ("augment", "imbalance", "metrics", "lr_finder", "finetune")
# Figure functions allowed outside plots, each with its reason (the test fails when one of them disappears).
FIGURES_ELSEWHERE = {
    # the sweep command's own results.png; plots cannot import sweep (sweep imports plots.save_figure)
    "tlkit.sweep.plot_sweep",
}


def _imported_modules(path: Path) -> set[str]:
    """Every module a source file imports anywhere (module level, functions, TYPE_CHECKING), relative ones as '.name'."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            if node.module is None:  # from . import plots
                names.update(base + alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("module", NUMBERS_ONLY)
def test_lower_modules_import_neither_matplotlib_nor_plots(module):
    imported = _imported_modules(Path(tlkit.__file__).parent / f"{module}.py")
    drawing = sorted(name for name in imported if name.split(".")[0] == "matplotlib" or name in (".plots", "tlkit.plots"))
    assert not drawing, f"tlkit.{module} imports {drawing}: its figures belong in tlkit.plots"


def _returns_figure(function) -> bool:
    annotation = inspect.signature(function).return_annotation  # a string under `from __future__ import annotations`
    return annotation is Figure or (isinstance(annotation, str) and annotation.split(".")[-1] == "Figure")


def _figure_functions() -> set[str]:
    """'module.qualname' of every function and method defined in tlkit (public or not) annotated to return a Figure."""
    found = set()
    for info in pkgutil.iter_modules(tlkit.__path__):
        if info.name in ("__main__", "predict"):  # commands: importing them would run them (predict refuses)
            continue
        module = importlib.import_module(f"tlkit.{info.name}")
        for _, value in inspect.getmembers(module):
            if getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(value):
                functions = [f for f in vars(value).values() if inspect.isfunction(f)]
                functions += [f.__func__ for f in vars(value).values() if isinstance(f, (staticmethod, classmethod))]
            else:
                functions = [value] if inspect.isfunction(value) else []
            found.update(f"{module.__name__}.{f.__qualname__}" for f in functions if _returns_figure(f))
    return found


def test_every_figure_function_is_defined_in_plots():
    found = _figure_functions()
    in_plots = {name.removeprefix("tlkit.plots.") for name in found if name.startswith("tlkit.plots.")}
    # the walk sees the figures that moved here (it does not pass by finding nothing)
    assert {"augmentation_grid", "show_batch", "plot_class_counts", "plot_pr_curves", "plot_per_class_recall",
            "plot_lr_find", "compare_histories", "plot_history"} <= in_plots
    elsewhere = {name for name in found if not name.startswith("tlkit.plots.")}
    assert elsewhere <= FIGURES_ELSEWHERE, f"figure functions outside tlkit.plots: {sorted(elsewhere - FIGURES_ELSEWHERE)}"
    assert FIGURES_ELSEWHERE <= elsewhere, f"no longer outside tlkit.plots, drop from the list: {sorted(FIGURES_ELSEWHERE - elsewhere)}"
    assert not hasattr(tlkit.lr_finder.LRFinderResult, "plot")  # tlkit.plot_lr_find(result) draws it


def _history(val_acc, epoch_time) -> History:
    n = len(val_acc)
    return History(epoch=list(range(1, n + 1)), train_loss=[1.0] * n, train_acc=[0.5] * n, val_loss=[1.0] * n,
                   val_acc=list(val_acc), lr=[0.1] * n, epoch_time=list(epoch_time))


def test_compare_histories_by_epoch_and_by_wall_time():
    histories = {"head": _history([0.5, 0.6, 0.7], [1.0, 1.0, 1.0]), "full": _history([0.6, 0.8], [3.0, 2.5])}
    plain = tlkit.compare_histories(histories, title="runs")
    assert len(plain.axes) == 1 and plain.axes[0].get_ylabel() == "val_acc" and plain.axes[0].get_title() == "runs"
    fig = tlkit.compare_histories(histories, title="val accuracy per epoch and per second", by_time=True)
    by_epoch, by_time = fig.axes
    assert [tuple(line.get_xdata()) for line in by_epoch.get_lines()] == [(1, 2, 3), (1, 2)]
    assert [tuple(line.get_xdata()) for line in by_time.get_lines()] == [(1.0, 2.0, 3.0), (3.0, 5.5)]
    assert [tuple(line.get_ydata()) for line in by_time.get_lines()] == [(0.5, 0.6, 0.7), (0.6, 0.8)]
    assert by_epoch.get_ylabel() == "val accuracy" and by_time.get_xlabel() == "wall time (s, training + validation)"
    assert [t.get_text() for t in by_time.get_legend().get_texts()] == ["head", "full"]
    assert fig.get_suptitle() == "val accuracy per epoch and per second"
    train = tlkit.compare_histories(histories, metric="train_acc", by_time=True)
    assert train.axes[0].get_ylabel() == "train_acc" and tuple(train.axes[1].get_lines()[1].get_ydata()) == (0.5, 0.5)
    assert np.allclose(train.axes[1].get_lines()[1].get_xdata(), np.cumsum([3.0, 2.5]))


def _schedule_history(val_acc, lr) -> History:
    history = _history(val_acc, [1.0] * len(val_acc))
    history.lr = list(lr)
    return history


def test_lr_drops_are_the_epochs_that_trained_at_a_lower_rate():
    assert tlkit.plots.lr_drops(_schedule_history([0.5] * 5, [1e-3, 1e-3, 3e-4, 3e-4, 9e-5])) == [3, 5]
    assert tlkit.plots.lr_drops(_schedule_history([0.5] * 3, [1e-3] * 3)) == []


def test_the_schedule_figure_marks_lr_cuts_early_stops_and_kept_epochs():
    histories = {
        "stopped": _schedule_history([0.5, 0.7, 0.6, 0.6], [1e-3, 1e-3, 1e-3, 3e-4]),  # stopped after 4 of 6 epochs
        "full": _schedule_history([0.4, 0.5, 0.6, 0.65, 0.7, 0.72], [1e-3] * 6),
    }
    tracked = {name: {"old": h.val_acc, "new": [1 - a for a in h.val_acc]} for name, h in histories.items()}
    fig = tlkit.plots.plot_tracked_with_schedule(tracked, histories, epochs=6, steps_per_epoch=10, reference={"old": 0.8},
                                                 restored_best=True, title="stage 3")
    old, new, lr = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["old", "new", "learning rate"] and lr.get_yscale() == "log"
    assert old.get_xlabel() == "epoch of 10 optimizer steps" and fig.get_suptitle() == "stage 3"
    assert old.get_ylim()[1] >= 0.8  # the reference level stays in view above every curve

    def marked(ax, marker):
        return [(float(x), float(y)) for line in ax.get_lines() if line.get_marker() == marker
                for x, y in zip(line.get_xdata(), line.get_ydata())]

    assert marked(old, "v") == [(4.0, 0.6)] and marked(lr, "v") == [(4.0, 3e-4)]  # the cut: epoch 4 trained at 3e-4
    assert marked(old, "X") == [(4.0, 0.6)]  # only the run that stopped before epoch 6
    assert marked(old, "*") == [(2.0, 0.7), (6.0, 0.72)] and marked(new, "*") == [(2.0, 1 - 0.7), (6.0, 1 - 0.72)]
    legend = [t.get_text() for t in lr.get_legend().get_texts()]
    assert legend == ["stopped", "full", "before", "LR cut (plateau)", "early stop", "weights kept (best val acc)"]


def test_show_heatmaps_lays_each_map_over_its_input_and_confusion_labels_are_slanted():
    import torch

    norm = tlkit.transforms.IMAGENET_NORM
    inputs = torch.zeros(3, 3, 16, 16)
    maps = torch.zeros(3, 1, 16, 16)
    maps[1, 0, :8] = 5.0  # the top half of the second image
    fig = tlkit.plots.show_heatmaps(inputs, maps, norm, ["a", "b", "c"], ncols=2)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 3 and all(len(ax.images) == 2 for ax in shown)  # the photo, then its map
    overlay = shown[1].images[1].get_array()
    assert overlay.max() == pytest.approx(1.0) and overlay[12].max() == 0.0  # scaled to its own maximum, zero where the map is
    assert shown[1].get_title() == "b"
    classes = ["long sleeve shirt", "t-shirt", "outwear"]
    cm = tlkit.plot_confusion_matrix([0, 1, 2], [0, 2, 2], classes)
    assert {label.get_rotation() for label in cm.axes[0].get_xticklabels()} == {45.0}
