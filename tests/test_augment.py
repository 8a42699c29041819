"""Augmentation presets, MixUp/CutMix soft targets, the uint8 in-memory path and notebook 03."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tlkit
from tlkit.course import run_notebook
from tlkit.transforms import IMAGENET_NORM

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


@pytest.fixture(scope="module")
def color_splits(tmp_path_factory):
    """Red, green and blue noisy images: the label can be read back from the image's dominant channel."""
    from conftest import write_images

    root = tmp_path_factory.mktemp("colors")
    for k, (name, color) in enumerate(COLORS.items()):
        write_images(root / name, 12, color, seed=k)
    return tlkit.load_dataset(str(root), seed=0, val_fraction=0.25)


def _dominant_channel_class(images: torch.Tensor, splits) -> list[int]:
    """Label implied by each image's brightest channel (classes are sorted: blue, green, red)."""
    channel = images.float().mean(dim=(2, 3)).argmax(1).tolist()
    by_channel = {0: splits.classes.index("red"), 1: splits.classes.index("green"), 2: splits.classes.index("blue")}
    return [by_channel[c] for c in channel]


@pytest.mark.parametrize("preset", tlkit.PRESETS)
def test_every_preset_keeps_shape_and_dtype_on_both_paths(color_splits, preset):
    image = color_splits.train[0][0]
    x = tlkit.train_transform(20, IMAGENET_NORM, preset, hflip=False)(image)
    assert x.shape == (3, 20, 20) and x.dtype == torch.float32
    cached = tlkit.augment.InMemoryImages.from_dataset(color_splits.train.subset(range(5)), 20)
    assert cached.images.shape == (5, 3, 20, 20) and cached.images.dtype == torch.uint8
    batch, labels = tlkit.augment.BatchTransform(IMAGENET_NORM, preset, image_size=20)(cached.images, cached.labels)
    assert batch.shape == (5, 3, 20, 20) and batch.dtype == torch.float32
    assert torch.equal(labels, cached.labels)


@pytest.mark.parametrize("preset", ["basic", "strong"])
def test_shuffled_batches_keep_each_label_with_its_image(color_splits, preset):
    torch.manual_seed(0)
    loader = tlkit.augment.augmented_loader(color_splits.train, tlkit.train_transform(16, IMAGENET_NORM, preset), 5, seed=1)
    cached = tlkit.augment.InMemoryImages.from_dataset(color_splits.train, 16)
    on_device = tlkit.augment.device_loader(cached, 5, "cpu", tlkit.augment.BatchTransform(IMAGENET_NORM, preset, image_size=16), shuffle=True, seed=1)
    for batches in (loader, on_device):
        pairs = [(x, y) for x, y in batches]
        seen = torch.cat([y for _, y in pairs])
        assert sorted(seen.tolist()) == sorted(color_splits.train.targets)
        assert seen.tolist() != color_splits.train.targets  # shuffled, so alignment is really tested
        for x, y in pairs:
            pixels = x * torch.tensor(IMAGENET_NORM.std).view(1, 3, 1, 1) + torch.tensor(IMAGENET_NORM.mean).view(1, 3, 1, 1)
            assert _dominant_channel_class(pixels, color_splits) == y.tolist()


def test_eval_transform_is_deterministic_and_random_presets_are_not(color_splits):
    image = color_splits.train[0][0]
    none = tlkit.train_transform(24, IMAGENET_NORM, "none")
    assert torch.equal(none(image), tlkit.eval_transform(24, IMAGENET_NORM)(image)) and torch.equal(none(image), none(image))
    assert tlkit.transforms.is_deterministic(none) and tlkit.transforms.is_deterministic(tlkit.train_transform(24, IMAGENET_NORM, "none"))
    torch.manual_seed(0)
    for preset in tlkit.PRESETS[1:]:
        transform = tlkit.train_transform(24, IMAGENET_NORM, preset)
        assert not tlkit.transforms.is_deterministic(transform)
        draws = [transform(image) for _ in range(4)]
        assert any(not torch.equal(draws[0], d) for d in draws[1:]), preset


