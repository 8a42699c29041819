"""Seeds, device, the training loop and its callbacks, evaluation, prediction and cached-feature head training."""

from __future__ import annotations

import copy
import math
import random
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Sampler, Subset, TensorDataset
from tqdm.auto import tqdm

from ._io import user_path
from ._runtime import amp_dtype as _amp_dtype
from ._runtime import channels_last_batch as _channels_last_batch
from ._runtime import channels_last_model as _channels_last_model
from ._runtime import with_progress as _with_progress
from .checkpoints import CheckpointSaveError, load_checkpoint, save_checkpoint
from .data import make_loader
from .models import below_head_frozen, head_linear
from .optim import make_optimizer
from .params import check_learning_rate, check_seed, check_weight_decay
from .transforms import to_rgb


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) in one place; ``seed`` is a whole number in NumPy's range, 0 .. 2**32 - 1."""
    seed = check_seed("seed", seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU; asking for a device that is not there is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device name; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from err
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but no CUDA GPU is available; use device='auto' or 'cpu'.")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                f"numbered from 0; use device='cuda' or 'auto'."
            )
    elif chosen.type != "cpu" and not _backend_available(chosen.type):
        raise ValueError(f"device={device!r} is not available on this machine; use device='auto' or 'cpu'.")
    return chosen


def _backend_available(device_type: str) -> bool:
    backend = getattr(torch, device_type, None) or getattr(torch.backends, device_type, None)
    return bool(backend is not None and getattr(backend, "is_available", lambda: False)())


@dataclass
class History:
    """Per-epoch metrics of one training run, as plain lists (``asdict`` makes it JSON-ready)."""

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)
    # Throughput of the training pass, and GPU figures (NaN on the CPU or where unavailable).
    images_per_s: list[float] = field(default_factory=list)
    gpu_mem_peak_gb: list[float] = field(default_factory=list)
    gpu_util: list[float] = field(default_factory=list)
    interrupted: bool = False  # True when the run was stopped by the user (TrainingInterrupted's .history)

    def __post_init__(self) -> None:
        # A history saved before a field existed gets NaN there, so every list stays one per epoch.
        for name in ("images_per_s", "gpu_mem_peak_gb", "gpu_util"):
            values = getattr(self, name)
            values.extend([math.nan] * (len(self.epoch) - len(values)))

    def append(self, **row: float) -> None:
        """Add one epoch's values (every per-epoch field; GPU figures default to NaN)."""
        row = {"images_per_s": math.nan, "gpu_mem_peak_gb": math.nan, "gpu_util": math.nan, **row}
        for key, value in row.items():
            getattr(self, key).append(value)

    def has_gpu_figures(self) -> bool:
        """True if any epoch recorded GPU memory (the run used a GPU)."""
        return any(not math.isnan(v) for v in self.gpu_mem_peak_gb)

    def best_epoch(self) -> int:
        """The epoch with the highest validation accuracy (the first of equals)."""
        return self.epoch[int(np.argmax(self.val_acc))]

    def to_dict(self) -> dict[str, list]:
        """Plain dict of lists."""
        return asdict(self)

    def __len__(self) -> int:
        return len(self.epoch)


class TrainingInterrupted(KeyboardInterrupt):
    """The user stopped ``fit`` (Ctrl-C, or Jupyter's interrupt); ``history`` holds the complete epochs."""

    def __init__(self, message: str, history: History) -> None:
        super().__init__(message)
        self.history = history


