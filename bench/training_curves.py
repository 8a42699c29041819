"""Training curves with the GPU figures tlkit records: fine-tune the last blocks and save the curves.

On a GPU the history holds, per epoch, training images/s, peak GPU memory and utilization, and
``tlkit.plot_history`` draws them beside loss and accuracy. Prints the per-epoch table and, last,
the median training throughput.

    python bench/training_curves.py --device cuda --image-size 224 --out outputs/gpu_curves.png
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd
import torch

import tlkit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--frozen-up-to", default="stage4", help="blocks up to this one stay frozen; the later ones train")
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("outputs/training_curves.png"))
    args = parser.parse_args()

    device = tlkit.get_device(args.device)
    splits = tlkit.load_dataset(args.dataset, data_root="data", seed=0)
    tlkit.set_seed(0)
    model = tlkit.freeze(tlkit.create_model(tlkit.models.OFFLINE_BACKBONE, len(splits.classes), "imagenet"), up_to=args.frozen_up_to)
    norm = model.normalization
    on_gpu = device.type == "cuda"
    if on_gpu:  # decoded once into memory, augmented on the GPU: the loader keeps up with the model
        train_loader = tlkit.augment.device_loader(tlkit.augment.InMemoryImages.from_dataset(splits.train, args.image_size), args.batch_size,
                                           device, tlkit.augment.BatchTransform(norm, "basic", image_size=args.image_size), shuffle=True)
        val_loader = tlkit.augment.device_loader(tlkit.augment.InMemoryImages.from_dataset(splits.val, args.image_size), args.batch_size,
                                         device, tlkit.augment.BatchTransform(norm, "none", image_size=args.image_size), shuffle=False)
    else:
        train_loader = tlkit.make_loader(splits.train, tlkit.train_transform(args.image_size, norm, "basic"), args.batch_size, shuffle=True)
        val_loader = tlkit.make_loader(splits.val, tlkit.eval_transform(args.image_size, norm), args.batch_size, shuffle=False)
    title = f"{splits.name}, {args.image_size}px, frozen up to {args.frozen_up_to}, {device}" + (", compiled" if args.compile else "")
    stepper = torch.compile(model) if args.compile else model  # shares the model's parameters
    history = tlkit.fit(stepper, train_loader, val_loader, epochs=args.epochs, lr=1e-3, device=device, progress=False,
                        callbacks=[tlkit.LiveCurves(title, args.out)])
    table = pd.DataFrame(history.to_dict()).drop(columns=["interrupted"]).set_index("epoch")
    print(f"{title}; torch {torch.__version__}" + (f", {torch.cuda.get_device_name(device)}" if on_gpu else ""))
    print(table.round(4).to_string())
    print(f"curves saved to {args.out}")
    print(f"median training throughput {statistics.median(history.images_per_s[1:] or history.images_per_s):.0f} images/s")


if __name__ == "__main__":
    main()
