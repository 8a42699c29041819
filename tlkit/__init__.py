"""tlkit: the helper package of the transfer-learning course.

The public API is what this module exports; submodules hold the details. Batch runs of the notebooks
live in ``tlkit.sweep`` (``python -m tlkit.sweep``), imported only when used.
"""

import sys

from ._version import __version__
from .augment import (
    MIXES,
    PRESETS,
    AugmentationDisablesCacheWarning,
    BatchTransform,
    DeviceBatches,
    InMemoryImages,
    augment_on_device,
    augmentation_grid,
    augmented_loader,
    batch_mix,
    device_loader,
    feature_cache_allowed,
    fine_tune_augmented,
    mix_collate,
    preset_table,
    show_batch,
    to_pil,
    train_preset,
)
from .checkpoints import (
    Checkpoint,
    CheckpointError,
    CheckpointSaveError,
    load_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .compare import check_seeds, headline_metrics, mean_std_table, ranking_sentence, summarize_seeds, versus_sentence
from .data import (
    REGISTERED_DATASETS,
    DatasetSplits,
    DatasetUnavailableError,
    LabeledImages,
    NestedFoldersWarning,
    SkippedFilesWarning,
    UnreadableImageError,
    Upright,
    class_counts,
    eval_transform,
    image_folder,
    limit_per_class,
    load_dataset,
    make_loader,
    stratified_split,
    to_rgb,
    train_transform,
    upright,
)
from .feature_store import cached_features, features_key
from .finetune import (
    BN_MODES,
    STRATEGIES,
    GradualUnfreezing,
    add_conv_block,
    apply_strategy,
    blocks_below_head,
    feature_map_shape,
    fine_tune,
    freeze_batchnorm,
    group_table,
    lr_multipliers,
    make_optimizer,
    param_groups,
    plot_val_accuracy,
    run_strategy,
    trainable_tensor_names,
    unfreeze_blocks,
    unfreeze_into,
    unfreeze_last_blocks,
    unfreeze_last_tensors,
)
from .imbalance import (
    REMEDIES,
    FocalLoss,
    LogitAdjustedLoss,
    Remedy,
    RemedyRun,
    adjust_probabilities,
    class_weights,
    effective_number_weights,
    fit_head_with_remedy,
    label_counts,
    logit_adjusted_loss,
    logit_offsets,
    long_tail_counts,
    long_tail_subset,
    make_long_tailed,
    make_remedy,
    oversampling_sampler,
    plot_class_counts,
    undersample,
    validate_remedies,
)
from .incremental import (
    AccuracyTracker,
    ContinuedRun,
    DistillationLoss,
    continue_training,
    expand_head,
    group_accuracy,
    select_classes,
    with_classes,
    with_replay,
    without,
)
from .lr_finder import SUGGESTION_RULE, LRFinderResult, batchnorm_report, lr_find
from .metrics import (
    average_precision_per_class,
    classification_metrics,
    per_class_recall,
    per_class_report,
    plot_per_class_recall,
    plot_pr_curves,
    reweighted_accuracy,
)
from .models import (
    MIN_IMAGE_SIZE,
    OFFLINE_BACKBONE,
    TIMM_PREFIX,
    TimmBackboneError,
    TransferModel,
    WeightsUnavailableError,
    available_backbones,
    block_names,
    check_image_size,
    create_model,
    freeze,
    has_batchnorm,
    imagenet_categories,
    parameter_counts,
    set_trainable,
    trainable_blocks,
    unfreeze,
)
from .params import (
    check_bool,
    check_dataset,
    check_float,
    check_int,
    check_notebook_parameters,
    check_parameters,
    check_seed,
    check_seed_list,
    check_str,
    parse_dict,
    parse_list,
    resolve_path,
)
from .plots import (
    LiveCurves,
    compare_histories,
    plot_confusion_matrix,
    plot_history,
    plot_seed_curves,
    plot_seed_summary,
    plot_tracked,
    save_figure,
    show_images,
)
from .prefix_cache import PrefixCache, PrefixCacheStats, PrefixCacheTooLargeError, SuffixModel, cached_prefix, forward_from, prefix_boundary
from .recipes import RunResult, evaluate_on, linear_probe, train_all
from .results import write_results
from .train import (
    Callback,
    EarlyStopping,
    FitState,
    History,
    RepeatedFitWarning,
    RestoreBest,
    SaveCheckpoint,
    TrainingInterrupted,
    below_head_frozen,
    check_head_fits,
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
from .widgets import FreezePanel

# Everything imported above, and nothing else (the submodules stay reachable as tlkit.<module>).
__all__ = sorted(name for name, value in globals().items() if not name.startswith("_") and not isinstance(value, type(sys)))
