"""Imbalance-aware metrics: a hand-computed case, and agreement with scikit-learn on random inputs."""

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    classification_report,
    f1_score,
    recall_score,
)

import tlkit

# 8 items, 3 classes. Recall: 3/4, 2/2, 1/2. Precision: 3/4 (pred 0: items 0,1,2,6), 2/3, 1/1.
Y_TRUE = [0, 0, 0, 0, 1, 1, 2, 2]
Y_PRED = [0, 0, 0, 1, 1, 1, 0, 2]


def test_metrics_by_hand():
    m = tlkit.classification_metrics(Y_TRUE, Y_PRED, 3)
    f1 = [0.75, 2 * (2 / 3) / (5 / 3), 2 * 0.5 / 1.5]
    assert m == pytest.approx(
        {"accuracy": 6 / 8, "balanced_accuracy": (3 / 4 + 1 + 1 / 2) / 3, "macro_f1": sum(f1) / 3, "worst_class_recall": 0.5}
    )
    assert tlkit.metrics.per_class_recall(Y_TRUE, Y_PRED, 3).tolist() == pytest.approx([0.75, 1.0, 0.5])
    # prior 1 : 3 : 0 -> (1 * 0.75 + 3 * 1.0) / 4
    assert tlkit.metrics.reweighted_accuracy(Y_TRUE, Y_PRED, [1, 3, 0]) == pytest.approx(0.9375)
    with pytest.raises(ValueError, match="class_prior"):
        tlkit.metrics.reweighted_accuracy(Y_TRUE, Y_PRED, [0, 0, 0])


def test_per_class_report_by_hand():
    table = tlkit.metrics.per_class_report(Y_TRUE, Y_PRED, ["a", "b", "c"])
    assert list(table.index) == ["a", "b", "c"] and list(table.columns) == ["precision", "recall", "f1", "support"]
    assert table["precision"].tolist() == pytest.approx([0.75, 2 / 3, 1.0])
    assert table["recall"].tolist() == pytest.approx([0.75, 1.0, 0.5])
    assert table["support"].tolist() == [4, 2, 2]


def test_metrics_match_scikit_learn_on_random_predictions():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 5, 300))
    m = tlkit.classification_metrics(y_true, y_pred, 5)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["worst_class_recall"] == pytest.approx(recall_score(y_true, y_pred, average=None).min())
    report = classification_report(y_true, y_pred, output_dict=True)
    table = tlkit.metrics.per_class_report(y_true, y_pred, [str(c) for c in range(5)])
    for c in range(5):
        assert table.loc[str(c), "f1"] == pytest.approx(report[str(c)]["f1-score"])
        assert table.loc[str(c), "support"] == report[str(c)]["support"]


def test_a_class_never_predicted_counts_as_zero_not_as_missing():
    m = tlkit.classification_metrics([0, 1, 2], [0, 1, 1], 4)  # class 2 never predicted, class 3 absent
    assert m["worst_class_recall"] == 0.0
    assert tlkit.metrics.per_class_report([0, 1, 2], [0, 1, 1], list("abcd"))["support"].tolist() == [1, 1, 1, 0]


def test_average_precision_by_hand_and_against_scikit_learn():
    # class 0: positives scored 0.9 and 0.7 among 0.9, 0.8, 0.7, 0.1 -> AP = 0.5 * 1 + 0.5 * 2/3
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.1, 0.9]])
    assert tlkit.metrics.average_precision_per_class([0, 1, 0, 1], probs).tolist() == pytest.approx([5 / 6, 5 / 6])
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    scores = rng.random((200, 4)) + np.eye(4)[y] * 0.5
    scores /= scores.sum(1, keepdims=True)
    expected = [average_precision_score(y == c, scores[:, c]) for c in range(4)]
    assert tlkit.metrics.average_precision_per_class(y, scores).tolist() == pytest.approx(expected)


def test_figures_have_one_curve_per_class_or_run():
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 10)
    probs = rng.dirichlet(np.ones(3), 30)
    pr = tlkit.plots.plot_pr_curves(y, probs, ["a", "b", "c"])
    assert len(pr.axes[0].get_lines()) == 3 and "macro PR-AUC" in pr.axes[0].get_title()
    recall = tlkit.plots.plot_per_class_recall({"none": [1, 0.5, 0.1], "focal": [0.9, 0.6, 0.3]}, ["a", "b", "c"])
    assert [tuple(line.get_ydata()) for line in recall.axes[0].get_lines()] == [(1, 0.5, 0.1), (0.9, 0.6, 0.3)]
