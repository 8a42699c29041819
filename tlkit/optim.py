"""Optimizers with a learning rate per block: discriminative learning rates (``layer_decay``, ``lr_mult``) and
blocks that join a running optimizer as new parameter groups, keeping its state; fastai's one-cycle schedule, stepped
by the optimizer itself (``OneCycle``), with a warm-up for groups that join mid-run."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Real

import torch

from .models import TransferModel, _check_names, block_names, set_trainable
from .params import check_learning_rate, check_weight_decay


def lr_multipliers(
    model: TransferModel, layer_decay: float = 1.0, lr_mult: Mapping[str, float] | None = None
) -> OrderedDict[str, float]:
    """LR multiplier per block, head first: ``layer_decay ** k`` for the block k places below the head, then ``lr_mult`` overrides."""
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1] (1 = the same LR everywhere), got {layer_decay}.")
    multipliers = OrderedDict((name, layer_decay**k) for k, name in enumerate(reversed(block_names(model))))
    overrides = dict(lr_mult or {})
    _check_names(model, overrides)
    bad = {name: m for name, m in overrides.items() if isinstance(m, bool) or not isinstance(m, Real) or not 0 < m < math.inf}
    if bad:
        raise ValueError(f"lr_mult values must be positive finite numbers (freeze a block instead of giving it LR 0), got {bad}.")
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
    lr = check_learning_rate("lr", lr)
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
    weight_decay = check_weight_decay("weight_decay", weight_decay)
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



# --- one-cycle schedule, stepped by the optimizer ------------------------------------------------------


def one_cycle_factor(step: int, total_steps: int, *, pct_start: float = 0.25, div: float = 25.0, div_final: float = 1e5) -> float:
    """fastai's one-cycle LR multiplier at ``step`` of ``total_steps``: cosine from ``1 / div`` up to 1 over the first
    ``pct_start`` of the steps, then cosine down to ``1 / div_final`` (fastai's ``fit_one_cycle``; steps past the end
    keep the last value)."""
    return _one_cycle(step, total_steps, pct_start, 1 / div, 1.0, 1 / div_final)


def _one_cycle(step: int, total_steps: int, pct_start: float, start: float, middle: float, end: float) -> float:
    """fastai's ``combined_cos``: ``start`` -> ``middle`` over ``pct_start`` of the steps, then ``middle`` -> ``end``."""
    pct = min(step, total_steps - 1) / total_steps  # fastai's train_iter / n_iter
    if pct < pct_start:
        low, high, pos = start, middle, pct / pct_start
    else:
        low, high, pos = middle, end, (pct - pct_start) / (1 - pct_start) if pct_start < 1 else 1.0
    return low + (1 - math.cos(math.pi * pos)) * (high - low) / 2


