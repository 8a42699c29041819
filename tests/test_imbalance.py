"""Class-imbalance remedies against hand-computed small cases, and the long-tail subsampler."""

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score as sklearn_f1
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


def _tiny_head_problem(seed=0):
    """Three separable classes of 8-d features, 30 / 8 / 3 training items; a frozen model whose head fits them."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.eye(3, 8) * 4
    train_y, val_y = torch.tensor([0] * 30 + [1] * 8 + [2] * 3), torch.tensor([0, 1, 2] * 5)
    train = TensorDataset(centers[train_y] + torch.randn(len(train_y), 8, generator=generator), train_y)
    val = TensorDataset(centers[val_y] + 2 * torch.randn(len(val_y), 8, generator=generator), val_y)
    model = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 3, weights=None))
    model.head = nn.Linear(8, 3)
    return model, train, val, tlkit.RunConfig(epochs=6, batch_size=8, seed=0, lr=0.1, progress=False)


def test_long_tail_scores_name_every_score_of_the_decisions():
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]])
    scores = tlkit.imbalance.long_tail_scores(probs, y, [10, 5, 1])
    assert list(scores) == list(tlkit.imbalance.SCORES)
    # predicted 0, 0, 1, 1, 0, 2: recalls [2/3, 1, 1/2]
    assert scores["accuracy"] == pytest.approx(4 / 6) and scores["balanced_acc"] == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    assert scores["worst_class_recall"] == pytest.approx(0.5) and scores["rarest_class_recall"] == pytest.approx(0.5)
    assert tlkit.imbalance.balanced_accuracy(probs, y) == pytest.approx(scores["balanced_acc"])
    with pytest.raises(ValueError, match="probs has 6 rows but labels has 2"):
        tlkit.imbalance.long_tail_scores(probs, y[:2], [10, 5, 1])


def test_tau_curve_averages_the_sweep_over_runs_and_mean_recall_per_class_over_seeds():
    # prior [0.75, 0.25]; run 1 as in the tau_sweep test (0.5 at tau 0, 1.0 at tau 1), run 2 right at both taus
    runs = [(torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([0, 1])), (torch.tensor([[0.9, 0.1], [0.1, 0.9]]), torch.tensor([0, 1]))]
    curve = tlkit.imbalance.tau_curve(runs, [3, 1], [0, 1])
    assert curve["balanced_acc"].tolist() == pytest.approx([0.75, 1.0]) and curve["seeds"].tolist() == [2, 2]
    assert curve["balanced_acc std"].iloc[0] == pytest.approx(np.std([0.5, 1.0], ddof=1)) and curve["balanced_acc"].idxmax() == 1.0
    with pytest.raises(ValueError, match="at least one run"):
        tlkit.imbalance.tau_curve([], [3, 1], [0, 1])
    recalls = tlkit.imbalance.mean_recall_per_class({("none", 0): runs[0], ("none", 1): runs[1], ("other", 0): runs[1]}, 2)
    assert recalls["none"].tolist() == pytest.approx([1.0, 0.5]) and recalls["other"].tolist() == pytest.approx([1.0, 1.0])


def test_fit_head_with_remedy_scores_its_decisions_and_keeps_the_final_training_loss():
    model, train, val, config = _tiny_head_problem()
    run = tlkit.fit_head_with_remedy(config, model, train, val, "threshold")
    assert run.metrics["train_loss"] == run.history.train_loss[-1] and run.metrics["train_acc"] == run.history.train_acc[-1]
    # the scores are those of the adjusted predictions, against the training counts [30, 8, 3]
    assert {k: run.metrics[k] for k in tlkit.imbalance.SCORES} == tlkit.imbalance.long_tail_scores(run.probs, run.labels, [30, 8, 3])
    assert run.metrics["balanced_acc"] == tlkit.imbalance.balanced_accuracy(run.probs, run.labels)


def test_posthoc_threshold_is_the_threshold_remedy_without_retraining():
    model, train, val, config = _tiny_head_problem()
    plain = tlkit.fit_head_with_remedy(config, model, train, val, "none", test_features=val)
    trained = tlkit.fit_head_with_remedy(config, model, train, val, "threshold", tau=1.5, test_features=val)
    adjusted = tlkit.recipes.posthoc_threshold(plain, [30, 8, 3], 1.5)
    assert adjusted.name == "threshold (tau=1.5)" and adjusted.model is plain.model
    for split in ("val", "test"):
        assert torch.allclose(adjusted.predictions[split][0], trained.predictions[split][0], atol=1e-6)
    assert adjusted.metrics["balanced_acc"] == pytest.approx(trained.metrics["balanced_acc"])
    assert adjusted.metrics["test_acc"] == pytest.approx(trained.metrics["test_acc"])
    assert adjusted.metrics["train_loss"] == plain.metrics["train_loss"] and adjusted.val_acc == plain.val_acc
    assert torch.equal(plain.probs, plain.predictions["val"][0])  # the plain run is left as it was
    bare = tlkit.RunResult("bare", model, plain.history, 1.0, 27)
    with pytest.raises(ValueError, match="Run 'bare' kept no validation predictions"):
        tlkit.recipes.posthoc_threshold(bare, [30, 8, 3], 1.0)


def test_remedy_arm_runs_the_remedy_on_the_seed_s_training_set_from_that_seed():
    model, train, val, config = _tiny_head_problem()
    asked = []
    arm = tlkit.recipes.remedy_arm(config, model, lambda s: asked.append(s) or train, val, "class_weights")
    run = arm(3)
    assert asked == [3] and run.name == "class_weights"
    again = tlkit.fit_head_with_remedy(config.replace(seed=3), model, train, val, "class_weights")
    assert torch.equal(run.probs, again.probs)
    assert not torch.equal(run.probs, tlkit.fit_head_with_remedy(config, model, train, val, "class_weights").probs)
    comparison = tlkit.compare_arms({"none": tlkit.recipes.remedy_arm(config, model, lambda s: train, val, "none"), "class_weights": arm},
                                    [0, 1], metric="balanced_acc")
    assert comparison.summary().loc["class_weights", "seeds"] == 2


def test_the_pytorch_loop_with_class_weights_or_a_weighted_sampler_is_fit_head_with_remedy():
    """What notebook 04 shows: nn.CrossEntropyLoss(weight=...) and a WeightedRandomSampler by hand give tlkit's head."""
    model, train, val, config = _tiny_head_problem()
    x, y = train.tensors
    n_c = torch.bincount(y, minlength=3).double()
    sampler = torch.utils.data.WeightedRandomSampler((1 / n_c)[y], len(y), replacement=True, generator=torch.Generator().manual_seed(0))
    shuffled = torch.utils.data.DataLoader(train, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    cases = {"class_weights": (nn.CrossEntropyLoss(weight=(len(y) / (3 * n_c)).float()), shuffled),
             "oversample": (nn.CrossEntropyLoss(), torch.utils.data.DataLoader(train, batch_size=8, sampler=sampler))}
    for name, (loss_fn, loader) in cases.items():
        torch.manual_seed(0)
        head = nn.Linear(8, 3)
        optimizer = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.0)
        for _ in range(config.epochs):
            for xb, yb in loader:
                loss = loss_fn(head(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            probs = head(val.tensors[0]).softmax(1)
        assert torch.allclose(probs, tlkit.fit_head_with_remedy(config, model, train, val, name).probs, atol=1e-5), name


def test_calibrated_threshold_is_the_prior_correction_after_temperature_scaling():
    model, train, val, config = _tiny_head_problem()
    test = TensorDataset(val.tensors[0].flip(0), val.tensors[1].flip(0))
    plain = tlkit.fit_head_with_remedy(config, model, train, val, "none", test_features=test)
    counts = [30, 8, 3]
    calibrated = tlkit.imbalance.calibrated_threshold(plain, counts)
    temperature = tlkit.metrics.fit_temperature(*plain.predictions["val"])  # fitted on validation, never on test
    assert calibrated.name == "threshold_calibrated" and calibrated.metrics["temperature"] == pytest.approx(temperature)
    prior = torch.tensor(counts, dtype=torch.float32) / sum(counts)
    for split in ("val", "test"):
        probs, labels = plain.predictions[split]
        by_hand = (probs.log() / temperature - prior.log()).argmax(1)  # logits / T - log prior, tau = 1
        assert torch.equal(calibrated.predictions[split][0].argmax(1), by_hand)
        # the same decisions as tau = T on the unscaled head
        assert torch.equal(by_hand, tlkit.imbalance.adjust_probabilities(probs, counts, temperature).argmax(1))
        ece = tlkit.metrics.calibration_error
        assert calibrated.metrics[f"{split}_ece"] == pytest.approx(ece(probs, labels))
        assert calibrated.metrics[f"{split}_ece_scaled"] == pytest.approx(ece(tlkit.metrics.scale(probs, temperature), labels))
    # on validation, where T was fitted, scaling can only lower the log-loss (T = 1 was a candidate)
    nll = tlkit.metrics.negative_log_likelihood
    val_probs, val_labels = plain.predictions["val"]
    assert nll(tlkit.metrics.scale(val_probs, temperature), val_labels) <= nll(val_probs, val_labels) + 1e-9
    assert calibrated.metrics["balanced_acc"] == tlkit.imbalance.balanced_accuracy(*calibrated.predictions["val"])


def test_f1_thresholds_are_chosen_on_the_given_data():
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.55, 0.45], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    thresholds = tlkit.imbalance.f1_thresholds(probs, labels)
    for c in range(2):  # brute force: every observed score as the cut, F1 of "score >= cut"
        cuts = probs[:, c].unique().tolist()
        f1 = [sklearn_f1((labels == c).numpy(), (probs[:, c] >= t).numpy()) for t in cuts]
        assert sklearn_f1((labels == c).numpy(), (probs[:, c] >= thresholds[c]).numpy()) == pytest.approx(max(f1))
    assert thresholds[1] == pytest.approx(0.4)  # class 1's best cut: all three of its items, none of class 0's
    other = tlkit.imbalance.f1_thresholds(probs, torch.tensor([0, 0, 0, 1, 1]))
    assert other[1] == pytest.approx(0.45)  # other data, other thresholds
    absent = tlkit.imbalance.f1_thresholds(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]), torch.tensor([0, 1]))
    assert absent[2] == 1.0


