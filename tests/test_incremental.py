import itertools
import re

import pytest
import torch

import tlkit
from tlkit.incremental import DistillationLoss, expand_head, group_accuracy, with_replay


@pytest.mark.parametrize("init", ["zero", "improbable", "mean"])
def test_expanding_the_head_keeps_old_rows_and_old_logits(init):
    tlkit.set_seed(0)
    model = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 3, weights="imagenet"))
    x = torch.randn(6, 3, 32, 32)
    model.eval()
    before = model(x)
    old_w, old_b = model.head.weight.clone(), model.head.bias.clone()
    expand_head(model, 2, init=init)
    after = model(x)
    assert model.head.out_features == 5
    assert torch.equal(model.head.weight[:3], old_w) and torch.equal(model.head.bias[:3], old_b)
    assert torch.allclose(after[:, :3], before, atol=1e-6)  # same rows; only BLAS summation order differs
    assert model.head.weight.requires_grad


def test_each_head_init_starts_the_new_rows_as_documented():
    tlkit.set_seed(0)
    rows = {}
    for init in tlkit.incremental.HEAD_INITS:
        model = tlkit.create_model("efficientnet_lite0", 3, weights=None)
        with torch.no_grad():
            model.head.bias.copy_(torch.tensor([-4.0, -5.0, -6.0]))  # every old logit negative on zero features
        rows[init] = expand_head(model, 2, init=init).head
    assert torch.count_nonzero(rows["zero"].weight[3:]) == 0 and torch.count_nonzero(rows["zero"].bias[3:]) == 0
    assert torch.count_nonzero(rows["improbable"].weight[3:]) == 0 and torch.equal(rows["improbable"].bias[3:], torch.full((2,), -10.0))
    mean = rows["mean"]
    assert torch.allclose(mean.weight[3:], mean.weight[:3].mean(0).expand(2, -1)) and torch.allclose(mean.bias[3:], torch.full((2,), -5.0))
    features = torch.zeros(1, mean.in_features)
    assert rows["zero"](features).argmax(1).item() >= 3  # logit 0 beats old logits that are all negative
    for init in ("improbable", "mean"):  # never above the largest old logit: every prediction stays an old class
        assert rows[init](features).argmax(1).item() == 0
    default = tlkit.create_model("efficientnet_lite0", 3, weights=None)
    assert torch.equal(expand_head(default, 2).head.weight[3:], default.head.weight[:3].mean(0).expand(2, -1))  # "mean"
    with pytest.raises(ValueError, match="init must be one of"):
        expand_head(tlkit.create_model("efficientnet_lite0", 3, weights=None), 1, init="random")


def test_expanding_needs_a_positive_count():
    model = tlkit.create_model("efficientnet_lite0", 3, weights=None)
    with pytest.raises(ValueError, match="num_new"):
        expand_head(model, 0)


def test_class_subsets_relabel_and_append_in_order():
    splits = tlkit.load_dataset("digits", seed=0)
    old = splits.train.select_classes(["0", "1", "2"])
    assert set(old.targets) == {0, 1, 2} and old.classes == ["0", "1", "2"]
    new = splits.train.select_classes(["3"])
    assert set(new.targets) == {0}
    everything = ["0", "1", "2", "3"]
    assert set(new.with_classes(everything).targets) == {3}
    mixed = with_replay(new.with_classes(everything), old.with_classes(everything), per_class=5, seed=0)
    labels = [mixed[i][1] for i in range(len(mixed))]
    assert labels.count(3) == len(new) and labels.count(0) == labels.count(1) == labels.count(2) == 5
    with pytest.raises(ValueError, match="not in the dataset"):
        splits.train.select_classes(["ten"])


