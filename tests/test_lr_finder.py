"""LR range test: suggestions, early stop, cached inputs, and that everything it touches is put back bit for bit; the BatchNorm report."""

import math

import numpy as np
import pytest
import torch
from conftest import toy_lite0, toy_tensors
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tlkit
from tlkit.lr_finder import _suggestions, batchnorm_report, lr_find


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader) -> dict:
    """Deep copies of every tensor and flag lr_find promises to leave as it found them."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "optimizer": [(k, v.clone()) for state in optimizer.state.values() for k, v in sorted(state.items())],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "loader_rng": loader.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    changed = [k for k in before["state"] if not torch.equal(before["state"][k], after["state"][k])]
    assert not changed, f"tensors changed: {changed[:5]}"
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert before["requires_grad"] == after["requires_grad"]
    assert before["modes"] == after["modes"]
    assert len(before["optimizer"]) == len(after["optimizer"])
    assert all(ka == kb and torch.equal(a, b) for (ka, a), (kb, b) in zip(before["optimizer"], after["optimizer"]))
    assert before["groups"] == after["groups"]
    assert torch.equal(before["loader_rng"], after["loader_rng"])
    assert torch.equal(before["torch_rng"], after["torch_rng"])


def image_loader(batch_size: int = 8) -> DataLoader:
    train, _ = toy_tensors()
    return tlkit.make_loader(train, None, batch_size, shuffle=True, seed=0)


def test_sweep_on_a_partly_frozen_lite0_with_layer_decay_leaves_everything_bit_for_bit():
    model = toy_lite0()  # frozen up to stage6: stage7, top and head train
    loader = image_loader()
    optimizer = tlkit.make_optimizer(model, 1e-3, layer_decay=0.5)
    x, y = next(iter(loader))
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # Adam moments, BatchNorm statistics and gradients that the sweep must not disturb
    model.eval()  # the sweep switches to train mode; it must come back in eval
    model.features.top.train()  # and a mixed state must come back as it was
    before = snapshot(model, optimizer, loader)

    result = lr_find(model, loader, layer_decay=0.5, num_steps=20)

    assert_same(before, snapshot(model, optimizer, loader))
    assert result.multipliers == pytest.approx({"head": 1.0, "top": 0.5, "stage7": 0.25})
    assert 1e-6 <= result.suggestion <= 1 and 1e-7 <= result.min_over_10 <= 0.1
    assert result.lrs[0] == pytest.approx(1e-6) and all(a < b for a, b in zip(result.lrs, result.lrs[1:]))
    assert len(result.losses) == len(result.smoothed) == len(result.lrs) <= 20
    assert result.diverged or len(result.lrs) == 20
    # the same sweep again gives the same curve: the RNGs and the model really were put back
    assert lr_find(model, loader, layer_decay=0.5, num_steps=20).losses == result.losses
    # a sweep from the optimizer's copy keeps its groups' ratios and leaves the optimizer itself alone
    from_optimizer = lr_find(model, loader, optimizer=optimizer, num_steps=8)
    assert from_optimizer.multipliers == pytest.approx({"head": 1.0, "top": 0.5, "stage7": 0.25})
    assert_same(before, snapshot(model, optimizer, loader))


def test_cached_features_sweep_the_head_alone_and_find_a_falling_loss():
    model = tlkit.freeze(toy_lite0())
    train, _ = toy_tensors()
    features = tlkit.extract_features(model, DataLoader(train, batch_size=32), progress=False)
    loader = tlkit.make_loader(features, None, 16, shuffle=True, seed=0)
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    result = lr_find(model, loader, num_steps=40, end_lr=10.0)  # features in: the head is found by their width
    assert result.multipliers == {"head": 1.0}
    assert all(torch.equal(v, model.head.state_dict()[k]) for k, v in head.items())
    assert min(result.smoothed) < result.smoothed[0]  # the head learns this toy task
    assert result.lrs[0] < result.suggestion < result.lrs[-1]


def test_an_explicit_suffix_module_runs_on_cached_activations():
    model = toy_lite0()
    train, _ = toy_tensors()
    with torch.no_grad():
        model.eval()
        below = nn.Sequential(*list(model.features)[:7])  # stem .. stage6: frozen, cached once
        activations = TensorDataset(below(train.tensors[0][:32]), train.tensors[1][:32])
    suffix = nn.Sequential(model.features.stage7, model.features.top, model.pool, model.head)
    loader = tlkit.make_loader(activations, None, 8, shuffle=True, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = lr_find(model, loader, module=suffix, layer_decay=0.5, num_steps=10)
    assert result.multipliers == pytest.approx({"head": 1.0, "top": 0.5, "stage7": 0.25})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_divergence_stops_the_sweep_early():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)
    net = nn.Linear(8, 2)
    result = lr_find(net, loader, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), start_lr=1e-3, end_lr=1e6, num_steps=60)
    assert result.diverged and len(result.lrs) < 60
    assert result.suggestion < result.lrs[-1]


def test_rule_picks_the_steepest_descent_before_the_minimum_and_the_minimum_over_ten():
    lrs = list(np.logspace(-6, 0, 61))
    # a loss that falls fastest at 1e-3 (a logistic step in log10 LR), bottoms out at 1e-1, then rises
    losses = [2 - 1 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + 5 * max(0.0, math.log10(lr) + 1) ** 2 for lr in lrs]
    suggestion, min_over_10 = _suggestions(lrs, losses)
    assert suggestion == pytest.approx(1e-3, rel=0.05)
    assert min_over_10 == pytest.approx(1e-2, rel=0.05)
    rising = [1 + lr for lr in lrs]  # never falls: the minimum rule stands in
    assert _suggestions(lrs, rising) == (pytest.approx(1e-7), pytest.approx(1e-7))


def test_plot_marks_both_suggestions():
    net = nn.Linear(8, 2)
    x = torch.randn(32, 8)
    result = lr_find(net, DataLoader(TensorDataset(x, (x[:, 1] > 0).long()), batch_size=8), num_steps=12)
    fig = tlkit.plot_lr_find(result)
    assert isinstance(fig, Figure)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert any(label.startswith("steepest descent") for label in labels) and any(label.startswith("minimum / 10") for label in labels)
    assert "steepest" in result.rule and "/ 10" in result.rule


def test_bad_arguments_say_what_to_change():
    model = tlkit.freeze(toy_lite0())
    loader = image_loader()
    with pytest.raises(ValueError, match="start_lr < end_lr"):
        lr_find(model, loader, start_lr=1.0, end_lr=1e-3)
    model.head.requires_grad_(False)
    with pytest.raises(ValueError, match="Unfreeze at least the head"):
        lr_find(model, loader, num_steps=2)
    assert not any(p.requires_grad for p in model.parameters())  # put back even when it fails


def test_batchnorm_report_tells_frozen_from_training_blocks_and_the_drift_trap():
    model = toy_lite0()  # stage6 frozen (12 BatchNorm layers), stage7 trains (3)
    model.eval()
    report = batchnorm_report(model)
    assert list(report.index) == tlkit.block_names(model)
    assert report.loc["stage6"].tolist() == [True, 12, 0, False]
    assert report.loc["stage7"].tolist() == [False, 3, 3, False]
    assert report.loc["head", "batchnorm layers"] == 0
    assert not any(m.training for m in model.modules())  # looking did not leave it in train mode
    model.eval_frozen_blocks = False  # frozen blocks in train mode: their statistics drift (PyTorch #86590)
    drifting = batchnorm_report(model)
    assert drifting.loc["stage6"].tolist() == [True, 12, 12, True]
    tlkit.finetune.freeze_batchnorm(model)  # fixed BatchNorm counts as BatchNorm that never updates
    fixed = batchnorm_report(model)
    assert fixed.loc["stage6", "batchnorm layers"] == 12 and fixed["updating in train()"].sum() == 0
