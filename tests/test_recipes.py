"""The recipe layer: RunConfig (from a notebook's parameters, checked), one RunResult from every recipe, same seed same run."""

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import TensorDataset

import tlkit

TINY = dict(image_size=32, batch_size=8, epochs=1, lr=1e-3, seed=0)


# --- RunConfig ----------------------------------------------------------------------------------------


def test_from_parameters_picks_the_config_fields_and_ignores_every_other_name():
    notebook_globals = {
        "dataset": "clothing", "backbone": "efficientnet_lite0", "weights": None, "image_size": 64, "batch_size": 16,
        "epochs": 3, "lr": 1e-2, "seed": 4, "seeds": [0, 1], "device": "auto", "progress": True, "augment": "basic",
        "tlkit": tlkit, "_": None,
    }
    config = tlkit.RunConfig.from_parameters(notebook_globals, device="cpu", cache_dir=Path("cache"))
    assert config == tlkit.RunConfig(weights=None, image_size=64, batch_size=16, epochs=3, lr=1e-2, seed=4, device="cpu",
                                     progress=True, cache_dir=Path("cache"))
    assert not hasattr(config, "dataset") and not hasattr(config, "seeds")
    # a field the parameters lack keeps its default; overrides win over the parameters
    assert tlkit.RunConfig.from_parameters({"seed": 2}, seed=5) == tlkit.RunConfig(seed=5)
    assert tlkit.RunConfig.from_parameters({}) == tlkit.RunConfig()


def test_from_parameters_resolves_device_auto_and_refuses_unknown_overrides():
    assert tlkit.RunConfig.from_parameters({"device": "auto"}).device == tlkit.get_device("auto")
    with pytest.raises(TypeError, match="no field 'samples_per_class'"):
        tlkit.RunConfig.from_parameters({}, samples_per_class=5)


def test_replace_changes_one_field_and_the_config_stays_frozen():
    config = tlkit.RunConfig(seed=0)
    assert config.replace(seed=3).seed == 3 and config.seed == 0
    assert config.replace(lr=0.1) == tlkit.RunConfig(lr=0.1)
    with pytest.raises(AttributeError):
        config.seed = 1


@pytest.mark.parametrize("field, value, message", [
    ("lr", -1e-3, "lr must be a positive number"),
    ("lr", None, "lr must be a number"),
    ("epochs", 0, "epochs must be a whole number of at least 1"),
    ("batch_size", 2.5, "batch_size must be a whole number"),
    ("image_size", 16, "image_size must be at least 32"),
    ("image_size", True, "image_size must be a whole number"),
    ("seed", -1, "seed must be a whole number between 0"),
    ("backbone", "", "backbone must be a non-empty text"),
    ("weights", 3, "weights must be a non-empty text"),
    ("device", "gpu", "device must be a device such as 'cpu'"),
    ("progress", "maybe", "progress must be True or False"),
    ("cache_dir", "", "cache_dir must be a folder path or None"),
])
def test_bad_values_fail_with_the_field_and_the_fix(field, value, message):
    with pytest.raises(ValueError, match=message) as caught:
        tlkit.RunConfig(**{field: value})
    assert f"config.replace({field}=...)" in str(caught.value)
    with pytest.raises(ValueError, match=message):
        tlkit.RunConfig.from_parameters({field: value})
    with pytest.raises(ValueError, match=message):
        tlkit.RunConfig().replace(**{field: value})


# --- RunResult ----------------------------------------------------------------------------------------


def _history(val_acc):
    history = tlkit.History()
    for epoch, acc in enumerate(val_acc, start=1):
        history.append(epoch=epoch, train_loss=1.0, train_acc=0.5, val_loss=1.0, val_acc=acc, lr=1e-3, epoch_time=1.0)
    return history


def test_run_result_always_has_val_acc_and_reads_groups_and_predictions():
    result = tlkit.RunResult("r", torch.nn.Linear(2, 2), _history([0.5, 0.75]), 1.25, 6,
                             metrics={"test_acc/old": 0.9, "test_acc/new": 0.4})
    assert result.metrics["val_acc"] == result.val_acc == 0.75
    assert result.by_group("test_acc") == {"old": 0.9, "new": 0.4}
    assert result.row() == {"run": "r", "trainable params": 6, "train seconds": 1.2, "val acc": 0.75}
    with pytest.raises(AttributeError, match="no validation predictions"):
        _ = result.predicted
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    result.predictions["val"] = (probs, torch.tensor([0, 0]))
    assert result.predicted.tolist() == [0, 1] and torch.equal(result.probs, probs) and result.labels.tolist() == [0, 0]
    assert math.isnan(tlkit.RunResult("empty", torch.nn.Linear(2, 2), tlkit.History(), 0.0, 0).val_acc)


# --- every recipe -------------------------------------------------------------------------------------


