import copy
import inspect
import json

import numpy as np
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
                        callbacks=[tlkit.EarlyStopping(2), tlkit.RestoreBest()], progress=False)
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


# --- fit's callbacks -------------------------------------------------------------------------------------


def _linear_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes
    data = torch.utils.data.TensorDataset(x, y)
    return tlkit.make_loader(data, None, 8, shuffle=True, seed=seed), tlkit.make_loader(data, None, 16, shuffle=False)


def test_fit_takes_at_most_twelve_parameters():
    assert len(inspect.signature(tlkit.fit).parameters) <= 12


def test_callbacks_run_in_order_after_the_row_and_the_scheduler_and_stop_ends_training():
    seen, ended = [], []

    class StopAtTwo(tlkit.Callback):
        def on_epoch_end(self, state):
            seen.append(("stop", state.epoch, len(state.history), state.history.lr[-1], state.optimizer.param_groups[0]["lr"]))
            state.stop = state.epoch == 2

        def on_fit_end(self, state):
            ended.append(state.history.epoch[-1])

    def after(state):  # a plain function runs as an on_epoch_end
        seen.append(("after", state.epoch))

    train, val = _linear_task()
    halve = lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    history = tlkit.fit(torch.nn.Linear(5, 3), train, val, epochs=5, lr=0.1, scheduler=halve, progress=False,
                        callbacks=[StopAtTwo(), after])
    assert history.epoch == [1, 2]
    assert seen == [("stop", 1, 1, 0.1, 0.05), ("after", 1), ("stop", 2, 2, 0.05, 0.025), ("after", 2)]
    assert ended == [2]
    with pytest.raises(TypeError, match="callbacks must be"):
        tlkit.fit(torch.nn.Linear(5, 3), train, val, epochs=1, progress=False, callbacks=[3])


def test_val_logits_are_the_validation_pass_that_evaluate_scores():
    train, val = _linear_task()
    model = torch.nn.Linear(5, 3)
    kept = {}

    def keep(state):
        kept["logits"], kept["labels"] = state.val_logits, state.val_labels

    history = tlkit.fit(model, train, val, epochs=2, lr=0.05, progress=False, callbacks=[keep])
    logits, labels = kept["logits"], kept["labels"]
    x, y = val.dataset.tensors
    assert logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.shape == (48, 3)
    assert torch.equal(labels, y)
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-6)
    acc = (logits.argmax(1) == labels).float().mean().item()
    assert acc == pytest.approx(history.val_acc[-1]) and acc == pytest.approx(tlkit.evaluate(model, val)["acc"])
    assert torch.nn.functional.cross_entropy(logits, labels).item() == pytest.approx(history.val_loss[-1], rel=1e-5)


@pytest.mark.parametrize(
    "losses, stops",
    [([1.0, 0.9, 0.95], False), ([1.0, 0.9, 0.95, 0.95], True), ([1.0, 1.0, 1.0], True), ([1.0, 2.0, 0.5], False)],
)
def test_early_stopping_waits_patience_epochs_without_a_strictly_lower_val_loss(losses, stops):
    history = tlkit.History()
    for epoch, loss in enumerate(losses, 1):
        history.append(epoch=epoch, train_loss=1.0, train_acc=0.5, val_loss=loss, val_acc=0.5, lr=0.1, epoch_time=1.0)
    state = tlkit.train.FitState(None, None, None, None, None, epoch=len(losses), history=history)
    tlkit.EarlyStopping(2).on_epoch_end(state)
    assert state.stop is stops


def test_early_stopping_counts_from_the_history_it_continues():
    train, val = _linear_task()
    earlier = tlkit.History()
    for epoch, loss in ((1, 0.0), (2, 5.0)):  # the best loss (unbeatable) at epoch 1; epoch 2 already worse
        earlier.append(epoch=epoch, train_loss=1.0, train_acc=0.5, val_loss=loss, val_acc=0.5, lr=1e-3, epoch_time=1.0)
    history = tlkit.fit(torch.nn.Linear(5, 3), train, val, epochs=5, progress=False, resume_from=earlier,
                        callbacks=[tlkit.EarlyStopping(2)])
    assert history is earlier and history.epoch == [1, 2, 3]  # one more epoch without improvement makes 2


def test_restore_best_puts_back_the_weights_of_the_first_best_val_accuracy():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 5), torch.randint(0, 2, (64,)))
    noise = tlkit.make_loader(torch.utils.data.TensorDataset(torch.randn(32, 5), torch.randint(0, 2, (32,))), None, 16, shuffle=False)
    model, weights = torch.nn.Linear(5, 2), []
    history = tlkit.fit(model, tlkit.make_loader(data, None, 16, shuffle=True), noise, epochs=8, lr=0.5, progress=False,
                        callbacks=[tlkit.RestoreBest(), lambda state: weights.append(copy.deepcopy(state.model.state_dict()))])
    best = int(np.argmax(history.val_acc))
    assert best < len(history) - 1  # else the test could not tell
    assert all(torch.equal(value, weights[best][name]) for name, value in model.state_dict().items())