def test_distillation_is_zero_when_student_matches_teacher_and_grows_otherwise():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    student = torch.nn.Linear(4, 5)
    with torch.no_grad():
        student.weight[:3], student.bias[:3] = teacher.weight, teacher.bias
    loss = DistillationLoss(student, teacher, temperature=2.0, alpha=1.0)
    x, y = torch.randn(8, 4), torch.randint(0, 5, (8,))
    logits = student(x)
    assert loss(logits, y).item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), abs=1e-6)
    with torch.no_grad():
        student.weight[0] += 1.0  # changes the old classes relative to each other
    logits = student(x)
    assert loss(logits, y).item() > torch.nn.functional.cross_entropy(logits, y).item() + 1e-3
    loss.remove()


@pytest.mark.notebook
def test_notebook_05_reports_forgetting_for_every_run_and_the_joint_upper_bound(tmp_path):
    from pathlib import Path

    from tlkit.course import run_notebook

    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "05_adding_samples.ipynb"
    run = run_notebook(notebook, tmp_path, {"samples_per_class": 4, "new_samples_per_class": 4, "replay_per_class": 2,
                                            "epochs": 2, "continue_epochs": 2, "steps_per_epoch": 2, "patience": 1,
                                            "image_size": 32, "seeds": [0, 1]})
    assert run.error == "", run.error
    m = run.metrics
    assert m["old_classes"] == 7 and m["new_classes"] == 3 and m["seeds"] == 2 and m["max_steps"] == 4
    fixes = ("replay_prior_correction", "replay_weight_aligning", "nearest_class_mean_no_old_images")
    for key in ("naive_fine_tuning", "replay", "head_only_replay", "lwf_distillation", "joint_retraining_upper_bound", *fixes):
        assert 0.0 <= m[f"old_acc_{key}"] <= 1.0 and 0.0 <= m[f"new_acc_{key}"] <= 1.0 and m[f"overall_acc_{key}_std"] >= 0
        assert 0.0 <= m[f"old_acc_task_aware_{key}"] <= 1.0 and m[f"old_acc_task_aware_{key}_std"] >= 0
        assert m[f"old_acc_task_aware_{key}"] >= m[f"old_acc_{key}"]  # among the old classes only, an old image is never taken for a new class
        assert m[f"forgetting_{key}"] == pytest.approx(m["old_acc_before"] - m[f"old_acc_task_aware_{key}"])  # both 7-way
        assert m[f"forgetting_vs_joint_{key}"] == pytest.approx(m["old_acc_joint_retraining_upper_bound"] - m[f"old_acc_{key}"])  # both 10-way
        assert m[f"forgetting_vs_joint_{key}_std"] >= 0
        if key not in fixes[2:]:
            assert 2 <= m[f"steps_{key}"] <= 4  # one cap: at most 2 epochs of 2 steps; early stopping may end a run after one
    assert m["steps_nearest_class_mean_no_old_images"] == 0 and m["steps_replay_weight_aligning"] == m["steps_replay"]  # the fixes train nothing
    assert m["forgetting_vs_joint_joint_retraining_upper_bound"] == 0 and "stage3_overall_replay_minus_joint_retraining_upper_bound_low" in m
    assert m["head_init"] in tlkit.incremental.HEAD_INITS
    for init in tlkit.incremental.HEAD_INITS:
        assert 0.0 <= m[f"head_init_val_acc_replay_{init}"] <= 1.0
    assert {"val_acc_dropout_0_5", "stage2_val_acc_batch_8_same_images"} <= set(m)
    for s in (0, 1):
        saved = tlkit.read_checkpoint(tmp_path / f"05_first_model_seed{s}.pt")
        assert saved.classes == tlkit.load_dataset("clothing").classes[:7] and saved.optimizer is not None and saved.image_size == 32
    updated, saved = tlkit.model_from_checkpoint(tmp_path / "05_updated_model.pt")
    assert saved.classes == tlkit.load_dataset("clothing").classes and m["saved_model_reloads_equal"] == 1 and saved.image_size == 32
    assert len(list((tmp_path / "05_new_images").glob("photo_*.jpg"))) == 20 and 0.0 <= m["folder_acc"] <= 1.0
    for group, stage, setting in itertools.product(("old", "new"), ("", "classes_"), ("fresh_lr1", "fresh_lr0.3", "resumed_lr0.3", "resumed_lr0.1")):
        assert 0.0 <= m[f"{group}_acc_{stage}{setting}"] <= 1.0 and 0.0 <= m[f"{group}_acc_{stage}{setting}_fixed"] <= 1.0  # the trade-off
        assert m[f"{group}_acc_{stage}{setting}_std"] >= 0 and m[f"{group}_acc_{stage}{setting}_fixed_std"] >= 0
    for figure in ("stage2_forgetting", "stage3_forgetting", "predictions", "stability_plasticity"):
        assert (tmp_path / "figures" / "05" / f"{figure}.png").stat().st_size > 0


