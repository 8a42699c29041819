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


def test_long_tail_positions_follow_the_given_class_order():
    targets = [0] * 10 + [1] * 40 + [2] * 20
    keep = tlkit.imbalance.long_tail_positions(targets, 4, seed=0, head_count=16, order=[1, 2, 0])
    assert Counter(np.asarray(targets)[keep].tolist()) == {1: 16, 2: 8, 0: 4}  # 16 * 4 ** (-r / 2) by rank r
    assert keep == sorted(keep) == tlkit.imbalance.long_tail_positions(targets, 4, seed=0, head_count=16, order=[1, 2, 0])
    # an absent last class counts when num_classes says it exists: it cannot supply its share
    with pytest.raises(ValueError, match=r"class 3 \(0 < 2\)"):
        tlkit.imbalance.long_tail_positions(targets, 4, seed=0, head_count=8, num_classes=4)
    with pytest.raises(ValueError, match="every class"):
        tlkit.imbalance.long_tail_positions(targets, 4, seed=0, order=[0, 1])


def test_largest_head_count_is_the_most_every_class_allows():
    # order [1, 2, 0], ratio 4: wanted h, h/2, h/4 (rounded) of 40, 20, 10 available -> h = 40 fits exactly
    assert tlkit.imbalance.largest_head_count([10, 40, 20], 4, [1, 2, 0]) == 40
    # class 2 has only 15: h = 31 would want round(15.5) = 16 of it, so h = 30 ([30, 15, 8])
    assert tlkit.imbalance.largest_head_count([10, 40, 15], 4, [1, 2, 0]) == 30
    with pytest.raises(ValueError, match="No long tail"):
        tlkit.imbalance.largest_head_count([1, 1, 1], 50, [0, 1, 2])


def test_steeper_tail_keeps_the_frequency_order_and_steepens_it():
    targets = [0] * 30 + [1] * 200 + [2] * 12 + [3] * 40  # frequency order: 1, 3, 0, 2
    keep = tlkit.imbalance.steeper_tail(targets, 27, seed=0)
    counts = np.bincount(np.asarray(targets)[keep], minlength=4)
    # h * 27 ** (-r / 3) by rank r = h, h/3, h/9, h/27; class 3's 40 allow at most h = 121 (round(121 / 3) = 40)
    assert counts.tolist() == [13, 121, 4, 40]
    assert keep == tlkit.imbalance.steeper_tail(targets, 27, seed=0)
    assert keep != tlkit.imbalance.steeper_tail(targets, 27, seed=1)
    assert set(keep) <= set(range(len(targets)))


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


def test_repeated_passes_sampler_shuffles_every_pass_and_is_seeded():
    drawn = list(tlkit.data.repeated_passes_sampler(4, 10, seed=0))
    assert len(drawn) == 10 and sorted(drawn[:4]) == sorted(drawn[4:8]) == [0, 1, 2, 3] and len(set(drawn[8:])) == 2
    assert drawn == list(tlkit.data.repeated_passes_sampler(4, 10, seed=0))
    assert drawn != list(tlkit.data.repeated_passes_sampler(4, 10, seed=1))
    with pytest.raises(ValueError, match="at least 1"):
        tlkit.data.repeated_passes_sampler(0, 10, seed=0)


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


def test_tau_sweep_scores_the_posthoc_adjustment_by_balanced_accuracy():
    # prior [0.75, 0.25]; both items lean to class 0, the second one only a little
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    scores = tlkit.imbalance.tau_sweep(probs, [0, 1], [3, 1], [0, 1])
    # tau 0: both predicted 0 -> recall [1, 0]; tau 1: [0.9/0.75, 0.1/0.25] = [1.2, 0.4] -> 0, [0.8, 1.6] -> 1
    assert scores == {0.0: 0.5, 1.0: 1.0}


def test_long_tail_metrics_by_hand():
    y = [0, 0, 0, 1, 2, 2]
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]])
    m = tlkit.metrics.long_tail_metrics(y, probs, train_counts=[10, 5, 1])
    # predicted 0, 0, 1, 1, 0, 2: recalls [2/3, 1, 1/2]
    assert m["accuracy"] == pytest.approx(4 / 6) and m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    assert m["worst_class_recall"] == pytest.approx(0.5) and m["rarest_class_recall"] == pytest.approx(0.5)
    assert m["long_tailed_acc"] == pytest.approx((10 * 2 / 3 + 5 * 1 + 1 * 0.5) / 16)
    assert m["pr_auc"] == pytest.approx(np.mean(tlkit.metrics.average_precision_per_class(y, probs)))
    assert tlkit.metrics.long_tail_metrics(y, probs, train_counts=[1, 5, 10])["rarest_class_recall"] == pytest.approx(2 / 3)


