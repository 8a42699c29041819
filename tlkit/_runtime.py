"""How tensors run on the device, for every loop of the package: mixed precision, channels_last, progress bars.

``fit``, ``evaluate``, ``predict``, feature extraction and the prefix cache all run batches the same way through these,
so the same weights give the same numbers on every path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm


def with_progress(loader: Iterable, desc: str, progress: bool) -> Iterator:
    """Iterate ``loader`` once under a tqdm bar updated by hand.

    tqdm.auto's bar calls ``iter()`` on what it wraps when it is created: for a DataLoader that is a
    second pass, which draws from its shuffling generator (other batches than the loader gives alone)
    and starts its workers once more.
    """
    try:
        total = len(loader)
    except TypeError:  # a DataLoader over an iterable dataset without a length
        total = None
    with tqdm(total=total, desc=desc, leave=False, disable=not progress) as bar:
        for batch in loader:
            yield batch
            bar.update()


def amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def channels_last_model(model: nn.Module) -> nn.Module:
    """``model`` with its 4-D weights in channels_last: convolutions run faster so on GPUs and on CPUs (oneDNN), as
    ``bench/channels_last.py`` measures; ``fit``, ``evaluate``, ``predict`` and feature extraction all use it, so the
    same weights give the same numbers on every path."""
    return model.to(memory_format=torch.channels_last)


def channels_last_batch(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
