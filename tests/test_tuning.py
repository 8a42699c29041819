"""tlkit.tuning (notebook 06): corrupted photos, BatchNorm on fixed statistics, parameter sets, per-stage probes, LP-FT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms import v2

import tlkit
from tlkit import tuning
from tlkit.transforms import resize_steps

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
LITE0_STAGE_WIDTHS = {"stem": 32, "stage1": 16, "stage2": 24, "stage3": 40, "stage4": 80, "stage5": 112, "stage6": 192, "stage7": 320, "top": 1280}


@pytest.fixture
def photos(split_folder):
    return tlkit.data.image_folder(split_folder)  # ants and bees: 8 + 8 train, 4 + 4 val, 24 px


def config(**changes) -> tlkit.RunConfig:
    return tlkit.RunConfig(**{"image_size": 32, "batch_size": 8, "epochs": 1, "lr": 1e-3, **changes})


def pixels(dataset) -> np.ndarray:
    return np.stack([np.asarray(dataset[i][0]) for i in range(len(dataset))]).astype(int)


def clean_pixels(dataset, size: int) -> np.ndarray:
    frame = v2.Compose(resize_steps(size))
    return np.stack([frame(dataset[i][0]).permute(1, 2, 0).numpy() for i in range(len(dataset))]).astype(int)


# --- corruptions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("corruption", list(tuning.CORRUPTIONS))
def test_each_corruption_is_deterministic_changes_the_pixels_and_keeps_the_labels(photos, corruption):
    once = tuning.corrupted_images(photos.train, corruption, 32, seed=0)
    again = tuning.corrupted_images(photos.train, corruption, 32, seed=0)
    assert np.array_equal(pixels(once), pixels(again))  # the same pixels on every run
    assert once.fingerprint() == again.fingerprint() is not None  # so the caches apply to it
    difference = np.abs(pixels(once) - clean_pixels(photos.train, 32)).mean()
    assert difference > 3  # grey levels out of 255, on average: the photos really changed
    assert once.targets == photos.train.targets and once.classes == photos.train.classes
    assert once[0][0].size == (32, 32)


@pytest.mark.parametrize("corruption", ["gaussian_noise", "colour"])
def test_random_corruptions_follow_the_seed_and_the_photo_not_its_position(photos, corruption):
    whole = pixels(tuning.corrupted_images(photos.train, corruption, 32, seed=0))
    assert not np.array_equal(whole, pixels(tuning.corrupted_images(photos.train, corruption, 32, seed=1)))
    picked = photos.train.subset([3, 5])
    assert np.array_equal(pixels(tuning.corrupted_images(picked, corruption, 32, seed=0)), whole[[3, 5]])


def test_corrupt_pixels_stays_in_range_and_names_unknown_corruptions():
    image = np.random.default_rng(0).random((16, 16, 3))
    for corruption in tuning.CORRUPTIONS:
        out = tuning.corrupt_pixels(image, corruption, np.random.default_rng(0))
        assert out.shape == image.shape and 0.0 <= out.min() and out.max() <= 1.0 and not np.allclose(out, image)
    with pytest.raises(ValueError, match="Unknown corruption 'fog'; choose one of: gaussian_noise, blur, contrast, colour"):
        tuning.corrupt_pixels(image, "fog", np.random.default_rng(0))


def test_corrupting_an_empty_split_says_which_split_to_give(photos):
    with pytest.raises(ValueError, match="the dataset is empty; give it a split with photos"):
        tuning.corrupted_images(photos.train.subset([]), "blur", 32)


def test_corrupted_splits_corrupt_every_split_and_keep_a_few_validation_photos(photos):
    target = tuning.corrupted_splits(photos, "contrast", 32, val_per_class=2)
    assert target.name.endswith("contrast") and target.classes == photos.classes and target.test is None
    assert len(target.train) == len(photos.train) and sorted(target.val.targets) == [0, 0, 1, 1]
    assert len(tuning.corrupted_splits(photos, "contrast", 32).val) == len(photos.val)


# --- BatchNorm on fixed statistics, parameter sets -----------------------------------------------------


def lite0(classes: int = 10) -> tlkit.TransferModel:
    tlkit.set_seed(0)
    return tlkit.create_model("efficientnet_lite0", classes, weights="imagenet")


def test_fixed_batchnorm_statistics_keep_imagenet_statistics_while_scale_and_shift_train():
    model = tuning.select_trainable(lite0(), "bn_affine")
    wrapped = tuning.FixedBatchNormStatistics(model).train()
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert layers and not any(bn.training for bn in layers) and model.training  # the rest is in train mode
    before = layers[0].running_mean.clone()
    wrapped(torch.randn(2, 3, 32, 32)).sum().backward()
    assert torch.equal(layers[0].running_mean, before)  # no statistics update, as in eval mode
    assert layers[0].weight.grad is not None and layers[0].weight.grad.abs().sum() > 0  # the scale still trains
    assert wrapped.head is model.head  # fit reads the classes from the head through the wrapper


def test_plain_train_mode_would_update_the_statistics():
    """The failure FixedBatchNormStatistics prevents: model.train() alone lets a trainable block's BatchNorm follow the batch."""
    model = tuning.select_trainable(lite0(), "bn_affine").train()
    bn = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(bn.running_mean, before)


