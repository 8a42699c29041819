"""Benchmark: head training on cached features (tlkit) vs the tutorial way (frozen backbone run every epoch).

Same backbone, same new head (same initial weights), same data, same batches and epochs. Prints the
time of each, their validation accuracies, the time of a repeated run that finds the features in
the on-disk cache (``tlkit.cached_features``, as in a sweep), and, last, the speed-up of the first run.

    python bench/feature_cache.py                                    # digits, 64 px
    python bench/feature_cache.py --dataset ../shared/data/hymenoptera_data --image-size 224
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import tlkit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--backbone", default=tlkit.models.OFFLINE_BACKBONE)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--samples-per-class", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = tlkit.get_device(args.device)
    splits = tlkit.load_dataset(args.dataset, data_root="data", seed=0, samples_per_class=args.samples_per_class)
    tlkit.set_seed(0)
    tutorial = tlkit.freeze(tlkit.create_model(args.backbone, len(splits.classes), "imagenet"))
    cached = tlkit.freeze(tlkit.create_model(args.backbone, len(splits.classes), "imagenet"))
    cached.head.load_state_dict(tutorial.head.state_dict())
    transform = tlkit.eval_transform(args.image_size, tutorial.normalization)
    print(f"{splits.name}: {len(splits.train)} train / {len(splits.val)} val images, {args.backbone} at "
          f"{args.image_size}px, {args.epochs} epochs, device {device}, {torch.get_num_threads()} threads")

    tlkit.set_seed(1)
    start = time.perf_counter()
    h_tutorial = tlkit.fit(
        tutorial,
        tlkit.make_loader(splits.train, transform, args.batch_size, shuffle=True, seed=0),
        tlkit.make_loader(splits.val, transform, args.batch_size, shuffle=False),
        epochs=args.epochs, lr=args.lr, device=device, progress=False,
    )
    t_tutorial = time.perf_counter() - start

    initial_head = {k: v.clone() for k, v in cached.head.state_dict().items()}
    cache_dir = tempfile.mkdtemp(prefix="tlkit-features-")

    def cached_run() -> tuple[float, float, tlkit.History]:
        cached.head.load_state_dict(initial_head)
        tlkit.set_seed(1)
        start = time.perf_counter()
        train, val = (
            tlkit.cached_features(cached, tlkit.make_loader(ds, transform, args.batch_size, shuffle=False), device,
                                  cache_dir=cache_dir, progress=False)
            for ds in (splits.train, splits.val)
        )
        t_extract = time.perf_counter() - start
        history = tlkit.fit_head(cached, train, val, epochs=args.epochs, batch_size=args.batch_size, seed=0, lr=args.lr,
                                 device=device, progress=False)
        return time.perf_counter() - start, t_extract, history

    t_cached, t_extract, h_cached = cached_run()
    t_repeat, t_read, h_repeat = cached_run()

    print(f"tutorial way (backbone every epoch): {t_tutorial:8.2f}s  val acc {h_tutorial.val_acc[-1]:.4f}")
    print(f"cached features (tlkit):            {t_cached:8.2f}s  val acc {h_cached.val_acc[-1]:.4f}"
          f"  (backbone pass {t_extract:.2f}s, head {t_cached - t_extract:.2f}s)")
    print(f"repeated run (features from disk):  {t_repeat:8.2f}s  val acc {h_repeat.val_acc[-1]:.4f}"
          f"  (cache read {t_read:.2f}s)  speedup {t_tutorial / t_repeat:.0f}x")
    print(f"accuracy difference {100 * (h_cached.val_acc[-1] - h_tutorial.val_acc[-1]):+.2f} points")
    print(f"speedup {t_tutorial / t_cached:.1f}x")


if __name__ == "__main__":
    main()