def test_each_image_of_a_batch_gets_its_own_random_parameters():
    image = torch.arange(3 * 16 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 16, 16)
    batch = image.expand(8, 3, 16, 16).contiguous()
    torch.manual_seed(0)
    out, _ = tlkit.augment.BatchTransform(IMAGENET_NORM, "basic", image_size=16)(batch, torch.zeros(8, dtype=torch.long))
    assert len({tuple(x.flatten().tolist()) for x in out}) > 1


def test_flips_can_be_switched_off():
    assert "RandomHorizontalFlip" in tlkit.transforms.preset_table(32)["basic"]
    assert all("Flip" not in steps for steps in tlkit.transforms.preset_table(32, hflip=False).values())


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown augmentation preset 'wild'.*none, basic, strong, trivialaugment, randaugment"):
        tlkit.train_transform(32, IMAGENET_NORM, "wild")
    with pytest.raises(ValueError, match="Unknown augmentation preset 'fancy'"):
        tlkit.train_transform(32, IMAGENET_NORM, "fancy")
    with pytest.raises(ValueError, match="Unknown mix 'blend'.*mixup, cutmix"):
        tlkit.augment.batch_mix("blend", 3)
    with pytest.raises(ValueError, match="on_device"):
        tlkit.augment.augment_on_device("sometimes", "cpu")


def test_mixup_mixes_images_and_labels_in_the_same_proportion():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    mixed, soft = tlkit.augment.batch_mix("mixup", 5)(x, labels)
    lam = soft[0, 0].item()  # image 0 keeps share lam of itself and gets 1 - lam of image 3 (roll by one)
    assert 0 < lam < 1
    expected = lam * nn.functional.one_hot(labels, 5) + (1 - lam) * nn.functional.one_hot(labels.roll(1), 5)
    assert torch.allclose(soft, expected.float())
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)


@pytest.mark.parametrize("mix", tlkit.augment.MIXES)
def test_mixed_batches_have_soft_targets_that_sum_to_one(color_splits, mix):
    torch.manual_seed(0)
    loader = tlkit.augment.augmented_loader(color_splits.train, tlkit.train_transform(16, IMAGENET_NORM, "basic"), 6, seed=0, mix=mix, num_classes=3)
    for x, y in loader:
        assert x.shape[1:] == (3, 16, 16) and y.shape == (len(x), 3) and y.dtype == torch.float32
        assert torch.allclose(y.sum(1), torch.ones(len(y)))
    with pytest.raises(ValueError, match="num_classes"):
        tlkit.augment.augmented_loader(color_splits.train, None, 6, mix=mix)


def test_accuracy_with_soft_targets_compares_with_their_largest_class():
    logits = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]])
    soft = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8], [0.9, 0.1]])  # largest class: 0, 1, 1, 0 -> 2 of 4 right
    data = torch.utils.data.TensorDataset(logits, soft)
    result = tlkit.evaluate(nn.Identity(), tlkit.make_loader(data, None, 2, shuffle=False))
    expected_loss = -(soft * logits.log_softmax(1)).sum(1).mean().item()
    assert result["acc"] == 0.5 and result["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_fit_trains_on_mixed_targets(color_splits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    train = tlkit.augment.augmented_loader(color_splits.train, tlkit.train_transform(16, IMAGENET_NORM, "basic"), 9, seed=0,
                                   mix="mixup_or_cutmix", num_classes=3)
    val = tlkit.make_loader(color_splits.val, tlkit.eval_transform(16, IMAGENET_NORM), 9, shuffle=False)
    history = tlkit.fit(model, train, val, epochs=25, lr=0.1, progress=False)
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.val_acc[-1] == 1.0


def test_in_memory_uint8_path_gives_the_eval_tensors_of_the_pil_path(color_splits):
    pil = tlkit.make_loader(color_splits.val, tlkit.eval_transform(20, IMAGENET_NORM), 4, shuffle=False)
    cached = tlkit.augment.InMemoryImages.from_dataset(color_splits.val, 20)
    in_memory = tlkit.augment.device_loader(cached, 4, "cpu", tlkit.augment.BatchTransform(IMAGENET_NORM, image_size=20), shuffle=False)
    assert len(in_memory) == len(pil) == 3
    for (a, ya), (b, yb) in zip(pil, in_memory):
        assert torch.equal(ya, yb)
        assert torch.allclose(a, b, atol=1e-6)
    assert tlkit.plots.to_pil(a[0], IMAGENET_NORM).size == (20, 20)


