"""Mean ± std over seeds, the tie rule and the sentences that rank methods."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

import tlkit
import tlkit.compare
from tlkit.compare import is_tie


def runs(values: dict[str, list[float]], metric: str = "val acc") -> list[dict]:
    return [{"run": name, "seed": seed, metric: v} for name, vs in values.items() for seed, v in enumerate(vs)]


def test_summarize_seeds_gives_mean_sample_std_and_count_in_first_seen_order():
    summary = tlkit.summarize_seeds(runs({"b": [0.5, 0.7], "a": [0.9, 0.9, 0.6]}), "run", ["val acc"])
    assert list(summary.index) == ["b", "a"]
    assert summary.loc["b", "val acc"] == pytest.approx(0.6)
    assert summary.loc["b", "val acc std"] == pytest.approx(0.1414, abs=1e-4)
    assert summary.loc["a", "seeds"] == 3
    shown = tlkit.mean_std_table(summary, ["val acc"])
    assert shown.loc["b", "val acc"] == "0.600 ± 0.141"


def test_one_seed_has_zero_spread_and_says_so():
    summary = tlkit.summarize_seeds(runs({"a": [0.8], "b": [0.7]}), "run", ["val acc"])
    assert summary.loc["a", "val acc std"] == 0.0
    sentence = tlkit.versus_sentence(summary, "a", "b", "val acc")
    assert "on one seed" in sentence and "run more seeds" in sentence
    assert "beats" not in sentence and "more than the spread" not in sentence  # no verdict without a spread


def test_tie_rule_uses_the_larger_spread():
    assert is_tie(0.80, 0.01, 0.78, 0.03)
    assert not is_tie(0.80, 0.01, 0.78, 0.015)


def test_versus_sentence_follows_the_order_and_the_tie():
    clear = tlkit.summarize_seeds(runs({"pre": [0.74, 0.75, 0.73], "rand": [0.24, 0.25, 0.26]}), "run", ["val acc"])
    assert tlkit.versus_sentence(clear, "rand", "pre", "val acc").startswith("pre (0.740 ± 0.010) beats rand")
    assert "by 49.0 points" in tlkit.versus_sentence(clear, "pre", "rand", "val acc")
    flipped = tlkit.summarize_seeds(runs({"pre": [0.24, 0.25, 0.26], "rand": [0.74, 0.75, 0.73]}), "run", ["val acc"])
    assert tlkit.versus_sentence(flipped, "pre", "rand", "val acc").startswith("rand (0.740")
    close = tlkit.summarize_seeds(runs({"pre": [0.70, 0.76, 0.73], "rand": [0.72, 0.71, 0.73]}), "run", ["val acc"])
    sentence = tlkit.versus_sentence(close, "pre", "rand", "val acc")
    assert " tie " in sentence and "beats" not in sentence


def test_lower_is_better_reverses_the_winner():
    summary = tlkit.summarize_seeds(runs({"a": [1.0, 1.1], "b": [2.0, 2.1]}, "loss"), "run", ["loss"])
    assert tlkit.versus_sentence(summary, "b", "a", "loss", higher_is_better=False).startswith("a (1.050")
    assert tlkit.ranking_sentence(summary, "loss", higher_is_better=False).startswith("Lowest mean loss over 2 seeds: a")


def test_ranking_sentence_names_the_best_its_ties_and_the_beaten():
    summary = tlkit.summarize_seeds(
        runs({"head": [0.70, 0.71, 0.72], "last": [0.80, 0.82, 0.81], "full": [0.79, 0.83, 0.75]}), "run", ["val acc"])
    sentence = tlkit.ranking_sentence(summary, "val acc")
    assert sentence.startswith("Highest mean val acc over 3 seeds: last (0.810")
    assert "tied with it: full" in sentence
    assert "It beats head by 10.0 points." in sentence
    apart = tlkit.summarize_seeds(runs({"head": [0.70, 0.71, 0.72], "last": [0.80, 0.81, 0.82]}), "run", ["val acc"])
    assert "No other method is within its spread." in tlkit.ranking_sentence(apart, "val acc")


def test_headline_metrics_pair_each_mean_with_its_std():
    summary = tlkit.summarize_seeds(runs({"pretrained, frozen + head": [0.7, 0.8]}), "run", ["val acc"])
    flat = tlkit.headline_metrics(summary, "val acc", "val_acc")
    assert flat == {"val_acc_pretrained_frozen_head": pytest.approx(0.75),
                    "val_acc_pretrained_frozen_head_std": pytest.approx(0.0707, abs=1e-4)}


@pytest.mark.parametrize("bad", [3, "0,1,2", [], [0, 0], [-1], [1.5], [True]])
def test_bad_seeds_say_how_to_pass_them(bad):
    with pytest.raises(ValueError, match="seeds must"):
        tlkit.compare.check_seeds(bad)


def test_missing_metric_is_named():
    with pytest.raises(KeyError, match="val acc"):
        tlkit.summarize_seeds([{"run": "a"}], "run", ["val acc"])


def test_ranking_sentence_names_methods_run_on_fewer_seeds():
    rows = runs({"pre": [0.74, 0.75, 0.73], "rand": [0.24, 0.25, 0.26]}) + [{"run": "scratch", "seed": 0, "val acc": 0.18}]
    sentence = tlkit.ranking_sentence(tlkit.summarize_seeds(rows, "run", ["val acc"]), "val acc")
    assert sentence.startswith("Highest mean val acc over 3 seeds (fewer for scratch: 1): pre (0.740")


# --- budgets and learning curves ------------------------------------------------------------------------


def test_optimizer_steps_count_the_last_smaller_batch():
    assert tlkit.compare.optimizer_steps(30, 50, 32) == 60  # 32 + 18 per epoch
    assert tlkit.compare.optimizer_steps(30, 200, 32) == 210  # 6 x 32 + 8
    assert tlkit.compare.optimizer_steps(4, 64, 32) == 8
    assert tlkit.compare.optimizer_steps(0, 64, 32) == 0
    for bad in (dict(epochs=2.5), dict(train_size=-1), dict(batch_size=0), dict(epochs=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tlkit.compare.optimizer_steps(**{**dict(epochs=1, train_size=10, batch_size=4), **bad})


def test_late_gain_compares_the_best_of_the_last_part_with_the_best_before():
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert tlkit.compare.late_gain(rising) == pytest.approx(0.2)  # last quarter: 0.7, 0.8 vs best before 0.6
    flat = [0.1, 0.5, 0.6, 0.6, 0.58, 0.6, 0.59, 0.6]
    assert tlkit.compare.late_gain(flat) == pytest.approx(0.0)
    assert tlkit.compare.late_gain([0.9, 0.5, 0.4, 0.3]) == pytest.approx(-0.6)  # fell back: negative
    assert tlkit.compare.late_gain(rising, last_fraction=0.5) == pytest.approx(0.4)
    assert tlkit.compare.late_gain([0.2, 0.3]) == pytest.approx(0.1)  # at least one value on each side
    with pytest.raises(ValueError, match="at least 2"):
        tlkit.compare.late_gain([0.5])
    with pytest.raises(ValueError, match="last_fraction"):
        tlkit.compare.late_gain(rising, last_fraction=1.0)


def test_plateau_sentence_tells_flattened_from_still_improving_curves():
    curves = {"plain": [[0.5, 0.7, 0.7, 0.7], [0.5, 0.6, 0.7, 0.69]], "augmented": [[0.3, 0.4, 0.5, 0.6], [0.3, 0.4, 0.5, 0.58]]}
    sentence = tlkit.compare.plateau_sentence(curves, "val acc", tolerance=0.01)
    plain, augmented = sentence.split("augmented:")
    assert plain.startswith("plain:") and "-0.5 points on average over 2 seeds" in plain and "flattened (within 1.0 points)" in plain
    assert "+9.0 points" in augmented and "(largest +10.0 points)" in augmented and "still improving" in augmented
    assert "flattened" in tlkit.compare.plateau_sentence({"augmented": curves["augmented"]}, "val acc", tolerance=0.1)
    with pytest.raises(ValueError, match="at least one method"):
        tlkit.compare.plateau_sentence({}, "val acc", tolerance=0.01)


# --- paired differences ---------------------------------------------------------------------------------------


def _runs(a: list[float], b: list[float]) -> list[dict]:
    return [{"run": "a", "seed": s, "acc": v} for s, v in enumerate(a)] + [{"run": "b", "seed": s, "acc": v} for s, v in enumerate(b)]


def test_a_steady_paired_gain_is_a_win_although_the_spreads_overlap():
    # b's seeds move far more than a's lead over b: unpaired, the spreads overlap; paired, a is ahead on every seed.
    a, b = [0.71, 0.81, 0.61], [0.70, 0.80, 0.60]
    diff = tlkit.compare.paired_difference(_runs(a, b), "run", "a", "b", "acc")
    assert diff.per_seed == pytest.approx({0: 0.01, 1: 0.01, 2: 0.01})
    assert diff.low == pytest.approx(0.01) and diff.high == pytest.approx(0.01)
    assert diff.sentence().startswith("a beats b on acc by 1.0 points (95% interval")
    summary = tlkit.summarize_seeds(_runs(a, b), "run", ["acc"])
    assert "tie" in tlkit.versus_sentence(summary, "a", "b", "acc")  # the unpaired rule could not see it


def test_the_interval_is_the_t_interval_over_seeds_and_a_zero_inside_is_a_tie():
    a, b = [0.644, 0.650, 0.638], [0.630, 0.633, 0.627]
    diff = tlkit.compare.paired_difference(_runs(a, b), "run", "a", "b", "acc")
    d = np.array(a) - np.array(b)
    half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert (diff.low, diff.high) == pytest.approx((d.mean() - half, d.mean() + half))
    noisy = tlkit.compare.paired_difference(_runs([0.70, 0.60, 0.66], [0.65, 0.66, 0.64]), "run", "a", "b", "acc")
    assert noisy.low < 0 < noisy.high and "tie" in noisy.sentence()
    assert "beats" in tlkit.compare.paired_difference(_runs([0.5, 0.6], [0.6, 0.7]), "run", "a", "b", "acc").sentence(
        higher_is_better=False)


def test_only_shared_seeds_are_paired_and_bad_input_is_named():
    rows = _runs([0.7, 0.8, 0.9], [0.6, 0.7]) + [{"run": "b", "seed": 5, "acc": 0.1}]
    assert tlkit.compare.paired_difference(rows, "run", "a", "b", "acc").seeds == 2
    with pytest.raises(KeyError, match="'c'"):
        tlkit.compare.paired_difference(rows, "run", "a", "c", "acc")
    with pytest.raises(ValueError, match="two runs"):
        tlkit.compare.paired_difference(rows + [{"run": "a", "seed": 0, "acc": 0.5}], "run", "a", "b", "acc")
    one = tlkit.compare.paired_difference(_runs([0.7], [0.6]), "run", "a", "b", "acc")
    assert math.isnan(one.low) and "one seed" in one.sentence()


# --- compare_arms: arms over seeds, paired verdicts --------------------------------------------------------


def _fake_run(gains: dict[str, float]):
    """A run whose accuracy is a seed effect (shared by every arm, large) plus the arm's own gain (small)."""
    seed_effect = {0: 0.60, 1: 0.70, 2: 0.65, 3: 0.75, 4: 0.62}

    def arm(gain: float):
        return lambda seed: {"val_acc": seed_effect[seed] + gain + 0.002 * (seed % 2), "seconds": 1.0}

    return {name: arm(gain) for name, gain in gains.items()}


