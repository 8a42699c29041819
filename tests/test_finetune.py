"""Per-block learning rates, gradual unfreezing, two-phase fine-tuning, the strategies, the conv block, notebook 02."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tlkit

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
LITE0_BLOCKS = ["stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "top", "head"]


@pytest.fixture
def model() -> tlkit.TransferModel:
    tlkit.set_seed(0)
    return tlkit.create_model("efficientnet_lite0", 3)


@pytest.fixture(scope="module")
def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 3
    return DataLoader(TensorDataset(x, y), batch_size=6, shuffle=False), DataLoader(TensorDataset(x[:6], y[:6]), batch_size=6)


def _requires_grad(module: nn.Module) -> set[bool]:
    return {p.requires_grad for p in module.parameters()}


def test_layer_decay_gives_head_first_groups_with_powers_of_the_decay(model):
    tlkit.apply_strategy(model, "last_n_blocks", n_blocks=2)  # stage7, top, head train
    groups = tlkit.optim.param_groups(model, 0.1, layer_decay=0.5)
    assert [g["name"] for g in groups] == ["head", "top", "stage7"]
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 0.05, 0.025])
    assert sum(p.numel() for p in groups[0]["params"]) == 1280 * 3 + 3
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_multipliers_count_every_block_below_the_head_and_lr_mult_overrides(model):
    mult = tlkit.optim.lr_multipliers(model, 0.5, {"stage6": 0.2})
    assert list(mult) == LITE0_BLOCKS[::-1]
    assert mult["head"] == 1 and mult["top"] == 0.5 and mult["stem"] == 0.5**9
    assert mult["stage6"] == 0.2
    with pytest.raises(ValueError, match=r"Unknown block name\(s\) \['stage9'\].*Valid names"):
        tlkit.optim.lr_multipliers(model, 0.5, {"stage9": 0.1})
    with pytest.raises(ValueError, match="layer_decay must be in"):
        tlkit.optim.lr_multipliers(model, 0.0)
    with pytest.raises(ValueError, match="positive"):
        tlkit.optim.lr_multipliers(model, 1.0, {"top": 0})


def test_make_optimizer_refuses_a_fully_frozen_model(model):
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        tlkit.make_optimizer(model, 1e-3)


def test_make_optimizer_builds_every_optimizer_with_one_weight_decay_default(model):
    head = nn.Linear(4, 2)
    (group,) = tlkit.make_optimizer(head, 0.1).param_groups  # any module: one group over its trainable parameters
    assert group["params"] == list(head.parameters()) and group["weight_decay"] == 0.0 == tlkit.optim.WEIGHT_DECAY
    tlkit.freeze(model, up_to="stage7")
    flat = tlkit.make_optimizer(model, 1e-3, per_block=False)  # fit's default: one group, as its checkpoints hold
    assert [len(g["params"]) for g in flat.param_groups] == [sum(p.requires_grad for p in model.parameters())]
    assert [g["name"] for g in tlkit.make_optimizer(model, 1e-3).param_groups] == ["head", "top"]
    sgd = tlkit.make_optimizer(model, 1e-3, kind="sgd", per_block=False)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="make_optimizer: unknown kind 'adam'; choose one of 'adamw', 'sgd'"):
        tlkit.make_optimizer(model, 1e-3, kind="adam")
    with pytest.raises(ValueError, match="layer_decay and lr_mult give each block its own LR: they need a TransferModel"):
        tlkit.make_optimizer(head, 0.1, layer_decay=0.5)


def test_strategies_choose_the_trainable_blocks(model):
    assert tlkit.trainable_blocks(tlkit.apply_strategy(model, "head")) == ["head"]
    assert tlkit.trainable_blocks(tlkit.apply_strategy(model, "last_n_blocks", n_blocks=1)) == ["top", "head"]
    assert tlkit.trainable_blocks(tlkit.apply_strategy(model, "last_n_blocks", n_blocks=3)) == ["stage6", "stage7", "top", "head"]
    assert tlkit.trainable_blocks(tlkit.apply_strategy(model, "blocks", unfreeze=["stage2"])) == ["stage2", "head"]
    assert tlkit.trainable_blocks(tlkit.apply_strategy(model, "full")) == LITE0_BLOCKS
    with pytest.raises(ValueError, match="Unknown strategy 'everything'.*head, last_n_blocks"):
        tlkit.apply_strategy(model, "everything")
    with pytest.raises(ValueError, match="'last_block' is now last_n_blocks with n_blocks=1 .*trains `top`"):
        tlkit.apply_strategy(model, "last_block")
    with pytest.raises(ValueError, match=r"Unknown block name\(s\) \['layer4'\]"):
        tlkit.apply_strategy(model, "blocks", unfreeze=["layer4"])
    with pytest.raises(ValueError, match="n must be between 0 and 9"):
        tlkit.apply_strategy(model, "last_n_blocks", n_blocks=10)


def test_last_tensors_trains_exactly_the_last_n_and_bn_follows(model):
    tlkit.apply_strategy(model, "last_tensors", n_tensors=5)  # head weight + bias, top's BN weight + bias, top's conv weight
    assert tlkit.finetune.trainable_tensor_names(model) == [
        "features.top.0.weight", "features.top.1.weight", "features.top.1.bias", "head.weight", "head.bias",
    ]
    model.train()
    assert model.features.top[1].training  # partly trainable block: train mode
    assert not model.features.stage7[0].bn1.training  # fully frozen block: eval mode
    tlkit.apply_strategy(model, "last_tensors", n_tensors=2)
    assert tlkit.finetune.trainable_tensor_names(model) == ["head.weight", "head.bias"]
    model.train()
    assert not model.features.top[1].training


def test_frozen_blocks_keep_batchnorm_in_eval_mode_unless_asked(model):
    tlkit.apply_strategy(model, "last_n_blocks", n_blocks=1)
    model.train()
    assert not model.features.stage7[0].bn1.training and model.features.top[1].training
    model.eval_frozen_blocks = False
    model.train()
    assert model.features.stage7[0].bn1.training


def test_conv_block_sits_on_the_4d_feature_map(model):
    tlkit.apply_strategy(model, "conv_block", conv_channels=16)
    seen = []
    model.pool.block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    out = model(torch.randn(2, 3, 32, 32))
    assert seen == [torch.Size([2, 1280, 1, 1])]
    assert out.shape == (2, 3)
    assert isinstance(model.pool.block.conv, nn.Conv2d) and model.pool.block.conv.in_channels == 1280
    assert model.head.in_features == 16 and model.head.out_features == 3
    assert tlkit.block_names(model)[-3:] == ["top", "pool", "head"]
    assert tlkit.trainable_blocks(model) == ["pool", "head"]
    assert tlkit.finetune.feature_map_shape(model, 64) == (1280, 2, 2)


def test_gradual_unfreezing_adds_groups_to_the_same_optimizer_and_keeps_its_state(model, loaders):
    tlkit.freeze(model)
    optimizer = tlkit.make_optimizer(model, 0.01)
    callback = tlkit.finetune.GradualUnfreezing(model, optimizer, lr=0.01, every=2, layer_decay=0.5)
    assert callback.pending[:3] == ["top", "stage7", "stage6"]
    history = tlkit.fit(model, *loaders, epochs=3, optimizer=optimizer, callbacks=[callback], progress=False)
    assert len(history) == 3
    assert callback.unfrozen == [(2, "top")]  # after epoch 2 only (every=2)
    assert [g["name"] for g in optimizer.param_groups] == ["head", "top"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.005])
    assert optimizer.state[model.head.weight]["step"].item() == 3 * 2  # 3 epochs x 2 batches, never reset
    assert optimizer.state[model.features.top[0].weight]["step"].item() == 2  # added after epoch 2: 1 epoch
    assert tlkit.trainable_blocks(model) == ["top", "head"]


def test_unfreeze_into_adds_only_parameters_not_yet_in_the_optimizer(model):
    tlkit.apply_strategy(model, "last_n_blocks", n_blocks=1)
    optimizer = tlkit.make_optimizer(model, 1.0)
    added = tlkit.optim.unfreeze_into(model, optimizer, ["top", "stage7"], 1.0, layer_decay=0.1)
    assert [g["name"] for g in added] == ["stage7"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1.0, 1.0, 0.01])


class Record(tlkit.Callback):
    def __init__(self):
        self.epochs, self.ended = [], []

    def on_epoch_end(self, state):
        self.epochs.append(state.epoch)

    def on_fit_end(self, state):
        self.ended.append(state.history.epoch[-1])


def test_fine_tune_is_two_phases_in_one_history(model, loaders):
    record = Record()
    history = tlkit.finetune.fine_tune(model, *loaders, head_epochs=1, epochs=1, lr=0.01, layer_decay=0.5, progress=False,
                              callbacks=[record])
    assert history.epoch == [1, 2]
    assert tlkit.trainable_blocks(model) == LITE0_BLOCKS
    assert record.epochs == [1, 2] and record.ended == [2]  # every epoch of both phases; the end once, after phase 2


def test_run_strategy_trains_on_images_and_counts_the_final_trainable_parameters(class_folder):
    splits = tlkit.load_dataset(str(class_folder))
    config = tlkit.RunConfig(image_size=32, batch_size=16, epochs=2, lr=1e-3, seed=0)
    trainable_seen = []  # a user callback runs after the unfreezing one
    gradual = tlkit.run_strategy(config, splits, "gradual",
                                 callbacks=[lambda state: trainable_seen.append(tlkit.trainable_blocks(state.model))])
    head = tlkit.run_strategy(config, splits, "head")
    assert len(gradual.history) == 2 and 0 <= gradual.val_acc <= 1
    assert trainable_seen == [["top", "head"], ["top", "head"]]
    assert head.trainable_params == 1280 * 3 + 3
    assert gradual.trainable_params == head.trainable_params + 412160  # top after epoch 1; nothing after the last
    bn = tlkit.run_strategy(config, splits, "head", bn="train")
    assert bn.name == "head, BN train" and not bn.model.eval_frozen_blocks
    with pytest.raises(ValueError, match="Unknown bn mode 'fixed'"):
        tlkit.run_strategy(config, splits, "head", bn="fixed")
    with pytest.raises(ValueError, match="head_epochs"):
        tlkit.run_strategy(config, splits, "two_phase", head_epochs=2)


def test_refresh_batchnorm_moves_only_the_statistics(model, loaders):
    tlkit.freeze(model).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    before = model.features.stem[1].running_var.clone()
    tlkit.finetune.refresh_batchnorm(model, loaders[0])
    assert not torch.equal(model.features.stem[1].running_var, before)  # a frozen block's statistics moved
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert not model.training and not model.features.stem.training  # the mode is put back


def test_freeze_batchnorm_fixes_statistics_while_convolutions_train(model):
    tlkit.unfreeze(tlkit.finetune.freeze_batchnorm(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.features.modules())
    before = model.features.top[1].running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(model.features.top[1].running_mean, before)
    assert model.features.top[0].weight.requires_grad



def test_recompute_batchnorm_takes_exact_averages_in_the_training_blocks_only(model, loaders):
    tlkit.apply_strategy(model, "last_n_blocks", n_blocks=1)  # top and head train
    stem_before, was_training = model.features.stem[1].running_mean.clone(), model.training
    seen = []  # what top's BatchNorm normalises: the output of its 1x1 conv, image by image
    hook = model.features.top[0].register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    tlkit.finetune.recompute_batchnorm(model, loaders[0])
    hook.remove()
    outputs = torch.cat(seen)
    top_bn = model.features.top[1]
    assert not isinstance(top_bn, nn.BatchNorm2d)  # fixed afterwards, like bn="frozen"
    assert torch.allclose(top_bn.running_mean, outputs.mean(dim=(0, 2, 3)), atol=1e-5)  # every image weighted alike
    assert torch.allclose(model.features.stem[1].running_mean, stem_before)  # a frozen block keeps ImageNet's
    assert model.training == was_training  # the mode is put back


def test_run_strategy_with_recomputed_batchnorm_trains_the_convolutions_only(class_folder):
    splits = tlkit.load_dataset(str(class_folder))
    config = tlkit.RunConfig(image_size=32, batch_size=16, epochs=2, lr=1e-3, seed=0)
    before = tlkit.create_model(config.backbone, 3, config.weights).features.top[0].weight.clone()
    result = tlkit.run_strategy(config, splits, "last_n_blocks", n_blocks=1, bn="recomputed", prefix_cache=True)
    top = result.model.features.top
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.features.modules())
    assert not torch.equal(top[0].weight.detach().cpu(), before)  # the conv trained
    assert result.name == "last_n_blocks, BN recomputed" and result.prefix_cache.boundaries == ["top"]

# --- one-cycle schedule, fastai's fine_tune -----------------------------------------------------------


def _linear_and_optimizer(lr: float = 0.1) -> tuple[nn.Linear, torch.optim.AdamW]:
    layer = nn.Linear(2, 1)
    return layer, torch.optim.AdamW([{"params": [layer.weight], "lr": lr, "name": "w"}], lr=lr, weight_decay=0.0)


def _step(layer: nn.Linear, optimizer: torch.optim.Optimizer, schedule=None) -> None:
    """One training step as fit takes it: the schedule's on_batch_start, the optimizer step, its on_batch_end."""
    if schedule is not None:
        schedule.on_batch_start(None)
    optimizer.zero_grad()
    layer(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    if schedule is not None:
        schedule.on_batch_end(None)


def test_one_cycle_factor_warms_up_then_anneals_as_fastai():
    f = [tlkit.optim.one_cycle_factor(t, 100, pct_start=0.25, div=25, div_final=1e5) for t in range(100)]
    assert f[0] == pytest.approx(1 / 25)
    assert max(f) == pytest.approx(1.0) and f.index(max(f)) == 25  # the peak at pct_start
    assert all(a < b for a, b in zip(f[:25], f[1:26])) and all(a > b for a, b in zip(f[25:99], f[26:]))
    assert f[-1] < 1e-3 and tlkit.optim.one_cycle_factor(150, 100) == f[-1]  # past the end: the last value


def test_one_cycle_sets_each_step_lr_and_cycles_beta1():
    layer, optimizer = _linear_and_optimizer(0.1)
    schedule = tlkit.optim.OneCycle(optimizer, 8, pct_start=0.5)
    seen, betas = [], []
    optimizer.register_step_post_hook(lambda opt, *_: (seen.append(opt.param_groups[0]["lr"]),
                                                        betas.append(opt.param_groups[0]["betas"][0])))
    for _ in range(8):
        _step(layer, optimizer, schedule)
    assert seen == pytest.approx([0.1 * schedule.factor(t) for t in range(8)])
    assert seen[4] == pytest.approx(0.1) and betas[4] == pytest.approx(0.85)  # peak LR, lowest beta1
    assert betas[0] == pytest.approx(0.95)
    schedule.on_epoch_end(None)  # the epoch's end changes nothing
    assert optimizer.param_groups[0]["lr"] == seen[-1]
    assert schedule.state_dict() == {"step_count": 8}


def test_one_cycle_warms_up_a_group_that_joins_from_zero():
    layer, optimizer = _linear_and_optimizer(0.1)
    schedule = tlkit.optim.OneCycle(optimizer, 20, pct_start=0.25, div=1, div_final=1, moms=None, join_warmup=4)
    for _ in range(6):
        _step(layer, optimizer, schedule)
    optimizer.add_param_group({"params": [layer.bias], "lr": 0.05})
    lrs = []
    optimizer.register_step_post_hook(lambda opt, *_: lrs.append(opt.param_groups[1]["lr"]))
    for _ in range(5):
        _step(layer, optimizer, schedule)
    assert schedule.factor(7) == 1.0  # div=1, div_final=1: a flat cycle, so only the join warm-up shows
    assert lrs == pytest.approx([0.05 / 4, 0.05 * 2 / 4, 0.05 * 3 / 4, 0.05, 0.05])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # the first group did not warm up again


def test_one_cycle_leaves_the_optimizer_alone_outside_fits_hooks_and_restarts_a_new_cycle():
    layer, optimizer = _linear_and_optimizer(0.1)
    schedule = tlkit.optim.OneCycle(optimizer, 10, moms=None)
    assert not optimizer._optimizer_step_pre_hooks and not hasattr(optimizer, "_tlkit_schedule")  # no patched step
    first = optimizer.param_groups[0]["lr"]
    _step(layer, optimizer)  # a step outside fit: the schedule does not move
    assert schedule.step_count == 0 and optimizer.param_groups[0]["lr"] == first == pytest.approx(0.1 / 25)
    second = tlkit.optim.OneCycle(optimizer, 4, moms=None)  # the schedule a later fit gets; the first one is not called
    _step(layer, optimizer, second)
    assert schedule.step_count == 0 and second.step_count == 1
    restored = tlkit.optim.OneCycle(optimizer, 4, moms=None)
    restored.load_state_dict(second.state_dict())
    assert restored.step_count == 1
    second.restart(3, div=1, div_final=1)  # a new cycle from the LRs of now
    assert second.step_count == 0 and optimizer.param_groups[0]["peak_lr"] == optimizer.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="total_steps must be a whole number"):
        tlkit.optim.OneCycle(optimizer, 0)
    with pytest.raises(ValueError, match="pct_start must be in"):
        tlkit.optim.OneCycle(optimizer, 5, pct_start=0)
    with pytest.raises(ValueError, match="moms cycles Adam's beta1"):
        tlkit.optim.OneCycle(torch.optim.SGD(layer.parameters(), lr=0.1), 5)


