"""The freeze panel's state logic, driven headless by setting its widgets' values in Python."""

import os
import signal
import warnings

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


def adam_steps(optimizer: torch.optim.Optimizer, block: str) -> list[int]:
    """AdamW's step count for each parameter of ``block``'s group."""
    group = next(g for g in optimizer.param_groups if g["name"] == block)
    return [int(optimizer.state[p]["step"]) for p in group["params"]]


def test_a_second_train_keeps_the_optimizer_and_its_state_and_adds_the_new_block(panel):
    panel.train_button.click()  # the head alone: 2 batches of 3
    optimizer = panel.optimizer
    head_moment = optimizer.state[panel.model.head.weight]["exp_avg"].clone()
    assert adam_steps(optimizer, "head") == [2, 2]
    panel.toggles["top"].value = True
    panel.train_button.click()
    assert panel.optimizer is optimizer
    assert [g["name"] for g in optimizer.param_groups] == ["head", "top"]
    assert adam_steps(optimizer, "head") == [4, 4]  # a new optimizer would count 2 again
    assert adam_steps(optimizer, "top") == [2, 2, 2]  # conv weight, BatchNorm weight and bias: joined for this Train
    assert not torch.equal(optimizer.state[panel.model.head.weight]["exp_avg"], head_moment)
    assert panel.history.epoch == [1, 2]
    assert "optimizer groups head, top" in panel.summary_html.value


def test_a_later_train_sets_the_groups_lrs_from_the_panel(panel):
    panel.toggles["top"].value = True
    panel.train()
    panel.lr.value = 0.002
    panel.multipliers["top"].value = 0.25
    optimizer = panel.prepare_optimizer()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.002, 0.0005])
    assert panel.train().lr == pytest.approx([0.01, 0.002])  # the history records the head group's lr per epoch


def test_a_block_frozen_again_keeps_its_group_and_state_but_does_not_move(panel):
    panel.toggles["top"].value = True
    panel.train()
    top = {k: v.clone() for k, v in panel.model.features.top.state_dict().items()}  # BatchNorm statistics too
    panel.toggles["top"].value = False
    panel.train()
    assert [g["name"] for g in panel.optimizer.param_groups] == ["head", "top"]
    assert adam_steps(panel.optimizer, "top") == [2, 2, 2] and adam_steps(panel.optimizer, "head") == [4, 4]
    assert all(torch.equal(v, panel.model.features.top.state_dict()[k]) for k, v in top.items())
    panel.toggles["top"].value = True
    panel.train()
    assert adam_steps(panel.optimizer, "top") == [4, 4, 4]  # continues with its kept moments


def test_training_after_freezing_every_block_says_what_to_do(panel):
    panel.train()
    panel.toggles["head"].value = False
    with pytest.raises(ValueError, match="no trainable parameters"):
        panel.train()


def test_reset_restores_the_starting_weights_buffers_and_frozen_blocks_and_drops_the_training_state(panel):
    start = {k: v.clone() for k, v in panel.model.state_dict().items()}
    requires_grad = [p.requires_grad for p in panel.model.parameters()]
    panel.toggles["top"].value = True
    panel.toggles["stage7"].value = True
    panel.bn_frozen.value = False
    panel.train()
    changed = [k for k, v in panel.model.state_dict().items() if not torch.equal(v, start[k])]
    assert "features.top.1.running_mean" in changed and "head.weight" in changed  # buffers too: the test can fail
    panel.reset_button.click()
    assert all(torch.equal(v, start[k]) for k, v in panel.model.state_dict().items())
    assert [p.requires_grad for p in panel.model.parameters()] == requires_grad
    assert [n for n, t in panel.toggles.items() if t.value] == ["head"] and panel.bn_frozen.value
    panel.model.train()
    assert not panel.model.features.top[1].training  # frozen again, so in eval mode
    assert panel.optimizer is None and panel.history is None
    assert "val acc" not in panel.summary_html.value and "optimizer" not in panel.summary_html.value
    assert panel.lr_labels["top"].value == "frozen"
    with warnings.catch_warnings():
        warnings.simplefilter("error", tlkit.train.RepeatedFitWarning)  # the restored weights count as a new model
        assert panel.train().epoch == [1]
    assert adam_steps(panel.optimizer, "head") == [2, 2]


def test_a_block_that_trained_in_part_joins_its_group_whole_and_reset_puts_the_part_back(panel):
    last = list(panel.model.features.top.parameters())[-1]
    last.requires_grad_(True)  # as apply_strategy("last_tensors") leaves a block
    partial = tlkit.FreezePanel(panel.model, panel.train_loader, panel.val_loader, lr=0.01, epochs=1)
    assert partial.toggles["top"].value
    optimizer = partial.prepare_optimizer()
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 1]
    partial.toggles["top"].value = False
    partial.toggles["top"].value = True  # now the whole block trains
    assert partial.prepare_optimizer() is optimizer
    assert [g["name"] for g in optimizer.param_groups] == ["head", "top"]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in panel.model.features.top.parameters()}
    partial.reset()
    assert [p.requires_grad for p in panel.model.features.top.parameters()] == [False, False, True]


def browser_number(value: float) -> str:
    """How the browser's number box writes ``value`` (JavaScript's Number to String: plain decimals from 1e-6 up)."""
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    if abs(value) >= 1e-6:
        return f"{value:.12f}".rstrip("0")  # exact for the 4 significant digits the box holds
    return repr(value)


def test_multiplier_boxes_are_wide_enough_for_every_value_they_can_hold(panel):
    # JupyterLab's 13px font in Chromium: digits under 8 px wide, 8 px padding each side; the label's 8 px margin and
    # the 2 px border come off the box (tests/test_browser.py measures the real boxes).
    px_per_char, padding, margin_and_border = 8, 2 * 8, 8 + 2
    box = panel.multipliers["stem"]
    label_px = int(box.style.description_width.removesuffix("px"))
    text_px = int(box.layout.width.removesuffix("px")) - label_px - margin_and_border
    longest = max((browser_number(float(f"{v:.4g}")) for v in (box.min * 1.2345, 0.001953125, box.max)), key=len)
    assert longest == "0.000001234"
    assert text_px >= len(longest) * px_per_char + padding, f"{longest!r} is cut in a box with {text_px} px for text"
    panel.layer_decay.value = 0.05  # 0.05 ** 9 for the stem: the box's minimum, written whole
    assert browser_number(panel.multipliers["stem"].value) == "0.000001"
    assert panel.multipliers["stage5"].value == 6.25e-06 and browser_number(6.25e-06) == "0.00000625"


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


@pytest.fixture
def sigint_raises_keyboard_interrupt():
    """Python's default SIGINT handler, as Jupyter gives a cell and a button's callback, whatever the shell that started
    pytest did with SIGINT (a background job or nohup ignores it, and fit then leaves it ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_an_interrupted_train_keeps_the_complete_epochs_and_raises_nothing(panel, sigint_raises_keyboard_interrupt):
    handler = signal.getsignal(signal.SIGINT)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    panel.train_loader = DataLoader(InterruptAt(x, y, at=8), batch_size=3)  # the 1st batch of epoch 2
    panel.epochs.value = 3
    history = panel.train()
    assert history.epoch == [1] and history.interrupted and panel.history is history
    assert signal.getsignal(signal.SIGINT) is handler  # the handler in place before Train was put back
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
