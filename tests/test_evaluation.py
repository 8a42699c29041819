"""Scoring trained models: calibration (ECE, the reliability table, temperature scaling) and test-time augmentation."""

import pytest
import torch

import tlkit
from tlkit.metrics import calibration_error, fit_temperature, negative_log_likelihood, reliability_table, scale


def overconfident(n: int = 400, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities from logits 3x too sharp: right 70% of the time at a much higher stated confidence."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), labels] += 1.5  # the true class usually wins
    return torch.softmax(3.0 * logits, dim=1), labels


def test_ece_is_zero_for_honest_confidence_and_large_for_overconfident():
    labels = torch.tensor([0, 1] * 50)
    honest = torch.tensor([[0.5, 0.5]]).repeat(100, 1)  # 50% confident, right half of the time
    assert calibration_error(honest, labels) == pytest.approx(0.0, abs=1e-6)
    probs, labels = overconfident()
    confidence = probs.max(1).values.mean().item()
    accuracy = (probs.argmax(1) == labels).float().mean().item()
    assert calibration_error(probs, labels) > 0.1 and confidence - accuracy > 0.1


def test_temperature_scaling_softens_an_overconfident_model_and_keeps_its_predictions():
    probs, labels = overconfident()
    temperature = fit_temperature(probs, labels)
    assert temperature == pytest.approx(3.0, rel=0.25)  # it undoes the 3x sharpening
    scaled = scale(probs, temperature)
    assert torch.equal(scaled.argmax(1), probs.argmax(1))
    assert calibration_error(scaled, labels) < calibration_error(probs, labels) / 2
    assert negative_log_likelihood(scaled, labels) < negative_log_likelihood(probs, labels)
    assert torch.allclose(scale(probs, 1.0), probs, atol=1e-5)


def test_reliability_table_counts_every_prediction_once_in_its_bin():
    probs, labels = overconfident()
    table = reliability_table(probs, labels, n_bins=10)
    assert table["count"].sum() == len(labels)
    assert ((table["confidence"] > table["low"]) & (table["confidence"] <= table["high"])).all()
    weighted_gap = ((table["confidence"] - table["accuracy"]).abs() * table["count"]).sum() / len(labels)
    assert weighted_gap == pytest.approx(calibration_error(probs, labels, n_bins=10), abs=1e-5)  # ECE, bin by bin


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="N x C"):
        calibration_error(torch.ones(3), torch.zeros(3, dtype=torch.long))


def test_calibrate_fits_on_one_split_and_scores_another(split_folder):
    from tlkit.evaluation import calibrate

    splits = tlkit.load_dataset(str(split_folder))
    config = tlkit.RunConfig(image_size=32, batch_size=8, epochs=3, lr=1e-2, seed=0)
    run = tlkit.linear_probe(config, splits)
    result = calibrate(run.model, splits.val, splits.val, config)
    assert result.temperature > 0 and 0 <= result.ece <= 1 and 0 <= result.ece_scaled <= 1
    assert result.nll_scaled <= result.nll + 1e-6  # fitted on the split it is scored on: it cannot do worse
    assert result.accuracy == pytest.approx(tlkit.evaluate_on(run.model, splits.val, config)["acc"])


def test_tta_views_are_deterministic_mirrors_and_corners(split_folder):
    from PIL import Image

    from tlkit.transforms import is_deterministic, tta_transforms

    norm = tlkit.create_model("efficientnet_lite0", 2).normalization
    image = Image.new("RGB", (40, 30))
    image.putpixel((0, 0), (255, 0, 0))  # a red top-left corner pixel
    flip = tta_transforms(32, norm, "flip")
    crops = tta_transforms(32, norm, "flip_crops")
    assert len(flip) == 2 and len(crops) == 10 and all(is_deterministic(v) for v in crops)  # so the feature cache serves them
    plain, mirrored = (v(image) for v in flip)
    assert torch.allclose(mirrored, plain.flip(-1))
    assert repr(crops) == repr(tta_transforms(32, norm, "flip_crops"))  # cache keys stay the same from run to run
    with pytest.raises(ValueError, match="Unknown test-time views"):
        tta_transforms(32, norm, "rotate")


def test_tta_accuracy_averages_the_views(split_folder):
    from tlkit.evaluation import predict_on, predict_tta, tta_accuracy
    from tlkit.transforms import tta_transforms

    splits = tlkit.load_dataset(str(split_folder))
    config = tlkit.RunConfig(image_size=32, batch_size=8, epochs=2, lr=1e-2, seed=0)
    model = tlkit.linear_probe(config, splits).model
    probs, labels = predict_tta(model, splits.val, config, "flip")
    views = [predict_on(model, splits.val, config, v)[0] for v in tta_transforms(32, model.normalization, "flip")]
    assert torch.allclose(probs, (views[0] + views[1]) / 2)
    assert tta_accuracy(model, splits.val, config, "flip") == pytest.approx(float((probs.argmax(1) == labels).float().mean()))
