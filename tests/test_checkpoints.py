import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TOY_CLASSES, toy_lite0, toy_tensors

import tlkit
from tlkit.checkpoints import CheckpointError, load_checkpoint, model_from_checkpoint, read_checkpoint, save_checkpoint


def _run(tmp_path, epochs, resume=None, ckpt_name="ckpt.pt"):
    train, val = toy_tensors()
    model = toy_lite0()
    tlkit.set_seed(123)
    loader = tlkit.make_loader(train, None, 16, shuffle=True, seed=7)
    val_loader = tlkit.make_loader(val, None, 16, shuffle=False)
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    history = tlkit.fit(model, loader, val_loader, epochs=epochs, lr=3e-3, scheduler=sched, progress=False,
                        callbacks=[tlkit.SaveCheckpoint(tmp_path / ckpt_name, TOY_CLASSES)], resume_from=resume)
    return model, history


def test_two_plus_two_epochs_equal_four_in_one_go(tmp_path):
    whole, h_whole = _run(tmp_path, 4, ckpt_name="whole.pt")
    _run(tmp_path, 2, ckpt_name="half.pt")
    resumed, h_resumed = _run(tmp_path, 2, resume=tmp_path / "half.pt", ckpt_name="half.pt")
    assert h_resumed.epoch == [1, 2, 3, 4]
    assert h_resumed.lr == pytest.approx(h_whole.lr)
    assert h_resumed.train_loss == pytest.approx(h_whole.train_loss, rel=1e-5)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_checkpoint_holds_the_training_state(tmp_path):
    _run(tmp_path, 1)
    ckpt = read_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt.classes == TOY_CLASSES and ckpt.backbone == "efficientnet_lite0" and ckpt.weights == "imagenet"
    assert ckpt.epoch == 1 and ckpt.history["epoch"] == [1] and ckpt.tlkit_version == tlkit.__version__
    assert ckpt.optimizer["state"] and ckpt.scheduler["last_epoch"] == 1 and ckpt.loader_rng is not None
    model, _ = model_from_checkpoint(tmp_path / "ckpt.pt")
    assert torch.equal(model.head.weight, ckpt.model["head.weight"])


def test_checkpoint_from_other_classes_or_architecture_says_what_differs(tmp_path):
    model = tlkit.create_model("efficientnet_lite0", 4, weights=None)
    save_checkpoint(tmp_path / "c.pt", model, classes=TOY_CLASSES, epoch=1)
    with pytest.raises(CheckpointError, match=r"classes: checkpoint has \['a', 'b', 'c', 'd'\], expected \['a', 'b'\]"):
        load_checkpoint(tmp_path / "c.pt", tlkit.create_model("efficientnet_lite0", 2, weights=None), classes=["a", "b"])
    with pytest.raises(CheckpointError, match="shapes differ.*head.weight: \\(4, 1280\\) vs \\(2, 1280\\)"):
        load_checkpoint(tmp_path / "c.pt", tlkit.create_model("efficientnet_lite0", 2, weights=None))
    with pytest.raises(CheckpointError, match="backbone: checkpoint has 'efficientnet_lite0', model is 'resnet18'"):
        load_checkpoint(tmp_path / "c.pt", tlkit.create_model("resnet18", 4, weights=None))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "tlkit-checkpoint-1", "model": _Evil()}, path)
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        read_checkpoint(path)
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        read_checkpoint(path)


def test_not_a_checkpoint_and_missing_file(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a tlkit checkpoint"):
        read_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="No checkpoint at"):
        read_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "plain.pt").read_bytes()[:40])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(tmp_path / "trunc.pt")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "c.pt", model, classes=["x", "y"], epoch=1)

    def crash(obj, handle):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, torch.nn.Linear(3, 2), classes=["x", "y"], epoch=2)
    monkeypatch.undo()
    assert read_checkpoint(path).epoch == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


KILLED_SAVER = """
import sys, torch
from tlkit.checkpoints import save_checkpoint
model = torch.nn.Linear(4000, 4000)  # ~64 MB per save
epoch = 0
while True:
    epoch += 1
    save_checkpoint(sys.argv[1], model, classes=["a"], epoch=epoch)
    print(epoch, flush=True)
"""


def test_killing_a_save_midway_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "big.pt"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete checkpoint exists
        time.sleep(0.3)  # now it is in the middle of another save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = read_checkpoint(path)
    assert ckpt.epoch >= 1 and ckpt.model["weight"].shape == (4000, 4000)


def test_save_checkpoint_records_the_training_image_size_for_predict(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.arange(8) % 2)
    loader = tlkit.make_loader(data, None, 4, shuffle=False)
    tlkit.fit(torch.nn.Linear(3, 2), loader, loader, epochs=1, progress=False,
              callbacks=[tlkit.SaveCheckpoint(tmp_path / "m.pt", ["a", "b"], image_size=96)])
    assert tlkit.read_checkpoint(tmp_path / "m.pt").image_size == 96
    tlkit.fit(torch.nn.Linear(3, 2), loader, loader, epochs=1, progress=False, callbacks=[tlkit.SaveCheckpoint(tmp_path / "n.pt", ["a", "b"])])
    assert tlkit.read_checkpoint(tmp_path / "n.pt").image_size is None
