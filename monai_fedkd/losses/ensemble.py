"""Site expertise weights, class priors from the sites' class counts, and the class-share weighted ensemble.

Conventions (all of :mod:`monai_fedkd.losses`): site logits are ``(B, N)`` (classification) or
``(B, N, *spatial)`` (segmentation, voxel-wise); the class dimension is dim 1. ``K`` sites' outputs are
given as a sequence of such tensors or as one stacked ``(K, B, N, *spatial)`` tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._utils import check_nonnegative_weights, check_temperature, stack_sites

__all__ = [
    "ENSEMBLE_COMBINATIONS",
    "site_weights",
    "contrast_counts",
    "withheld_sites",
    "class_prior_from_counts",
    "class_balance_weights",
    "ensemble_log_probabilities",
    "ensemble_probabilities",
]


def _validated_counts(class_counts: Sequence[Sequence[float] | None], num_classes: int | None) -> dict[int, torch.Tensor]:
    """``{site index: (N,) float64 counts}`` for the sites that publish counts; checks values and lengths."""
    counts: dict[int, torch.Tensor] = {}
    for k, c in enumerate(class_counts):
        if c is None:
            continue
        arr = torch.as_tensor(c, dtype=torch.float64).reshape(-1)
        if arr.numel() == 0 or not bool(torch.isfinite(arr).all()) or bool((arr < 0).any()):
            raise ValueError(f"site {k}: class counts {list(c)} must be a non-empty list of non-negative numbers")
        if num_classes is not None and arr.numel() != num_classes:
            raise ValueError(f"site {k}: {arr.numel()} class counts but num_classes is {num_classes}")
        counts[k] = arr
    lengths = {arr.numel() for arr in counts.values()}
    if len(lengths) > 1:
        raise ValueError(f"sites disagree on the number of classes in their class counts: {sorted(lengths)}")
    return counts


def withheld_sites(class_counts: Sequence[Sequence[float] | None]) -> list[int]:
    """Indices of the sites whose class counts are ``None`` (withheld), e.g. for the caller's log."""
    return [k for k, c in enumerate(class_counts) if c is None]


def site_weights(class_counts: Sequence[Sequence[float] | None], num_classes: int) -> torch.Tensor:
    """Per-class expertise weights ``W[k, c] = n[k, c] / sum_j n[j, c]`` of ``K`` sites.

    Args:
        class_counts: one entry per site: its training samples per class (classification) or voxels per
            class (segmentation), length ``num_classes``; ``None`` when the site withholds its counts.
        num_classes: ``N``.

    Returns:
        ``(K, N)`` float tensor (default dtype) with every column summing to one:

        * a site with ``None`` counts gets ``1/K`` in every class; the ``K - m`` sites with counts share the
          remaining ``(K - m)/K`` of each class in proportion to their counts (``m``: withheld sites);
        * a class that no site with counts holds (total count 0), or every class when no site publishes
          counts, gets ``1/K`` for every site.

        Use :func:`withheld_sites` for the indices of the sites that withheld their counts (to log them).
        Matches :func:`monai_fedkd.evaluation.evaluate.class_count_weights` (the ``ensemble_weighted`` model).
    """
    k_sites = len(class_counts)
    if k_sites == 0:
        raise ValueError("site_weights needs at least one site")
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    counts = _validated_counts(class_counts, num_classes)
    weights = torch.full((k_sites, num_classes), 1.0 / k_sites, dtype=torch.float64)
    if counts:
        known = sorted(counts)
        stacked = torch.stack([counts[k] for k in known])  # (K_known, N)
        total = stacked.sum(0)
        share = len(known) / k_sites
        has = total > 0
        proportional = share * stacked / torch.where(has, total, torch.ones_like(total))
        weights[known] = torch.where(has.unsqueeze(0), proportional, weights[known])
    return weights.to(torch.get_default_dtype())


