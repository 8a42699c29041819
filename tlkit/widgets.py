"""An ipywidgets panel to choose which blocks train, with per-block learning rates, Find LR, Train and Reset buttons.

The state logic lives in plain methods (``set_block``, ``summary``, ``param_groups``, ``make_optimizer``,
``prepare_optimizer``, ``find_lr``, ``train``, ``reset``) so it runs and is tested without a browser; the widgets
only call them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch.utils.data import DataLoader

from ._extras import require
from .lr_finder import LRFinderResult, lr_find
from .models import TransferModel, block_names, parameter_counts, set_trainable, trainable_blocks
from .optim import lr_multipliers, make_optimizer, param_groups
from .plots import LiveCurves, plot_lr_find
from .train import History, TrainingInterrupted, fit

# The multiplier box fits the longest value it can hold: 4 significant digits down to its minimum 1e-6, which the
# browser writes as "0.000001234" (11 characters; JavaScript switches to "1e-7" notation only below 1e-6).
MULTIPLIER_MIN, MULTIPLIER_MAX, MULTIPLIER_DIGITS = 1e-6, 100.0, 4
# "lr ×", then the box: 11 characters of JupyterLab's 13px font (99 px with the padding, measured in Chromium by
# tests/test_browser.py), the label's margin and the border, with room to spare.
MULTIPLIER_LABEL_PX, MULTIPLIER_INPUT_PX = 32, 120


class FreezePanel:
    """The model's blocks in order, a toggle each (pressed = trains), the trainable share, an LR multiplier per block,
    Train and Reset buttons.

    Display it as the last expression of a cell. Toggling a block calls ``tlkit.set_trainable``
    at once (frozen blocks go to eval mode); the layer-decay slider refills the multipliers
    (``layer_decay ** k`` for the block k places below the head), which can then be edited one
    by one. Find LR runs ``tlkit.lr_find`` (``lr_find_steps`` steps on the training loader, the
    panel's blocks and multipliers, everything put back afterwards) and sets the head-LR slider to
    its suggestion, rounded to 3 significant digits. Train runs ``tlkit.fit`` on the given loaders
    with an AdamW over one param group per trainable block, and draws the curves live.

    Each Train continues the model, the history (``resume_from``) and the optimizer: the first Train
    builds the AdamW; a later one keeps it and its state (Adam's moments and step counts), adds the
    blocks unfrozen since as new param groups (as ``GradualUnfreezing`` does), and sets every
    group's LR to the current head lr times its block's multiplier. A block frozen again keeps its
    group and its Adam state, but its parameters have ``requires_grad=False`` and get no gradient,
    so AdamW leaves them exactly as they are (no step, no weight decay); unfrozen once more, it
    continues with its kept moments. An interrupt ends a Train after the last complete epoch,
    which the history keeps. Reset puts back the weights and buffers (BatchNorm statistics) the
    model had when the panel was built, which parameters trained and the BatchNorm checkbox, and
    drops the optimizer and the history; the LR settings and epochs stay as they are.
    """

    def __init__(
        self,
        model: TransferModel,
        train_loader: DataLoader | None = None,
        val_loader: DataLoader | None = None,
        *,
        lr: float = 1e-3,
        layer_decay: float = 1.0,
        epochs: int = 3,
        device: torch.device | str = "cpu",
        save_path: str | Path | None = None,
        lr_find_steps: int = 50,
    ) -> None:
        w = require("ipywidgets", "tlkit.FreezePanel")

        _check_transfer_model(model)
        self.model, self.train_loader, self.val_loader = model, train_loader, val_loader
        self.device, self.save_path, self.lr_find_steps = device, save_path, lr_find_steps
        self.history: History | None = None
        self.lr_finder: LRFinderResult | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        # What Reset puts back; the weights on the CPU so that a GPU model does not hold them twice in GPU memory.
        self._start_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self._start_requires_grad = [p.requires_grad for p in model.parameters()]
        self._start_bn_frozen = model.eval_frozen_blocks
        self._start_blocks = trains = set(trainable_blocks(model))
        counts = parameter_counts(model)
        multipliers = lr_multipliers(model, layer_decay)
        self.toggles = {n: w.ToggleButton(value=n in trains, description=n, layout=w.Layout(width="110px")) for n in block_names(model)}
        self.multipliers = {
            n: w.BoundedFloatText(value=_significant(multipliers[n], MULTIPLIER_DIGITS), min=MULTIPLIER_MIN, max=MULTIPLIER_MAX,
                                  step=0.1, description="lr ×", style={"description_width": f"{MULTIPLIER_LABEL_PX}px"},
                                  layout=w.Layout(width=f"{MULTIPLIER_LABEL_PX + MULTIPLIER_INPUT_PX}px"))
            for n in block_names(model)
        }
        self.lr_labels = {n: w.Label() for n in block_names(model)}
        # ".3g" shows a small LR whole (0.000316, 1e-06); values set from Python are kept exactly, not snapped to step.
        self.lr = w.FloatLogSlider(value=lr, base=10, min=-6, max=0, step=0.1, description="head lr", readout_format=".3g")
        self.layer_decay = w.FloatSlider(value=layer_decay, min=0.05, max=1.0, step=0.05, description="layer decay")
        self.epochs = w.BoundedIntText(value=epochs, min=1, max=1000, description="epochs", layout=w.Layout(width="160px"))
        self.bn_frozen = w.Checkbox(value=model.eval_frozen_blocks, description="frozen blocks keep their BatchNorm statistics (eval mode)",
                                    layout=w.Layout(width="auto"))
        self.summary_html = w.HTML()
        self.train_button = w.Button(description="Train", button_style="primary", disabled=train_loader is None or val_loader is None,
                                     tooltip="tlkit.fit with the blocks and learning rates chosen above")
        self.reset_button = w.Button(description="Reset", tooltip="back to the weights and frozen blocks the panel started with; "
                                     "drops the optimizer and the history")
        self.find_lr_button = w.Button(description="Find LR", disabled=train_loader is None,
                                       tooltip="tlkit.lr_find with these blocks and multipliers; sets the head lr to its suggestion")
        self.output = w.Output()
        rows = [
            w.HBox([self.toggles[n], w.Label(f"{sum(counts[n].values()):>12,} params", layout=w.Layout(width="150px")),
                    self.multipliers[n], self.lr_labels[n]])
            for n in block_names(model)
        ]
        for name, toggle in self.toggles.items():
            toggle.observe(lambda change, name=name: self.set_block(name, change["new"]), names="value")
        for box in self.multipliers.values():
            box.observe(lambda change: self.refresh(), names="value")
        self.lr.observe(lambda change: self.refresh(), names="value")
        self.layer_decay.observe(lambda change: self.apply_layer_decay(change["new"]), names="value")
        self.bn_frozen.observe(lambda change: self.set_bn_frozen(change["new"]), names="value")
        self.train_button.on_click(lambda button: self._run_for_button("Train", self.train))
        self.reset_button.on_click(lambda button: self.reset())
        self.find_lr_button.on_click(lambda button: self._run_for_button("Find LR", self.find_lr))
        self.widget = w.VBox([
            w.HTML("<b>Blocks, input to output</b> (pressed = trains; lr = head lr × multiplier)"),
            *rows, self.summary_html, w.HBox([self.lr, self.find_lr_button, self.layer_decay]), self.bn_frozen,
            w.HBox([self.epochs, self.train_button, self.reset_button]), self.output,
        ])
        self.widget.add_class("tlkit-freeze-panel")  # for the browser test and custom CSS
        self.refresh()

    def _run_for_button(self, action: str, run: Callable[[], object]) -> None:
        """Run a button's action and show a problem the user can fix (nothing trainable, a nan loss, a file that
        cannot be written) in the panel: raised from a button's callback it would reach only Jupyter's log console,
        and the button would seem dead."""
        try:
            run()
        except (ValueError, FloatingPointError, OSError) as err:
            self.show_message(f"{action}: {err}")

    def show_message(self, text: str) -> None:
        """Replace what the panel's output area shows with ``text``."""
        self.output.outputs = ()  # clear_output() needs a kernel to clear anything; this works with and without one
        self.output.append_stderr(f"{text}\n")

    # --- state logic (no widgets needed to call these) ---

    def set_block(self, name: str, trainable: bool) -> None:
        """Make block ``name`` train or freeze it (and keep its toggle in step)."""
        set_trainable(self.model, [name], trainable)
        if self.toggles[name].value != trainable:
            self.toggles[name].value = trainable  # its observer calls set_block again: a no-op
        self.refresh()

    def set_bn_frozen(self, frozen: bool) -> None:
        """Keep frozen blocks in eval mode (True) or let their BatchNorm train like the rest (False)."""
        self.model.eval_frozen_blocks = frozen
        self.model.train(self.model.training)
        self.refresh()

    def apply_layer_decay(self, layer_decay: float) -> None:
        """Set every block's LR multiplier to ``layer_decay ** k`` (k = places below the head)."""
        for name, mult in lr_multipliers(self.model, layer_decay).items():
            self.multipliers[name].value = _significant(mult, MULTIPLIER_DIGITS)  # fits the box, also for small ones (0.5 ** 12)
        self.refresh()

    def lr_mult(self) -> dict[str, float]:
        """The LR multiplier of every block, as set in the panel."""
        return {name: box.value for name, box in self.multipliers.items()}

    def summary(self) -> dict[str, float]:
        """Trainable and frozen parameter counts and the trainable share."""
        total = parameter_counts(self.model)["total"]
        all_params = total["trainable"] + total["frozen"]
        return {"trainable": total["trainable"], "frozen": total["frozen"], "share": total["trainable"] / max(all_params, 1)}

    def param_groups(self) -> list[dict]:
        """The optimizer param groups the panel's choice gives: one per trainable block, head first."""
        return param_groups(self.model, self.lr.value, lr_mult=self.lr_mult())

    def make_optimizer(self) -> torch.optim.AdamW:
        """AdamW over ``param_groups()``."""
        return make_optimizer(self.model, self.lr.value, lr_mult=self.lr_mult())

    def prepare_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer the next Train uses: built on the first call (``make_optimizer``), then the same object, its
        state kept, with the blocks made trainable since added as param groups and every group's LR set to the head
        lr times its block's multiplier as the panel shows them now."""
        if not trainable_blocks(self.model):
            raise ValueError("The model has no trainable parameters: press at least the head's toggle (it trains the head).")
        if self.optimizer is None:
            self.optimizer = self.make_optimizer()
            return self.optimizer
        lr, lr_mult = self.lr.value, self.lr_mult()
        groups = {g["name"]: g for g in self.optimizer.param_groups}
        held = [p for g in self.optimizer.param_groups for p in g["params"]]
        for group in param_groups(self.model, lr, lr_mult=lr_mult, exclude=held):  # blocks unfrozen since the last Train
            if group["name"] in groups:  # a block that trained in part now trains whole: AdamW starts their state lazily
                groups[group["name"]]["params"].extend(group["params"])
            else:
                self.optimizer.add_param_group(group)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * lr_mult[group["name"]]
        return self.optimizer

    def find_lr(self) -> LRFinderResult:
        """Run the LR range test on the training loader with the panel's choice and put its suggestion in the head-LR slider."""
        if self.train_loader is None:
            raise ValueError("FreezePanel needs a train_loader to find the LR: FreezePanel(model, train_loader, val_loader).")
        if not trainable_blocks(self.model):
            raise ValueError("The model has no trainable parameters: press at least the head's toggle (Find LR sweeps the blocks that train).")
        self.model.to(self.device)  # where Train would put it
        self.lr_finder = lr_find(self.model, self.train_loader, lr_mult=self.lr_mult(), num_steps=self.lr_find_steps)
        self.lr.value = _significant(self.lr_finder.suggestion, 3)  # the slider's readout shows it whole
        with self.output:
            self.output.clear_output(wait=True)
            from IPython.display import display  # ipywidgets' own dependency

            fig = plot_lr_find(self.lr_finder, f"trainable: {', '.join(trainable_blocks(self.model))}")
            display(fig)
            plt.close(fig)
            print(f"head lr set to {self.lr.value:.3g} ({self.lr_finder.rule})")
        self.refresh()
        return self.lr_finder

    def train(self) -> History:
        """Train with the current choice for ``epochs`` epochs, continuing the model, the optimizer and the history;
        curves drawn live."""
        if self.train_loader is None or self.val_loader is None:
            raise ValueError("FreezePanel needs train_loader and val_loader to train: FreezePanel(model, train_loader, val_loader).")
        self.prepare_optimizer()
        with self.output:
            self.output.clear_output(wait=True)
            try:
                self.history = fit(
                    self.model, self.train_loader, self.val_loader, epochs=self.epochs.value, optimizer=self.optimizer,
                    device=self.device, progress=False, resume_from=self.history,
                    callbacks=[LiveCurves(f"trainable: {', '.join(trainable_blocks(self.model))}", self.save_path)],
                )
            except TrainingInterrupted as stopped:  # a panel button: keep the complete epochs, raise nothing
                self.history = stopped.history
                print(stopped, flush=True)
        self.refresh()
        return self.history

    def reset(self) -> None:
        """Put back the starting weights and buffers, which parameters train and the BatchNorm checkbox; drop the
        optimizer and the history (the next Train starts afresh at epoch 1)."""
        self.model.load_state_dict(self._start_state)  # copies into the model's own tensors, on its device
        for name, toggle in self.toggles.items():
            toggle.value = name in self._start_blocks
        for param, trains in zip(self.model.parameters(), self._start_requires_grad):
            param.requires_grad_(trains)  # exactly, also for a block that trained only in part
        self.bn_frozen.value = self._start_bn_frozen
        self.model.eval_frozen_blocks = self._start_bn_frozen
        self.model.train(self.model.training)  # frozen blocks back in eval mode
        self.optimizer, self.history = None, None
        self.output.clear_output()
        self.refresh()

    def refresh(self) -> None:
        """Redraw the summary line and each block's effective learning rate."""
        s = self.summary()
        trains = set(trainable_blocks(self.model))
        for name, label in self.lr_labels.items():
            label.value = f"lr {self.lr.value * self.multipliers[name].value:.3g}" if name in trains else "frozen"
        last = f"; last val acc {self.history.val_acc[-1]:.3f}" if self.history else ""
        groups = f" · optimizer groups {', '.join(g['name'] for g in self.optimizer.param_groups)}" if self.optimizer else ""
        self.summary_html.value = (
            f"trainable <b>{s['trainable']:,}</b> ({s['share']:.1%}) · frozen {s['frozen']:,} ({1 - s['share']:.1%}){last}{groups}"
        )

    def _repr_mimebundle_(self, **kwargs) -> dict:
        return self.widget._repr_mimebundle_(**kwargs)


def _check_transfer_model(model: object) -> None:
    """The panel toggles a TransferModel's named blocks: refuse anything else before building a widget."""
    if isinstance(model, TransferModel):
        return
    raise TypeError(
        f"FreezePanel needs a tlkit.TransferModel, whose named blocks (stem, stages, head) it freezes and unfreezes, "
        f"got {type(model).__name__}. Build the model with tlkit.create_model(backbone, num_classes), e.g. "
        f"tlkit.create_model('efficientnet_lite0', 3), or wrap your own parts in tlkit.TransferModel(features, pool, "
        f"head, ...) with features an nn.Sequential of the blocks to toggle."
    )


def _significant(value: float, digits: int) -> float:
    """``value`` rounded to ``digits`` significant digits (round(x, 4) would turn 0.00024 into 0.0002)."""
    return float(f"{value:.{digits}g}")
