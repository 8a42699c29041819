"""Choosing what to tune (notebook 06): which stage's features transfer, a linear probe as the start of fine-tuning
(LP-FT), parameter-efficient subsets (BitFit, BatchNorm scale and shift), and tuning one block under a shift of the
input (surgical fine-tuning), on photos corrupted here from the bundled ones.

Every run of this module keeps each BatchNorm layer on its ImageNet statistics (``FixedBatchNormStatistics``): with
20 photos per class, batch statistics would replace them (notebook 02 measures it). What trains is named by
``select_trainable``: the head, ``"bitfit"`` (every bias), ``"bn_affine"`` (every BatchNorm scale and shift), or a
list of blocks. Where the blocks below the first trainable one are frozen, training runs on their cached activations
(``tlkit.PrefixCache``), so tuning the top of the network costs seconds.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from ._runtime import amp_dtype, channels_last_batch, channels_last_model, with_progress
from .data import DatasetSplits, LabeledImages, _array_to_rgb, _source_fingerprint, make_loader
from .models import TransferModel, _check_names, block_names, create_model, head_linear
from .optim import make_optimizer
from .prefix_cache import PrefixCache, evaluate_from_prefix, prefix_boundary
from .train import History, fit, set_seed
from .transforms import eval_transform, resize_steps

# --- corrupted photos (ImageNet-C style, made here: no download) --------------------------------------

CORRUPTIONS: dict[str, str] = {
    "gaussian_noise": "Gaussian noise, standard deviation 0.25 on pixel values in [0, 1], new noise per photo",
    "blur": "Gaussian blur, standard deviation 2% of the side (2.6 pixels at 128)",
    "contrast": "contrast cut to 25%: every pixel pulled towards the photo's mean colour",
    "colour": "a colour cast: each of red, green and blue scaled by its own factor in [0.6, 1.4], drawn per photo",
}
NOISE_STD, BLUR_FRACTION, CONTRAST_KEPT, COLOUR_GAINS = 0.25, 0.02, 0.25, (0.6, 1.4)


def check_corruption(name: str) -> str:
    """``name`` if it is one of ``CORRUPTIONS``, else a ValueError that lists them."""
    if name not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption {name!r}; choose one of: {', '.join(CORRUPTIONS)}.")
    return name


def corrupt_pixels(pixels: np.ndarray, corruption: str, rng: np.random.Generator) -> np.ndarray:
    """``pixels`` (H, W, 3 floats in [0, 1]) under ``corruption``, clipped to [0, 1]; ``rng`` draws its random part."""
    check_corruption(corruption)
    if corruption == "gaussian_noise":
        out = pixels + rng.normal(0.0, NOISE_STD, size=pixels.shape)
    elif corruption == "blur":
        from scipy.ndimage import gaussian_filter  # scikit-learn's own dependency

        sigma = BLUR_FRACTION * min(pixels.shape[:2])
        out = gaussian_filter(pixels, sigma=(sigma, sigma, 0), mode="reflect")
    elif corruption == "contrast":
        mean = pixels.mean(axis=(0, 1), keepdims=True)
        out = mean + CONTRAST_KEPT * (pixels - mean)
    else:  # colour
        out = pixels * rng.uniform(*COLOUR_GAINS, size=(1, 1, 3))
    return np.clip(out, 0.0, 1.0)


def _corruption_rng(seed: int, corruption: str, source_index: int) -> np.random.Generator:
    # One stream per (seed, corruption, photo): a photo gets the same pixels in every subset and on every run.
    return np.random.default_rng([seed, list(CORRUPTIONS).index(corruption), source_index])


def corrupted_images(dataset: LabeledImages, corruption: str, size: int, *, seed: int = 0) -> LabeledImages:
    """``dataset``'s photos framed as the eval transform frames them (short side resized to ``size``, centre square),
    then corrupted once each (``CORRUPTIONS``), as ``size`` x ``size`` photos with the same labels.

    The random part of a corruption is drawn from ``seed`` and the photo's index in its source, so a photo looks the
    same in every subset that holds it and on every run. The result is held in memory (3 bytes a pixel) and has a
    fingerprint: the prefix and feature caches apply to it as to any dataset.
    """
    check_corruption(corruption)
    if len(dataset) == 0:
        raise ValueError(f"corrupted_images: the dataset is empty; give it a split with photos (e.g. splits.val) to corrupt with {corruption!r}.")
    frame = v2.Compose(resize_steps(size))
    sources = getattr(dataset, "indices", range(len(dataset)))
    pixels = []
    for i, source_index in enumerate(sources):
        clean = frame(dataset[i][0]).permute(1, 2, 0).numpy().astype(np.float64) / 255.0
        corrupted = corrupt_pixels(clean, corruption, _corruption_rng(seed, corruption, int(source_index)))
        pixels.append(np.round(corrupted * 255.0).astype(np.uint8))
    return LabeledImages(functools.partial(_array_to_rgb, np.stack(pixels)), dataset.targets, dataset.classes)


def corrupted_splits(splits: DatasetSplits, corruption: str, size: int, *, seed: int = 0, val_per_class: int | None = None) -> DatasetSplits:
    """Every split of ``splits`` under ``corruption`` (``corrupted_images``): the target task of surgical fine-tuning.
    ``val_per_class``: keep only that many validation photos per class (a few labelled target photos; the same ones
    for every ``splits``, drawn with seed 0), so that validating every epoch stays cheap."""
    val = splits.val if val_per_class is None else splits.val.limit_per_class(val_per_class, seed=0)
    test = None if splits.test is None else corrupted_images(splits.test, corruption, size, seed=seed)
    return DatasetSplits(f"{splits.name}, {corruption}", corrupted_images(splits.train, corruption, size, seed=seed),
                         corrupted_images(val, corruption, size, seed=seed), list(splits.classes), test)


# --- BatchNorm on fixed statistics, and what trains ----------------------------------------------------


class FixedBatchNormStatistics(nn.Module):
    """``model`` (a TransferModel, or the suffix of a ``PrefixCache``) for ``fit``, with every BatchNorm layer kept in
    eval mode when it is put in train mode: they normalise with ImageNet's running statistics and never update them,
    while their scale and shift can still train (``"bn_affine"``). In PyTorch: ``model.train()``, then ``bn.eval()``
    for each BatchNorm layer, before every epoch. Same parameters as ``model``: training it trains ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def head(self) -> nn.Module:
        return self.model.head

    def train(self, mode: bool = True) -> FixedBatchNormStatistics:
        super().train(mode)  # the model's own train() first (a PrefixCache's suffix follows the model's boundary there)
        for bn in _batchnorm_layers(self.model):
            bn.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


