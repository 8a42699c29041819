"""Optimizers with a learning rate per block: the one optimizer builder (``make_optimizer``), discriminative learning
rates (``layer_decay``, ``lr_mult``) and blocks that join a running optimizer as new parameter groups, keeping its state;
fastai's one-cycle schedule as a ``fit`` callback that sets the LRs before every step (``OneCycle``), with a warm-up
for groups that join mid-run."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Real

import torch
from torch import nn

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


OPTIMIZERS = {
    "adamw": "AdamW (torch's betas 0.9, 0.999)",
    "sgd": "SGD with momentum 0.9",
}
WEIGHT_DECAY = 0.0  # every optimizer tlkit builds starts here; a recipe that wants more passes it (continue_training: 0.01)


def make_optimizer(
    model: nn.Module | Sequence[dict],
    lr: float,
    *,
    layer_decay: float = 1.0,
    lr_mult: Mapping[str, float] | None = None,
    weight_decay: float = WEIGHT_DECAY,
    kind: str = "adamw",
    per_block: bool = True,
) -> torch.optim.Optimizer:
    """The one optimizer builder of tlkit: AdamW (``kind="sgd"``: SGD with momentum 0.9, ``OPTIMIZERS``) at ``lr``.

    ``model``: a ``TransferModel`` gets one param group per trainable block with discriminative learning rates
    (``param_groups``: ``layer_decay``, ``lr_mult``); with ``per_block=False``, or any other module (a head alone, a
    prefix cache's suffix), one group over its trainable parameters, in ``model.parameters()`` order (what ``fit``
    builds by default, and what its checkpoints' optimizer state fits). A list of param groups is used as given.
    """
    weight_decay = check_weight_decay("weight_decay", weight_decay)
    if kind not in OPTIMIZERS:
        raise ValueError(f"make_optimizer: unknown kind {kind!r}; choose one of {', '.join(map(repr, OPTIMIZERS))}.")
    groups = list(model) if not isinstance(model, nn.Module) else _groups_of(model, lr, layer_decay, lr_mult, per_block)
    if not groups:
        raise ValueError("The model has no trainable parameters: unfreeze at least the head (tlkit.unfreeze(model, ['head'])).")
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def _groups_of(model: nn.Module, lr: float, layer_decay: float, lr_mult: Mapping[str, float] | None, per_block: bool) -> list[dict]:
    """``param_groups`` for a TransferModel (per block), else one group over the trainable parameters."""
    if per_block and isinstance(model, TransferModel):
        return param_groups(model, lr, layer_decay=layer_decay, lr_mult=lr_mult)
    if layer_decay != 1.0 or lr_mult:
        raise ValueError("layer_decay and lr_mult give each block its own LR: they need a TransferModel and per_block=True.")
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": params, "lr": check_learning_rate("lr", lr)}] if params else []


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


def decay_towards_start(optimizer: torch.optim.Optimizer, strength: float, *, skip: Iterable[str] = ("head",)):
    """L2-SP (Li et al. 2018: penalise ``strength / 2 * ||w - w0||^2``, w0 the pretrained weights), decoupled as AdamW
    decouples weight decay: before every step each parameter moves ``lr * strength`` of the way back to w0, its value at
    its first step (so blocks that join later keep their own w0). Groups named in ``skip`` are left alone: the new head
    has no pretrained value to return to (plain ``weight_decay`` is its regulariser). Returns the hook's handle
    (``.remove()`` stops it)."""
    strength = check_weight_decay("strength", strength)
    skipped = set(skip)
    start: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def pull_back(opt: torch.optim.Optimizer, *_: object) -> None:
        for group in opt.param_groups:
            if group.get("name") in skipped:
                continue
            for p in group["params"]:
                if id(p) not in start:
                    start[id(p)] = p.detach().clone()  # w0: its value before its first step
                else:
                    p.sub_(p - start[id(p)], alpha=min(1.0, group["lr"] * strength))  # never past w0

    return optimizer.register_step_pre_hook(pull_back)


# --- one-cycle schedule, a fit callback -----------------------------------------------------------------


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
    """fastai's ``fit_one_cycle`` schedule over ``total_steps`` optimizer steps, each group at its own peak LR: a
    ``fit`` callback (``on_batch_start`` sets every group's LR for the coming step, ``on_batch_end`` counts it).

    Pass it as ``fit(scheduler=tlkit.optim.one_cycle(total_steps))`` (saved with ``SaveCheckpoint`` like any
    scheduler) or in ``callbacks=[OneCycle(optimizer, total_steps)]``; ``fit`` never steps it once per epoch.
    Every param group's LR is its peak times ``one_cycle_factor(step)``; the peak is the group's LR when the
    schedule is made (kept in the group as ``"peak_lr"``, so it is saved with the optimizer). With ``moms``
    (fastai's default (0.95, 0.85, 0.95)), Adam's beta1 moves the other way: down while the LR warms up, back up
    while it anneals. A group that joins the optimizer later (``unfreeze_into``, ``GradualUnfreezing``) starts at
    LR 0 and warms up linearly over ``join_warmup`` of its own steps (None: the schedule's warm-up,
    ``pct_start * total_steps``; its join step is kept as ``"joined_at"``): its Adam moments are fresh, so its first
    steps have the full size ``lr`` whatever its gradients, and a full-size step on pretrained weights undoes what
    they learnt. ``restart`` begins a new cycle on the same optimizer (``fastai_fine_tune``'s second phase).

    Not torch's ``OneCycleLR``: torch's schedulers fix their groups when made (``base_lrs``, one ``lr_lambda`` per
    group; ``OneCycleLR`` keeps ``max_lr`` per group then), so a group that joins mid-run would get no LR of its own,
    let alone a warm-up from its own join step; and ``OneCycleLR`` places its phase ends at ``pct_start * total - 1``
    steps where fastai's ``combined_cos`` uses ``step / total``, which changes every LR.
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
        self.optimizer = optimizer
        self.restart(total_steps, pct_start=pct_start, div=div, div_final=div_final, moms=moms, join_warmup=join_warmup)

    def restart(
        self,
        total_steps: int,
        *,
        pct_start: float = 0.25,
        div: float = 25.0,
        div_final: float = 1e5,
        moms: tuple[float, float, float] | None = (0.95, 0.85, 0.95),
        join_warmup: int | None = None,
    ) -> None:
        """A new cycle from step 0 over ``total_steps``: every group's current LR becomes its peak (options as in the class)."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a whole number of at least 1, got {total_steps!r}.")
        if not 0 < pct_start <= 1:
            raise ValueError(f"pct_start must be in (0, 1] (the share of the steps that warm up), got {pct_start}.")
        if not (div >= 1 and div_final >= 1):
            raise ValueError(f"div and div_final must be at least 1 (start at lr / div, end at lr / div_final), got {div}, {div_final}.")
        if join_warmup is not None and (isinstance(join_warmup, bool) or not isinstance(join_warmup, int) or join_warmup < 0):
            raise ValueError(f"join_warmup must be a whole number of steps (0: none) or None, got {join_warmup!r}.")
        if moms is not None and any("betas" not in g for g in self.optimizer.param_groups):
            raise ValueError("moms cycles Adam's beta1: use an Adam-type optimizer, or moms=None.")
        self.total_steps, self.pct_start, self.div, self.div_final, self.moms = total_steps, pct_start, div, div_final, moms
        self.join_warmup = round(pct_start * total_steps) if join_warmup is None else join_warmup
        self.step_count = 0
        for group in self.optimizer.param_groups:
            group["peak_lr"], group["joined_at"] = group["lr"], None  # present from the start: the cycle's own warm-up
        self._apply()  # the first step's LRs, also for the LR fit records before its first batch

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

    def _check_optimizer(self, state) -> None:
        if state is not None and state.optimizer is not self.optimizer:
            raise ValueError("This OneCycle drives another optimizer than the one fit trains with: make it with fit's optimizer "
                             "(fit(optimizer=opt, callbacks=[OneCycle(opt, steps)]), or pass scheduler=tlkit.optim.one_cycle(steps)).")

    def on_batch_start(self, state) -> None:
        """Before each training batch: every group's LR (and beta1) for this step; a group that joined since gets its peak."""
        self._check_optimizer(state)
        self._apply()

    def on_batch_end(self, state) -> None:
        """After each optimizer step: one step further along the cycle."""
        self.step_count += 1

    def on_epoch_end(self, state) -> None:
        """Nothing: the schedule moves per step."""

    def on_fit_end(self, state) -> None:
        """Nothing: the LRs stay where the last step left them."""

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
    optimizer = make_optimizer(first, first[0]["lr"])
    schedule = OneCycle(optimizer, total_steps, **options)
    lrs: dict[str, list[float]] = {name: [] for name in peaks}
    for step in range(total_steps):
        for name in peaks:
            if joins[name] == step and step > 0:
                optimizer.add_param_group({"params": [weights[name]], "lr": peaks[name], "name": name})
        schedule.on_batch_start(None)  # what fit calls before each step: this step's LRs (no training needed)
        current = {g["name"]: g["lr"] for g in optimizer.param_groups}
        for name in peaks:
            lrs[name].append(current.get(name, math.nan))
        schedule.on_batch_end(None)
    return lrs
