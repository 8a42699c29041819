"""Checks for notebook parameters, so that a bad value fails in the first code cell, naming the parameter,
instead of minutes into a run.

papermill's ``-p name value`` turns ``5``, ``1e-3``, ``True`` and ``None`` into Python values but passes
everything else, lists included, as text (``-p data_curve '[5, 10]'`` gives the string ``'[5, 10]'``), as
does ``-r``. So every check here also accepts its value as text: a list as JSON or Python (``[5, 10, null]``,
``[5, 10, None]``) or comma-separated (``5,10``), a number as ``5`` or ``1e-3``, ``None``/``null`` where
None is allowed. ``-y 'data_curve: [5, 10]'`` (YAML) passes real lists and needs no parsing.

Each ``check_*`` function takes the parameter's name (for the message) and its value and returns the cleaned
value or raises ``ValueError``. ``check_parameters(values, spec)`` runs a whole spec;
the specs of the course's notebooks live in ``tlkit.notebook_params``.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's seeds are 32-bit
_NONE_TEXT = ("none", "null")

Check = Callable[[str, Any], Any]


def _papermill_hint(name: str, example: str) -> str:
    return f"with papermill, pass it as -y '{name}: {example}' (YAML) or as text, -r {name} '{example}'"


def _from_text(value: Any) -> Any:
    """``value`` parsed as JSON or as a Python literal when it is text that reads as one; else ``value`` unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in _NONE_TEXT:
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return value


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_TEXT)


def _none_note(allow_none: bool) -> str:
    return " (or None)" if allow_none else ""


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None, allow_none: bool = False) -> int | None:
    """``value`` as a whole number in [minimum, maximum] (text such as ``'5'`` is read as a number)."""
    if allow_none and _is_none(value):
        return None
    if maximum is None:
        wanted = "a whole number" + (f" of at least {minimum}" if minimum is not None else "")
    else:
        wanted = f"a whole number between {minimum} and {maximum}" if minimum is not None else f"a whole number of at most {maximum}"
    parsed = _from_text(value)
    if isinstance(parsed, bool) or not isinstance(parsed, numbers.Integral):
        raise ValueError(f"{name} must be {wanted}{_none_note(allow_none)}, got {value!r}.")
    parsed = int(parsed)
    if (minimum is not None and parsed < minimum) or (maximum is not None and parsed > maximum):
        raise ValueError(f"{name} must be {wanted}{_none_note(allow_none)}, got {parsed}.")
    return parsed


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    below: float | None = None,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a finite number: > 0 if ``positive``, >= ``minimum``, <= ``maximum``, < ``below``."""
    if allow_none and _is_none(value):
        return None
    parsed = _from_text(value)
    if isinstance(parsed, bool) or not isinstance(parsed, numbers.Real) or parsed != parsed or abs(parsed) == float("inf"):
        raise ValueError(f"{name} must be a number{_none_note(allow_none)}, got {value!r}.")
    parsed = float(parsed)
    bounds = [(f">= {limit:g}", parsed >= limit) for limit in [minimum] if limit is not None]
    bounds += [(f"<= {limit:g}", parsed <= limit) for limit in [maximum] if limit is not None]
    bounds += [(f"< {limit:g}", parsed < limit) for limit in [below] if limit is not None]
    if (positive and not parsed > 0) or not all(ok for _, ok in bounds):
        rules = " and ".join(rule for rule, _ in bounds)
        what = ("a positive number" if positive else "a number") + (f" {rules}" if rules else "")
        raise ValueError(f"{name} must be {what}{_none_note(allow_none)}, got {parsed:g}.")
    return parsed


def check_learning_rate(name: str, value: Any) -> float:
    """``value`` as a learning rate given in Python (not text): a finite number above 0.

    ``value > 0`` alone lets ``inf`` through, and an infinite (or nan) learning rate turns every weight into nan at
    the first optimizer step, which training would otherwise carry on with.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(
            f"{name} must be a positive number, got {value!r}: a learning rate must be finite (with {name}={value!r} "
            f"the first optimizer step turns every weight into nan); typical values are 1e-5 to 1e-1."
        )
    if not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    return float(value)