@pytest.mark.parametrize(("what", "count"), [("head", 1280 * 10 + 10), ("bitfit", 21_008 + 12_810), ("bn_affine", 42_016 + 12_810),
                                             (["stem"], 928), (["top", "head"], 412_160 + 12_810)])
def test_select_trainable_counts(what, count):
    model = tuning.select_trainable(lite0(), what)
    assert tuning.trainable_count(model) == count


def test_bitfit_trains_biases_and_the_head_only_and_blocks_train_alone():
    model = tuning.select_trainable(lite0(), "bitfit")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all(name.endswith("bias") or name.startswith("head.") for name in trainable) and "head.weight" in trainable
    stem_only = tuning.select_trainable(model, ["stem"])  # what trained before is frozen again
    assert tlkit.trainable_blocks(stem_only) == ["stem"]


def test_select_trainable_names_what_it_does_not_know():
    with pytest.raises(ValueError, match="Unknown parameter set 'biases': choose one of head, bitfit, bn_affine"):
        tuning.select_trainable(lite0(), "biases")
    with pytest.raises(ValueError, match=r"Unknown block name\(s\) \['stage9'\]"):
        tuning.select_trainable(lite0(), ["stage9"])
    with pytest.raises(ValueError, match="no block named"):
        tuning.select_trainable(lite0(), [])


def test_strategy_label():
    assert tuning.strategy_label("bitfit") == "bitfit" and tuning.strategy_label(["stage7", "top", "head"]) == "stage7+top+head"


# --- features of every stage, probes ------------------------------------------------------------------


def test_stage_features_pool_every_stage_and_the_last_is_the_heads_input(photos):
    model = lite0(2)
    found = tuning.stage_features(model, photos.train, image_size=32, batch_size=5)
    assert found.stages == list(LITE0_STAGE_WIDTHS)
    assert {s: tuple(f.shape) for s, f in found.features.items()} == {s: (16, c) for s, c in LITE0_STAGE_WIDTHS.items()}
    assert found.labels.tolist() == photos.train.targets
    images = next(iter(tlkit.make_loader(photos.train, tlkit.eval_transform(32, model.normalization), 16, shuffle=False)))[0]
    with torch.no_grad():
        assert torch.allclose(found.features["top"], model.eval().forward_features(images), atol=1e-3)
    only = tuning.stage_features(model, photos.train, image_size=32, stages=["stage2"])
    assert only.stages == ["stage2"] and torch.allclose(only.features["stage2"], found.features["stage2"], atol=1e-5)


def test_stage_features_of_a_subset_pick_its_rows(photos, split_folder):
    found = tuning.stage_features(lite0(2), photos.train, image_size=32)
    subset = photos.train.subset([1, 4, 9])
    x, y = found.of(subset, "stage4")
    assert torch.equal(x, found.features["stage4"][[1, 4, 9]]) and y.tolist() == subset.targets
    with pytest.raises(ValueError, match="The 8 photos are not all among the 16 these features were computed on"):
        found.of(photos.val, "top")  # indices 0-7, but of another folder
    again = tlkit.data.image_folder(split_folder).train.subset([2])  # loaded again from the same files: the same photos
    assert torch.equal(found.of(again, "top")[0], found.features["top"][[2]])
    with pytest.raises(KeyError, match="No features for stage 'pool'"):
        found.of(subset, "pool")
    with pytest.raises(ValueError, match=r"Unknown stage\(s\) \['pool'\]"):
        tuning.stage_features(lite0(2), photos.train, image_size=32, stages=["pool"])


def separable(n: int = 60, classes: int = 3, features: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, features, generator=g) * 0.3 + 10 * nn.functional.one_hot(y, features).float() + 50  # far from 0, unscaled
    return x, y


def test_fit_probe_is_a_linear_layer_on_the_raw_features_that_predicts_like_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = separable()
    probe = tuning.fit_probe(x, y, num_classes=3, C=0.5)
    assert isinstance(probe, nn.Linear) and probe.weight.shape == (3, 5)
    scaler = StandardScaler().fit(x.double().numpy())
    reference = LogisticRegression(C=0.5, max_iter=2000).fit(scaler.transform(x.double().numpy()), y.numpy())
    test, _ = separable(seed=1)
    with torch.no_grad():
        assert probe(test).argmax(1).tolist() == reference.predict(scaler.transform(test.double().numpy())).tolist()
        expected = reference.predict_proba(scaler.transform(test.double().numpy()))
        assert np.allclose(probe(test).softmax(1).numpy(), expected, atol=1e-4)


