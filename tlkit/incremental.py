"""Continuing a trained model on new data: class subsets, replay, head expansion, distillation (LwF), and notebook 05's
split of one dataset by time of arrival."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from .checkpoints import model_from_checkpoint
from .compare import Comparison, paired_difference
from .data import DatasetSplits, LabeledImages, make_loader
from .models import TransferModel, block_names, head_linear, set_trainable
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




# --- notebook 05: one dataset split by time of arrival, and what each first model scores --------------------


@dataclass(frozen=True)
class Arrivals:
    """One dataset's images split by when they arrive, as notebook 05 pretends.

    Stage 1 trains on the first ``old_classes`` classes (``samples_per_class`` images each); in stage 2 up to
    ``new_samples_per_class`` more images arrive for the first ``new_sample_classes`` of them; in stage 3 the other
    classes arrive (``samples_per_class`` images each). ``replay_per_class`` old images per class are mixed into
    the replay training sets. Validation and test images are the same for every seed; each seed draws its own
    training images. Use ``split_by_arrival`` to build one: it checks that the split can be made.
    """

    splits: DatasetSplits
    old_classes: int
    samples_per_class: int
    new_sample_classes: int
    new_samples_per_class: int
    replay_per_class: int

    @property
    def old_names(self) -> list[str]:
        return self.splits.classes[: self.old_classes]

    @property
    def new_names(self) -> list[str]:
        return self.splits.classes[self.old_classes :]

    @property
    def all_names(self) -> list[str]:
        return self.old_names + self.new_names

    @property
    def old_ids(self) -> range:
        return range(len(self.old_names))

    @property
    def new_ids(self) -> range:
        return range(len(self.old_names), len(self.all_names))

    @cached_property
    def val_old(self) -> LabeledImages:
        """The old classes' validation images, labelled in the old class list (what the first model knows)."""
        return self.splits.val.select_classes(self.old_names)

    @cached_property
    def test_old(self) -> LabeledImages:
        return self.splits.test.select_classes(self.old_names)

    @cached_property
    def val_all(self) -> LabeledImages:
        return self.splits.val.with_classes(self.all_names)

    @cached_property
    def test_all(self) -> LabeledImages:
        return self.splits.test.with_classes(self.all_names)

    def first(self, seed: int) -> LabeledImages:
        """Stage 1's training images: ``samples_per_class`` of each old class."""
        return self.splits.train.select_classes(self.old_names).limit_per_class(self.samples_per_class, seed)

    def more(self, seed: int) -> LabeledImages:
        """Stage 2's new images of the first ``new_sample_classes`` old classes (none of them in ``first``)."""
        unused = self.splits.train.without(self.first(seed)).select_classes(self.old_names[: self.new_sample_classes])
        return unused.with_classes(self.old_names).limit_per_class(self.new_samples_per_class, seed)

    def new(self, seed: int) -> LabeledImages:
        """Stage 3's images of the new classes, labelled in the full class list."""
        return self.splits.train.select_classes(self.new_names).limit_per_class(self.samples_per_class, seed).with_classes(self.all_names)

    def stage2_sets(self, seed: int) -> dict[str, Dataset]:
        """Stage 2's training sets: the new images alone, and with ``replay_per_class`` old images per class."""
        more = self.more(seed)
        return {"new data only": more, "new data + replay": with_replay(more, self.first(seed), self.replay_per_class, seed)}

    def stage3_sets(self, seed: int) -> dict[str, Dataset]:
        """Stage 3's training sets: the new classes alone, with replay of old images, and with every old image (joint)."""
        new, old = self.new(seed), self.first(seed).with_classes(self.all_names)
        return {"new classes": new, "replay": with_replay(new, old, self.replay_per_class, seed), "joint": ConcatDataset([new, old])}


def split_by_arrival(splits: DatasetSplits, *, old_classes: int, samples_per_class: int, new_sample_classes: int,
                     new_samples_per_class: int, replay_per_class: int) -> Arrivals:
    """``splits`` as notebook 05's three arrivals (``Arrivals``), once it is checked that they can be made."""
    if old_classes >= len(splits.classes):
        raise ValueError(f"old_classes={old_classes} leaves no new classes: {splits.name!r} has {len(splits.classes)} classes. "
                         f"Set old_classes below {len(splits.classes)}.")
    if new_sample_classes > old_classes:
        raise ValueError(f"new_sample_classes ({new_sample_classes}) must be at most old_classes ({old_classes}): "
                         f"new samples arrive for some of the known classes.")
    if splits.test is None:
        raise ValueError(f"{splits.name!r} has no test split; notebook 05 scores its methods once on one. Load it with "
                         f"load_dataset(..., test_fraction=0.2), which carves one out (Lesson.splits does), or add a test/ folder.")
    return Arrivals(splits, old_classes, samples_per_class, new_sample_classes, new_samples_per_class, replay_per_class)


