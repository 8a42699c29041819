"""Reference: the real fastai ``Learner.fine_tune`` beside tlkit's ``fastai_fine_tune`` row of notebook 02, in one run.

Per seed, three runs on the same photos (``tlkit.load_dataset(dataset, seed=s, samples_per_class=n)``), backbone
(EfficientNet-Lite0, ImageNet weights, 128 px, batch 32) and budget (12 epochs):

* **fastai**: the ``fastai`` package (2.8.12, the optional ``reference`` extra) trains tlkit's Lite0 body
  (``tlkit.create_model(...).features``) under fastai's own head (``create_head``: concat pooling, BatchNorm,
  dropout, a 512-unit hidden layer) with fastai's two parameter groups (body, head: ``default_split``), its default
  optimizer (Adam, decoupled weight decay 0.01), ``train_bn`` and ``Learner.fine_tune(epochs - 1, base_lr,
  freeze_epochs=1)``. Item transform: tlkit's ``basic`` augmentation (random resized crop and flip), not fastai's
  ``aug_transforms``; its training loader drops the last partial batch, as fastai's ``dataloaders`` do.
* **tlkit fastai_fine_tune**: ``tlkit.run_strategy(config, splits, "fastai_fine_tune", head_epochs=1)``, notebook 02's
  row (tlkit's linear head, the slice spread over the 10 blocks, no weight decay, no augmentation).
* **tlkit head**: the linear head alone on the frozen backbone, the notebook's reference (one cycle, prefix cache).

The same base LR for all three (``--lr``; by default notebook 02's rule: the LR finder's suggestion for the head on the
first seed's cached features): fastai's ``base_lr`` and tlkit's ``config.lr``, both then halved for the second phase.
Prints each run, the mean ± std over seeds of val accuracy (last epoch), test accuracy and seconds of training
(with the validation passes), the paired per-seed differences with their 95% intervals, and last the result line.

    make reference                                  # once: installs the pinned fastai stack into .venv (torch unchanged)
    python bench/fastai_reference.py                # seeds 0 1 2, 20 photos per class of the bundled clothing set
    python bench/fastai_reference.py --seeds 0 --epochs 2 --samples-per-class 5   # a quick check
"""

from __future__ import annotations

import argparse
import time
from types import ModuleType

import torch
from torch import nn

import tlkit
from tlkit.data import TransformedDataset
from tlkit.transforms import eval_transform, train_transform

FASTAI = "fastai fine_tune"
TLKIT = "tlkit fastai_fine_tune"
HEAD = "tlkit head"


def import_fastai() -> ModuleType:
    """``fastai.vision.all``, or SystemExit saying how to install the pinned reference extra."""
    try:
        from fastai.vision import all as fastai_vision
    except ImportError as err:
        raise SystemExit(
            f"bench/fastai_reference.py runs the real fastai package, which is not importable here ({err}). Install the "
            "pinned stack of pyproject.toml's 'reference' extra with `make reference` (pip install --no-deps into .venv, so "
            "torch stays as it is), then run `.venv/bin/python bench/fastai_reference.py` again. fastai is optional: the "
            "course and its tests never need it."
        ) from err
    return fastai_vision


def head_lr(config: tlkit.RunConfig, splits) -> float:
    """Notebook 02's rule: the LR finder's suggestion for the linear head, on the frozen backbone's cached features."""
    tlkit.set_seed(config.seed)
    model = tlkit.freeze(tlkit.create_model(config.backbone, len(splits.classes), config.weights))
    loader = tlkit.make_loader(splits.train, eval_transform(config.image_size, model.normalization), config.batch_size, shuffle=False)
    features = tlkit.extract_features(model, loader, config.device, progress=False)
    return tlkit.lr_find(model, tlkit.make_loader(features, None, config.batch_size, shuffle=True, seed=config.seed)).suggestion


def fastai_loader(fv: ModuleType, ds, transform, config: tlkit.RunConfig, *, train: bool = False):
    """A fastai DataLoader over ``ds`` with a tlkit transform; for training shuffled, the last partial batch dropped (as fastai's
    ``dataloaders`` do); in this process (tlkit's loaders use no workers either)."""
    return fv.DataLoader(TransformedDataset(ds, transform), bs=config.batch_size, shuffle=train, drop_last=train, num_workers=0,
                         device=config.device)


