"""Checkpoints: one file with everything needed to resume training exactly, written atomically, loaded safely."""

from __future__ import annotations

import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._io import SaveError, torch_save_atomically, user_path
from ._version import __version__
from .models import create_model
from .transforms import _check_image_size

FORMAT = "tlkit-checkpoint-1"
_REQUIRED_KEYS = ("model", "classes", "backbone", "weights", "epoch", "history", "optimizer", "scheduler", "scaler", "rng", "tlkit_version")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit the model it is loaded into."""


class CheckpointSaveError(SaveError):
    """A checkpoint (or cache file) could not be written: a folder that cannot be written, a full disk.

    Raised inside ``fit``, its ``history`` holds the complete epochs of the run (None elsewhere).
    """


@dataclass
class Checkpoint:
    """The contents of a checkpoint file, as plain Python objects."""

    model: dict[str, torch.Tensor]
    classes: list[str]
    backbone: str
    weights: str | None
    epoch: int
    history: dict[str, list]
    optimizer: dict | None = None
    scheduler: dict | None = None
    scaler: dict | None = None
    rng: dict[str, Any] | None = None
    loader_rng: torch.Tensor | None = None
    tlkit_version: str = ""
    image_size: int | None = None  # the size the model was trained at; None in checkpoints that do not say


def rng_states() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what ``rng_states`` returned."""
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = states["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    classes: list[str],
    epoch: int,
    history: dict[str, list] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    loader_rng: torch.Generator | None = None,
    image_size: int | None = None,
) -> Path:
    """Write a checkpoint atomically: to a temporary file in the same folder, then renamed over ``path``.

    An interrupted save leaves the previous file at ``path`` untouched. ``loader_rng`` is the
    train loader's generator, whose state decides the next epoch's shuffling order. ``image_size``, the size the
    model was trained at, is what ``python -m tlkit.predict`` resizes new images to unless told otherwise.
    """
    if image_size is not None:
        _check_image_size(image_size)
    payload = {
        "format": FORMAT,
        "tlkit_version": __version__,
        "model": model.state_dict(),
        "classes": list(classes),
        "backbone": getattr(model, "backbone", type(model).__name__),
        "weights": getattr(model, "weights", None),
        "epoch": int(epoch),
        "history": history or {},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states(),
        "loader_rng": loader_rng.get_state() if loader_rng is not None else None,
        "image_size": int(image_size) if image_size is not None else None,
    }
    return save_atomically(payload, path)


def save_atomically(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to memory, then write the bytes atomically (``tlkit._io``): ``path`` is never half-written.

    The file gets the permissions a plain ``open(path, "w")`` would give it (the umask, or those of the file it
    replaces). A failure to write, a full disk included, is a ``CheckpointSaveError`` naming ``path``.
    """
    try:
        return torch_save_atomically(obj, path)
    except SaveError as err:
        raise CheckpointSaveError(str(err)) from err.__cause__


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint file with ``torch.load(weights_only=True)``: tensors and plain data only, never pickled code."""
    path = user_path(path)  # ~ as in a shell, as where the checkpoint was written
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}.")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused something that is not a tensor or plain data
        raise CheckpointError(
            f"{path} could not be loaded safely: it holds pickled Python objects ({_refused_part(err)}) that could run "
            f"code when loaded, and tlkit loads only tensors and plain data. It is not a tlkit checkpoint (or it was "
            f"altered): do not load it with torch.load(weights_only=False) unless you trust its source."
        ) from err
    except Exception as err:
        raise CheckpointError(
            f"{path} could not be loaded safely ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): "
            f"it is truncated or corrupted (e.g. an interrupted copy), or not a PyTorch file. Copy it again, or save a new one."
        ) from err
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tlkit checkpoint (expected format {FORMAT!r}); save it with tlkit.checkpoints.save_checkpoint.")
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise CheckpointError(f"{path} is an incomplete tlkit checkpoint (no {', '.join(missing)}); save it again with tlkit.checkpoints.save_checkpoint.")
    return Checkpoint(
        model=raw["model"], classes=raw["classes"], backbone=raw["backbone"], weights=raw["weights"],
        epoch=raw["epoch"], history=raw["history"], optimizer=raw["optimizer"], scheduler=raw["scheduler"],
        scaler=raw["scaler"], rng=raw["rng"], loader_rng=raw.get("loader_rng"), tlkit_version=raw["tlkit_version"],
        image_size=_saved_image_size(raw.get("image_size")),
    )