class _StopRequest:
    """Turns the first SIGINT into a request to stop at the next batch boundary; a second one interrupts at once.

    Only the main thread can install signal handlers (Jupyter runs cells there); elsewhere a
    KeyboardInterrupt still arrives as usual and ``fit`` handles it the same way.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread() and _sigint_is_ours_to_handle():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("Interrupt received: training stops after this batch (interrupt again to stop at once).", flush=True)


def _sigint_is_ours_to_handle() -> bool:
    """False where SIGINT is ignored on purpose (``nohup``, a background job: the run stays uninterruptible, as asked)
    or handled outside Python (``getsignal`` gives None: that handler could not be put back afterwards)."""
    return signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None)


class _Stopped(Exception):
    """Raised inside an epoch when a stop was requested; the epoch is discarded."""


def _out_of_memory_message(loader: DataLoader, device: torch.device) -> str:
    size = getattr(loader, "batch_size", None) or 0
    smaller = f"batch_size={max(size // 2, 1)}" if size > 1 else "a smaller image_size"
    return (
        f"Out of memory on {device} with batch_size={size}. Try {smaller} (or a smaller image_size, "
        "or freeze more blocks: frozen blocks keep no activations for backward)."
    )


def _gpu_utilization(device: torch.device) -> float:
    """GPU utilization in percent from NVML (the nvidia-ml-py package), NaN where unavailable."""
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # no NVML library, or a driver that does not report it
        return math.nan


@dataclass
class _EpochTotals:
    """What one pass over a loader measured: mean loss, accuracy, items and batches seen, and the first batch whose
    loss was not finite (1-based; None when every one was)."""

    loss: float
    acc: float
    seen: int
    batches: int
    bad_batch: int | None = None
    bad_loss: float | None = None


def _run_epoch(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
    loss_fn: nn.Module,
    desc: str,
    progress: bool,
    name: str,
    stop: _StopRequest | None = None,
    utilization: list[float] | None = None,
    outputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> _EpochTotals:
    """One pass over ``loader`` (batches in channels_last); trains when ``optimizer`` is given.

    Each batch's loss and number of correct predictions stay on the device and are read once, at the end: reading
    them per batch (``.item()``) would make the CPU wait for the GPU at every batch. ``outputs`` (a list) gets each
    batch's (float CPU logits, CPU labels). A loader that yields nothing is an error naming it (``name``).
    ``before_step`` / ``after_step`` run before each training batch and after its optimizer step.
    """
    training = optimizer is not None
    model.train(training)
    amp_dtype = _amp_dtype(device)
    losses: list[torch.Tensor] = []
    hits: list[torch.Tensor] = []
    sizes: list[int] = []
    with torch.set_grad_enabled(training):
        for step, (x, y) in enumerate(_with_progress(loader, desc, progress)):
            if stop is not None and stop.requested:
                raise _Stopped
            x = _channels_last_batch(x.to(device, non_blocking=True))
            y = y.to(device, non_blocking=True)
            if training and before_step is not None:
                before_step()
            try:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(x)
                    loss = loss_fn(logits, y)
                if training:
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    if after_step is not None:
                        after_step()
            except torch.OutOfMemoryError as err:
                raise torch.OutOfMemoryError(_out_of_memory_message(loader, device)) from err
            if utilization is not None and step % 10 == 0:
                utilization.append(_gpu_utilization(device))
            if outputs is not None:
                outputs.append((logits.detach().float().cpu(), y.cpu()))
            losses.append(loss.detach().float().reshape(()))
            # Soft targets (MixUp/CutMix: class probabilities, N x C) count as their largest class.
            hard_y = y.argmax(1) if y.ndim == 2 else y
            hits.append((logits.argmax(1) == hard_y).sum())
            sizes.append(len(y))
    if not sizes:
        raise ValueError(_no_batches_message(loader, name))
    return _epoch_totals(losses, hits, sizes)


def _epoch_totals(losses: list[torch.Tensor], hits: list[torch.Tensor], sizes: list[int]) -> _EpochTotals:
    """The pass's totals from its per-batch tensors, read from the device in one transfer each."""
    batch_losses = torch.stack(losses).tolist()
    correct = int(torch.stack(hits).sum())
    seen = sum(sizes)
    total_loss = sum(loss * size for loss, size in zip(batch_losses, sizes))
    bad = next((i for i, loss in enumerate(batch_losses) if not math.isfinite(loss)), None)
    return _EpochTotals(
        loss=total_loss / seen, acc=correct / seen, seen=seen, batches=len(sizes),
        bad_batch=None if bad is None else bad + 1, bad_loss=None if bad is None else batch_losses[bad],
    )


def _no_batches_message(loader: Iterable, name: str) -> str:
    """Why ``loader`` yields no batch, and what to change (an empty pass would report loss 0.0 and accuracy 0.0)."""
    dataset = getattr(loader, "dataset", None)
    try:
        size = len(dataset)
    except TypeError:  # no dataset, or an iterable one without a length
        size = None
    batch_size = getattr(loader, "batch_size", None)
    if size == 0:
        why = "its dataset is empty (0 items); check the folder or split it was made from"
    elif size is not None and getattr(loader, "drop_last", False) and batch_size and size < batch_size:
        why = (f"its dataset has {size} item(s), fewer than batch_size={batch_size}, and drop_last=True drops that "
               f"incomplete batch; use batch_size={size} or less, or drop_last=False")
    elif size is not None:
        why = f"its dataset has {size} item(s) but its sampler yields none; check the sampler"
    else:
        why = "it yielded nothing; check the data it iterates"
    return f"{name} has no batches: {why}. A pass over no batch would report loss 0.0 and accuracy 0.0 as if measured."


def _check_has_batches(loader: Iterable, name: str) -> None:
    """Refuse a loader known to be empty before any work; one without a length is checked after its first pass."""
    try:
        batches = len(loader)
    except TypeError:
        return
    if batches == 0:
        raise ValueError(_no_batches_message(loader, name))


class NonFiniteLossError(FloatingPointError):
    """``fit`` stopped because a batch's loss was nan or infinite; ``history`` holds the complete (finite) epochs.

    It is raised before that epoch's history row and callbacks, so ``SaveCheckpoint`` keeps the last finite epoch.
    """

    def __init__(self, message: str, history: History) -> None:
        super().__init__(message)
        self.history = history


# --- does the model fit the data? ------------------------------------------------------------------


class RepeatedFitWarning(UserWarning):
    """``fit`` was called again on a model it already trained, without ``resume_from=`` (a History or a checkpoint)."""