def test_fit_with_one_cycle_steps_the_lr_every_batch(model, loaders):
    tlkit.freeze(model)
    optimizer = tlkit.make_optimizer(model, 0.01)
    seen = []
    optimizer.register_step_post_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    history = tlkit.fit(model, *loaders, epochs=2, optimizer=optimizer, scheduler=tlkit.optim.one_cycle(4), progress=False)
    assert len(seen) == 4 and len(set(seen)) == 4  # a new LR at each of the 2 x 2 steps
    assert seen == pytest.approx([0.01 * tlkit.optim.one_cycle_factor(t, 4) for t in range(4)])
    assert history.lr == pytest.approx([0.01 / 25, seen[1]])  # the LR each epoch started with


class CountSteps(tlkit.Callback):
    def __init__(self):
        self.starts, self.ends, self.fit_ends = 0, 0, 0

    def on_batch_start(self, state):
        self.starts += 1

    def on_batch_end(self, state):
        self.ends += 1

    def on_fit_end(self, state):
        self.fit_ends += 1


def test_one_cycle_runs_as_a_callback_of_fit(model, loaders):
    tlkit.freeze(model)
    optimizer = tlkit.make_optimizer(model, 0.01)
    seen = []
    optimizer.register_step_post_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    schedule = tlkit.optim.OneCycle(optimizer, 4)
    history = tlkit.fit(model, *loaders, epochs=2, optimizer=optimizer, callbacks=[schedule], progress=False)
    assert seen == pytest.approx([0.01 * tlkit.optim.one_cycle_factor(t, 4) for t in range(4)]) and schedule.step_count == 4
    other = tlkit.make_optimizer(model, 0.01)
    with pytest.raises(ValueError, match="This OneCycle drives another optimizer than the one fit trains with"):
        tlkit.fit(model, *loaders, epochs=1, optimizer=other, callbacks=[schedule], progress=False, resume_from=history)


