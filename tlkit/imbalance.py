"""Class imbalance: a long-tailed copy of a dataset, and the remedies (loss weights, sampling, losses, post-hoc)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_curve
from torch import nn
from torch.utils.data import Sampler, WeightedRandomSampler

from .compare import summarize_seeds
from .data import DatasetSplits, LabeledImages, repeated_passes_sampler
from .metrics import calibration_error, fit_temperature, long_tail_metrics, per_class_recall, scale

REMEDIES: dict[str, str] = {
    "none": "plain cross-entropy on the long-tailed data",
    "class_weights": "cross-entropy, each class weighted by its inverse frequency",
    "effective_number": "cross-entropy weighted by the inverse effective number of samples (Cui et al. 2019)",
    "oversample": "rare-class images drawn more often, every class equally likely (WeightedRandomSampler)",
    "undersample": "every class cut down to the rarest class's count",
    "focal": "focal loss (Lin et al. 2017): confident, easy examples count less",
    "logit_adjustment": "logit-adjusted loss (Menon et al. 2021): trains on logits + tau * log(prior)",
    "threshold": "plain training, then each class's probability divided by prior ** tau (post-hoc)",
}


def validate_remedies(names: str | Sequence[str]) -> list[str]:
    """The remedy names as a list, or a ValueError naming the unknown one and the valid choices."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in REMEDIES:
            raise ValueError(f"Unknown remedy {name!r}; choose one of: {', '.join(REMEDIES)}.")
    return names


# --- a long-tailed copy of a balanced dataset ---------------------------------------------------