def _num_outputs(model: nn.Module) -> int | None:
    """Number of classes ``model`` predicts: its head's last Linear layer (through wrappers that hold ``.model``; or
    ``model`` itself when it is a bare head, as fit_head trains); None if unknown."""
    for owner in (model, getattr(model, "model", None)):
        if isinstance(getattr(owner, "head", None), nn.Module):
            try:
                return head_linear(owner).out_features
            except ValueError:
                return None
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)] if isinstance(model, (nn.Linear, nn.Sequential)) else []
    return linears[-1].out_features if linears else None


def _inner_dataset(dataset):
    """The dataset a wrapper holds: TransformedDataset (.base), the prefix cache's CachedItems (.source), Subset; else None."""
    for name in ("base", "source"):
        inner = getattr(dataset, name, None)
        if inner is not None:
            return inner
    return dataset.dataset if isinstance(dataset, Subset) else None


def _named_classes(dataset, depth: int = 0) -> list[str] | None:
    """The class names of ``dataset`` (through wrappers; the same in every part of a ConcatDataset), or None."""
    if dataset is None or depth > 8:
        return None
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, (list, tuple)) and classes:
        return list(classes)
    if isinstance(dataset, ConcatDataset):
        parts = [_named_classes(part, depth + 1) for part in dataset.datasets]
        return parts[0] if parts and all(part is not None and part == parts[0] for part in parts) else None
    return _named_classes(_inner_dataset(dataset), depth + 1)


def with_classes_of(source, features: TensorDataset) -> TensorDataset:
    """``features`` given the class names of ``source`` (the images they were computed from) as ``.classes``,
    so that ``fit_head`` checks the head against the classes rather than the largest label."""
    classes = _named_classes(source)
    if classes is not None:
        features.classes = classes
    return features


def _label_classes(dataset, depth: int = 0) -> tuple[int, bool] | None:
    """(number of classes, exact?) of ``dataset``'s labels, without loading an item; None if it cannot tell.

    Exact for a dataset that names its classes (``.classes``) or holds soft labels (N x C); for integer label
    tensors it is the largest label + 1, which a class missing from this data would make smaller.
    """
    if dataset is None or depth > 8:
        return None
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, (list, tuple)) and classes:
        return len(classes), True
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
        if labels.ndim == 2 and labels.is_floating_point():
            return labels.shape[1], True
        if labels.ndim == 1 and not labels.is_floating_point() and labels.numel():
            return int(labels.max()) + 1, False
        return None
    if isinstance(dataset, ConcatDataset):
        parts = [_label_classes(part, depth + 1) for part in dataset.datasets]
        if not parts or None in parts:
            return None
        return max(n for n, _ in parts), all(exact for _, exact in parts)
    return _label_classes(_inner_dataset(dataset), depth + 1)


def check_head_fits(model: nn.Module, loader: Iterable, *, where: str = "fit") -> None:
    """Raise a ValueError naming both numbers if ``model``'s outputs do not match the classes of ``loader``'s data.

    Checked before the first batch, from the model's head and the dataset's class list, soft labels, or label
    tensor: the loader is not iterated. A plain label tensor only tells the largest label (its top classes may
    just be absent), so there only labels beyond the head are an error. Nothing is checked when either number
    cannot be told (a model without a Linear head, a dataset without classes or labels).
    """
    outputs = _num_outputs(model)
    found = _label_classes(getattr(loader, "dataset", None))
    if outputs is None or found is None:
        return
    classes, exact = found
    if outputs == classes or (outputs > classes and not exact):
        return
    data = f"{classes} classes" if exact else f"labels up to {classes - 1}, so at least {classes} classes"
    new_model = f"tlkit.create_model(backbone, {classes}, ...)"
    if outputs < classes:
        advice = (f". Build a new model for this data ({new_model}) or grow this one's head "
                  f"(tlkit.incremental.expand_head(model, {classes - outputs}) adds {classes - outputs} outputs; the old ones keep their weights)")
    else:
        advice = (f": its {outputs - classes} extra output(s) would be classes that do not exist in the data. Build a new "
                  f"model for this data ({new_model}); tlkit.incremental.expand_head grows a head, nothing shrinks one")
    raise ValueError(
        f"{where}: the model's head has {outputs} outputs but the data has {data}{advice}; "
        f"or check that this is the data the model is for."
    )


def _weights_version(model: nn.Module) -> tuple[int, ...]:
    # Every in-place change of a parameter (an optimizer step, reset_parameters, load_state_dict) bumps its version.
    return tuple(p._version for p in model.parameters())


# model -> (epochs fit trained it for, its weights' version then): for the warning on a second fit(). A weak map in
# this module, not an attribute on the user's model: nothing hidden travels with it (copies, pickles, checkpoints).
_FITTED: weakref.WeakKeyDictionary[nn.Module, tuple[int, tuple[int, ...]]] = weakref.WeakKeyDictionary()


def _epochs_fitted(model: nn.Module) -> int:
    """Epochs that fit has trained ``model`` for, if its weights are still exactly as fit left them; else 0."""
    epochs, version = _FITTED.get(model, (0, None))
    return epochs if version == _weights_version(model) else 0