def test_make_remedy_gives_each_remedy_its_parts_and_rejects_unknown_names():
    targets = [0] * 6 + [1] * 3 + [2] * 1
    parts = {name: tlkit.imbalance.make_remedy(name, targets, 3, seed=0) for name in tlkit.REMEDIES}
    assert all(vars(parts["none"])[k] is None for k in ("loss_fn", "sampler", "train_positions", "adjust"))
    assert parts["class_weights"].loss_fn.weight.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert isinstance(parts["effective_number"].loss_fn, nn.CrossEntropyLoss)
    assert len(list(parts["oversample"].sampler)) == 10
    assert len(parts["undersample"].train_positions) == 3
    assert len(parts["undersample"].sampler) == 10  # equal steps: as many draws per epoch as there are items
    assert tlkit.imbalance.make_remedy("undersample", targets, 3, seed=0, equal_steps=False).sampler is None
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
    # one budget: every remedy takes 8 epochs x ceil(41 / 8) = 48 optimizer steps, undersample too (6 items x 8 passes)
    assert {run.metrics["optimizer_steps"] for run in runs.values()} == {48.0}
    fewer = tlkit.fit_head_with_remedy(config, model, train, val, "undersample", equal_steps=False)
    assert fewer.metrics["optimizer_steps"] == 8 * 2  # 3 items of each class, 9 in all: two batches of 8 per epoch
    assert not torch.equal(fewer.probs, runs["undersample"].probs)
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
    for name in [*tlkit.REMEDIES, "threshold_tuned"]:
        for key in ("val_acc", "balanced_acc", "macro_f1", "worst_class_recall", "rarest_class_recall", "pr_auc", "long_tailed_acc"):
            assert 0.0 <= m[f"{key}_{name}"] <= 1.0
    assert m["balanced_acc"] == m["balanced_acc_logit_adjustment"] and m["balanced_acc_logit_adjustment_std"] == 0.0
    assert "chosen_remedy" not in m  # digits has no test split: nothing is reported on test
    assert m["balanced_acc"] > 0.5
    assert m["balanced_acc_logit_adjustment"] > m["balanced_acc_none"] + 0.02
    # the post-hoc correction raises the rare classes' recall over plain training, on the same trained head
    assert m["rarest_class_recall_threshold"] >= m["rarest_class_recall_none"]
    assert m["long_tailed_acc_none"] > m["val_acc_none"]
    # the second setting: a steeper tail cut from the first, every remedy on it too, with the same epochs
    assert m["steep_ratio"] == 50 and m["train_images_steep"] < m["train_images"]
    assert m["train_imbalance_ratio_steep"] > 2 * m["train_imbalance_ratio"]
    assert m["optimizer_steps"] == 10 * 8 and m["optimizer_steps_steep"] == 10 * -(-m["train_images_steep"] // 64)
    for name in [*tlkit.REMEDIES, "threshold_tuned"]:
        for key in ("val_acc", "balanced_acc", "worst_class_recall"):
            assert 0.0 <= m[f"{key}_{name}_steep"] <= 1.0 and m[f"{key}_{name}_steep_std"] == 0.0
    assert m["balanced_acc_none_steep"] < m["balanced_acc_none"]
    # the threshold's strength is chosen on validation from the grid, per setting; the chosen one is best there
    for suffix in ("", "_steep"):
        assert m[f"threshold_tau{suffix}"] in (0, 0.5, 1, 1.5, 2, 2.5, 3, 4)
        assert m[f"balanced_acc_threshold_tuned{suffix}"] >= m[f"balanced_acc_none{suffix}"]
    for name in ("class_counts", "comparison", "per_class_recall", "comparison_steep", "per_class_recall_steep",
                 "threshold_tau", "confusion_matrix", "pr_curves"):
        assert (tmp_path / "figures" / "04" / f"{name}.png").stat().st_size > 0