def test_the_accuracy_tracker_scores_fits_validation_pass_as_group_accuracy_does():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    y = x[:, :4].argmax(1)  # 4 classes
    data = torch.utils.data.TensorDataset(x, y)
    train, val = tlkit.make_loader(data, None, 8, shuffle=True, seed=0), tlkit.make_loader(data, None, 16, shuffle=False)
    groups = {"old": range(2), "new": range(2, 4)}
    tracker, evaluated = tlkit.incremental.AccuracyTracker(groups), []
    tlkit.set_seed(0)
    tlkit.fit(torch.nn.Linear(6, 4), train, val, epochs=4, lr=0.05, progress=False,
              callbacks=[tracker, lambda state: evaluated.append(group_accuracy(state.model, val, groups))])
    for name in groups:  # the same numbers as a second pass over the validation loader would give
        assert tracker.acc[name] == [row[name] for row in evaluated]
    assert len(set(tracker.acc["old"])) > 1  # the numbers change as the model trains


def _first_checkpoint(tmp_path, class_folder):
    """A 2-class model (last block + head trained one epoch through the prefix cache) saved as a checkpoint."""
    splits = tlkit.data.image_folder(class_folder, seed=0)
    old = splits.train.select_classes(splits.classes[:2])
    tlkit.set_seed(0)
    model = tlkit.create_model("efficientnet_lite0", 2, "imagenet")
    tlkit.freeze(model, up_to="stage7")
    transform = tlkit.eval_transform(32, model.normalization)
    cache = tlkit.PrefixCache(model, {"train": tlkit.make_loader(old, transform, 8, shuffle=False),
                                      "val": tlkit.make_loader(splits.val.select_classes(splits.classes[:2]), transform, 8, shuffle=False)},
                              progress=False)
    path = tmp_path / "first.pt"
    tlkit.fit(cache.suffix, cache.loader("train", 8, shuffle=True), cache.loader("val", 8, shuffle=False), epochs=1,
              callbacks=[tlkit.SaveCheckpoint(path, splits.classes[:2])], progress=False)
    return splits, model, transform, path


def test_a_checkpoint_written_through_the_prefix_cache_holds_the_whole_model(tmp_path, class_folder):
    _, model, _, path = _first_checkpoint(tmp_path, class_folder)
    reloaded, saved = tlkit.model_from_checkpoint(path)
    assert saved.backbone == "efficientnet_lite0" and saved.weights == "imagenet"
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(reloaded.eval()(x), model.eval()(x), atol=1e-5)


