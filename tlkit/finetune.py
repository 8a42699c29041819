"""Partial unfreezing and fine-tuning: per-block learning rates, gradual unfreezing, two-phase fine-tuning,
a new conv block on the feature map, and the strategies of notebook 02 as one-call recipes."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from torch.utils.data import DataLoader

from .data import DatasetSplits, eval_transform, make_loader
from .models import HEAD, TransferModel, _check_names, block_names, create_model, freeze, parameter_counts, set_trainable
from .prefix_cache import PrefixCache, prefix_cache_allowed
from .recipes import RunResult
from .train import Callback, FitState, History, fit, is_deterministic, set_seed

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


class GradualUnfreezing(Callback):
    """``fit(callbacks=[...])`` callback: unfreeze one more block every ``every`` epochs, from the top down.

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

    def on_epoch_end(self, state: FitState) -> None:
        self.epochs_seen += 1
        if self.epochs_seen % self.every == 0 and self.pending:
            name = self.pending.pop(0)
            unfreeze_into(self.model, self.optimizer, [name], self.lr, layer_decay=self.layer_decay, lr_mult=self.lr_mult)
            self.unfrozen.append((state.history.epoch[-1] if state.history.epoch else self.epochs_seen, name))


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
    callbacks: Sequence[Callback | Callable[[FitState], None]] = (),
    progress: bool = True,
) -> History:
    """Two phases, one History: the head alone for ``head_epochs``, then ``unfreeze`` (default: every block) for ``epochs``.

    One AdamW optimizer throughout: phase 2 adds the unfrozen blocks to it with lower learning
    rates (``lr * layer_decay ** k`` for the block k places below the head; ``lr_mult`` overrides),
    while the head keeps ``lr`` and its optimizer state. ``callbacks`` run after every epoch of both
    phases; their ``on_fit_end`` once, at the end of phase 2.
    """
    freeze(model)
    optimizer = make_optimizer(model, lr, weight_decay=weight_decay)
    common = dict(device=device, progress=progress, optimizer=optimizer)
    epoch_ends = [c.on_epoch_end if isinstance(c, Callback) else c for c in callbacks]  # phase 1: no on_fit_end yet
    history = fit(model, train_loader, val_loader, epochs=head_epochs, callbacks=epoch_ends, **common)
    names = blocks_below_head(model) if unfreeze is None else list(unfreeze)
    unfreeze_into(model, optimizer, names, lr, layer_decay=layer_decay, lr_mult=lr_mult)
    return fit(model, train_loader, val_loader, epochs=epochs, resume_from=history, callbacks=callbacks, **common)


# --- strategies as recipes ----------------------------------------------------------------------------


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


