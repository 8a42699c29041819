"""The course notebooks' parameters: one spec per notebook, checked in its first code cell, so that a bad value
fails there, by name, instead of minutes into a run (the checks themselves are ``tlkit.params``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .augment import MIXES
from .data import check_dataset
from .finetune import BN_MODES, SCHEDULES, STRATEGIES
from .imbalance import REMEDIES
from .models import check_image_size
from .params import (
    Check,
    check_bool,
    check_float,
    check_int,
    check_parameters,
    check_seed_list,
    check_str,
    parse_list,
    rule,
    run_setting_checks,
)
from .transforms import PRESETS, TTA_VIEWS
from .tuning import CORRUPTIONS

_size = rule(check_int, minimum=1)
_size_or_none = rule(check_int, minimum=1, allow_none=True)
_count = rule(check_int, minimum=0)
_positive = rule(check_float, positive=True)
_text = check_str
_text_or_none = rule(check_str, allow_none=True)


def _common() -> dict[str, Check]:
    """Parameters every notebook has (tests/test_notebooks.py checks that they do)."""
    return {
        "dataset": lambda name, value: check_dataset(value, name),
        **run_setting_checks(),  # the same checks as tlkit.RunConfig's
        "seeds": check_seed_list,
        "device": _text,
        "results_path": _text_or_none,
        "data_root": _text,
        "output_dir": _text,
    }


def _notebook_01() -> dict[str, Check]:
    return {
        **_common(),
        "samples_per_class": _size_or_none,
        "data_curve": rule(parse_list, item=_size_or_none, example="[5, 10, 20, null]"),
        "larger_image_size": _size_or_none,
    }


def _notebook_02() -> dict[str, Check]:
    strategy = rule(check_str, choices=STRATEGIES)
    return {
        **_common(),
        "lr": rule(check_float, positive=True, allow_none=True),
        "samples_per_class": _size_or_none,
        "data_sizes": rule(parse_list, item=_size_or_none, example="[20, null]"),
        "depths": rule(parse_list, item=_count, example="[0, 1, 2, 3]"),
        "bn_modes": rule(parse_list, item=rule(check_str, choices=BN_MODES), example='["frozen", "recomputed"]'),
        "pytorch_epochs": _size,
        "strategy": strategy,
        "schedule": rule(check_str, choices=[s for s in SCHEDULES if s is not None], allow_none=True),
        "unfreeze": rule(parse_list, item=_text, example='["stage6"]'),
        "n_blocks": _size,
        "n_tensors": _size,
        "layer_decay": rule(check_float, positive=True, maximum=1.0),
        "weight_decays": rule(parse_list, item=rule(check_float, minimum=0.0), example="[0.01, 10.0]"),
        "l2_sp_strengths": rule(parse_list, item=rule(check_float, minimum=0.0), example="[10.0]"),
        "layer_decays": rule(parse_list, item=rule(check_float, positive=True, maximum=1.0), example="[0.5, 0.3]"),
        "unfreeze_every": _size,
        "head_epochs": _size,
        "conv_channels": _size,
    }


def _notebook_03() -> dict[str, Check]:
    return {
        **_common(),
        "epochs": rule(check_int, minimum=2),  # each run keeps its best-val epoch
        "augment": rule(check_str, choices=PRESETS),
        "hflip": rule(check_bool, allow_none=True),
        "mix": rule(check_str, choices=MIXES, allow_none=True),
        "samples_per_class": _size_or_none,
        "deep_up_to": _text,
        "deep_lr": _positive,
        "deep_epochs": rule(check_int, minimum=2),
        "tta": rule(check_str, choices=TTA_VIEWS, allow_none=True),
        "shift_seed": _count,
        "on_device": _on_device,
    }


def _on_device(name: str, value: Any) -> bool | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return check_bool(name, value)
    except ValueError:
        raise ValueError(f"{name} must be 'auto', True or False, got {value!r}.") from None


def _notebook_04() -> dict[str, Check]:
    remedy = rule(check_str, choices=list(REMEDIES))
    return {
        **_common(),
        "imbalance_ratio": rule(check_float, minimum=1.0, allow_none=True),
        "steep_ratio": rule(check_float, minimum=1.0, allow_none=True),
        "threshold_taus": rule(parse_list, item=rule(check_float, minimum=0.0), allow_empty=False, distinct=True,
                               example="[0, 0.5, 1, 1.5]"),
        "remedy": remedy,
        "remedies": rule(parse_list, item=remedy, example='["none", "class_weights"]'),
        "effective_number_beta": rule(check_float, minimum=0.0, below=1.0),
        "focal_gamma": rule(check_float, minimum=0.0),
        "logit_tau": rule(check_float, minimum=0.0),
        "weight_decay": rule(check_float, minimum=0.0),
        "decouple_blocks": rule(parse_list, item=_text, distinct=True, example='["top"]'),
    }


def _notebook_05() -> dict[str, Check]:
    return {
        **_common(),
        "old_classes": _size,
        "samples_per_class": _size,
        "new_sample_classes": _size,
        "new_samples_per_class": _size,
        "replay_per_class": _count,
        "continue_lr_factor": _positive,
        "continue_epochs": _size,
        "steps_per_epoch": _size,
        "patience": _size,
    }


def _notebook_06() -> dict[str, Check]:
    blocks = rule(parse_list, item=_text, allow_empty=False, distinct=True, example='["stage7", "top", "head"]')
    return {
        **_common(),
        "samples_per_class": _size_or_none,
        "probe_C": _positive,
        "ft_blocks": blocks,
        "lpft_lr": _positive,
        "shift_seed": _count,
        "few_seeds": check_seed_list,
        "peft_epochs": _size,
        "peft_lr": _positive,
        "corruptions": rule(parse_list, item=rule(check_str, choices=list(CORRUPTIONS)), allow_empty=False, distinct=True,
                            example='["gaussian_noise", "contrast"]'),
        "surgical_blocks": blocks,
        "surgical_image_size": _size,
        "target_per_class": _size,
        "surgical_epochs": _size,
        "surgical_lr": _positive,
    }


# Keyed by the notebook's number (its file name's prefix).
NOTEBOOK_SPECS: dict[str, Callable[[], dict[str, Check]]] = {
    "01": _notebook_01, "02": _notebook_02, "03": _notebook_03, "04": _notebook_04, "05": _notebook_05, "06": _notebook_06,
}


def notebook_spec(notebook: str) -> dict[str, Check]:
    """The parameter checks of course notebook ``notebook`` ('01' .. '06', or its file name)."""
    key = Path(str(notebook)).name[:2]
    if key not in NOTEBOOK_SPECS:
        raise ValueError(f"No parameter spec for notebook {notebook!r}; known: {', '.join(NOTEBOOK_SPECS)}.")
    return NOTEBOOK_SPECS[key]()


def check_notebook_parameters(notebook: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every parameter of course notebook ``notebook`` in ``values`` (its ``globals()``); the cleaned values.

    In the notebook's first code cell: ``globals().update(tlkit.check_notebook_parameters("01", globals()))``.
    Cross-parameter rules are checked as well (e.g. notebook 05's ``new_sample_classes <= old_classes``).
    """
    cleaned = check_parameters(values, notebook_spec(notebook))
    for check in _CROSS_CHECKS.get(Path(str(notebook)).name[:2], ()):
        check(cleaned)
    return cleaned


