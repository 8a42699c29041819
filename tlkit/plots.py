"""Every figure of the course: training curves (live in a notebook), confusion matrices, image grids and augmented
batches, the LR range test, class counts, precision-recall and per-class recall. Other modules return numbers; this
one draws them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from torchvision.transforms import v2

from ._io import atomic_path
from .metrics import average_precision_per_class
from .train import Callback, FitState, History
from .transforms import Normalization

if TYPE_CHECKING:
    import pandas as pd

    from .compare import Comparison
    from .lr_finder import LRFinderResult


def plot_history(history: History, title: str = "", fig: Figure | None = None) -> Figure:
    """Loss and accuracy per epoch, train vs val; on a GPU run also images/s and peak memory / utilization."""
    gpu = history.has_gpu_figures()
    fig = fig if fig is not None else plt.figure(figsize=(10, 3.6))
    fig.clear()
    if gpu:
        fig.set_size_inches(16, 3.6)
    axes = fig.subplots(1, 4 if gpu else 2)
    for ax, metric in zip(axes, ("loss", "acc")):
        ax.plot(history.epoch, getattr(history, f"train_{metric}"), "o-", label="train")
        ax.plot(history.epoch, getattr(history, f"val_{metric}"), "o-", label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
    if gpu:
        _plot_gpu_figures(history, axes[2], axes[3])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _plot_gpu_figures(history: History, ax_speed, ax_memory) -> None:
    ax_speed.plot(history.epoch, history.images_per_s, "o-", color="tab:green")
    ax_speed.set_xlabel("epoch")
    ax_speed.set_ylabel("training images / s")
    ax_speed.set_ylim(bottom=0)
    ax_speed.grid(alpha=0.3)
    ax_memory.plot(history.epoch, history.gpu_mem_peak_gb, "o-", color="tab:purple", label="peak memory")
    ax_memory.set_xlabel("epoch")
    ax_memory.set_ylabel("peak GPU memory (GB)")
    ax_memory.set_ylim(bottom=0)
    ax_memory.grid(alpha=0.3)
    if not np.isnan(history.gpu_util).all():
        util = ax_memory.twinx()
        util.plot(history.epoch, history.gpu_util, "s--", color="tab:gray", label="utilization")
        util.set_ylabel("GPU utilization (%)")
        util.set_ylim(0, 100)


class LiveCurves(Callback):
    """Redraws the training curves in place during training (pass as ``fit(callbacks=[...])``).

    Redraws at most every ``min_interval`` seconds (drawing costs more than an epoch on cached
    features), always draws the final state, and saves it as PNG when ``save_path`` is given.
    """

    def __init__(self, title: str = "", save_path: str | Path | None = None, min_interval: float = 1.0) -> None:
        self.title = title
        self.save_path = Path(save_path) if save_path is not None else None
        self.min_interval = min_interval
        self.fig = plt.figure(figsize=(10, 3.6))
        plt.close(self.fig)  # shown through the display handle only, not again at cell end
        self._handle = None
        self._last_draw = float("-inf")

    def on_epoch_end(self, state: FitState) -> None:
        if time.monotonic() - self._last_draw >= self.min_interval:
            self._draw(state.history)

    def on_fit_end(self, state: FitState) -> None:
        """Draw the final curves and save them."""
        self._draw(state.history)
        if self.save_path is not None:
            save_figure(self.fig, self.save_path)

    def _draw(self, history: History) -> None:
        plot_history(history, self.title, self.fig)
        self._last_draw = time.monotonic()
        if not self._inline():
            return
        from IPython.display import display

        if self._handle is None:
            self._handle = display(self.fig, display_id=True)
        else:
            self._handle.update(self.fig)

    @staticmethod
    def _inline() -> bool:
        try:
            from IPython import get_ipython
        except ImportError:
            return False
        shell = get_ipython()
        return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def save_figure(fig: Figure, path: str | Path) -> None:
    """Save ``fig`` as PNG, creating the folder, atomically (a full disk leaves the old file, never an empty one;
    ``tlkit._io.SaveError`` names the path). Returns nothing, so a notebook cell ending with it shows the figure only."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def plot_confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str], *, normalize: str | None = None, title: str = "") -> Figure:
    """Confusion matrix (scikit-learn), optionally normalized over 'true' rows, 'pred' columns or 'all'."""
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=list(range(len(classes))), display_labels=list(classes),
        normalize=normalize, ax=ax, colorbar=False, values_format=".2f" if normalize else "d", xticks_rotation=45,
    )
    plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")  # long class names stay apart
    ax.set_title(title)
    fig.tight_layout()
    return fig