def test_on_device_auto_means_gpu_only():
    assert tlkit.augment.augment_on_device("auto", "cpu") is False
    assert tlkit.augment.augment_on_device("auto", "cuda") is True
    assert tlkit.augment.augment_on_device(True, "cpu") is True


def test_asking_for_cached_features_with_augmentation_warns():
    model = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 3, weights=None))
    with pytest.warns(tlkit.prefix_cache.AugmentationDisablesCacheWarning, match="cached-feature path is switched off"):
        assert tlkit.augment.feature_cache_allowed(model, "basic") is False
    with pytest.warns(tlkit.prefix_cache.AugmentationDisablesCacheWarning):
        assert tlkit.augment.feature_cache_allowed(model, "none", mix="mixup") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tlkit.augment.feature_cache_allowed(model, "none") is True
        assert tlkit.augment.feature_cache_allowed(model, "basic", cache_features=False) is False
    tlkit.freeze(model, up_to="stage7")
    with pytest.warns(UserWarning, match="every block below the head frozen"):
        assert tlkit.augment.feature_cache_allowed(model, "none") is False


def test_soft_label_titles():
    classes = ["cat", "dog", "fox"]
    assert tlkit.plots.target_title(torch.tensor(2), classes) == "fox"
    assert tlkit.plots.target_title(torch.tensor([0.25, 0.75, 0.0]), classes) == "dog 75% + cat 25%"


@pytest.mark.notebook
def test_notebook_03_measures_augmentation(tmp_path):
    run = run_notebook(
        NOTEBOOKS / "03_augmentation.ipynb", tmp_path,
        {"samples_per_class": 3, "epochs": 2, "deep_epochs": 2, "image_size": 32, "augment": "strong", "seeds": [0, 1]},
    )
    assert run.error == "", run.error
    m = run.metrics
    assert m["dataset"] == "clothing" and m["augment"] == "strong" and m["hflip"] == "yes" and m["seeds"] == 2
    assert m["epochs"] == 2 and m["kept_epoch"] == "best val acc" and m["deep_up_to"] == "stage5"
    arms = [f"{setting}_{arm}" for setting in ("shallow", "deep") for arm in ("none", "aug")]
    for arm in arms:  # every arm scored on the plain and the shifted test
        for key in (f"test_acc_{arm}", f"test_acc_{arm}_shifted"):
            assert 0.0 <= m[key] <= 1.0 and m[f"{key}_std"] >= 0.0
        assert 1 <= m[f"best_epoch_{arm}"] <= 2 and m[f"train_loss_{arm}"] > 0
    assert any(m[f"test_acc_{arm}"] != m[f"test_acc_{arm}_shifted"] for arm in arms)  # two different test sets
    for setting in ("shallow_3", "deep_3", "shallow_3_shifted", "deep_3_shifted"):  # augmented minus plain, paired by seed
        gain, low, high = (m[f"paired_gain_augment_{setting}{end}"] for end in ("", "_lo", "_hi"))
        assert low <= gain <= high
    assert m["paired_gain_augment_deep_3"] == pytest.approx(m["test_acc_deep_aug"] - m["test_acc_deep_none"])  # same seeds
    assert m["tta"] == "flip" and m["deep_epochs"] == 2
    for arm in arms:  # test-time augmentation on both tests
        for key in (f"test_acc_tta_{arm}", f"test_acc_tta_{arm}_shifted"):
            assert 0.0 <= m[key] <= 1.0 and m[f"{key}_std"] >= 0.0
    for name in ("presets.png", "batch.png", "shifted_test.png", "curves.png", "augmentation_gains.png"):
        assert (tmp_path / "figures" / "03" / name).stat().st_size > 0