def _warn_if_fitted_before(model: nn.Module) -> None:
    done = _epochs_fitted(model)
    if done:
        warnings.warn(
            f"fit() already trained this model for {done} epoch(s): this run continues from those weights with a fresh "
            f"optimizer (and scheduler), and its history counts epochs from 1 again. Pass resume_from=<the earlier History> "
            f"to continue the epoch count (and early stopping), resume_from=<checkpoint path> to continue the optimizer "
            f"too, or build a new model (tlkit.create_model) to start over.",
            RepeatedFitWarning,
            stacklevel=3,
        )


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", *, progress: bool = False) -> dict[str, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``loader`` (which must yield at least one batch)."""
    check_head_fits(model, loader, where="evaluate")
    _check_has_batches(loader, "evaluate: loader")
    totals = _run_epoch(
        _channels_last_model(model), loader, torch.device(device), optimizer=None, scaler=None,
        loss_fn=nn.CrossEntropyLoss(), desc="eval", progress=progress, name="evaluate: loader",
    )
    return {"loss": totals.loss, "acc": totals.acc}


SchedulerSpec = str | Callable[[torch.optim.Optimizer], object] | None


def _make_scheduler(spec: SchedulerSpec, optimizer: torch.optim.Optimizer, epochs: int):
    if spec is None:
        return None
    if spec == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if spec == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.3, patience=1)
    if callable(spec):
        return spec(optimizer)
    raise ValueError(f"Unknown scheduler {spec!r}: use 'cosine', 'plateau', None, or a function optimizer -> scheduler.")


def _check_epochs(epochs: int) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a whole number of at least 1, got {epochs!r}.")


# --- callbacks ------------------------------------------------------------------------------------


@dataclass
class FitState:
    """What ``fit``'s callbacks see after each epoch (and once more at the end).

    ``val_logits`` (float, on the CPU, N x C) and ``val_labels`` are the outputs of this epoch's validation pass,
    so a callback can score the validation set without running the model again. A callback sets ``stop = True``
    to end training after this epoch.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    scaler: torch.amp.GradScaler | None
    train_loader: DataLoader
    epoch: int
    history: History
    val_logits: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    stop: bool = False
    step: int = 0  # optimizer steps taken in this fit() call (on_batch_end sees the count after its step)


class Callback:
    """Base of ``fit``'s callbacks: override ``on_batch_start`` (before every training batch: a per-step schedule sets
    the step's LRs, ``tlkit.optim.OneCycle``), ``on_batch_end`` (after every optimizer step), ``on_epoch_end`` (after
    every epoch) and/or ``on_fit_end`` (once, also after an interrupt). They run in the order given; ``on_epoch_end``
    after the epoch's history row is appended and the scheduler stepped. A plain function ``f(state)`` passed in
    ``callbacks=`` runs as an ``on_epoch_end``; any object with the four methods is taken as a callback too (a lower
    module's, such as ``OneCycle``, cannot subclass this one)."""

    def on_batch_start(self, state: FitState) -> None:
        """Called before every training batch, with ``state.step`` the optimizer steps taken so far in this ``fit``."""

    def on_batch_end(self, state: FitState) -> None:
        """Called after every optimizer step, with ``state.step`` the steps taken so far in this ``fit``."""

    def on_epoch_end(self, state: FitState) -> None:
        """Called after every complete epoch."""

    def on_fit_end(self, state: FitState) -> None:
        """Called once when training ends (after the last epoch, an early stop or an interrupt)."""


class _EpochEnd(Callback):
    """A plain function ``f(state)`` as a callback."""

    def __init__(self, function: Callable[[FitState], None]) -> None:
        self.function = function

    def on_epoch_end(self, state: FitState) -> None:
        self.function(state)


_HOOKS = ("on_batch_start", "on_batch_end", "on_epoch_end", "on_fit_end")


def _is_callback(obj: object) -> bool:
    """A ``Callback``, or an object with all of its hooks (``tlkit.optim.OneCycle``, whose module sits below this one)."""
    return isinstance(obj, Callback) or all(callable(getattr(obj, hook, None)) for hook in _HOOKS)


def _overrides(callback: object, hook: str) -> bool:
    """Whether ``callback`` does something in ``hook`` (Callback's own do nothing: fit skips them per batch)."""
    return getattr(type(callback), hook, None) is not getattr(Callback, hook)


def _as_callbacks(callbacks: Callback | Callable | Iterable[Callback | Callable]) -> list[Callback]:
    if _is_callback(callbacks) or callable(callbacks):
        callbacks = [callbacks]
    out = []
    for callback in callbacks:
        if not _is_callback(callback) and not callable(callback):
            raise TypeError(f"callbacks must be tlkit.Callback objects or functions f(state), got {callback!r}.")
        out.append(callback if _is_callback(callback) else _EpochEnd(callback))
    return out


def _epochs_since_best(values: Sequence[float], *, higher_is_better: bool = False) -> int:
    """Epochs since ``values`` last improved (strictly), as early stopping counts them over a whole run."""
    best, stale = float("inf"), 0
    for value in values:
        score = -value if higher_is_better else value
        if score < best:
            best, stale = score, 0
        else:
            stale += 1
    return stale


EARLY_STOPPING_MONITORS = ("val_loss", "val_acc")


class EarlyStopping(Callback):
    """Stop when the validation figure ``monitor`` has not improved for ``patience`` epochs.

    ``monitor``: "val_loss" (lower is better, the default) or "val_acc" (higher is better: the accuracy of fit's own
    validation pass, over every class of the validation set). The count follows from the history (all of it, when
    ``fit`` continues one with ``resume_from``), so a resumed run stops where an uninterrupted one would.
    ``stopped_epoch`` is the epoch after which it stopped training (None while it has not). Pair it with
    ``RestoreBest()`` to end with the weights of the best validation accuracy rather than those of the last epoch.
    """

    def __init__(self, patience: int, monitor: str = "val_loss") -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a whole number of at least 1 (epochs without improvement), got {patience!r}.")
        if monitor not in EARLY_STOPPING_MONITORS:
            raise ValueError(f"monitor must be one of {', '.join(EARLY_STOPPING_MONITORS)}, got {monitor!r}.")
        self.patience, self.monitor = patience, monitor
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, state: FitState) -> None:
        stale = _epochs_since_best(getattr(state.history, self.monitor), higher_is_better=self.monitor == "val_acc")
        if stale > 0 and stale >= self.patience:
            state.stop = True
            self.stopped_epoch = state.epoch