def long_tail_counts(head_count: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Images per class on an exponential profile: ``head_count * imbalance_ratio ** (-c / (C - 1))``, class 0 largest."""
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio is largest / smallest class count, so at least 1; got {imbalance_ratio}.")
    if num_classes < 2:
        raise ValueError(f"A long tail needs at least 2 classes, got {num_classes}.")
    exponents = np.arange(num_classes) / (num_classes - 1)
    counts = np.round(head_count * float(imbalance_ratio) ** -exponents).astype(int)
    if counts[-1] < 1:
        raise ValueError(
            f"imbalance_ratio={imbalance_ratio} leaves the rarest class no image with {head_count} images in the "
            f"largest class; use an imbalance_ratio of at most {2 * head_count - 1}."
        )
    return counts.tolist()


def long_tail_positions(
    targets: Sequence[int],
    imbalance_ratio: float,
    seed: int,
    *,
    head_count: int | None = None,
    order: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> list[int]:
    """Sorted positions of a deterministic random subset of ``targets`` whose class counts follow ``long_tail_counts``.

    ``order`` lists the classes from the one that keeps the most items to the one that keeps the fewest (default:
    0, 1, ..., C-1). ``head_count`` (items kept of ``order[0]``) defaults to the smallest class count, so every
    class can supply its share. ``num_classes`` defaults to the largest label + 1.
    """
    targets = np.asarray(targets, dtype=int)
    num_classes = int(targets.max()) + 1 if num_classes is None else num_classes
    available = label_counts(targets, num_classes)
    order = list(range(num_classes)) if order is None else [int(c) for c in order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"order must list every class 0..{num_classes - 1} once, got {order}.")
    head_count = int(available.min()) if head_count is None else head_count
    wanted = dict(zip(order, long_tail_counts(head_count, num_classes, imbalance_ratio)))
    short = [f"class {c} ({available[c]} < {wanted[c]})" for c in range(num_classes) if available[c] < wanted[c]]
    if short:
        raise ValueError(f"Too few images for head_count={head_count} in: {', '.join(short)}; lower head_count.")
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in range(num_classes):
        keep.extend(rng.permutation(np.flatnonzero(targets == label))[: wanted[label]].tolist())
    return sorted(keep)


def long_tail_subset(ds: LabeledImages, imbalance_ratio: float, seed: int, *, head_count: int | None = None) -> LabeledImages:
    """A deterministic random subset of ``ds`` whose class counts follow ``long_tail_counts`` (class 0 keeps the most).

    ``head_count`` (images kept of class 0) defaults to the smallest class count in ``ds``, so every
    class can supply its share.
    """
    try:
        keep = long_tail_positions(ds.targets, imbalance_ratio, seed, head_count=head_count, num_classes=len(ds.classes))
    except ValueError as err:  # name the classes, not their numbers
        message = str(err)
        for label, name in enumerate(ds.classes):
            message = message.replace(f"class {label} (", f"{name} (")
        raise ValueError(message) from None
    return ds.subset(keep)


def make_long_tailed(splits: DatasetSplits, imbalance_ratio: float, seed: int, *, head_count: int | None = None) -> DatasetSplits:
    """The same splits with a long-tailed training set; validation (and test) are kept exactly as they are."""
    return dataclasses.replace(splits, train=long_tail_subset(splits.train, imbalance_ratio, seed, head_count=head_count))


def largest_head_count(available: Sequence[int], imbalance_ratio: float, order: Sequence[int]) -> int:
    """The most items ``order[0]`` can keep on a long tail whose classes, in ``order``, all have enough (``available``)."""
    available = np.asarray(available, dtype=int)
    for head_count in range(int(available[order[0]]), 0, -1):
        try:
            wanted = long_tail_counts(head_count, len(order), imbalance_ratio)
        except ValueError:
            break  # the rarest class would get no item, and with a smaller head count neither
        if all(available[c] >= n for c, n in zip(order, wanted)):
            return head_count
    raise ValueError(f"No long tail of ratio {imbalance_ratio} fits the class counts {available.tolist()} (in the order "
                     f"{list(order)}): every class needs at least one item; lower imbalance_ratio.")


def steeper_tail(targets: Sequence[int], imbalance_ratio: float, seed: int, *, num_classes: int | None = None) -> list[int]:
    """Positions of a steeper long tail cut from an already imbalanced training set: a synthetic tail that keeps its order.

    The classes keep their frequency order (most frequent first, ties by label) and the most frequent one keeps as
    many items as the exponential profile of ``long_tail_counts`` allows, so the tail is as large as the data permit.
    A deterministic function of ``seed``; index the training features with it (the frozen backbone's features of an
    image do not depend on which other images are kept), e.g. ``TensorDataset(x[positions], y[positions])``.
    """
    targets = np.asarray(targets, dtype=int)
    num_classes = int(targets.max()) + 1 if num_classes is None else num_classes
    available = label_counts(targets, num_classes)
    order = np.argsort(-available, kind="stable").tolist()
    head_count = largest_head_count(available, imbalance_ratio, order)
    return long_tail_positions(targets, imbalance_ratio, seed, head_count=head_count, order=order, num_classes=num_classes)


# --- remedies: each one small ------------------------------------------------------------------------


def label_counts(targets: Sequence[int], num_classes: int) -> np.ndarray:
    """Number of items of each class 0..num_classes-1."""
    return np.bincount(np.asarray(targets, dtype=int), minlength=num_classes)


def _checked_counts(counts: Sequence[int]) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0 or (counts <= 0).any():
        raise ValueError(f"Every class needs at least one training item to be weighted; got counts {counts.astype(int).tolist()}.")
    return counts


def class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Inverse-frequency loss weights ``N / (C * n_c)`` (scikit-learn's 'balanced'): 1 for every class when balanced."""
    counts = _checked_counts(counts)
    return torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)


def effective_number_weights(counts: Sequence[int], beta: float = 0.99) -> torch.Tensor:
    """Weights ``1 / E_n`` with ``E_n = (1 - beta**n) / (1 - beta)`` (Cui et al. 2019), scaled to sum to C.

    ``beta = 0`` gives equal weights; as ``beta`` approaches 1 they approach inverse frequency.
    """
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}.")
    counts = _checked_counts(counts)
    effective = (1 - beta**counts) / (1 - beta)
    weights = 1 / effective
    return torch.tensor(weights * len(counts) / weights.sum(), dtype=torch.float32)


def oversampling_sampler(targets: Sequence[int], seed: int, num_samples: int | None = None) -> WeightedRandomSampler:
    """Draws items with replacement so that every class is equally likely; ``num_samples`` per epoch (default: all)."""
    targets = np.asarray(targets, dtype=int)
    per_item = 1.0 / np.bincount(targets)[targets]
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        torch.as_tensor(per_item, dtype=torch.double), num_samples or len(targets), replacement=True, generator=generator
    )


