"""Comparisons over seeds: mean ± std per method, paired differences, and the sentences that rank methods.

``compare_arms`` runs arms over seeds and returns a ``Comparison`` whose verdicts pair the arms seed by seed (the
same seed gives each arm the same data and head initialisation): a mean difference with its 95% t interval, and
"beats" only when that interval excludes 0. The older unpaired helpers below (``versus_sentence``,
``ranking_sentence``) remain for tables without per-seed rows.

Every sentence a notebook prints to rank or judge methods comes from these helpers on the measured rows, never from
text written before the run. The unpaired rule (``is_tie``): two methods tie when the difference of their means is
not larger than the larger of their two standard deviations over seeds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

SEEDS_COLUMN = "seeds"


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """``seeds`` as a list of distinct whole numbers, with an error that says how to pass them."""
    if isinstance(seeds, (int, str)) or not isinstance(seeds, Sequence) or not seeds:
        raise ValueError(f"seeds must be a non-empty list of whole numbers such as [0, 1, 2], got {seeds!r} "
                         f"(with papermill: -y 'seeds: [0, 1, 2]').")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32]
    if bad or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct whole numbers in [0, 2**32), got {list(seeds)!r}.")
    return list(seeds)


def summarize_seeds(rows: Sequence[Mapping[str, object]], by: str, metrics: Sequence[str]) -> pd.DataFrame:
    """Mean and standard deviation of each metric per value of ``by``, in first-seen order.

    ``rows`` holds one mapping per run (e.g. ``{"run": "head", "seed": 0, "val acc": 0.74}``). The result has
    a column per metric (the mean), ``"<metric> std"`` (sample std over seeds, 0 for one seed) and ``"seeds"``.
    """
    if not rows:
        raise ValueError("summarize_seeds needs at least one run.")
    table = pd.DataFrame(list(rows))
    missing = [c for c in (by, *metrics) if c not in table.columns]
    if missing:
        raise KeyError(f"Columns {missing} are not in the runs; they have {list(table.columns)}.")
    grouped = table.groupby(by, sort=False)[list(metrics)]
    means, stds = grouped.mean(), grouped.std(ddof=1).fillna(0.0)
    summary = pd.DataFrame(index=means.index)
    for metric in metrics:
        summary[metric] = means[metric]
        summary[f"{metric} std"] = stds[metric]
    summary[SEEDS_COLUMN] = grouped.size()
    return summary


def mean_std_table(summary: pd.DataFrame, metrics: Sequence[str], digits: int = 3) -> pd.DataFrame:
    """The summary for reading: one ``"mean ± std"`` text column per metric, plus the number of seeds."""
    shown = pd.DataFrame(index=summary.index)
    for metric in metrics:
        shown[metric] = [f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(summary[metric], summary[f"{metric} std"])]
    shown[SEEDS_COLUMN] = summary[SEEDS_COLUMN]
    return shown


def is_tie(mean_a: float, std_a: float, mean_b: float, std_b: float) -> bool:
    """True when the difference of the means is not larger than the larger standard deviation."""
    return abs(mean_a - mean_b) <= max(std_a, std_b)


def _points(difference: float, metric: str) -> str:
    # Accuracies and other fractions read best as points; anything else as a plain difference.
    fraction = any(word in metric.lower() for word in ("acc", "recall", "f1"))
    return f"{100 * difference:.1f} points" if fraction else f"{difference:.3g}"


def _described(summary: pd.DataFrame, name: str, metric: str) -> str:
    return f"{name} ({summary.loc[name, metric]:.3f} ± {summary.loc[name, f'{metric} std']:.3f})"


def versus_sentence(summary: pd.DataFrame, a: str, b: str, metric: str, *, higher_is_better: bool = True) -> str:
    """One sentence on ``a`` against ``b``: which is better by how much, or that they tie within the spread."""
    for name in (a, b):
        if name not in summary.index:
            raise KeyError(f"{name!r} is not in the table; it has {list(summary.index)}.")
    mean_a, std_a = summary.loc[a, metric], summary.loc[a, f"{metric} std"]
    mean_b, std_b = summary.loc[b, metric], summary.loc[b, f"{metric} std"]
    seeds = int(min(summary.loc[a, SEEDS_COLUMN], summary.loc[b, SEEDS_COLUMN]))
    over = f"over {seeds} seeds" if seeds > 1 else "on one seed (no spread: run more seeds to judge)"
    if is_tie(mean_a, std_a, mean_b, std_b):
        return (f"{_described(summary, a, metric)} and {_described(summary, b, metric)} tie on {metric} {over}: the "
                f"difference, {_points(abs(mean_a - mean_b), metric)}, is within the spread.")
    a_better = (mean_a > mean_b) == higher_is_better
    winner, loser = (a, b) if a_better else (b, a)
    by = _points(abs(mean_a - mean_b), metric)
    if seeds <= 1:  # no spread to weigh the difference against
        return (f"{_described(summary, winner, metric)} is ahead of {_described(summary, loser, metric)} on {metric} "
                f"by {by} on one seed, with no spread to judge that by: run more seeds before calling it a win.")
    return (f"{_described(summary, winner, metric)} beats {_described(summary, loser, metric)} on {metric} {over}, "
            f"by {by}, more than the spread.")


def ranking_sentence(summary: pd.DataFrame, metric: str, *, higher_is_better: bool = True) -> str:
    """Which method is best on ``metric`` (by mean), which ones tie with it, and which it beats."""
    if summary.empty:
        raise ValueError("ranking_sentence needs at least one method.")
    order = summary[metric].sort_values(ascending=not higher_is_better, kind="stable").index.tolist()
    best = order[0]
    if len(order) == 1:
        return f"Only {_described(summary, best, metric)} was measured."
    mean, std = summary.loc[best, metric], summary.loc[best, f"{metric} std"]
    ties = [n for n in order[1:] if is_tie(mean, std, summary.loc[n, metric], summary.loc[n, f"{metric} std"])]
    beaten = [n for n in order[1:] if n not in ties]
    seeds = int(summary[SEEDS_COLUMN].max())
    over = f"over {seeds} seeds" if seeds > 1 else "on one seed, so without a spread"
    fewer = [f"{n}: {int(k)}" for n, k in summary[SEEDS_COLUMN].items() if k < seeds]
    if fewer and seeds > 1:
        over += f" (fewer for {', '.join(fewer)})"
    sentence = f"{'Highest' if higher_is_better else 'Lowest'} mean {metric} {over}: {_described(summary, best, metric)}."
    if ties:
        sentence += (f" Within its spread, so tied with it: {', '.join(_described(summary, n, metric) for n in ties)}.")
    else:
        sentence += " No other method is within its spread."
    if beaten:
        gaps = [f"{n} by {_points(abs(mean - summary.loc[n, metric]), metric)}" for n in beaten]
        sentence += f" It beats {', '.join(gaps)}."
    return sentence


def headline_metrics(summary: pd.DataFrame, metric: str, prefix: str) -> dict[str, float]:
    """``{prefix}_{name}`` (the mean) and ``{prefix}_{name}_std`` for each method, for the results file.

    Keys are lower case with every run of other characters turned into one ``_``.
    """
    out: dict[str, float] = {}
    for name in summary.index:
        key = re.sub(r"[^0-9a-z]+", "_", f"{prefix}_{name}".lower()).strip("_")
        out[key] = float(summary.loc[name, metric])
        std = float(summary.loc[name, f"{metric} std"])
        out[f"{key}_std"] = std if math.isfinite(std) else 0.0
    return out


# --- paired differences: the same seed gives both arms the same data and head init --------------------------


@dataclass(frozen=True)
class PairedDifference:
    """``a`` minus ``b`` on ``metric``, seed by seed: the mean difference and its 95% t interval over the seeds."""

    a: str
    b: str
    metric: str
    per_seed: dict[int, float]
    mean: float
    low: float
    high: float

    @property
    def seeds(self) -> int:
        return len(self.per_seed)

    def sentence(self, *, higher_is_better: bool = True) -> str:
        """One sentence: who is ahead by how much, with the interval; "beats" only when the interval excludes 0."""
        if self.seeds < 2:
            return f"{self.a} minus {self.b} on {self.metric}: {_signed_points(self.mean, self.metric)} on one seed, no interval: run more seeds to judge."
        over = f"paired over {self.seeds} seeds"
        if self.low <= 0 <= self.high:
            unit = " points" if _points(1.0, self.metric).endswith("points") else ""
            bare = [_signed_points(v, self.metric).removesuffix(" points") for v in (self.mean, self.low, self.high)]
            return (f"{self.a} and {self.b} tie on {self.metric}: {self.a} minus {self.b} is {bare[0]}{unit} "
                    f"(95% interval {bare[1]} to {bare[2]}, {over}), an interval that holds 0.")
        a_better = (self.mean > 0) == higher_is_better
        winner, loser = (self.a, self.b) if a_better else (self.b, self.a)
        sign = 1 if self.mean > 0 else -1  # the margin by which the winner is better, as a positive number
        low, high = sorted((sign * self.low, sign * self.high))
        unit = " points" if _points(1.0, self.metric).endswith("points") else ""
        bare = [_points(v, self.metric).removesuffix(" points") for v in (abs(self.mean), low, high)]
        return f"{winner} beats {loser} on {self.metric} by {bare[0]}{unit} (95% interval {bare[1]} to {bare[2]}, {over})."


def _signed_points(difference: float, metric: str) -> str:
    return ("+" if difference >= 0 else "-") + _points(abs(difference), metric)


def paired_difference(rows: Sequence[Mapping[str, object]], by: str, a: str, b: str, metric: str, *,
                      seed: str = "seed", confidence: float = 0.95) -> PairedDifference:
    """``a`` minus ``b`` on ``metric`` for each seed that both ran, with a t interval over those seeds.

    ``rows`` is one mapping per run, as for ``summarize_seeds`` (e.g. ``{"run": "head", "seed": 0, "val acc": 0.74}``).
    Pairing removes what the seed alone moves both arms by (the sampled images, the head's init), so a difference
    smaller than either arm's spread can still be clear, and a large-looking one can be noise.
    """
    from scipy import stats  # scikit-learn's own dependency

    values: dict[str, dict[int, float]] = {a: {}, b: {}}
    for row in rows:
        arm = row.get(by)
        if arm in values:
            if row.get(seed) in values[arm]:
                raise ValueError(f"{arm!r} has two runs for {seed} {row.get(seed)!r}: pair each seed once.")
            values[arm][row[seed]] = float(row[metric])
    for arm, by_seed in values.items():
        if not by_seed:
            raise KeyError(f"No runs with {by} = {arm!r}; the arms are {sorted({str(r.get(by)) for r in rows})}.")
    shared = [s for s in values[a] if s in values[b]]
    if not shared:
        raise ValueError(f"{a!r} and {b!r} share no {seed}: run both on the same seeds to pair them.")
    diffs = {s: values[a][s] - values[b][s] for s in shared}
    mean = sum(diffs.values()) / len(diffs)
    if len(diffs) < 2:
        return PairedDifference(a, b, metric, diffs, mean, math.nan, math.nan)
    sem = stats.sem(list(diffs.values()))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1) * sem) if sem > 0 else 0.0
    return PairedDifference(a, b, metric, diffs, mean, mean - half, mean + half)


# --- budgets and learning curves ------------------------------------------------------------------------


def optimizer_steps(epochs: int, train_size: int, batch_size: int) -> int:
    """Optimizer steps of ``epochs`` epochs over ``train_size`` items in batches of ``batch_size`` (the last, smaller
    batch of an epoch is a step too, as tlkit's loaders keep it): the budget a comparison states next to its epochs."""
    for name, value, minimum in (("epochs", epochs, 0), ("train_size", train_size, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be a whole number of at least {minimum}, got {value!r}.")
    return epochs * math.ceil(train_size / batch_size)


def late_gain(curve: Sequence[float], last_fraction: float = 0.25) -> float:
    """The best value of the last ``last_fraction`` of ``curve`` minus the best value before it.

    For a per-epoch validation accuracy: about zero or below means the last part of the budget found nothing
    better (the curve had flattened); a clear gain means the run was still improving when the budget ran out.
    The last part holds at least one value and leaves at least one before it.
    """
    values = [float(v) for v in curve]
    if len(values) < 2:
        raise ValueError(f"late_gain needs a curve of at least 2 values, got {len(values)}.")
    if not 0 < last_fraction < 1:
        raise ValueError(f"last_fraction must be between 0 and 1 (e.g. 0.25 for the last quarter), got {last_fraction!r}.")
    last = min(max(1, round(len(values) * last_fraction)), len(values) - 1)
    return max(values[-last:]) - max(values[:-last])


def plateau_sentence(curves: Mapping[str, Sequence[Sequence[float]]], metric: str, *, tolerance: float,
                     last_fraction: float = 0.25) -> str:
    """Whether each method's curves (one per seed) had flattened by the end of the budget, from their ``late_gain``.

    A method counts as flattened when its mean late gain over seeds is at most ``tolerance`` (in the metric's
    units, e.g. 0.01 for one point of accuracy); otherwise the sentence says it was still improving, so a longer
    budget could change the comparison.
    """
    if not curves:
        raise ValueError("plateau_sentence needs at least one method.")
    parts = []
    for name, per_seed in curves.items():
        gains = [late_gain(curve, last_fraction) for curve in per_seed]
        if not gains:
            raise ValueError(f"{name!r} has no curves.")
        mean = sum(gains) / len(gains)
        verdict = (f"flattened (within {_points(tolerance, metric)})" if mean <= tolerance
                   else f"still improving (more than {_points(tolerance, metric)}): a longer budget could change the comparison")
        parts.append(f"{name}: the last {100 * last_fraction:.0f}% of the epochs changed the best {metric} by "
                     f"{'+' if mean >= 0 else '-'}{_points(abs(mean), metric)} on average over {len(gains)} "
                     f"seed{'s' if len(gains) > 1 else ''} (largest {'+' if max(gains) >= 0 else '-'}{_points(abs(max(gains)), metric)}): {verdict}.")
    return " ".join(parts)


def value_at_time(epoch_time: Sequence[float], values: Sequence[float], seconds: float, *, start: float = 0.0) -> float:
    """``values`` after the last epoch that ended within ``seconds`` of wall time, NaN when none did.

    ``epoch_time`` is each epoch's duration (a History's ``epoch_time``), ``start`` the time spent before the first
    epoch (e.g. building a cache). For an equal-wall-time view from runs made with a longer budget: a run planned
    for fewer epochs (its schedule fitted to them) may end higher than where this run stood at that time.
    """
    if len(epoch_time) != len(values):
        raise ValueError(f"epoch_time and values must have one entry per epoch, got {len(epoch_time)} and {len(values)}.")
    elapsed, reached = start, math.nan
    for duration, value in zip(epoch_time, values):
        elapsed += duration
        if elapsed > seconds:
            break
        reached = value
    return reached


# --- arms over seeds: one call runs a comparison and says what it found -----------------------------------


def _numbers(values: Mapping[str, object]) -> dict[str, float]:
    """The entries of ``values`` that are numbers (bools excluded), as floats."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _metrics_of(output: object) -> dict[str, float]:
    """The numbers a run returned: a mapping's numeric entries, or a tlkit ``RunResult``'s ``metrics`` and ``seconds``."""
    if isinstance(output, Mapping):
        return _numbers(output)
    metrics = getattr(output, "metrics", None)
    if isinstance(metrics, Mapping):
        seconds = getattr(output, "seconds", None)
        return _numbers({**metrics, **({"seconds": seconds} if seconds is not None else {})})
    raise TypeError(f"A run must return a mapping of metrics (e.g. {{'val_acc': 0.74}}) or a tlkit RunResult, got "
                    f"{type(output).__name__}.")


@dataclass
class Comparison:
    """Arms run over the same seeds: one row per (arm, seed), what each run returned, and the paired verdicts.

    ``reference`` is the arm the others are compared with (by default the first); ``metric`` the one the verdicts
    are about. Every sentence comes from the measured rows: ``differences()`` pairs each arm with the reference seed
    by seed, ``sentences()`` says who beats whom (only when the 95% interval of the paired difference excludes 0).
    """

    arms: list[str]
    seeds: list[int]
    rows: list[dict[str, object]]
    outputs: dict[tuple[str, int], object]
    metric: str
    reference: str
    higher_is_better: bool = True

    def summary(self, metrics: Sequence[str] | None = None) -> pd.DataFrame:
        """Mean and std over seeds of each metric (default: every metric measured), one row per arm."""
        return summarize_seeds(self.rows, "arm", list(metrics) if metrics else self.metrics)

    @property
    def metrics(self) -> list[str]:
        """Every metric measured, in first-seen order."""
        names: dict[str, None] = {}
        for row in self.rows:
            names.update(dict.fromkeys(k for k in row if k not in ("arm", "seed")))
        return list(names)

    def differences(self, metric: str | None = None) -> dict[str, PairedDifference]:
        """Each other arm minus the reference on ``metric`` (default: the comparison's), paired by seed."""
        metric = metric or self.metric
        return {arm: paired_difference(self.rows, "arm", arm, self.reference, metric) for arm in self.arms if arm != self.reference}

    def sentences(self, metric: str | None = None) -> list[str]:
        """One sentence per arm against the reference, from the paired differences."""
        return [d.sentence(higher_is_better=self.higher_is_better) for d in self.differences(metric).values()]

    def ranking(self, metric: str | None = None) -> str:
        """Which arm has the best mean, and against each other arm, paired by seed, whether it beats it or ties."""
        metric = metric or self.metric
        summary = self.summary([metric])
        best = summary[metric].idxmax() if self.higher_is_better else summary[metric].idxmin()
        sentence = f"{'Highest' if self.higher_is_better else 'Lowest'} mean {metric} over {len(self.seeds)} seeds: {_described(summary, best, metric)}."
        beaten, tied = [], []
        for arm in self.arms:
            if arm != best:
                d = paired_difference(self.rows, "arm", best, arm, metric)
                clear = d.seeds > 1 and not (d.low <= 0 <= d.high)
                (beaten if clear else tied).append(f"{arm} ({_interval_text(d)})")
        if beaten:
            sentence += f" Paired by seed, it beats {', '.join(beaten)}."
        if tied:
            sentence += f" It ties with {', '.join(tied)}: the 95% interval of the difference holds 0."
        return sentence

    def table(self, metric: str | None = None, digits: int = 3) -> pd.DataFrame:
        """For reading: ``mean ± std`` per arm and its paired difference from the reference with the 95% interval."""
        metric = metric or self.metric
        shown = mean_std_table(self.summary([metric]), [metric], digits)
        differences = self.differences(metric)
        shown[f"minus {self.reference}"] = [_interval_text(differences[arm]) if arm in differences else "" for arm in shown.index]
        return shown

    def with_metric(self, name: str, measure) -> Comparison:
        """The same runs with one more metric: ``measure(arm, seed, output)`` for each run (e.g. the test accuracy of its
        model), as a comparison about that metric. Choose on validation, then score the choice once on test this way."""
        rows = [{**row, name: float(measure(row["arm"], row["seed"], self.outputs[row["arm"], row["seed"]]))} for row in self.rows]
        return Comparison(self.arms, self.seeds, rows, self.outputs, name, self.reference, self.higher_is_better)

    def metric_difference(self, arm: str, metric: str, baseline: str) -> PairedDifference:
        """``metric`` minus ``baseline`` for one arm, seed by seed: two measurements of the same models (e.g. test
        accuracy with and without test-time augmentation), paired by seed like two arms."""
        if arm not in self.arms:
            raise KeyError(f"No arm {arm!r}; the arms are {self.arms}.")
        rows = [{"measure": m, "seed": row["seed"], "value": row[m]} for row in self.rows if row["arm"] == arm for m in (metric, baseline)]
        d = paired_difference(rows, "measure", metric, baseline, "value")
        return PairedDifference(f"{arm} ({metric})", f"{arm} ({baseline})", metric, d.per_seed, d.mean, d.low, d.high)

    def results(self, prefix: str, metric: str | None = None) -> dict[str, float]:
        """Flat numbers for the results file: each arm's mean and std, and its paired difference with its interval."""
        metric = metric or self.metric
        out = headline_metrics(self.summary([metric]), metric, prefix)
        for arm, d in self.differences(metric).items():
            key = re.sub(r"[^0-9a-z]+", "_", f"{prefix}_{arm}_minus_{self.reference}".lower()).strip("_")
            out[key] = d.mean
            if d.seeds > 1:
                out[f"{key}_low"], out[f"{key}_high"] = d.low, d.high
        return out


def _interval_text(d: PairedDifference) -> str:
    """``+2.0 [+0.4, +3.6] points``: the mean paired difference and its 95% interval, in the metric's units."""
    if d.seeds < 2:
        return f"{_signed_points(d.mean, d.metric)} (one seed)"
    unit = " points" if _points(1.0, d.metric).endswith("points") else ""
    bare = [_signed_points(v, d.metric).removesuffix(" points") for v in (d.mean, d.low, d.high)]
    return f"{bare[0]} [{bare[1]}, {bare[2]}]{unit}"


def compare_arms(arms: Mapping[str, Callable[[int], object]], seeds: Sequence[int], *, metric: str = "val_acc",
                 reference: str | None = None, higher_is_better: bool = True, progress: bool = False,
                 workers: int = 1) -> Comparison:
    """Run every arm on every seed (``arms[name](seed)``) and compare the arms seed by seed.

    Each arm returns its run's metrics: a mapping such as ``{"val_acc": 0.74, "seconds": 3.1}``, or a tlkit
    ``RunResult``; whatever it returns is kept in ``outputs[name, seed]`` (models, histories). A seed gives every arm
    the same data and head initialisation, so the arms are compared by their per-seed differences. ``reference``
    (default: the first arm) is the arm the others are compared with.

    ``workers`` > 1 runs that many runs at once, each in a forked process with ``cores // workers`` threads (small
    models on a CPU get more done so than one process with every thread); each run sets its own seed, so the numbers
    are those of the serial run (up to float rounding where the thread count changes a sum's order).

        comparison = tlkit.compare_arms({
            "pretrained": lambda seed: tlkit.linear_probe(config.replace(seed=seed), data(seed)),
            "random init": lambda seed: tlkit.linear_probe(config.replace(seed=seed, weights=None), data(seed)),
        }, seeds=[0, 1, 2])
    """
    from tqdm.auto import tqdm

    if not isinstance(arms, Mapping) or not arms or not all(callable(run) for run in arms.values()):
        raise TypeError("arms must map each arm's name to a function of the seed that runs it, e.g. "
                        "{'head': lambda seed: tlkit.linear_probe(config.replace(seed=seed), splits)}.")
    names, seeds = [str(a) for a in arms], check_seeds(list(seeds))
    reference = names[0] if reference is None else reference
    if reference not in names:
        raise ValueError(f"reference {reference!r} is not one of the arms {names}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number >= 1 (1: every run in this process), got {workers!r}.")
    tasks = [(name, seed) for seed in seeds for name in names]  # seed by seed: stopping early leaves complete pairs
    runs = dict(zip(names, arms.values()))
    with tqdm(total=len(tasks), desc="runs", unit="run", disable=not progress) as bar:
        if workers == 1 or len(tasks) == 1:
            done = {}
            for name, seed in tasks:
                done[name, seed] = _checked_run(runs, name, seed, metric)
                bar.update()
        else:
            done = _run_in_workers(runs, tasks, metric, workers, bar)
    rows = [{"arm": name, "seed": seed, **done[name, seed][0]} for name, seed in tasks]
    outputs = {task: done[task][1] for task in tasks}
    return Comparison(names, seeds, rows, outputs, metric, reference, higher_is_better)


def _checked_run(runs: Mapping[str, Callable[[int], object]], name: str, seed: int, metric: str) -> tuple[dict[str, float], object]:
    output = runs[name](seed)
    metrics = _metrics_of(output)
    if metric not in metrics:
        raise KeyError(f"Arm {name!r} on seed {seed} returned no {metric!r}; it returned {sorted(metrics)}.")
    return metrics, output


_FORKED_RUNS: Mapping[str, Callable[[int], object]] | None = None  # what forked workers run (inherited, never pickled)


def _forked_run(name: str, seed: int, metric: str, threads: int) -> tuple[dict[str, float], object]:
    import torch

    torch.set_num_threads(threads)
    return _checked_run(_FORKED_RUNS, name, seed, metric)


def _run_in_workers(runs, tasks, metric: str, workers: int, bar) -> dict:
    """The runs of ``tasks`` in ``workers`` forked processes: the arms' functions (lambdas over notebook variables)
    are inherited by the children rather than pickled; what each run returns comes back pickled."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    global _FORKED_RUNS
    if "fork" not in multiprocessing.get_all_start_methods():
        raise ValueError(f"workers={workers} needs processes started by fork, which this platform lacks: use workers=1.")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    _FORKED_RUNS = runs
    done = {}
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {pool.submit(_forked_run, name, seed, metric, threads): (name, seed) for name, seed in tasks}
            for future in as_completed(futures):
                name, seed = futures[future]
                try:
                    done[name, seed] = future.result()
                except BrokenProcessPool as err:
                    raise RuntimeError(f"A worker process died while running arm {name!r} on seed {seed} (killed, or out of "
                                       f"memory?): run with fewer workers, or workers=1 to see the error here.") from err
                bar.update()
    finally:
        _FORKED_RUNS = None
    return done


def seed_curves(comparisons: Mapping[object, Comparison], metric: str | None = None) -> dict[str, pd.DataFrame]:
    """One comparison per point of an axis (e.g. images per class) as curves: arm -> mean, std and seeds per point,
    the table ``tlkit.plot_seed_curves`` draws."""
    if not comparisons:
        raise ValueError("seed_curves needs at least one comparison.")
    curves: dict[str, list[pd.DataFrame]] = {}
    for x, comparison in comparisons.items():
        chosen = metric or comparison.metric
        for arm, row in comparison.summary([chosen]).iterrows():
            curves.setdefault(str(arm), []).append(row.to_frame(x).T)
    return {arm: pd.concat(rows) for arm, rows in curves.items()}
