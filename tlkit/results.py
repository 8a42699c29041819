"""The metrics file a notebook writes for batch runs: one flat JSON object of numbers and strings."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from ._io import write_text_atomically


def write_results(path: str | Path | None, metrics: Mapping[str, object]) -> dict[str, float | int | str]:
    """Check that ``metrics`` is flat (numbers and strings, accuracies in [0, 1]) and write it as JSON to ``path``."""
    flat: dict[str, float | int | str] = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):  # numpy / torch scalars
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(f"results[{key!r}] = {value!r}: only numbers and strings go into the results file.")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"results[{key!r}] is {value}: not a finite number.")
        if "acc" in key and isinstance(value, (int, float)):
            low = -1.0 if "_minus_" in key else 0.0  # a paired difference of two accuracies lies in [-1, 1]
            if not low <= value <= 1.0:
                what = "differences of accuracies are in [-1, 1]" if low < 0 else "accuracies are fractions in [0, 1]"
                raise ValueError(f"results[{key!r}] = {value}: {what}.")
        flat[key] = value
    if path:
        write_text_atomically(path, json.dumps(flat, indent=2, sort_keys=True) + "\n")  # never a 0-byte file on a full disk
    return flat