class RestoreBest(Callback):
    """Keep the weights of the epoch with the best validation accuracy (the first of equals) and put them back when
    training ends."""

    def __init__(self) -> None:
        self.best_acc, self.best_state = -1.0, None

    def on_epoch_end(self, state: FitState) -> None:
        if state.history.val_acc[-1] > self.best_acc:
            self.best_acc, self.best_state = state.history.val_acc[-1], copy.deepcopy(state.model.state_dict())

    def on_fit_end(self, state: FitState) -> None:
        if self.best_state is not None:
            state.model.load_state_dict(self.best_state)
        self.best_acc, self.best_state = -1.0, None  # a later fit starts afresh


class SaveCheckpoint(Callback):
    """After every epoch, save the whole training state to ``path`` atomically: model, optimizer, scheduler, scaler,
    history, RNG states, the train loader's shuffling state and ``classes`` (the class names). ``fit(...,
    resume_from=path)`` continues from it exactly. A file that cannot be written raises ``CheckpointSaveError``,
    which stops training with the complete epochs in its ``.history``. ``image_size``: the size the model trains at,
    recorded so that ``python -m tlkit.predict`` resizes new images the same way without being told."""

    def __init__(self, path: str | Path, classes: Sequence[str], *, image_size: int | None = None) -> None:
        self.path, self.classes, self.image_size = path, list(classes), image_size

    def on_epoch_end(self, state: FitState) -> None:
        _save_epoch(
            self.path, state.model, classes=self.classes, epoch=state.epoch, history=state.history,
            optimizer=state.optimizer, scheduler=state.scheduler, scaler=state.scaler,
            loader_rng=state.train_loader.generator, image_size=self.image_size,
        )


def _save_epoch(path: str | Path, model: nn.Module, *, history: History, **state) -> None:
    """``save_checkpoint`` for fit: a file that cannot be written stops training with the epochs done in ``err.history``."""
    try:
        save_checkpoint(path, model, history=history.to_dict(), **state)
    except CheckpointSaveError as err:
        stopped = CheckpointSaveError(
            f"{err} Training stopped after epoch {state['epoch']}: its {len(history)} complete epoch(s) are in this "
            f"error's .history (e.g. history = err.history in an except block) and the model keeps their weights."
        )
        stopped.history = history
        raise stopped from err


def _checkpoint_of(callbacks: Sequence[Callback]) -> SaveCheckpoint | None:
    return next((c for c in callbacks if isinstance(c, SaveCheckpoint)), None)