def checkpoint_accuracy(checkpoint: str | Path, dataset: Dataset, groups: dict[str, Sequence[int]], *, trainable: Sequence[str],
                        transform, batch_size: int = 32, device: torch.device | str = "cpu",
                        cache_dir: str | Path | None = None) -> dict[str, float]:
    """Accuracy per class group of the model saved in ``checkpoint`` on ``dataset``, predicting among the classes it
    was saved with. ``trainable`` marks the blocks above the frozen prefix (nothing trains), so with ``cache_dir`` the
    frozen blocks' activations come from the prefix cache the model was trained through."""
    model, _ = model_from_checkpoint(checkpoint)
    set_trainable(model, block_names(model), False)
    set_trainable(model, trainable, True)
    return group_accuracy(model, make_loader(dataset, transform, batch_size, shuffle=False), groups, device, cache_dir=cache_dir)


def write_image_folder(dataset: LabeledImages, folder: str | Path, per_class: int, seed: int) -> dict[str, str]:
    """``per_class`` images of each class of ``dataset`` as JPEG files ``photo_NN.jpg`` in ``folder`` (names that do
    not give the class away), replacing the ``photo_*.jpg`` files already there; returns file name -> true class."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("photo_*.jpg"):
        stale.unlink()
    picked, truth = dataset.limit_per_class(per_class, seed), {}
    for k in range(len(picked)):
        image, label = picked[k]
        name = f"photo_{k:02d}.jpg"
        image.save(folder / name, quality=92)
        truth[name] = dataset.classes[label]
    return truth


def steps_sentence(comparison: Comparison, cap: int, *, arms: Sequence[str] | None = None, cap_for: Mapping[str, int] | None = None,
                   metric: str = "steps_run") -> str:
    """The budget as it was spent: the cap of optimizer steps per run (``cap``, or ``cap_for[arm]``), the steps each
    arm's runs took (``metric``, mean and range over seeds) and how many runs early stopping ended before their cap."""
    chosen, caps = list(arms or comparison.arms), dict(cap_for or {})
    steps = {arm: [float(row[metric]) for row in comparison.rows if row["arm"] == arm and metric in row] for arm in chosen}
    missing = [arm for arm, values in steps.items() if not values]
    if missing:
        raise KeyError(f"No {metric!r} in the runs of {missing}; pass arms=... with the arms that trained (e.g. Continuation's arms).")
    taken = ", ".join(f"{arm} {sum(v) / len(v):.0f} ({min(v):.0f} to {max(v):.0f})" for arm, v in steps.items())
    stopped = sum(value < caps.get(arm, cap) for arm, values in steps.items() for value in values)
    others = "".join(f", {caps[arm]} for {arm}" for arm in chosen if arm in caps)
    return (f"Cap: {cap} optimizer steps per run{others}. Steps run, mean (min to max) over seeds: {taken}. "
            f"Early stopping ended {stopped} of {sum(map(len, steps.values()))} runs before their cap.")


# --- notebook 05: the classifier's bias toward the new classes, and three fixes ------------------------------


def prior_corrected(model: nn.Module, counts: Sequence[int]) -> nn.Module:
    """A copy of ``model`` that predicts each class's probability divided by its training prior (``counts``, one per
    output): notebook 04's post-hoc correction (``tlkit.imbalance.adjust_probabilities`` with tau 1), written into the
    head's bias as ``bias - log prior``, so the copy saves, reloads and predicts like any model."""
    fixed = copy.deepcopy(model)
    linear = head_linear(fixed)
    if len(counts) != linear.out_features:
        raise ValueError(f"counts has {len(counts)} entries but the head has {linear.out_features} outputs: give one training count per class.")
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if not bool((counts > 0).all()):
        raise ValueError(f"Every class needs at least one training image for its prior; the counts are {counts.long().tolist()}.")
    with torch.no_grad():
        linear.bias -= torch.log(counts / counts.sum()).to(linear.bias)  # log prior, as tlkit.imbalance.logit_offsets
    return fixed


