"""Evaluation of site models, their ensembles and (later) distilled models on test datalists.

See :mod:`monai_fedkd.evaluation.evaluate` for the metrics and the output files.
"""

from monai_fedkd.evaluation.evaluate import (
    ENSEMBLE_MEAN,
    ENSEMBLE_WEIGHTED,
    POOLED,
    EvaluationError,
    add_evaluate_arguments,
    check_ensemble_compatible,
    class_count_weights,
    classification_metrics,
    combine_probabilities,
    dice_per_class,
    evaluate_models,
    format_markdown,
    kwargs_from_args,
    main,
    primary_table,
    run_evaluate,
    segmentation_metrics,
)

__all__ = [
    "ENSEMBLE_MEAN",
    "ENSEMBLE_WEIGHTED",
    "POOLED",
    "EvaluationError",
    "add_evaluate_arguments",
    "check_ensemble_compatible",
    "class_count_weights",
    "classification_metrics",
    "combine_probabilities",
    "dice_per_class",
    "evaluate_models",
    "format_markdown",
    "kwargs_from_args",
    "main",
    "primary_table",
    "run_evaluate",
    "segmentation_metrics",
]