# --- the training loop ----------------------------------------------------------------------------


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    epochs: int,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: SchedulerSpec = None,
    loss_fn: nn.Module | None = None,
    device: torch.device | str = "cpu",
    callbacks: Sequence[Callback | Callable[[FitState], None]] = (),
    progress: bool = True,
    resume_from: str | Path | History | None = None,
) -> History:
    """Train ``model`` for ``epochs`` (train then validate each epoch) and return its History.

    Only parameters with ``requires_grad`` are optimized (by default ``tlkit.optim.make_optimizer(model, lr,
    per_block=False)``: AdamW without weight decay, one param group; pass ``optimizer`` for anything else).
    ``scheduler`` ('cosine', 'plateau', or a function optimizer -> scheduler) is stepped once per epoch, except a
    per-step schedule that is a callback (``tlkit.optim.one_cycle``), which runs as the first callback.
    On CUDA, autocast (bf16 where supported, else fp16 with a GradScaler) is used.
    Weights and image batches are in channels_last memory format (faster convolutions on GPUs and CPUs:
    bench/channels_last.py); to compile, pass ``torch.compile(model)``. The history records images/s per epoch
    and, on a GPU, peak memory and utilization. ``loss_fn`` defaults to cross-entropy (used for training;
    validation always reports plain cross-entropy so runs stay comparable).

    ``callbacks`` (``Callback`` objects or functions ``f(state)``) run after every epoch, in the order given,
    after the history row is appended and the scheduler stepped (a ``Callback``'s ``on_batch_start`` and
    ``on_batch_end`` also around every training batch); ``EarlyStopping(patience)``,
    ``RestoreBest()`` and ``SaveCheckpoint(path, classes)`` are built in. ``resume_from``: a checkpoint
    written by ``SaveCheckpoint`` (train ``epochs`` more epochs exactly as an uninterrupted run would, with
    the same data, loaders and seed), or a History (continue its epoch count and early stopping).

    Interrupting (Ctrl-C, Jupyter's stop button) ends training at the next batch boundary: the unfinished
    epoch is dropped, the callbacks' ``on_fit_end`` runs, and ``TrainingInterrupted`` is raised (a
    KeyboardInterrupt, so "run all" stops too; its ``.history`` holds the complete epochs, which a
    ``SaveCheckpoint`` file also keeps). Where SIGINT is ignored (``nohup``, a background job) it stays ignored.

    A batch whose loss is nan or infinite stops training with ``NonFiniteLossError`` at the end of that epoch's
    training pass, naming the batch and the likely causes; that epoch gets no history row and no callback runs, so
    a ``SaveCheckpoint`` file keeps the last finite epoch (the model keeps its, most likely non-finite, weights).
    Learning rates must be finite, and both loaders must yield at least one batch.
    """
    _check_epochs(epochs)
    check_learning_rate("lr", lr)
    check_head_fits(model, train_loader, where="fit (train_loader)")
    check_head_fits(model, val_loader, where="fit (val_loader)")
    _check_has_batches(train_loader, "fit: train_loader")
    _check_has_batches(val_loader, "fit: val_loader")
    fitted_before = _epochs_fitted(model)
    if resume_from is None:
        _warn_if_fitted_before(model)
    device = torch.device(device)
    _channels_last_model(model.to(device))  # faster convolutions on GPUs and CPUs alike: bench/channels_last.py
    optimizer = make_optimizer(model, lr, per_block=False) if optimizer is None else _check_optimizer_rates(optimizer)
    scheduler = _make_scheduler(scheduler, optimizer, epochs)
    scaler = torch.amp.GradScaler("cuda") if _amp_dtype(device) == torch.float16 else None
    callbacks = _as_callbacks(callbacks)
    if _is_callback(scheduler) and scheduler not in callbacks:  # a per-step schedule (OneCycle): its hooks run first
        callbacks = [scheduler, *callbacks]
    state = FitState(model, optimizer, scheduler, scaler, train_loader, epoch=0, history=History())
    state.history = _starting_history(resume_from, state, _checkpoint_of(callbacks))
    epochs_before = len(state.history)
    state.epoch = first = state.history.epoch[-1] + 1 if state.history.epoch else 1
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    with _StopRequest() as stop:
        try:
            for state.epoch in tqdm(range(first, first + epochs), desc="epochs", disable=not progress):
                _fit_one_epoch(state, val_loader, loss_fn, device, progress=progress, stop=stop, first_of_run=state.epoch == first,
                               checkpoint=_checkpoint_of(callbacks), callbacks=callbacks)
                for callback in callbacks:
                    callback.on_epoch_end(state)
                if state.stop:
                    break
        except (_Stopped, KeyboardInterrupt):
            state.history.interrupted = True
    for callback in callbacks:
        callback.on_fit_end(state)
    _FITTED[model] = (fitted_before + len(state.history) - epochs_before, _weights_version(model))  # for a second fit()
    if state.history.interrupted:
        message = _interrupted_message(state.epoch, state.history, _checkpoint_of(callbacks))
        raise TrainingInterrupted(message, state.history)
    return state.history