class OneCycle:
    """fastai's ``fit_one_cycle`` schedule over ``total_steps`` optimizer steps, each group at its own peak LR.

    Every param group's LR is its peak times ``one_cycle_factor(step)``; the peak is the group's LR when the
    schedule is made (kept in the group as ``"peak_lr"``). With ``moms`` (fastai's default (0.95, 0.85, 0.95)),
    Adam's beta1 moves the other way: down while the LR warms up, back up while it anneals. A group that joins the
    optimizer later (``unfreeze_into``, ``GradualUnfreezing``) starts at LR 0 and warms up linearly over
    ``join_warmup`` of its own steps (None: the schedule's warm-up, ``pct_start * total_steps``): its Adam moments are
    fresh, so its first steps have the full size ``lr`` whatever its gradients, and a full-size step on pretrained
    weights undoes what they learnt.

    The schedule steps with the optimizer (a step pre-hook sets every group's LR before each step), so ``fit``'s
    once-per-epoch ``scheduler.step()`` does nothing: pass ``scheduler=tlkit.optim.one_cycle(total_steps)`` to
    ``fit``. Only one schedule drives an optimizer: a new one detaches the previous one.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        *,
        pct_start: float = 0.25,
        div: float = 25.0,
        div_final: float = 1e5,
        moms: tuple[float, float, float] | None = (0.95, 0.85, 0.95),
        join_warmup: int | None = None,
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a whole number of at least 1, got {total_steps!r}.")
        if not 0 < pct_start <= 1:
            raise ValueError(f"pct_start must be in (0, 1] (the share of the steps that warm up), got {pct_start}.")
        if not (div >= 1 and div_final >= 1):
            raise ValueError(f"div and div_final must be at least 1 (start at lr / div, end at lr / div_final), got {div}, {div_final}.")
        if join_warmup is not None and (isinstance(join_warmup, bool) or not isinstance(join_warmup, int) or join_warmup < 0):
            raise ValueError(f"join_warmup must be a whole number of steps (0: none) or None, got {join_warmup!r}.")
        if moms is not None and any("betas" not in g for g in optimizer.param_groups):
            raise ValueError("moms cycles Adam's beta1: use an Adam-type optimizer, or moms=None.")
        self.optimizer, self.total_steps = optimizer, total_steps
        self.pct_start, self.div, self.div_final, self.moms = pct_start, div, div_final, moms
        self.join_warmup = round(pct_start * total_steps) if join_warmup is None else join_warmup
        self.step_count = 0
        for group in optimizer.param_groups:
            group["peak_lr"], group["joined_at"] = group["lr"], None  # present from the start: the cycle's own warm-up
        previous = getattr(optimizer, "_tlkit_schedule", None)
        if previous is not None:
            previous.detach()
        optimizer._tlkit_schedule = self
        self._hook = optimizer.register_step_pre_hook(self._before_step)
        self._apply()

    def factor(self, step: int) -> float:
        """The LR multiplier of the groups present from the start at optimizer step ``step`` (0-based)."""
        return one_cycle_factor(step, self.total_steps, pct_start=self.pct_start, div=self.div, div_final=self.div_final)

    def _apply(self) -> None:
        t = self.step_count
        for group in self.optimizer.param_groups:
            if "peak_lr" not in group:  # joined since the last step
                group["peak_lr"], group["joined_at"] = group["lr"], t
            joined, ramp = group["joined_at"], 1.0
            if joined is not None and self.join_warmup:
                ramp = min(1.0, (t - joined + 1) / self.join_warmup)
            group["lr"] = group["peak_lr"] * self.factor(t) * ramp
            if self.moms is not None:
                high, low, end = self.moms
                group["betas"] = (_one_cycle(t, self.total_steps, self.pct_start, high, low, end), group["betas"][1])

    def _before_step(self, optimizer, args, kwargs) -> None:
        self._apply()
        self.step_count += 1

    def step(self) -> None:
        """Called by ``fit`` once per epoch: nothing to do, the optimizer steps this schedule."""

    def detach(self) -> None:
        """Stop driving the optimizer (its LRs stay where they are)."""
        self._hook.remove()
        if getattr(self.optimizer, "_tlkit_schedule", None) is self:
            del self.optimizer._tlkit_schedule

    def get_last_lr(self) -> list[float]:
        """Every group's current LR (as torch's schedulers report it)."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, int]:
        """The step count (peaks and join steps live in the optimizer's param groups, saved with it)."""
        return {"step_count": self.step_count}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a saved step count."""
        self.step_count = int(state["step_count"])
        self._apply()


def one_cycle(total_steps: int, **options) -> Callable[[torch.optim.Optimizer], OneCycle]:
    """``fit(scheduler=one_cycle(epochs * len(train_loader)))``: a ``OneCycle`` over those steps (``options`` as there)."""
    return lambda optimizer: OneCycle(optimizer, total_steps, **options)


def layer_decay_for_ratio(model: TransferModel, ratio: float) -> float:
    """The ``layer_decay`` that spreads LRs geometrically from ``lr`` (head) to ``lr / ratio`` (the first block), as
    fastai's ``slice(lr / ratio, lr)`` does over its layer groups (here: one group per block)."""
    if not ratio >= 1:
        raise ValueError(f"ratio must be at least 1 (the head's LR over the first block's), got {ratio}.")
    return ratio ** (-1 / (len(block_names(model)) - 1))


def one_cycle_lrs(
    peaks: Mapping[str, float], total_steps: int, *, joins: Mapping[str, int] | None = None, **options
) -> dict[str, list[float]]:
    """The LR of each named group at every step of a ``OneCycle`` (``options`` as there), worked out without training.

    ``peaks``: group name -> its peak LR; ``joins``: group name -> the step it joins the optimizer at (a block that
    unfreezes mid-run; default 0, from the start). Before a group joins, its LR is NaN (it does not train).
    """
    joins = {name: 0 for name in peaks} | dict(joins or {})
    unknown = sorted(set(joins) - set(peaks))
    if unknown:
        raise ValueError(f"joins names group(s) {unknown} that have no peak LR; peaks has {list(peaks)}.")
    weights = {name: torch.zeros(1, requires_grad=True) for name in peaks}
    first = [{"params": [weights[n]], "lr": lr, "name": n} for n, lr in peaks.items() if joins[n] <= 0]
    if not first:
        raise ValueError("At least one group must train from step 0 (a join step of 0).")
    optimizer = torch.optim.AdamW(first, lr=first[0]["lr"])
    OneCycle(optimizer, total_steps, **options)
    lrs: dict[str, list[float]] = {name: [] for name in peaks}
    for step in range(total_steps):
        for name in peaks:
            if joins[name] == step and step > 0:
                optimizer.add_param_group({"params": [weights[name]], "lr": peaks[name], "name": name})
        optimizer.step()  # no gradients: nothing moves, but the schedule sets this step's LRs first
        current = {g["name"]: g["lr"] for g in optimizer.param_groups}
        for name in peaks:
            lrs[name].append(current.get(name, math.nan))
    return lrs