def test_fit_probe_with_two_classes_and_a_class_without_photos():
    x, y = separable(classes=2)
    probe = tuning.fit_probe(x, y, num_classes=4)  # classes 2 and 3 have no training photo
    with torch.no_grad():
        predicted = probe(x).argmax(1)
    assert predicted.tolist() == y.tolist()
    with pytest.raises(ValueError, match="at least 2 classes"):
        tuning.fit_probe(x[y == 0], y[y == 0], num_classes=2)
    with pytest.raises(ValueError, match="C must be a positive number"):
        tuning.fit_probe(x, y, num_classes=2, C=0)


def test_probe_accuracy_on_one_stage(photos):
    model = lite0(2)
    train, val = (tuning.stage_features(model, split, image_size=32) for split in (photos.train, photos.val))
    result = tuning.probe_accuracy(train, val, "top", photos.train.subset(range(0, 16, 2)))
    assert 0.0 <= result["val_acc"] <= 1.0 and result["seconds"] >= 0.0
    assert result["val_acc"] * len(photos.val) == pytest.approx(round(result["val_acc"] * len(photos.val)))  # a count of photos


# --- runs: the probe, LP-FT ---------------------------------------------------------------------------


def photos_probe(photos) -> nn.Linear:
    train = tuning.stage_features(lite0(2), photos.train, image_size=32, stages=["top"])
    return tuning.fit_probe(*train.of(photos.train, "top"), num_classes=2)


def test_with_head_copies_the_weights_and_checks_their_shape():
    probe = nn.Linear(1280, 10)
    model = tuning.with_head(lite0(), probe)
    assert torch.equal(model.head.weight, probe.weight) and model.head.weight is not probe.weight
    with pytest.raises(ValueError, match=r"The head has weights of shape \(3, 1280\), the model's head \(10, 1280\)"):
        tuning.with_head(lite0(), nn.Linear(1280, 3))


def test_probe_run_scores_the_probe_on_validation(photos):
    probe = photos_probe(photos)
    run = tuning.probe_run(config(), photos, probe)
    val = tuning.stage_features(lite0(2), photos.val, image_size=32, stages=["top"])
    with torch.no_grad():
        expected = (probe(val.features["top"]).argmax(1) == val.labels).float().mean().item()
    assert run.val_acc == pytest.approx(expected) and run.trainable_params == 1280 * 2 + 2 and len(run.history) == 0
    assert tlkit.trainable_blocks(run.model) == []


def test_lp_ft_starts_from_the_probes_weights(photos):
    probe = photos_probe(photos)
    still = tuning.tune(config(lr=1e-12), photos, ["top", "head"], head=probe)  # a step too small to move anything
    assert torch.allclose(still.model.head.weight, probe.weight, atol=1e-6)
    fresh = tuning.tune(config(lr=1e-12), photos, ["top", "head"])
    assert not torch.allclose(fresh.model.head.weight, probe.weight, atol=1e-2)  # a new head starts elsewhere


def test_tune_trains_only_what_it_names_on_fixed_statistics(photos):
    run = tuning.tune(config(epochs=2, lr=1e-2), photos, ["top"], head=photos_probe(photos))
    reference = lite0(2)
    trained, untouched = run.model.features.top, reference.features.top
    assert not torch.allclose(trained[0].weight, untouched[0].weight)  # the 1x1 convolution of top moved
    assert torch.equal(trained[1].running_mean, untouched[1].running_mean)  # its BatchNorm kept ImageNet's statistics
    assert torch.equal(run.model.features.stem[0].weight, reference.features.stem[0].weight)
    assert run.trainable_params == 412_160 and run.name == "top" and len(run.history) == 2
    assert set(run.metrics) == {"val_acc", "train_loss"} and run.val_acc == run.history.val_acc[-1]


def test_bitfit_runs_through_the_whole_network_without_the_prefix_cache(photos):
    run = tuning.tune(config(), photos, "bitfit")
    assert run.trainable_params == 21_008 + 1280 * 2 + 2 and 0.0 <= run.val_acc <= 1.0


# --- figures ------------------------------------------------------------------------------------------


def comparison(arms: dict[str, list[float]]) -> tlkit.compare.Comparison:
    return tlkit.compare_arms({arm: lambda s, values=values: {"test_acc": values[s]} for arm, values in arms.items()}, [0, 1], metric="test_acc")


