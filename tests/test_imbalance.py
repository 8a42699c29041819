"""Class-imbalance remedies against hand-computed small cases, and the long-tail subsampler."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import tlkit
from tlkit.course import run_notebook

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _dataset(counts_per_class):
    targets = [label for label, n in enumerate(counts_per_class) for _ in range(n)]
    return tlkit.LabeledImages(lambda j: None, targets, [f"c{k}" for k in range(len(counts_per_class))])


# --- long tail -----------------------------------------------------------------------------------------


def test_long_tail_counts_follow_the_exponential_profile():
    assert tlkit.imbalance.long_tail_counts(100, 3, 4) == [100, 50, 25]  # 100 * 4 ** (-c / 2)
    assert tlkit.imbalance.long_tail_counts(80, 4, 8) == [80, 40, 20, 10]
    assert tlkit.imbalance.long_tail_counts(30, 5, 1) == [30] * 5
    with pytest.raises(ValueError, match="at least 1"):
        tlkit.imbalance.long_tail_counts(100, 3, 0.5)
    with pytest.raises(ValueError, match="at most 19"):
        tlkit.imbalance.long_tail_counts(10, 3, 50)


def test_long_tail_subset_is_deterministic_by_seed_and_keeps_val():
    ds = _dataset([60, 50, 40])  # head_count defaults to the smallest class: 40
    a = tlkit.imbalance.long_tail_subset(ds, 4, seed=0)
    assert Counter(a.targets) == {0: 40, 1: 20, 2: 10}
    assert a.indices == tlkit.imbalance.long_tail_subset(ds, 4, seed=0).indices
    assert a.indices != tlkit.imbalance.long_tail_subset(ds, 4, seed=1).indices
    assert Counter(tlkit.imbalance.long_tail_subset(ds, 4, seed=0, head_count=8).targets) == {0: 8, 1: 4, 2: 2}
    with pytest.raises(ValueError, match="lower head_count"):
        tlkit.imbalance.long_tail_subset(ds, 4, seed=0, head_count=70)

    splits = tlkit.DatasetSplits("toy", ds, _dataset([5, 5, 5]), ds.classes)
    long_tailed = tlkit.imbalance.make_long_tailed(splits, 4, seed=0)
    assert long_tailed.val is splits.val and splits.train is ds and len(ds) == 150
    assert long_tailed.summary()["train"] == {"c0": 40, "c1": 20, "c2": 10}


# --- remedies ------------------------------------------------------------------------------------------


def test_class_weights_are_inverse_frequency():
    # N = 10, C = 3: N / (C * n_c)
    assert tlkit.imbalance.class_weights([6, 3, 1]).tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert tlkit.imbalance.class_weights([4, 4]).tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="at least one"):
        tlkit.imbalance.class_weights([5, 0, 2])


def test_effective_number_weights_by_hand():
    # beta = 0.5: E_1 = 1, E_2 = (1 - 0.25) / 0.5 = 1.5; 1/E = [1, 2/3], scaled to sum 2 -> [1.2, 0.8]
    assert tlkit.imbalance.effective_number_weights([1, 2], beta=0.5).tolist() == pytest.approx([1.2, 0.8])
    assert tlkit.imbalance.effective_number_weights([9, 3, 1], beta=0.0).tolist() == pytest.approx([1, 1, 1])
    near_one = tlkit.imbalance.effective_number_weights([6, 3, 1], beta=0.99999)
    inverse = tlkit.imbalance.class_weights([6, 3, 1])
    assert (near_one / near_one.sum()).tolist() == pytest.approx((inverse / inverse.sum()).tolist(), rel=1e-3)
    with pytest.raises(ValueError, match="beta"):
        tlkit.imbalance.effective_number_weights([1, 2], beta=1.0)


def test_oversampling_draws_every_class_equally_often_and_is_seeded():
    targets = [0] * 80 + [1] * 15 + [2] * 5
    sampler = tlkit.imbalance.oversampling_sampler(targets, seed=0, num_samples=30_000)
    drawn = np.asarray(targets)[list(sampler)]
    assert np.bincount(drawn, minlength=3) / len(drawn) == pytest.approx([1 / 3] * 3, abs=0.015)
    one_epoch = tlkit.imbalance.oversampling_sampler(targets, seed=3)
    assert len(list(one_epoch)) == 100
    assert list(tlkit.imbalance.oversampling_sampler(targets, seed=3)) == list(tlkit.imbalance.oversampling_sampler(targets, seed=3))


def test_undersample_keeps_the_rarest_count_of_every_class():
    targets = [0] * 7 + [1] * 3 + [2] * 5
    keep = tlkit.imbalance.undersample(targets, seed=0)
    assert Counter(np.asarray(targets)[keep].tolist()) == {0: 3, 1: 3, 2: 3}
    assert keep == tlkit.imbalance.undersample(targets, seed=0) and keep == sorted(keep)
    assert {7, 8, 9} <= set(keep)  # all of the rarest class


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_smaller_for_easy_examples():
    logits = torch.tensor([[2.0, 0.1, -1.0], [0.2, 0.3, 0.1], [-1.0, 0.0, 3.0]])
    target = torch.tensor([0, 2, 2])
    assert tlkit.imbalance.FocalLoss(gamma=0)(logits, target).item() == pytest.approx(F.cross_entropy(logits, target).item())
    # one easy example, p_t = 0.75: -(1 - 0.75) ** 2 * log(0.75)
    easy = torch.tensor([[np.log(3.0), 0.0]])
    assert tlkit.imbalance.FocalLoss(gamma=2)(easy, torch.tensor([0])).item() == pytest.approx(-(0.25**2) * np.log(0.75), rel=1e-5)
    # the easier the example, the larger the share of its cross-entropy that focal loss drops
    hard = torch.tensor([[0.0, np.log(3.0)]])
    ratio_easy = tlkit.imbalance.FocalLoss(2)(easy, torch.tensor([0])) / F.cross_entropy(easy, torch.tensor([0]))
    ratio_hard = tlkit.imbalance.FocalLoss(2)(hard, torch.tensor([0])) / F.cross_entropy(hard, torch.tensor([0]))
    assert ratio_easy.item() == pytest.approx(0.0625) and ratio_hard.item() == pytest.approx(0.5625)


def test_logit_offsets_loss_and_posthoc_adjustment_by_hand():
    offsets = tlkit.imbalance.logit_offsets([3, 1], tau=1.0)
    assert offsets.tolist() == pytest.approx([np.log(0.75), np.log(0.25)])
    assert tlkit.imbalance.logit_offsets([3, 1], tau=2.0).tolist() == pytest.approx([2 * np.log(0.75), 2 * np.log(0.25)])
    logits, target = torch.tensor([[1.0, 1.0], [0.5, -0.5]]), torch.tensor([1, 0])
    expected = F.cross_entropy(logits + torch.tensor([np.log(0.75), np.log(0.25)]), target)
    assert tlkit.imbalance.logit_adjusted_loss([3, 1])(logits, target).item() == pytest.approx(expected.item())
    # probabilities divided by the prior, renormalised: [0.6 / 0.75, 0.4 / 0.25] = [0.8, 1.6] -> [1/3, 2/3]
    adjusted = tlkit.imbalance.adjust_probabilities(torch.tensor([[0.6, 0.4]]), [3, 1])
    assert adjusted[0].tolist() == pytest.approx([1 / 3, 2 / 3], rel=1e-5)
    assert tlkit.imbalance.adjust_probabilities(torch.tensor([[0.6, 0.4]]), [3, 1], tau=0.0)[0].tolist() == pytest.approx([0.6, 0.4])


def test_make_remedy_gives_each_remedy_its_parts_and_rejects_unknown_names():
    targets = [0] * 6 + [1] * 3 + [2] * 1
    parts = {name: tlkit.imbalance.make_remedy(name, targets, 3, seed=0) for name in tlkit.REMEDIES}
    assert all(vars(parts["none"])[k] is None for k in ("loss_fn", "sampler", "train_positions", "adjust"))
    assert parts["class_weights"].loss_fn.weight.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert isinstance(parts["effective_number"].loss_fn, nn.CrossEntropyLoss)
    assert len(list(parts["oversample"].sampler)) == 10
    assert len(parts["undersample"].train_positions) == 3
    assert isinstance(parts["focal"].loss_fn, tlkit.imbalance.FocalLoss)
    assert parts["logit_adjustment"].loss_fn.offsets.tolist() == pytest.approx(np.log([0.6, 0.3, 0.1]).tolist())
    flat = torch.full((1, 3), 1 / 3)
    # probabilities divided by the prior [0.6, 0.3, 0.1]: proportional to [1/0.6, 1/0.3, 1/0.1] = [1/9, 2/9, 6/9] * 15
    assert parts["threshold"].apply(flat)[0].tolist() == pytest.approx([1 / 9, 2 / 9, 2 / 3], rel=1e-5)
    assert parts["none"].apply(flat) is flat
    with pytest.raises(ValueError, match="Unknown remedy 'smote'; choose one of: none, class_weights"):
        tlkit.imbalance.make_remedy("smote", targets, 3, seed=0)


def test_every_remedy_trains_a_head_on_cached_features_from_the_same_start():
    generator = torch.Generator().manual_seed(0)
    centers = torch.eye(3, 8) * 4
    train_y = torch.tensor([0] * 30 + [1] * 8 + [2] * 3)
    val_y = torch.tensor([0, 1, 2] * 5)
    train = TensorDataset(centers[train_y] + torch.randn(len(train_y), 8, generator=generator), train_y)
    val = TensorDataset(centers[val_y] + torch.randn(len(val_y), 8, generator=generator), val_y)
    model = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 3, weights=None))
    model.head = nn.Linear(8, 3)
    config = tlkit.RunConfig(epochs=8, batch_size=8, seed=0, lr=0.1, progress=False)
    runs = {name: tlkit.fit_head_with_remedy(config, model, train, val, name) for name in tlkit.REMEDIES}
    for run in runs.values():
        assert run.probs.shape == (15, 3) and torch.equal(run.labels, val_y)
        assert torch.allclose(run.probs.sum(1), torch.ones(15), atol=1e-5)
        assert (run.predicted == val_y).float().mean() > 0.6
    assert len(runs["undersample"].history.train_loss) == 8
    # threshold trains exactly as none does (same head init, same batches); only its post-hoc step differs
    assert runs["threshold"].history.train_loss == runs["none"].history.train_loss
    assert not torch.equal(runs["threshold"].probs, runs["none"].probs)
    again = tlkit.fit_head_with_remedy(config, model, train, val, "oversample")
    assert torch.equal(again.probs, runs["oversample"].probs)


def test_plot_class_counts_draws_one_bar_per_class_and_split():
    fig = tlkit.plots.plot_class_counts({"train": {"a": 9, "b": 3}, "val": {"a": 4, "b": 4}}, log=True)
    bars = [p for p in fig.axes[0].patches]
    assert [b.get_height() for b in bars] == [9, 3, 4, 4]


@pytest.mark.notebook
def test_notebook_04_remedies_help_the_rare_classes(tmp_path):
    run = run_notebook(
        NOTEBOOKS / "04_class_imbalance.ipynb", tmp_path,
        {"dataset": "digits", "imbalance_ratio": 20, "epochs": 10, "batch_size": 64, "lr": 0.01, "image_size": 32,
         "remedy": "logit_adjustment", "seeds": [0]},
    )
    assert run.error == "", run.error
    m = run.metrics
    assert m["dataset"] == "digits" and m["remedy"] == "logit_adjustment" and m["imbalance_ratio"] == 20
    assert m["train_images"] == 474 and m["val_images"] == 360 and m["train_imbalance_ratio"] == pytest.approx(139 / 7)
    for name in tlkit.REMEDIES:
        for key in ("val_acc", "balanced_acc", "macro_f1", "worst_class_recall", "rarest_class_recall", "pr_auc", "long_tailed_acc"):
            assert 0.0 <= m[f"{key}_{name}"] <= 1.0
    assert m["balanced_acc"] == m["balanced_acc_logit_adjustment"] and m["balanced_acc_logit_adjustment_std"] == 0.0
    assert "chosen_remedy" not in m  # digits has no test split: nothing is reported on test
    assert m["balanced_acc"] > 0.5
    assert m["balanced_acc_logit_adjustment"] > m["balanced_acc_none"] + 0.02
    # the post-hoc correction raises the rare classes' recall over plain training, on the same trained head
    assert m["rarest_class_recall_threshold"] >= m["rarest_class_recall_none"]
    assert m["long_tailed_acc_none"] > m["val_acc_none"]
    for name in ("class_counts", "comparison", "per_class_recall", "confusion_matrix", "pr_curves"):
        assert (tmp_path / "figures" / "04" / f"{name}.png").stat().st_size > 0