def weight_aligned(model: nn.Module, num_old: int) -> nn.Module:
    """A copy of ``model`` whose new classes' head rows (all but the first ``num_old``) are scaled by one factor so that
    their mean L2 norm equals the old rows' (weight aligning, Zhao et al. 2020, who found that training on more new
    than old images lengthens the new rows, hence their logits; the factor also lengthens rows that came out shorter).
    The old rows and every bias stay as they are, so the old classes' logits do not change."""
    fixed = copy.deepcopy(model)
    linear = head_linear(fixed)
    if not 0 < num_old < linear.out_features:
        raise ValueError(f"num_old must be between 1 and {linear.out_features - 1} (the head has {linear.out_features} rows), got {num_old}.")
    with torch.no_grad():
        norms = linear.weight.norm(dim=1)
        linear.weight[num_old:] *= norms[:num_old].mean() / norms[num_old:].mean()
    return fixed


def class_counts_of(dataset: Dataset, num_classes: int) -> list[int]:
    """Images per class of a ``LabeledImages`` or a ``ConcatDataset`` of them (e.g. a replay set)."""
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    return torch.bincount(torch.cat([torch.as_tensor(part.targets) for part in parts]), minlength=num_classes).tolist()


@dataclass(frozen=True)
class ClassIncrementalScorer:
    """Notebook 05's stage-3 scores of a model over the old and new classes of ``arrivals``: ``val_acc`` (validation,
    every class), ``test_acc/<group>`` for the old, new and all classes (argmax over every class, the 10-way score)
    and ``old acc task-aware`` (the old classes' test images, argmax over the old classes only: the question the
    first model answered). Models whose lower blocks are frozen are scored from the prefix cache in ``cache_dir``."""

    arrivals: Arrivals
    transform: object
    batch_size: int = 32
    device: torch.device | str = "cpu"
    cache_dir: str | Path | None = None

    def _probs(self, model: nn.Module, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        loader = make_loader(dataset, self.transform, self.batch_size, shuffle=False)
        cached = prefix_activations(model, loader, self.device, cache_dir=self.cache_dir) if isinstance(model, TransferModel) else None
        return predict(*(cached or (model, loader)), self.device)

    def _task_aware(self, probs: torch.Tensor, labels: torch.Tensor) -> float:
        old = torch.isin(labels, torch.tensor(list(self.arrivals.old_ids)))
        return (probs[old][:, self.arrivals.old_ids].argmax(1) == labels[old]).float().mean().item()

    def task_aware(self, model: nn.Module) -> float:
        """Old-class test accuracy with the prediction restricted to the old classes."""
        return self._task_aware(*self._probs(model, self.arrivals.test_all))

    def scores(self, model: nn.Module) -> dict[str, float]:
        a = self.arrivals
        val_probs, val_labels = self._probs(model, a.val_all)
        test_probs, test_labels = self._probs(model, a.test_all)
        groups = {"old classes": a.old_ids, "new classes": a.new_ids, "all classes": range(len(a.all_names))}
        tests = _accuracy_by_group(test_probs.argmax(1) == test_labels, test_labels, groups)
        return {"val_acc": (val_probs.argmax(1) == val_labels).float().mean().item(), **{f"test_acc/{g}": v for g, v in tests.items()},
                "old acc task-aware": self._task_aware(test_probs, test_labels)}

    def scored(self, run, model: nn.Module | None = None):
        """``run`` (a ``RunResult``) with these scores added, of its own model or of ``model`` put in its place (e.g. its
        head corrected after training); the rest (history, steps run) is the run's, as a correction trains nothing."""
        model = run.model if model is None else model
        return dataclasses.replace(run, model=model, metrics={**run.metrics, **self.scores(model)})


# --- notebook 05: stability against plasticity (optimizer state and learning rate) --------------------------


def grown_optimizer_state(saved: Mapping, params: Sequence[torch.Tensor]) -> dict:
    """The optimizer state dict ``saved`` (AdamW's, one parameter group) fitted to ``params`` after the head grew:
    a moment tensor with fewer rows than its parameter (the head's weight and bias) gets zero rows for the new classes,
    so the old rows resume their moments and step count and the new rows start with empty ones."""
    state = copy.deepcopy(dict(saved))
    ids = state["param_groups"][0]["params"]
    if len(ids) != len(params):
        raise ValueError(f"The saved optimizer state holds {len(ids)} parameters but {len(params)} are trainable: "
                         f"resume it with the blocks that were trainable when it was saved.")
    for index, param in zip(ids, params):
        for key, value in state["state"].get(index, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                if value.shape[1:] != param.shape[1:] or value.shape[0] > param.shape[0]:
                    raise ValueError(f"Saved {key!r} of shape {tuple(value.shape)} does not fit a parameter of shape {tuple(param.shape)}.")
                rows = value.new_zeros((param.shape[0] - value.shape[0], *value.shape[1:]))
                state["state"][index][key] = torch.cat([value, rows])
    return state


def early_stopped_epoch(val_acc: Sequence[float], patience: int) -> tuple[int, int]:
    """(epochs early stopping would have run, 0-based index of the epoch ``RestoreBest`` keeps) for a run whose
    per-epoch validation accuracy is ``val_acc``: stop after ``patience`` epochs without a strictly higher one, keep
    the first best. Early stopping changes no step before it stops, so one run at the full budget gives both."""
    best, kept = float("-inf"), 0
    for epoch, value in enumerate(val_acc):
        if value > best:
            best, kept = value, epoch
        elif epoch - kept >= patience:
            return epoch + 1, kept
    return len(val_acc), kept


# The settings the trade-off measures: the optimizer resumed from the checkpoint or fresh, times the stage-1 LR.
TRADEOFF_FACTORS = (1.0, 0.3, 0.1)


def tradeoff_arm(resumed: bool, factor: float) -> str:
    """The arm name of one trade-off setting, e.g. "resumed, lr x0.3"."""
    return f"{'resumed' if resumed else 'fresh'}, lr x{factor:g}"


def tradeoff_metrics(run, groups: tuple[str, str], patience: int, steps_per_epoch: int) -> dict[str, float]:
    """One full-budget run (``RunResult`` with per-epoch ``tracked`` group accuracies) read twice: at its last epoch
    ("... fixed steps") and at the epoch early stopping on validation accuracy would have kept ("... early stopping")."""
    old, new = groups
    epochs, kept = early_stopped_epoch(run.history.val_acc, patience)
    return {"val_acc": run.history.val_acc[kept],
            "old acc (fixed steps)": run.tracked[old][-1], "new acc (fixed steps)": run.tracked[new][-1],
            "old acc (early stopping)": run.tracked[old][kept], "new acc (early stopping)": run.tracked[new][kept],
            "steps (early stopping)": float(epochs * steps_per_epoch), "kept epoch (early stopping)": float(kept + 1)}


def tradeoff_results(comparison: Comparison, stage: str = "", factors: Sequence[float] = TRADEOFF_FACTORS) -> dict[str, float]:
    """Results keys ``old_acc_<stage><fresh|resumed>_lr<factor>`` and ``new_acc_...`` (early stopping) and the same with
    ``_fixed`` (the fixed step budget), each with ``_std``: means and stds over seeds."""
    summary, out = comparison.summary(), {}
    for resumed in (False, True):
        for factor in factors:
            arm = tradeoff_arm(resumed, factor)
            for group in ("old", "new"):
                for budget, suffix in (("early stopping", ""), ("fixed steps", "_fixed")):
                    key = f"{group}_acc_{stage}{'resumed' if resumed else 'fresh'}_lr{factor:g}{suffix}"
                    out[key] = float(summary.loc[arm, f"{group} acc ({budget})"])
                    out[f"{key}_std"] = float(summary.loc[arm, f"{group} acc ({budget}) std"])
    return out


def tradeoff_sentences(comparison: Comparison, factors: Sequence[float] = TRADEOFF_FACTORS) -> list[str]:
    """What each knob buys, paired over seeds, on the old and on the new classes: at each budget, resumed minus fresh
    at the middle LR and the lowest LR minus the highest with the resumed optimizer; then, for the resumed optimizer at
    the middle LR, early stopping minus the fixed step budget (the same runs, read at two epochs)."""
    middle, low, high = sorted(factors)[len(factors) // 2], min(factors), max(factors)
    pairs = [(tradeoff_arm(True, middle), tradeoff_arm(False, middle)), (tradeoff_arm(True, low), tradeoff_arm(True, high))]
    sentences = [paired_difference(comparison.rows, "arm", a, b, f"{group} acc ({budget})").sentence()
                 for budget in ("fixed steps", "early stopping") for a, b in pairs for group in ("old", "new")]
    arm = tradeoff_arm(True, middle)
    budgets = [{"arm": f"{arm}, {budget}", "seed": row["seed"], **{f"{g} acc": row[f"{g} acc ({budget})"] for g in ("old", "new")}}
               for row in comparison.rows if row["arm"] == arm for budget in ("early stopping", "fixed steps")]
    return sentences + [paired_difference(budgets, "arm", f"{arm}, early stopping", f"{arm}, fixed steps", f"{g} acc").sentence() for g in ("old", "new")]