def test_compare_arms_pairs_by_seed_where_the_spread_alone_would_call_a_tie():
    comparison = tlkit.compare_arms(_fake_run({"head": 0.0, "last block": 0.02, "same": 0.0}), [0, 1, 2, 3, 4])
    summary = comparison.summary(["val_acc"])
    # unpaired, the 2-point gain is far inside the 6-point spread the seeds cause: a "tie"
    assert summary.loc["last block", "val_acc std"] > 0.05
    assert "tie" in tlkit.versus_sentence(summary, "last block", "head", "val_acc")
    # paired, every seed gains 2 points
    last, same = comparison.differences().values()
    assert last.per_seed == pytest.approx(dict.fromkeys(range(5), 0.02)) and last.low > 0
    sentences = comparison.sentences()
    assert sentences[0].startswith("last block beats head on val_acc by 2.0 points (95% interval 2.0 to 2.0, paired over 5 seeds)")
    assert sentences[1].startswith("same and head tie on val_acc")
    assert comparison.ranking().startswith("Highest mean val_acc over 5 seeds: last block")
    assert "it beats head (+2.0 [+" in comparison.ranking()
    table = comparison.table()
    shown = table.loc["last block", "minus head"]
    assert shown.startswith("+2.0 [+") and shown.endswith("] points") and table.loc["head", "minus head"] == ""


