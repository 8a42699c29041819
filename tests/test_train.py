import json

import pytest
import torch

import tlkit
from tlkit.transforms import IMAGENET_NORM


@pytest.fixture(scope="module")
def color_splits(tmp_path_factory):
    from conftest import write_images

    root = tmp_path_factory.mktemp("colors")
    for k, (name, color) in enumerate({"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}.items()):
        write_images(root / name, 16, color, seed=k)
    return tlkit.load_dataset(str(root), seed=0, val_fraction=0.25)


def _loaders(splits, model, batch_size=8, seed=0):
    tf = tlkit.eval_transform(32, model.normalization)
    return (
        tlkit.make_loader(splits.train, tf, batch_size, shuffle=True, seed=seed),
        tlkit.make_loader(splits.val, tf, batch_size, shuffle=False),
    )


def test_fit_learns_an_easy_task_and_records_history(color_splits):
    tlkit.set_seed(0)
    model = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 3, weights="imagenet"))
    train, val = _loaders(color_splits, model)
    history = tlkit.fit(model, train, val, epochs=4, lr=1e-2, progress=False)
    assert history.epoch == [1, 2, 3, 4] and len(history.val_acc) == 4
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.val_acc[-1] == 1.0
    assert json.loads(json.dumps(history.to_dict()))["epoch"] == [1, 2, 3, 4]


def test_cached_features_train_the_same_head_as_the_uncached_path(color_splits):
    tlkit.set_seed(0)
    slow = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 3, weights="imagenet"))
    fast = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 3, weights="imagenet"))
    fast.head.load_state_dict(slow.head.state_dict())
    train, val = _loaders(color_splits, slow)
    tlkit.set_seed(1)
    h_slow = tlkit.fit(slow, train, val, epochs=3, lr=1e-2, progress=False)

    plain_train = tlkit.make_loader(color_splits.train, tlkit.eval_transform(32, fast.normalization), 8, shuffle=False)
    features = tlkit.extract_features(fast, plain_train, progress=False)
    val_features = tlkit.extract_features(fast, val, progress=False)
    tlkit.set_seed(1)
    h_fast = tlkit.fit_head(fast, features, val_features, epochs=3, batch_size=8, seed=0, lr=1e-2, progress=False)

    assert h_fast.val_acc == h_slow.val_acc
    assert h_fast.train_loss == pytest.approx(h_slow.train_loss, rel=1e-4)
    assert torch.allclose(fast.head.weight, slow.head.weight, atol=1e-5)


def test_feature_cache_refuses_random_augmentation(color_splits):
    model = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 3, weights="imagenet"))
    loader = tlkit.make_loader(color_splits.train, tlkit.train_transform(32, IMAGENET_NORM, "basic"), 8, shuffle=False)
    with pytest.raises(ValueError, match="random"):
        tlkit.extract_features(model, loader, progress=False)


def test_fit_head_needs_a_frozen_backbone(color_splits):
    model = tlkit.create_model("efficientnet_lite0", 3, weights="imagenet")
    data = torch.utils.data.TensorDataset(torch.randn(4, 1280), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="freeze every block below the head"):
        tlkit.fit_head(model, data, data, epochs=1, batch_size=2)


def test_early_stopping_and_restore_best():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 2, (64,))
    data = torch.utils.data.TensorDataset(x, y)
    noise = torch.utils.data.TensorDataset(torch.randn(32, 5), torch.randint(0, 2, (32,)))
    model = torch.nn.Linear(5, 2)
    loader = tlkit.make_loader(data, None, 16, shuffle=True)
    history = tlkit.fit(model, loader, tlkit.make_loader(noise, None, 16, shuffle=False), epochs=50, lr=0.5,
                        early_stopping_patience=2, restore_best=True, progress=False)
    assert len(history) < 50
    best = max(history.val_acc)
    assert tlkit.evaluate(model, tlkit.make_loader(noise, None, 16, shuffle=False))["acc"] == pytest.approx(best)


def test_results_file_is_flat_and_checked(tmp_path):
    path = tmp_path / "r" / "m.json"
    tlkit.write_results(path, {"val_acc": torch.tensor(0.5), "dataset": "digits", "epochs": 3})
    assert json.loads(path.read_text()) == {"val_acc": 0.5, "dataset": "digits", "epochs": 3}
    with pytest.raises(ValueError, match="fractions"):
        tlkit.write_results(None, {"val_acc": 93.0})
    with pytest.raises(TypeError, match="only numbers and strings"):
        tlkit.write_results(None, {"history": [1, 2]})


def test_fit_trains_on_the_batches_the_loader_gives_alone():
    data = torch.utils.data.TensorDataset(torch.randn(40, 3), torch.arange(40) % 2)
    expected = [y.tolist() for _, y in tlkit.make_loader(data, None, 8, shuffle=True, seed=3)]
    seen = []

    def recording_loss(logits, y):
        seen.append(y.tolist())
        return torch.nn.functional.cross_entropy(logits, y)

    for progress in (False, True):  # the progress bar must not iterate the loader an extra time
        seen.clear()
        loader = tlkit.make_loader(data, None, 8, shuffle=True, seed=3)
        tlkit.fit(torch.nn.Linear(3, 2), loader, loader, epochs=1, progress=progress, loss_fn=recording_loss)
        assert seen == expected
