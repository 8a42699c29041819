"""Continuing a trained model on new data: class subsets, replay, head expansion, distillation (LwF)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from .checkpoints import model_from_checkpoint
from .data import LabeledImages, limit_per_class, make_loader
from .models import TransferModel, block_names, set_trainable
from .prefix_cache import PrefixCache, PrefixCacheStats, Suffix, prefix_activations
from .train import Callback, EarlyStopping, FitState, History, fit, predict, set_seed


def select_classes(ds: LabeledImages, classes: Sequence[str]) -> LabeledImages:
    """The images of ``ds`` whose class is in ``classes``, relabelled by position in ``classes``."""
    unknown = [c for c in classes if c not in ds.classes]
    if unknown:
        raise ValueError(f"Classes {unknown} are not in the dataset, whose classes are {ds.classes}.")
    new_label = {ds.classes.index(c): k for k, c in enumerate(classes)}
    relabelled = [new_label.get(t, -1) for t in ds._all_targets]
    kept = [j for j in ds.indices if relabelled[j] >= 0]
    return LabeledImages(ds._load, relabelled, classes, kept)


def with_classes(ds: LabeledImages, classes: Sequence[str]) -> LabeledImages:
    """Same images, labels re-indexed into a longer class list (old classes first, new ones appended)."""
    missing = [c for c in ds.classes if c not in classes]
    if missing:
        raise ValueError(f"Classes {missing} of the dataset are missing from {list(classes)}.")
    position = {k: list(classes).index(c) for k, c in enumerate(ds.classes)}
    return LabeledImages(ds._load, [position.get(t, -1) if t >= 0 else -1 for t in ds._all_targets], classes, ds.indices)


def with_replay(new: LabeledImages, old: LabeledImages, per_class: int, seed: int) -> Dataset:
    """New data plus a stratified replay sample of ``per_class`` old images per class (0: new data only)."""
    if per_class == 0:
        return new
    if new.classes != old.classes:
        raise ValueError("Replay needs both datasets labelled in the same class list: use with_classes first.")
    return ConcatDataset([new, limit_per_class(old, per_class, seed)])


def _head_linear(model: nn.Module) -> tuple[nn.Module, str]:
    """The head's final Linear layer and its name inside ``model.head``."""
    head = model.head
    if isinstance(head, nn.Linear):
        return head, ""
    if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear):
        return head[-1], str(len(head) - 1)
    raise ValueError(f"Cannot expand a head of type {type(head).__name__}: expected Linear or Sequential ending in Linear.")


def expand_head(model: nn.Module, num_new: int, new_bias: float = -10.0) -> nn.Module:
    """Grow the head from K to K + ``num_new`` outputs; the K old rows keep their weights and biases exactly.

    New rows start with zero weights and bias ``new_bias``: new classes start improbable, so what
    the model predicts for old classes does not change until it is trained on the new ones.
    """
    if num_new < 1:
        raise ValueError(f"num_new must be at least 1, got {num_new}.")
    old, name = _head_linear(model)
    new = nn.Linear(old.in_features, old.out_features + num_new).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.fill_(new_bias)
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
    new.weight.requires_grad_(old.weight.requires_grad)
    new.bias.requires_grad_(old.bias.requires_grad)
    if name:
        model.head[int(name)] = new
    else:
        model.head = new
    return model


