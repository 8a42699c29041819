"""The command line of the workflow's last step: a saved model predicts on new images, outside a notebook.

    python -m tlkit.predict outputs/05_updated_model.pt photos/ --out predictions.csv
    python -m tlkit.predict model.pt a.jpg b.png --top-k 5 --image-size 160 --device cuda

One CSV row per file (folders read as training reads them: recursively, links followed, hidden and system files
skipped; images read upright): its top-k classes and probabilities; a file that cannot be read is listed in the
``error`` column and on stderr, and the rest are still predicted. Images are resized to the size recorded in the
checkpoint unless ``--image-size`` is given. The device is chosen as everywhere in tlkit ("auto": CUDA when present).

Nothing is overwritten but a CSV: ``--out`` may not be the checkpoint or an input, an existing file that is not a
``.csv`` is replaced only with ``--force``, and the CSV is written atomically. A bad argument, checkpoint or ``--out``
is one line on stderr and exit status 2, before any image is predicted.

This module is only run, never imported: ``tlkit.predict`` is the function that predicts a loader, and importing a
submodule of the same name would replace it on the package. Scripts call ``tlkit.inference.predict_files``, which
this command runs (``python -m tlkit.inference`` is the same command).
"""

from __future__ import annotations

import sys

from .inference import main

if __name__ != "__main__":
    raise ImportError(
        "tlkit.predict is a command (python -m tlkit.predict CHECKPOINT FOLDER_OR_IMAGES --out predictions.csv), not a "
        "module to import: tlkit.predict is the function that predicts a loader. In a script, use "
        "tlkit.inference.predict_files(checkpoint, [folder])."
    )

sys.exit(main(prog="python -m tlkit.predict"))