def undersample(targets: Sequence[int], seed: int) -> list[int]:
    """Positions of a deterministic random subset with as many items of each present class as the rarest one has."""
    targets = np.asarray(targets, dtype=int)
    present = np.unique(targets)
    keep_per_class = min(int((targets == label).sum()) for label in present)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in present:
        keep.extend(rng.permutation(np.flatnonzero(targets == label))[:keep_per_class].tolist())
    return sorted(keep)


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017): mean of ``-(1 - p_t) ** gamma * log p_t``; gamma=0 is cross-entropy."""

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be at least 0, got {gamma}.")
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target, reduction="none")  # -log p_t
        p_t = torch.exp(-ce)
        return ((1 - p_t) ** self.gamma * ce).mean()


def logit_offsets(counts: Sequence[int], tau: float = 1.0) -> torch.Tensor:
    """``tau * log(prior)`` per class, the prior being the training class frequencies (Menon et al. 2021)."""
    counts = _checked_counts(counts)
    return torch.tensor(tau * np.log(counts / counts.sum()), dtype=torch.float32)


class LogitAdjustedLoss(nn.Module):
    """Cross-entropy on ``logits + offsets`` (Menon et al. 2021); at prediction time the plain logits are used."""

    def __init__(self, offsets: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.offsets.to(logits.device), target)


def logit_adjusted_loss(counts: Sequence[int], tau: float = 1.0) -> LogitAdjustedLoss:
    """The logit-adjusted loss for training class ``counts``: rare classes must win by a margin of ``-tau * log prior``."""
    return LogitAdjustedLoss(logit_offsets(counts, tau))


def adjust_probabilities(probs: torch.Tensor, counts: Sequence[int], tau: float = 1.0) -> torch.Tensor:
    """Post-hoc logit adjustment: ``softmax(log probs - tau * log prior)``, i.e. probabilities divided by ``prior ** tau``."""
    offsets = logit_offsets(counts, tau)
    return torch.softmax(torch.log(probs.float().clamp_min(1e-12)) - offsets, dim=1)


def tau_sweep(probs: torch.Tensor, labels: Sequence[int], counts: Sequence[int], taus: Sequence[float]) -> dict[float, float]:
    """Balanced accuracy (mean per-class recall) of the post-hoc adjusted ``probs`` for each ``tau``; 0: unadjusted.

    For choosing the strength of threshold moving on validation predictions: pick the best tau there, and report
    it on test. ``counts`` are the training class counts that define the prior.
    """
    labels = np.asarray(labels, dtype=int)
    num_classes = probs.shape[1]
    return {
        float(tau): float(per_class_recall(labels, adjust_probabilities(probs, counts, tau).argmax(1).numpy(), num_classes).mean())
        for tau in taus
    }


# --- scoring a remedy: every number is about the decisions (after any post-hoc step) --------------------


# The scores of one run on validation, as named in RunResult.metrics and in the results file.
SCORES: dict[str, str] = {
    "accuracy": "accuracy",
    "balanced_acc": "balanced_accuracy",
    "macro_f1": "macro_f1",
    "worst_class_recall": "worst_class_recall",
    "rarest_class_recall": "rarest_class_recall",
    "pr_auc": "pr_auc",
    "long_tailed_acc": "long_tailed_acc",
}


def long_tail_scores(probs: torch.Tensor, labels: torch.Tensor, train_counts: Sequence[int]) -> dict[str, float]:
    """``SCORES`` of predicted ``probs`` against ``labels``: accuracy, balanced accuracy, macro-F1, worst- and
    rarest-class recall, macro PR-AUC and the accuracy on a test set with the training proportions (``train_counts``)."""
    if len(probs) != len(labels):
        raise ValueError(f"probs has {len(probs)} rows but labels has {len(labels)}: give both for the same items.")
    measured = long_tail_metrics(np.asarray(labels, dtype=int), np.asarray(probs, dtype=np.float64), train_counts)
    return {name: float(measured[key]) for name, key in SCORES.items()}


def balanced_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean per-class recall of the most probable class: every class counts the same, whatever its size."""
    return float(per_class_recall(np.asarray(labels, dtype=int), np.asarray(probs).argmax(1), probs.shape[1]).mean())