@pytest.mark.parametrize("kw", [dict(trainable=["top", "head"]), dict(trainable=["top", "head"], distill=True), dict(trainable=["head"])])
def test_continue_training_with_the_prefix_cache_matches_it_without(tmp_path, class_folder, kw):
    splits, _, transform, path = _first_checkpoint(tmp_path, class_folder)
    classes = splits.classes
    groups = {"old": range(2), "new": range(2, 3)}
    train = splits.train.select_classes(classes[2:]).with_classes(classes)
    config = tlkit.RunConfig(epochs=2, lr=1e-3, batch_size=8, seed=0)
    args = dict(classes=classes, transform=transform, test_set=splits.val, **kw)
    plain = tlkit.continue_training(config, path, train, splits.val, groups, **args)
    cached_config = config.replace(cache_dir=tmp_path / "cache")
    cached = tlkit.continue_training(cached_config, path, train, splits.val, groups, prefix_cache=True, **args)
    assert plain.prefix_cache is None and cached.prefix_cache.boundaries == [kw["trainable"][0]]
    assert cached.history.train_loss == pytest.approx(plain.history.train_loss, abs=1e-4)
    for group in groups:
        assert cached.tracked[group] == pytest.approx(plain.tracked[group], abs=1e-6)
        assert cached.metrics[f"test_acc/{group}"] == pytest.approx(plain.metrics[f"test_acc/{group}"], abs=1e-6)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(cached.model.eval()(x), plain.model.eval()(x), atol=1e-4)


def _digits_with_test():
    import dataclasses

    splits = tlkit.load_dataset("digits", seed=0)
    return dataclasses.replace(splits, test=splits.val)  # digits has no test split: its val stands in


def test_the_arrivals_are_disjoint_per_seed_and_labelled_in_their_stage_class_list():
    arrivals = tlkit.incremental.split_by_arrival(_digits_with_test(), old_classes=7, samples_per_class=5, new_sample_classes=3,
                                                  new_samples_per_class=4, replay_per_class=2)
    assert arrivals.old_names == [str(k) for k in range(7)] and arrivals.new_names == ["7", "8", "9"]
    first, more, new = arrivals.first(1), arrivals.more(1), arrivals.new(1)
    assert tlkit.class_counts(first) == dict.fromkeys(arrivals.old_names, 5)
    assert tlkit.class_counts(more) == {**dict.fromkeys(arrivals.old_names, 0), "0": 4, "1": 4, "2": 4}
    pixels = lambda images: [images[i][0].tobytes() for i in range(len(images))]
    assert not set(pixels(more)) & set(pixels(first))  # new samples are images stage 1 did not see
    assert new.classes == arrivals.all_names and set(new.targets) == {7, 8, 9} and len(new) == 15
    assert pixels(arrivals.first(1)) == pixels(first) and pixels(arrivals.first(2)) != pixels(first)  # one draw per seed
    assert len(arrivals.stage2_sets(1)["new data + replay"]) == len(more) + 7 * 2
    sets = arrivals.stage3_sets(1)
    assert len(sets["replay"]) == 15 + 7 * 2 and len(sets["joint"]) == 15 + 7 * 5
    assert arrivals.val_old.classes == arrivals.old_names and arrivals.test_all.classes == arrivals.all_names


@pytest.mark.parametrize("change, message", [
    (dict(old_classes=10), "old_classes=10 leaves no new classes: 'digits' has 10 classes. Set old_classes below 10."),
    (dict(new_sample_classes=8), "new_sample_classes (8) must be at most old_classes (7)"),
    (dict(test=None), "'digits' has no test split; notebook 05 scores its methods once on one."),
])
def test_an_arrival_split_that_cannot_be_made_is_refused_by_name(change, message):
    import dataclasses

    splits = _digits_with_test()
    if "test" in change:
        splits = dataclasses.replace(splits, test=None)
    options = {"old_classes": 7, "samples_per_class": 5, "new_sample_classes": 3, "new_samples_per_class": 4, "replay_per_class": 2}
    options.update({k: v for k, v in change.items() if k != "test"})
    with pytest.raises(ValueError, match=re.escape(message)):
        tlkit.incremental.split_by_arrival(splits, **options)


