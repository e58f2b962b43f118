"""Loss terms for data-free federated distillation (FedIOD-style), for classification and segmentation.

Modules:

* :mod:`.ensemble` — expertise weights from class counts (:func:`site_weights`, :func:`withheld_sites`,
  :func:`contrast_counts` for sites that saw a class against the others),
  pooled class prior (:func:`class_prior_from_counts`) and per-class weights from it (:func:`class_balance_weights`), class-share weighted ensemble
  (:func:`ensemble_log_probabilities`, :func:`ensemble_probabilities`);
* :mod:`.distillation` — :class:`DistillationLoss`, :class:`ConsensusLoss`, :class:`EntropyLoss`,
  :class:`BalanceLoss`, :class:`ConditionalCrossEntropyLoss`, :class:`LayoutDiceLoss`, :class:`AdversarialLoss`;
* :mod:`.priors` — priors on x: :class:`TotalVariationLoss`, :class:`DiversityLoss`, :class:`BatchNormStatisticsLoss`,
  :class:`ClassIntensityLoss` and :class:`ClassGradientLoss` (the sites' per-class statistics, segmentation layouts),
  :func:`bn_statistics_loss`, :func:`has_batchnorm`.

Conventions: logits ``(B, N)`` or ``(B, N, *spatial)`` with classes on dim 1; per-sample/voxel values are
averaged over dim 0 and the spatial dims (``reduction="mean"``); each module returns ``weight * value``;
everything is computed in log space (finite values and gradients for any finite logits).
"""

from .distillation import (
    AdversarialLoss,
    BalanceLoss,
    ConditionalCrossEntropyLoss,
    ConsensusLoss,
    DistillationLoss,
    EntropyLoss,
    LayoutDiceLoss,
    entropy,
    generalized_js_divergence,
)
from .ensemble import ENSEMBLE_COMBINATIONS, class_balance_weights, class_prior_from_counts, contrast_counts, ensemble_log_probabilities, ensemble_probabilities, site_weights, withheld_sites
from .priors import (
    BatchNormStatisticsLoss,
    ClassGradientLoss,
    ClassIntensityLoss,
    DiversityLoss,
    TotalVariationLoss,
    bn_statistics_loss,
    has_batchnorm,
    neighbour_differences,
)

__all__ = [
    "AdversarialLoss",
    "BalanceLoss",
    "BatchNormStatisticsLoss",
    "ClassGradientLoss",
    "ClassIntensityLoss",
    "ConditionalCrossEntropyLoss",
    "ConsensusLoss",
    "DistillationLoss",
    "DiversityLoss",
    "EntropyLoss",
    "LayoutDiceLoss",
    "TotalVariationLoss",
    "bn_statistics_loss",
    "class_balance_weights",
    "class_prior_from_counts",
    "ENSEMBLE_COMBINATIONS",
    "ensemble_log_probabilities",
    "ensemble_probabilities",
    "entropy",
    "generalized_js_divergence",
    "has_batchnorm",
    "neighbour_differences",
    "site_weights",
    "contrast_counts",
    "withheld_sites",
]