def contrast_counts(class_counts: Sequence[Sequence[float] | None]) -> list[list[float] | None]:
    """How much each site saw of each class *against the others*: ``2 n[k, c] (n[k] - n[k, c]) / n[k]``.

    A site's class count says how much it knows of a class only if it also saw other classes: a site trained on
    one class alone answers that class for every input, and weighting it by its count makes the ensemble say that
    class everywhere (extreme label skew, e.g. Dirichlet alpha 0.1). The harmonic-mean form is ``n[k]`` for a
    balanced site, ``~2 n[k, c]`` for a rare class and 0 for a site of one class. Withheld counts stay ``None``;
    :func:`site_weights` of these values weights every site alike in a class that no site contrasts.
    """
    out: list[list[float] | None] = []
    for c in class_counts:
        if c is None:
            out.append(None)
            continue
        arr = torch.as_tensor(c, dtype=torch.float64).reshape(-1)
        total = float(arr.sum())
        out.append([0.0] * arr.numel() if total <= 0 else (2 * arr * (total - arr) / total).tolist())
    return out


def class_prior_from_counts(class_counts: Sequence[Sequence[float] | None], num_classes: int | None = None) -> torch.Tensor:
    """Pooled class frequencies ``prior[c] = sum_k n[k, c] / sum_{k, c'} n[k, c']`` over the sites.

    Sites with ``None`` counts are skipped. Returns ``(N,)`` (default dtype) summing to one; uniform when no
    site publishes counts (then ``num_classes`` is required) or all counts are zero. For segmentation pass
    voxel counts per class: the prior is the pooled voxel-class frequency (background included).
    """
    counts = _validated_counts(class_counts, num_classes)
    if not counts:
        if num_classes is None:
            raise ValueError("no site publishes class counts: num_classes is needed for the uniform prior")
        return torch.full((int(num_classes),), 1.0 / int(num_classes))
    total = torch.stack(list(counts.values())).sum(0)
    if float(total.sum()) <= 0:
        return torch.full((total.numel(),), 1.0 / total.numel())
    return (total / total.sum()).to(torch.get_default_dtype())