@pytest.mark.parametrize("recipe", ["fine_tune", "fastai_fine_tune"])
def test_both_phases_are_one_fit_whose_callbacks_see_every_batch(model, loaders, recipe):
    count = CountSteps()
    if recipe == "fine_tune":
        tlkit.finetune.fine_tune(model, *loaders, head_epochs=1, epochs=1, lr=0.01, progress=False, callbacks=[count])
    else:
        tlkit.finetune.fastai_fine_tune(model, *loaders, freeze_epochs=1, epochs=1, base_lr=0.01, progress=False, callbacks=[count])
    assert (count.starts, count.ends, count.fit_ends) == (4, 4, 1)  # 2 batches in each phase's epoch, one fit
    assert tlkit.trainable_blocks(model) == LITE0_BLOCKS


def test_layer_decay_for_ratio_gives_the_first_block_lr_over_ratio(model):
    decay = tlkit.optim.layer_decay_for_ratio(model, 100)
    multipliers = tlkit.optim.lr_multipliers(model, decay)
    assert multipliers["head"] == 1 and multipliers["stem"] == pytest.approx(1 / 100)
    with pytest.raises(ValueError, match="ratio must be at least 1"):
        tlkit.optim.layer_decay_for_ratio(model, 0.5)


def test_fastai_fine_tune_halves_the_lr_and_spreads_it_down_to_one_hundredth(model, loaders):
    optimizers = []
    history = tlkit.finetune.fastai_fine_tune(model, *loaders, freeze_epochs=1, epochs=2, base_lr=0.02, progress=False,
                                              callbacks=[lambda state: optimizers.append(state.optimizer)])
    assert history.epoch == [1, 2, 3]
    assert tlkit.trainable_blocks(model) == LITE0_BLOCKS
    assert optimizers[0] is optimizers[-1]  # one optimizer: the head keeps its Adam moments
    peaks = {g["name"]: g["peak_lr"] for g in optimizers[-1].param_groups}
    assert peaks["head"] == pytest.approx(0.01) and peaks["stem"] == pytest.approx(0.01 / 100)
    assert history.lr[1] == pytest.approx(0.01 / 5)  # phase 2 starts a new cycle at its peak / div


