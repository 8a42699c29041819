"""Whole training runs in one call, for comparisons and batch runs: one configuration type, one result type.

Every recipe takes a ``RunConfig`` first (backbone, weights, image size, batch size, epochs, LR, seed, device,
progress bars, cache folder), then its data, then its own keywords, and returns a ``RunResult``:

- ``linear_probe``, ``train_all``, the baselines ``nearest_class_mean``, ``k_nearest_neighbours``, ``raw_pixels`` and
  ``majority_class`` (notebook 01),
  ``run_strategy`` (02), ``fine_tune_augmented`` (03),
  ``fit_head_with_remedy`` (04), ``continue_training`` (05);
- ``evaluate_on`` scores a trained model on one more split (e.g. test) with the same configuration.

A notebook builds its configuration once from its parameters,
``config = tlkit.RunConfig.from_parameters(globals(), device=dev, cache_dir=cache_dir)``, and varies it per run
with ``config.replace(seed=s)``. The building blocks stay in the lesson modules (``finetune``, ``augment``,
``imbalance``, ``incremental``); this module imports them, never the other way round.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from .augment import BatchTransform, InMemoryImages, augment_on_device, augmented_loader, batch_mix, device_loader, feature_cache_allowed
from .checkpoints import model_from_checkpoint
from .data import DatasetSplits, make_loader, repeated_passes_sampler
from .features import NearestNeighbours, cached_features, nearest_mean_head, pixel_model
from .finetune import (
    BN_MODES,
    SCHEDULES,
    GradualUnfreezing,
    apply_strategy,
    fastai_fine_tune,
    fine_tune,
    freeze_batchnorm,
    recompute_batchnorm,
)
from .imbalance import adjust_probabilities, label_counts, long_tail_scores, make_remedy, posthoc_run
from .incremental import (
    TRADEOFF_FACTORS,
    AccuracyTracker,
    ClassIncrementalScorer,
    DistillationLoss,
    expand_head,
    group_accuracy,
    grown_optimizer_state,
    tradeoff_arm,
    tradeoff_metrics,
)
from .models import (
    TransferModel,
    below_head_frozen,
    block_names,
    blocks_below_head,
    check_image_size,
    create_model,
    freeze,
    head_linear,
    parameter_counts,
    set_trainable,
    unfreeze,
)
from .optim import decay_towards_start, make_optimizer, one_cycle
from .params import check_int, check_weight_decay, run_setting_checks
from .prefix_cache import PrefixBatches, PrefixCache, PrefixCacheStats, Suffix, evaluate_from_prefix, prefix_cache_allowed
from .train import Callback, EarlyStopping, FitState, History, RestoreBest, SaveCheckpoint, evaluate, fit, fit_head, get_device, predict, set_seed
from .transforms import IMAGENET_NORM, check_preset, eval_transform, is_deterministic, train_transform

# --- configuration ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """The settings every recipe shares; each recipe's own options are keywords of that recipe.

    ``weights=None`` trains from random init. ``device="auto"`` becomes CUDA when present, else the CPU.
    ``cache_dir`` keeps cached features and prefix activations on disk (None: in memory only). Values are
    checked when the configuration is made: a bad one raises ValueError naming the field.
    """

    backbone: str = "efficientnet_lite0"
    weights: str | None = "imagenet"
    image_size: int = 128
    batch_size: int = 32
    epochs: int = 8
    lr: float = 3e-3
    seed: int = 0
    device: torch.device | str = "cpu"
    progress: bool = False
    cache_dir: str | Path | None = None

    def __post_init__(self) -> None:
        checks: dict[str, Callable[[str, Any], Any]] = {
            **run_setting_checks(),  # the same checks as the notebooks' parameters
            "image_size": lambda _, value: check_image_size(self.backbone, value),  # also against the backbone
            "device": _check_device,
            "cache_dir": _check_cache_dir,
        }
        for name, check in checks.items():
            try:
                value = check(name, getattr(self, name))
            except ValueError as err:
                raise ValueError(f"RunConfig: {err} Fix it where the configuration is made, e.g. config.replace({name}=...).") from None
            object.__setattr__(self, name, value)  # the cleaned value ('5' -> 5, 'auto' -> a device)

    @classmethod
    def from_parameters(cls, values: Mapping[str, Any], **overrides: Any) -> RunConfig:
        """The configuration from a notebook's parameters, e.g. ``RunConfig.from_parameters(globals(), device=dev)``.

        Takes the entries of ``values`` named like a field and ignores every other name (a notebook's globals
        hold much more); a field missing from ``values`` keeps its default. ``overrides`` win over ``values``.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"RunConfig has no field {', '.join(map(repr, unknown))}; its fields are {', '.join(names)}.")
        picked = {name: values[name] for name in names if name in values}
        return cls(**{**picked, **overrides})

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` (``dataclasses.replace``), e.g. ``config.replace(seed=1)``; checked again."""
        return dataclasses.replace(self, **changes)


def _check_device(name: str, value: Any) -> torch.device | str:
    if isinstance(value, torch.device):
        return value
    if value == "auto":
        return get_device("auto")
    try:
        torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name} must be a device such as 'cpu', 'cuda', 'cuda:0' or 'auto' (or a torch.device), got {value!r}.") from err
    return value


def _check_cache_dir(name: str, value: Any) -> str | Path | None:
    if value is None or (isinstance(value, (str, os.PathLike)) and str(value).strip()):
        return value
    raise ValueError(f"{name} must be a folder path or None (no disk cache), got {value!r}.")


# --- result -------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one recipe produced: the trained model, its history, its time and its numbers.

    ``metrics`` always holds ``"val_acc"``, the validation accuracy after the last epoch (not the best epoch:
    that would be picked on val; ``fine_tune_augmented(restore_best=True)`` keeps the best epoch's weights, and then
    gives that epoch's validation accuracy and its number, ``"best_epoch"``), and the recipe's own numbers:

    - ``fit_head_with_remedy``: ``"optimizer_steps"``, the head's optimizer steps; with ``test_features`` also
      ``"test_acc"``, the accuracy of the test predictions after the remedy's post-hoc step;
    - ``continue_training`` with ``test_set``: ``"test_acc/<group>"`` for every class group, the test accuracy on the
      images of that group's classes after training (``by_group("test_acc")`` gives them back keyed by group); with
      ``restore_best``, ``"val_acc"`` is the best epoch's, whose weights the model keeps.

    ``prefix_cache``: what the prefix cache did (None: no cache, or it did not apply). ``tracked``: validation
    accuracy per class group after every epoch (``continue_training``). ``predictions``: split -> (probabilities,
    labels) (``fit_head_with_remedy``: "val", and "test" with test features; after the remedy's post-hoc step).
    """

    name: str
    model: nn.Module
    history: History
    seconds: float
    trainable_params: int
    metrics: dict[str, float] = field(default_factory=dict)
    prefix_cache: PrefixCacheStats | None = None
    tracked: dict[str, list[float]] = field(default_factory=dict)
    predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "val_acc" not in self.metrics:
            last = self.history.val_acc[-1] if self.history.val_acc else math.nan
            self.metrics = {"val_acc": last, **self.metrics}

    @property
    def val_acc(self) -> float:
        """Validation accuracy after the last epoch (not the best epoch: that would be picked on val)."""
        return self.metrics["val_acc"]

    def by_group(self, metric: str = "test_acc") -> dict[str, float]:
        """The ``"<metric>/<group>"`` entries of ``metrics`` keyed by group, e.g. ``{"old": 0.9, "new": 0.7}``."""
        prefix = f"{metric}/"
        return {key[len(prefix):]: value for key, value in self.metrics.items() if key.startswith(prefix)}

    def _val_predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "val" not in self.predictions:
            raise AttributeError(f"Run {self.name!r} kept no validation predictions (fit_head_with_remedy keeps them).")
        return self.predictions["val"]

    @property
    def probs(self) -> torch.Tensor:
        """Predicted probabilities of every validation item (``predictions["val"]``)."""
        return self._val_predictions()[0]

    @property
    def labels(self) -> torch.Tensor:
        """True labels of the validation items, in the order of ``probs``."""
        return self._val_predictions()[1]

    @property
    def predicted(self) -> torch.Tensor:
        """The predicted class of every validation item."""
        return self.probs.argmax(1)

    def row(self) -> dict[str, float | int | str]:
        """One table row: name, trainable parameters, seconds, final val accuracy."""
        return {
            "run": self.name,
            "trainable params": self.trainable_params,
            "train seconds": round(self.seconds, 1),
            "val acc": round(self.val_acc, 4),
        }


def _trainable(model: nn.Module) -> int:
    return parameter_counts(model)["total"]["trainable"]


# --- the runner every recipe on images shares ---------------------------------------------------------


@dataclass
class _Data:
    """What a recipe trains on: the module ``fit`` steps (the model, or the prefix cache's suffix, which shares the
    model's parameters), one loader per split ("train", "val", ...), and the prefix cache (None: the images)."""

    stepper: nn.Module
    loaders: dict[str, torch.utils.data.DataLoader]
    cache: PrefixCache | None = None


def _image_data(model: TransferModel, sets: Mapping[str, Dataset], config: RunConfig, *, transform: Callable,
                train_loader: Callable[[Dataset, Callable | None], torch.utils.data.DataLoader], train_transform: Callable | None = None,
                prefix_cache: bool = False, max_bytes: float | None = None, report: bool = False, progress: bool | None = None) -> _Data:
    """The loaders of ``sets`` ("train" first): "train" from ``train_loader(dataset, transform)`` (its order and
    sampling; ``train_transform``, default ``transform``), every other split in order with ``transform``. With
    ``prefix_cache``, over the activations below the first trainable block (``PrefixCache``: on disk in
    ``config.cache_dir``, refused over ``max_bytes``; ``report`` prints its size) with the same batches."""
    train_transform = transform if train_transform is None else train_transform
    if not prefix_cache:
        loaders = {name: make_loader(dataset, transform, config.batch_size, shuffle=False) for name, dataset in sets.items() if name != "train"}
        return _Data(model, {"train": train_loader(sets["train"], train_transform), **loaders})
    ordered = {name: make_loader(dataset, train_transform if name == "train" else transform, config.batch_size, shuffle=False)
               for name, dataset in sets.items()}
    cache = PrefixCache(model, ordered, config.device, cache_dir=config.cache_dir, max_bytes=max_bytes,
                        progress=config.progress if progress is None else progress, report=report)
    loaders = {name: cache.loader(name, config.batch_size, shuffle=False) for name in ordered}
    return _Data(cache.suffix, {**loaders, "train": train_loader(cache.items["train"], None)}, cache)


def _shuffled(config: RunConfig) -> Callable[[Dataset, Callable | None], torch.utils.data.DataLoader]:
    """The usual training loader: one seeded shuffled pass per epoch."""
    return lambda dataset, transform: make_loader(dataset, transform, config.batch_size, shuffle=True, seed=config.seed)


def _fit_on(data: _Data, config: RunConfig, **fit_kwargs: Any) -> History:
    """``fit`` on ``data``'s stepper and loaders for ``config.epochs``, on ``config.device``."""
    return fit(data.stepper, data.loaders["train"], data.loaders["val"], epochs=config.epochs, device=config.device,
               progress=config.progress, **fit_kwargs)


def _result(label: str, model: nn.Module, history: History, start: float, data: _Data | None = None, **fields: Any) -> RunResult:
    """The ``RunResult`` of a run that started at ``start`` (``time.perf_counter()``), with what its prefix cache did."""
    cache = None if data is None else data.cache
    return RunResult(label, model, history, time.perf_counter() - start, _trainable(model),
                     prefix_cache=None if cache is None else cache.stats, **fields)


# --- notebook 01: frozen backbone ---------------------------------------------------------------------


def _split_features(config: RunConfig, model: TransferModel, splits: DatasetSplits, *,
                    val_batch_size: int | None = None) -> tuple[TensorDataset, TensorDataset]:
    """``model``'s frozen backbone run once over the training and validation splits (eval transform): their features.

    ``config.cache_dir``: kept on disk there (``tlkit.cached_features``), so runs that share a backbone and images
    (e.g. the same validation split over several seeds) compute them once.
    """
    transform = eval_transform(config.image_size, model.normalization)
    features = functools.partial(cached_features, device=config.device, cache_dir=config.cache_dir, progress=config.progress)
    train = features(model, make_loader(splits.train, transform, config.batch_size, shuffle=False))
    val = features(model, make_loader(splits.val, transform, val_batch_size or config.batch_size, shuffle=False))
    model.to(config.device)  # the backbone stays where extraction put it: keep model and head together
    return train, val


def _fit_head(config: RunConfig, model: nn.Module, train: TensorDataset, val: TensorDataset, **fit_kwargs: Any) -> History:
    """``tlkit.fit_head`` (the one way to train a head on cached features) with ``config``'s epochs, batch size, seed,
    LR, device and progress."""
    return fit_head(model, train, val, epochs=config.epochs, batch_size=config.batch_size, seed=config.seed, lr=config.lr,
                    device=config.device, progress=config.progress, **fit_kwargs)


def linear_probe(
    config: RunConfig,
    splits: DatasetSplits,
    *,
    name: str = "",
    callbacks: Sequence[Callback | Callable[[FitState], None]] = (),
) -> RunResult:
    """Freeze the whole backbone, cache its features once (on disk too with ``config.cache_dir``), train a new linear head on them."""
    set_seed(config.seed)
    model = freeze(create_model(config.backbone, len(splits.classes), config.weights))
    start = time.perf_counter()
    history = _fit_head(config, model, *_split_features(config, model, splits), callbacks=callbacks)
    return _result(name or f"{config.weights or 'random'} frozen + head", model, history, start)


def _pretrained_features(config: RunConfig, splits: DatasetSplits) -> tuple[TransferModel, TensorDataset, TensorDataset]:
    set_seed(config.seed)
    model = freeze(create_model(config.backbone, len(splits.classes), config.weights))
    return model, *_split_features(config, model, splits)


def _baseline_result(name: str, model: TransferModel, val: TensorDataset, config: RunConfig, start: float) -> RunResult:
    scores = evaluate(model.head, make_loader(val, None, config.batch_size, shuffle=False), config.device)
    return RunResult(name, model, History(), time.perf_counter() - start, 0, {"val_acc": scores["acc"]})


def nearest_class_mean(config: RunConfig, splits: DatasetSplits, *, name: str = "nearest class mean") -> RunResult:
    """No training: each image goes to the class whose mean training feature vector is nearest (Euclidean).

    That rule is a linear head, ``2 mu_c . x - |mu_c|^2`` per class ``c``, so the result is a model like any other
    (``evaluate_on`` scores it on test). A baseline that shows how much the features alone separate the classes.
    """
    start = time.perf_counter()
    model, train, val = _pretrained_features(config, splits)
    model.head = nearest_mean_head(*train.tensors, len(splits.classes)).to(config.device)
    return _baseline_result(name, model, val, config, start)


def k_nearest_neighbours(config: RunConfig, splits: DatasetSplits, *, k: int = 5, name: str = "k nearest neighbours") -> RunResult:
    """No training: each image gets the class most common among its ``k`` nearest training photos in the pretrained
    feature space (cosine similarity; ``features.NearestNeighbours``). A head like any other (``evaluate_on`` works)."""
    k = check_int("k", k, minimum=1)
    start = time.perf_counter()
    model, train, val = _pretrained_features(config, splits)
    model.head = NearestNeighbours(*train.tensors, len(splits.classes), k).to(config.device)
    return _baseline_result(name, model, val, config, start)


def raw_pixels(config: RunConfig, splits: DatasetSplits, *, size: int = 32, name: str = "raw pixels + head") -> RunResult:
    """``linear_probe`` with no backbone: a linear head on each photo average-pooled to ``size`` x ``size`` pixels
    (``features.pixel_model``), trained with ``config``'s epochs, LR and seed. What the pixels alone give a linear classifier."""
    set_seed(config.seed)
    model = pixel_model(len(splits.classes), IMAGENET_NORM, size=check_int("size", size, minimum=1))
    start = time.perf_counter()
    history = _fit_head(config, model, *_split_features(config, model, splits))
    return _result(name, model, history, start)


def majority_class(config: RunConfig, splits: DatasetSplits, *, name: str = "majority class") -> RunResult:
    """No training and no image: always answer the class most common in the validation split, the best any model that
    ignores the image can score there (a floor to clear). That class is a choice made on validation, so scoring the
    same answer on test (``evaluate_on``) is fair. (The training split's commonest class would be arbitrary when
    ``samples_per_class`` makes it balanced.)"""
    start = time.perf_counter()
    model, _, val = _pretrained_features(config, splits)
    majority = torch.bincount(val.tensors[1], minlength=len(splits.classes)).argmax()
    with torch.no_grad():
        linear = head_linear(model)
        linear.weight.zero_()
        linear.bias.copy_(nn.functional.one_hot(majority, len(splits.classes)).float())
    return _baseline_result(name, model, val, config, start)


def train_all(
    config: RunConfig,
    splits: DatasetSplits,
    *,
    name: str = "",
    callbacks: Sequence[Callback | Callable[[FitState], None]] = (),
) -> RunResult:
    """Train every block of ``config.backbone`` (from ``config.weights``, or from random init when None) with a new head."""
    set_seed(config.seed)
    model = unfreeze(create_model(config.backbone, len(splits.classes), config.weights))
    data = _image_data(model, {"train": splits.train, "val": splits.val}, config, transform=eval_transform(config.image_size, model.normalization),
                       train_loader=_shuffled(config))
    start = time.perf_counter()
    history = _fit_on(data, config, lr=config.lr, callbacks=callbacks)
    return _result(name or f"{config.weights or 'random'} init, all blocks train", model, history, start)


def evaluate_on(model: TransferModel, dataset: Dataset, config: RunConfig, *, batch_size: int | None = None) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``dataset`` with the eval transform (e.g. the test split, once at the end).

    Uses ``config.image_size``, ``config.device``, ``config.cache_dir`` and ``batch_size`` (None: ``config.batch_size``).
    A model whose blocks below the head are all frozen is evaluated on its backbone's features; one whose lower
    blocks are frozen, on the activations below its first trainable block (``evaluate_from_prefix``). Both are read
    from ``config.cache_dir`` when the same frozen blocks saw the same images before (e.g. the pretrained backbone of
    every seed), so scoring many runs on one test split runs the frozen blocks over it once.
    """
    batch_size = config.batch_size if batch_size is None else check_int("batch_size", batch_size, minimum=1)
    transform = eval_transform(config.image_size, model.normalization)
    loader = make_loader(dataset, transform, batch_size, shuffle=False)
    if below_head_frozen(model):
        features = cached_features(model, loader, config.device, cache_dir=config.cache_dir, progress=False)
        return evaluate(model.head, make_loader(features, None, batch_size, shuffle=False), config.device)
    return evaluate_from_prefix(model, loader, config.device, cache_dir=config.cache_dir)


# --- notebook 02: partial unfreezing ------------------------------------------------------------------


def run_strategy(
    config: RunConfig,
    splits: DatasetSplits,
    strategy: str,
    *,
    layer_decay: float = 1.0,
    lr_mult: Mapping[str, float] | None = None,
    n_blocks: int = 2,
    n_tensors: int = 10,
    unfreeze: Sequence[str] = (),
    unfreeze_every: int = 1,
    head_epochs: int = 1,
    conv_channels: int = 128,
    bn: str = "default",
    schedule: str | None = None,
    weight_decay: float = 0.0,
    l2_sp: float = 0.0,
    train_transform: Callable | None = None,
    prefix_cache: bool = False,
    max_bytes: float | None = None,
    name: str = "",
    callbacks: Sequence[Callback | Callable[[FitState], None]] = (),
) -> RunResult:
    """Train a new model with one strategy on images, ``config.epochs`` epochs in all, same seed and data for every strategy.

    The head trains at ``config.lr``, the block k places below it at ``config.lr * layer_decay ** k`` (``lr_mult``
    overrides). ``schedule`` (see ``SCHEDULES``): None keeps these LRs constant; "one_cycle" runs fastai's one-cycle
    over all ``config.epochs * len(train_loader)`` optimizer steps (``tlkit.optim.OneCycle``: warm-up over the first
    25%, cosine down to ~0), and a block that joins mid-run (gradual, two_phase) warms up from 0 on its own.
    ``fastai_fine_tune`` is a schedule modelled on fastai's ``Learner.fine_tune``, not fastai's recipe, with its own rates
    (``tlkit.finetune.fastai_fine_tune``: ``head_epochs`` with the head alone, then every block with LRs from
    ``config.lr / 200`` to ``config.lr / 2``);
    ``layer_decay``, ``lr_mult`` and ``schedule`` do not apply to it.

    Regularisers (0: off): ``weight_decay`` is AdamW's decoupled decay towards 0, every group; ``l2_sp`` pulls the
    pretrained blocks back towards their ImageNet weights (``tlkit.optim.decay_towards_start``; the head is not pulled).
    Both act through the optimizer the run builds, so not for two_phase and fastai_fine_tune.

    ``bn`` (see ``BN_MODES``): "default" keeps BatchNorm of fully frozen blocks in eval mode while
    trainable blocks update theirs; "train" lets frozen blocks' BatchNorm train too; "frozen" fixes
    every BatchNorm of the backbone (statistics and scale/shift, ``freeze_batchnorm``); "recomputed" first
    recomputes the statistics of the trainable blocks' BatchNorm as exact averages over the training images
    (``recompute_batchnorm``: ``momentum=None``, one pass with the eval transform), then fixes them as "frozen" does. Trainable
    parameters are counted at the end (for gradual: the blocks unfrozen by then).
    ``train_transform`` defaults to the eval transform (no augmentation).

    ``prefix_cache=True`` computes the activations below the first trainable block once (``tlkit.PrefixCache``;
    on disk in ``config.cache_dir`` if given, refused over ``max_bytes``) and trains the rest of the network on them:
    the same batches and, up to float noise, the same numbers, faster. It applies where the trainable part sits
    above frozen blocks in eval mode (head, last_n_blocks, blocks, gradual, conv_block, last_tensors);
    full, two_phase, fastai_fine_tune and bn="train" run as without it, and a random ``train_transform`` turns it off with an
    ``AugmentationDisablesCacheWarning``. The result's ``prefix_cache`` then says
    what the cache did (None where it did not apply).
    """
    epochs, lr, batch_size, seed, device = config.epochs, config.lr, config.batch_size, config.seed, config.device
    if strategy in ("two_phase", "fastai_fine_tune") and not 0 < head_epochs < epochs:
        raise ValueError(f"{strategy} needs 0 < head_epochs < epochs, got head_epochs={head_epochs}, epochs={epochs}.")
    if bn not in BN_MODES:
        raise ValueError(f"Unknown bn mode {bn!r}; choose one of {', '.join(BN_MODES)}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; choose one of {', '.join(map(repr, SCHEDULES))}.")
    weight_decay, l2_sp = check_weight_decay("weight_decay", weight_decay), check_weight_decay("l2_sp", l2_sp)
    if (weight_decay or l2_sp) and strategy in ("two_phase", "fastai_fine_tune"):
        raise ValueError(f"weight_decay and l2_sp act on the optimizer run_strategy builds; {strategy} builds its own. "
                         "Use strategy='gradual' or 'last_n_blocks' to regularise, or leave them at 0.")
    set_seed(seed)
    model = create_model(config.backbone, len(splits.classes), config.weights, eval_frozen_blocks=bn != "train")
    apply_strategy(model, strategy, n_blocks=n_blocks, n_tensors=n_tensors, unfreeze=unfreeze, conv_channels=conv_channels)
    if bn == "frozen":
        freeze_batchnorm(model)
    model.to(device)
    transform = eval_transform(config.image_size, model.normalization)
    train_transform = transform if train_transform is None else train_transform
    if bn == "recomputed":  # the trainable blocks' statistics from these training images, then fixed
        recompute_batchnorm(model, make_loader(splits.train, transform, batch_size, shuffle=False), device)
    decay = dict(layer_decay=layer_decay, lr_mult=lr_mult)
    start = time.perf_counter()
    skipped = _prefix_cache_skipped(model, strategy, train_transform) if prefix_cache else None
    data = _image_data(model, {"train": splits.train, "val": splits.val}, config, transform=transform, train_transform=train_transform,
                       train_loader=_shuffled(config), prefix_cache=prefix_cache and skipped is None, max_bytes=max_bytes, report=True)
    train_loader, val_loader = data.loaders["train"], data.loaders["val"]
    scheduler = one_cycle(epochs * len(train_loader)) if schedule == "one_cycle" else None
    if strategy == "fastai_fine_tune":
        history = fastai_fine_tune(model, train_loader, val_loader, freeze_epochs=head_epochs, epochs=epochs - head_epochs,
                                   base_lr=lr, callbacks=callbacks, device=device, progress=config.progress)
    elif strategy == "two_phase":
        history = fine_tune(model, train_loader, val_loader, head_epochs=head_epochs, epochs=epochs - head_epochs, lr=lr,
                            schedule=scheduler, callbacks=callbacks, device=device, progress=config.progress, **decay)
    else:
        optimizer = make_optimizer(model, lr, weight_decay=weight_decay, **decay)
        if l2_sp:
            decay_towards_start(optimizer, l2_sp)
        if strategy == "gradual":
            # unfreeze only blocks that get at least one epoch of training (none after the last epoch)
            order = blocks_below_head(model)[::-1][: (epochs - 1) // unfreeze_every]
            callbacks = [GradualUnfreezing(model, optimizer, lr=lr, every=unfreeze_every, order=order, **decay), *callbacks]
        history = _fit_on(data, config, optimizer=optimizer, scheduler=scheduler, callbacks=callbacks)
    result = _result(name or (strategy if bn == "default" else f"{strategy}, BN {bn}"), model, history, start, data)
    if prefix_cache:
        stats = result.prefix_cache
        print(f"{result.name}: {f'no prefix cache ({skipped})' if stats is None else stats.summary()}; {result.seconds:.1f} s in all.", flush=True)
    return result


def _prefix_cache_skipped(model: TransferModel, strategy: str, train_transform: Callable) -> str | None:
    """Why the prefix cache cannot serve this run, or None when it can (a random transform also warns)."""
    if strategy in ("two_phase", "fastai_fine_tune"):
        return f"{strategy} trains on the model itself, and its second phase trains every block"
    if not is_deterministic(train_transform):
        prefix_cache_allowed(model, train_transform)  # warns, as the feature cache does
        return "the train transform is random"
    if not prefix_cache_allowed(model, train_transform):
        return "nothing below the first trainable block is frozen in eval mode"
    return None


# --- notebook 03: augmentation ------------------------------------------------------------------------


def fine_tune_augmented(
    config: RunConfig,
    splits: DatasetSplits,
    *,
    augment: str = "basic",
    hflip: bool = True,
    mix: str | None = None,
    freeze_up_to: str | None = None,
    bn: str = "default",
    on_device: bool | str = "auto",
    cache_features: bool = False,
    prefix_cache: bool = False,
    restore_best: bool = False,
    name: str = "",
    callbacks: Sequence[Callback | Callable[[FitState], None]] = (),
) -> RunResult:
    """Fine-tune the blocks above ``freeze_up_to`` (default: the backbone's last block and the head) with ``augment``.

    ``bn``: "default" lets the trainable blocks' BatchNorm layers follow the batches (frozen blocks keep ImageNet's
    statistics); "frozen" fixes every BatchNorm of the backbone (``freeze_batchnorm``): with a few images per class
    and several blocks training, the statistics of 32-image batches would replace ImageNet's.

    ``on_device`` ('auto': on a GPU) decodes the images once into uint8 tensors and augments each batch on
    the device. ``cache_features`` trains the head on cached features when that is valid (head only, no
    augmentation; in memory, ``config.cache_dir`` is not used for them) and warns, training uncached, when it is
    not. ``prefix_cache`` runs the frozen blocks once over the validation images (and, without augmentation, over
    the training images: ``PrefixCache``), and over each augmented training batch as it comes (``PrefixBatches``);
    ``config.cache_dir`` keeps those activations on disk. The numbers are those of the run without it, up to float noise.

    ``restore_best`` trains all ``config.epochs`` epochs, then keeps the weights of the epoch with the best validation
    accuracy (``RestoreBest``; the first of equals): each run keeps the epoch where its own curve peaked, chosen on validation,
    within the same budget. The result's ``val_acc`` is then that epoch's (chosen on val, so optimistic: score the
    model on test for the headline) and ``metrics["best_epoch"]`` says which epoch it was.
    """
    image_size, batch_size, seed, device = config.image_size, config.batch_size, config.seed, config.device
    check_preset(augment)
    if bn not in ("default", "frozen"):
        raise ValueError(f"fine_tune_augmented: unknown bn={bn!r}; choose 'default' (trainable blocks' BatchNorm follows the "
                         "batches) or 'frozen' (every BatchNorm keeps ImageNet's statistics and scale).")
    if restore_best:
        callbacks = [*callbacks, RestoreBest()]  # last, so that other callbacks see the weights of every epoch
    set_seed(seed)
    model = create_model(config.backbone, len(splits.classes), config.weights)
    freeze(model, up_to=freeze_up_to or block_names(model)[-3])
    if bn == "frozen":
        freeze_batchnorm(model)
    val_batch = max(batch_size, 128)
    start = time.perf_counter()
    if feature_cache_allowed(model, augment, mix=mix, cache_features=cache_features):
        in_memory = config.replace(cache_dir=None)
        history = _fit_head(config, model, *_split_features(in_memory, model, splits, val_batch_size=val_batch), callbacks=callbacks)
    else:
        loaders = dict(image_size=image_size, batch_size=batch_size, seed=seed, device=device, hflip=hflip, mix=mix, on_device=on_device)
        if prefix_cache:
            stepper, train_loader, val_loader = _through_prefix_cache(
                model, splits, augment, val_batch=val_batch, cache_dir=config.cache_dir, progress=config.progress, **loaders)
        else:
            stepper = model
            train_loader = _augmented_train_loader(splits, model, augment, **loaders)
            val_loader = _val_loader(splits, model, image_size=image_size, val_batch=val_batch, device=device, on_device=on_device)
        history = fit(stepper, train_loader, val_loader, epochs=config.epochs, lr=config.lr, device=device,
                      progress=config.progress, callbacks=callbacks)
    best = {"val_acc": max(history.val_acc), "best_epoch": history.best_epoch()} if restore_best else {}
    return _result(name or f"{augment}{' + ' + mix if mix else ''}", model, history, start, metrics=best)


def _augmented_train_loader(splits: DatasetSplits, model, augment: str, *, image_size: int, batch_size: int, seed: int,
                            device, hflip: bool, mix: str | None, on_device: bool | str):
    """The training loader of ``fine_tune_augmented``: PIL per item, or uint8 batches augmented on the device."""
    norm = model.normalization
    if augment_on_device(on_device, device):
        mixer = batch_mix(mix, len(splits.classes)) if mix is not None else None
        transform = BatchTransform(norm, augment, image_size=image_size, hflip=hflip, mix=mixer)
        return device_loader(InMemoryImages.from_dataset(splits.train, image_size), batch_size, device,
                             transform, shuffle=True, seed=seed)
    return augmented_loader(splits.train, train_transform(image_size, norm, augment, hflip=hflip), batch_size,
                            seed=seed, mix=mix, num_classes=len(splits.classes))


def _val_loader(splits: DatasetSplits, model, *, image_size: int, val_batch: int, device, on_device: bool | str):
    """The validation loader of ``fine_tune_augmented`` without the prefix cache: PIL, or uint8 batches on the device."""
    norm = model.normalization
    if augment_on_device(on_device, device):
        return device_loader(InMemoryImages.from_dataset(splits.val, image_size), val_batch, device,
                             BatchTransform(norm, image_size=image_size), shuffle=False)
    return make_loader(splits.val, eval_transform(image_size, norm), val_batch, shuffle=False)


def _through_prefix_cache(model, splits: DatasetSplits, augment: str, *, image_size: int, batch_size: int, val_batch: int,
                          seed: int, device, hflip: bool, mix: str | None, on_device: bool | str, cache_dir, progress: bool):
    """(suffix, train loader, val loader) that run the frozen blocks once per image set where the images do not change."""
    plain = augment == "none" and mix is None  # no augmentation: the training images' activations are the same every epoch
    transform = eval_transform(image_size, model.normalization)
    fixed = {"val": make_loader(splits.val, transform, val_batch, shuffle=False)}
    if plain:
        fixed["train"] = make_loader(splits.train, transform, batch_size, shuffle=False)
    cache = PrefixCache(model, fixed, device, cache_dir=cache_dir, progress=progress, report=False)
    if plain:
        train = cache.loader("train", batch_size, shuffle=True, seed=seed)
    else:  # built only here, so that a plain run decodes no training images it would not use
        augmented = _augmented_train_loader(splits, model, augment, image_size=image_size, batch_size=batch_size, seed=seed,
                                            device=device, hflip=hflip, mix=mix, on_device=on_device)
        train = PrefixBatches(augmented, cache)
    return cache.suffix, train, cache.loader("val", val_batch, shuffle=False)


def scored_on_tests(comparison, tests: Mapping[str, Dataset], config: RunConfig):
    """``comparison`` (``tlkit.compare_arms`` over recipes that return a ``RunResult``) with more numbers per run: its
    last epoch's training loss (``"train_loss"``) and, for each ``name: dataset`` of ``tests``, the accuracy of its model
    there (``evaluate_on``: each model scored once per test set). The comparison returned is about the first test.

        scored = tlkit.recipes.scored_on_tests(comparison, {"test_acc": splits.test, "test_acc_shifted": shifted}, config)
    """
    if not tests:
        raise ValueError("scored_on_tests needs at least one test set, e.g. {'test_acc': splits.test}.")
    comparison = comparison.with_metric("train_loss", lambda arm, seed, run: run.history.train_loss[-1])
    for name, dataset in reversed(list(tests.items())):  # the first test last: the comparison is about it
        comparison = comparison.with_metric(name, lambda arm, seed, run, dataset=dataset: evaluate_on(run.model, dataset, config)["acc"])
    return comparison


# --- notebook 04: class imbalance ---------------------------------------------------------------------


def _reset_head(head: nn.Module, seed: int) -> None:
    set_seed(seed)
    for module in head.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def fit_head_with_remedy(
    config: RunConfig,
    model: nn.Module,
    train_features: TensorDataset,
    val_features: TensorDataset,
    remedy: str,
    *,
    beta: float = 0.99,
    gamma: float = 2.0,
    tau: float = 1.0,
    equal_steps: bool = True,
    weight_decay: float = 0.0,
    test_features: TensorDataset | None = None,
    name: str = "",
) -> RunResult:
    """Re-initialise ``model.head`` (from ``config.seed``), train it on cached features with ``remedy``, predict on val.

    Every remedy starts from the same head and the same seed, so runs differ only by the remedy. ``config``'s
    epochs, batch size, LR, seed, device and progress apply (backbone, weights and image size are the features').
    Validation features are never resampled or reweighted. The result's ``predictions["val"]`` holds the
    (post-hoc adjusted) validation probabilities and labels (also as ``probs``, ``labels``, ``predicted``). With
    ``test_features``, the trained head (and the remedy's post-hoc step, fitted on the training counts, never on
    test) also predicts the test split: ``predictions["test"]`` and ``metrics["test_acc"]``. ``metrics["val_acc"]`` is
    the last epoch's validation accuracy of the head itself (before any post-hoc step); the validation
    ``tlkit.imbalance.SCORES`` (``"accuracy"``, ``"balanced_acc"``, ...) score the predictions after it, against the
    training counts. ``"train_loss"`` and ``"train_acc"`` are the last epoch's, on the (re-weighted) training loss.
    ``name`` defaults to ``remedy``.

    ``equal_steps`` (default): every remedy takes ``epochs * ceil(len(train_features) / batch_size)`` optimizer
    steps: ``oversample`` draws as many items per epoch as there are, and ``undersample`` passes over its balanced
    subset as many times as that takes (``tlkit.imbalance.make_remedy``). False: ``undersample`` passes over its
    subset once per epoch, so it takes fewer steps. ``metrics["optimizer_steps"]`` holds the steps taken.

    ``weight_decay``: AdamW's decay on the head (notebook 04 section 7: it keeps the training loss away from 0, where
    re-weighting stops mattering); 0, the default, is tlkit's one default optimizer.
    """
    batch_size, seed, device = config.batch_size, config.seed, config.device
    features, labels = train_features.tensors
    chosen = make_remedy(remedy, labels.tolist(), head_linear(model).out_features, seed=seed, beta=beta, gamma=gamma,
                         tau=tau, equal_steps=equal_steps)
    if chosen.train_positions is not None:
        keep = torch.as_tensor(chosen.train_positions)
        train_features = TensorDataset(features[keep], labels[keep])
    if chosen.loss_fn is not None:
        chosen.loss_fn.to(device)  # class weights and offsets live where the logits are
    start = time.perf_counter()
    _reset_head(model.head, seed)
    decay = {"optimizer": make_optimizer(model.head, config.lr, weight_decay=weight_decay)} if weight_decay else {}
    history = _fit_head(config, model, train_features, val_features, sampler=chosen.sampler, loss_fn=chosen.loss_fn, **decay)
    probs, val_labels = predict(model.head, make_loader(val_features, None, batch_size, shuffle=False), device)
    predictions = {"val": (chosen.apply(probs), val_labels)}
    drawn = len(chosen.sampler) if chosen.sampler is not None else len(train_features)  # items per epoch
    metrics = {"val_acc": history.val_acc[-1], "optimizer_steps": float(len(history) * math.ceil(drawn / batch_size)),
               "train_loss": history.train_loss[-1], "train_acc": history.train_acc[-1],
               **long_tail_scores(*predictions["val"], label_counts(labels.tolist(), head_linear(model).out_features))}
    if test_features is not None:
        test_probs, test_labels = predict(model.head, make_loader(test_features, None, batch_size, shuffle=False), device)
        predictions["test"] = (chosen.apply(test_probs), test_labels)
        metrics["test_acc"] = (predictions["test"][0].argmax(1) == test_labels).float().mean().item()
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
    return RunResult(name or remedy, model, history, seconds, trainable, metrics=metrics, predictions=predictions)


def remedy_arm(config: RunConfig, model: nn.Module, train_of_seed: Callable[[int], TensorDataset], val_features: TensorDataset,
               remedy: str, **options: Any) -> Callable[[int], RunResult]:
    """An arm for ``tlkit.compare_arms``: seed -> ``fit_head_with_remedy`` on that seed's training features
    (``train_of_seed(seed)``) with ``config.seed`` set to it. ``options`` go to ``fit_head_with_remedy``."""
    def run(seed: int) -> RunResult:
        return fit_head_with_remedy(config.replace(seed=seed), model, train_of_seed(seed), val_features, remedy, **options)

    return run


def decoupled(config: RunConfig, splits: DatasetSplits, *, blocks: Sequence[str] = ("top",), remedy: str = "oversample") -> tuple[RunResult, RunResult]:
    """Decoupling (Kang et al. 2020, classifier re-training, cRT): fine-tune ``blocks`` with the head plainly on the
    long-tailed ``splits.train`` (``run_strategy``: BatchNorm frozen, prefix cache, ``config``'s epochs and LR), then
    freeze that network and train only a new head on its features with ``remedy`` (default: class-balanced sampling).
    Returns (the fine-tuned model as it is, the re-trained classifier), each with the ``tlkit.imbalance.SCORES`` of its
    validation predictions and ``predictions`` on "val" (and "test" when the splits have one)."""
    tuned = run_strategy(config, splits, "blocks", unfreeze=list(blocks), bn="frozen", prefix_cache=True, name=f"{'+'.join(blocks)} fine-tuned")
    model = freeze(tuned.model)
    transform = eval_transform(config.image_size, model.normalization)
    features = {split: cached_features(model, make_loader(images, transform, config.batch_size, shuffle=False), config.device,
                                       cache_dir=config.cache_dir, progress=False)
                for split, images in {"train": splits.train, "val": splits.val, "test": splits.test}.items() if images is not None}
    counts = label_counts(features["train"].tensors[1].tolist(), len(splits.classes))
    predictions = {split: predict(model.head, make_loader(f, None, config.batch_size, shuffle=False), config.device)
                   for split, f in features.items() if split != "train"}
    finetuned = dataclasses.replace(tuned, predictions=predictions, metrics={**tuned.metrics, **long_tail_scores(*predictions["val"], counts)})
    retrained = fit_head_with_remedy(config, copy.deepcopy(model), features["train"], features["val"], remedy,
                                     test_features=features.get("test"), name=f"cRT ({remedy})")
    return finetuned, retrained


def posthoc_arm(plain_runs: Mapping[int, RunResult], train_counts: Sequence[int], tau: float, *, name: str = "") -> Callable[[int], RunResult]:
    """An arm for ``tlkit.compare_arms``: seed -> ``posthoc_threshold`` of that seed's plain run (``plain_runs[seed]``)."""
    def run(seed: int) -> RunResult:
        if seed not in plain_runs:
            raise KeyError(f"No plain run for seed {seed}: the post-hoc arm adjusts runs of the seeds {sorted(plain_runs)}; "
                           f"train them on the same seeds as the comparison.")
        return posthoc_threshold(plain_runs[seed], train_counts, tau, name=name)

    return run


def posthoc_threshold(run: RunResult, train_counts: Sequence[int], tau: float, *, name: str = "") -> RunResult:
    """``run``'s head, unchanged, with each class's probability divided by ``prior ** tau`` on every split it
    predicted (``tlkit.imbalance.adjust_probabilities``; the prior from ``train_counts``): a remedy with no training.

    The scores (``tlkit.imbalance.SCORES``, ``"test_acc"``) are those of the adjusted predictions; ``"val_acc"`` and the
    training numbers stay the head's. ``name`` defaults to ``"threshold (tau=...)"``.
    """
    return posthoc_run(run, lambda probs: adjust_probabilities(probs, train_counts, tau), train_counts,
                       name=name or f"threshold (tau={tau:g})")


# --- notebook 05: continuing from a checkpoint --------------------------------------------------------


CONTINUE_OPTIMIZERS = {
    "adamw": "AdamW (torch's defaults: betas 0.9, 0.999; weight decay 0.01)",
    "sgd": "SGD with momentum 0.9 (no weight decay)",
}
_CONTINUE_WEIGHT_DECAY = {"adamw": 0.01, "sgd": 0.0}  # as CONTINUE_OPTIMIZERS says (torch's AdamW default, kept for the same numbers)


def continue_training(
    config: RunConfig,
    checkpoint: str | Path,
    train_set: Dataset,
    val_set: Dataset,
    groups: dict[str, Sequence[int]],
    *,
    classes: Sequence[str],
    trainable: Sequence[str],
    transform: Callable,
    distill: bool = False,
    resume_optimizer: bool = False,
    optimizer: str = "adamw",
    steps_per_epoch: int | None = None,
    early_stopping_patience: int | None = 2,
    monitor: str = "val_loss",
    restore_best: bool = False,
    head_init: str = "mean",
    head_dropout: float = 0.0,
    test_set: Dataset | None = None,
    prefix_cache: bool = False,
    name: str = "",
) -> RunResult:
    """Load ``checkpoint`` in a fresh state, grow its head to ``classes`` if needed, train ``trainable`` blocks on ``train_set``.

    ``config``'s epochs, LR, batch size, seed, device, progress and cache folder apply; the checkpoint gives the
    backbone and weights, ``transform`` the images' size and scaling. ``optimizer``: "adamw" or "sgd" (momentum 0.9,
    ``CONTINUE_OPTIMIZERS``). ``resume_optimizer`` reloads the saved (AdamW) optimizer state (same blocks only; a
    grown head's new rows start with zero moments, ``grown_optimizer_state``) and then sets ``config.lr``; ``distill``
    adds LwF distillation on the old classes' logits. A grown head's new rows start as ``head_init`` says
    (``incremental.HEAD_INITS``); ``head_dropout`` > 0 puts dropout before the head while it trains (taken out
    afterwards, so the returned model saves and reloads as the checkpoint's did: dropout does nothing at inference).

    Budget: ``steps_per_epoch=None`` makes an epoch one pass over ``train_set`` (a small set gets few optimizer steps);
    an int makes every epoch exactly that many optimizer steps of ``config.batch_size`` items (full batches), drawn by
    going through ``train_set`` in random order as many times as the steps need, each pass in a new order (the last
    pass of an epoch partly), so runs on sets of different sizes get the same number of steps: at most
    ``config.epochs * steps_per_epoch``.

    ``val_set`` drives the LR plateau schedule (ReduceLROnPlateau on validation loss: factor 0.3, patience 1) and early
    stopping: after ``early_stopping_patience`` epochs without a better ``monitor`` ("val_loss", or "val_acc": the
    accuracy over every class of ``val_set``), or never with None. ``restore_best`` ends with the weights of the epoch
    with the best validation accuracy (``RestoreBest``), and ``metrics["val_acc"]`` is then that accuracy. Accuracy per
    class group is tracked every epoch (the result's ``tracked``), and measured once on ``test_set`` at the end: the
    result's ``metrics["test_acc/<group>"]`` for every group of ``groups`` (``by_group("test_acc")``). ``prefix_cache``
    runs the frozen blocks below ``trainable`` once per image set (``PrefixCache``; on disk in ``config.cache_dir``)
    and trains the rest on their activations: the same numbers up to float noise, with the teacher of ``distill`` run
    from the same activations. ``name`` defaults to "continued from <checkpoint file name>".
    """
    lr, batch_size, seed, device = config.lr, config.batch_size, config.seed, config.device
    _check_continue_options(optimizer, resume_optimizer, steps_per_epoch, head_dropout)
    set_seed(seed)
    model, ckpt = model_from_checkpoint(checkpoint)
    if list(classes[: len(ckpt.classes)]) != ckpt.classes:
        raise ValueError(f"New class list must start with the checkpoint's classes {ckpt.classes}, got {list(classes)}.")
    teacher = copy.deepcopy(model) if distill else None
    if len(classes) > len(ckpt.classes):
        expand_head(model, len(classes) - len(ckpt.classes), init=head_init)
    set_trainable(model, block_names(model), False)
    set_trainable(model, trainable, True)
    model.to(device)
    # one group, as fit's default optimizer that wrote the checkpoint: resume_optimizer loads its state into this one
    optimizer = make_optimizer(model, lr, kind=optimizer, weight_decay=_CONTINUE_WEIGHT_DECAY[optimizer], per_block=False)
    if resume_optimizer:
        if ckpt.optimizer is None:
            raise ValueError("resume_optimizer needs a checkpoint with optimizer state (SaveCheckpoint writes it).")
        optimizer.load_state_dict(grown_optimizer_state(ckpt.optimizer, [p for p in model.parameters() if p.requires_grad]))
        for group in optimizer.param_groups:
            group["lr"] = lr
    if head_dropout > 0:
        model.head = nn.Sequential(nn.Dropout(head_dropout), model.head)  # while training only: taken out below
    start = time.perf_counter()
    sets = {"train": train_set, "val": val_set, **({} if test_set is None else {"test": test_set})}
    data = _image_data(model, sets, config, transform=transform, prefix_cache=prefix_cache,
                       train_loader=lambda dataset, tf: _continue_train_loader(dataset, tf, batch_size, seed, steps_per_epoch))
    if data.cache is not None and teacher is not None:
        teacher = Suffix(teacher.to(device), data.cache.boundary)  # the teacher's frozen blocks are the student's
    tracker = AccuracyTracker(groups)  # scores each epoch's validation pass: the tracker runs before early stopping
    callbacks: list[Callback] = [tracker]
    if early_stopping_patience is not None:
        callbacks.append(EarlyStopping(early_stopping_patience, monitor=monitor))
    if restore_best:
        callbacks.append(RestoreBest())
    loss_fn = DistillationLoss(data.stepper, teacher.to(device)) if teacher is not None else None
    try:
        history = _fit_on(data, config, optimizer=optimizer, scheduler="plateau", loss_fn=loss_fn, callbacks=callbacks)
    finally:
        if loss_fn is not None:
            loss_fn.remove()
        if head_dropout > 0:
            model.head = model.head[1]
    metrics = {"val_acc": max(history.val_acc) if restore_best else history.val_acc[-1]}
    if "test" in data.loaders:
        metrics.update({f"test_acc/{group}": acc for group, acc in group_accuracy(data.stepper, data.loaders["test"], groups, device).items()})
    return _result(name or f"continued from {Path(checkpoint).name}", model, history, start, data, metrics=metrics, tracked=tracker.acc)


def _check_continue_options(optimizer: str, resume_optimizer: bool, steps_per_epoch: int | None, head_dropout: float) -> None:
    if optimizer not in CONTINUE_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(map(repr, CONTINUE_OPTIMIZERS))}, got {optimizer!r}.")
    if resume_optimizer and optimizer != "adamw":
        raise ValueError(f"resume_optimizer reloads the checkpoint's AdamW state: it needs optimizer='adamw', got {optimizer!r}.")
    if steps_per_epoch is not None:
        check_int("steps_per_epoch", steps_per_epoch, minimum=1)
    if isinstance(head_dropout, bool) or not isinstance(head_dropout, (int, float)) or not 0 <= head_dropout < 1:
        raise ValueError(f"head_dropout must be a probability in [0, 1), got {head_dropout!r}.")


def _continue_train_loader(dataset: Dataset, transform: Callable | None, batch_size: int, seed: int,
                           steps_per_epoch: int | None) -> torch.utils.data.DataLoader:
    """One pass over ``dataset`` per epoch, or exactly ``steps_per_epoch`` full batches (reshuffled passes, as needed)."""
    if steps_per_epoch is None:
        return make_loader(dataset, transform, batch_size, shuffle=True, seed=seed)
    # Every epoch starts a new pass, so within an epoch the items' counts differ by at most one.
    sampler = repeated_passes_sampler(len(dataset), steps_per_epoch * batch_size, seed)
    return make_loader(dataset, transform, batch_size, shuffle=False, seed=seed, sampler=sampler)


# --- notebook 05: the first model, and arms that continue it --------------------------------------------


def train_first_model(config: RunConfig, train_set: Dataset, val_set: Dataset, checkpoint: str | Path, *, classes: Sequence[str],
                      trainable: Sequence[str], transform: Callable, callbacks: Sequence[Callback] = ()) -> RunResult:
    """A new model for ``classes`` (``config``'s backbone and weights) with only the ``trainable`` blocks trained on
    ``train_set``, through the prefix cache (the frozen blocks run once per image set); the whole training state is
    saved to ``checkpoint`` after every epoch (``SaveCheckpoint``, recording ``config.image_size`` as the training size)."""
    set_seed(config.seed)
    model = create_model(config.backbone, len(classes), config.weights)
    set_trainable(model, block_names(model), False)
    set_trainable(model, trainable, True)
    start = time.perf_counter()
    data = _image_data(model, {"train": train_set, "val": val_set}, config, transform=transform, train_loader=_shuffled(config),
                       prefix_cache=True, progress=False)
    saver = SaveCheckpoint(checkpoint, classes, image_size=config.image_size)
    history = _fit_on(data, config, lr=config.lr, callbacks=[saver, *callbacks])
    return _result(f"first model ({Path(checkpoint).name})", model, history, start, data)


class Continuation:
    """Arms for ``compare_arms`` that continue each seed's checkpoint on one of that seed's training sets.

        new_classes = Continuation(config, checkpoints, arrivals.stage3_sets, arrivals.val_all, groups, classes=..., transform=...)
        tlkit.compare_arms({"replay": new_classes.arm("replay", trainable=["top", "head"])}, seeds)

    ``arm(data, **options)(seed)`` is ``continue_training(config.replace(seed=seed), checkpoints[seed],
    training_sets(seed)[data], val_set, groups, **options)`` (the options given here, then the arm's). Its metrics also
    hold ``"steps_run"``: the optimizer steps the run took before early stopping ended it, to state next to the cap
    (``config.epochs`` epochs of ``steps_per_epoch`` steps, or of one pass over the training set).
    """

    def __init__(self, config: RunConfig, checkpoints: Mapping[int, str | Path], training_sets: Callable[[int], Mapping[str, Dataset]],
                 val_set: Dataset, groups: dict[str, Sequence[int]], **options: Any) -> None:
        self.config, self.checkpoints, self.training_sets = config, checkpoints, training_sets
        self.val_set, self.groups, self.options = val_set, groups, options

    def with_options(self, **options: Any) -> Continuation:
        """The same arms with ``options`` added to (or replacing) every run's."""
        return Continuation(self.config, self.checkpoints, self.training_sets, self.val_set, self.groups, **{**self.options, **options})

    def arm(self, data: str, *, config: RunConfig | None = None, **options: Any) -> Callable[[int], RunResult]:
        """The function of the seed that continues that seed's checkpoint on its training set ``data``."""
        run_config, merged = config or self.config, {**self.options, **options}

        def run(seed: int) -> RunResult:
            if seed not in self.checkpoints:
                raise KeyError(f"No checkpoint for seed {seed}: the checkpoints are for seeds {sorted(self.checkpoints)}.")
            sets = self.training_sets(seed)
            if data not in sets:
                raise KeyError(f"No training set {data!r}; seed {seed}'s sets are {list(sets)}.")
            result = continue_training(run_config.replace(seed=seed), self.checkpoints[seed], sets[data], self.val_set, self.groups, **merged)
            per_epoch = merged.get("steps_per_epoch") or math.ceil(len(sets[data]) / run_config.batch_size)
            result.metrics["steps_run"] = len(result.history) * per_epoch
            return result

        return run


def tradeoff_arms(continuation: Continuation, data: str, groups: tuple[str, str], *, lr: float, patience: int,
                  factors: Sequence[float] = TRADEOFF_FACTORS) -> dict[str, Callable[[int], dict[str, float]]]:
    """Arms for ``compare_arms``: the optimizer fresh or resumed from the checkpoint, times each LR ``factor`` of ``lr``,
    each continuing on training set ``data`` for the full step budget (no early stopping), scored by ``tradeoff_metrics``
    on the two ``groups`` (stable, plastic) at the last epoch and at the epoch early stopping with ``patience`` keeps."""
    per_epoch = continuation.options.get("steps_per_epoch")
    if per_epoch is None:
        raise ValueError("tradeoff_arms needs a Continuation with steps_per_epoch set, so that every setting gets the same steps.")

    def arm(resumed: bool, factor: float) -> Callable[[int], dict[str, float]]:
        run = continuation.arm(data, config=continuation.config.replace(lr=lr * factor), resume_optimizer=resumed,
                               early_stopping_patience=None, restore_best=False, test_set=None)
        return lambda seed: tradeoff_metrics(run(seed), groups, patience, per_epoch)

    return {tradeoff_arm(resumed, factor): arm(resumed, factor) for resumed in (False, True) for factor in factors}


def nearest_mean_update(scorer: ClassIncrementalScorer, checkpoint: str | Path, seed: int, *, name: str = "nearest class mean") -> RunResult:
    """The model in ``checkpoint`` (the first model of ``seed``), frozen, with a nearest-class-mean head over every class
    of ``scorer.arrivals``: each old class's mean feature over the first model's own training images (means that can
    be kept from stage 1 instead of the images), each new class's over its new images; scored by ``scorer``. Nothing
    trains: its history is the checkpoint's, ``steps_run`` 0."""
    a = scorer.arrivals
    model, saved = model_from_checkpoint(checkpoint)
    freeze(model)
    parts = [cached_features(model, make_loader(d, scorer.transform, scorer.batch_size, shuffle=False), scorer.device, cache_dir=scorer.cache_dir,
                             progress=False).tensors for d in (a.first(seed).with_classes(a.all_names), a.new(seed))]
    head = nearest_mean_head(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]), len(a.all_names))
    model.head = head.requires_grad_(False).to(next(model.features.parameters()).device)
    history = History(**saved.history)
    return RunResult(name, model, history, 0.0, 0, metrics={**scorer.scores(model), "steps_run": 0})