def show_images(
    images: Sequence[Image.Image],
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 8,
    title_colors: Sequence[str] | None = None,
    suptitle: str = "",
) -> Figure:
    """A grid of images with a title under each (e.g. label, or prediction vs truth)."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.8 * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k], cmap="gray" if images[k].mode == "L" else None)
        if titles is not None:
            ax.set_title(titles[k], fontsize=8, color=title_colors[k] if title_colors else "black")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def to_pil(x: torch.Tensor, norm: Normalization) -> Image.Image:
    """Undo ``norm`` on one (C, H, W) float tensor (or take a uint8 one as is) and return a PIL image."""
    x = x.detach().cpu()
    if x.dtype != torch.uint8:
        mean = torch.tensor(norm.mean).view(-1, 1, 1)
        std = torch.tensor(norm.std).view(-1, 1, 1)
        x = ((x.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return v2.functional.to_pil_image(x)


def show_heatmaps(
    inputs: torch.Tensor,
    maps: torch.Tensor,
    norm: Normalization,
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 8,
    title_colors: Sequence[str] | None = None,
    suptitle: str = "",
) -> Figure:
    """Each model input (N, C, H, W; normalised by ``norm``) as the model saw it, with its heat map (N, 1, H, W, e.g. a
    class-activation map) laid over it; every map is scaled to its own maximum, so the colours say where, not how much."""
    fig = show_images([to_pil(x, norm) for x in inputs], titles, ncols=ncols, title_colors=title_colors, suptitle=suptitle)
    for ax, heat in zip(fig.axes, maps[:, 0].detach().cpu().clamp_min(0)):  # the photos' axes come first, in order
        ax.imshow((heat / heat.max().clamp_min(1e-12)).numpy(), cmap="jet", alpha=0.4, vmin=0, vmax=1)
    return fig


def augmentation_grid(
    image: Image.Image, transforms: Mapping[str, Callable], norm: Normalization, *, n: int = 8, seed: int = 0
) -> Figure:
    """One image under many augmentations: a row of ``n`` random draws per named transform."""
    torch.manual_seed(seed)
    rows = list(transforms.items())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
    for (name, transform), row in zip(rows, axes):
        for ax in row:
            ax.imshow(to_pil(transform(image), norm))
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def target_title(target: torch.Tensor, classes: Sequence[str]) -> str:
    """A hard label's class name, or a soft label's two largest shares (e.g. '3 62% + 8 38%')."""
    if target.ndim == 0:
        return classes[int(target)]
    top = target.topk(min(2, len(target)))
    parts = [f"{classes[int(i)]} {p:.0%}" for p, i in zip(top.values.tolist(), top.indices.tolist()) if p > 0.005]
    return " + ".join(parts)


def show_batch(images: torch.Tensor, targets: torch.Tensor, classes: Sequence[str], norm: Normalization, *, ncols: int = 8, suptitle: str = "") -> Figure:
    """A batch as the model sees it (augmented, maybe mixed), titled with its (soft) labels."""
    pictures = [to_pil(x, norm) for x in images]
    titles = [target_title(t, classes) for t in targets.detach().cpu()]
    return show_images(pictures, titles, ncols=ncols, suptitle=suptitle)


def compare_histories(histories: Mapping[str, History], metric: str = "val_acc", title: str = "", *, by_time: bool = False) -> Figure:
    """One curve per run of ``metric`` against epoch; with ``by_time`` also against cumulative wall time (right panel)."""
    if by_time:
        fig, (by_epoch, by_wall) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
        for name, history in histories.items():
            by_epoch.plot(history.epoch, getattr(history, metric), "o-", label=name)
            by_wall.plot(np.cumsum(history.epoch_time), getattr(history, metric), "o-", label=name)
        by_epoch.set_xlabel("epoch")
        by_wall.set_xlabel("wall time (s, training + validation)")
        by_epoch.set_ylabel("val accuracy" if metric == "val_acc" else metric)
        by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in (by_epoch, by_wall):
            ax.grid(alpha=0.3)
        by_wall.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        return fig
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, history in histories.items():
        ax.plot(history.epoch, getattr(history, metric), "o-", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_tracked(runs: dict[str, dict[str, list[float]]], reference: dict[str, float] | None = None, title: str = "") -> Figure:
    """Per-epoch accuracy of several runs, one panel per class group, with an optional dashed reference level."""
    groups = list(next(iter(runs.values())))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        for name, tracked in runs.items():
            ax.plot(range(1, len(tracked[group]) + 1), tracked[group], "o-", label=name)
        if reference and group in reference:
            ax.axhline(reference[group], color="gray", linestyle="--", label="before")
        ax.set_title(group)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("val accuracy")
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def lr_drops(history: History) -> list[int]:
    """The epochs that trained at a lower learning rate than the epoch before (where ReduceLROnPlateau cut it)."""
    return [epoch for epoch, before, now in zip(history.epoch[1:], history.lr, history.lr[1:]) if now < before]


def plot_tracked_with_schedule(
    tracked: Mapping[str, Mapping[str, Sequence[float]]],
    histories: Mapping[str, History],
    *,
    epochs: int,
    steps_per_epoch: int | None = None,
    reference: Mapping[str, float] | None = None,
    restored_best: bool = False,
    title: str = "",
) -> Figure:
    """Per-epoch validation accuracy of several runs, one panel per class group, and their learning rate (last panel).

    ``tracked``: run -> group -> accuracy per epoch (``RunResult.tracked``); ``histories``: run -> its History (for the
    LR, recorded at the start of every epoch). On every curve a triangle marks each epoch that trained at a lower LR
    than the one before (a ReduceLROnPlateau cut), a cross the last epoch of a run that stopped early (fewer than
    ``epochs`` epochs) and, with ``restored_best``, a star the epoch whose weights the run kept (best val accuracy).
    ``reference``: a dashed level per group (e.g. the model before).
    """
    groups = list(next(iter(tracked.values())))
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(3.9 * (len(groups) + 1), 3.5), squeeze=False)
    axes = axes[0]
    colors = {name: f"C{k % 10}" for k, name in enumerate(tracked)}
    for ax, group in zip(axes, groups):
        for name, runs_groups in tracked.items():
            _plot_marked(ax, histories[name], runs_groups[group], colors[name], name, epochs, restored_best)
        if reference and group in reference:
            level = reference[group]
            ax.axhline(level, color="gray", linestyle="--", label="before")
            low, high = ax.get_ylim()  # an axhline does not widen the axis: keep the level in view
            ax.set_ylim(min(low, level - 0.02), max(high, level + 0.02))
        ax.set_title(group)
        ax.set_ylabel("val accuracy")
    for name, history in histories.items():
        if name in tracked:
            _plot_marked(axes[-1], history, history.lr, colors[name], name, epochs, restored_best)
    axes[-1].set_yscale("log")
    axes[-1].set_title("learning rate")
    axes[-1].set_ylabel("learning rate (log scale)")
    step_note = f" of {steps_per_epoch} optimizer steps" if steps_per_epoch else ""
    for ax in axes:
        ax.set_xlabel(f"epoch{step_note}")
        ax.set_xlim(0.5, epochs + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    marks = [plt.Line2D([], [], color="k", marker="v", linestyle="", label="LR cut (plateau)"),
             plt.Line2D([], [], color="k", marker="X", linestyle="", markersize=8, label="early stop")]
    if restored_best:
        marks.append(plt.Line2D([], [], color="k", marker="*", linestyle="", markersize=10, label="weights kept (best val acc)"))
    handles, _ = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles=handles + marks, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _plot_marked(ax, history: History, values: Sequence[float], color: str, name: str, epochs: int, restored_best: bool) -> None:
    """One run's curve against epoch, with its LR cuts, early stop and kept epoch marked."""
    at = dict(zip(history.epoch, values))
    ax.plot(history.epoch, values, "-", color=color, alpha=0.85, label=name, lw=1.5)
    drops = lr_drops(history)
    ax.plot(drops, [at[e] for e in drops], "v", color=color, markersize=7)
    if len(history) < epochs:
        ax.plot([history.epoch[-1]], [values[-1]], "X", color=color, markersize=9, markeredgecolor="k")
    if restored_best and history.val_acc:
        best = history.best_epoch()
        ax.plot([best], [at[best]], "*", color=color, markersize=12, markeredgecolor="k")