def test_one_cycle_lrs_works_out_the_schedule_with_a_late_group():
    lrs = tlkit.optim.one_cycle_lrs({"head": 0.01, "top": 0.005}, 12, joins={"top": 4}, join_warmup=2, moms=None)
    assert lrs["head"] == pytest.approx([0.01 * tlkit.optim.one_cycle_factor(t, 12) for t in range(12)])
    assert all(math.isnan(v) for v in lrs["top"][:4])
    assert lrs["top"][4] == pytest.approx(0.005 * tlkit.optim.one_cycle_factor(4, 12) / 2)  # half-way up its warm-up
    assert lrs["top"][5] == pytest.approx(0.005 * tlkit.optim.one_cycle_factor(5, 12))
    with pytest.raises(ValueError, match=r"joins names group\(s\) \['stem'\]"):
        tlkit.optim.one_cycle_lrs({"head": 0.01}, 5, joins={"stem": 2})
    fig = tlkit.plots.plot_lr_schedules({"rule": lrs}, steps_per_epoch=3, title="schedules")
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()][:2] == ["head", "top"] and ax.get_title() == "rule"
    assert fig.get_suptitle() == "schedules"


def test_value_at_time_takes_the_last_epoch_finished_in_time():
    assert tlkit.compare.value_at_time([1.0, 1.0, 1.0], [0.5, 0.6, 0.7], 2.5) == 0.6
    assert tlkit.compare.value_at_time([1.0, 1.0, 1.0], [0.5, 0.6, 0.7], 2.5, start=1.0) == 0.5
    assert tlkit.compare.value_at_time([1.0, 1.0], [0.5, 0.6], 10.0) == 0.6
    assert math.isnan(tlkit.compare.value_at_time([3.0], [0.5], 2.0))
    with pytest.raises(ValueError, match="one entry per epoch"):
        tlkit.compare.value_at_time([1.0], [0.5, 0.6], 2.0)