PARAMETER_SETS = {
    "head": "the new head alone (a linear probe when it trains on frozen features)",
    "bitfit": "every bias of the network and the head (BitFit, Ben Zaken et al. 2022); here the biases are BatchNorm shifts",
    "bn_affine": "every BatchNorm scale and shift, and the head",
}


def _batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def select_trainable(model: TransferModel, what: str | Sequence[str]) -> TransferModel:
    """Make exactly ``what`` trainable and freeze everything else: ``"head"``, ``"bitfit"`` (every bias, and the
    head), ``"bn_affine"`` (every BatchNorm scale and shift, and the head), or a list of block names
    (``tlkit.block_names(model)``), which train alone: ``["stem"]`` leaves the head as it is."""
    model.requires_grad_(False)
    if isinstance(what, str) and what in PARAMETER_SETS:
        model.head.requires_grad_(True)
        if what == "bitfit":
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.requires_grad_(True)
        elif what == "bn_affine":
            for bn in _batchnorm_layers(model):
                for p in bn.parameters():
                    p.requires_grad_(True)
    elif isinstance(what, str):
        raise ValueError(f"Unknown parameter set {what!r}: choose one of {', '.join(PARAMETER_SETS)}, or a list of block names "
                         f"such as ['stage7', 'top', 'head'] (the blocks: {block_names(model)}).")
    else:
        blocks = model.blocks()
        if not list(what):
            raise ValueError(f"select_trainable: no block named; give at least one of {block_names(model)}.")
        for name in _check_names(model, what):
            blocks[name].requires_grad_(True)
    return model.train(model.training)  # frozen blocks back to eval mode


