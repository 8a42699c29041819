"""Per-block learning rates, gradual unfreezing, two-phase fine-tuning, the strategies, the conv block, notebook 02."""

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


def test_strategies_choose_the_trainable_blocks(model):
    assert tlkit.trainable_blocks(tlkit.apply_strategy(model, "head")) == ["head"]
    assert tlkit.trainable_blocks(tlkit.apply_strategy(model, "last_block")) == ["top", "head"]
    assert tlkit.trainable_blocks(tlkit.apply_strategy(model, "last_n_blocks", n_blocks=3)) == ["stage6", "stage7", "top", "head"]
    assert tlkit.trainable_blocks(tlkit.apply_strategy(model, "blocks", unfreeze=["stage2"])) == ["stage2", "head"]
    assert tlkit.trainable_blocks(tlkit.apply_strategy(model, "full")) == LITE0_BLOCKS
    with pytest.raises(ValueError, match="Unknown strategy 'everything'.*head, last_block"):
        tlkit.apply_strategy(model, "everything")
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
    tlkit.apply_strategy(model, "last_block")
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


def test_freeze_batchnorm_fixes_statistics_while_convolutions_train(model):
    tlkit.unfreeze(tlkit.finetune.freeze_batchnorm(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.features.modules())
    before = model.features.top[1].running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(model.features.top[1].running_mean, before)
    assert model.features.top[0].weight.requires_grad


@pytest.mark.notebook
def test_notebook_02_writes_one_accuracy_per_strategy(tmp_path):
    from tlkit.course import run_notebook

    compare = ["head", "last_block", "gradual", "conv_block"]
    run = run_notebook(
        NOTEBOOKS / "02_partial_unfreezing.ipynb", tmp_path,
        {"samples_per_class": 3, "image_size": 32, "epochs": 2, "strategy": "gradual", "compare": compare,
         "compare_once": ["full"], "bn_row": "head", "seeds": [0, 1]},
    )
    assert run.error == "", run.error
    m = run.metrics
    assert m["strategy"] == "gradual" and m["samples_per_class"] == 3 and m["seeds"] == 2
    for name in compare + ["head_bn_frozen", "full"]:
        assert 0.0 <= m[f"val_acc_{name}"] <= 1.0 and m[f"val_acc_{name}_std"] >= 0.0
    assert m["val_acc_full_std"] == 0.0  # compare_once runs on one seed
    assert 1e-6 <= m["lr_suggestion_head"] <= 1.0 and m["lr"] == m["lr_suggestion_head"]  # lr None: the finder's
    assert m["best_strategy"] in compare + ["head_bn_frozen", "full"] and 0.0 <= m["test_acc"] <= 1.0
    assert (tmp_path / "figures" / "02" / "comparison.png").stat().st_size > 0