def test_fine_tune_train_bn_updates_the_frozen_blocks_statistics_in_phase_one(loaders):
    moved = {}
    for train_bn in (True, False):
        tlkit.set_seed(0)
        m = tlkit.create_model("efficientnet_lite0", 3)
        before = m.features.stage5[0].bn1.running_mean.clone()
        means = []
        tlkit.finetune.fine_tune(m, *loaders, head_epochs=1, epochs=1, lr=1e-3, train_bn=train_bn, progress=False,
                                 callbacks=[lambda state, m=m, means=means: means.append(m.features.stage5[0].bn1.running_mean.clone())])
        moved[train_bn] = not torch.equal(means[0], before)  # after phase 1, while stage5 was still frozen
        assert m.eval_frozen_blocks  # put back afterwards
    assert moved == {True: True, False: False}


def test_two_phase_with_one_cycle_warms_the_unfrozen_blocks_up(class_folder):
    splits = tlkit.load_dataset(str(class_folder))
    config = tlkit.RunConfig(image_size=32, batch_size=16, epochs=3, lr=1e-3, seed=0)
    optimizers = []
    result = tlkit.run_strategy(config, splits, "two_phase", layer_decay=0.5, schedule="one_cycle",
                                callbacks=[lambda state: optimizers.append(state.optimizer)])
    assert len(result.history) == 3
    groups = {g["name"]: g for g in optimizers[-1].param_groups}
    assert set(groups) == set(LITE0_BLOCKS)
    top = groups["top"]
    assert top["peak_lr"] == pytest.approx(0.5e-3) and top["joined_at"] == 2  # joined after epoch 1 (2 steps)
    with pytest.raises(ValueError, match="Unknown schedule 'cosine'"):
        tlkit.run_strategy(config, splits, "head", schedule="cosine")
    with pytest.raises(ValueError, match="fastai_fine_tune needs 0 < head_epochs < epochs"):
        tlkit.run_strategy(config, splits, "fastai_fine_tune", head_epochs=3)