@pytest.fixture
def splits(class_folder):
    return tlkit.data.image_folder(class_folder, seed=0)


def _is_run_result(result, name=None):
    assert type(result) is tlkit.RunResult
    assert 0.0 <= result.metrics["val_acc"] <= 1.0 and result.val_acc == result.history.val_acc[-1]
    assert result.seconds > 0 and result.trainable_params > 0
    if name is not None:
        assert result.name == name


def test_image_recipes_return_a_run_result(tmp_path, splits):
    config = tlkit.RunConfig(**TINY, cache_dir=tmp_path / "cache")
    _is_run_result(tlkit.linear_probe(config, splits), "imagenet frozen + head")
    _is_run_result(tlkit.train_all(config.replace(weights=None), splits, name="scratch"), "scratch")
    seen = []
    result = tlkit.run_strategy(config, splits, "last_n_blocks", n_blocks=1, prefix_cache=True, callbacks=[seen.append])
    _is_run_result(result, "last_n_blocks")
    assert result.prefix_cache is not None and len(seen) == 1
    _is_run_result(tlkit.fine_tune_augmented(config, splits, augment="basic", on_device=False), "basic")
    scores = tlkit.evaluate_on(result.model, splits.val, config)
    assert set(scores) >= {"loss", "acc"} and 0.0 <= scores["acc"] <= 1.0


def test_fit_head_with_remedy_returns_a_run_result_with_val_and_test_predictions():
    generator = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 12 + [1] * 4 + [2] * 2)
    features = TensorDataset(torch.eye(3, 8)[y] * 4 + torch.randn(len(y), 8, generator=generator), y)
    model = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 3, weights=None))
    model.head = torch.nn.Linear(8, 3)
    result = tlkit.fit_head_with_remedy(tlkit.RunConfig(**{**TINY, "epochs": 2}), model, features, features, "threshold",
                                        test_features=features)
    _is_run_result(result, "threshold")
    assert result.trainable_params == 8 * 3 + 3
    assert set(result.predictions) == {"val", "test"} and result.probs.shape == (18, 3) and torch.equal(result.labels, y)
    test_probs, test_labels = result.predictions["test"]
    assert result.metrics["test_acc"] == (test_probs.argmax(1) == test_labels).float().mean().item()


def test_continue_training_returns_a_run_result_with_test_accuracy_per_group(tmp_path, splits):
    path, transform = _first_model(tmp_path, splits)
    groups = {"old": range(2), "new": range(2, 3)}
    new = splits.train.select_classes(splits.classes[2:]).with_classes(splits.classes)
    result = tlkit.continue_training(tlkit.RunConfig(**{**TINY, "epochs": 2}), path, new, splits.val, groups,
                                     classes=splits.classes, trainable=["top", "head"], transform=transform, test_set=splits.val)
    _is_run_result(result, "continued from first.pt")
    assert set(result.metrics) == {"val_acc", "test_acc/old", "test_acc/new"}
    assert set(result.by_group("test_acc")) == set(groups)
    assert {g: len(v) for g, v in result.tracked.items()} == {"old": len(result.history), "new": len(result.history)}


def test_the_same_config_and_seed_give_the_same_run_twice(splits):
    config = tlkit.RunConfig(**{**TINY, "epochs": 2})
    first, second = (tlkit.run_strategy(config, splits, "last_n_blocks", n_blocks=1) for _ in range(2))
    assert first.val_acc == second.val_acc
    assert first.history.train_loss == second.history.train_loss and first.history.val_loss == second.history.val_loss
    probes = [tlkit.linear_probe(config, splits) for _ in range(2)]
    assert probes[0].val_acc == probes[1].val_acc and probes[0].history.train_loss == probes[1].history.train_loss


def test_the_lesson_modules_do_not_import_the_recipes():
    root = Path(tlkit.__file__).parent
    for module in ("finetune", "augment", "imbalance", "incremental"):
        tree = ast.parse((root / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert "recipes" not in imported and not any(name.endswith(".recipes") for name in imported), module


def _first_model(tmp_path, splits):
    old = splits.train.select_classes(splits.classes[:2])
    tlkit.set_seed(0)
    model = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 2, "imagenet"), up_to="stage7")
    transform = tlkit.eval_transform(32, model.normalization)
    path = tmp_path / "first.pt"
    tlkit.fit(model, tlkit.make_loader(old, transform, 8, shuffle=True, seed=0),
              tlkit.make_loader(splits.val.select_classes(splits.classes[:2]), transform, 8, shuffle=False),
              epochs=1, callbacks=[tlkit.SaveCheckpoint(path, splits.classes[:2])], progress=False)
    return path, transform


