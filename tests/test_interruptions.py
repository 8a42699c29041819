"""Stopping fit with Ctrl-C, out-of-memory messages, bad training parameters and devices."""

import math
import os
import signal

import pytest
import torch
from conftest import TOY_CLASSES, toy_lite0, toy_tensors
from torch import nn

import tlkit
from tlkit.train import History, TrainingInterrupted


class InterruptAt(nn.Module):
    """Cross-entropy that sends this process a SIGINT (as Ctrl-C or Jupyter's stop button do) at call number ``at``."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, logits, y):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return nn.functional.cross_entropy(logits, y)


@pytest.fixture(autouse=True)
def sigint_raises_keyboard_interrupt():
    """These tests send SIGINT as Ctrl-C does: give it Python's default handler whatever the shell that started pytest
    did with it (a background job or nohup ignores SIGINT, and fit then leaves it ignored, so nothing would stop)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _fit(tmp_path, epochs, *, loss_fn=None, resume=False, callbacks=(), **kwargs):
    train, val = toy_tensors()
    model = toy_lite0()
    tlkit.set_seed(123)
    loader = tlkit.make_loader(train, None, 16, shuffle=True, seed=7)  # 4 batches per epoch
    val_loader = tlkit.make_loader(val, None, 16, shuffle=False)
    history = tlkit.fit(
        model, loader, val_loader, epochs=epochs, lr=3e-3, progress=False, loss_fn=loss_fn,
        callbacks=[tlkit.SaveCheckpoint(tmp_path / "ckpt.pt", TOY_CLASSES), *callbacks],
        resume_from=tmp_path / "ckpt.pt" if resume else None, **kwargs,
    )
    return model, history


def test_ctrl_c_stops_at_a_batch_boundary_keeps_history_and_checkpoint_and_resumes_exactly(tmp_path):
    loss = InterruptAt(at=6)  # the 2nd batch of epoch 2
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stopped:
        _fit(tmp_path, 3, loss_fn=loss)
    assert loss.calls == 6  # the batch that got the signal finished; no further batch started
    assert stopped.value.history.epoch == [1] and stopped.value.history.interrupted
    assert "resume_from" in str(stopped.value) and "epoch 2" in str(stopped.value)
    assert isinstance(stopped.value, KeyboardInterrupt)  # so Jupyter's "run all" stops too
    assert signal.getsignal(signal.SIGINT) is before  # the handler was put back
    assert tlkit.read_checkpoint(tmp_path / "ckpt.pt").epoch == 1

    resumed, h_resumed = _fit(tmp_path, 1, resume=True)
    (tmp_path / "whole").mkdir()
    whole, h_whole = _fit(tmp_path / "whole", 2)
    assert h_resumed.epoch == [1, 2] and not h_resumed.interrupted
    assert h_resumed.train_loss == pytest.approx(h_whole.train_loss, rel=1e-5)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_an_interrupt_in_the_first_epoch_raises_with_an_empty_history(tmp_path):
    with pytest.raises(TrainingInterrupted) as stopped:
        _fit(tmp_path, 3, loss_fn=InterruptAt(at=2))
    history = stopped.value.history
    assert history.interrupted and len(history) == 0
    assert "Training interrupted during epoch 1" in str(stopped.value)
    assert not (tmp_path / "ckpt.pt").exists()  # no epoch was complete


class Record(tlkit.Callback):
    def __init__(self):
        self.epochs, self.ended = [], 0

    def on_epoch_end(self, state):
        self.epochs.append(state.epoch)

    def on_fit_end(self, state):
        self.ended += 1


def test_an_interrupt_runs_on_fit_end_keeps_the_checkpoint_and_names_it(tmp_path):
    record = Record()
    with pytest.raises(TrainingInterrupted) as stopped:
        _fit(tmp_path, 3, loss_fn=InterruptAt(at=6), callbacks=[record])  # during epoch 2
    assert record.epochs == [1] and record.ended == 1  # the callbacks finished before the error was raised
    assert f"in the checkpoint {tmp_path / 'ckpt.pt'} (epoch 1)" in str(stopped.value)
    assert tlkit.read_checkpoint(tmp_path / "ckpt.pt").history["epoch"] == [1]