def plot_seed_summary(summary: pd.DataFrame, metric: str, *, title: str = "", xlim: tuple[float, float] | None = (0, 1)) -> Figure:
    """One horizontal bar per method: the mean of ``metric`` over seeds, with ± one standard deviation as error bar.

    ``summary`` is ``tlkit.summarize_seeds``'s table (columns ``metric`` and ``"<metric> std"``).
    """
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(summary) + 1.4))
    names = [str(n) for n in summary.index]
    ax.barh(names, summary[metric], xerr=summary[f"{metric} std"], capsize=4, color="tab:blue", alpha=0.8)
    for y, (mean, std) in enumerate(zip(summary[metric], summary[f"{metric} std"])):
        ax.text(mean + std + 0.01, y, f"{mean:.3f} ± {std:.3f}", va="center", fontsize=8)
    ax.invert_yaxis()
    if xlim:
        ax.set_xlim(*xlim)
    seeds = int(summary["seeds"].min())
    ax.set_xlabel(f"{metric} (mean ± std over {seeds} seed{'s' if seeds > 1 else ''})")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_seed_curves(summaries: dict[str, pd.DataFrame], metric: str, *, xlabel: str, title: str = "") -> Figure:
    """One line per method of ``metric`` against the summary's index (e.g. images per class), ± one std as error bars.

    The index values are placed evenly and written as labels, so "all" can stand beside numbers.
    """
    fig, ax = plt.subplots(figsize=(6 + (1.8 if len(summaries) > 3 else 0), 3.6))
    for name, summary in summaries.items():
        positions = range(len(summary))
        ax.errorbar(positions, summary[metric], yerr=summary[f"{metric} std"], marker="o", capsize=4, label=name)
        ax.set_xticks(list(positions), [str(i) for i in summary.index])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} (mean ± std)")
    ax.grid(alpha=0.3)
    if len(summaries) > 3:  # many lines: the legend goes beside the axes, off the data
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    else:
        ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_lr_find(result: LRFinderResult, title: str = "") -> Figure:
    """An LR range test (``tlkit.lr_find``): loss against learning rate (log scale), both suggestions marked."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(result.lrs, result.losses, color="0.7", lw=1, label="batch loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed")
    ax.axvline(result.suggestion, color="C3", ls="--", label=f"steepest descent: {result.suggestion:.2e}")
    ax.axvline(result.min_over_10, color="C2", ls=":", label=f"minimum / 10: {result.min_over_10:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (times each group's multiplier)")
    ax.set_ylabel("training loss")
    # The last points of a diverged sweep would squash the interesting part of the curve.
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:
        low, high = min(finite), finite[0]
        ax.set_ylim(low - 0.1 * (high - low + 1e-8), max(high, low) + 0.5 * (high - low + 1e-8))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title or ("LR range test (stopped: loss diverged)" if result.diverged else "LR range test"))
    fig.tight_layout()
    return fig


def plot_class_counts(counts: Mapping[str, Mapping[str, int]], *, title: str = "", log: bool = False) -> Figure:
    """Grouped bars of images per class, one colour per split (e.g. ``DatasetSplits.summary()``)."""
    splits = list(counts)
    classes = list(next(iter(counts.values())))
    x = np.arange(len(classes))
    width = 0.8 / len(splits)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.2 * len(splits) * len(classes) + 2), 3.4))  # room for every bar's label
    for k, split in enumerate(splits):
        values = [counts[split][name] for name in classes]
        bars = ax.bar(x + (k - (len(splits) - 1) / 2) * width, values, width, label=split)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, classes)
    ax.set_xlabel("class")
    ax.set_ylabel("images")
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")  # outside: the bars fill the axes
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_pr_curves(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str], *, title: str = "") -> Figure:
    """One-vs-rest precision-recall curve of every class, its average precision (PR-AUC) in the legend."""
    from sklearn.metrics import PrecisionRecallDisplay

    probs = np.asarray(probs)
    y_true = np.asarray(y_true)
    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    palette = plt.get_cmap("tab10")
    for c, name in enumerate(classes):
        PrecisionRecallDisplay.from_predictions(
            y_true == c, probs[:, c], ax=ax, name=str(name), curve_kwargs={"color": palette(c % 10)},
        )
    macro = float(np.mean(average_precision_per_class(y_true, probs)))
    ax.set(xlabel="recall", ylabel="precision", title=title or f"one-vs-rest precision-recall, macro PR-AUC {macro:.3f}")
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_per_class_recall(recalls: Mapping[str, Sequence[float]], classes: Sequence[str], *, title: str = "") -> Figure:
    """Recall of every class, one line per run (e.g. per remedy): where each run gains or loses."""
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for name, values in recalls.items():
        ax.plot(range(len(classes)), values, "o-", label=name, alpha=0.85)
    ax.set_xticks(range(len(classes)), list(classes), rotation=30 if len(classes) > 6 else 0)  # many names: no overlap
    ax.set_xlabel("class")
    ax.set_ylabel("recall on validation")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_lr_schedules(panels: Mapping[str, Mapping[str, Sequence[float]]], *, steps_per_epoch: int | None = None,
                      title: str = "") -> Figure:
    """One panel per schedule (e.g. ``tlkit.optim.one_cycle_lrs``'s output): each group's LR against the optimizer
    step; NaN before a group joins. ``steps_per_epoch`` marks the epoch boundaries."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, (name, lrs) in zip(axes[0], panels.items()):
        for group, values in lrs.items():
            ax.plot(range(len(values)), values, lw=1.6, label=group)
        if steps_per_epoch:
            total = max(len(v) for v in lrs.values())
            for boundary in range(steps_per_epoch, total, steps_per_epoch):
                ax.axvline(boundary, color="0.85", lw=0.6, zorder=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step" + (f" (epochs every {steps_per_epoch})" if steps_per_epoch else ""))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("learning rate")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_paired_gains(gains: Mapping[str, object], *, title: str = "", xlabel: str = "gain (points of accuracy)") -> Figure:
    """One row per setting: the mean paired difference (a ``tlkit.compare.PairedDifference``: ``mean``, ``low``,
    ``high``, ``seeds``) in points, with its 95% interval as error bar and a line at 0: a bar that crosses it is a tie."""
    if not gains:
        raise ValueError("plot_paired_gains needs at least one setting, e.g. {'deep, test': comparison.differences()['basic']}.")
    names = list(gains)
    means = [100 * gains[n].mean for n in names]
    below = [100 * (gains[n].mean - gains[n].low) if math.isfinite(gains[n].low) else 0.0 for n in names]
    above = [100 * (gains[n].high - gains[n].mean) if math.isfinite(gains[n].high) else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(names) + 1.4))
    ax.errorbar(means, range(len(names)), xerr=[below, above], fmt="o", capsize=4, color="tab:blue")
    for y, (mean, up) in enumerate(zip(means, above)):
        ax.text(mean + up + 0.3, y, f"{mean:+.1f}", va="center", fontsize=8)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    seeds = min(gains[n].seeds for n in names)
    ax.set_xlabel(f"{xlabel}: mean and 95% interval, paired over {seeds} seed{'s' if seeds > 1 else ''}")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_reliability(tables: Mapping[str, pd.DataFrame], *, title: str = "") -> Figure:
    """A reliability diagram: accuracy against mean confidence per confidence bin, one line per ``tables`` entry
    (``tlkit.metrics.reliability_table``'s), marker area by the bin's count; the diagonal is a calibrated model."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for name, table in tables.items():
        ax.plot(table["confidence"], table["accuracy"], marker="o", label=name)
        ax.scatter(table["confidence"], table["accuracy"], s=4 * table["count"], alpha=0.25)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (mean top probability in the bin)")
    ax.set_ylabel("accuracy in the bin")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_parameters(summary: pd.DataFrame, metric: str, params: Mapping[str, int], *, title: str = "") -> Figure:
    """One point per strategy (a row of ``summary``, e.g. ``comparison.summary([metric])``): ``metric``'s mean ± std
    over seeds against the strategy's trainable parameters (``params[name]``, log scale)."""
    missing = [n for n in summary.index if n not in params]
    if missing:
        raise KeyError(f"No trainable-parameter count for {missing}; give one per strategy, e.g. run.trainable_params.")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, row in summary.iterrows():
        ax.errorbar([params[name]], [row[metric]], yerr=[row[f"{metric} std"]], fmt="o", capsize=4)
        ax.annotate(str(name), (params[name], row[metric]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{metric} (mean ± std over {int(summary['seeds'].min())} seeds)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_block_bars(comparisons: Mapping[str, Comparison], metric: str, *, reference: str, title: str = "") -> Figure:
    """One group of bars per comparison (e.g. per corruption), a bar per arm (mean ± std over seeds), with the
    ``reference`` arm (e.g. the untuned source model) as a dashed line across its group."""
    if not comparisons:
        raise ValueError("plot_block_bars needs at least one comparison, e.g. {'gaussian_noise': comparison}.")
    fig, axes = plt.subplots(1, len(comparisons), figsize=(3.2 * len(comparisons) + 0.8, 3.6), sharey=True, squeeze=False)
    for ax, (group, comparison) in zip(axes[0], comparisons.items()):
        summary = comparison.summary([metric])
        arms = [a for a in summary.index if a != reference]
        ax.bar(arms, summary.loc[arms, metric], yerr=summary.loc[arms, f"{metric} std"], capsize=3, color="tab:blue", alpha=0.8)
        if reference in summary.index:
            ax.axhline(summary.loc[reference, metric], color="grey", ls="--", lw=1, label=reference)
            ax.legend(fontsize=8, loc="lower right")
        ax.set_title(group, fontsize=10)
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (mean ± std over seeds)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_stability_plasticity(panels: Mapping[str, pd.DataFrame], *, labels: tuple[str, str] = ("classes without new images", "classes with new images"),
                              budgets: Sequence[str] = ("fixed steps", "early stopping"), title: str = "") -> Figure:
    """Old-class accuracy (stability) against new-class accuracy (plasticity), one panel per ``panels`` entry (a
    trade-off comparison's ``summary()``), one point per setting and budget: mean ± std over seeds of
    ``"old acc (<budget>)"`` and ``"new acc (<budget>)"``. A filled marker is the fixed step budget, a hollow one early
    stopping; the optimizer's state (fresh or resumed) sets the colour, the LR factor the marker."""
    if not panels:
        raise ValueError("plot_stability_plasticity needs at least one panel, e.g. {'stage 2': comparison.summary()}.")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    markers, colours = ["o", "s", "^", "D", "v", "P"], {"fresh": "tab:blue", "resumed": "tab:orange"}
    for ax, (name, summary) in zip(axes[0], panels.items()):
        factors = list(dict.fromkeys(str(arm).split("lr ")[-1] for arm in summary.index))
        for arm, row in summary.iterrows():
            colour = colours.get(str(arm).split(",")[0], "tab:grey")
            marker = markers[factors.index(str(arm).split("lr ")[-1]) % len(markers)]
            for k, budget in enumerate(budgets):
                x, y = row[f"new acc ({budget})"], row[f"old acc ({budget})"]
                ax.errorbar([x], [y], xerr=[row[f"new acc ({budget}) std"]], yerr=[row[f"old acc ({budget}) std"]], fmt=marker, color=colour,
                            mfc=colour if k == 0 else "white", capsize=3, alpha=0.9, label=f"{arm}, {budget}")
        ax.set_xlabel(f"{labels[1]}: val accuracy (plasticity)")
        ax.set_ylabel(f"{labels[0]}: val accuracy (stability)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title or f"mean ± std over {int(next(iter(panels.values()))['seeds'].min())} seeds; filled: the fixed step budget, hollow: early stopping")
    fig.tight_layout()
    return fig