def fastai_fine_tune(fv: ModuleType, config: tlkit.RunConfig, splits) -> dict[str, float]:
    """fastai's recipe on tlkit's Lite0 body: val and test accuracy, and the seconds ``Learner.fine_tune`` took."""
    fv.set_seed(config.seed)
    body = tlkit.create_model(config.backbone, len(splits.classes), config.weights)
    head = fv.create_head(body.num_features, len(splits.classes))  # doubles the features itself for concat pooling
    fv.apply_init(head, nn.init.kaiming_normal_)  # as vision_learner does
    net = nn.Sequential(body.features, head)
    augment = train_transform(config.image_size, body.normalization, "basic")
    plain = eval_transform(config.image_size, body.normalization)
    dls = fv.DataLoaders(fastai_loader(fv, splits.train, augment, config, train=True), fastai_loader(fv, splits.val, plain, config))
    learn = fv.Learner(dls, net, loss_func=fv.CrossEntropyLossFlat(), metrics=fv.accuracy, splitter=fv.default_split)
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(config.epochs - 1, base_lr=config.lr, freeze_epochs=1)
        seconds = time.perf_counter() - start
        groups = [f"{sum(p.numel() for p in group):,} parameters, weight decay {hyper['wd']}" for group, hyper in zip(learn.opt.param_lists, learn.opt.hypers)]
        print(f"fastai, seed {config.seed}: parameter groups (body; head): {'; '.join(groups)}", flush=True)
        val_acc = float(learn.validate()[1])
        test_acc = float(learn.validate(dl=fastai_loader(fv, splits.test, plain, config))[1])
    return {"val_acc": val_acc, "test_acc": test_acc, "seconds": seconds}


def tlkit_run(config: tlkit.RunConfig, splits, strategy: str) -> dict[str, float]:
    """Notebook 02's run of ``strategy`` (head: its reference, one cycle on the cached features)."""
    options = dict(head_epochs=1) if strategy == "fastai_fine_tune" else dict(schedule="one_cycle", prefix_cache=True)
    run = tlkit.run_strategy(config, splits, strategy, **options)
    return {"val_acc": run.val_acc, "test_acc": tlkit.evaluate_on(run.model, splits.test, config)["acc"], "seconds": run.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="clothing")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples-per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=12, help="in all, the first with the head alone (default 12)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="base LR of every run (default: the LR finder's suggestion for the head)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2 (one with the head alone, then the rest), got {args.epochs}.")
    fv = import_fastai()  # before any training: a missing fastai fails in a second
    import fastai

    def data(seed):
        splits = tlkit.load_dataset(args.dataset, seed=seed, samples_per_class=args.samples_per_class)
        if splits.test is None:
            raise SystemExit(f"{args.dataset!r} has no test split; use a dataset with one (e.g. the bundled 'clothing').")
        return splits

    config = tlkit.RunConfig(image_size=args.image_size, epochs=args.epochs, seed=args.seeds[0], device=tlkit.get_device(args.device))
    lr = args.lr or head_lr(config, data(args.seeds[0]))
    config = config.replace(lr=lr)
    print(f"{args.dataset}, {args.samples_per_class} per class, seeds {args.seeds}, {args.epochs} epochs, {args.image_size} px, "
          f"batch {config.batch_size}, base lr {lr:.2e} ({'given' if args.lr else 'LR finder, head, seed ' + str(args.seeds[0])}), "
          f"device {config.device}, {torch.get_num_threads()} threads; fastai {fastai.__version__}, torch {torch.__version__}", flush=True)

    def logged(name, run):
        def arm(seed):
            metrics = run(config.replace(seed=seed), data(seed))
            print(f"{name}, seed {seed}: val {metrics['val_acc']:.3f}, test {metrics['test_acc']:.3f}, {metrics['seconds']:.1f} s", flush=True)
            return metrics
        return arm

    comparison = tlkit.compare_arms({
        FASTAI: logged(FASTAI, lambda c, s: fastai_fine_tune(fv, c, s)),
        TLKIT: logged(TLKIT, lambda c, s: tlkit_run(c, s, "fastai_fine_tune")),
        HEAD: logged(HEAD, lambda c, s: tlkit_run(c, s, "head")),
    }, args.seeds)
    print()
    print(comparison.summary(["val_acc", "test_acc", "seconds"]).round(3).to_string())
    print()
    for metric in ("val_acc", "test_acc", "seconds"):
        for difference in comparison.differences(metric).values():
            print(difference.sentence(higher_is_better=metric != "seconds"))  # fewer seconds is better
    summary, gaps = comparison.summary(["val_acc", "test_acc"]), comparison.differences("test_acc")
    print(f"result: test accuracy, fastai {summary.loc[FASTAI, 'test_acc']:.3f} ± {summary.loc[FASTAI, 'test_acc std']:.3f}, "
          f"tlkit fastai_fine_tune {summary.loc[TLKIT, 'test_acc']:.3f} ± {summary.loc[TLKIT, 'test_acc std']:.3f} "
          f"(minus fastai {100 * gaps[TLKIT].mean:+.1f} points, 95% interval {100 * gaps[TLKIT].low:+.1f} to {100 * gaps[TLKIT].high:+.1f}), "
          f"head {summary.loc[HEAD, 'test_acc']:.3f} ± {summary.loc[HEAD, 'test_acc std']:.3f} "
          f"(minus fastai {100 * gaps[HEAD].mean:+.1f} points, {100 * gaps[HEAD].low:+.1f} to {100 * gaps[HEAD].high:+.1f}), "
          f"over {len(args.seeds)} seeds")


if __name__ == "__main__":
    main()
