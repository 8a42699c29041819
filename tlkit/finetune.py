"""Partial unfreezing and fine-tuning: per-block learning rates, gradual unfreezing, two-phase fine-tuning,
a new conv block on the feature map, and the strategies of notebook 02 (``apply_strategy``; the whole run is
``tlkit.recipes.run_strategy``)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from torch.utils.data import DataLoader

from .models import HEAD, TransferModel, _check_names, block_names, freeze, parameter_counts, set_trainable
from .train import History, fit

BN_MODES = ("default", "train", "frozen")
STRATEGIES = ("head", "last_block", "last_n_blocks", "last_tensors", "blocks", "gradual", "two_phase", "full", "conv_block")


# --- learning rate per block ----------------------------------------------------------------------


def lr_multipliers(
    model: TransferModel, layer_decay: float = 1.0, lr_mult: Mapping[str, float] | None = None
) -> OrderedDict[str, float]:
    """LR multiplier per block, head first: ``layer_decay ** k`` for the block k places below the head, then ``lr_mult`` overrides."""
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1] (1 = the same LR everywhere), got {layer_decay}.")
    multipliers = OrderedDict((name, layer_decay**k) for k, name in enumerate(reversed(block_names(model))))
    overrides = dict(lr_mult or {})
    _check_names(model, overrides)
    bad = {name: m for name, m in overrides.items() if not m > 0}
    if bad:
        raise ValueError(f"lr_mult values must be positive (freeze a block instead of giving it LR 0), got {bad}.")
    multipliers.update(overrides)
    return multipliers


def param_groups(
    model: TransferModel,
    lr: float,
    *,
    layer_decay: float = 1.0,
    lr_mult: Mapping[str, float] | None = None,
    names: Iterable[str] | None = None,
    exclude: Iterable[torch.Tensor] = (),
) -> list[dict]:
    """One optimizer param group per block with trainable parameters, head first, each with ``lr`` times its multiplier.

    ``names`` limits the groups to those blocks; parameters in ``exclude`` (already in an optimizer)
    are left out. Each group carries its block's name under ``"name"``.
    """
    multipliers = lr_multipliers(model, layer_decay, lr_mult)
    wanted = set(_check_names(model, names)) if names is not None else set(multipliers)
    skip = {id(p) for p in exclude}
    blocks = model.blocks()
    groups = []
    for name, mult in multipliers.items():
        params = [p for p in blocks[name].parameters() if p.requires_grad and id(p) not in skip]
        if name in wanted and params:
            groups.append({"params": params, "lr": lr * mult, "name": name})
    return groups


def make_optimizer(
    model: TransferModel,
    lr: float,
    *,
    layer_decay: float = 1.0,
    lr_mult: Mapping[str, float] | None = None,
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """AdamW over the trainable blocks with discriminative learning rates (``param_groups``)."""
    groups = param_groups(model, lr, layer_decay=layer_decay, lr_mult=lr_mult)
    if not groups:
        raise ValueError("The model has no trainable parameters: unfreeze at least the head (tlkit.unfreeze(model, ['head'])).")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def group_table(optimizer: torch.optim.Optimizer) -> list[dict[str, object]]:
    """One row per param group: its block name, parameter count and learning rate."""
    return [
        {"group": g.get("name", str(i)), "params": sum(p.numel() for p in g["params"]), "lr": g["lr"]}
        for i, g in enumerate(optimizer.param_groups)
    ]


def _params_in(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def unfreeze_into(
    model: TransferModel,
    optimizer: torch.optim.Optimizer,
    names: Sequence[str],
    lr: float,
    *,
    layer_decay: float = 1.0,
    lr_mult: Mapping[str, float] | None = None,
) -> list[dict]:
    """Unfreeze the named blocks and add their parameters to ``optimizer`` (``add_param_group``), keeping its state.

    Returns the groups added (one per block, learning rates as in ``param_groups``).
    """
    set_trainable(model, names, True)
    added = param_groups(model, lr, layer_decay=layer_decay, lr_mult=lr_mult, names=names, exclude=_params_in(optimizer))
    for group in added:
        optimizer.add_param_group(group)
    return added


# --- which parameters train --------------------------------------------------------------------------


def blocks_below_head(model: TransferModel) -> list[str]:
    """Block names below the head, input to output."""
    names = block_names(model)
    return names[: names.index(HEAD)]


def unfreeze_last_blocks(model: TransferModel, n: int) -> TransferModel:
    """Train the head and the last ``n`` blocks below it; freeze the rest (n=0: the head alone)."""
    below = blocks_below_head(model)
    if not 0 <= n <= len(below):
        raise ValueError(f"n must be between 0 and {len(below)} (the blocks below the head: {below}), got {n}.")
    freeze(model)
    return set_trainable(model, below[len(below) - n :], True)


def unfreeze_blocks(model: TransferModel, names: Sequence[str]) -> TransferModel:
    """Train exactly the named blocks and the head; freeze the rest."""
    _check_names(model, names)
    freeze(model)
    return set_trainable(model, names, True)


def unfreeze_last_tensors(model: TransferModel, n: int) -> TransferModel:
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


def trainable_count(model: TransferModel) -> int:
    """Number of trainable parameters."""
    return parameter_counts(model)["total"]["trainable"]


def freeze_batchnorm(model: TransferModel) -> TransferModel:
    """Fix every BatchNorm layer of ``model.features``: running statistics and scale/shift no longer change (timm's FrozenBatchNorm2d)."""
    from timm.layers import freeze_batch_norm_2d

    freeze_batch_norm_2d(model.features)  # replaces the BatchNorm children in place
    return model


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
    num_classes = _num_classes(model)
    device = next(model.parameters()).device
    model.pool = nn.Sequential(
        OrderedDict(block=conv_block(in_channels, channels, kernel_size), avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1))
    ).to(device)
    model.head = nn.Linear(channels, num_classes).to(device)
    model.num_features = channels
    return model.train(model.training)


