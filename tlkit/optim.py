"""Optimizers with a learning rate per block: discriminative learning rates (``layer_decay``, ``lr_mult``) and
blocks that join a running optimizer as new parameter groups, keeping its state."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch

from .models import TransferModel, _check_names, block_names, set_trainable


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

