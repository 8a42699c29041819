"""tlkit: the helper package of the transfer-learning course.

The public API is what this module exports; submodules hold the details.
"""

from .checkpoints import Checkpoint, CheckpointError, load_checkpoint, model_from_checkpoint, read_checkpoint, save_checkpoint
from .data import (
    REGISTERED_DATASETS,
    DatasetSplits,
    DatasetUnavailableError,
    LabeledImages,
    class_counts,
    eval_transform,
    image_folder,
    limit_per_class,
    load_dataset,
    make_loader,
    stratified_split,
    train_transform,
)
from .incremental import DistillationLoss, expand_head, select_classes, with_classes, with_replay
from .models import (
    OFFLINE_BACKBONE,
    TransferModel,
    WeightsUnavailableError,
    available_backbones,
    block_names,
    create_model,
    freeze,
    imagenet_categories,
    parameter_counts,
    set_trainable,
    trainable_blocks,
    unfreeze,
)
from .plots import LiveCurves, compare_histories, plot_confusion_matrix, plot_history, save_figure, show_images
from .recipes import RunResult, linear_probe, train_all
from .results import write_results
from .train import (
    History,
    below_head_frozen,
    evaluate,
    extract_features,
    fit,
    fit_head,
    get_device,
    is_deterministic,
    predict,
    predict_images,
    set_seed,
)

__version__ = "0.1.0"

__all__ = [name for name in dir() if not name.startswith("_")]
