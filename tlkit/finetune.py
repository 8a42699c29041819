"""Partial unfreezing and fine-tuning: per-block learning rates, gradual unfreezing, two-phase fine-tuning,
a new conv block on the feature map, and the strategies of notebook 02 (``apply_strategy``; the whole run is
``tlkit.recipes.run_strategy``)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader

from .models import (
    TransferModel,
    _check_names,
    block_names,
    blocks_below_head,
    freeze,
    head_linear,
    set_trainable,
    trainable_blocks,
)
from .optim import OneCycle, layer_decay_for_ratio, lr_multipliers, make_optimizer, unfreeze_into
from .train import Callback, FitState, History, fit

BN_MODES = ("default", "train", "frozen", "recomputed")
SCHEDULES = (None, "one_cycle")  # run_strategy's LR schedules: constant, or fastai's one cycle (tlkit.optim.OneCycle)
STRATEGIES = (
    "head", "last_n_blocks", "last_tensors", "blocks", "gradual", "two_phase", "fastai_fine_tune", "full", "conv_block",
)


# --- which parameters train --------------------------------------------------------------------------


def _train_last_blocks(model: TransferModel, n: int) -> TransferModel:
    """Train the head and the last ``n`` blocks below it; freeze the rest (n=0: the head alone)."""
    below = blocks_below_head(model)
    if not 0 <= n <= len(below):
        raise ValueError(f"n must be between 0 and {len(below)} (the blocks below the head: {below}), got {n}.")
    freeze(model)
    return set_trainable(model, below[len(below) - n :], True)


def _train_last_tensors(model: TransferModel, n: int) -> TransferModel:
    """Train only the last ``n`` parameter tensors (``model.parameters()`` order, the head's included).

    A block with some trainable tensors is not fully frozen, so it runs in train mode (its
    BatchNorm statistics update) even if some of its tensors stay fixed.
    """
    params = list(model.parameters())
    if not 1 <= n <= len(params):
        raise ValueError(f"n must be between 1 and {len(params)} (the model's parameter tensors), got {n}.")
    model.requires_grad_(False)
    for p in params[len(params) - n :]:
        p.requires_grad_(True)
    return model.train(model.training)  # re-apply eval mode to the blocks that are fully frozen now


def trainable_tensor_names(model: TransferModel) -> list[str]:
    """Names of the parameter tensors that train."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def freeze_batchnorm(model: TransferModel) -> TransferModel:
    """Fix every BatchNorm layer of ``model.features``: running statistics and scale/shift no longer change (timm's FrozenBatchNorm2d)."""
    from timm.layers import freeze_batch_norm_2d

    freeze_batch_norm_2d(model.features)  # replaces the BatchNorm children in place
    return model


@torch.no_grad()
def refresh_batchnorm(model: TransferModel, loader: DataLoader, device: torch.device | str = "cpu") -> TransferModel:
    """One pass over ``loader`` with every block in train mode and no optimizer step: only the BatchNorm running
    statistics change, as they do in the first epoch after every block unfreezes (whatever the learning rates)."""
    was_training = model.training
    model.to(device)
    nn.Module.train(model, True)  # every block, the frozen ones too (TransferModel.train would keep those in eval mode)
    for x, _ in loader:
        model(x.to(device))
    return model.train(was_training)


@torch.no_grad()
def recompute_batchnorm(model: TransferModel, loader: DataLoader, device: torch.device | str = "cpu") -> TransferModel:
    """Recompute the running statistics of the BatchNorm layers in the blocks that train as exact averages over
    ``loader`` (``momentum=None``: a cumulative mean, every image weighted alike, as after one pass over the data),
    then fix every BatchNorm of the backbone (``freeze_batchnorm``). The frozen blocks keep ImageNet's statistics."""
    layers = [m for name in trainable_blocks(model) if name != "head"
              for m in model.blocks()[name].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    model.to(device).eval()  # every other layer as at inference
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for x, _ in loader:
        model(x.to(device))
    for bn in layers:
        bn.momentum = 0.1  # PyTorch's default, should anything let them train again
    freeze_batchnorm(model)
    return model.train(was_training)


# --- a new conv block on the feature map -------------------------------------------------------------


@torch.no_grad()
def feature_map_shape(model: TransferModel, image_size: int = 64) -> tuple[int, int, int]:
    """(channels, height, width) of ``model.features`` for one ``image_size`` image (BatchNorm statistics untouched)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    shape = model.features(torch.zeros(1, 3, image_size, image_size, device=device)).shape
    model.train(was_training)
    return tuple(shape[1:])


def conv_block(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv (same padding) + BatchNorm + ReLU: maps a feature map to a feature map."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            act=nn.ReLU(inplace=True),
        )
    )


def add_conv_block(model: TransferModel, channels: int = 128, *, kernel_size: int = 3) -> TransferModel:
    """Replace ``model.pool`` and ``model.head``: a new conv block on the feature map, then pooling, then a new linear head.

    The block sees the (N, C, H, W) feature map, before pooling flattens it. It appears as the
    trainable block "pool" in ``block_names``; the blocks of ``model.features`` are not changed.
    """
    if channels < 1:
        raise ValueError(f"channels must be at least 1, got {channels}.")
    shape = feature_map_shape(model)
    if len(shape) != 3:  # ViT-like backbones give tokens (L, C), not a map
        raise ValueError(f"add_conv_block needs a (C, H, W) feature map; {model.backbone} gives {tuple(shape)} per image "
                         f"(tokens): use a CNN backbone for the conv_block strategy.")
    in_channels = shape[0]
    num_classes = head_linear(model).out_features
    device = next(model.parameters()).device
    model.pool = nn.Sequential(
        OrderedDict(block=conv_block(in_channels, channels, kernel_size), avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1))
    ).to(device)
    model.head = nn.Linear(channels, num_classes).to(device)
    model.num_features = channels
    return model.train(model.training)


# --- gradual unfreezing and two-phase fine-tuning ------------------------------------------------------


class GradualUnfreezing(Callback):
    """``fit(callbacks=[...])`` callback: unfreeze one more block every ``every`` epochs, from the top down.

    Each block's parameters join the existing optimizer through ``add_param_group`` (as
    Lightning's BackboneFinetuning does): the optimizer object and its state (e.g. Adam's moments
    of the head) are kept. The block k places below the head gets ``lr * layer_decay ** k``
    (``lr_mult`` overrides). ``order`` defaults to the fully frozen blocks below the head, top first.
    A torch scheduler made before a group is added does not change that group's LR; ``tlkit.optim.OneCycle`` does,
    and warms each new group up from 0 (its Adam moments are fresh).
    """

    def __init__(
        self,
        model: TransferModel,
        optimizer: torch.optim.Optimizer,
        *,
        lr: float,
        every: int = 1,
        layer_decay: float = 1.0,
        lr_mult: Mapping[str, float] | None = None,
        order: Sequence[str] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1 (epochs between two unfreezings), got {every}.")
        lr_multipliers(model, layer_decay, lr_mult)  # checks the values now, not mid-training
        frozen = [n for n in reversed(blocks_below_head(model)) if not any(p.requires_grad for p in model.blocks()[n].parameters())]
        self.pending = list(_check_names(model, order)) if order is not None else frozen
        self.model, self.optimizer, self.lr, self.every = model, optimizer, lr, every
        self.layer_decay, self.lr_mult = layer_decay, lr_mult
        self.epochs_seen = 0
        self.unfrozen: list[tuple[int, str]] = []  # (epoch after which it was unfrozen, block)

    def on_epoch_end(self, state: FitState) -> None:
        self.epochs_seen += 1
        if self.epochs_seen % self.every == 0 and self.pending:
            name = self.pending.pop(0)
            unfreeze_into(self.model, self.optimizer, [name], self.lr, layer_decay=self.layer_decay, lr_mult=self.lr_mult)
            self.unfrozen.append((state.history.epoch[-1] if state.history.epoch else self.epochs_seen, name))


class _SecondPhase(Callback):
    """``fit`` callback that runs ``start`` once, at the end of epoch ``after`` of the fit: the switch between the two
    phases of ``fine_tune`` and ``fastai_fine_tune``, so that both phases are one ``fit`` (one History, one
    ``on_fit_end``, the same data order as two fits)."""

    def __init__(self, after: int, start: Callable[[], None]) -> None:
        self.after, self.start, self.epochs_seen = after, start, 0

    def on_epoch_end(self, state: FitState) -> None:
        self.epochs_seen += 1
        if self.epochs_seen == self.after:
            self.start()


def fine_tune(
    model: TransferModel,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    head_epochs: int,
    epochs: int,
    lr: float,
    layer_decay: float = 0.5,
    lr_mult: Mapping[str, float] | None = None,
    unfreeze: Sequence[str] | None = None,
    weight_decay: float = 0.0,
    schedule: Callable[[torch.optim.Optimizer], object] | None = None,
    train_bn: bool = True,
    device: torch.device | str = "cpu",
    callbacks: Sequence[Callback | Callable[[FitState], None]] = (),
    progress: bool = True,
) -> History:
    """Two phases, one History: the head alone for ``head_epochs``, then ``unfreeze`` (default: every block) for ``epochs``.

    ``train_bn`` (as fastai's ``train_bn``): the frozen blocks' BatchNorm layers update their running statistics in
    phase 1 already. Without it they switch from the ImageNet statistics to this data's when their block unfreezes,
    and the features change under the head that phase 1 trained (notebook 02 measures it).

    One AdamW optimizer throughout: phase 2 adds the unfrozen blocks to it with lower learning
    rates (``lr * layer_decay ** k`` for the block k places below the head; ``lr_mult`` overrides),
    while the head keeps ``lr`` and its optimizer state. ``schedule`` (a function optimizer -> scheduler, e.g.
    ``tlkit.optim.one_cycle(total_steps)`` over both phases) is made once and spans both phases; a ``OneCycle``
    warms the blocks that join in phase 2 up from LR 0. Both phases are one ``fit``: ``callbacks`` see every batch
    and epoch of both (the unfreezing runs after theirs at the end of phase 1), their ``on_fit_end`` once, at the end.
    """
    freeze(model)
    names = blocks_below_head(model) if unfreeze is None else _check_names(model, unfreeze)
    lr_multipliers(model, layer_decay, lr_mult)  # checked now, not after phase 1
    optimizer = make_optimizer(model, lr, weight_decay=weight_decay)
    phase_two = _SecondPhase(head_epochs, lambda: unfreeze_into(model, optimizer, names, lr, layer_decay=layer_decay, lr_mult=lr_mult))
    with _frozen_blocks_bn_training(model, train_bn):
        return fit(model, train_loader, val_loader, epochs=head_epochs + epochs, optimizer=optimizer, scheduler=schedule,
                   callbacks=[*callbacks, phase_two], device=device, progress=progress)


@contextmanager
def _frozen_blocks_bn_training(model: TransferModel, train_bn: bool) -> Iterator[None]:
    """Inside: with ``train_bn``, fully frozen blocks run in train mode too (their BatchNorm statistics update)."""
    before = model.eval_frozen_blocks
    model.eval_frozen_blocks = before and not train_bn
    try:
        yield
    finally:
        model.eval_frozen_blocks = before


def fastai_fine_tune(
    model: TransferModel,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    freeze_epochs: int,
    epochs: int,
    base_lr: float,
    lr_mult: float = 100.0,
    pct_start: float = 0.3,
    div: float = 5.0,
    train_bn: bool = True,
    device: torch.device | str = "cpu",
    callbacks: Sequence[Callback | Callable[[FitState], None]] = (),
    progress: bool = True,
) -> History:
    """A two-phase schedule modelled on fastai's ``Learner.fine_tune(epochs, base_lr, freeze_epochs)``: the head alone,
    then every block, one History. It copies fastai's schedule, not fastai's recipe.

    Phase 1: the head alone for ``freeze_epochs``, one cycle at ``base_lr`` (``pct_start`` 0.99: a warm-up).
    Both phases are one ``fit`` (``callbacks`` see both; the switch runs after theirs at the end of phase 1).
    Phase 2: every block for ``epochs``, a new cycle (``pct_start``, ``div``) at ``base_lr / 2`` for the head, the
    LRs spread geometrically down to ``base_lr / 2 / lr_mult`` for the first block, one group per block
    (``layer_decay_for_ratio``). One AdamW throughout (the head keeps its moments), Adam's beta1 cycled as fastai does.
    ``train_bn`` (fastai's default): the frozen blocks' BatchNorm layers update their statistics in phase 1 already.

    Where fastai differs: it spreads ``slice(base_lr / 2 / lr_mult, base_lr / 2)`` over its two or three parameter
    groups (not one per block), uses weight decay 0.01, its own head (concat pooling, BatchNorm, dropout, a hidden
    layer) and ``aug_transforms``, and trains the BatchNorm scale and shift of frozen blocks in phase 1. Here: the
    model's own head (a linear layer), no weight decay, no augmentation (the loaders' transforms), and the frozen
    blocks' BatchNorm scale and shift train from phase 2 on.
    """
    freeze(model)
    optimizer = make_optimizer(model, base_lr)
    steps = len(train_loader)
    schedule = OneCycle(optimizer, freeze_epochs * steps, pct_start=0.99)

    def unfreeze_all() -> None:  # phase 2: every block, a new cycle at half the LR
        optimizer.param_groups[0]["lr"] = base_lr / 2  # the head's group
        unfreeze_into(model, optimizer, blocks_below_head(model), base_lr / 2, layer_decay=layer_decay_for_ratio(model, lr_mult))
        schedule.restart(epochs * steps, pct_start=pct_start, div=div)

    with _frozen_blocks_bn_training(model, train_bn):
        return fit(model, train_loader, val_loader, epochs=freeze_epochs + epochs, optimizer=optimizer, scheduler=lambda _: schedule,
                   callbacks=[*callbacks, _SecondPhase(freeze_epochs, unfreeze_all)], device=device, progress=progress)


# --- strategies ------------------------------------------------------------------------------------------


def apply_strategy(
    model: TransferModel,
    strategy: str,
    *,
    n_blocks: int = 2,
    n_tensors: int = 10,
    unfreeze: Sequence[str] = (),
    conv_channels: int = 128,
) -> TransferModel:
    """Set which parameters train at the start of ``strategy`` (one of ``STRATEGIES``; gradual, two_phase and
    fastai_fine_tune start with the head alone).

    last_n_blocks: the head and the last ``n_blocks`` blocks below it (1: the block just below the head, ``top`` on
    EfficientNet-Lite0); last_tensors: the last ``n_tensors``
    parameter tensors; blocks: the blocks named in ``unfreeze`` and the head; full: every block; conv_block: a new
    conv block (``add_conv_block``) and head on the frozen backbone.
    """
    if strategy in ("head", "gradual", "two_phase", "fastai_fine_tune"):
        return freeze(model)
    if strategy == "last_n_blocks":
        return _train_last_blocks(model, n_blocks)
    if strategy == "last_tensors":
        return _train_last_tensors(model, n_tensors)
    if strategy == "blocks":  # exactly these blocks and the head
        _check_names(model, unfreeze)
        return set_trainable(freeze(model), unfreeze, True)
    if strategy == "full":
        return set_trainable(model, block_names(model), True)
    if strategy == "conv_block":
        return add_conv_block(freeze(model), conv_channels)  # the new block and head train, the backbone stays frozen
    if strategy == "last_block":  # one name per concept: it was last_n_blocks with n_blocks=1, and its name hid what trains
        raise ValueError("Strategy 'last_block' is now last_n_blocks with n_blocks=1 (on EfficientNet-Lite0 it trains `top`, "
                         "the 1x1 conv below the head, not the last stage): pass strategy='last_n_blocks', n_blocks=1.")
    raise ValueError(f"Unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")