def test_apply_thresholds_prefers_the_class_furthest_above_its_threshold():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4]])
    adjusted = tlkit.imbalance.apply_thresholds(probs, [0.6, 0.2, 0.1])  # ratios [1, 1.5, 1] and [0.83, 0.5, 4]
    assert adjusted.argmax(1).tolist() == [1, 2] and torch.allclose(adjusted.sum(1), torch.ones(2))
    counts, tau = [6, 3, 1], 1.5
    prior_thresholds = (np.array(counts) / sum(counts)) ** tau  # dividing by prior ** tau is one choice of thresholds
    assert torch.allclose(tlkit.imbalance.apply_thresholds(probs, prior_thresholds),
                          tlkit.imbalance.adjust_probabilities(probs, counts, tau), atol=1e-6)


def test_per_class_threshold_uses_the_validation_thresholds_on_test():
    model, train, val, config = _tiny_head_problem()
    test = TensorDataset(val.tensors[0][:9] * 0.5, val.tensors[1][:9])
    plain = tlkit.fit_head_with_remedy(config, model, train, val, "none", test_features=test)
    arm = tlkit.imbalance.fitted_posthoc_arm({0: plain}, lambda run: tlkit.imbalance.per_class_threshold(run, [30, 8, 3]))
    adjusted = arm(0)
    thresholds = tlkit.imbalance.f1_thresholds(*plain.predictions["val"])
    assert adjusted.name == "threshold_per_class"
    assert torch.allclose(adjusted.predictions["test"][0], tlkit.imbalance.apply_thresholds(plain.predictions["test"][0], thresholds))
    assert adjusted.metrics["test_acc"] == pytest.approx((adjusted.predictions["test"][0].argmax(1) == test.tensors[1]).float().mean().item())
    assert adjusted.metrics["train_loss"] == plain.metrics["train_loss"]
    with pytest.raises(KeyError, match="No plain run for seed 1"):
        arm(1)