def test_steps_per_epoch_gives_every_train_set_the_same_optimizer_steps(tmp_path, splits):
    path, transform = _first_model(tmp_path, splits)
    groups = {"old": range(2), "new": range(2, 3)}
    new = splits.train.select_classes(splits.classes[2:]).with_classes(splits.classes)
    replayed = tlkit.incremental.with_replay(new, splits.train.with_classes(splits.classes), 6, seed=0)
    assert len(replayed) > 2 * len(new)
    steps = []
    hook = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: steps.append(1))
    try:
        for train_set in (new, replayed):
            steps.clear()
            result = tlkit.continue_training(
                tlkit.RunConfig(**{**TINY, "epochs": 2}), path, train_set, splits.val, groups, classes=splits.classes,
                trainable=["top", "head"], transform=transform, steps_per_epoch=3, early_stopping_patience=None,
                prefix_cache=True,
            )
            assert len(result.history) == 2 and len(steps) == 2 * 3
    finally:
        hook.remove()


def test_a_fixed_step_epoch_is_full_batches_that_go_through_the_set_in_reshuffled_passes():
    data = TensorDataset(torch.arange(10).float().unsqueeze(1), torch.zeros(10, dtype=torch.long))
    loader = tlkit.recipes._continue_train_loader(data, None, 4, seed=0, steps_per_epoch=6)
    batches = [x.squeeze(1).long().tolist() for x, _ in loader]
    assert [len(b) for b in batches] == [4] * 6
    seen = [i for b in batches for i in b]
    assert sorted(seen[:10]) == sorted(seen[10:20]) == list(range(10))  # each pass holds every item once
    again = [x.squeeze(1).long().tolist() for x, _ in tlkit.recipes._continue_train_loader(data, None, 4, seed=0, steps_per_epoch=6)]
    assert again == batches and [x.squeeze(1).long().tolist() for x, _ in loader] != batches  # same seed same order; next epoch reshuffled
    assert len(tlkit.recipes._continue_train_loader(data, None, 4, seed=0, steps_per_epoch=None)) == 3  # one pass, last batch short


def test_continue_training_options_restore_the_best_epoch_and_return_the_checkpoints_structure(tmp_path, splits):
    path, transform = _first_model(tmp_path, splits)
    groups = {"old": range(2), "new": range(2, 3)}
    new = splits.train.select_classes(splits.classes[2:]).with_classes(splits.classes)
    result = tlkit.continue_training(
        tlkit.RunConfig(**{**TINY, "epochs": 4, "lr": 0.05}), path, new, splits.val, groups, classes=splits.classes,
        trainable=["head"], transform=transform, optimizer="sgd", steps_per_epoch=2, early_stopping_patience=2,
        monitor="val_acc", restore_best=True, head_init="mean", head_dropout=0.5, test_set=splits.val, prefix_cache=True,
    )
    assert isinstance(result.model.head, torch.nn.Linear)  # the dropout is taken out after training
    assert result.val_acc == max(result.history.val_acc)
    scores = tlkit.evaluate_on(result.model, splits.val, tlkit.RunConfig(**TINY))
    assert scores["acc"] == pytest.approx(result.val_acc)  # the restored weights score what the best epoch did
    saved = tlkit.checkpoints.save_checkpoint(tmp_path / "updated.pt", result.model, classes=splits.classes, epoch=1)
    reloaded, _ = tlkit.model_from_checkpoint(saved)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(reloaded.eval()(x), result.model.eval()(x), atol=1e-5)