def trainable_count(model: nn.Module) -> int:
    """Parameters that train (``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def strategy_label(what: str | Sequence[str]) -> str:
    """A short name for a parameter set: ``"bitfit"``, or the blocks joined by ``+`` (``"stage7+top+head"``)."""
    return what if isinstance(what, str) else "+".join(what)


# --- features of every stage, and linear probes on them ------------------------------------------------


@dataclass
class StageFeatures:
    """The global-average-pooled output of every stage for each photo of a dataset: ``features[stage]`` is (N, C)."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    source_indices: list[int]
    seconds: float = 0.0
    source: str | None = None  # what identifies the photos' source (files, pixels), to check that a subset is drawn from it
    _same_source: set[int] = field(default_factory=set, repr=False)  # loaders already checked against ``source``

    @property
    def stages(self) -> list[str]:
        return list(self.features)

    def of(self, dataset: LabeledImages, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) at ``stage`` of the photos of ``dataset``, a subset of the dataset these were computed on
        (e.g. ``lesson.splits(s).train`` of ``lesson.splits(s, None).train``)."""
        if stage not in self.features:
            raise KeyError(f"No features for stage {stage!r}; the stages are {self.stages}.")
        row = {j: r for r, j in enumerate(self.source_indices)}
        missing = [j for j in dataset.indices if j not in row]
        if missing or not self._drawn_from_source(dataset):
            raise ValueError(f"The {len(dataset)} photos are not all among the {len(row)} these features were computed on: compute them "
                             f"on the whole split (e.g. lesson.splits(seed, samples_per_class=None).train), then pick its subsets.")
        rows = torch.as_tensor([row[j] for j in dataset.indices], dtype=torch.long)
        return self.features[stage][rows], self.labels[rows]

    def _drawn_from_source(self, dataset: LabeledImages) -> bool:
        load = getattr(dataset, "_load", None)
        if self.source is None or load is None or id(load) in self._same_source:
            return True
        if _source_fingerprint(load) != self.source:
            return False
        self._same_source.add(id(load))
        return True


@torch.no_grad()
def stage_features(model: TransferModel, dataset: LabeledImages, *, image_size: int, batch_size: int = 64,
                   device: torch.device | str = "cpu", stages: Sequence[str] | None = None, progress: bool = False) -> StageFeatures:
    """One forward pass over ``dataset`` (eval transform, eval mode) that keeps the global-average-pooled output of
    each of ``stages`` (default: every block of ``model.features``); the last block's is the head's input. In PyTorch:
    ``for name, stage in model.features.named_children(): x = stage(x); pooled[name] = x.mean(dim=(2, 3))``."""
    names = [n for n, _ in model.features.named_children()]
    wanted = names if stages is None else [s for s in stages]
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise ValueError(f"Unknown stage(s) {unknown}; the stages of {model.backbone} are {names}.")
    start = time.perf_counter()
    device = torch.device(device)
    channels_last_model(model.to(device)).eval()  # as every loop of tlkit runs: faster convolutions, the same numbers
    loader = make_loader(dataset, eval_transform(image_size, model.normalization), batch_size, shuffle=False)
    kept: dict[str, list[torch.Tensor]] = {s: [] for s in wanted}
    labels = []
    dtype = amp_dtype(device)
    for x, y in with_progress(loader, "features of every stage", progress):
        x = channels_last_batch(x.to(device))
        for name, stage in model.features.named_children():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                x = stage(x)
            if name in kept:
                kept[name].append(x.float().mean(dim=(2, 3)).cpu())
            if name == wanted[-1]:
                break
        labels.append(y)
    load = getattr(dataset, "_load", None)
    return StageFeatures({s: torch.cat(v) for s, v in kept.items()}, torch.cat(labels), list(getattr(dataset, "indices", range(len(dataset)))),
                         time.perf_counter() - start, None if load is None else _source_fingerprint(load))


def fit_probe(features: torch.Tensor, labels: torch.Tensor, *, num_classes: int, C: float = 1.0, max_iter: int = 2000) -> nn.Linear:
    """A converged linear probe: L2-regularised multinomial logistic regression (scikit-learn, lbfgs) on standardised
    ``features``, returned as an ``nn.Linear`` on the raw features (the standardisation folded into its weights), so it
    can be a network's head. ``C``: the inverse regularisation strength (smaller: smaller weights)."""
    from sklearn.linear_model import LogisticRegression

    if not (isinstance(C, (int, float)) and C > 0 and math.isfinite(C)):
        raise ValueError(f"C must be a positive number (the inverse of the L2 strength; 1.0 is scikit-learn's default), got {C!r}.")
    x, y = features.double().numpy(), labels.numpy()
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError(f"fit_probe needs photos of at least 2 classes, got only class {present.tolist()}.")
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0  # a constant feature carries nothing; leave it unscaled
    lr = LogisticRegression(C=C, max_iter=max_iter).fit((x - mean) / std, y)
    coef, intercept = lr.coef_, lr.intercept_
    if len(present) == 2:  # scikit-learn's binary form: one logit for the second class against the first
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight = np.zeros((num_classes, x.shape[1]))
    bias = np.full(num_classes, -1e4)  # a class absent from the training photos is never predicted
    weight[present], bias[present] = coef / std, intercept - (coef / std) @ mean
    probe = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        probe.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        probe.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return probe


def probe_accuracy(train: StageFeatures, val: StageFeatures, stage: str, train_photos: LabeledImages, *, C: float = 1.0) -> dict[str, float]:
    """Validation accuracy of a linear probe (``fit_probe``) on ``stage``'s pooled features of ``train_photos`` (a
    subset of the photos ``train`` was computed on), and the seconds the fit took."""
    start = time.perf_counter()
    x, y = train.of(train_photos, stage)
    probe = fit_probe(x, y, num_classes=len(train_photos.classes), C=C)
    with torch.no_grad():
        acc = (probe(val.features[stage]).argmax(1) == val.labels).float().mean().item()
    return {"val_acc": acc, "seconds": time.perf_counter() - start}