def test_weight_decay_on_the_remedy_head_keeps_its_training_loss_away_from_zero():
    model, train, val, config = _tiny_head_problem()
    for remedy in ("none", "class_weights", "oversample"):  # 0 is the default optimizer: the same head
        plain = tlkit.fit_head_with_remedy(config, model, train, val, remedy)
        same = tlkit.fit_head_with_remedy(config, model, train, val, remedy, weight_decay=0.0)
        assert torch.equal(same.probs, plain.probs), remedy
    decayed = tlkit.fit_head_with_remedy(config, model, train, val, "none", weight_decay=5.0, test_features=val, name="none_wd")
    decayed_norm = float(model.head.weight.detach().norm())  # the head is trained in place: measure it before the next run
    plain = tlkit.fit_head_with_remedy(config, model, train, val, "none")
    assert decayed.metrics["train_loss"] > plain.metrics["train_loss"] and decayed.name == "none_wd"
    assert decayed.metrics["optimizer_steps"] == plain.metrics["optimizer_steps"]
    assert decayed_norm < float(model.head.weight.detach().norm())
    arm = tlkit.recipes.remedy_arm(config, model, lambda s: train, val, "none", weight_decay=5.0)
    assert torch.allclose(arm(0).probs, decayed.probs)


def test_decoupled_retrains_only_the_classifier_class_balanced(tmp_path, class_folder):
    splits = tlkit.data.image_folder(class_folder, seed=0)
    config = tlkit.RunConfig(image_size=32, batch_size=8, epochs=2, lr=1e-2, seed=0, cache_dir=tmp_path / "cache")
    finetuned, retrained = tlkit.recipes.decoupled(config, splits)
    assert finetuned.name == "top fine-tuned" and retrained.name == "cRT (oversample)"
    pretrained = tlkit.create_model(config.backbone, 3, weights=config.weights)
    state, before = finetuned.model.state_dict(), pretrained.state_dict()
    changed = [name for name in state if not name.startswith("head.") and name in before and not torch.equal(state[name], before[name])]
    assert changed  # the representation was fine-tuned, not only the head
    # the re-trained classifier sits on the same backbone; only its head differs
    after = retrained.model.state_dict()
    assert all(torch.equal(after[name], state[name]) for name in state if not name.startswith("head."))
    assert not torch.equal(after["head.weight"], state["head.weight"])
    # it is fit_head_with_remedy with class-balanced sampling on the fine-tuned features, not plain re-training
    model = tlkit.freeze(finetuned.model)
    transform = tlkit.eval_transform(32, model.normalization)
    features = [tlkit.cached_features(model, tlkit.make_loader(d, transform, 8, shuffle=False), cache_dir=None, progress=False)
                for d in (splits.train, splits.val)]
    balanced = tlkit.fit_head_with_remedy(config, copy.deepcopy(model), *features, "oversample")
    assert torch.allclose(retrained.probs, balanced.probs, atol=1e-5)
    assert not torch.allclose(retrained.probs, tlkit.fit_head_with_remedy(config, copy.deepcopy(model), *features, "none").probs)
    assert set(finetuned.predictions) == {"val"} and finetuned.metrics["balanced_acc"] == tlkit.imbalance.balanced_accuracy(*finetuned.predictions["val"])


