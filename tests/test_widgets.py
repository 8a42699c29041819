"""The freeze panel's state logic, driven headless by setting its widgets' values in Python."""

import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import tlkit


@pytest.fixture
def panel() -> tlkit.FreezePanel:
    tlkit.set_seed(0)
    model = tlkit.freeze(tlkit.create_model("efficientnet_lite0", 3))
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    return tlkit.FreezePanel(model, loader, loader, lr=0.01, epochs=1)


def test_panel_lists_blocks_in_order_and_starts_from_the_model(panel):
    assert list(panel.toggles) == tlkit.block_names(panel.model)
    assert [n for n, t in panel.toggles.items() if t.value] == ["head"]
    s = panel.summary()
    assert s["trainable"] == 1280 * 3 + 3
    assert s["trainable"] + s["frozen"] == sum(p.numel() for p in panel.model.parameters())
    assert "3,843" in panel.summary_html.value


def test_toggling_a_block_sets_requires_grad_bn_mode_and_the_counts(panel):
    panel.toggles["top"].value = True
    assert all(p.requires_grad for p in panel.model.features.top.parameters())
    assert not any(p.requires_grad for p in panel.model.features.stage7.parameters())
    assert panel.summary()["trainable"] == 1280 * 3 + 3 + 412160
    assert f"{1280 * 3 + 3 + 412160:,}" in panel.summary_html.value
    panel.model.train()
    assert panel.model.features.top[1].training and not panel.model.features.stage7[0].bn1.training
    panel.toggles["top"].value = False
    panel.model.train()
    assert not panel.model.features.top[1].training
    assert panel.summary()["trainable"] == 1280 * 3 + 3


def test_bn_checkbox_lets_frozen_blocks_train_their_batchnorm(panel):
    panel.bn_frozen.value = False
    panel.model.train()
    assert panel.model.features.stage7[0].bn1.training
    panel.bn_frozen.value = True
    assert not panel.model.features.stage7[0].bn1.training


def test_param_groups_follow_toggles_layer_decay_and_edited_multipliers(panel):
    panel.toggles["stage7"].value = True
    panel.toggles["top"].value = True
    panel.layer_decay.value = 0.5
    assert [g["name"] for g in panel.param_groups()] == ["head", "top", "stage7"]
    assert [g["lr"] for g in panel.param_groups()] == pytest.approx([0.01, 0.005, 0.0025])
    panel.multipliers["stage7"].value = 0.1
    assert [g["lr"] for g in panel.make_optimizer().param_groups] == pytest.approx([0.01, 0.005, 0.001])
    assert panel.lr_labels["stage7"].value == "lr 0.001" and panel.lr_labels["stage6"].value == "frozen"


def test_train_button_trains_with_the_chosen_groups_and_continues(panel):
    panel.toggles["top"].value = True
    before = panel.model.features.top[0].weight.clone()
    stage7 = panel.model.features.stage7[0].conv_pw.weight.clone()
    panel.train_button.click()
    assert len(panel.history) == 1
    assert [g["name"] for g in panel.optimizer.param_groups] == ["head", "top"]
    assert not torch.equal(panel.model.features.top[0].weight, before)
    assert torch.equal(panel.model.features.stage7[0].conv_pw.weight, stage7)
    panel.train_button.click()
    assert panel.history.epoch == [1, 2]


class InterruptAt(TensorDataset):
    """Sends this process a SIGINT (as Jupyter's stop button does) when item number ``at`` is loaded."""

    def __init__(self, *tensors, at):
        super().__init__(*tensors)
        self.at, self.calls = at, 0

    def __getitem__(self, index):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().__getitem__(index)


def test_an_interrupted_train_keeps_the_complete_epochs_and_raises_nothing(panel):
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    panel.train_loader = DataLoader(InterruptAt(x, y, at=8), batch_size=3)  # the 1st batch of epoch 2
    panel.epochs.value = 3
    history = panel.train()
    assert history.epoch == [1] and history.interrupted and panel.history is history
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    panel.epochs.value = 1
    panel.train_loader = DataLoader(TensorDataset(x, y), batch_size=3)
    assert panel.train().epoch == [1, 2]  # the next Train continues the count


def test_training_everything_frozen_says_what_to_do(panel):
    panel.toggles["head"].value = False
    with pytest.raises(ValueError, match="no trainable parameters"):
        panel.train()


def test_find_lr_button_fills_the_head_lr_with_the_suggestion_and_leaves_the_model_alone(panel):
    panel.toggles["top"].value = True
    panel.layer_decay.value = 0.5
    panel.lr_find_steps = 8
    state = {k: v.clone() for k, v in panel.model.state_dict().items()}
    panel.find_lr_button.click()
    result = panel.lr_finder
    assert result.multipliers == pytest.approx({"head": 1.0, "top": 0.5})  # the panel's blocks and multipliers
    assert len(result.lrs) <= 8
    assert panel.lr.value == pytest.approx(float(f"{result.suggestion:.3g}"), rel=1e-12)
    assert panel.lr_labels["head"].value == f"lr {panel.lr.value:.3g}"
    assert all(torch.equal(v, panel.model.state_dict()[k]) for k, v in state.items())
    assert [n for n, t in panel.toggles.items() if t.value] == ["top", "head"]


def test_lr_boxes_keep_small_values_whole(panel):
    panel.layer_decay.value = 0.5  # stem, 9 blocks below the head: 0.5 ** 9 = 0.001953125, not round(x, 4) = 0.002
    assert panel.multipliers["stem"].value == 0.001953
    panel.lr.value = 3.16e-5
    assert panel.lr.value == 3.16e-5 and panel.lr.readout_format == ".3g"
    assert f"{panel.lr.value:{panel.lr.readout_format}}" == "3.16e-05"


def test_find_lr_needs_a_training_loader():
    panel = tlkit.FreezePanel(tlkit.freeze(tlkit.create_model("efficientnet_lite0", 3)))
    assert panel.find_lr_button.disabled
    with pytest.raises(ValueError, match="needs a train_loader"):
        panel.find_lr()
