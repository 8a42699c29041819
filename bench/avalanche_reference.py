"""Reference: the real Avalanche library's ``Naive`` and ``Replay`` strategies beside tlkit's naive fine-tuning and
replay of notebook 05's stage 3, in one run.

The split is notebook 05's (``tlkit.incremental.split_by_arrival`` on the bundled clothing set): per seed, 20 training
photos of each of the 7 old classes (stage 1), then 20 of each of the 3 new classes (stage 3); the same validation
and test photos for every seed. Backbone: EfficientNet-Lite0, ImageNet weights, 128 px, ``tlkit.eval_transform``
(no augmentation), only ``top`` and ``head`` trained, AdamW (torch's defaults, so weight decay 0.01) at the
notebook's LR (3e-3), batch 32.

* **tlkit**: ``tlkit.recipes.train_first_model`` (8 epochs, one pass over the old classes' photos each), then
  ``Continuation.arm("new classes")`` (naive) and ``arm("replay")`` (10 old photos per class mixed in) exactly as
  notebook 05 calls them: a fresh AdamW, the head grown with ``head_init="mean"``, at most 15 epochs of 10 steps,
  ReduceLROnPlateau, early stopping (patience 3, validation accuracy) restoring the best epoch.
* **Avalanche** (0.6.0, the optional ``reference-cl`` extra): a class-incremental benchmark of two experiences
  (``class_incremental_benchmark``: classes 0-6, then 7-9) over the same photos; ``Naive`` and ``Replay`` (its
  default buffer, experience-balanced: 70 photos of the first experience drawn at random, as many as tlkit's 10 per
  old class but not 10 of each; each step of the second experience 16 new + 16 memory photos, as many as tlkit's)
  train Avalanche's ``IncrementalClassifier`` (new units: PyTorch's default init, not tlkit's mean of the old rows)
  on the same Lite0 ``top`` block, with a fresh AdamW per experience (Avalanche resets it) at a constant LR (no
  plateau schedule), 8 epochs for the first experience, and for the second at most ``--steps`` steps (default 150,
  tlkit's cap), stopped early by Avalanche's ``EarlyStoppingPlugin`` on the validation stream's accuracy every 10
  steps, patience 3 evaluations, as tlkit's rule ("early stop"); unlike tlkit, Avalanche evaluates before training
  and then after steps 1, 11, 21, ... (not 10, 20, ...), and it reloads the best weights only when it stops. Each strategy also runs
  the full budget without early stopping ("150 steps"), so both readings of "the same budget" are shown. Accuracies
  are Avalanche's own metrics: ``Top1_Acc_Exp`` on the old / new classes' test experience and ``Top1_Acc_Stream`` on
  all of them (10-way, as tlkit scores).

Both libraries see the frozen blocks' output, not the photos: the frozen Lite0 blocks (in eval mode, with the
transform above) give every photo the same activations each epoch, so they run once per photo (tlkit's prefix cache)
and Avalanche's datasets and replay memory hold those activations. What the two train is the same network; the
strategies' code, the head init, the LR schedule and the stopping rule differ, as listed above. Each library trains
its own first model from ImageNet weights (Avalanche's first experience is its stage 1, with its own head init and
batch order); the first models' old-class test accuracy is printed beside each other.

Prints each run, the mean ± std over seeds of old / new / all-classes test accuracy, the paired per-seed differences
(each Avalanche run minus tlkit's run of the same strategy) with their 95% intervals, and last the result line.

    make reference-cl                               # once: installs the pinned Avalanche stack into .venv (torch unchanged)
    python bench/avalanche_reference.py             # seeds 0 1 2, under a minute per seed on one core
    python bench/avalanche_reference.py --seeds 0 --epochs 2 --steps 20   # a quick check
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import tlkit
from tlkit.prefix_cache import forward_prefix, stages

TRAINABLE = ["top", "head"]
BOUNDARY = "top"  # the first trained block: everything below it is frozen and cached
TL_NAIVE, TL_REPLAY = "tlkit naive", "tlkit replay"
STRATEGIES = {"Naive": TL_NAIVE, "Replay": TL_REPLAY}  # each Avalanche strategy and the tlkit run it stands beside
GROUPS = ("old", "new", "all")


def import_avalanche() -> SimpleNamespace:
    """The Avalanche pieces the bench uses, or SystemExit saying how to install the pinned ``reference-cl`` extra."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # qpsolvers warns that it has no QP solver (GEM's, unused here)
            import avalanche
            from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
            from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset
            from avalanche.evaluation.metrics import accuracy_metrics
            from avalanche.models import IncrementalClassifier
            from avalanche.training import Naive, Replay
            from avalanche.training.plugins import EarlyStoppingPlugin, EvaluationPlugin
    except ImportError as err:
        raise SystemExit(
            f"bench/avalanche_reference.py runs the real Avalanche library, which is not importable here ({err}). Install the "
            "pinned stack of pyproject.toml's 'reference-cl' extra with `make reference-cl` (pip install --no-deps into .venv, "
            "so torch stays as it is), then run `.venv/bin/python bench/avalanche_reference.py` again. Avalanche is optional: "
            "the course and its tests never need it."
        ) from err
    return SimpleNamespace(version=avalanche.__version__, benchmark=class_incremental_benchmark, tensor_dataset=_make_taskaware_tensor_classification_dataset,
                           accuracy_metrics=accuracy_metrics, IncrementalClassifier=IncrementalClassifier, Naive=Naive, Replay=Replay,
                           EvaluationPlugin=EvaluationPlugin, EarlyStoppingPlugin=EarlyStoppingPlugin)