def run_strategy(
    splits: DatasetSplits,
    strategy: str,
    *,
    backbone: str,
    weights: str | None,
    image_size: int,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int,
    device: torch.device | str = "cpu",
    layer_decay: float = 1.0,
    lr_mult: Mapping[str, float] | None = None,
    n_blocks: int = 2,
    n_tensors: int = 10,
    unfreeze: Sequence[str] = (),
    unfreeze_every: int = 1,
    head_epochs: int = 1,
    conv_channels: int = 128,
    bn: str = "default",
    name: str = "",
    progress: bool = False,
    callbacks: Sequence[Callback | Callable[[FitState], None]] = (),
    train_transform: Callable | None = None,
    prefix_cache: bool = False,
    cache_dir: str | Path | None = None,
    max_bytes: float | None = None,
) -> RunResult:
    """Train a new model with one strategy on images, ``epochs`` epochs in all, same seed and data for every strategy.

    ``bn`` (see ``BN_MODES``): "default" keeps BatchNorm of fully frozen blocks in eval mode while
    trainable blocks update theirs; "train" lets frozen blocks' BatchNorm train too; "frozen" fixes
    every BatchNorm of the backbone (statistics and scale/shift, ``freeze_batchnorm``). Trainable
    parameters are counted at the end (for gradual: the blocks unfrozen by then).
    ``train_transform`` defaults to the eval transform (no augmentation).

    ``prefix_cache=True`` computes the activations below the first trainable block once (``tlkit.PrefixCache``;
    on disk in ``cache_dir`` if given, refused over ``max_bytes``) and trains the rest of the network on them:
    the same batches and, up to float noise, the same numbers, faster. It applies where the trainable part sits
    above frozen blocks in eval mode (head, last_block, last_n_blocks, blocks, gradual, conv_block, last_tensors);
    full, two_phase and bn="train" run as without it, and a random ``train_transform`` turns it off with an
    ``AugmentationDisablesCacheWarning``. The result's ``prefix_cache`` then says
    what the cache did (None where it did not apply).
    """
    if strategy == "two_phase" and not 0 < head_epochs < epochs:
        raise ValueError(f"two_phase needs 0 < head_epochs < epochs, got head_epochs={head_epochs}, epochs={epochs}.")
    if bn not in BN_MODES:
        raise ValueError(f"Unknown bn mode {bn!r}; choose one of {', '.join(BN_MODES)}.")
    set_seed(seed)
    model = create_model(backbone, len(splits.classes), weights, eval_frozen_blocks=bn != "train")
    apply_strategy(model, strategy, n_blocks=n_blocks, n_tensors=n_tensors, unfreeze=unfreeze, conv_channels=conv_channels)
    if bn == "frozen":
        freeze_batchnorm(model)
    model.to(device)
    transform = eval_transform(image_size, model.normalization)
    train_transform = transform if train_transform is None else train_transform
    train_loader = make_loader(splits.train, train_transform, batch_size, shuffle=True, seed=seed)
    val_loader = make_loader(splits.val, transform, batch_size, shuffle=False)
    decay = dict(layer_decay=layer_decay, lr_mult=lr_mult)
    common = dict(device=device, progress=progress)
    start = time.perf_counter()
    cache, skipped = None, _prefix_cache_skipped(model, strategy, train_transform) if prefix_cache else None
    if prefix_cache and skipped is None:
        ordered = make_loader(splits.train, train_transform, batch_size, shuffle=False)
        cache = PrefixCache(model, {"train": ordered, "val": val_loader}, device, cache_dir=cache_dir,
                            max_bytes=max_bytes, progress=progress)
        train_loader = cache.loader("train", batch_size, shuffle=True, seed=seed)
        val_loader = cache.loader("val", batch_size, shuffle=False)
    stepper = model if cache is None else cache.suffix  # the suffix shares the model's parameters
    if strategy == "two_phase":
        history = fine_tune(
            model, train_loader, val_loader, head_epochs=head_epochs, epochs=epochs - head_epochs, lr=lr,
            callbacks=callbacks, **decay, **common,
        )
    else:
        optimizer = make_optimizer(model, lr, **decay)
        if strategy == "gradual":
            # unfreeze only blocks that get at least one epoch of training (none after the last epoch)
            order = blocks_below_head(model)[::-1][: (epochs - 1) // unfreeze_every]
            unfreezing = GradualUnfreezing(model, optimizer, lr=lr, every=unfreeze_every, order=order, **decay)
            callbacks = [unfreezing, *callbacks]
        history = fit(stepper, train_loader, val_loader, epochs=epochs, optimizer=optimizer, callbacks=callbacks, **common)
    seconds = time.perf_counter() - start
    label = name or (strategy if bn == "default" else f"{strategy}, BN {bn}")
    if not prefix_cache:
        return RunResult(label, model, history, seconds, trainable_count(model))
    stats = None if cache is None else cache.stats
    print(f"{label}: {f'no prefix cache ({skipped})' if stats is None else stats.summary()}; {seconds:.1f} s in all.", flush=True)
    return RunResult(label, model, history, seconds, trainable_count(model), stats)


def _prefix_cache_skipped(model: TransferModel, strategy: str, train_transform: Callable) -> str | None:
    """Why the prefix cache cannot serve this run, or None when it can (a random transform also warns)."""
    if strategy == "two_phase":
        return "two_phase trains through fine_tune on the model itself, and its second phase trains every block"
    if not is_deterministic(train_transform):
        prefix_cache_allowed(model, train_transform)  # warns, as the feature cache does
        return "the train transform is random"
    if not prefix_cache_allowed(model, train_transform):
        return "nothing below the first trainable block is frozen in eval mode"
    return None


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
