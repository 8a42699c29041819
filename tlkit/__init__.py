"""tlkit: the helper package of the transfer-learning course.

``__all__`` is the course's public API, grouped by the notebook that introduces each name. The building blocks
of one lesson stay in that lesson's module and are reached through it (``tlkit.finetune``, ``tlkit.augment``,
``tlkit.imbalance``, ``tlkit.incremental``, ``tlkit.features``), as are the lower layers (``tlkit.transforms``,
``tlkit.models``, ``tlkit.data``, ``tlkit.train``, ``tlkit.metrics``, ``tlkit.plots``). Batch runs of the notebooks
live in ``tlkit.sweep`` (``python -m tlkit.sweep``), imported only when used.
"""

from . import augment, features, finetune, imbalance, incremental, lr_finder, metrics, models, optim, plots, prefix_cache, transforms
from ._version import __version__
from .checkpoints import model_from_checkpoint, read_checkpoint
from .compare import (
    Comparison,
    PairedDifference,
    compare_arms,
    headline_metrics,
    mean_std_table,
    paired_difference,
    ranking_sentence,
    summarize_seeds,
    versus_sentence,
)
from .data import DatasetSplits, LabeledImages, class_counts, load_dataset, make_loader
from .features import cached_features, extract_features
from .finetune import STRATEGIES, apply_strategy
from .imbalance import REMEDIES
from .lesson import Lesson, start_lesson
from .lr_finder import lr_find
from .metrics import classification_metrics
from .models import (
    TransferModel,
    block_names,
    create_model,
    freeze,
    imagenet_categories,
    parameter_counts,
    set_trainable,
    trainable_blocks,
    unfreeze,
)
from .notebook_params import check_notebook_parameters
from .optim import make_optimizer
from .params import resolve_path
from .plots import (
    LiveCurves,
    compare_histories,
    plot_confusion_matrix,
    plot_history,
    plot_lr_find,
    plot_seed_curves,
    plot_seed_summary,
    save_figure,
    show_images,
)
from .prefix_cache import PrefixCache
from .recipes import (
    RunConfig,
    RunResult,
    continue_training,
    evaluate_on,
    fine_tune_augmented,
    fit_head_with_remedy,
    linear_probe,
    run_strategy,
    train_all,
)
from .results import write_results
from .train import (
    Callback,
    EarlyStopping,
    History,
    NonFiniteLossError,
    RestoreBest,
    SaveCheckpoint,
    TrainingInterrupted,
    evaluate,
    fit,
    fit_head,
    get_device,
    predict,
    predict_images,
    set_seed,
)
from .transforms import PRESETS, eval_transform, train_transform
from .widgets import FreezePanel

__all__ = [
    # every notebook: setup, data, models, results
    "start_lesson", "Lesson", "set_seed", "get_device", "check_notebook_parameters", "resolve_path", "write_results",
    "DatasetSplits", "LabeledImages", "load_dataset", "class_counts", "make_loader", "eval_transform", "train_transform",
    "TransferModel", "create_model", "block_names", "parameter_counts",
    "RunConfig", "RunResult",
    # comparing methods over seeds
    "compare_arms", "Comparison", "paired_difference", "PairedDifference",
    "summarize_seeds", "mean_std_table", "versus_sentence", "ranking_sentence", "headline_metrics",
    # training and prediction
    "fit", "History", "Callback", "EarlyStopping", "RestoreBest", "SaveCheckpoint", "TrainingInterrupted", "NonFiniteLossError",
    "evaluate", "predict", "predict_images",
    # figures
    "save_figure", "show_images", "LiveCurves", "plot_history", "compare_histories", "plot_confusion_matrix",
    "plot_seed_summary", "plot_seed_curves",
    # 01 feature extraction
    "freeze", "extract_features", "cached_features", "fit_head", "imagenet_categories", "linear_probe", "train_all", "evaluate_on",
    # 02 partial unfreezing
    "unfreeze", "set_trainable", "trainable_blocks", "STRATEGIES", "apply_strategy", "run_strategy", "make_optimizer",
    "lr_find", "plot_lr_find", "PrefixCache", "FreezePanel",
    # 03 augmentation
    "PRESETS", "fine_tune_augmented",
    # 04 class imbalance
    "REMEDIES", "fit_head_with_remedy", "classification_metrics",
    # 05 adding samples and classes
    "continue_training", "read_checkpoint", "model_from_checkpoint",
]