def test_a_second_metric_scores_the_same_runs_and_results_are_flat_numbers():
    comparison = tlkit.compare_arms(_fake_run({"a": 0.0, "b": -0.05}), [0, 1, 2])
    test = comparison.with_metric("test_acc", lambda arm, seed, output: output["val_acc"] - 0.1)
    assert test.metric == "test_acc" and test.differences()["b"].mean == pytest.approx(-0.05)
    assert test.sentences()[0].startswith("a beats b on test_acc")
    results = test.results("test")
    assert results["test_a"] == pytest.approx(comparison.summary().loc["a", "val_acc"] - 0.1)
    assert results["test_b_minus_a"] == pytest.approx(-0.05) and results["test_b_minus_a_high"] < 0
    assert all(isinstance(v, float) for v in results.values())


def test_compare_arms_says_what_is_wrong_with_its_input():
    arms = _fake_run({"a": 0.0})
    with pytest.raises(KeyError, match=r"Arm 'a' on seed 0 returned no 'test_acc'; it returned \['seconds', 'val_acc'\]"):
        tlkit.compare_arms(arms, [0], metric="test_acc")
    with pytest.raises(ValueError, match="reference 'z' is not one of the arms"):
        tlkit.compare_arms(arms, [0], reference="z")
    with pytest.raises(TypeError, match="arms must map each arm's name to a function of the seed"):
        tlkit.compare_arms(["a"], [0])
    with pytest.raises(TypeError, match="must return a mapping of metrics"):
        tlkit.compare_arms({"a": lambda seed: 0.7}, [0])


