"""Choose learning rates: an LR range test over the trainable param groups, and a report of what BatchNorm does per block.

``lr_find`` runs Smith's range test (Cyclical Learning Rates, 2017; fastai's ``lr_find``): train for a
few steps while the learning rate grows exponentially, record the loss, stop when it diverges, then
put everything back. ``batchnorm_report`` says, block by block, which BatchNorm layers would keep
changing their running statistics in ``model.train()``, frozen or not.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from .models import TransferModel
from .optim import make_optimizer, param_groups
from .params import check_learning_rate, check_weight_decay

SUGGESTION_RULE = (
    "suggestion: the LR where the smoothed loss falls fastest (steepest negative slope against log10 LR, looked for "
    "between the first 10% of the sweep and the loss minimum); min_over_10: the LR of the smoothed loss minimum / 10"
)


@dataclass
class LRFinderResult:
    """The curve of an LR range test and the learning rates it suggests.

    ``lrs`` are the swept reference LRs: the ``lr`` to give ``make_optimizer`` / ``run_strategy`` /
    ``FreezePanel`` with the same ``layer_decay`` and ``lr_mult`` (each group trained at ``lr`` times
    its entry in ``multipliers``). ``losses`` are the raw batch losses, ``smoothed`` their
    bias-corrected moving average. Rule (``SUGGESTION_RULE``): ``suggestion`` is the LR at the
    steepest descent of the smoothed loss (against log10 LR) between the first 10% of the sweep
    (batch noise there, not learning) and the loss minimum; ``min_over_10`` is the LR at the
    minimum divided by 10 (fastai's older rule), and stands in for ``suggestion`` when the loss
    never falls. ``min_over_10`` can lie below the swept range when the loss only rises.
    ``tlkit.plot_lr_find(result)`` draws it.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    min_over_10: float
    diverged: bool
    multipliers: dict[str, float] = field(default_factory=dict)
    rule: str = SUGGESTION_RULE

    def __repr__(self) -> str:
        return (
            f"LRFinderResult({len(self.lrs)} steps, {self.lrs[0]:.1e} to {self.lrs[-1]:.1e}, "
            f"suggestion={self.suggestion:.2e}, min_over_10={self.min_over_10:.2e}, diverged={self.diverged})"
        )


# --- saving and restoring everything the sweep touches --------------------------------------------


def _modules_of(model: nn.Module, module: nn.Module) -> list[nn.Module]:
    """``model`` and, when it is not part of ``model``, ``module``: the modules whose state is saved."""
    inside = any(m is module for m in model.modules())
    return [model] if inside else [model, module]


@contextmanager
def _everything_restored(owners: list[nn.Module], optimizer: torch.optim.Optimizer | None, loader: DataLoader) -> Iterator[None]:
    """Put back, on exit, weights and buffers, gradients, requires_grad flags, train/eval modes, the optimizer's state and the RNGs."""
    states = [copy.deepcopy(owner.state_dict()) for owner in owners]  # deep copies: the sweep changes tensors in place
    params = list(dict.fromkeys(chain.from_iterable(owner.parameters() for owner in owners)))
    flags = [p.requires_grad for p in params]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    modes = [(m, m.training) for owner in owners for m in owner.modules()]
    optimizer_state = None if optimizer is None else copy.deepcopy(optimizer.state_dict())
    rng = _rng_states(loader)
    try:
        yield
    finally:
        for owner, state in zip(owners, states):
            owner.load_state_dict(state)
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for m, training in modes:
            m.training = training  # the flag alone: .train() would recurse and re-apply TransferModel's rule
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        _set_rng_states(loader, rng)


def _rng_states(loader: DataLoader) -> dict:
    """Every generator the sweep draws from: the loader's shuffling generator, torch's (CPU, CUDA), NumPy's and Python's."""
    generator = getattr(loader, "generator", None)
    return {
        "loader": None if generator is None else generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_states(loader: DataLoader, states: dict) -> None:
    if states["loader"] is not None:
        loader.generator.set_state(states["loader"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


# --- the sweep -------------------------------------------------------------------------------------


def _batches(loader: DataLoader) -> Iterator:
    """The loader's batches, starting over when it runs out (a sweep can be longer than one epoch)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("lr_find got an empty loader: give it the training loader (at least one batch).")


def _sweep_groups(
    model: nn.Module,
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    layer_decay: float,
    lr_mult: Mapping[str, float] | None,
    weight_decay: float,
) -> tuple[torch.optim.Optimizer, list[float], dict[str, float]]:
    """A fresh optimizer for the sweep, each group's LR multiplier, and the multipliers by group name.

    With ``optimizer``: a copy of it (same class, hyperparameters and state, e.g. Adam's moments), so
    the sweep never touches the caller's object (a scheduler would wrap its ``step``); multipliers are
    each group's LR over the first group's. Without: AdamW over ``param_groups(model, 1.0, ...)``
    (TransferModel) or over the module's trainable parameters, limited to parameters of ``module``.
    """
    if optimizer is not None:
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": g["params"]} for g in optimizer.param_groups]
        # Every group holds all its hyperparameters, so the constructor's defaults do not matter (and its
        # ``defaults`` cannot be passed back: AdamW's include a name its __init__ does not take).
        sweep = type(optimizer)(groups)
        sweep.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        lrs = [g["lr"] for g in sweep.param_groups]
        if not all(0 < lr < math.inf for lr in lrs):
            raise ValueError(f"The optimizer's param groups have lr={lrs}; lr_find needs positive finite LRs to keep their ratios.")
        reference = lrs[0]
        mults = [g["lr"] / reference for g in sweep.param_groups]
    else:
        in_module = {id(p) for p in module.parameters()}
        if isinstance(model, TransferModel):
            groups = param_groups(model, 1.0, layer_decay=layer_decay, lr_mult=lr_mult)
        else:
            groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": 1.0, "name": "all"}]
        groups = [{**g, "params": [p for p in g["params"] if id(p) in in_module]} for g in groups]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError(
                "Nothing to sweep: the module run on the loader has no trainable parameters. Unfreeze at least the head "
                "(tlkit.unfreeze(model, ['head'])), or pass module= the part that trains on the loader's inputs."
            )
        mults = [g["lr"] for g in groups]
        sweep = make_optimizer(groups, 1.0, weight_decay=weight_decay)
    names = {str(g.get("name", i)): m for i, (g, m) in enumerate(zip(sweep.param_groups, mults))}
    return sweep, mults, names


def _module_for(model: nn.Module, module: nn.Module | None, first_inputs: torch.Tensor) -> nn.Module:
    """``module`` if given; the head when a TransferModel gets pooled features (N x num_features); else the model."""
    if module is not None:
        return module
    if isinstance(model, TransferModel) and first_inputs.ndim == 2 and first_inputs.shape[1] == model.num_features:
        return model.head  # cached features (tlkit.extract_features): only the head runs on them
    return model


def _set_train_mode(model: nn.Module, module: nn.Module) -> None:
    """Train mode as ``fit`` sets it: with a TransferModel, fully frozen blocks stay in eval mode."""
    module.train()
    if isinstance(model, TransferModel):
        model.train()  # after module.train(): a suffix module holding frozen blocks gets them back in eval mode


def _smoothed_next(average: float, loss: float, beta: float, count: int) -> tuple[float, float]:
    """One step of an exponential moving average with bias correction (fastai's smoothing): (new average, corrected value)."""
    average = beta * average + (1 - beta) * loss
    return average, average / (1 - beta**count)


def _suggestions(lrs: list[float], smoothed: list[float]) -> tuple[float, float]:
    """(steepest descent before the minimum, LR at the minimum / 10); see ``SUGGESTION_RULE``."""
    values = np.array([v if math.isfinite(v) else np.inf for v in smoothed])
    lowest = int(np.argmin(values))
    min_over_10 = lrs[lowest] / 10
    # The first steps barely move the weights: their ups and downs are batch noise that the young
    # moving average still follows, so the first 10% of the sweep (at least 2 steps) is left out.
    skip = max(2, len(lrs) // 10)
    if lowest - skip < 1:  # no descent after the skipped steps to measure
        return min_over_10, min_over_10
    slopes = np.gradient(values[skip : lowest + 1], np.log10(lrs[skip : lowest + 1]))
    return lrs[skip + int(np.argmin(slopes))], min_over_10


def lr_find(
    model: nn.Module,
    loader: DataLoader,
    *,
    module: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    layer_decay: float = 1.0,
    lr_mult: Mapping[str, float] | None = None,
    start_lr: float = 1e-6,
    end_lr: float = 1.0,
    num_steps: int = 100,
    smoothing: float = 0.9,
    diverge_factor: float = 4.0,
    loss_fn: nn.Module | None = None,
    weight_decay: float = 0.0,
) -> LRFinderResult:
    """LR range test: ``num_steps`` training steps with the LR growing exponentially from ``start_lr`` to ``end_lr``.

    Every trainable param group moves together: group g trains at ``lr * multiplier_g``, the
    multipliers of ``tlkit.optim.param_groups(model, lr, layer_decay=..., lr_mult=...)`` (or, with
    ``optimizer``, each group's LR over the first group's), so the result is the ``lr`` to use with
    those same settings. Frozen blocks stay frozen and, as in ``fit``, in eval mode. The schedule is a
    ``torch.optim.lr_scheduler.LambdaLR``; the sweep stops early once the smoothed loss exceeds
    ``diverge_factor`` times its lowest value (or is not finite). See ``LRFinderResult`` for the rule
    behind ``suggestion`` and ``min_over_10``.

    ``module`` is what runs on the loader's inputs: by default the model, or its head when the loader
    yields cached features (``tlkit.extract_features``); pass e.g. a suffix module for cached
    activations. Inputs go to the device of the module's parameters (the model is not moved); the
    sweep runs in float32 (no autocast).

    Afterwards ``model`` (and ``module``) are exactly as before, bit for bit: weights, buffers
    (BatchNorm statistics), gradients, ``requires_grad`` flags, train/eval mode of every submodule;
    ``optimizer`` is never stepped (the sweep uses a copy of it, starting from its state). The RNGs
    the sweep draws from (the loader's generator, torch's CPU and CUDA, NumPy's, Python's) are put
    back too, so the next epoch sees the same batches as without the sweep. Not restored: the state
    of loader workers or of a sampler with a generator of its own, and anything ``loss_fn`` keeps.
    """
    check_learning_rate("start_lr", start_lr)
    check_learning_rate("end_lr", end_lr)
    check_weight_decay("weight_decay", weight_decay)
    if not start_lr < end_lr:
        raise ValueError(f"Need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be a whole number of at least 2, got {num_steps!r}.")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1) (0: no smoothing; 0.9 averages about 10 steps), got {smoothing}.")
    if not diverge_factor > 1:
        raise ValueError(f"diverge_factor must be above 1 (the loss rising that many times its minimum stops the sweep), got {diverge_factor}.")
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    growth = (end_lr / start_lr) ** (1 / (num_steps - 1))  # the LR of step i is start_lr * growth ** i
    with _everything_restored([model] if module is None else _modules_of(model, module), optimizer, loader):
        batches = _batches(loader)
        first = next(batches)
        module = _module_for(model, module, first[0])
        sweep, mults, names = _sweep_groups(model, module, optimizer, layer_decay, lr_mult, weight_decay)
        for group, mult in zip(sweep.param_groups, mults):
            group["lr"] = group["initial_lr"] = start_lr * mult  # set initial_lr: LambdaLR keeps an old one otherwise
        schedule = torch.optim.lr_scheduler.LambdaLR(sweep, lambda step: growth**step)
        device = next(module.parameters()).device
        _set_train_mode(model, module)
        lrs, losses, smoothed, average, diverged = [], [], [], 0.0, False
        for step, (x, y) in enumerate(chain([first], batches)):
            if step == num_steps:
                break
            lrs.append(sweep.param_groups[0]["lr"] / mults[0])
            loss = loss_fn(module(x.to(device)), y.to(device))
            sweep.zero_grad(set_to_none=True)
            loss.backward()
            sweep.step()
            schedule.step()
            losses.append(float(loss.item()))
            average, now = _smoothed_next(average, losses[-1], smoothing, len(losses))
            smoothed.append(now)
            if not math.isfinite(now) or now > diverge_factor * min(smoothed):
                diverged = True
                break
        batches.close()  # ends the loader's iterator now (its workers, if any), not at garbage collection
    suggestion, min_over_10 = _suggestions(lrs, smoothed)
    return LRFinderResult(lrs, losses, smoothed, suggestion, min_over_10, diverged, names)


# --- BatchNorm per block ----------------------------------------------------------------------------


def _batchnorm_types() -> tuple[type, ...]:
    """BatchNorm layers, fixed ones included: ``freeze_batchnorm`` swaps in classes that are no ``_BatchNorm``."""
    from timm.layers import FrozenBatchNormAct2d
    from torchvision.ops import FrozenBatchNorm2d

    return nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d, FrozenBatchNormAct2d


def _updates_statistics(m: nn.Module) -> bool:
    """True if a forward pass of ``m`` in its current mode changes its running statistics."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats and m.running_mean is not None


def batchnorm_report(model: nn.Module) -> pd.DataFrame:
    """One row per block: frozen?, its BatchNorm layers, and how many would update their running statistics in ``model.train()``.

    Found by calling ``model.train()`` and looking (every module's mode is put back afterwards). A
    frozen block whose statistics still update is the trap of PyTorch issue #86590: no weight learns,
    yet the block changes (column ``frozen but updating``). Blocks are ``model.blocks()`` for a
    TransferModel, else the model's direct children.
    """
    blocks = model.blocks() if isinstance(model, TransferModel) else dict(model.named_children())
    batchnorm_types = _batchnorm_types()
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        rows = []
        for name, block in blocks.items():
            params = list(block.parameters())
            frozen = bool(params) and not any(p.requires_grad for p in params)
            norms = [m for m in block.modules() if isinstance(m, batchnorm_types)]
            updating = sum(_updates_statistics(m) for m in norms)
            rows.append({"block": name, "frozen": frozen, "batchnorm layers": len(norms),
                         "updating in train()": updating, "frozen but updating": frozen and updating > 0})
    finally:
        for m, training in modes:
            m.training = training
    return pd.DataFrame(rows).set_index("block")