def check_weight_decay(name: str, value: Any) -> float:
    """``value`` as a weight decay given in Python (not text): a finite number of at least 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of at least 0 (0: no weight decay; typical 0.01 to 0.1), got {value!r}.")
    return float(value)


def check_bool(name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    """``value`` as True or False (text ``'True'``/``'false'`` too)."""
    if allow_none and _is_none(value):
        return None
    parsed = {"true": True, "false": False}.get(value.strip().lower(), value) if isinstance(value, str) else value
    if not isinstance(parsed, bool):
        raise ValueError(f"{name} must be True or False{_none_note(allow_none)}, got {value!r}.")
    return parsed


def check_str(
    name: str, value: Any, *, choices: Iterable[str] | None = None, allow_empty: bool = False, allow_none: bool = False
) -> str | None:
    """``value`` as a string: non-empty unless ``allow_empty``, one of ``choices`` if given."""
    if allow_none and _is_none(value):
        return None
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        what = "one of: " + ", ".join(map(str, choices)) if choices is not None else "a non-empty text"
        raise ValueError(f"{name} must be {what}{_none_note(allow_none)}, got {value!r}.")
    if choices is not None and value not in tuple(choices):
        raise ValueError(f"Unknown {name} {value!r}; choose one of: {', '.join(map(str, choices))}{_none_note(allow_none)}.")
    return value


def check_seed(name: str, value: Any) -> int:
    """``value`` as a seed: a whole number between 0 and 2**32 - 1 (NumPy's range)."""
    parsed = _from_text(value)
    if isinstance(parsed, bool) or not isinstance(parsed, numbers.Integral) or not 0 <= parsed <= SEED_MAX:
        raise ValueError(
            f"{name} must be a whole number between 0 and 2**32 - 1 = {SEED_MAX} (the seeds NumPy accepts), got {value!r}."
        )
    return int(parsed)


def _as_list(name: str, value: Any, example: str) -> list:
    parsed = _from_text(value)
    if isinstance(parsed, str) and "," in parsed and not any(c in parsed for c in "[](){}\"'"):
        # Neither JSON nor Python: plain comma-separated items ("5,10", "head, full"), each read as a value where it can be.
        parsed = [_from_text(part.strip()) for part in parsed.split(",")]
    if isinstance(parsed, tuple):
        parsed = list(parsed)
    if not isinstance(parsed, list):
        kind = "text that does not read as a list" if isinstance(value, str) else f"a single {type(value).__name__}"
        raise ValueError(f"{name} must be a list such as {example}, got {value!r} ({kind}); {_papermill_hint(name, example)}.")
    return parsed


def parse_list(
    name: str,
    value: Any,
    *,
    item: Check | None = None,
    allow_empty: bool = True,
    distinct: bool = False,
    example: str = "[5, 10]",
) -> list:
    """``value`` as a list (a list, or text: ``'[5, 10]'``, ``'5,10'``), each item cleaned by ``item(f'{name}[i]', v)``."""
    items = _as_list(name, value, example)
    if not items and not allow_empty:
        raise ValueError(f"{name} must not be empty: give at least one item, e.g. {example}.")
    if item is not None:
        items = [item(f"{name}[{i}]", v) for i, v in enumerate(items)]
    if distinct:
        repeated = sorted({repr(v) for v in items if items.count(v) > 1})
        if repeated:
            raise ValueError(f"{name} must not repeat items, got {items!r} ({', '.join(repeated)} more than once).")
    return items


def check_seed_list(name: str, value: Any, *, allow_empty: bool = False) -> list[int]:
    """``value`` as a list of distinct seeds (each 0 .. 2**32 - 1); text such as ``'[0, 1, 2]'`` or ``'0,1,2'`` is parsed."""
    return parse_list(name, value, item=check_seed, allow_empty=allow_empty, distinct=True, example="[0, 1, 2]")


def parse_dict(name: str, value: Any, *, item: Check | None = None, example: str = '{"top": 0.5}') -> dict:
    """``value`` as a dict with text keys (a dict, or JSON / Python text), each value cleaned by ``item(f'{name}[key]', v)``."""
    parsed = _from_text(value)
    if not isinstance(parsed, dict) or not all(isinstance(k, str) for k in parsed):
        raise ValueError(
            f"{name} must be a mapping of names to values such as {example}, got {value!r}; "
            f"{_papermill_hint(name, example)}."
        )
    return parsed if item is None else {k: item(f"{name}[{k!r}]", v) for k, v in parsed.items()}


def rule(check: Callable[..., Any], **options: Any) -> Check:
    """``check`` with its options fixed, for a spec: ``rule(check_int, minimum=1)`` is a ``(name, value) -> value``."""
    return functools.partial(check, **options)


def run_setting_checks() -> dict[str, Check]:
    """The one check of each setting every run shares, for ``tlkit.RunConfig`` and the notebooks' parameters alike:
    backbone, weights, image size, batch size, epochs, learning rate, seed, progress bars. (Whether ``image_size``
    suits the backbone is checked where both are known: ``RunConfig`` and notebook 01's spec.)"""
    return {
        "backbone": check_str,
        "weights": rule(check_str, allow_none=True),
        "image_size": rule(check_int, minimum=1),
        "batch_size": rule(check_int, minimum=1),
        "epochs": rule(check_int, minimum=1),
        "lr": rule(check_float, positive=True),
        "seed": check_seed,
        "progress": check_bool,
    }


def check_parameters(values: Mapping[str, Any], spec: Mapping[str, Check]) -> dict[str, Any]:
    """Run ``spec[name](name, values[name])`` for every name of ``spec``; the cleaned values, by name.

    ``values`` may hold more names than the spec (a notebook passes ``globals()``). A name of the spec that
    ``values`` lacks is an error too: the spec and the parameters cell have drifted apart.
    """
    missing = [name for name in spec if name not in values]
    if missing:
        raise KeyError(f"Parameters {missing} are checked but not set: define them in the parameters cell or drop them from the spec.")
    return {name: check(name, values[name]) for name, check in spec.items()}


def resolve_path(path: str | Path, base: str | Path | None = None) -> Path:
    """Where ``path`` points: a relative one is taken relative to ``base``, by default the course's notebooks folder.

    The notebooks' defaults (``output_dir = "../outputs"``, ``data_root = "../data"``) are relative to
    ``notebooks/``: Jupyter runs a notebook there, but papermill runs it in the folder it was started from,
    where ``../outputs`` would be outside the repository. Without ``base`` and outside a checkout of the
    course (tlkit installed on its own), the current folder is the base. An absolute ``path`` is kept; a
    relative one comes back relative to the current folder (``../outputs`` run from ``notebooks/``,
    ``outputs`` from the repository root), so that what a notebook prints stays short and the same on
    every machine.
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    if base is None:
        course_notebooks = Path(__file__).resolve().parents[1] / "notebooks"
        base = course_notebooks if course_notebooks.is_dir() else Path.cwd()
    target = (Path(base).expanduser().resolve() / path).resolve()
    try:
        return Path(os.path.relpath(target, Path.cwd()))
    except ValueError:  # another drive (Windows): no relative path exists
        return target