@pytest.mark.notebook
def test_notebook_02_writes_one_accuracy_per_strategy_size_and_batchnorm_setting(tmp_path):
    from tlkit.course import run_notebook

    run = run_notebook(
        NOTEBOOKS / "02_partial_unfreezing.ipynb", tmp_path,
        {"samples_per_class": 3, "image_size": 32, "epochs": 2, "pytorch_epochs": 1, "seeds": [0, 1], "data_sizes": [3, 2],
         "depths": [0, 2], "bn_modes": ["frozen", "recomputed"], "strategy": "gradual", "unfreeze_every": 1,
         "weight_decays": [0.01], "l2_sp_strengths": [10.0], "layer_decays": [0.3]},
    )
    assert run.error == "", run.error
    m = run.metrics
    assert m["strategy"] == "gradual" and m["samples_per_class"] == 3 and m["seeds"] == 2 and m["epochs"] == 2
    assert abs(m["val_acc_pytorch_loop"] - m["val_acc_tlkit_same_run"]) < 0.01  # the PyTorch loop and run_strategy agree
    assert 1e-6 <= m["lr_suggestion_head"] <= 1.0 and m["lr"] == m["lr_suggestion_head"]  # lr None: the finder's
    for n in (3, 2):
        for arm in ("head", "stage7_top"):
            for metric in ("val_acc", "test_acc"):
                assert 0.0 <= m[f"{metric}_{arm}_at_{n}"] <= 1.0 and m[f"{metric}_{arm}_at_{n}_std"] >= 0.0
        assert m[f"best_strategy_at_{n}"] in ("head", "stage7+top")
        gain = [m[f"paired_gain_deepest_vs_head_at_{n}{end}"] for end in ("_lo", "", "_hi")]
        assert gain == sorted(gain) and -1.0 <= gain[0] and gain[2] <= 1.0
        assert gain[1] == pytest.approx(m[f"test_acc_stage7_top_at_{n}"] - m[f"test_acc_head_at_{n}"])  # paired mean = mean difference
    assert "test_acc_top_at_3" not in m  # only the depths asked for run
    for bn in ("frozen", "recomputed"):
        for end in ("", "_lo", "_hi", "_test"):
            assert -1.0 <= m[f"bn_{bn}_minus_training_stage7_top{end}"] <= 1.0
    assert m["bn_strategy"] in ("default", "frozen", "recomputed")
    regularisers = ("none", "weight decay 0.01", "L2-SP 10", "layer_decay 0.3")
    assert m["regulariser"] in regularisers  # section 6: chosen on validation among them
    for slug in ("weight_decay_0_01", "l2_sp_10", "layer_decay_0_3"):
        for metric in ("val", "test"):
            assert -1.0 <= m[f"reg_{metric}_{slug}_minus_none"] <= 1.0
            assert m[f"reg_{metric}_{slug}_minus_none_low"] <= m[f"reg_{metric}_{slug}_minus_none_high"]
        assert m[f"reg_train_loss_{slug}_minus_none"] == pytest.approx(m[f"reg_train_loss_{slug}"] - m["reg_train_loss_none"], abs=1e-9)
    assert m["best_strategy"] == m["best_strategy_at_3"] and 0.0 <= m["test_acc"] <= 1.0
    for figure in ("data_size.png", "lr_find_head.png", "curves.png"):
        assert (tmp_path / "figures" / "02" / figure).stat().st_size > 0