def class_balance_weights(prior: Sequence[float] | torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Per-class weights ``w[c] ~ prior[c] ** -power`` that rebalance a loss averaged over voxels (or samples).

    Scaled so that ``sum_c prior[c] w[c] = 1``: under the prior the weighted loss keeps its unweighted scale, while
    a class at a hundredth of the background's frequency counts up to a hundred times as much per voxel (``power``
    1; 0.5 the square root of that; 0 every class alike). A class of prior 0 gets weight 0 (it is never a target).
    Returns ``(N,)`` (default dtype).
    """
    power = float(power)
    if not math.isfinite(power) or power < 0:
        raise ValueError(f"power must be a finite number >= 0, got {power}")
    prior = check_nonnegative_weights(prior, "prior")
    prior = prior / prior.sum()
    seen = prior > 0
    weights = torch.zeros_like(prior)
    weights[seen] = prior[seen].pow(-power)
    return weights / (prior * weights).sum()


#: how :func:`ensemble_log_probabilities` combines the sites: a weighted mean of probabilities, or of log-probabilities
ENSEMBLE_COMBINATIONS = ("mixture", "product")


def _shaped_weights(weights: torch.Tensor, k_sites: int, ndim: int, ref: torch.Tensor) -> torch.Tensor:
    """Checked ``W`` shaped ``(K, 1, N or 1, 1, ...)`` to broadcast against stacked ``(K, B, N, *spatial)``."""
    w = torch.as_tensor(weights, dtype=ref.dtype, device=ref.device)
    if w.ndim == 1:
        w = w.unsqueeze(1)  # (K, 1): the same weight for every class
    if w.ndim != 2 or w.shape[0] != k_sites or w.shape[1] not in (1, ref.shape[2]):
        raise ValueError(f"weights must be (K,) or (K, N) = ({k_sites}, {ref.shape[2]}), got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    if bool((w.sum(0) <= 0).any()):
        raise ValueError("every class needs a positive weight for at least one site")
    return w.detach().reshape(k_sites, 1, w.shape[1], *([1] * (ndim - 3)))


class _LogMixture(torch.autograd.Function):
    """``log p = a - logsumexp_c a`` with ``a = logsumexp_k(log W_k + log_softmax(f_k))``, with its closed-form gradient.

    Backward: ``g_a = G - q sum_c G`` (``q = p`` the output), ``h_k = r_k g_a`` with the responsibilities
    ``r_k = W_k p_k / m``, then the log-softmax's own ``h_k - p_k sum_c h_k``: a few elementwise passes where
    autograd through two logsumexps took many (voxel-wise in 3D this is a large share of the server's step).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits, dim=2)  # (K, B, N, ...)
        joint = log_w + log_p
        mixed = torch.logsumexp(joint, dim=0)  # (B, N, ...)
        out = mixed - torch.logsumexp(mixed, dim=1, keepdim=True)  # exact renormalisation over the classes
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(joint.sub_(mixed).exp_(), log_p.exp_(), out)  # r_k, p_k, log q
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        r, p, out = ctx.saved_tensors
        g_a = grad - out.exp() * grad.sum(1, keepdim=True)
        h = r * g_a.unsqueeze(0)
        return h - p * h.sum(2, keepdim=True), None


def ensemble_log_probabilities(
    site_logits: Sequence[torch.Tensor] | torch.Tensor,
    weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    combination: str = "mixture",
) -> torch.Tensor:
    """Log-probabilities of the class-share weighted ensemble, computed in log space.

    ``p[c] = sum_k W[k, c] softmax(f_k / T)[c]``, renormalised over the classes (dim 1), evaluated as
    ``a[c] = logsumexp_k(log W[k, c] + log_softmax(f_k / T)[c])``, ``log p = a - logsumexp_c a``: finite and
    with finite gradients for any finite logits (also ``|f| ~ 1e4``). Differentiable w.r.t. every site's
    logits (``weights`` are treated as constants).

    Args:
        site_logits: ``K`` tensors ``(B, N, *spatial)`` or one ``(K, B, N, *spatial)`` tensor.
        weights: ``(K, N)`` per-class site weights (e.g. :func:`site_weights`), ``(K,)`` per-site weights,
            or ``None`` for the plain mean of the sites' softmax probabilities. Zero entries are allowed
            (that site does not contribute to that class) but every class needs one positive weight.
        temperature: ``T > 0`` applied to every site's logits.
        combination: ``"mixture"`` (above), or ``"product"``: a product of experts,
            ``log p[c] = sum_k W[k, c] log_softmax(f_k / T)[c]`` with ``W`` normalised to sum to one over the sites
            of each class (``None``: ``1 / K``), renormalised over the classes: the weighted geometric mean of the
            sites' probabilities. A mixture of saturated probabilities loses what a site that saw one class still
            knows (how much less sure it is away from its class); the product keeps every site's log-odds.

    Returns:
        ``(B, N, *spatial)`` log-probabilities (``logsumexp`` over dim 1 is 0).
    """
    temperature = check_temperature(temperature)
    if combination not in ENSEMBLE_COMBINATIONS:
        raise ValueError(f"combination must be one of {ENSEMBLE_COMBINATIONS}, got {combination!r}")
    stacked = stack_sites(site_logits)
    k_sites = stacked.shape[0]
    if combination == "product":
        log_p = torch.log_softmax(stacked / temperature, dim=2)
        w = _shaped_weights(torch.ones(k_sites) if weights is None else weights, k_sites, stacked.ndim, stacked)
        # a zero weight times a finite log-probability (log_softmax of finite logits) contributes exactly 0
        summed = (w / w.sum(0, keepdim=True) * log_p).sum(0)
        return summed - torch.logsumexp(summed, dim=1, keepdim=True)
    if weights is None:
        log_w = torch.full((k_sites, *([1] * (stacked.ndim - 1))), -math.log(k_sites), dtype=stacked.dtype, device=stacked.device)
    else:  # zero weights -> log 0 = -inf: that site does not contribute to that class
        log_w = torch.log(_shaped_weights(weights, k_sites, stacked.ndim, stacked))
    return _LogMixture.apply(stacked / temperature, log_w)


def ensemble_probabilities(
    site_logits: Sequence[torch.Tensor] | torch.Tensor,
    weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    combination: str = "mixture",
) -> torch.Tensor:
    """``exp`` of :func:`ensemble_log_probabilities`: ``(B, N, *spatial)`` probabilities summing to one over dim 1.

    ``weights=None`` gives the plain mean of ``softmax(f_k / T)``; one-hot site weights give that site's softmax.
    """
    return ensemble_log_probabilities(site_logits, weights, temperature, combination).exp()