def test_the_steps_sentence_states_the_cap_the_steps_taken_and_the_runs_stopped_early():
    runs = {"a": {0: 40, 1: 60}, "b": {0: 150, 1: 150}, "c": {0: 600, 1: 200}}
    comparison = tlkit.compare_arms({arm: (lambda s, arm=arm: {"val_acc": 0.5, "steps_run": runs[arm][s]}) for arm in runs}, [0, 1])
    sentence = tlkit.incremental.steps_sentence(comparison, 150, cap_for={"c": 600})
    assert sentence == ("Cap: 150 optimizer steps per run, 600 for c. Steps run, mean (min to max) over seeds: a 50 (40 to 60), b 150 (150 to 150), "
                        "c 400 (200 to 600). Early stopping ended 3 of 6 runs before their cap.")
    assert "b 150" not in tlkit.incremental.steps_sentence(comparison, 150, arms=["a"])
    without = tlkit.compare_arms({"before": lambda s: {"val_acc": 0.5}}, [0])
    with pytest.raises(KeyError, match="No 'steps_run' in the runs of \\['before'\\]"):
        tlkit.incremental.steps_sentence(without, 150)


def test_write_image_folder_replaces_the_old_photos_and_returns_each_files_class(tmp_path):
    splits = tlkit.load_dataset("digits", seed=0)
    (tmp_path / "photo_99.jpg").write_bytes(b"stale")
    (tmp_path / "notes.txt").write_text("kept")
    truth = tlkit.incremental.write_image_folder(splits.val.select_classes(["0", "1"]), tmp_path, per_class=2, seed=0)
    assert sorted(truth) == [f"photo_{k:02d}.jpg" for k in range(4)] and sorted(truth.values()) == ["0", "0", "1", "1"]
    assert sorted(p.name for p in tmp_path.glob("photo_*.jpg")) == sorted(truth) and (tmp_path / "notes.txt").exists()


def test_the_first_model_saves_its_checkpoint_with_classes_optimizer_and_image_size(tmp_path, class_folder):
    splits = tlkit.data.image_folder(class_folder, seed=0)
    config = tlkit.RunConfig(epochs=2, lr=1e-3, batch_size=8, image_size=32, cache_dir=tmp_path / "cache")
    transform = tlkit.eval_transform(32, tlkit.create_model("efficientnet_lite0", 2, weights=None).normalization)
    path = tmp_path / "first.pt"
    run = tlkit.recipes.train_first_model(config, splits.train.select_classes(splits.classes[:2]), splits.val.select_classes(splits.classes[:2]), path,
                                          classes=splits.classes[:2], trainable=["top", "head"], transform=transform)
    saved = tlkit.read_checkpoint(path)
    assert saved.image_size == 32 and saved.classes == splits.classes[:2] and saved.epoch == 2 and saved.optimizer is not None
    assert len(run.history) == 2 and run.val_acc == run.history.val_acc[-1] and run.prefix_cache is not None
    reloaded, _ = tlkit.model_from_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(reloaded.eval()(x), run.model.eval()(x), atol=1e-5)