def test_start_lesson_checks_parameters_and_builds_what_the_cells_share(tmp_path):
    namespace = {"dataset": "clothing", "backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": "96",
                 "batch_size": 16, "epochs": 3, "lr": 1e-3, "seed": 2, "seeds": "[0, 1]", "device": "cpu",
                 "results_path": str(tmp_path / "r.json"), "samples_per_class": 5,
                 "data_curve": [], "larger_image_size": None, "data_root": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"), "progress": False}
    lesson = tlkit.start_lesson("01", namespace)
    assert namespace["seeds"] == [0, 1] and namespace["image_size"] == 96  # cleaned values written back
    assert lesson.config.image_size == 96 and lesson.config.seed == 2 and lesson.device.type == "cpu"
    assert lesson.figures == tmp_path / "out" / "figures" / "01" and lesson.cache_dir == tmp_path / "out" / "cache"
    with pytest.raises(ValueError, match="batch_size"):
        tlkit.start_lesson("01", {**namespace, "batch_size": 0})


def test_the_winner_is_named_first_with_its_margin_as_a_positive_interval():
    d = tlkit.compare.paired_difference(_runs([0.50, 0.60, 0.55], [0.70, 0.79, 0.76]), "run", "a", "b", "acc")
    assert d.mean < 0 and d.high < 0
    sentence = d.sentence()
    assert sentence.startswith("b beats a on acc by 20.0 points (95% interval ")
    low, high = (float(x) for x in re.findall(r"interval ([\d.]+) to ([\d.]+), paired", sentence)[0])
    assert 0 < low < 20.0 < high and (low, high) == pytest.approx((-100 * d.high, -100 * d.low), abs=0.06)


def _trained(seed: int, gain: float) -> dict[str, float]:
    """A small real training run: a seeded linear model fitted for a few steps; its final loss as the metric."""
    torch.manual_seed(seed)
    x, y = torch.randn(64, 5), torch.randint(0, 2, (64,))
    model = torch.nn.Linear(5, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1 + gain)
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"val_acc": float((model(x).argmax(1) == y).float().mean()), "loss": loss.item(), "pid": os.getpid()}


