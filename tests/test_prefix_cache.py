"""The prefix cache: exact outputs from cached activations, same training with and without it, the boundary
following the model, the memory budget, the disk cache and its key, augmentation turning it off."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import tlkit
from tlkit._cache import checked_payload
from tlkit.prefix_cache import (
    PrefixCache,
    PrefixCacheTooLargeError,
    cached_prefix,
    forward_from,
    forward_prefix,
    prefix_boundary,
    prefix_cache_allowed,
    prefix_key,
)


def _images(n: int = 6, size: int = 64, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 3
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def _lite0(weights: str | None = "imagenet") -> tlkit.TransferModel:
    tlkit.set_seed(0)
    return tlkit.create_model("efficientnet_lite0", 3, weights)


@pytest.fixture(scope="module")
def lite0() -> tlkit.TransferModel:
    """ImageNet Lite0 with stage7, top and head trainable (the "last blocks" of the benchmark)."""
    return tlkit.apply_strategy(_lite0(), "last_n_blocks", n_blocks=2)


@pytest.mark.parametrize("n_blocks, boundary", [(2, "stage7"), (5, "stage4"), (0, "head")])
def test_outputs_from_cached_activations_equal_the_full_forward_pass(lite0, n_blocks, boundary):
    tlkit.apply_strategy(lite0, "last_n_blocks", n_blocks=n_blocks)
    assert prefix_boundary(lite0) == boundary
    loader = _images()
    cached = cached_prefix(lite0, loader, progress=False)
    x = loader.dataset.tensors[0]
    lite0.eval()
    with torch.no_grad():
        full, from_cache = lite0(x), forward_from(lite0, boundary, cached.tensors[0])
    torch.testing.assert_close(from_cache, full, rtol=1e-4, atol=1e-5)
    assert torch.equal(cached.tensors[1], loader.dataset.tensors[1])
    tlkit.apply_strategy(lite0, "last_n_blocks", n_blocks=2)


def test_random_weights_in_train_mode_frozen_prefix_stays_in_eval_mode():
    # random init: BatchNorm statistics far from the batch's, so a prefix run in train mode would differ a lot
    model = tlkit.freeze(_lite0(weights=None), up_to="stage3")
    loader = _images(n=4, size=32)
    cached = cached_prefix(model, loader, progress=False)
    model.train()  # trainable stages use batch statistics; the frozen prefix stays in eval mode
    with torch.no_grad():
        full = model(loader.dataset.tensors[0])
        from_cache = forward_from(model, "stage4", cached.tensors[0])
        for name in ("stem", "stage1", "stage2", "stage3"):
            getattr(model.features, name).train()  # what eval_frozen_blocks prevents: batch statistics in the prefix
        wrong = forward_from(model, "stage4", forward_prefix(model, "stage4", loader.dataset.tensors[0]))
    # float noise only: the cached prefix ran in channels_last, the full pass mixes layouts; random BatchNorm
    # amplifies that to ~1e-4, while a prefix in train mode (batch statistics) is off by far more
    torch.testing.assert_close(from_cache, full, rtol=1e-3, atol=1e-3)
    assert (wrong - full).abs().max() > 1e-2


def test_the_boundary_is_the_first_stage_that_trains_or_none_where_nothing_can_be_cached():
    model = _lite0()
    assert prefix_boundary(tlkit.apply_strategy(model, "conv_block")) == "pool"  # the feature map, before pooling
    assert prefix_boundary(tlkit.apply_strategy(model, "full")) is None
    bn_train = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 3, "imagenet", eval_frozen_blocks=False))
    assert prefix_boundary(bn_train) is None  # frozen blocks in train mode: BatchNorm changes their output
    assert not prefix_cache_allowed(bn_train, None)


def test_size_is_printed_before_building_and_a_budget_too_small_is_refused(lite0, capsys):
    loader = _images()
    with pytest.raises(PrefixCacheTooLargeError) as err:
        cached_prefix(lite0, loader, max_bytes=10_000, progress=False)
    message = str(err.value)
    # 192 channels x 2 x 2 at 64 px, float32: 3,072 bytes per image, 6 images
    assert "18.4 KB" in message and "max_bytes=10.0 KB" in message and "'stage7'" in message
    assert "prefix_cache=False" in message and "freeze more blocks" in message
    assert "Prefix cache: activations at the input of 'stage7' (192x2x2 float32, 3.1 KB per image) for 6 images" in capsys.readouterr().out
    assert len(cached_prefix(lite0, loader, max_bytes=20_000, progress=False)) == 6


def test_disk_cache_is_read_back_and_its_key_follows_prefix_weights_boundary_and_data(lite0, tmp_path):
    loader = _images()
    first = cached_prefix(lite0, loader, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("prefix-*.pt")
    # a planted file under the same key (a complete one, with its checksum) is what the second call returns: it
    # reads, it does not recompute
    torch.save(checked_payload(tlkit.prefix_cache._FORMAT, torch.full_like(first.tensors[0], 7.0), first.tensors[1]), path)
    assert torch.all(cached_prefix(lite0, loader, cache_dir=tmp_path, progress=False).tensors[0] == 7.0)

    key = prefix_key(lite0, loader, "stage7")
    assert path.name == f"prefix-{key}.pt"
    assert prefix_key(lite0, loader, "stage6") != key
    assert prefix_key(lite0, _images(seed=1), "stage7") != key
    with torch.no_grad():
        lite0.head.weight.add_(1.0)  # above the boundary: the activations do not change
        assert prefix_key(lite0, loader, "stage7") == key
        lite0.features.stem[0].weight.mul_(1.5)  # below it: they do
        assert prefix_key(lite0, loader, "stage7") != key
        lite0.features.stem[0].weight.div_(1.5)
        lite0.head.weight.sub_(1.0)


def test_the_cache_follows_the_boundary_down_on_unfreeze_and_up_on_freeze(lite0):
    loaders = {"train": _images(), "val": _images(n=4, seed=1)}
    cache = PrefixCache(lite0, loaders, progress=False)
    assert cache.boundary == "stage7" and cache.items["train"][0][0].shape == (192, 2, 2)
    tlkit.set_trainable(lite0, ["stage5"])  # the freeze panel's toggle, below the boundary
    cache.suffix.train()  # fit does this every epoch
    assert cache.boundary == "stage5" and cache.items["val"][0][0].shape == (80, 4, 4)
    stage5_input = cache.items["train"].activations.tensors[0]
    assert torch.allclose(stage5_input, cached_prefix(lite0, loaders["train"], progress=False).tensors[0])

    tlkit.set_trainable(lite0, ["stage5", "stage6"], False)  # up again: run the cached activations through them
    cache.suffix.eval()
    assert cache.boundary == "stage7" and cache.stats.boundaries == ["stage7", "stage5", "stage7"]
    torch.testing.assert_close(cache.items["train"].activations.tensors[0],
                               cached_prefix(lite0, loaders["train"], progress=False).tensors[0], rtol=1e-4, atol=1e-5)
    tlkit.unfreeze(lite0)  # nothing left to cache: the same loader now gives the images
    cache.suffix.train()
    assert cache.boundary is None and cache.items["train"][0][0].shape == (3, 64, 64)
    tlkit.apply_strategy(lite0, "last_n_blocks", n_blocks=2)


def test_a_lower_boundary_over_the_budget_warns_and_trains_from_the_images(lite0):
    loaders = {"train": _images(), "val": _images(n=4, seed=1)}
    cache = PrefixCache(lite0, loaders, max_bytes=40_000, progress=False)  # stage7: 10 x 3,072 bytes
    tlkit.set_trainable(lite0, ["stage3"])  # stage3's input at 64 px: 24 x 16 x 16 floats per image
    with pytest.warns(UserWarning, match="over the memory budget.*Training goes on from the images"):
        cache.suffix.train()
    assert cache.boundary is None and cache.items["val"][0][0].shape == (3, 64, 64)
    cache.suffix.train()  # refused once: no second attempt (and no second warning) every epoch
    assert cache.stats.boundaries == ["stage7", None]
    tlkit.apply_strategy(lite0, "last_n_blocks", n_blocks=2)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    from conftest import write_images

    root = tmp_path_factory.mktemp("photos")
    for k, (name, color) in enumerate({"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}.items()):
        write_images(root / name, 10, color, seed=k, size=40)
    return tlkit.load_dataset(str(root))


def _same_training(plain: tlkit.RunResult, cached: tlkit.RunResult) -> None:
    assert cached.history.val_acc == plain.history.val_acc
    assert cached.history.train_loss == pytest.approx(plain.history.train_loss, rel=1e-4)
    assert cached.history.val_loss == pytest.approx(plain.history.val_loss, rel=1e-4)
    for (name, a), b in zip(plain.model.state_dict().items(), cached.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert cached.trainable_params == plain.trainable_params


@pytest.mark.parametrize("strategy, boundaries", [("last_n_blocks", ["top"]), ("gradual", ["head", "top", "stage7"])])
def test_training_with_the_cache_gives_the_same_weights_and_accuracy(splits, strategy, boundaries):
    config = tlkit.RunConfig(image_size=32, batch_size=8, epochs=3, lr=1e-2, seed=0)
    plain = tlkit.run_strategy(config, splits, strategy, n_blocks=1)
    cached = tlkit.run_strategy(config, splits, strategy, n_blocks=1, prefix_cache=True)
    _same_training(plain, cached)
    assert type(plain) is tlkit.RunResult  # the option off changes nothing
    assert cached.prefix_cache.boundaries == boundaries  # gradual: the boundary moved down after each epoch
    assert cached.prefix_cache.builds == len(boundaries) and cached.prefix_cache.prefix_seconds > 0


def test_random_train_transform_turns_the_cache_off_with_the_feature_cache_warning(splits):
    model = tlkit.apply_strategy(_lite0(), "last_n_blocks", n_blocks=1)
    augment = tlkit.train_transform(32, model.normalization, "basic")
    with pytest.warns(tlkit.prefix_cache.AugmentationDisablesCacheWarning, match="prefix cache is switched off"):
        assert not prefix_cache_allowed(model, augment)
    with pytest.raises(ValueError, match="transform is random"):
        cached_prefix(model, tlkit.make_loader(splits.train, augment, 8, shuffle=False), progress=False)
    config = tlkit.RunConfig(image_size=32, batch_size=8, epochs=1, lr=1e-3, seed=0)
    with pytest.warns(tlkit.prefix_cache.AugmentationDisablesCacheWarning):
        result = tlkit.run_strategy(config, splits, "last_n_blocks", n_blocks=1, train_transform=augment, prefix_cache=True)
    assert result.prefix_cache is None and len(result.history) == 1