def _check_optimizer_rates(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` if every param group's learning rate (and weight decay) is finite; an infinite or nan one turns
    every weight into nan at the first step."""
    for i, group in enumerate(optimizer.param_groups):
        where = f"optimizer.param_groups[{i}]" + (f" ({group['name']})" if "name" in group else "")
        check_learning_rate(f"{where} lr", float(group["lr"]))
        if "weight_decay" in group:
            check_weight_decay(f"{where} weight_decay", float(group["weight_decay"]))
    return optimizer


def _starting_history(resume_from: str | Path | History | None, state: FitState, checkpoint: SaveCheckpoint | None) -> History:
    """The history this run continues: new, the given one, or a checkpoint's (whose training state is loaded too)."""
    if resume_from is None:
        history = History()
    elif isinstance(resume_from, History):
        history = resume_from
    else:
        ckpt = load_checkpoint(
            resume_from, state.model, classes=None if checkpoint is None else checkpoint.classes,
            optimizer=state.optimizer, scheduler=state.scheduler, scaler=state.scaler,
        )
        history = History(**ckpt.history)
        if ckpt.loader_rng is not None and state.train_loader.generator is not None:
            state.train_loader.generator.set_state(ckpt.loader_rng)
    history.interrupted = False
    return history


def _fit_one_epoch(state: FitState, val_loader: DataLoader, loss_fn: nn.Module, device: torch.device, *,
                   progress: bool, stop: _StopRequest, first_of_run: bool, checkpoint: SaveCheckpoint | None,
                   callbacks: Sequence[Callback] = ()) -> None:
    """Train one epoch, validate (outputs into ``state``), append the history row, step the scheduler.

    A non-finite loss raises ``NonFiniteLossError`` before the row is appended (so before any callback): checked
    once after the training pass, which spares a GPU sync per batch and the validation of nan weights.
    """
    start = time.perf_counter()
    lr = state.optimizer.param_groups[0]["lr"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    utilization: list[float] = []
    train = _train_one_epoch(state, loss_fn, device, progress=progress, stop=stop, utilization=utilization, callbacks=callbacks)
    train_time = time.perf_counter() - start
    _raise_if_not_finite(train, "training", state, device, first_of_run=first_of_run, checkpoint=checkpoint)
    val, state.val_logits, state.val_labels = _validate(
        state.model, val_loader, device, desc=f"val {state.epoch}", progress=progress, stop=stop,
    )
    _raise_if_not_finite(val, "validation", state, device, first_of_run=first_of_run, checkpoint=checkpoint)
    state.history.append(
        epoch=state.epoch, train_loss=train.loss, train_acc=train.acc, val_loss=val.loss, val_acc=val.acc, lr=lr,
        epoch_time=time.perf_counter() - start, images_per_s=train.seen / max(train_time, 1e-9), **_gpu_figures(device, utilization),
    )
    _step_scheduler(state.scheduler, val.loss)


def _train_one_epoch(state: FitState, loss_fn: nn.Module, device: torch.device, *, progress: bool,
                     stop: _StopRequest, utilization: list[float], callbacks: Sequence[Callback] = ()) -> _EpochTotals:
    """One training pass over ``state.train_loader``; GPU utilization samples go to ``utilization``; before every
    training batch the callbacks' ``on_batch_start`` and after its optimizer step their ``on_batch_end`` see ``state``."""
    on_gpu = device.type == "cuda"
    starts = [c for c in callbacks if _overrides(c, "on_batch_start")]
    ends = [c for c in callbacks if _overrides(c, "on_batch_end")]

    def before_step() -> None:
        for callback in starts:
            callback.on_batch_start(state)

    def after_step() -> None:
        state.step += 1
        for callback in ends:
            callback.on_batch_end(state)

    result = _run_epoch(
        state.model, state.train_loader, device, optimizer=state.optimizer, scaler=state.scaler, loss_fn=loss_fn,
        desc=f"train {state.epoch}", progress=progress, name="fit: train_loader", stop=stop,
        utilization=utilization if on_gpu else None, before_step=before_step if starts else None, after_step=after_step,
    )
    if on_gpu:
        torch.cuda.synchronize(device)
    return result


def _validate(model: nn.Module, loader: DataLoader, device: torch.device, *, desc: str, progress: bool,
              stop: _StopRequest | None = None) -> tuple[_EpochTotals, torch.Tensor, torch.Tensor]:
    """One validation pass (plain cross-entropy): its totals, the logits as float on the CPU, and the labels."""
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    totals = _run_epoch(
        model, loader, device, optimizer=None, scaler=None, loss_fn=nn.CrossEntropyLoss(), desc=desc,
        progress=progress, name="fit: val_loader", stop=stop, outputs=outputs,
    )
    return totals, torch.cat([logits for logits, _ in outputs]), torch.cat([labels for _, labels in outputs])


def _raise_if_not_finite(totals: _EpochTotals, phase: str, state: FitState, device: torch.device, *,
                         first_of_run: bool, checkpoint: SaveCheckpoint | None) -> None:
    """``NonFiniteLossError`` naming the epoch, the batch, the loss and its likely causes, if a batch's loss was not finite."""
    if totals.bad_batch is None:
        return
    where = f"The {phase} loss is {totals.bad_loss} at epoch {state.epoch}, batch {totals.bad_batch} of {totals.batches}"
    causes = _non_finite_causes(phase, state.optimizer, device, before_any_step=first_of_run and totals.bad_batch == 1 and phase == "training")
    raise NonFiniteLossError(f"{where}: training stopped there. {causes} {_what_is_kept(state.history, checkpoint)}", state.history)


def _non_finite_causes(phase: str, optimizer: torch.optim.Optimizer, device: torch.device, *, before_any_step: bool) -> str:
    """The likely causes of a non-finite loss, the impossible ones left out."""
    inputs = "nan or inf in the inputs or labels (check torch.isfinite(x).all() on a batch)"
    if before_any_step:
        return (f"It is the run's first batch, before any optimizer step, so the learning rate is not the cause: look for "
                f"{inputs}, or non-finite weights in the model (a model from a run that already went nan).")
    rates = sorted({float(g["lr"]) for g in optimizer.param_groups})
    lr = f"lr={rates[0]:g}" if len(rates) == 1 else f"lrs from {rates[0]:g} to {rates[-1]:g}"
    causes = [f"a learning rate too high (the optimizer's {lr} now: try 10 times lower, or tlkit.lr_find for a range)"]
    if _amp_dtype(device) == torch.float16:
        causes.append("an overflow of float16 in mixed precision (this GPU lacks bfloat16, so autocast uses float16, "
                      "whose largest value is 65504)")
    causes.append(inputs if phase == "training" else inputs.replace("inputs or labels", "validation inputs or labels"))
    lead = ("The training losses of this epoch were finite, so its last steps most likely made the weights non-finite. "
            if phase == "validation" else "")
    return f"{lead}Likely causes: {'; '.join(causes)}."


def _what_is_kept(history: History, checkpoint: SaveCheckpoint | None) -> str:
    epochs = (f"The {len(history)} complete epoch(s) before it are in this error's .history (history = err.history in an "
              f"except block)" if history.epoch else "No epoch was complete (err.history is empty)")
    kept = f"{epochs}; the model's weights are most likely non-finite now"
    if checkpoint is not None and user_path(checkpoint.path).exists():
        return (f"{kept}, while the checkpoint {checkpoint.path} was not replaced (it keeps the last finite epoch it "
                f"saved): reload it with tlkit.checkpoints.load_checkpoint('{checkpoint.path}', model) before training again.")
    if checkpoint is not None:
        return f"{kept}; no epoch was saved to {checkpoint.path}."
    return f"{kept}: pass callbacks=[tlkit.SaveCheckpoint(path, classes)] to fit to keep the last finite epoch on disk."


def _gpu_figures(device: torch.device, utilization: list[float]) -> dict[str, float]:
    """The epoch's peak GPU memory (GB, training and validation) and mean utilization; NaN off the GPU."""
    if device.type != "cuda":
        return {"gpu_mem_peak_gb": math.nan, "gpu_util": math.nan}
    util = float(np.nanmean(utilization)) if utilization and not np.isnan(utilization).all() else math.nan
    return {"gpu_mem_peak_gb": torch.cuda.max_memory_allocated(device) / 1e9, "gpu_util": util}


def _step_scheduler(scheduler, val_loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif scheduler is not None and not _is_callback(scheduler):  # a callback schedule moves in its own hooks
        scheduler.step()


def _interrupted_message(epoch: int, history: History, checkpoint: SaveCheckpoint | None) -> str:
    kept = f"{len(history)} complete epoch(s) are in the history"
    if checkpoint is not None and history.epoch:
        kept += (f" and in the checkpoint {checkpoint.path} (epoch {history.epoch[-1]}); continue with "
                 f"fit(..., resume_from='{checkpoint.path}')")
    elif checkpoint is None:
        kept += "; pass callbacks=[tlkit.SaveCheckpoint(path, classes)] to fit to keep a resumable checkpoint"
    return (
        f"Training interrupted during epoch {epoch}: that epoch was dropped from the history (the model keeps "
        f"its weights after the last finished batch); {kept}."
    )


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", *, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (N x C) and true labels (N) for every item of ``loader``, on the CPU."""
    check_head_fits(model, loader, where="predict")
    _check_has_batches(loader, "predict: loader")
    device = torch.device(device)
    _channels_last_model(model).to(device).eval()
    probs, labels = [], []
    for x, y in _with_progress(loader, "predict", progress):
        probs.append(model(_channels_last_batch(x.to(device))).float().softmax(1).cpu())
        labels.append(y)
    if not probs:  # a loader without a length that yielded nothing
        raise ValueError(_no_batches_message(loader, "predict: loader"))
    return torch.cat(probs), torch.cat(labels)


@torch.no_grad()
def predict_images(
    model: nn.Module,
    images: Sequence[Image.Image],
    transform: Callable,
    classes: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    top_k: int = 3,
) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) pairs for each image, seen upright (EXIF orientation applied, as in training)."""
    outputs = _num_outputs(model)
    if outputs is not None and outputs != len(classes):
        raise ValueError(
            f"predict_images: the model's head has {outputs} outputs but {len(classes)} class names were given. "
            f"Pass the class names the model was trained on (a checkpoint's .classes, or the dataset's .classes)."
        )
    device = torch.device(device)
    model.to(device).eval()
    batch = torch.stack([transform(to_rgb(img)) for img in images]).to(device)
    probs = model(batch).float().softmax(1).cpu()
    top = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [
        [(classes[i], float(p)) for p, i in zip(values, indices)]
        for values, indices in zip(top.values, top.indices)
    ]


# --- cached features ---------------------------------------------------------------------------


def fit_head(
    model: nn.Module,
    train_features: TensorDataset,
    val_features: TensorDataset,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    sampler: Sampler | None = None,
    **fit_kwargs,
) -> History:
    """Train only ``model.head`` on cached features (same loop and batching as ``fit`` on images)."""
    if not below_head_frozen(model):
        raise ValueError("fit_head trains the head alone: freeze every block below the head first (tlkit.freeze(model)).")
    train_loader = make_loader(train_features, None, batch_size, shuffle=sampler is None, seed=seed, sampler=sampler)
    val_loader = make_loader(val_features, None, batch_size, shuffle=False)
    check_head_fits(model, train_loader, where="fit_head (train_features)")
    check_head_fits(model, val_loader, where="fit_head (val_features)")
    _check_has_batches(train_loader, "fit_head: train_features")
    _check_has_batches(val_loader, "fit_head: val_features")
    return fit(model.head, train_loader, val_loader, epochs=epochs, **fit_kwargs)