@pytest.mark.parametrize("augment", ["none", "basic"])
def test_fine_tune_augmented_through_the_prefix_cache_trains_as_without_it(tmp_path, split_folder, augment):
    splits = tlkit.data.image_folder(split_folder, seed=0)
    config = tlkit.RunConfig(image_size=32, batch_size=4, epochs=2, lr=1e-3, seed=0)
    args = dict(augment=augment, on_device=False)
    cached_config = config.replace(cache_dir=tmp_path / "cache")
    plain = tlkit.fine_tune_augmented(config, splits, **args)
    cached = tlkit.fine_tune_augmented(cached_config, splits, prefix_cache=True, **args)
    assert cached.history.train_loss == pytest.approx(plain.history.train_loss, abs=1e-4)
    assert cached.history.val_loss == pytest.approx(plain.history.val_loss, abs=1e-4)
    # the test split scored from cached activations equals a full forward pass
    full = tlkit.evaluate(cached.model, tlkit.make_loader(splits.val, tlkit.eval_transform(32, cached.model.normalization), 8, shuffle=False))
    via_prefix = tlkit.evaluate_on(cached.model, splits.val, cached_config, batch_size=8)
    assert via_prefix["acc"] == full["acc"] and via_prefix["loss"] == pytest.approx(full["loss"], abs=1e-5)
    assert list((tmp_path / "cache").glob("prefix-*.pt"))


def test_fine_tune_augmented_restore_best_keeps_the_epoch_with_the_best_val_acc(split_folder):
    splits = tlkit.data.image_folder(split_folder, seed=0)
    config = tlkit.RunConfig(image_size=32, batch_size=4, epochs=3, lr=1e-2, seed=0)
    forced, snapshots = [0.2, 0.9, 0.3], []

    def peak_at_epoch_2(state):
        # runs before RestoreBest (which the recipe adds last): a validation curve that peaks at epoch 2
        state.history.val_acc[-1] = forced[state.epoch - 1]
        snapshots.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})

    result = tlkit.fine_tune_augmented(config, splits, augment="basic", on_device=False, restore_best=True,
                                       callbacks=[peak_at_epoch_2])
    assert result.metrics["best_epoch"] == 2 and result.val_acc == 0.9 and len(result.history) == 3
    weights = result.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in snapshots[1].items())
    assert any(not torch.equal(weights[k], v) for k, v in snapshots[2].items())  # not the last epoch's weights
    last = tlkit.fine_tune_augmented(config, splits, augment="basic", on_device=False)
    assert "best_epoch" not in last.metrics and last.val_acc == last.history.val_acc[-1]


# --- the shifted test set ---------------------------------------------------------------------------------


def test_the_shifted_test_set_is_the_same_on_every_run_and_keeps_the_labels(color_splits):
    first = tlkit.augment.shifted_test_set(color_splits.val, 20, seed=0)
    again = tlkit.augment.shifted_test_set(color_splits.val, 20, seed=0)
    other = tlkit.augment.shifted_test_set(color_splits.val, 20, seed=1)
    assert first.targets == color_splits.val.targets and first.classes == color_splits.val.classes
    pixels = [np.asarray(first[i][0]) for i in range(len(first))]
    assert all(p.shape == (20, 20, 3) and p.dtype == np.uint8 for p in pixels)
    assert all(np.array_equal(p, np.asarray(again[i][0])) for i, p in enumerate(pixels))
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()  # the prefix cache tells them apart
    plain = [np.asarray(color_splits.val[i][0].resize((20, 20))) for i in range(len(first))]
    assert all(not np.array_equal(p, q) for p, q in zip(pixels, plain))


def test_each_image_keeps_its_reframing_whatever_the_order_and_within_the_stated_ranges():
    drawn = [tlkit.transforms.reframing(0, i) for i in range(200)]
    assert tlkit.transforms.reframing(0, 7) == drawn[7] and tlkit.transforms.reframing(1, 7) != drawn[7]
    ranges = tlkit.transforms.REFRAMING
    assert all(ranges["zoom"][0] <= d["zoom"] <= ranges["zoom"][1] and abs(d["angle"]) <= ranges["angle"] for d in drawn)
    assert min(d["zoom"] for d in drawn) < 1 < max(d["zoom"] for d in drawn)  # zoomed out and in
    assert 0.3 < sum(d["mirror"] for d in drawn) / len(drawn) < 0.7


