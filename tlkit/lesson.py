"""One call sets a course notebook up: checked parameters, seed, device, folders and the shared run config.

    lesson = tlkit.start_lesson("01", globals())

replaces the setup every notebook used to repeat: each parameter of the notebook's ``parameters`` cell is checked
(a bad value fails here, by name), the cleaned values are written back into the notebook's namespace (so
``seeds`` given as text by papermill becomes a list), paths are resolved against the notebooks folder, the seed is
set and the device chosen in one place.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from .data import DatasetSplits, load_dataset
from .notebook_params import check_notebook_parameters
from .params import resolve_path
from .plots import save_figure
from .recipes import RunConfig
from .train import get_device, set_seed


@dataclass
class Lesson:
    """What a notebook's cells share: the device, the run config, where figures, caches and results go."""

    notebook: str
    device: torch.device
    config: RunConfig
    figures: Path
    cache_dir: Path
    results_path: Path | None
    dataset: str = "clothing"
    data_root: Path = Path("data")
    samples_per_class: int | None = None
    # A dataset without a test split (a plain folder of class folders, digits) gets one carved out: this share of each
    # class, drawn with a fixed seed (tlkit.data.carve_splits), so every notebook can report on a test split.
    test_fraction: float = 0.2

    def splits(self, seed: int | None = None, samples_per_class: int | None | str = "default") -> DatasetSplits:
        """The notebook's dataset split by ``seed`` (default: the config's), with ``samples_per_class`` training
        images per class (default: the notebook's parameter; None keeps them all). A dataset without a test split gets
        ``test_fraction`` of each class as one, the same images for every seed (``splits.test_source`` says so)."""
        per_class = self.samples_per_class if samples_per_class == "default" else samples_per_class
        return load_dataset(self.dataset, data_root=self.data_root, seed=self.config.seed if seed is None else seed,
                            samples_per_class=per_class, test_fraction=self.test_fraction)

    def save(self, fig: Figure, name: str) -> None:
        """Save ``fig`` as ``name`` in this notebook's figures folder (atomically). Returns nothing, so that a cell
        ending with it shows only the figure."""
        save_figure(fig, self.figures / name)


def start_lesson(notebook: str, namespace: MutableMapping[str, Any]) -> Lesson:
    """Check notebook ``notebook``'s parameters in ``namespace`` (its ``globals()``), write the cleaned values back,
    set the seed, choose the device and build the run config every recipe of the notebook shares."""
    namespace.update(check_notebook_parameters(notebook, namespace))
    for name in ("output_dir", "data_root"):
        if name in namespace:
            namespace[name] = resolve_path(namespace[name])  # relative to notebooks/, wherever the run started
    if namespace.get("results_path"):
        namespace["results_path"] = resolve_path(namespace["results_path"])
    set_seed(namespace["seed"])
    device = get_device(namespace.get("device", "auto"))
    output_dir = Path(namespace.get("output_dir", "outputs"))
    cache_dir = output_dir / "cache"  # one folder for the feature and prefix caches of every notebook
    # lr = None: the notebook measures its learning rate (the LR finder) before it trains; RunConfig's default until then
    chosen = {k: v for k, v in namespace.items() if not (k == "lr" and v is None)}
    config = RunConfig.from_parameters(chosen, device=device, cache_dir=cache_dir)
    return Lesson(notebook, device, config, output_dir / "figures" / notebook, cache_dir, namespace.get("results_path") or None,
                  dataset=namespace.get("dataset", "clothing"), data_root=Path(namespace.get("data_root", "data")),
                  samples_per_class=namespace.get("samples_per_class"))
