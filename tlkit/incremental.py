"""Continuing a trained model on new data: class subsets, replay, head expansion, distillation (LwF)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from .data import LabeledImages
from .models import TransferModel, head_linear
from .prefix_cache import prefix_activations
from .train import Callback, FitState, predict


def with_replay(new: LabeledImages, old: LabeledImages, per_class: int, seed: int) -> Dataset:
    """New data plus a stratified replay sample of ``per_class`` old images per class (0: new data only)."""
    if per_class == 0:
        return new
    if new.classes != old.classes:
        raise ValueError("Replay needs both datasets labelled in the same class list: use with_classes first.")
    return ConcatDataset([new, old.limit_per_class(per_class, seed)])


# How the rows of new classes start when the head grows (expand_head's ``init``); the old rows are always kept exactly.
HEAD_INITS = {
    "mean": "the mean of the old rows (weights and bias): each new class starts as the average old class",
    "zero": "zero weights and zero bias: every new class gets logit 0 on every image, until training moves it",
    "improbable": "zero weights and bias -10: the new classes start with almost no probability",
}


def expand_head(model: nn.Module, num_new: int, init: str = "mean") -> nn.Module:
    """Grow the head from K to K + ``num_new`` outputs; the K old rows keep their weights and biases exactly.

    ``init`` says how the new rows start (``HEAD_INITS``): "mean" (the mean of the old rows, the default), "zero" (zero
    weights and bias) or "improbable" (zero weights, bias -10). With any of them the old rows, hence the old classes'
    logits, are unchanged. "mean" gives each new class the average old logit, never above the largest, so no
    prediction changes before training, and the new rows start where old ones are rather than far below them;
    "improbable" changes no prediction either but makes every new row climb out of -10 first; "zero" gives logit 0,
    which beats old logits that are all negative. Notebook 05 measures the three.
    """
    if num_new < 1:
        raise ValueError(f"num_new must be at least 1, got {num_new}.")
    if init not in HEAD_INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, HEAD_INITS))}, got {init!r}.")
    old = head_linear(model)
    name = next(name for name, module in model.head.named_modules() if module is old)  # "" when the head is the Linear
    new = nn.Linear(old.in_features, old.out_features + num_new).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        if init == "improbable":
            new.bias.fill_(-10.0)
        elif init == "mean":
            new.weight[old.out_features :] = old.weight.mean(0)
            new.bias[old.out_features :] = old.bias.mean()
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
    new.weight.requires_grad_(old.weight.requires_grad)
    new.bias.requires_grad_(old.bias.requires_grad)
    if name:
        parent, _, attribute = name.rpartition(".")
        setattr(model.head.get_submodule(parent), attribute, new)
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