def test_reframe_with_no_change_is_the_square_centre_of_the_photo():
    from PIL import Image

    ramp = np.linspace(0, 255, 40)  # dark on the left, bright on the right: a mirror image is easy to tell apart
    photo = Image.fromarray(np.stack([np.tile(ramp, (30, 1)), np.full((30, 40), 90.0), np.tile(ramp[::-1], (30, 1))], -1).astype(np.uint8))
    same = {"zoom": 1.0, "shift_x": 0.0, "shift_y": 0.0, "angle": 0.0, "mirror": False, "brightness": 1.0, "contrast": 1.0,
            "saturation": 1.0, "hue": 0.0}
    centre = np.asarray(photo.crop((5, 0, 35, 30)), dtype=np.int16)
    assert np.abs(np.asarray(tlkit.transforms.reframe(photo, same, 30), dtype=np.int16) - centre).max() <= 3  # up to resampling
    mirrored = np.asarray(tlkit.transforms.reframe(photo, {**same, "mirror": True}, 30), dtype=np.int16)
    assert np.abs(mirrored - centre[:, ::-1]).max() <= 3 and np.abs(mirrored - centre).max() > 100


def test_an_empty_split_is_refused_by_name(color_splits):
    with pytest.raises(ValueError, match="shifted_test_set: the dataset is empty"):
        tlkit.augment.shifted_test_set(color_splits.val.subset([]), 20)


def test_fine_tune_augmented_with_frozen_batchnorm_keeps_the_statistics(split_folder):
    splits = tlkit.data.image_folder(split_folder, seed=0)
    config = tlkit.RunConfig(image_size=32, batch_size=4, epochs=1, lr=1e-2, seed=0)
    result = tlkit.fine_tune_augmented(config, splits, augment="basic", on_device=False, freeze_up_to="stage5", bn="frozen")
    norms = [m for m in result.model.features.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not norms  # every BatchNorm replaced by a fixed one
    pretrained = tlkit.create_model("efficientnet_lite0", 2, "imagenet").state_dict()
    trained = result.model.state_dict()
    stats = [k for k in trained if k.startswith("features.stage6") and k.endswith("running_mean")]
    assert stats and all(torch.equal(trained[k], pretrained[k]) for k in stats)
    convs = [k for k in trained if k.startswith("features.stage6") and k.endswith("conv_pw.weight")]
    assert convs and any(not torch.equal(trained[k], pretrained[k]) for k in convs)  # the convolutions did train
    with pytest.raises(ValueError, match="unknown bn='train'"):
        tlkit.fine_tune_augmented(config, splits, bn="train")


def test_the_paired_gains_figure_has_one_row_per_setting_and_refuses_none():
    from tlkit.compare import PairedDifference

    gains = {"deep, test": PairedDifference("basic", "none", "test_acc", {0: 0.02, 1: 0.04}, 0.03, 0.01, 0.05),
             "deep, shifted": PairedDifference("basic", "none", "test_acc", {0: 0.0}, 0.0, float("nan"), float("nan"))}
    fig = tlkit.plots.plot_paired_gains(gains, title="gains")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(gains)
    assert "paired over 1 seed" in fig.axes[0].get_xlabel()
    with pytest.raises(ValueError, match="at least one setting"):
        tlkit.plots.plot_paired_gains({})


def test_scored_on_tests_adds_the_training_loss_and_one_accuracy_per_test_set(split_folder):
    splits = tlkit.data.image_folder(split_folder, seed=0)
    config = tlkit.RunConfig(image_size=32, batch_size=4, epochs=1, lr=1e-2, seed=0)
    comparison = tlkit.compare_arms({"none": lambda s: tlkit.fine_tune_augmented(config.replace(seed=s), splits, augment="none", on_device=False)},
                                    [0, 1])
    tests = {"test_acc": splits.val, "test_acc_two": splits.val.subset([0, 1])}
    scored = tlkit.recipes.scored_on_tests(comparison, tests, config)
    assert scored.metric == "test_acc" and {"train_loss", "test_acc", "test_acc_two"} <= set(scored.metrics)
    for row in scored.rows:
        run = comparison.outputs["none", row["seed"]]
        assert row["train_loss"] == run.history.train_loss[-1]
        assert row["test_acc"] == tlkit.evaluate_on(run.model, splits.val, config)["acc"]
        assert row["test_acc_two"] == tlkit.evaluate_on(run.model, tests["test_acc_two"], config)["acc"]
    with pytest.raises(ValueError, match="at least one test set"):
        tlkit.recipes.scored_on_tests(comparison, {}, config)