def _new_samples_within_old_classes(p: Mapping[str, Any]) -> None:
    if p["new_sample_classes"] > p["old_classes"]:
        raise ValueError(
            f"new_sample_classes ({p['new_sample_classes']}) must be at most old_classes ({p['old_classes']}): "
            f"new samples arrive for some of the known classes."
        )


def _image_size_fits_backbone(p: Mapping[str, Any]) -> None:
    check_image_size(p["backbone"], p["image_size"])


def _other_image_size_fits_backbone(name: str) -> Callable[[Mapping[str, Any]], None]:
    """The check that the image size in parameter ``name`` (None: not used) suits the backbone, naming that parameter."""
    def check(p: Mapping[str, Any]) -> None:
        if p[name] is not None:
            try:
                check_image_size(p["backbone"], p[name])
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
    return check


_CROSS_CHECKS: dict[str, Sequence[Callable[[Mapping[str, Any]], None]]] = {
    "01": (_image_size_fits_backbone, _other_image_size_fits_backbone("larger_image_size")),
    "02": (_image_size_fits_backbone,),
    "03": (_image_size_fits_backbone,),
    "04": (_image_size_fits_backbone,),
    "05": (_image_size_fits_backbone, _new_samples_within_old_classes),
    "06": (_image_size_fits_backbone, _other_image_size_fits_backbone("surgical_image_size")),
}
