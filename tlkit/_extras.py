"""Optional dependencies: imported where they are used, with an error that says which extra installs them.

``import tlkit`` needs only what ``pyproject.toml`` lists as dependencies; the course and the sweeps (papermill,
filelock), the freeze panel (ipywidgets) and the cluster (distributed) come as extras.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA_OF = {"papermill": "course", "nbformat": "course", "filelock": "course", "tabulate": "course",
            "ipywidgets": "widgets", "distributed": "cluster"}


class MissingExtraError(ModuleNotFoundError):
    """An optional package that a tlkit feature needs is not installed; the message says how to install it."""


def require(module: str, feature: str) -> ModuleType:
    """``module`` imported, or ``MissingExtraError`` naming ``feature``, the package and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        extra = EXTRA_OF.get(package)
        how = f"pip install 'tlkit[{extra}]' (or pip install {package})" if extra else f"pip install {package}"
        raise MissingExtraError(f"{feature} needs the optional package {package!r}, which is not installed: {how}. "
                                f"In a checkout of the course, make course installs every extra.", name=package) from err
