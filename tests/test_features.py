"""Backbone features cached on disk: reused when backbone, transform and data are the same, recomputed otherwise."""

import pytest
import torch

import tlkit
from tlkit.features import cached_features, features_key


@pytest.fixture(scope="module")
def setup():
    splits = tlkit.load_dataset("digits", seed=0, samples_per_class=3)
    tlkit.set_seed(0)
    model = tlkit.freeze(tlkit.create_model("efficientnet_lite0", len(splits.classes), weights="imagenet"))
    return splits, model


def _loader(splits, model, size=32, ds=None):
    return tlkit.make_loader(splits.train if ds is None else ds, tlkit.eval_transform(size, model.normalization), 16, shuffle=False)


class CountCalls:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.features.register_forward_hook(self)

    def __call__(self, *args):
        self.calls += 1


def test_a_repeated_run_reads_the_features_from_disk(setup, tmp_path):
    splits, model = setup
    counter = CountCalls(model)
    first = cached_features(model, _loader(splits, model), cache_dir=tmp_path, progress=False)
    backbone_batches = counter.calls
    again = cached_features(model, _loader(splits, model), cache_dir=tmp_path, progress=False)
    counter.handle.remove()
    assert backbone_batches > 0 and counter.calls == backbone_batches  # no backbone pass the second time
    assert len(list(tmp_path.glob("features-*.pt"))) == 1
    assert torch.equal(first.tensors[0], again.tensors[0]) and torch.equal(first.tensors[1], again.tensors[1])


def test_the_key_follows_backbone_transform_and_data_but_not_the_head(setup):
    splits, model = setup
    key = features_key(model, _loader(splits, model))
    assert key == features_key(model, _loader(splits, model))
    assert key != features_key(model, _loader(splits, model, size=48))
    assert key != features_key(model, _loader(splits, model, ds=splits.train.subset(range(5))))
    assert key != features_key(model, _loader(splits, model, ds=splits.val))
    other_backbone = tlkit.freeze(tlkit.create_model("efficientnet_lite0", len(splits.classes), weights=None))
    assert key != features_key(other_backbone, _loader(splits, model))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert key == features_key(model, _loader(splits, model))


def test_a_damaged_cache_file_is_recomputed_with_a_warning(setup, tmp_path):
    splits, model = setup
    good = cached_features(model, _loader(splits, model), cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("features-*.pt")
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="damaged feature cache"):
        again = cached_features(model, _loader(splits, model), cache_dir=tmp_path, progress=False)
    assert torch.equal(good.tensors[0], again.tensors[0])
    assert torch.load(path, weights_only=True)[0].shape == good.tensors[0].shape  # rewritten


def test_data_without_a_fingerprint_is_not_cached(setup, tmp_path):
    _, model = setup

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3, 32, 32), 0

    loader = tlkit.make_loader(Plain(), None, 2, shuffle=False)
    with pytest.warns(UserWarning, match="no fingerprint"):
        features = cached_features(model, loader, cache_dir=tmp_path, progress=False)
    assert len(features) == 4 and not list(tmp_path.iterdir())