def test_an_interrupt_without_a_checkpoint_says_how_to_keep_one():
    train, _ = toy_tensors()
    loader = tlkit.make_loader(train, None, 16, shuffle=False)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    with pytest.raises(TrainingInterrupted, match=r"callbacks=\[tlkit.SaveCheckpoint\(path, classes\)\]") as stopped:
        tlkit.fit(model, loader, loader, epochs=2, progress=False, loss_fn=InterruptAt(at=6))
    assert stopped.value.history.epoch == [1]


def test_a_second_interrupt_stops_at_once(tmp_path):
    class Twice(InterruptAt):
        def forward(self, logits, y):
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)  # raises KeyboardInterrupt in the handler, mid-batch
            return nn.functional.cross_entropy(logits, y)

    with pytest.raises(TrainingInterrupted) as stopped:
        _fit(tmp_path, 2, loss_fn=Twice(at=5))
    assert stopped.value.history.epoch == [1]


class RaisesOOM(nn.Module):
    def forward(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_suggests_a_smaller_batch():
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    loader = tlkit.make_loader(data, None, 8, shuffle=False)
    model = nn.Sequential(nn.Linear(4, 2), RaisesOOM())
    with pytest.raises(torch.OutOfMemoryError, match=r"batch_size=8\. Try batch_size=4") as err:
        tlkit.fit(model, loader, loader, epochs=1, progress=False)
    assert "Tried to allocate" in str(err.value.__cause__)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "epochs must be a whole number of at least 1, got 0"),
        ({"epochs": -2}, "epochs must be a whole number of at least 1, got -2"),
        ({"epochs": 2.5}, "epochs must be a whole number of at least 1, got 2.5"),
        ({"epochs": 1, "lr": 0}, "lr must be a positive number, got 0"),
        ({"epochs": 1, "lr": -1e-3}, "lr must be a positive number, got -0.001"),
        ({"epochs": 1, "lr": "fast"}, "lr must be a positive number, got 'fast'"),
    ],
)
def test_bad_training_parameters_are_named(kwargs, message):
    data = torch.utils.data.TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))
    loader = tlkit.make_loader(data, None, 2, shuffle=False)
    with pytest.raises(ValueError, match=message):
        tlkit.fit(nn.Linear(4, 2), loader, loader, progress=False, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda", "device='cuda' was asked for but no CUDA GPU is available; use device='auto' or 'cpu'"),
        ("cuda:1", "no CUDA GPU is available"),
        ("gpu", "device='gpu' is not a device name; use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("mps", "device='mps' is not available on this machine"),
    ],
)
def test_a_device_that_is_not_there_is_a_clear_error(device, message):
    with pytest.raises(ValueError, match=message):
        tlkit.get_device(device)


def test_history_records_throughput_and_nan_gpu_figures_on_cpu():
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.zeros(32, dtype=torch.long))
    loader = tlkit.make_loader(data, None, 8, shuffle=False)
    history = tlkit.fit(nn.Linear(4, 2), loader, loader, epochs=2, progress=False)
    assert len(history.images_per_s) == 2 and all(v > 0 for v in history.images_per_s)
    assert all(math.isnan(v) for v in history.gpu_mem_peak_gb) and not history.has_gpu_figures()


def test_a_history_saved_before_the_gpu_fields_existed_still_loads():
    old = {"epoch": [1, 2], "train_loss": [1.0, 0.5], "train_acc": [0.5, 0.7], "val_loss": [1.0, 0.6],
           "val_acc": [0.5, 0.6], "lr": [0.1, 0.1], "epoch_time": [1.0, 1.0]}
    history = History(**old)
    history.append(epoch=3, train_loss=0.4, train_acc=0.8, val_loss=0.5, val_acc=0.7, lr=0.1, epoch_time=1.0)
    assert len(history.images_per_s) == len(history.gpu_util) == 3


def test_gpu_figures_get_their_own_panels():
    history = History()
    for epoch in (1, 2):
        history.append(epoch=epoch, train_loss=1.0, train_acc=0.5, val_loss=1.0, val_acc=0.5, lr=0.1, epoch_time=1.0,
                       images_per_s=900.0, gpu_mem_peak_gb=2.5, gpu_util=80.0)
    assert history.has_gpu_figures()
    labels = [ax.get_ylabel() for ax in tlkit.plot_history(history).axes]
    assert labels[2:] == ["training images / s", "peak GPU memory (GB)", "GPU utilization (%)"]
    cpu_only = History(**{k: v for k, v in history.to_dict().items() if k not in ("gpu_mem_peak_gb", "gpu_util")})
    assert len(tlkit.plot_history(cpu_only).axes) == 2