def test_a_continuation_arm_is_continue_training_from_that_seeds_checkpoint_and_counts_its_steps(tmp_path, class_folder):
    splits, _, transform, path = _first_checkpoint(tmp_path, class_folder)
    classes, groups = splits.classes, {"old": range(2), "new": range(2, 3)}
    train = splits.train.select_classes(classes[2:]).with_classes(classes)
    config = tlkit.RunConfig(epochs=2, lr=1e-3, batch_size=8, seed=0)
    options = dict(classes=classes, transform=transform, trainable=["head"], early_stopping_patience=None)
    continuation = tlkit.recipes.Continuation(config, {3: path}, lambda s: {"new": train}, splits.val, groups, **options)
    run = continuation.arm("new", steps_per_epoch=3)(3)
    direct = tlkit.continue_training(config.replace(seed=3), path, train, splits.val, groups, steps_per_epoch=3, **options)
    assert run.metrics["steps_run"] == 2 * 3 and run.history.train_loss == pytest.approx(direct.history.train_loss)
    passes = continuation.arm("new")(3)  # an epoch is one pass: ceil(images / batch) steps
    assert passes.metrics["steps_run"] == 2 * -(-len(train) // 8)
    assert continuation.with_options(head_init="zero").arm("new")(3).model.head.bias[2].item() != passes.model.head.bias[2].item()
    with pytest.raises(KeyError, match="No checkpoint for seed 0: the checkpoints are for seeds \\[3\\]"):
        continuation.arm("new")(0)
    with pytest.raises(KeyError, match="No training set 'old'; seed 3's sets are \\['new'\\]"):
        continuation.arm("old")(3)


def test_checkpoint_accuracy_scores_the_saved_model_with_or_without_the_prefix_cache(tmp_path, class_folder):
    splits, _, transform, path = _first_checkpoint(tmp_path, class_folder)
    val, groups = splits.val.select_classes(splits.classes[:2]), {"first": [0], "both": [0, 1]}
    model, _ = tlkit.model_from_checkpoint(path)
    expected = group_accuracy(model, tlkit.make_loader(val, transform, 8, shuffle=False), groups)
    plain = tlkit.incremental.checkpoint_accuracy(path, val, groups, trainable=["top", "head"], transform=transform)
    cached = tlkit.incremental.checkpoint_accuracy(path, val, groups, trainable=["top", "head"], transform=transform, cache_dir=tmp_path / "cache")
    assert plain == pytest.approx(expected) and cached == pytest.approx(expected, abs=1e-6)


def test_weight_aligning_keeps_the_old_logits_and_equalises_the_mean_row_norms():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.head = torch.nn.Linear(6, 5)
    with torch.no_grad():
        model.head.weight[3:] *= 4.0  # new rows longer than the old, as after training on mostly new images
    x = torch.randn(8, 6)
    aligned = tlkit.incremental.weight_aligned(model, 3)
    norms = aligned.head.weight.norm(dim=1)
    assert norms[3:].mean().item() == pytest.approx(norms[:3].mean().item(), rel=1e-6)
    assert torch.equal(aligned.head(x)[:, :3], model.head(x)[:, :3]) and torch.equal(aligned.head.bias, model.head.bias)
    ratio = aligned.head.weight[3:] / model.head.weight[3:]  # one factor for every new row
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio))
    with pytest.raises(ValueError, match="num_old must be between 1 and 4"):
        tlkit.incremental.weight_aligned(model, 5)


def test_the_nearest_mean_head_predicts_the_class_of_the_nearest_mean():
    features = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [12.0, 0.0], [0.0, 10.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])  # means (0, 1), (11, 0), (0, 10)
    head = tlkit.features.nearest_mean_head(features, labels, 3)
    queries = torch.tensor([[1.0, 1.0], [8.0, 1.0], [1.0, 7.0], [5.0, 5.0]])
    means = torch.tensor([[0.0, 1.0], [11.0, 0.0], [0.0, 10.0]])
    assert head(queries).argmax(1).tolist() == [0, 1, 2, 0] == torch.cdist(queries, means).argmin(1).tolist()
    with pytest.raises(ValueError, match="Every class 0..3 needs at least one feature vector"):
        tlkit.features.nearest_mean_head(features, labels, 4)


def test_the_prior_correction_predicts_as_notebook_04s_post_hoc_rule():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.head = torch.nn.Linear(4, 5)
    counts = [10, 10, 10, 20, 20]
    x = torch.randn(200, 4)
    fixed = tlkit.incremental.prior_corrected(model, counts)
    expected = tlkit.imbalance.adjust_probabilities(model.head(x).softmax(1), counts)
    assert torch.allclose(fixed.head(x).softmax(1), expected, atol=1e-5)
    assert not torch.equal(fixed.head(x).argmax(1), model.head(x).argmax(1))  # the correction changes some predictions
    with pytest.raises(ValueError, match="one training count per class"):
        tlkit.incremental.prior_corrected(model, counts[:4])