def frozen_activations(prefix: nn.Module, dataset, transform, config: tlkit.RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen blocks' output for every image of ``dataset`` (the input of ``top``), and the labels."""
    xs, ys = [], []
    with torch.no_grad():
        for images, labels in tlkit.make_loader(dataset, transform, config.batch_size, shuffle=False):
            xs.append(forward_prefix(prefix, BOUNDARY, images.to(config.device)).cpu())
            ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


def avalanche_model(av: SimpleNamespace, config: tlkit.RunConfig, num_old: int) -> nn.Module:
    """Lite0's ``top`` block (ImageNet weights) and pooling, under Avalanche's IncrementalClassifier for the old classes."""
    lite0 = tlkit.create_model(config.backbone, num_old, config.weights)
    names = [name for name, _ in stages(lite0)]
    suffix = [module for _, module in stages(lite0)[names.index(BOUNDARY): names.index("head")]]
    return nn.Sequential(*suffix, av.IncrementalClassifier(lite0.num_features, initial_out_features=num_old))


def avalanche_run(av: SimpleNamespace, strategy: str, config: tlkit.RunConfig, benchmark, num_old: int, *, first_epochs: int,
                  steps: int, memory: int, eval_every: int, patience: int | None) -> dict[str, float]:
    """Avalanche's ``strategy`` ("Naive" or "Replay") over both experiences: old / new / all test accuracy after each.

    With ``patience``, the second experience stops early as tlkit's runs do: Avalanche evaluates the validation stream
    every ``eval_every`` steps (its periodic eval: once before training, then after steps 1, 1 + eval_every, ...) and its EarlyStoppingPlugin
    stops after ``patience`` evaluations without a higher accuracy, reloading the best weights (only when it stops:
    a run that reaches the step budget keeps its last weights)."""
    tlkit.set_seed(config.seed)
    model = avalanche_model(av, config, num_old)
    evaluator = av.EvaluationPlugin(av.accuracy_metrics(experience=True, stream=True), loggers=[])
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    stopper = [] if patience is None else [av.EarlyStoppingPlugin(patience * eval_every, benchmark.valid_stream.name, peval_mode="iteration")]
    common = dict(criterion=nn.CrossEntropyLoss(), train_epochs=first_epochs, eval_mb_size=config.batch_size, device=config.device, evaluator=evaluator,
                  plugins=stopper, eval_every=eval_every if stopper else -1, peval_mode="iteration")
    if strategy == "Naive":
        learner = av.Naive(model=model, optimizer=optimizer, train_mb_size=config.batch_size, **common)
    else:
        learner = av.Replay(model=model, optimizer=optimizer, mem_size=memory, train_mb_size=config.batch_size, **common)
    first, second = benchmark.train_stream
    learner.train(first)  # its periodic evals score the training experience: no validation metric, so no early stop in stage 1
    before = learner.eval(benchmark.test_stream[:1])
    if strategy == "Replay":  # from now on each step draws train_mb_size new photos and as many from memory: batch_size photos, as tlkit's steps
        learner.train_mb_size = config.batch_size // 2
    per_epoch = math.ceil(len(second.dataset) / learner.train_mb_size)
    learner.train_epochs = math.ceil(steps / per_epoch)  # the step budget, in Avalanche's epochs
    learner.train(second, eval_streams=[benchmark.valid_stream])
    after = learner.eval(benchmark.test_stream)
    acc = {g: after[f"Top1_Acc_Exp/eval_phase/test_stream/Exp00{i}"] for i, g in enumerate(GROUPS[:2])}
    return {"first_old_acc": before["Top1_Acc_Exp/eval_phase/test_stream/Exp000"], **{f"{g}_acc": acc[g] for g in acc},
            "all_acc": after["Top1_Acc_Stream/eval_phase/test_stream"], "steps": learner.clock.train_exp_iterations}


def avalanche_benchmark(av: SimpleNamespace, prefix: nn.Module, arrivals, seed: int, transform, config: tlkit.RunConfig, held_out: dict):
    """Avalanche's class-incremental benchmark of ``seed``'s photos: experience 0 the old classes', 1 the new classes'."""
    old, new = frozen_activations(prefix, arrivals.first(seed), transform, config), frozen_activations(prefix, arrivals.new(seed), transform, config)
    old_y = torch.tensor([arrivals.all_names.index(arrivals.old_names[y]) for y in old[1].tolist()])  # old labels, in the full class list
    train = (torch.cat([old[0], new[0]]), torch.cat([old_y, new[1]]))
    datasets = {name: av.tensor_dataset(x, y, targets=y.tolist(), task_labels=0) for name, (x, y) in {"train": train, **held_out}.items()}
    return av.benchmark(datasets, class_order=list(range(len(arrivals.all_names))), num_classes_per_exp=[len(arrivals.old_names), len(arrivals.new_names)])


def tlkit_runs(config: tlkit.RunConfig, arrivals, seed: int, transform, checkpoint: Path, *, continue_epochs: int, steps_per_epoch: int,
               patience: int) -> dict[str, dict[str, float]]:
    """Notebook 05 for one seed: the first model, then naive fine-tuning and replay on the new classes, test accuracy per group."""
    config = config.replace(seed=seed)
    tlkit.recipes.train_first_model(config, arrivals.first(seed), arrivals.val_old, checkpoint, classes=arrivals.old_names, trainable=TRAINABLE,
                                    transform=transform)
    first_old = tlkit.incremental.checkpoint_accuracy(checkpoint, arrivals.test_old, {"old": arrivals.old_ids}, trainable=TRAINABLE, transform=transform,
                                                      device=config.device, cache_dir=config.cache_dir)["old"]
    groups = {"old": arrivals.old_ids, "new": arrivals.new_ids, "all": range(len(arrivals.all_names))}
    stage3 = tlkit.recipes.Continuation(config.replace(epochs=continue_epochs), {seed: checkpoint}, arrivals.stage3_sets, arrivals.val_all, groups,
                                        classes=arrivals.all_names, test_set=arrivals.test_all, transform=transform, steps_per_epoch=steps_per_epoch,
                                        early_stopping_patience=patience, monitor="val_acc", restore_best=True, prefix_cache=True, head_init="mean")
    runs = {}
    for arm, data in ((TL_NAIVE, "new classes"), (TL_REPLAY, "replay")):
        run = stage3.arm(data, trainable=TRAINABLE)(seed)
        runs[arm] = {"first_old_acc": first_old, **{f"{g}_acc": run.metrics[f"test_acc/{g}"] for g in GROUPS}, "steps": run.metrics["steps_run"]}
    return runs


def avalanche_arms(strategy: str, args: argparse.Namespace) -> dict[str, int | None]:
    """The Avalanche runs of ``strategy``, by name: early stopping with tlkit's patience, and the full step budget (no patience)."""
    return {f"avalanche {strategy}, early stop": args.patience, f"avalanche {strategy}, {args.steps} steps": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="clothing")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--old-classes", type=int, default=7)
    parser.add_argument("--samples-per-class", type=int, default=20)
    parser.add_argument("--replay-per-class", type=int, default=10, help="tlkit's replay photos per old class; Avalanche's memory holds as many in all")
    parser.add_argument("--epochs", type=int, default=8, help="stage 1 (the first experience), both libraries")
    parser.add_argument("--steps", type=int, default=150, help="stage 3: tlkit's cap (early stopping may end it sooner), Avalanche's fixed budget")
    parser.add_argument("--steps-per-epoch", type=int, default=10, help="tlkit's stage-3 epoch (early stopping and the LR plateau act per epoch)")
    parser.add_argument("--patience", type=int, default=3, help="evaluations (of --steps-per-epoch steps) without a better validation accuracy")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    av = import_avalanche()  # before any training: a missing Avalanche fails in a second
    warnings.filterwarnings("ignore", message="No loggers specified")  # the bench reads the metrics the strategies return
    warnings.filterwarnings("ignore", message="Metric Top1_Acc_Stream used by the EarlyStopping")  # its first check, before any evaluation

    splits = tlkit.load_dataset(args.dataset, seed=0, samples_per_class=None, test_fraction=0.2)
    arrivals = tlkit.incremental.split_by_arrival(splits, old_classes=args.old_classes, samples_per_class=args.samples_per_class, new_sample_classes=0,
                                                  new_samples_per_class=0, replay_per_class=args.replay_per_class)
    cache = Path(tempfile.mkdtemp(prefix="avalanche_reference_"))
    config = tlkit.RunConfig(epochs=args.epochs, lr=args.lr, device=tlkit.get_device(args.device), cache_dir=cache / "cache")
    prefix = tlkit.freeze(tlkit.create_model(config.backbone, len(arrivals.old_names), config.weights)).eval()  # ImageNet blocks: the same for every seed
    transform = tlkit.eval_transform(config.image_size, prefix.normalization)
    held_out = {name: frozen_activations(prefix, data, transform, config) for name, data in {"valid": arrivals.val_all, "test": arrivals.test_all}.items()}
    memory = args.replay_per_class * len(arrivals.old_names)
    continue_epochs = math.ceil(args.steps / args.steps_per_epoch)
    print(f"{args.dataset}: old classes {arrivals.old_names}, new {arrivals.new_names}; {args.samples_per_class} training photos per class, "
          f"{len(arrivals.test_old)} + {len(arrivals.test_all) - len(arrivals.test_old)} test photos; seeds {args.seeds}; {config.backbone}, "
          f"{config.image_size} px, {TRAINABLE} trained, AdamW lr {config.lr:g}, batch {config.batch_size}; stage 1 {args.epochs} epochs, stage 3 "
          f"at most {args.steps} steps, early stopping on validation accuracy every {args.steps_per_epoch} steps, patience {args.patience} "
          f"(Avalanche: also without); replay memory {memory} photos; device {config.device}, "
          f"{torch.get_num_threads()} threads; avalanche {av.version}, torch {torch.__version__}", flush=True)

    def per_seed(seed: int) -> dict[str, dict[str, float]]:
        runs = tlkit_runs(config, arrivals, seed, transform, cache / f"first_seed{seed}.pt", continue_epochs=continue_epochs,
                          steps_per_epoch=args.steps_per_epoch, patience=args.patience)
        benchmark = avalanche_benchmark(av, prefix, arrivals, seed, transform, config, held_out)
        for strategy in STRATEGIES:
            for arm, patience in avalanche_arms(strategy, args).items():
                runs[arm] = avalanche_run(av, strategy, config.replace(seed=seed), benchmark, len(arrivals.old_names), first_epochs=args.epochs,
                                          steps=args.steps, memory=memory, eval_every=args.steps_per_epoch, patience=patience)
        for arm, m in runs.items():
            print(f"{arm}, seed {seed}: first model old {m['first_old_acc']:.3f}; after the new classes old {m['old_acc']:.3f}, new {m['new_acc']:.3f}, "
                  f"all {m['all_acc']:.3f}; {m['steps']} steps", flush=True)
        return runs

    seeds_runs = {seed: per_seed(seed) for seed in args.seeds}
    pairs = [(arm, tl) for strategy, tl in STRATEGIES.items() for arm in avalanche_arms(strategy, args)]  # (Avalanche run, tlkit run)
    order = [arm for strategy, tl in STRATEGIES.items() for arm in (tl, *avalanche_arms(strategy, args))]
    comparison = tlkit.compare_arms({arm: (lambda s, arm=arm: seeds_runs[s][arm]) for arm in order}, args.seeds, metric="all_acc")
    metrics = ["first_old_acc", *(f"{g}_acc" for g in GROUPS), "steps"]
    print()
    print(comparison.summary(metrics).round(3).to_string())
    print()
    gaps = {(a, m): tlkit.compare.paired_difference(comparison.rows, "arm", a, b, m) for a, b in pairs for m in metrics[1:4]}
    print(*(gap.sentence() for gap in gaps.values()), sep="\n")
    summary = comparison.summary(metrics)

    def text(arm: str) -> str:
        return f"{arm} {summary.loc[arm, 'all_acc']:.3f} ± {summary.loc[arm, 'all_acc std']:.3f}"

    def gap(arm: str) -> str:
        d = gaps[arm, "all_acc"]
        return f"minus tlkit {100 * d.mean:+.1f} points" + (f", 95% interval {100 * d.low:+.1f} to {100 * d.high:+.1f}" if d.seeds > 1 else ", one seed")

    by_strategy = [f"{text(tl)}, " + ", ".join(f"{text(arm)} ({gap(arm)})" for arm, same in pairs if same == tl) for tl in STRATEGIES.values()]
    print(f"result: all-classes test accuracy after the new classes, {'; '.join(by_strategy)}; over {len(args.seeds)} seeds")


if __name__ == "__main__":
    main()