def test_workers_run_the_arms_in_other_processes_with_the_numbers_of_the_serial_run():
    arms = {"slow": lambda s: _trained(s, 0.0), "fast": lambda s: _trained(s, 0.4)}  # lambdas: inherited, not pickled
    serial = tlkit.compare_arms(arms, [0, 1, 2])
    parallel = tlkit.compare_arms(arms, [0, 1, 2], workers=2)
    def numbers(comparison):
        return [{k: v for k, v in row.items() if k != "pid"} for row in comparison.rows]

    assert len(numbers(parallel)) == 6
    for one, other in zip(numbers(serial), numbers(parallel)):
        assert one == pytest.approx(other, abs=1e-6)
    assert {row["pid"] for row in serial.rows} == {os.getpid()}
    assert os.getpid() not in {row["pid"] for row in parallel.rows}
    assert parallel.sentences() == serial.sentences()


def test_a_worker_that_dies_is_named_and_an_error_in_a_run_comes_back_as_itself():
    with pytest.raises(RuntimeError, match=r"A worker process died while running arm 'dies' on seed \d"):
        tlkit.compare_arms({"ok": lambda s: {"val_acc": 0.5}, "dies": lambda s: os._exit(3)}, [0, 1], workers=2)
    with pytest.raises(KeyError, match="returned no 'val_acc'"):
        tlkit.compare_arms({"a": lambda s: {"acc": 0.5}, "b": lambda s: {"acc": 0.5}}, [0, 1], workers=2)
    with pytest.raises(ValueError, match="workers must be a whole number >= 1"):
        tlkit.compare_arms({"a": lambda s: {"val_acc": 0.5}}, [0], workers=0)


def test_results_take_paired_differences_of_accuracies_and_refuse_impossible_ones(tmp_path):
    written = tlkit.write_results(tmp_path / "r.json", {"val_acc": 0.7, "val_acc_b_minus_a": -0.05, "val_acc_b_minus_a_low": -0.09})
    assert written["val_acc_b_minus_a"] == -0.05
    with pytest.raises(ValueError, match=r"differences of accuracies are in \[-1, 1\]"):
        tlkit.write_results(None, {"val_acc_b_minus_a": -1.5})
    with pytest.raises(ValueError, match=r"accuracies are fractions in \[0, 1\]"):
        tlkit.write_results(None, {"val_acc": -0.05})


def test_metric_difference_pairs_two_measurements_of_the_same_runs():
    scores = {0: (0.70, 0.72), 1: (0.60, 0.621), 2: (0.65, 0.669)}  # (plain, with TTA) per seed
    c = tlkit.compare_arms({"head": lambda s: {"test_acc": scores[s][0], "test_acc_tta": scores[s][1]}}, [0, 1, 2], metric="test_acc")
    d = c.metric_difference("head", "test_acc_tta", "test_acc")
    assert d.per_seed == pytest.approx({0: 0.02, 1: 0.021, 2: 0.019}) and d.mean == pytest.approx(0.02)
    assert d.low > 0 and d.sentence().startswith("head (test_acc_tta) beats head (test_acc) on test_acc_tta by 2.0 points")
    with pytest.raises(KeyError, match="No arm 'tail'"):
        c.metric_difference("tail", "test_acc_tta", "test_acc")