def tau_curve(predictions: Sequence[tuple[torch.Tensor, torch.Tensor]], train_counts: Sequence[int], taus: Sequence[float]) -> pd.DataFrame:
    """Balanced accuracy of the post-hoc correction ``prior ** tau`` for each tau, mean and std over the runs.

    ``predictions`` holds one (probabilities, labels) pair per seed, e.g. the plain heads' validation predictions;
    the table (index tau; columns ``balanced_acc``, ``balanced_acc std``, ``seeds``) is what
    ``tlkit.plot_seed_curves`` draws, and its ``idxmax()`` the tau to keep (ties: the first in ``taus``).
    """
    if not predictions:
        raise ValueError("tau_curve needs the predictions of at least one run (one (probs, labels) pair per seed).")
    rows = [{"tau": tau, "seed": seed, "balanced_acc": score} for seed, (probs, labels) in enumerate(predictions)
            for tau, score in tau_sweep(probs, labels, train_counts, taus).items()]
    return summarize_seeds(rows, "tau", ["balanced_acc"])


def mean_recall_per_class(predictions: Mapping[tuple[str, int], tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> dict[str, np.ndarray]:
    """Recall of every class, averaged over the seeds of each run name: ``{(name, seed): (probs, labels)}`` -> name -> recalls."""
    recalls: dict[str, list[np.ndarray]] = {}
    for (name, _seed), (probs, labels) in predictions.items():
        recalls.setdefault(name, []).append(per_class_recall(np.asarray(labels, dtype=int), np.asarray(probs).argmax(1), num_classes))
    return {name: np.mean(per_seed, axis=0) for name, per_seed in recalls.items()}


@dataclass
class Remedy:
    """What a remedy changes: the training loss, the sampler, the training items, the predicted probabilities."""

    name: str
    loss_fn: nn.Module | None = None  # None: plain cross-entropy
    sampler: Sampler[int] | None = None  # None: shuffle every item once per epoch; else positions in the training items
    train_positions: list[int] | None = None  # None: every training item
    adjust: Callable[[torch.Tensor], torch.Tensor] | None = None  # post-hoc: probabilities -> probabilities

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        """The predicted probabilities after the remedy's post-hoc step (unchanged if it has none)."""
        return probs if self.adjust is None else self.adjust(probs)


def make_remedy(
    name: str,
    targets: Sequence[int],
    num_classes: int,
    *,
    seed: int,
    beta: float = 0.99,
    gamma: float = 2.0,
    tau: float = 1.0,
    equal_steps: bool = True,
) -> Remedy:
    """The remedy ``name`` for training labels ``targets``: one of ``REMEDIES``.

    ``equal_steps``: every remedy draws ``len(targets)`` items per epoch, so all take the same optimizer steps;
    ``undersample`` then passes over its smaller balanced set several times per epoch (``repeated_passes_sampler``).
    False: ``undersample`` passes over it once per epoch (fewer steps). ``oversample`` draws ``len(targets)`` either way.
    """
    validate_remedies(name)
    counts = label_counts(targets, num_classes)
    if name == "class_weights":
        return Remedy(name, loss_fn=nn.CrossEntropyLoss(weight=class_weights(counts)))
    if name == "effective_number":
        return Remedy(name, loss_fn=nn.CrossEntropyLoss(weight=effective_number_weights(counts, beta)))
    if name == "oversample":
        return Remedy(name, sampler=oversampling_sampler(targets, seed))
    if name == "undersample":
        keep = undersample(targets, seed)
        sampler = repeated_passes_sampler(len(keep), len(targets), seed) if equal_steps else None
        return Remedy(name, sampler=sampler, train_positions=keep)
    if name == "focal":
        return Remedy(name, loss_fn=FocalLoss(gamma))
    if name == "logit_adjustment":
        return Remedy(name, loss_fn=logit_adjusted_loss(counts, tau))
    if name == "threshold":
        return Remedy(name, adjust=lambda probs: adjust_probabilities(probs, counts, tau))
    return Remedy(name)


# --- why a remedy works or not: calibration, per-class thresholds, regularised re-weighting, decoupling -------------


def posthoc_run(run, adjust: Callable[[torch.Tensor], torch.Tensor], train_counts: Sequence[int], *, name: str,
                metrics: Mapping[str, float] | None = None):
    """``run`` (a ``tlkit.RunResult`` of ``tlkit.fit_head_with_remedy``) with ``adjust`` applied to its predictions on
    every split, scored again: a post-hoc remedy, no training. ``metrics`` are added to the run's (e.g. a fitted
    temperature); ``"val_acc"`` and the training numbers stay the head's."""
    if "val" not in run.predictions:
        raise ValueError(f"Run {run.name!r} kept no validation predictions: a post-hoc step adjusts the predictions of "
                         f"tlkit.fit_head_with_remedy.")
    adjusted = {split: (adjust(probs), labels) for split, (probs, labels) in run.predictions.items()}
    scores = {**run.metrics, **long_tail_scores(*adjusted["val"], train_counts), **(metrics or {})}
    if "test" in adjusted:
        scores["test_acc"] = (adjusted["test"][0].argmax(1) == adjusted["test"][1]).float().mean().item()
    return dataclasses.replace(run, name=name, metrics=scores, predictions=adjusted)


def calibrated_threshold(run, train_counts: Sequence[int], *, tau: float = 1.0, name: str = "threshold_calibrated"):
    """Temperature scaling fitted on ``run``'s validation predictions, then the post-hoc correction with ``tau``:
    ``softmax(logits / T - tau * log prior)``. Its argmax is that of ``logits - tau * T * log prior``: on an
    over-confident head (T > 1) the untuned ``tau = 1`` after scaling acts as ``tau = T`` on the raw head.

    The metrics add ``"temperature"`` and the plain head's expected calibration error before and after scaling,
    ``"val_ece"``, ``"val_ece_scaled"`` (in-sample: T was fitted there), ``"test_ece"``, ``"test_ece_scaled"``."""
    temperature = fit_temperature(*run.predictions["val"])
    calibration = {"temperature": temperature}
    for split, (probs, labels) in run.predictions.items():
        calibration |= {f"{split}_ece": calibration_error(probs, labels), f"{split}_ece_scaled": calibration_error(scale(probs, temperature), labels)}
    return posthoc_run(run, lambda probs: adjust_probabilities(scale(probs, temperature), train_counts, tau), train_counts,
                       name=name, metrics=calibration)


def f1_thresholds(probs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per class, the probability threshold that maximises that class's F1 (one vs. the rest) on these predictions:
    the best point of its precision-recall curve (scikit-learn's ``precision_recall_curve``). Choose them on
    validation. A class absent from ``labels`` gets 1 (it is never favoured)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=int)
    thresholds = np.ones(probs.shape[1])
    for c in range(probs.shape[1]):
        if (labels == c).any():
            precision, recall, cuts = precision_recall_curve(labels == c, probs[:, c])
            f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
            thresholds[c] = cuts[int(np.argmax(f1))]
    return thresholds


def apply_thresholds(probs: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Each class's probability divided by its own threshold, renormalised: the predicted class is the one whose
    probability exceeds its threshold by the largest factor (``adjust_probabilities`` is the case threshold = prior ** tau)."""
    ratio = probs.float() / torch.as_tensor(np.asarray(thresholds), dtype=torch.float32).clamp_min(1e-12)
    return ratio / ratio.sum(dim=1, keepdim=True)


def per_class_threshold(run, train_counts: Sequence[int], *, name: str = "threshold_per_class"):
    """``run``'s head with one threshold per class from its validation precision-recall curves (``f1_thresholds``),
    applied on every split (``apply_thresholds``). Its validation scores are in-sample: the thresholds were chosen there."""
    thresholds = f1_thresholds(*run.predictions["val"])
    return posthoc_run(run, lambda probs: apply_thresholds(probs, thresholds), train_counts, name=name)


def fitted_posthoc_arm(plain_runs: Mapping[int, object], fit: Callable[[object], object]) -> Callable[[int], object]:
    """An arm for ``tlkit.compare_arms``: seed -> ``fit(plain_runs[seed])``, e.g. ``lambda run: per_class_threshold(run, counts)``."""
    def run(seed: int):
        if seed not in plain_runs:
            raise KeyError(f"No plain run for seed {seed}: the post-hoc arm adjusts runs of the seeds {sorted(plain_runs)}; "
                           f"train them on the same seeds as the comparison.")
        return fit(plain_runs[seed])

    return run