def _saved_image_size(value: Any) -> int | None:
    """The training size a checkpoint records; None when it records none (older checkpoints) or not a usable one."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def _refused_part(err: pickle.UnpicklingError) -> str:
    """The global or opcode torch's weights-only unpickler refused, from its error message."""
    found = re.search(r"GLOBAL ([\w.]+)|Unsupported operand (\d+)", str(err))
    if found is None:
        return "not tensors or plain data"
    return f"global {found.group(1)}" if found.group(1) else f"pickle opcode {found.group(2)}"


def check_compatible(ckpt: Checkpoint, model: nn.Module, classes: list[str] | None = None) -> None:
    """Raise CheckpointError saying what differs if ``ckpt`` does not fit ``model`` (and ``classes``)."""
    problems = []
    backbone = getattr(model, "backbone", type(model).__name__)
    if ckpt.backbone != backbone:
        problems.append(f"backbone: checkpoint has {ckpt.backbone!r}, model is {backbone!r}")
    if classes is not None and list(classes) != list(ckpt.classes):
        problems.append(f"classes: checkpoint has {ckpt.classes}, expected {list(classes)}")
    ours = model.state_dict()
    missing = sorted(set(ours) - set(ckpt.model))
    extra = sorted(set(ckpt.model) - set(ours))
    shapes = [f"{k}: {tuple(ckpt.model[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
              if k in ckpt.model and ckpt.model[k].shape != v.shape]
    if missing:
        problems.append(f"{len(missing)} tensors missing from the checkpoint (e.g. {missing[:3]})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors in the checkpoint (e.g. {extra[:3]})")
    if shapes:
        problems.append("shapes differ (checkpoint vs model): " + "; ".join(shapes[:3]))
    if problems:
        raise CheckpointError(
            "The checkpoint does not fit this model:\n- " + "\n- ".join(problems) + "\nBuild the model it was saved "
            "from (tlkit.model_from_checkpoint(path) does, from its backbone and classes), or train a new one."
        )


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    classes: list[str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = True,
) -> Checkpoint:
    """Load ``path`` into ``model`` (and optimizer, scheduler, scaler, RNG states) after checking they fit."""
    ckpt = read_checkpoint(path)
    check_compatible(ckpt, model, classes)
    model.load_state_dict(ckpt.model)
    for target, state, name in ((optimizer, ckpt.optimizer, "optimizer"), (scheduler, ckpt.scheduler, "scheduler"), (scaler, ckpt.scaler, "scaler")):
        if target is None:
            continue
        if state is None:
            raise CheckpointError(f"{path} holds no {name} state to resume from.")
        try:
            target.load_state_dict(state)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"The {name} state in {path} does not fit this {name}: {err}") from err
    if restore_rng and ckpt.rng is not None:
        set_rng_states(ckpt.rng)
    return ckpt


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the TransferModel a checkpoint was saved from (backbone, classes) and load its weights."""
    ckpt = read_checkpoint(path)
    model = create_model(ckpt.backbone, len(ckpt.classes), weights=None)
    head = ckpt.model.get("head.weight", ckpt.model.get("head.1.weight"))
    if head is None:
        raise CheckpointError(f"{path} has no head weights ('head.weight'): it was not saved from a tlkit model.")
    check_compatible(ckpt, model)
    model.load_state_dict(ckpt.model)
    model.weights = ckpt.weights
    return model, ckpt
