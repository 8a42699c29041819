"""Training that cannot go on is stopped and named (issue 32): a nan loss, a non-finite learning rate, an empty loader, a
freeze panel without what it needs, and fit started where SIGINT is ignored."""

import math
import signal

import pytest
import torch
from conftest import TOY_CLASSES, toy_tensors
from test_interruptions import InterruptAt  # the same Ctrl-C stand-in as the interruption tests
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import tlkit
from tlkit.lr_finder import lr_find
from tlkit.optim import make_optimizer
from tlkit.train import NonFiniteLossError


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))


def toy_loaders(batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    train, val = toy_tensors()
    return tlkit.make_loader(train, None, batch_size, shuffle=False), tlkit.make_loader(val, None, batch_size, shuffle=False)


class NanFrom(nn.Module):
    """Cross-entropy that turns nan from call number ``at`` on, as a diverging run does: its gradients make every weight nan."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, logits, y):
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, y)
        return loss * math.nan if self.calls >= self.at else loss


class Record(tlkit.Callback):
    def __init__(self):
        self.epochs, self.handlers = [], []

    def on_epoch_end(self, state):
        self.epochs.append(state.epoch)
        self.handlers.append(signal.getsignal(signal.SIGINT))


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# --- case 3: a nan loss stops fit before any callback saves ----------------------------------------


def test_a_nan_loss_stops_fit_before_the_checkpoint_is_replaced_and_names_epoch_batch_and_causes(tmp_path):
    train_loader, val_loader = toy_loaders()  # 4 training batches per epoch
    record, path = Record(), tmp_path / "ckpt.pt"
    with pytest.raises(NonFiniteLossError) as stopped:
        tlkit.fit(tiny_model(), train_loader, val_loader, epochs=3, progress=False, loss_fn=NanFrom(at=6),
                  callbacks=[tlkit.SaveCheckpoint(path, TOY_CLASSES), record])
    message = str(stopped.value)
    assert "The training loss is nan at epoch 2, batch 2 of 4" in message
    assert "a learning rate too high (the optimizer's lr=0.001 now" in message and "nan or inf in the inputs" in message
    assert f"the checkpoint {path} was not replaced" in message and "load_checkpoint" in message
    assert isinstance(stopped.value, FloatingPointError)
    assert record.epochs == [1]  # no callback ran on the nan epoch
    assert stopped.value.history.epoch == [1] and all(math.isfinite(v) for v in stopped.value.history.train_loss)
    saved = tlkit.read_checkpoint(path)
    assert saved.epoch == 1 and all_finite(saved.model)  # the good epoch-1 checkpoint survives


def test_nan_inputs_in_the_first_batch_are_not_blamed_on_the_learning_rate():
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 2)
    x[0, 0, 0, 0] = math.nan
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, batch 1 of 2: .*before any optimizer step, so the learning rate is not the cause"):
        tlkit.fit(tiny_model(), loader, loader, epochs=1, progress=False)


def test_a_nan_validation_loss_stops_fit_too():
    train_loader, _ = toy_loaders()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    x[1] = math.inf
    val_loader = DataLoader(TensorDataset(x, y), batch_size=4)
    record = Record()
    with pytest.raises(NonFiniteLossError, match="The validation loss is nan at epoch 1, batch 1 of 1") as stopped:
        tlkit.fit(tiny_model(), train_loader, val_loader, epochs=2, progress=False, callbacks=[record])
    assert "validation inputs or labels" in str(stopped.value)
    assert record.epochs == [] and stopped.value.history.epoch == []


@pytest.mark.parametrize("lr", [math.inf, math.nan, -math.inf])
def test_fit_refuses_a_learning_rate_that_is_not_finite(lr):
    train_loader, val_loader = toy_loaders()
    with pytest.raises(ValueError, match=rf"lr must be a positive number, got {lr!r}: a learning rate must be finite"):
        tlkit.fit(tiny_model(), train_loader, val_loader, epochs=1, lr=lr, progress=False)


def test_fit_refuses_an_optimizer_with_a_non_finite_learning_rate_or_weight_decay():
    train_loader, val_loader = toy_loaders()
    model = tiny_model()
    with pytest.raises(ValueError, match=r"optimizer.param_groups\[0\] lr must be a positive number, got inf"):
        tlkit.fit(model, train_loader, val_loader, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=math.inf), progress=False)
    with pytest.raises(ValueError, match=r"optimizer.param_groups\[0\] weight_decay must be a finite number of at least 0.*got inf"):
        tlkit.fit(model, train_loader, val_loader, epochs=1, progress=False,
                  optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=math.inf))


@pytest.fixture(scope="module")
def transfer_model() -> tlkit.TransferModel:
    torch.manual_seed(0)
    return tlkit.freeze(tlkit.create_model("efficientnet_lite0", 3, weights=None))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": math.inf}, "lr must be a positive number, got inf: a learning rate must be finite"),
        ({"lr": math.nan}, "lr must be a positive number, got nan: a learning rate must be finite"),
        ({"lr": 1e-3, "weight_decay": math.nan}, "weight_decay must be a finite number of at least 0"),
        ({"lr": 1e-3, "weight_decay": math.inf}, "weight_decay must be a finite number of at least 0"),
        ({"lr": 1e-3, "lr_mult": {"head": math.inf}}, "lr_mult values must be positive finite numbers"),
    ],
)
def test_make_optimizer_refuses_non_finite_rates(transfer_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(transfer_model, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"end_lr": math.inf}, "end_lr must be a positive number, got inf: a learning rate must be finite"),
        ({"start_lr": math.nan}, "start_lr must be a positive number, got nan"),
        ({"weight_decay": math.inf}, "weight_decay must be a finite number of at least 0"),
    ],
)
def test_lr_find_refuses_non_finite_ranges(kwargs, message):
    train_loader, _ = toy_loaders()
    with pytest.raises(ValueError, match=message):
        lr_find(tiny_model(), train_loader, num_steps=2, **kwargs)


# --- case 8: empty loaders are refused, naming the split --------------------------------------------


def empty_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long)), batch_size=4)


def test_fit_refuses_an_empty_train_loader():
    _, val_loader = toy_loaders()
    with pytest.raises(ValueError, match=r"fit: train_loader has no batches: its dataset is empty \(0 items\)"):
        tlkit.fit(tiny_model(), empty_loader(), val_loader, epochs=1, progress=False)


def test_fit_refuses_an_empty_val_loader_before_training():
    train_loader, _ = toy_loaders()
    record = Record()
    with pytest.raises(ValueError, match="fit: val_loader has no batches"):
        tlkit.fit(tiny_model(), train_loader, empty_loader(), epochs=1, progress=False, callbacks=[record])
    assert record.epochs == []


def test_a_batch_larger_than_the_data_with_drop_last_says_what_to_change():
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    loader = DataLoader(TensorDataset(x, y), batch_size=8, drop_last=True)
    with pytest.raises(ValueError, match=r"train_loader has no batches: its dataset has 3 item\(s\), fewer than batch_size=8, and drop_last=True"):
        tlkit.fit(tiny_model(), loader, loader, epochs=1, progress=False)


def test_evaluate_refuses_an_empty_loader():
    with pytest.raises(ValueError, match="evaluate: loader has no batches: its dataset is empty"):
        tlkit.evaluate(tiny_model(), empty_loader())


class Nothing(IterableDataset):
    def __iter__(self):
        return iter(())


def test_a_loader_without_a_length_that_yields_nothing_is_refused_after_its_pass():
    train_loader, _ = toy_loaders()
    with pytest.raises(ValueError, match="fit: val_loader has no batches: it yielded nothing"):
        tlkit.fit(tiny_model(), train_loader, DataLoader(Nothing(), batch_size=4), epochs=1, progress=False)


# --- case 14: the freeze panel says what it needs, in the panel ---------------------------------------


def test_freeze_panel_on_a_plain_module_says_how_to_get_a_transfer_model():
    with pytest.raises(TypeError, match=r"FreezePanel needs a tlkit.TransferModel.*got Sequential\. Build the model with tlkit.create_model"):
        tlkit.FreezePanel(tiny_model())


@pytest.fixture
def frozen_panel(transfer_model) -> tlkit.FreezePanel:
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    panel = tlkit.FreezePanel(transfer_model, loader, loader, epochs=1, lr_find_steps=2)
    panel.toggles["head"].value = False  # nothing trains
    return panel


def panel_text(panel: tlkit.FreezePanel) -> str:
    return "".join(output.get("text", "") for output in panel.output.outputs)


def test_train_button_with_nothing_trainable_shows_why_in_the_panel(frozen_panel):
    frozen_panel.train_button.click()
    assert "Train: The model has no trainable parameters: press at least the head's toggle" in panel_text(frozen_panel)


def test_find_lr_button_with_nothing_trainable_shows_why_in_the_panel(frozen_panel):
    frozen_panel.find_lr_button.click()
    assert "Find LR: The model has no trainable parameters: press at least the head's toggle" in panel_text(frozen_panel)
    frozen_panel.find_lr_button.click()  # a second click replaces the message rather than adding one
    assert panel_text(frozen_panel).count("Find LR:") == 1


# --- case 15: SIGINT ignored on purpose stays ignored ----------------------------------------------




@pytest.fixture
def sigint_ignored():
    """SIGINT ignored, as in a job started with nohup or in the background; the handler is put back afterwards."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, before)


def test_fit_leaves_an_ignored_sigint_ignored_so_a_nohup_run_is_not_interrupted(sigint_ignored):
    train_loader, val_loader = toy_loaders()
    record = Record()
    try:
        history = tlkit.fit(tiny_model(), train_loader, val_loader, epochs=2, progress=False, loss_fn=InterruptAt(at=2),
                            callbacks=[record])
    except KeyboardInterrupt:
        pytest.fail("fit turned a SIGINT that the shell ignored into an interrupt")
    assert history.epoch == [1, 2] and not history.interrupted
    assert record.handlers == [signal.SIG_IGN, signal.SIG_IGN]  # fit installed no handler of its own
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as Jupyter runs a cell: fit handles Ctrl-C itself
    record = Record()
    tlkit.fit(tiny_model(), train_loader, val_loader, epochs=1, progress=False, callbacks=[record])
    assert record.handlers[0] not in (signal.default_int_handler, signal.SIG_IGN)  # fit's: stop at the next batch boundary
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
