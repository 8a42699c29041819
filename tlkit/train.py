"""Seeds, device, the training loop, evaluation, prediction and cached-feature head training."""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from .checkpoints import load_checkpoint, save_checkpoint
from .data import make_loader

# Transforms that give the same output for the same input: a pipeline of only these allows caching.
_DETERMINISTIC_TRANSFORMS = (
    v2.ToImage,
    v2.PILToTensor,
    v2.ToPureTensor,
    v2.Resize,
    v2.CenterCrop,
    v2.ToDtype,
    v2.Normalize,
    v2.Grayscale,
    v2.RGB,
)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) in one place."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU; asking for a device that is not there is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is available; use device='auto' or 'cpu'.")
    return chosen


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

    def append(self, **row: float) -> None:
        """Add one epoch's values (every field)."""
        for key, value in row.items():
            getattr(self, key).append(value)

    def best_epoch(self) -> int:
        """The epoch with the highest validation accuracy (the first of equals)."""
        return self.epoch[int(np.argmax(self.val_acc))]

    def to_dict(self) -> dict[str, list]:
        """Plain dict of lists."""
        return asdict(self)

    def __len__(self) -> int:
        return len(self.epoch)


def is_deterministic(transform: Callable | None) -> bool:
    """True if ``transform`` is None or a v2.Compose made only of deterministic steps."""
    if transform is None:
        return True
    steps = transform.transforms if isinstance(transform, v2.Compose) else [transform]
    return all(isinstance(step, _DETERMINISTIC_TRANSFORMS) for step in steps)


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
) -> tuple[float, float]:
    """One pass over ``loader``; trains when ``optimizer`` is given. Returns (mean loss, accuracy)."""
    training = optimizer is not None
    model.train(training)
    amp_dtype = _amp_dtype(device)
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
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
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", *, progress: bool = False) -> dict[str, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``loader``."""
    loss, acc = _run_epoch(
        model, loader, torch.device(device), optimizer=None, scaler=None,
        loss_fn=nn.CrossEntropyLoss(), desc="eval", progress=progress,
    )
    return {"loss": loss, "acc": acc}


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


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise ValueError(f"{name} must be positive, got {value}.")


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: SchedulerSpec = None,
    device: torch.device | str = "cpu",
    early_stopping_patience: int | None = None,
    restore_best: bool = False,
    on_epoch_end: Callable[[History], None] | None = None,
    progress: bool = True,
    history: History | None = None,
    loss_fn: nn.Module | None = None,
    checkpoint_path: str | Path | None = None,
    resume_from: str | Path | None = None,
    classes: Sequence[str] | None = None,
) -> History:
    """Train ``model`` for ``epochs`` (train then validate each epoch) and return its History.

    Only parameters with ``requires_grad`` are optimized (AdamW by default). ``scheduler`` is
    stepped once per epoch. Early stopping watches validation loss; ``restore_best`` puts back
    the weights of the epoch with the best validation accuracy. On CUDA, autocast (bf16 where
    supported, else fp16 with a GradScaler) is used. ``on_epoch_end(history)`` runs after every
    epoch; if it also has an ``end(history)`` method, that runs once after the last epoch.
    ``loss_fn`` defaults to cross-entropy (used for training; validation always reports
    plain cross-entropy so runs stay comparable).

    ``checkpoint_path``: after every epoch, the whole training state (model, optimizer, scheduler,
    scaler, history, RNG states, the train loader's shuffling state, ``classes``) is saved there
    atomically. ``resume_from``: load such a checkpoint first and train ``epochs`` more epochs;
    with the same data, loaders and seed this continues exactly as an uninterrupted run would.
    """
    _check_positive(epochs=epochs, lr=lr)
    device = torch.device(device)
    model.to(device)
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("The model has no trainable parameters: unfreeze at least the head before fit().")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = _make_scheduler(scheduler, optimizer, epochs)
    scaler = torch.amp.GradScaler("cuda") if _amp_dtype(device) == torch.float16 else None
    train_loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    val_loss_fn = nn.CrossEntropyLoss()
    if checkpoint_path is not None and classes is None:
        raise ValueError("fit(checkpoint_path=...) needs classes=[class names] to store in the checkpoint.")
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, model, classes=classes, optimizer=optimizer, scheduler=sched, scaler=scaler)
        history = History(**ckpt.history)
        if ckpt.loader_rng is not None and train_loader.generator is not None:
            train_loader.generator.set_state(ckpt.loader_rng)
    history = History() if history is None else history
    first = history.epoch[-1] + 1 if history.epoch else 1
    # Early stopping state follows from the history, so a resumed run stops where a whole run would.
    best_loss = min(history.val_loss, default=float("inf"))
    stale = len(history.val_loss) - 1 - int(np.argmin(history.val_loss)) if history.val_loss else 0
    best_acc, best_state = -1.0, None
    for epoch in tqdm(range(first, first + epochs), desc="epochs", disable=not progress):
        start = time.perf_counter()
        lr_now = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = _run_epoch(
            model, train_loader, device, optimizer=optimizer, scaler=scaler,
            loss_fn=train_loss_fn, desc=f"train {epoch}", progress=progress,
        )
        val_loss, val_acc = _run_epoch(
            model, val_loader, device, optimizer=None, scaler=None,
            loss_fn=val_loss_fn, desc=f"val {epoch}", progress=progress,
        )
        history.append(
            epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
            val_acc=val_acc, lr=lr_now, epoch_time=time.perf_counter() - start,
        )
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(val_loss)
        elif sched is not None:
            sched.step()
        if restore_best and val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
        if checkpoint_path is not None:
            save_checkpoint(
                checkpoint_path, model, classes=list(classes), epoch=epoch, history=history.to_dict(),
                optimizer=optimizer, scheduler=sched, scaler=scaler, loader_rng=train_loader.generator,
            )
        if on_epoch_end is not None:
            on_epoch_end(history)
        if val_loss < best_loss:
            best_loss, stale = val_loss, 0
        else:
            stale += 1
            if early_stopping_patience is not None and stale >= early_stopping_patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    if hasattr(on_epoch_end, "end"):
        on_epoch_end.end(history)
    return history


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", *, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (N x C) and true labels (N) for every item of ``loader``, on the CPU."""
    device = torch.device(device)
    model.to(device).eval()
    probs, labels = [], []
    for x, y in tqdm(loader, desc="predict", leave=False, disable=not progress):
        probs.append(model(x.to(device)).float().softmax(1).cpu())
        labels.append(y)
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
    """Top-k (class name, probability) pairs for each image."""
    device = torch.device(device)
    model.to(device).eval()
    batch = torch.stack([transform(img.convert("RGB")) for img in images]).to(device)
    probs = model(batch).float().softmax(1).cpu()
    top = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [
        [(classes[i], float(p)) for p, i in zip(values, indices)]
        for values, indices in zip(top.values, top.indices)
    ]


# --- cached features ---------------------------------------------------------------------------


def below_head_frozen(model: nn.Module) -> bool:
    """True if every parameter outside ``model.head`` is frozen."""
    head = {id(p) for p in model.head.parameters()}
    return not any(p.requires_grad for p in model.parameters() if id(p) not in head)


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", *, progress: bool = True) -> TensorDataset:
    """Run everything below the head once over ``loader``: a TensorDataset of (features, labels) on the CPU."""
    if not is_deterministic(getattr(loader.dataset, "transform", None)):
        raise ValueError(
            "The loader's transform is random (augmentation): cached features would freeze one random "
            "view of each image. Use the eval transform for feature extraction, or train without caching."
        )
    device = torch.device(device)
    model.to(device).eval()
    amp_dtype = _amp_dtype(device)
    feats, labels = [], []
    for x, y in tqdm(loader, desc="features", leave=False, disable=not progress):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            feats.append(model.forward_features(x.to(device, non_blocking=True)).float().cpu())
        labels.append(y)
    return TensorDataset(torch.cat(feats), torch.cat(labels))


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
    return fit(model.head, train_loader, val_loader, epochs=epochs, **fit_kwargs)