# --- regularisers: weight decay and L2-SP --------------------------------------------------------------


def test_decay_towards_start_pulls_each_weight_back_to_its_first_value_and_leaves_the_head_alone():
    body, head = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [body], "lr": 0.5, "name": "top"}, {"params": [head], "lr": 0.5, "name": "head"}])
    handle = tlkit.optim.decay_towards_start(optimizer, 1.0)
    optimizer.step()  # the first step records w0 = 0 (no gradients: SGD leaves the weights as they are)
    with torch.no_grad():
        body.fill_(2.0), head.fill_(2.0)
    optimizer.step()
    assert body.tolist() == [1.0, 1.0, 1.0] and head.tolist() == [2.0, 2.0]  # half-way back (lr * strength), head untouched
    late = nn.Parameter(torch.full((2,), 5.0))
    optimizer.add_param_group({"params": [late], "lr": 0.5, "name": "stage7"})
    optimizer.step()  # a block that joins later: its w0 is its value at its first step
    with torch.no_grad():
        late.fill_(7.0)
    optimizer.step()
    assert late.tolist() == [6.0, 6.0] and body.tolist() == [0.25, 0.25, 0.25]
    handle.remove()
    optimizer.step()
    assert late.tolist() == [6.0, 6.0]
    with pytest.raises(ValueError, match="strength must be a finite number of at least 0"):
        tlkit.optim.decay_towards_start(optimizer, -1.0)