@pytest.mark.parametrize("kw, message", [
    (dict(optimizer="adam"), "optimizer must be one of"),
    (dict(optimizer="sgd", resume_optimizer=True), "needs optimizer='adamw'"),
    (dict(steps_per_epoch=0), "steps_per_epoch"),
    (dict(head_dropout=1.0), "head_dropout"),
])
def test_continue_training_refuses_bad_options_before_training(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        tlkit.continue_training(tlkit.RunConfig(**TINY), tmp_path / "never_read.pt", None, None, {}, classes=["a"],
                                trainable=["head"], transform=None, **kw)


# --- notebook 01's baselines: no training, a head like any other -----------------------------------------


def test_nearest_class_mean_is_a_linear_head_that_picks_the_nearest_mean_and_majority_is_the_floor(class_folder, tmp_path):
    splits = tlkit.load_dataset(str(class_folder), val_fraction=0.25)
    config = tlkit.RunConfig(weights=None, cache_dir=tmp_path, **TINY)
    ncm = tlkit.recipes.nearest_class_mean(config, splits)
    features = tlkit.cached_features(ncm.model, tlkit.make_loader(splits.train, tlkit.eval_transform(32, ncm.model.normalization), 8, shuffle=False),
                                     cache_dir=tmp_path, progress=False)
    val = tlkit.cached_features(ncm.model, tlkit.make_loader(splits.val, tlkit.eval_transform(32, ncm.model.normalization), 8, shuffle=False),
                                cache_dir=tmp_path, progress=False)
    (x, y), (vx, vy) = features.tensors, val.tensors
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    nearest = torch.cdist(vx, means).argmin(1)  # the rule, written out
    assert ncm.val_acc == pytest.approx((nearest == vy).float().mean().item())
    assert torch.equal(ncm.model.head(vx).argmax(1), nearest)
    majority = tlkit.recipes.majority_class(config, splits)
    counts = torch.bincount(vy)  # the commonest class on validation: the best constant answer there
    assert majority.val_acc == pytest.approx(counts.max().item() / len(vy))
    assert tlkit.evaluate_on(majority.model, splits.val, config)["acc"] == pytest.approx(majority.val_acc)


def test_k_nearest_neighbours_votes_like_scikit_learn_and_scores_on_any_split(class_folder, tmp_path):
    from sklearn.neighbors import KNeighborsClassifier

    splits = tlkit.load_dataset(str(class_folder), val_fraction=0.25)
    config = tlkit.RunConfig(weights=None, cache_dir=tmp_path, **TINY)
    knn = tlkit.recipes.k_nearest_neighbours(config, splits, k=3)
    transform = tlkit.eval_transform(32, knn.model.normalization)
    (x, y), (vx, vy) = (tlkit.cached_features(knn.model, tlkit.make_loader(part, transform, 8, shuffle=False), cache_dir=tmp_path, progress=False).tensors
                        for part in (splits.train, splits.val))
    reference = KNeighborsClassifier(n_neighbors=3, metric="cosine").fit(x.numpy(), y.numpy()).predict(vx.numpy())
    assert torch.equal(knn.model.head(vx).argmax(1), torch.as_tensor(reference))
    assert knn.val_acc == pytest.approx((torch.as_tensor(reference) == vy).float().mean().item())
    assert tlkit.evaluate_on(knn.model, splits.val, config)["acc"] == pytest.approx(knn.val_acc)
    with pytest.raises(ValueError, match="k"):
        tlkit.recipes.k_nearest_neighbours(config, splits, k=0)


def test_nearest_neighbours_breaks_a_tied_vote_by_closeness():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # one photo of each class: every vote with k=2 is a 1-1 tie
    head = tlkit.features.NearestNeighbours(memory, torch.tensor([0, 1]), num_classes=2, k=2)
    assert head(torch.tensor([[0.9, 0.1], [0.1, 0.9]])).argmax(1).tolist() == [0, 1]


def test_raw_pixels_trains_a_linear_head_on_pooled_pixels_cached_apart_from_other_sizes(class_folder, tmp_path):
    splits = tlkit.load_dataset(str(class_folder), val_fraction=0.25)
    config = tlkit.RunConfig(weights=None, cache_dir=tmp_path, **TINY)
    run = tlkit.recipes.raw_pixels(config, splits, size=4)
    assert run.model.head.in_features == 3 * 4 * 4 and run.trainable_params == 3 * 4 * 4 * 3 + 3
    image, _ = splits.val[0]
    x = tlkit.eval_transform(32, run.model.normalization)(image).unsqueeze(0)
    assert torch.allclose(run.model.forward_features(x), nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))
    assert tlkit.evaluate_on(run.model, splits.val, config)["acc"] == pytest.approx(run.val_acc)
    # two pixel sizes share no weights, only their names: their cached features must not be mixed up
    loader = tlkit.make_loader(splits.val, tlkit.eval_transform(32, run.model.normalization), 8, shuffle=False)
    keys = {tlkit.features.features_key(tlkit.features.pixel_model(3, run.model.normalization, size=n), loader) for n in (2, 4)}
    assert len(keys) == 2
    assert tlkit.recipes.raw_pixels(config, splits, size=2).model.head.in_features == 12


def test_every_recipe_that_trains_a_head_on_cached_features_goes_through_fit_head(splits, monkeypatch):
    calls = []
    real = tlkit.recipes.fit_head

    def recording(model, train, val, **kwargs):
        calls.append((len(train), kwargs.get("sampler") is not None))
        return real(model, train, val, **kwargs)

    monkeypatch.setattr(tlkit.recipes, "fit_head", recording)
    config = tlkit.RunConfig(**TINY)
    probe = tlkit.linear_probe(config, splits)
    tlkit.fine_tune_augmented(config, splits, augment="none", freeze_up_to="top", cache_features=True)
    train = tlkit.extract_features(probe.model, tlkit.make_loader(splits.train, tlkit.eval_transform(32, probe.model.normalization), 8,
                                                                  shuffle=False), progress=False)
    tlkit.fit_head_with_remedy(config, probe.model, train, train, "oversample")
    assert calls == [(len(splits.train), False)] * 2 + [(len(splits.train), True)]
    assert not hasattr(tlkit.recipes, "train_head_on_features")  # one name for it: tlkit.fit_head
