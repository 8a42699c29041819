"""Metrics that stay honest when classes are imbalanced (scikit-learn), as numbers and tables (their figures are in ``tlkit.plots``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
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
