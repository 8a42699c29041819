"""Metrics that stay honest when classes are imbalanced (scikit-learn), and calibration: the expected calibration error
(torchmetrics), the reliability table behind a reliability diagram and temperature scaling (Guo et al. 2017: one number
T fitted on validation; the probabilities become softmax(logits / T), the predicted class never changes). As numbers and
tables; their figures are in ``tlkit.plots``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    recall_score,
)


def per_class_recall(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Recall of each class 0..num_classes-1 (0 for a class absent from ``y_true``)."""
    return recall_score(y_true, y_pred, labels=list(range(num_classes)), average=None, zero_division=0)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean per-class recall), macro-F1 and the worst class's recall, as fractions."""
    labels = list(range(num_classes))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "worst_class_recall": float(per_class_recall(y_true, y_pred, num_classes).min()),
    }


def reweighted_accuracy(y_true: Sequence[int], y_pred: Sequence[int], class_prior: Sequence[float]) -> float:
    """Expected accuracy on a test set whose classes come in ``class_prior`` proportions: sum of prior_c * recall_c."""
    prior = np.asarray(class_prior, dtype=np.float64)
    if (prior < 0).any() or prior.sum() <= 0:
        raise ValueError(f"class_prior must be non-negative with a positive sum, got {prior.tolist()}.")
    return float(np.dot(prior / prior.sum(), per_class_recall(y_true, y_pred, len(prior))))


def per_class_report(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> pd.DataFrame:
    """One row per class: precision, recall, F1 and support (validation items of that class)."""
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(classes))), zero_division=0
    )
    table = pd.DataFrame({"precision": precision, "recall": recall, "f1": f1, "support": support}, index=list(classes))
    table.index.name = "class"
    return table


def average_precision_per_class(y_true: Sequence[int], probs: np.ndarray) -> np.ndarray:
    """One-vs-rest average precision (area under the precision-recall curve) of each class."""
    probs = np.asarray(probs)
    onehot = np.eye(probs.shape[1], dtype=int)[np.asarray(y_true, dtype=int)]  # (label_binarize gives 1 column for 2 classes)
    return average_precision_score(onehot, probs, average=None)


def long_tail_metrics(y_true: Sequence[int], probs: np.ndarray, train_counts: Sequence[int]) -> dict[str, float]:
    """Everything one run of a long-tail comparison is judged by, as fractions.

    ``classification_metrics`` of the predicted classes (the most probable), and: ``rarest_class_recall`` (recall of
    the class with the fewest training items, the first such one), ``pr_auc`` (macro average precision of the
    scores) and ``long_tailed_acc`` (the accuracy expected on a test set with the training class proportions,
    ``reweighted_accuracy``).
    """
    probs = np.asarray(probs)
    y_pred = probs.argmax(1)
    counts = np.asarray(train_counts)
    recall = per_class_recall(y_true, y_pred, probs.shape[1])
    return {
        **classification_metrics(y_true, y_pred, probs.shape[1]),
        "rarest_class_recall": float(recall[int(np.argmin(counts))]),
        "pr_auc": float(np.mean(average_precision_per_class(y_true, probs))),
        "long_tailed_acc": reweighted_accuracy(y_true, y_pred, counts),
    }


# --- calibration: is the confidence honest? --------------------------------------------------------------

N_BINS = 15  # Guo et al.'s 15 equal-width confidence bins


def _check(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.ndim != 2 or labels.ndim != 1 or len(probs) != len(labels) or len(labels) == 0:
        raise ValueError(f"Expected probabilities N x C and N labels (N > 0), got {tuple(probs.shape)} and {tuple(labels.shape)}.")


def calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> float:
    """Expected calibration error: the gap between confidence (top probability) and accuracy, averaged over
    ``n_bins`` equal-width confidence bins weighted by how many predictions fall in each (0: honest)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    _check(probs, labels)
    return float(multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=n_bins, norm="l1"))


def reliability_table(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> pd.DataFrame:
    """Per confidence bin: its range, the mean confidence, the accuracy and the count (empty bins left out): the
    points of a reliability diagram. A calibrated model has accuracy = confidence in every bin."""
    _check(probs, labels)
    confidence, predicted = probs.max(dim=1)
    right = (predicted == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    bins = torch.bucketize(confidence, edges[1:-1], right=True)  # (lo, hi] bins, as torchmetrics counts them
    rows = [{"low": float(edges[b]), "high": float(edges[b + 1]), "confidence": float(confidence[bins == b].mean()),
             "accuracy": float(right[bins == b].mean()), "count": int((bins == b).sum())}
            for b in range(n_bins) if (bins == b).any()]
    return pd.DataFrame(rows)


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy of the true class (the loss temperature scaling minimises)."""
    _check(probs, labels)
    return float(torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels))


def scale(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) from probabilities (log p is the logits up to a constant per row, which softmax ignores)."""
    return torch.softmax(probs.clamp_min(1e-12).log() / temperature, dim=1)


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 that minimises the negative log-likelihood of ``labels`` under softmax(logits / T)
    (fit it on validation, never on test). T > 1 softens an over-confident model, T < 1 sharpens an under-confident one."""
    _check(probs, labels)
    logits = probs.double().clamp_min(1e-12).log()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())