def test_plot_accuracy_vs_parameters_draws_a_point_per_strategy():
    summary = comparison({"head": [0.7, 0.72], "bitfit": [0.71, 0.7]}).summary(["test_acc"])
    fig = tlkit.plots.plot_accuracy_vs_parameters(summary, "test_acc", {"head": 12_810, "bitfit": 33_818})
    assert len(fig.axes[0].containers) == 2 and fig.axes[0].get_xscale() == "log"
    with pytest.raises(KeyError, match=r"No trainable-parameter count for \['bitfit'\]"):
        tlkit.plots.plot_accuracy_vs_parameters(summary, "test_acc", {"head": 12_810})


def test_plot_block_bars_draws_a_group_per_comparison_with_the_reference_as_a_line():
    found = {"noise": comparison({"untuned": [0.5, 0.5], "stem": [0.55, 0.6], "top": [0.52, 0.5]}),
             "blur": comparison({"untuned": [0.4, 0.4], "stem": [0.45, 0.4], "top": [0.5, 0.5]})}
    fig = tlkit.plots.plot_block_bars(found, "test_acc", reference="untuned")
    assert len(fig.axes) == 2 and [len(ax.patches) for ax in fig.axes] == [2, 2] and len(fig.axes[0].lines) >= 1
    with pytest.raises(ValueError, match="at least one comparison"):
        tlkit.plots.plot_block_bars({}, "test_acc", reference="untuned")


# --- the notebook -------------------------------------------------------------------------------------


def test_notebook_06_parameters_are_checked_by_name():
    from tlkit.notebook_params import check_notebook_parameters, notebook_spec

    spec = notebook_spec("06")
    assert {"corruptions", "surgical_blocks", "few_seeds", "lpft_lr"} <= set(spec)
    with pytest.raises(ValueError, match="Unknown corruptions\\[0\\] 'fog'"):
        spec["corruptions"]("corruptions", '["fog"]')
    with pytest.raises(ValueError, match="surgical_image_size: image_size=16 is too small"):
        check_notebook_parameters("06", {**_defaults(), "surgical_image_size": 16})


def _defaults() -> dict:
    import nbformat

    nb = nbformat.read(NOTEBOOKS / "06_choosing_what_to_tune.ipynb", as_version=4)
    namespace: dict = {}
    exec(next(c for c in nb.cells if c.cell_type == "code").source, namespace)  # the parameters cell: assignments only
    return {k: v for k, v in namespace.items() if not k.startswith("__")}


@pytest.mark.notebook
def test_notebook_06_writes_every_result(tmp_path):
    from tlkit.course import run_notebook

    blocks = ["stem", "top", "head"]
    run = run_notebook(
        NOTEBOOKS / "06_choosing_what_to_tune.ipynb", tmp_path,
        {"image_size": 32, "samples_per_class": 3, "epochs": 2, "seeds": [0, 1], "few_seeds": [0, 1], "peft_epochs": 1,
         "surgical_epochs": 1, "surgical_image_size": 32, "target_per_class": 2, "surgical_blocks": blocks,
         "corruptions": ["gaussian_noise", "blur"]},
    )
    assert run.error == "", run.error
    m = run.metrics
    assert m["seeds"] == 2 and m["few_seeds"] == 2 and m["surgical_image_size"] == 32
    assert m["target_train_photos"] == m["target_val_photos"] == 2 * 10  # target_per_class photos of each of the 10 classes
    for stage in LITE0_STAGE_WIDTHS:
        assert 0.0 <= m[f"probe_acc_{stage}"] <= 1.0
    for arm in ("probe", "ft", "lpft", "ft_small_lr"):
        for end in ("", "_shifted"):
            assert 0.0 <= m[f"test_acc_{arm}{end}"] <= 1.0 and m[f"test_acc_{arm}{end}_std"] >= 0.0
    for end in ("", "_shifted"):
        gain = [m[f"paired_gain_lpft_vs_ft{end}{edge}"] for edge in ("_lo", "", "_hi")]
        assert gain == sorted(gain)
        assert gain[1] == pytest.approx(m[f"test_acc_lpft{end}"] - m[f"test_acc_ft{end}"])  # paired mean = difference of means
    assert {k: m[f"trainable_params_{k}"] for k in ("head", "bitfit", "bn_affine", "top", "stage7_top")} == {
        "head": 12_810, "bitfit": 33_818, "bn_affine": 54_826, "top": 424_970, "stage7_top": 1_030_410}
    for arm in ("untuned", *blocks):
        per_corruption = [m[f"acc_{arm}_surgical_{c}"] for c in ("gaussian_noise", "blur")]
        assert m[f"acc_{arm}_surgical_shifted"] == pytest.approx(sum(per_corruption) / 2)
    assert "acc_stage2_surgical_shifted" not in m  # only the blocks asked for run
    for figure in ("probe_per_stage.png", "lpft_curves.png", "accuracy_vs_parameters.png", "corruptions.png", "surgical.png"):
        assert (tmp_path / "figures" / "06" / figure).stat().st_size > 0