class DistillationLoss(nn.Module):
    """Cross-entropy on the labels plus Learning-without-Forgetting distillation on the old classes' logits.

    ``teacher`` is the frozen model from before the new classes; its logits on the same batch
    (caught with a forward pre-hook on ``student``) are the soft targets for the student's first
    K outputs: ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student[:, :K] / T))``.
    Call ``remove()`` when training is done.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float = 2.0, alpha: float = 1.0) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha
        self._inputs: torch.Tensor | None = None
        self._hook = student.register_forward_pre_hook(self._remember)

    def _remember(self, module: nn.Module, args: tuple) -> None:
        self._inputs = args[0]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target)
        with torch.no_grad():
            old = self.teacher(self._inputs).float()
        t = self.temperature
        kd = F.kl_div(F.log_softmax(logits[:, : old.shape[1]].float() / t, 1), F.softmax(old / t, 1), reduction="batchmean")
        return ce + self.alpha * t * t * kd

    def remove(self) -> None:
        """Detach the hook from the student."""
        self._hook.remove()


class AccuracyTracker(Callback):
    """A ``fit`` callback: accuracy on groups of classes of the validation set, after every epoch.

    It scores the outputs of fit's own validation pass (``state.val_logits``), so the model does not run twice.
    """

    def __init__(self, groups: dict[str, Sequence[int]]) -> None:
        self.groups = groups
        self.acc: dict[str, list[float]] = {name: [] for name in groups}

    def on_epoch_end(self, state: FitState) -> None:
        for name, value in _accuracy_by_group(state.val_logits.argmax(1) == state.val_labels, state.val_labels, self.groups).items():
            self.acc[name].append(value)


def group_accuracy(
    model: nn.Module,
    loader: DataLoader,
    groups: dict[str, Sequence[int]],
    device: torch.device | str = "cpu",
    *,
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """Accuracy (prediction among all classes) on the images whose true class is in each group.

    With ``cache_dir``, a TransferModel whose lower blocks are frozen is scored from their activations
    (``prefix_activations``), read from there when the same frozen blocks saw the same images before.
    """
    cached = prefix_activations(model, loader, device, cache_dir=cache_dir) if cache_dir is not None and isinstance(model, TransferModel) else None
    probs, labels = predict(*(cached or (model, loader)), device)
    return _accuracy_by_group(probs.argmax(1) == labels, labels, groups)


def _accuracy_by_group(correct: torch.Tensor, labels: torch.Tensor, groups: dict[str, Sequence[int]]) -> dict[str, float]:
    """The share of ``correct`` predictions among the items whose label is in each group (NaN for an empty group)."""
    out = {}
    for name, members in groups.items():
        mask = torch.isin(labels, torch.tensor(list(members)))
        out[name] = correct[mask].float().mean().item() if mask.any() else float("nan")
    return out


def without(ds: LabeledImages, used: LabeledImages) -> LabeledImages:
    """The images of ``ds`` that are not in ``used`` (both drawn from the same source)."""
    taken = set(used.indices)
    return ds.subset([p for p, j in enumerate(ds.indices) if j not in taken])


@dataclass
class ContinuedRun:
    """A model trained further from a checkpoint, with its history and per-epoch accuracy per class group."""

    model: nn.Module
    history: History
    tracked: dict[str, list[float]]  # validation accuracy per group, after every epoch
    test: dict[str, float] | None = None  # accuracy per group on the test set after training; None without one
    prefix_cache: PrefixCacheStats | None = None  # what the prefix cache did; None without it


def continue_training(
    checkpoint: str | Path,
    train_set: Dataset,
    val_set: Dataset,
    groups: dict[str, Sequence[int]],
    *,
    classes: Sequence[str],
    trainable: Sequence[str],
    transform: Callable,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    distill: bool = False,
    resume_optimizer: bool = False,
    early_stopping_patience: int | None = 2,
    test_set: Dataset | None = None,
    prefix_cache: bool = False,
    cache_dir: str | Path | None = None,
) -> ContinuedRun:
    """Load ``checkpoint`` in a fresh state, grow its head to ``classes`` if needed, train ``trainable`` blocks on ``train_set``.

    ``resume_optimizer`` reloads the saved optimizer state (same classes and blocks only) and then
    sets ``lr``; ``distill`` adds LwF distillation on the old classes' logits. ``val_set`` drives
    the LR plateau schedule and early stopping; accuracy per class group is tracked every epoch, and
    measured once on ``test_set`` at the end. ``prefix_cache`` runs the frozen blocks below ``trainable``
    once per image set (``PrefixCache``; on disk in ``cache_dir``) and trains the rest on their activations:
    the same numbers up to float noise, with the teacher of ``distill`` run from the same activations.
    """
    set_seed(seed)
    model, ckpt = model_from_checkpoint(checkpoint)
    if list(classes[: len(ckpt.classes)]) != ckpt.classes:
        raise ValueError(f"New class list must start with the checkpoint's classes {ckpt.classes}, got {list(classes)}.")
    teacher = copy.deepcopy(model) if distill else None
    if len(classes) > len(ckpt.classes):
        expand_head(model, len(classes) - len(ckpt.classes))
    set_trainable(model, block_names(model), False)
    set_trainable(model, trainable, True)
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if resume_optimizer:
        if ckpt.optimizer is None or len(classes) != len(ckpt.classes):
            raise ValueError("resume_optimizer needs a checkpoint with optimizer state and the same classes.")
        optimizer.load_state_dict(ckpt.optimizer)
        for group in optimizer.param_groups:
            group["lr"] = lr
    loaders = {
        "train": make_loader(train_set, transform, batch_size, shuffle=True, seed=seed),
        "val": make_loader(val_set, transform, batch_size, shuffle=False),
    }
    if test_set is not None:
        loaders["test"] = make_loader(test_set, transform, batch_size, shuffle=False)
    stepper, cache = model, None
    if prefix_cache:
        ordered = {**loaders, "train": make_loader(train_set, transform, batch_size, shuffle=False)}
        cache = PrefixCache(model, ordered, device, cache_dir=cache_dir, progress=False, report=False)
        stepper = cache.suffix  # the suffix shares the model's parameters
        loaders = {name: cache.loader(name, batch_size, shuffle=name == "train", seed=seed) for name in ordered}
        if teacher is not None:
            teacher = Suffix(teacher.to(device), cache.boundary)  # the teacher's frozen blocks are the student's
    tracker = AccuracyTracker(groups)
    # the tracker records the epoch before early stopping decides (it records the last epoch too)
    callbacks = [tracker] if early_stopping_patience is None else [tracker, EarlyStopping(early_stopping_patience)]
    loss_fn = DistillationLoss(stepper, teacher.to(device)) if teacher is not None else None
    try:
        history = fit(
            stepper, loaders["train"], loaders["val"],
            epochs=epochs, optimizer=optimizer, scheduler="plateau", device=device, loss_fn=loss_fn,
            callbacks=callbacks, progress=False,
        )
    finally:
        if loss_fn is not None:
            loss_fn.remove()
    test = group_accuracy(stepper, loaders["test"], groups, device) if "test" in loaders else None
    return ContinuedRun(model, history, tracker.acc, test, None if cache is None else cache.stats)
