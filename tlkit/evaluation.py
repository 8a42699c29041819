"""Scoring trained models on a split: their probabilities there (from the cached features when the backbone is
frozen), test-time augmentation (the probabilities averaged over deterministic views of each image), and calibration
with temperature scaling fitted on validation and scored on test (the metrics themselves are ``tlkit.metrics``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .data import make_loader
from .features import cached_features
from .metrics import N_BINS, calibration_error, fit_temperature, negative_log_likelihood, scale
from .models import TransferModel, below_head_frozen
from .recipes import RunConfig
from .train import predict
from .transforms import eval_transform, tta_transforms


def predict_on(model: TransferModel, dataset: Dataset, config: RunConfig, transform=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (N x C) and labels of ``model`` on ``dataset`` with ``transform`` (default: the eval
    transform); a model whose backbone is frozen runs on its cached features (``config.cache_dir``), as
    ``tlkit.evaluate_on`` does."""
    transform = eval_transform(config.image_size, model.normalization) if transform is None else transform
    loader = make_loader(dataset, transform, config.batch_size, shuffle=False)
    if below_head_frozen(model):
        features = cached_features(model, loader, config.device, cache_dir=config.cache_dir, progress=False)
        return predict(model.head, make_loader(features, None, config.batch_size, shuffle=False), config.device)
    return predict(model, loader, config.device)


def predict_tta(model: TransferModel, dataset: Dataset, config: RunConfig, views: str = "flip") -> tuple[torch.Tensor, torch.Tensor]:
    """Test-time augmentation: the class probabilities averaged over the deterministic ``views`` of every image
    (``tlkit.transforms.tta_transforms``: "flip", 2 views, or "flip_crops", 10), and the labels."""
    outputs = [predict_on(model, dataset, config, view) for view in tta_transforms(config.image_size, model.normalization, views)]
    return torch.stack([probs for probs, _ in outputs]).mean(dim=0), outputs[0][1]


def tta_accuracy(model: TransferModel, dataset: Dataset, config: RunConfig, views: str = "flip") -> float:
    """Accuracy of ``model`` on ``dataset`` with test-time augmentation over ``views`` (see ``predict_tta``)."""
    probs, labels = predict_tta(model, dataset, config, views)
    return float((probs.argmax(1) == labels).float().mean())


@dataclass
class Calibration:
    """A model's calibration on one split before and after temperature scaling (T fitted on another split)."""

    temperature: float
    ece: float
    ece_scaled: float
    nll: float
    nll_scaled: float
    accuracy: float  # the same before and after: scaling keeps every prediction

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def calibrate(model: TransferModel, fit_on: Dataset, score_on: Dataset, config: RunConfig, n_bins: int = N_BINS) -> Calibration:
    """Fit a temperature on ``fit_on`` (validation) and score ECE and NLL on ``score_on`` (test) with and without it."""
    temperature = fit_temperature(*predict_on(model, fit_on, config))
    probs, labels = predict_on(model, score_on, config)
    scaled = scale(probs, temperature)
    return Calibration(temperature, calibration_error(probs, labels, n_bins), calibration_error(scaled, labels, n_bins),
                       negative_log_likelihood(probs, labels), negative_log_likelihood(scaled, labels),
                       float((probs.argmax(1) == labels).float().mean()))