def _distance_to_imagenet(model: tlkit.TransferModel, block: str) -> float:
    pretrained = tlkit.create_model("efficientnet_lite0", 3).features.get_submodule(block).state_dict()
    trained = model.features.get_submodule(block).state_dict()
    return sum((trained[k].float() - pretrained[k].float()).norm().item() for k in pretrained if k.endswith("weight"))


def test_run_strategy_l2_sp_keeps_the_blocks_near_imagenet_and_weight_decay_shrinks_the_head(class_folder):
    tiny_splits = tlkit.data.image_folder(class_folder, seed=0)
    config = tlkit.RunConfig(image_size=32, batch_size=8, epochs=2, lr=3e-2, seed=0)
    plain = tlkit.run_strategy(config, tiny_splits, "last_n_blocks", n_blocks=1, prefix_cache=True)
    pulled = tlkit.run_strategy(config, tiny_splits, "last_n_blocks", n_blocks=1, l2_sp=20.0, prefix_cache=True)
    decayed = tlkit.run_strategy(config, tiny_splits, "last_n_blocks", n_blocks=1, weight_decay=20.0, prefix_cache=True)
    assert _distance_to_imagenet(pulled.model, "top") < 0.5 * _distance_to_imagenet(plain.model, "top")
    assert decayed.model.head.weight.norm() < 0.5 * plain.model.head.weight.norm()
    with pytest.raises(ValueError, match="weight_decay and l2_sp act on the optimizer run_strategy builds; two_phase builds its own"):
        tlkit.run_strategy(config, tiny_splits, "two_phase", l2_sp=1.0)
    with pytest.raises(ValueError, match="l2_sp must be a finite number of at least 0"):
        tlkit.run_strategy(config, tiny_splits, "head", l2_sp=-1)