def _num_classes(model: TransferModel) -> int:
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("add_conv_block needs a head that ends in nn.Linear (as create_model builds).")
    return linears[-1].out_features


# --- gradual unfreezing and two-phase fine-tuning ------------------------------------------------------


class GradualUnfreezing:
    """``fit(on_epoch_end=...)`` callback: unfreeze one more block every ``every`` epochs, from the top down.

    Each block's parameters join the existing optimizer through ``add_param_group`` (as
    Lightning's BackboneFinetuning does): the optimizer object and its state (e.g. Adam's moments
    of the head) are kept. The block k places below the head gets ``lr * layer_decay ** k``
    (``lr_mult`` overrides). ``order`` defaults to the fully frozen blocks below the head, top first.
    A scheduler made before a group is added does not change that group's LR.
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

    def __call__(self, history: History) -> None:
        self.epochs_seen += 1
        if self.epochs_seen % self.every == 0 and self.pending:
            name = self.pending.pop(0)
            unfreeze_into(self.model, self.optimizer, [name], self.lr, layer_decay=self.layer_decay, lr_mult=self.lr_mult)
            self.unfrozen.append((history.epoch[-1] if history.epoch else self.epochs_seen, name))


class Callbacks:
    """Several ``on_epoch_end`` callbacks as one; ``end`` runs the ``end`` of those that have one."""

    def __init__(self, *callbacks: Callable[[History], None] | None) -> None:
        self.callbacks = [c for c in callbacks if c is not None]

    def __call__(self, history: History) -> None:
        for callback in self.callbacks:
            callback(history)

    def end(self, history: History) -> None:
        """Finish every callback that can be finished."""
        for callback in self.callbacks:
            if hasattr(callback, "end"):
                callback.end(history)


def _without_end(callback: Callable[[History], None] | None) -> Callable[[History], None] | None:
    """The same callback without its ``end`` (for the first of two fit calls that share it)."""
    return None if callback is None else (lambda history: callback(history))


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
    device: torch.device | str = "cpu",
    on_epoch_end: Callable[[History], None] | None = None,
    progress: bool = True,
) -> History:
    """Two phases, one History: the head alone for ``head_epochs``, then ``unfreeze`` (default: every block) for ``epochs``.

    One AdamW optimizer throughout: phase 2 adds the unfrozen blocks to it with lower learning
    rates (``lr * layer_decay ** k`` for the block k places below the head; ``lr_mult`` overrides),
    while the head keeps ``lr`` and its optimizer state.
    """
    freeze(model)
    optimizer = make_optimizer(model, lr, weight_decay=weight_decay)
    common = dict(device=device, progress=progress, optimizer=optimizer)
    history = fit(model, train_loader, val_loader, epochs=head_epochs, on_epoch_end=_without_end(on_epoch_end), **common)
    names = blocks_below_head(model) if unfreeze is None else list(unfreeze)
    unfreeze_into(model, optimizer, names, lr, layer_decay=layer_decay, lr_mult=lr_mult)
    return fit(model, train_loader, val_loader, epochs=epochs, history=history, on_epoch_end=on_epoch_end, **common)


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
    """Set which parameters train at the start of ``strategy`` (gradual and two_phase start with the head alone)."""
    if strategy in ("head", "gradual", "two_phase"):
        return freeze(model)
    if strategy == "last_block":
        return unfreeze_last_blocks(model, 1)
    if strategy == "last_n_blocks":
        return unfreeze_last_blocks(model, n_blocks)
    if strategy == "last_tensors":
        return unfreeze_last_tensors(model, n_tensors)
    if strategy == "blocks":
        return unfreeze_blocks(model, unfreeze)
    if strategy == "full":
        return set_trainable(model, block_names(model), True)
    if strategy == "conv_block":
        return add_conv_block(freeze(model), conv_channels)  # the new block and head train, the backbone stays frozen
    raise ValueError(f"Unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")


def plot_val_accuracy(histories: Mapping[str, History], title: str = "") -> Figure:
    """Validation accuracy of each run against epoch (left) and against cumulative wall time (right)."""
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for name, history in histories.items():
        by_epoch.plot(history.epoch, history.val_acc, "o-", label=name)
        by_time.plot(np.cumsum(history.epoch_time), history.val_acc, "o-", label=name)
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("wall time (s, training + validation)")
    by_epoch.set_ylabel("val accuracy")
    by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (by_epoch, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