def test_class_counts_of_a_replay_set_count_both_parts():
    arrivals = tlkit.incremental.split_by_arrival(_digits_with_test(), old_classes=7, samples_per_class=5, new_sample_classes=3,
                                                  new_samples_per_class=4, replay_per_class=2)
    assert tlkit.incremental.class_counts_of(arrivals.stage3_sets(0)["replay"], 10) == [2] * 7 + [5] * 3
    assert tlkit.incremental.class_counts_of(arrivals.first(0), 10) == [5] * 7 + [0] * 3


class _FixedLogits(torch.nn.Module):
    """The same logits for every image."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_the_scorer_reads_the_old_classes_ten_way_and_task_aware():
    from tlkit.transforms import IMAGENET_NORM

    arrivals = tlkit.incremental.split_by_arrival(_digits_with_test(), old_classes=7, samples_per_class=5, new_sample_classes=3,
                                                  new_samples_per_class=4, replay_per_class=2)
    score = tlkit.incremental.ClassIncrementalScorer(arrivals, tlkit.eval_transform(8, IMAGENET_NORM))
    model = _FixedLogits([0.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0])  # always "8"; among the old classes always "1"
    scores = score.scores(model)
    labels = torch.as_tensor(arrivals.test_all.targets)
    assert scores["test_acc/old classes"] == 0.0 and scores["test_acc/new classes"] == pytest.approx((labels == 8).sum().item() / (labels >= 7).sum().item())
    assert scores["old acc task-aware"] == pytest.approx((labels == 1).sum().item() / (labels < 7).sum().item()) == score.task_aware(model)
    assert scores["val_acc"] == pytest.approx((torch.as_tensor(arrivals.val_all.targets) == 8).float().mean().item())


@pytest.mark.notebook
def test_notebook_05_runs_on_a_plain_folder_of_class_folders_with_a_carved_test_split(tmp_path):
    from pathlib import Path

    from conftest import write_images

    from tlkit.course import run_notebook

    colors = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "grey": (128, 128, 128)}
    for k, (name, color) in enumerate(colors.items()):
        write_images(tmp_path / "flat" / name, 16, color, seed=k)
    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "05_adding_samples.ipynb"
    run = run_notebook(notebook, tmp_path / "run", {"dataset": str(tmp_path / "flat"), "old_classes": 2, "new_sample_classes": 1,
                                                    "samples_per_class": 3, "new_samples_per_class": 2, "replay_per_class": 1, "epochs": 1,
                                                    "continue_epochs": 2, "steps_per_epoch": 1, "patience": 1, "image_size": 32, "seeds": [0, 1]})
    assert run.error == "", run.error
    assert run.metrics["dataset"] == "flat" and run.metrics["old_classes"] == 2 and run.metrics["new_classes"] == 2
    assert 0.0 <= run.metrics["overall_acc_replay"] <= 1.0


def test_a_grown_optimizer_state_resumes_the_old_rows_and_starts_the_new_ones_at_zero():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.1)
    head(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    grown = torch.nn.Linear(4, 3)
    state = tlkit.incremental.grown_optimizer_state(optimizer.state_dict(), list(grown.parameters()))
    resumed = torch.optim.AdamW(grown.parameters(), lr=0.1)
    resumed.load_state_dict(state)
    for old, new in zip(optimizer.state.values(), resumed.state.values()):
        assert torch.equal(new["exp_avg"][:2], old["exp_avg"]) and not new["exp_avg"][2:].any() and not new["exp_avg_sq"][2:].any()
        assert new["step"] == old["step"]
    assert optimizer.state_dict()["state"][0]["exp_avg"].shape == (2, 4)  # the saved state itself is left as it was
    with pytest.raises(ValueError, match="holds 2 parameters but 1 are trainable"):
        tlkit.incremental.grown_optimizer_state(optimizer.state_dict(), [grown.weight])


def test_early_stopped_epoch_stops_and_keeps_as_early_stopping_and_restore_best_do():
    assert tlkit.incremental.early_stopped_epoch([0.5, 0.6, 0.6, 0.55, 0.7], patience=2) == (4, 1)
    assert tlkit.incremental.early_stopped_epoch([0.5, 0.6, 0.6, 0.55, 0.7], patience=3) == (5, 4)
    assert tlkit.incremental.early_stopped_epoch([0.1, 0.2, 0.3], patience=1) == (3, 2)


def test_the_tradeoff_arms_read_one_full_run_at_its_end_and_where_early_stopping_keeps(tmp_path, class_folder):
    splits, _, transform, path = _first_checkpoint(tmp_path, class_folder)
    classes, groups = splits.classes, {"old": range(2), "new": range(2, 3)}
    train = with_replay(splits.train.select_classes(classes[2:]).with_classes(classes), splits.train.select_classes(classes[:2]).with_classes(classes), 2, 0)
    config = tlkit.RunConfig(epochs=4, lr=1e-2, batch_size=8, seed=0)
    options = dict(classes=classes, transform=transform, trainable=["top", "head"], steps_per_epoch=2, monitor="val_acc")
    continuation = tlkit.recipes.Continuation(config, {0: path, 1: path}, lambda s: {"new": train}, splits.val, groups, **options)
    arms = tlkit.recipes.tradeoff_arms(continuation, "new", ("old", "new"), lr=1e-2, patience=1)
    assert list(arms) == ["fresh, lr x1", "fresh, lr x0.3", "fresh, lr x0.1", "resumed, lr x1", "resumed, lr x0.3", "resumed, lr x0.1"]
    measured = arms["resumed, lr x0.3"](0)  # the head grew from 2 to 3 classes, and the optimizer state with it
    stopped = tlkit.continue_training(config.replace(lr=3e-3), path, train, splits.val, groups, resume_optimizer=True, early_stopping_patience=1,
                                      restore_best=True, **options)
    kept = stopped.history.val_acc.index(max(stopped.history.val_acc))
    assert measured["steps (early stopping)"] == 2 * len(stopped.history) and measured["kept epoch (early stopping)"] == kept + 1
    assert measured["old acc (early stopping)"] == pytest.approx(stopped.tracked["old"][kept], abs=1e-6)
    full = tlkit.continue_training(config.replace(lr=3e-3), path, train, splits.val, groups, resume_optimizer=True, early_stopping_patience=None, **options)
    assert measured["new acc (fixed steps)"] == pytest.approx(full.tracked["new"][-1], abs=1e-6)
    comparison = tlkit.compare_arms({a: arms[a] for a in ("fresh, lr x0.3", "resumed, lr x0.3", "resumed, lr x0.1", "resumed, lr x1")}, [0, 1])
    with pytest.raises(KeyError):
        tlkit.incremental.tradeoff_results(comparison)  # not every setting ran
    results = tlkit.incremental.tradeoff_results(comparison, "classes_", factors=(0.3,))
    keys = {f"{g}_acc_classes_{o}_lr0.3{b}{s}" for g in ("old", "new") for o in ("fresh", "resumed") for b in ("", "_fixed") for s in ("", "_std")}
    assert set(results) == keys
    assert results["old_acc_classes_resumed_lr0.3"] == pytest.approx(comparison.summary().loc["resumed, lr x0.3", "old acc (early stopping)"])
    sentences = tlkit.incremental.tradeoff_sentences(comparison)
    assert len(sentences) == 10 and "resumed, lr x0.1" in sentences[2] and "(early stopping)" in sentences[-3]
    assert "resumed, lr x0.3, early stopping" in sentences[-1] and "resumed, lr x0.3, fixed steps" in sentences[-1]
    figure = tlkit.plots.plot_stability_plasticity({"stage 3": comparison.summary()}, title="trade-off")
    assert len(figure.axes) == 1 and len(figure.axes[0].get_legend().get_texts()) == 8