def test_save_checkpoint_writes_every_epoch_and_resuming_checks_its_classes(tmp_path):
    train, val = _linear_task()
    path = tmp_path / "c.pt"
    on_disk = []
    tlkit.fit(torch.nn.Linear(5, 3), train, val, epochs=2, progress=False,
              callbacks=[tlkit.SaveCheckpoint(path, ["a", "b", "c"]), lambda state: on_disk.append(tlkit.read_checkpoint(path).epoch)])
    assert on_disk == [1, 2] and tlkit.read_checkpoint(path).classes == ["a", "b", "c"]
    resumed = tlkit.fit(torch.nn.Linear(5, 3), train, val, epochs=1, progress=False, resume_from=path,
                        callbacks=[tlkit.SaveCheckpoint(path, ["a", "b", "c"])])
    assert resumed.epoch == [1, 2, 3] and tlkit.read_checkpoint(path).epoch == 3
    with pytest.raises(tlkit.checkpoints.CheckpointError, match="classes: checkpoint has"):
        tlkit.fit(torch.nn.Linear(5, 3), train, val, epochs=1, progress=False, resume_from=path,
                  callbacks=[tlkit.SaveCheckpoint(path, ["x", "y", "z"])])


def _history_of(val_loss, val_acc):
    history = tlkit.History()
    for epoch, (loss, acc) in enumerate(zip(val_loss, val_acc), 1):
        history.append(epoch=epoch, train_loss=1.0, train_acc=0.5, val_loss=loss, val_acc=acc, lr=0.1, epoch_time=1.0)
    return history


@pytest.mark.parametrize(
    "accs, stops",
    [([0.5, 0.6, 0.55], False), ([0.5, 0.6, 0.55, 0.6], True), ([0.5, 0.5, 0.5], True), ([0.5, 0.4, 0.7], False)],
)
def test_early_stopping_on_val_acc_waits_patience_epochs_without_a_strictly_higher_accuracy(accs, stops):
    falling_loss = [1.0 / epoch for epoch in range(1, len(accs) + 1)]  # the loss alone would never stop it
    state = tlkit.train.FitState(None, None, None, None, None, epoch=len(accs), history=_history_of(falling_loss, accs))
    stopping = tlkit.EarlyStopping(2, monitor="val_acc")
    stopping.on_epoch_end(state)
    assert state.stop is stops
    assert stopping.stopped_epoch == (len(accs) if stops else None)
    by_loss = tlkit.train.FitState(None, None, None, None, None, epoch=len(accs), history=_history_of(falling_loss, accs))
    tlkit.EarlyStopping(2).on_epoch_end(by_loss)
    assert by_loss.stop is False


def test_early_stopping_on_val_acc_ends_fit_and_restore_best_keeps_the_best_epoch():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 5), torch.randint(0, 2, (64,)))
    noise = tlkit.make_loader(torch.utils.data.TensorDataset(torch.randn(32, 5), torch.randint(0, 2, (32,))), None, 16, shuffle=False)
    model, stopping = torch.nn.Linear(5, 2), tlkit.EarlyStopping(3, monitor="val_acc")
    history = tlkit.fit(model, tlkit.make_loader(data, None, 16, shuffle=True), noise, epochs=60, lr=0.5, progress=False,
                        callbacks=[stopping, tlkit.RestoreBest()])
    best = history.best_epoch()
    assert len(history) < 60 and stopping.stopped_epoch == history.epoch[-1] == best + 3
    assert tlkit.evaluate(model, noise)["acc"] == pytest.approx(max(history.val_acc))


@pytest.mark.parametrize("kw, message", [(dict(patience=0), "patience"), (dict(patience=2, monitor="train_acc"), "monitor")])
def test_early_stopping_refuses_a_bad_patience_or_monitor(kw, message):
    with pytest.raises(ValueError, match=message):
        tlkit.EarlyStopping(**kw)


def test_on_batch_end_runs_after_every_optimizer_step_and_can_set_the_learning_rate():
    data = torch.utils.data.TensorDataset(torch.randn(20, 3), torch.arange(20) % 2)
    loader = tlkit.make_loader(data, None, 8, shuffle=False)  # 3 steps per epoch
    model = torch.nn.Linear(3, 2)
    seen, weights = [], []

    class StopAfterTwoSteps(tlkit.Callback):  # a per-step schedule: lr 0 from the third step on
        def on_batch_end(self, state):
            seen.append((state.epoch, state.step))
            weights.append(state.model.weight.detach().clone())
            if state.step == 2:
                for group in state.optimizer.param_groups:
                    group["lr"] = 0.0

    tlkit.fit(model, loader, loader, epochs=2, lr=0.1, progress=False, callbacks=[StopAfterTwoSteps()])
    assert seen == [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5), (2, 6)]
    assert not torch.equal(weights[0], weights[1])  # the second step moved the weights
    assert all(torch.equal(weights[1], w) for w in weights[2:])  # lr 0 from then on: none of the later steps did