# --- runs -------------------------------------------------------------------------------------------


class Settings(Protocol):
    """What the runs read from a ``tlkit.RunConfig`` (``lesson.config``, varied with ``config.replace``)."""

    backbone: str
    weights: str | None
    image_size: int
    batch_size: int
    epochs: int
    lr: float
    seed: int
    device: Any
    progress: bool
    cache_dir: str | Path | None


@dataclass
class TuningRun:
    """One run: the model, its history (empty for a probe, which trains no further), seconds, trainable parameters and
    numbers (``"val_acc"``: the last epoch's validation accuracy). Read by ``tlkit.compare_arms`` like a RunResult."""

    name: str
    model: TransferModel
    history: History
    seconds: float
    trainable_params: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def val_acc(self) -> float:
        return self.metrics["val_acc"]


def with_head(model: TransferModel, head: nn.Linear) -> TransferModel:
    """``model`` with its head's last linear layer set to a copy of ``head``'s weights (e.g. a probe from ``fit_probe``)."""
    target = head_linear(model)
    if target.weight.shape != head.weight.shape:
        raise ValueError(f"The head has weights of shape {tuple(head.weight.shape)}, the model's head {tuple(target.weight.shape)} "
                         f"(classes x features): fit the probe on this backbone's features for these classes.")
    with torch.no_grad():
        target.weight.copy_(head.weight)
        target.bias.copy_(head.bias)
    return model


def _new_model(config: Settings, num_classes: int, head: nn.Linear | None) -> TransferModel:
    set_seed(config.seed)  # the fresh head's initialisation
    model = create_model(config.backbone, num_classes, config.weights)
    return model if head is None else with_head(model, head)


def probe_run(config: Settings, splits: DatasetSplits, head: nn.Linear, *, name: str = "probe") -> TuningRun:
    """The pretrained network, frozen, with ``head`` (e.g. a converged probe): nothing trains any more; its validation
    accuracy (the frozen features are read from ``config.cache_dir`` when they were computed before). Its
    ``trainable_params`` are the head's, which the probe fitted."""
    start = time.perf_counter()
    model = _frozen(_new_model(config, len(splits.classes), head))
    loader = make_loader(splits.val, eval_transform(config.image_size, model.normalization), config.batch_size, shuffle=False)
    acc = evaluate_from_prefix(model, loader, config.device, cache_dir=config.cache_dir)["acc"]
    fitted = sum(p.numel() for p in model.head.parameters())  # what the probe fitted, for comparisons by size
    return TuningRun(name, model, History(), time.perf_counter() - start, fitted, {"val_acc": acc})


def _frozen(model: TransferModel) -> TransferModel:
    model.requires_grad_(False)
    return model.train(model.training)


def tune(config: Settings, splits: DatasetSplits, what: str | Sequence[str], *, head: nn.Linear | None = None,
         name: str = "") -> TuningRun:
    """Train ``what`` (``select_trainable``) of a pretrained ``config.backbone`` for ``config.epochs`` epochs at
    ``config.lr`` (AdamW, no weight decay) on ``splits.train``, BatchNorm on ImageNet's statistics throughout.

    ``head``: start from these head weights (LP-FT: a converged probe from ``fit_probe``); None: a new head drawn from
    ``config.seed``. When the blocks below the first trainable one are frozen, they run once over the photos
    (``tlkit.PrefixCache``, on disk in ``config.cache_dir``) and each epoch runs only the blocks above.
    """
    model = select_trainable(_new_model(config, len(splits.classes), head), what)
    device = torch.device(config.device)
    model.to(device)
    transform = eval_transform(config.image_size, model.normalization)
    bs = config.batch_size
    train_loader = make_loader(splits.train, transform, bs, shuffle=True, seed=config.seed)
    val_loader = make_loader(splits.val, transform, bs, shuffle=False)
    stepper: nn.Module = model
    start = time.perf_counter()
    if prefix_boundary(model) is not None:
        cache = PrefixCache(model, {"train": make_loader(splits.train, transform, bs, shuffle=False), "val": val_loader}, device,
                            cache_dir=config.cache_dir, progress=config.progress, report=False)
        stepper, train_loader, val_loader = cache.suffix, cache.loader("train", bs, shuffle=True, seed=config.seed), cache.loader("val", bs, shuffle=False)
    history = fit(FixedBatchNormStatistics(stepper), train_loader, val_loader, epochs=config.epochs, optimizer=make_optimizer(model, config.lr),
                  device=device, progress=config.progress)
    return TuningRun(name or strategy_label(what), model, history, time.perf_counter() - start, trainable_count(model),
                     {"val_acc": history.val_acc[-1], "train_loss": history.train_loss[-1]})