def test_plot_class_counts_draws_one_bar_per_class_and_split():
    fig = tlkit.plots.plot_class_counts({"train": {"a": 9, "b": 3}, "val": {"a": 4, "b": 4}}, log=True)
    bars = [p for p in fig.axes[0].patches]
    assert [b.get_height() for b in bars] == [9, 3, 4, 4]


@pytest.mark.notebook
def test_notebook_04_remedies_help_the_rare_classes(tmp_path):
    run = run_notebook(
        NOTEBOOKS / "04_class_imbalance.ipynb", tmp_path,
        {"dataset": "digits", "imbalance_ratio": 20, "epochs": 10, "batch_size": 64, "lr": 0.01, "image_size": 32,
         "remedy": "logit_adjustment", "seeds": [0, 1]},
    )
    assert run.error == "", run.error
    m = run.metrics
    assert m["dataset"] == "digits" and m["remedy"] == "logit_adjustment" and m["imbalance_ratio"] == 20 and m["seeds"] == 2
    # digits has no test split: Lesson.splits carves 20% of each class out first (fixed seed), then validation
    assert m["train_images"] == 379 and m["val_images"] == 288 and m["train_imbalance_ratio"] == pytest.approx(18.5)
    for name in [*tlkit.REMEDIES, "threshold_tuned"]:
        for key in ("val_acc", *tlkit.imbalance.SCORES):
            assert 0.0 <= m[f"{key}_{name}"] <= 1.0 and 0.0 <= m[f"{key}_steep_{name}"] <= 1.0
        if name != "none":  # paired over the seeds: the difference of the means, with its interval around it
            assert m[f"val_{name}_minus_none"] == pytest.approx(m[f"balanced_acc_{name}"] - m["balanced_acc_none"])
            assert m[f"val_{name}_minus_none_low"] <= m[f"val_{name}_minus_none"] <= m[f"val_{name}_minus_none_high"]
    assert isinstance(m["chosen_remedy"], str) and m["chosen_remedy"]  # chosen on validation, scored once on the carved test split
    assert 0.0 <= m["test_balanced_acc_none"] <= 1.0 and 0.0 <= m["test_balanced_acc_logit_adjustment"] <= 1.0
    assert m["balanced_acc"] > 0.5
    assert m["balanced_acc_logit_adjustment"] > m["balanced_acc_none"] + 0.02
    # the post-hoc correction raises the rare classes' recall over plain training, on the same trained heads
    assert m["rarest_class_recall_threshold"] >= m["rarest_class_recall_none"]
    assert m["long_tailed_acc_none"] > m["accuracy_none"]
    assert 0.0 <= m["train_loss_none"] < 1.0
    # the second setting: a steeper tail cut from the first, every remedy on it too, with the same epochs
    assert m["steep_ratio"] == 50 and m["train_images_steep"] < m["train_images"]
    assert m["train_imbalance_ratio_steep"] > 2 * m["train_imbalance_ratio"]
    assert m["optimizer_steps"] == 10 * -(-379 // 64) and m["optimizer_steps_steep"] == 10 * -(-m["train_images_steep"] // 64)
    assert m["balanced_acc_steep_none"] < m["balanced_acc_none"]
    # the threshold's strength is chosen on validation from the grid, per setting (tau = 0 is the plain head)
    for suffix in ("", "_steep"):
        assert m[f"threshold_tau{suffix}"] in (0, 0.5, 1, 1.5, 2, 2.5, 3, 4)
        assert m[f"balanced_acc{suffix}_threshold_tuned"] >= m[f"balanced_acc{suffix}_none"]
    # section 7: the temperature of the plain heads and their calibration error before and after it; section 8: one decoupled run
    for suffix in ("", "_steep"):
        assert m[f"temperature{suffix}"] > 0 and m[f"ece{suffix}_val_scaled"] >= 0 and 0 <= m[f"balanced_acc{suffix}_crt"] <= 1
        assert 0 <= m[f"balanced_acc{suffix}_finetuned"] <= 1 and 0 <= m[f"balanced_acc{suffix}_threshold_calibrated"] <= 1
    for name in ("class_counts", "curves", "comparison", "per_class_recall", "comparison_steep", "per_class_recall_steep",
                 "threshold_tau", "confusion_matrix", "pr_curves"):
        assert (tmp_path / "figures" / "04" / f"{name}.png").stat().st_size > 0
