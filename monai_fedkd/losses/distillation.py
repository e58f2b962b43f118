"""Output-side loss terms of FedIOD-style data-free federated distillation.

Conventions shared by every term here:

* logits are ``(B, N)`` (classification) or ``(B, N, *spatial)`` (segmentation, voxel-wise); the class
  dimension is dim 1. Per-element quantities are computed for every sample (and voxel) and have shape
  ``(B, *spatial)``; ``reduction="mean"`` (default) averages them over dim 0 and the spatial dims,
  ``"sum"`` sums them, ``"none"`` returns them.
* every module returns ``weight * value`` (``weight=0`` gives a zero that still carries the graph).
* everything is computed from ``log_softmax`` / ``logsumexp``: values and gradients are finite for any
  finite logits (also ``|logit| ~ 1e4`` on synthetic inputs); no clamping of probabilities, no ``log(0)``.
* "ensemble log-probabilities" are those of :func:`monai_fedkd.losses.ensemble_log_probabilities`;
  gradients flow through them into every site's logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import check_logits, check_nonnegative_weights, check_reduction, check_temperature, check_weight, reduce, stack_sites, xlogx

__all__ = [
    "DistillationLoss",
    "ConsensusLoss",
    "EntropyLoss",
    "BalanceLoss",
    "ConditionalCrossEntropyLoss",
    "LayoutDiceLoss",
    "AdversarialLoss",
    "generalized_js_divergence",
    "entropy",
]

_TEACHER_INPUTS = ("probs", "log_probs", "logits")
_PROBS_EPS = 1e-12  # BalanceLoss(input_type="probs") only: inside the log of the batch-mean probabilities


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def _check_kind(x: torch.Tensor, kind: str, who: str) -> None:
    """Catch probabilities passed where log-probabilities are expected (and the reverse): a clear error
    instead of a silently wrong value. Costs one reduction (a device sync on GPU)."""
    if kind == "log_probs" and bool((x.detach() > 1e-4).any()):
        raise ValueError(
            f"{who} expects log-probabilities (<= 0), got values > 0: pass ensemble_log_probabilities(...) "
            "or construct it with the input type 'probs'"
        )
    if kind == "probs" and bool(((x.detach() < -1e-6) | (x.detach() > 1 + 1e-4)).any()):
        raise ValueError(f"{who} expects probabilities in [0, 1], got values outside: pass ensemble_probabilities(...)")


def _kl_from_log(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-element ``KL(p || q) = sum_c p (log p - log q)`` over dim 1 from log-probabilities (finite)."""
    return (log_p.exp() * (log_p - log_q)).sum(1)


# ----------------------------------------------------------------------------------------------- distillation
class DistillationLoss(nn.Module):
    """Distil the student on the ensemble's answer.

    ``mode="kl"``: ``T^2 * KL(teacher || softmax(student / T))`` per sample/voxel (sum over classes), then
    reduced (``mean``: over samples and voxels). ``>= 0``, zero iff the student's tempered softmax equals
    the teacher. The ``T^2`` factor keeps gradient magnitudes comparable across temperatures. The teacher is

    * ``teacher_input="probs"`` (default for kl): ensemble probabilities, already at temperature ``T``
      (e.g. :func:`ensemble_probabilities(site_logits, W, temperature=T)`); ``0 log 0 = 0``;
    * ``"log_probs"``: ensemble log-probabilities at temperature ``T`` (most stable);
    * ``"logits"``: teacher logits; ``softmax(teacher / T)`` is used.

    ``dice_weight > 0`` (segmentation, ``mode="kl"``, ``reduction="mean"``) adds ``dice_weight`` times MONAI's soft
    Dice loss (:class:`monai.losses.DiceLoss` with ``soft_label=True``) between the student's tempered softmax and the
    teacher's probabilities, over the foreground classes, pooled over the batch. The voxel-wise KL is dominated by the
    background and the large structures; the Dice term weighs every class alike, as the metric the central model is
    judged by does, so that small structures the sites agree on are not traded away.

    ``mode="mse"``: ``mean_c (student - teacher)^2`` per sample/voxel; with ``reduction="mean"`` this is
    exactly ``F.mse_loss(student, teacher)`` (mean over all elements). This is the ``T -> inf`` limit of the
    KL term (up to constants), computed directly; ``temperature`` is ignored. The teacher must be logits
    (``teacher_input`` must be ``"logits"``, the default for mse), e.g. the mean of the sites' logits.

    Args:
        weight: scale of the returned value.
        mode: ``"kl"`` or ``"mse"``.
        temperature: ``T > 0`` (kl only).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B, *spatial)``).
        teacher_input: see above; ``None`` picks ``"probs"`` for kl and ``"logits"`` for mse.
        dice_weight: weight of the soft Dice term relative to the KL term (see above); 0: KL only.

    ``forward(student_logits, teacher)``: both ``(B, N, *spatial)`` of the same shape. Gradients flow into
    both arguments (detach the teacher to distil the student only).
    """

    def __init__(
        self,
        weight: float = 1.0,
        mode: str = "kl",
        temperature: float = 1.0,
        reduction: str = "mean",
        teacher_input: str | None = None,
        dice_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in ("kl", "mse"):
            raise ValueError(f"mode must be 'kl' or 'mse', got {mode!r}")
        if teacher_input is None:
            teacher_input = "probs" if mode == "kl" else "logits"
        if teacher_input not in _TEACHER_INPUTS:
            raise ValueError(f"teacher_input must be one of {_TEACHER_INPUTS}, got {teacher_input!r}")
        if mode == "mse" and teacher_input != "logits":
            raise ValueError("mode='mse' compares logits: teacher_input must be 'logits'")
        self.weight = check_weight(weight)
        self.mode = mode
        self.temperature = check_temperature(temperature)
        self.reduction = check_reduction(reduction)
        self.teacher_input = teacher_input
        self.dice_weight = check_weight(dice_weight)
        if self.dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0, got {dice_weight}")
        self.dice = None
        if self.dice_weight:
            if mode != "kl" or self.reduction != "mean":
                raise ValueError(f"dice_weight > 0 compares probabilities over a whole batch: it needs mode='kl' and reduction='mean', "
                                 f"got mode={mode!r}, reduction={self.reduction!r}")
            from monai.losses import DiceLoss

            self.dice = DiceLoss(include_background=False, batch=True, soft_label=True)

    def forward(self, student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        check_logits(student_logits, "student_logits")
        _same_shape(student_logits, teacher, "DistillationLoss student vs teacher")
        if self.dice is not None and (student_logits.ndim < 3 or student_logits.shape[1] < 2):
            raise ValueError(f"dice_weight > 0 is for segmentation logits (B, N >= 2, *spatial), got {tuple(student_logits.shape)}")
        if self.mode == "mse":
            per_element = (student_logits - teacher).pow(2).mean(1)
            return self.weight * reduce(per_element, self.reduction)
        t = self.temperature
        _check_kind(teacher, self.teacher_input, "DistillationLoss teacher")
        log_s = torch.log_softmax(student_logits / t, dim=1)
        if self.teacher_input == "probs":
            per_element = (xlogx(teacher) - teacher * log_s).sum(1)
        else:
            log_t = teacher if self.teacher_input == "log_probs" else torch.log_softmax(teacher / t, dim=1)
            per_element = _kl_from_log(log_t, log_s)
        value = (t * t) * reduce(per_element, self.reduction)
        if self.dice is not None:
            if self.teacher_input == "probs":
                teacher_probs = teacher
            else:
                teacher_probs = teacher.exp() if self.teacher_input == "log_probs" else torch.softmax(teacher / t, dim=1)
            value = value + self.dice_weight * self.dice(log_s.exp(), teacher_probs)
        return self.weight * value


# ------------------------------------------------------------------------------------------------- consensus
def _site_priors(pi: Sequence[float] | torch.Tensor | None, k_sites: int, ref: torch.Tensor) -> torch.Tensor:
    """Site weights ``pi`` as a ``(K,)`` tensor on ``ref``'s device, normalised to sum to one."""
    if pi is None:
        return torch.full((k_sites,), 1.0 / k_sites, dtype=ref.dtype, device=ref.device)
    pi = check_nonnegative_weights(pi, "site weights", dtype=ref.dtype, device=ref.device)
    if pi.numel() != k_sites:
        raise ValueError(f"site weights have {pi.numel()} entries for {k_sites} sites")
    return pi / pi.sum()


class _GeneralizedJS(torch.autograd.Function):
    """``sum_k pi_k KL(p_k || m)`` per sample/voxel from ``(K, B, N, ...)`` logits, with its closed-form gradient.

    ``dJS / df_kc = pi_k p_kc (d_kc - KL_k)`` with ``d = log p_k - log m``: one elementwise pass over the saved
    ``p`` and ``d``, where autograd through the logsumexp mixture took several (the voxel-wise term in 3D is a
    large share of the server's time per step). ``pi_k = 0`` gives that site zero gradient.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits, dim=2)  # (K, B, N, ...)
        log_pi = torch.log(pi).reshape(-1, *([1] * (logits.ndim - 1)))  # -inf for pi_k = 0 (no contribution)
        d = log_p - torch.logsumexp(log_pi + log_p, dim=0, keepdim=True)  # log p_k - log m
        p = log_p.exp_()
        kl = (p * d).sum(2)  # (K, B, ...): KL(p_k || m)
        pi_b = pi.reshape(-1, *([1] * (kl.ndim - 1)))
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(p, d, kl, pi_b)
        return (pi_b * kl).sum(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        p, d, kl, pi_b = ctx.saved_tensors
        scale = (pi_b * grad.unsqueeze(0)).unsqueeze(2)  # (K, B, 1, ...)
        return scale * p * (d - kl.unsqueeze(2)), None


def generalized_js_divergence(
    site_logits: Sequence[torch.Tensor] | torch.Tensor,
    site_weights: Sequence[float] | torch.Tensor | None = None,
    temperature: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """Per-sample/voxel generalized Jensen-Shannon divergence among the sites' predictions, ``(B, *spatial)``.

    ``JS = H(sum_k pi_k p_k) - sum_k pi_k H(p_k) = sum_k pi_k KL(p_k || m)`` with ``p_k = softmax(f_k / T)``
    and the mixture ``log m = logsumexp_k(log pi_k + log p_k)``; computed in the KL form from log-softmax.
    Bounds: ``0 <= JS <= H(pi) <= log K``; zero iff all sites with ``pi_k > 0`` agree. With ``normalize`` the
    value is divided by ``log K`` (so it lies in ``[0, 1]``; ``K = 1`` gives 0). Tiny negative rounding
    residues (``~1e-7`` where sites agree, i.e. at the minimum where the gradient is zero anyway) are set to 0.
    """
    temperature = check_temperature(temperature)
    stacked = stack_sites(site_logits)
    k_sites = stacked.shape[0]
    pi = _site_priors(site_weights, k_sites, stacked)
    js = _GeneralizedJS.apply(stacked / temperature, pi).clamp_min(0.0)
    if normalize:
        js = js / math.log(k_sites) if k_sites > 1 else torch.zeros_like(js)
    return js


class ConsensusLoss(nn.Module):
    """Disagreement among the sites: generalized Jensen-Shannon divergence (see :func:`generalized_js_divergence`).

    Value ``weight * reduce(JS)``; per element ``JS in [0, log K]``, or ``[0, 1]`` with ``normalize=True``
    (default). No ``T^2`` factor (the term is bounded). Gradients w.r.t. every site's logits are finite for
    any finite logits (they vanish where a site's softmax saturates, as the softmax's own gradient does).
    Minimising it pulls the sites together (the generator uses its sign as the engine decides).

    Args:
        weight: scale of the returned value.
        temperature: ``T > 0`` applied to every site's logits.
        site_weights: ``(K,)`` mixture weights ``pi`` (normalised to sum to one), or ``None`` for uniform.
            Can be overridden per call.
        normalize: divide by ``log K``.
        reduction: ``"mean"`` (over samples and voxels), ``"sum"`` or ``"none"`` (``(B, *spatial)``).
        voxel_stride: with spatial outputs (segmentation), evaluate the term on every ``voxel_stride``-th voxel along
            each spatial axis, from a random offset per call (``generator``): an unbiased estimate of the mean over
            all voxels (``"sum"`` is rescaled to the full count) at ``1 / voxel_stride ** D`` of the cost. In 3D the
            voxel-wise term over every site's logits is most of the server's time per step; neighbouring voxels'
            disagreements are strongly correlated, so a lattice of them carries nearly the same signal. 1: every
            voxel. Needs a scalar reduction when above 1; outputs without spatial axes are unaffected.

    ``forward(site_logits, site_weights=None, generator=None)``: ``K`` tensors ``(B, N, *spatial)`` or one
    ``(K, B, N, ...)``; ``generator`` draws the lattice offset (torch's global generator when ``None``).
    """

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 1.0,
        site_weights: Sequence[float] | None = None,
        normalize: bool = True,
        reduction: str = "mean",
        voxel_stride: int = 1,
    ) -> None:
        super().__init__()
        self.weight = check_weight(weight)
        self.temperature = check_temperature(temperature)
        self.site_weights = None if site_weights is None else [float(w) for w in site_weights]
        self.normalize = bool(normalize)
        self.reduction = check_reduction(reduction)
        if isinstance(voxel_stride, bool) or int(voxel_stride) != voxel_stride or int(voxel_stride) < 1:
            raise ValueError(f"voxel_stride must be an integer >= 1, got {voxel_stride!r}")
        self.voxel_stride = int(voxel_stride)
        if self.voxel_stride > 1 and self.reduction == "none":
            raise ValueError("voxel_stride > 1 evaluates a subset of the voxels: it needs reduction 'mean' or 'sum', not 'none'")

    def forward(self, site_logits, site_weights=None, generator: torch.Generator | None = None) -> torch.Tensor:
        pi = self.site_weights if site_weights is None else site_weights
        stacked = stack_sites(site_logits)
        scale = 1.0
        if self.voxel_stride > 1 and stacked.ndim > 3:
            spatial = stacked.shape[3:]
            offsets = torch.randint(self.voxel_stride, (len(spatial),), generator=generator).tolist()
            # an axis shorter than the stride keeps its one voxel at an offset inside it (few-slice volumes)
            lattice = tuple(slice(o % n, None, self.voxel_stride) for o, n in zip(offsets, spatial))
            full = stacked[0, 0, 0].numel()
            stacked = stacked[(slice(None),) * 3 + lattice]
            scale = full / stacked[0, 0, 0].numel() if self.reduction == "sum" else 1.0
        js = generalized_js_divergence(stacked, pi, self.temperature, self.normalize)
        return (self.weight * scale) * reduce(js, self.reduction)


# --------------------------------------------------------------------------------------------------- entropy
def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-sample/voxel Shannon entropy (nats) of ``softmax(logits / T)`` over dim 1: ``(B, *spatial)`` in ``[0, log N]``."""
    check_logits(logits)
    log_p = torch.log_softmax(logits / check_temperature(temperature), dim=1)
    return -(log_p.exp() * log_p).sum(1)


class EntropyLoss(nn.Module):
    """Mean Shannon entropy of the predictions: the "each site is confident on x" term.

    ``forward(logits)`` with a tensor ``(B, N, *spatial)``: ``weight * reduce(H(softmax(logits / T)))``; per
    element ``H in [0, log N]`` (``log N`` for equal logits, ~0 for confident predictions).
    ``forward([f_1, ..., f_K])`` with a list/tuple of site logits: a ``(K,)`` tensor of the per-site values
    (``weight * reduce(H_k)`` each; needs a scalar reduction) — sum or average them as the engine wants.
    Usable site-side on a site's own logits.

    Args:
        weight: scale of the returned value(s).
        temperature: ``T > 0``.
        reduction: ``"mean"`` (over samples and voxels), ``"sum"`` or ``"none"`` (tensor input only).
    """

    def __init__(self, weight: float = 1.0, temperature: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        self.weight = check_weight(weight)
        self.temperature = check_temperature(temperature)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(logits, (list, tuple)):
            if self.reduction == "none":
                raise ValueError("per-site entropies need reduction 'mean' or 'sum'")
            if not logits:
                raise ValueError("at least one site's logits are needed")
            return self.weight * torch.stack([reduce(entropy(f, self.temperature), self.reduction) for f in logits])
        return self.weight * reduce(entropy(logits, self.temperature), self.reduction)


# --------------------------------------------------------------------------------------------------- balance
class BalanceLoss(nn.Module):
    """Class balance of a synthetic batch: ``KL(prior || q)``, ``q`` = mean prediction over the batch (and voxels).

    ``log q_c = logsumexp_{b, voxels}(log p_{b,c,...}) - log(B * V)`` from the ensemble log-probabilities
    ``log p`` — no epsilon: ``q`` is never 0 for finite logits. Value ``weight * sum_c prior_c (log prior_c -
    log q_c)`` (``0 log 0 = 0``): ``>= 0``, zero iff ``q == prior``, finite for saturated logits, and its
    gradient stays non-zero in the collapse case (every sample a confident prediction of one class): the
    gradient w.r.t. ``log p_{b,c}`` is ``-prior_c * softmax_b(log p_{., c})_b``, which does not vanish when
    ``p_{b,c}`` underflows, and ``d log p_c / d f_c = 1 - p_c`` is ~1 there.

    Args:
        weight: scale of the returned value.
        prior: ``(N,)`` class prior (non-negative; normalised to sum one) or ``None`` for uniform. For
            segmentation use the pooled voxel-class frequencies of
            :func:`monai_fedkd.losses.class_prior_from_counts`.
        input_type: what ``forward`` receives: ``"log_probs"`` (default; ensemble log-probabilities),
            ``"logits"`` (``log_softmax`` is applied) or ``"probs"`` (probabilities: ``q`` is their plain batch
            mean and ``log q = log(q + 1e-12)``, the only epsilon in this module; prefer log_probs).

    ``forward(x)``: ``(B, N, *spatial)``. The value is a scalar for the batch (no reduction argument).
    Passing probabilities with ``input_type="log_probs"`` (values > 0) raises ``ValueError``.
    """

    def __init__(self, weight: float = 1.0, prior: Sequence[float] | torch.Tensor | None = None, input_type: str = "log_probs") -> None:
        super().__init__()
        if input_type not in _TEACHER_INPUTS:
            raise ValueError(f"input_type must be one of {_TEACHER_INPUTS}, got {input_type!r}")
        self.weight = check_weight(weight)
        self.input_type = input_type
        if prior is None:
            self.register_buffer("prior", None)
        else:
            p = check_nonnegative_weights(prior, "prior")
            self.register_buffer("prior", p / p.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_logits(x, "BalanceLoss input")
        _check_kind(x, self.input_type, "BalanceLoss")
        n = x.shape[1]
        flat = x.transpose(0, 1).reshape(n, -1)  # (N, B * V)
        if self.input_type == "probs":
            log_q = torch.log(flat.mean(1) + _PROBS_EPS)
        else:
            if self.input_type == "logits":
                flat = torch.log_softmax(flat, dim=0)
            log_q = torch.logsumexp(flat, dim=1) - math.log(flat.shape[1])  # (N,): log of the batch mean
        if self.prior is None:
            prior = torch.full((n,), 1.0 / n, dtype=log_q.dtype, device=log_q.device)
        else:
            if self.prior.numel() != n:
                raise ValueError(f"prior has {self.prior.numel()} classes, input has {n}")
            prior = self.prior.to(dtype=log_q.dtype, device=log_q.device)
        value = (xlogx(prior) - prior * log_q).sum()
        return self.weight * value


# ----------------------------------------------------------------------------------------- conditional CE
class ConditionalCrossEntropyLoss(nn.Module):
    """Cross-entropy of the ensemble to the label-conditional generator's targets.

    ``forward(ensemble_log_probs, target)`` = ``weight * F.nll_loss(ensemble_log_probs, target)``:
    ``ensemble_log_probs`` ``(B, N, *spatial)`` (from :func:`ensemble_log_probabilities`, so the gradient flows
    into every site's logits through the ensemble); ``target`` integer class indices ``(B,)`` for
    classification, ``(B, *spatial)`` or ``(B, 1, *spatial)`` for segmentation (voxel-wise). Reduction as the
    other terms (``"mean"`` over samples and voxels). Value ``>= 0``; finite for finite logits.

    A classification ``target`` may also be soft, ``(B, N)`` class distributions: the value is then the
    cross-entropy ``-sum_c target_c log p_c`` (minimal, equal to the target's entropy, where the ensemble
    reproduces the target), which asks the generator for inputs *between* classes: the samples near the sites'
    decision boundary that rank cases for AUROC.

    ``class_weights``: ``(N,)`` non-negative per-class weights (e.g. :func:`~monai_fedkd.losses.class_balance_weights`)
    or ``None`` (every class alike). Each element's cross-entropy is weighted by its target class's weight (a soft
    target's by the target-weighted mean), and ``"mean"`` divides by the summed weights of the targets, as
    :func:`torch.nn.functional.nll_loss` does: in segmentation the voxels of a small structure then count as much
    as the background's in the generator's objective.
    """

    def __init__(self, weight: float = 1.0, reduction: str = "mean", class_weights: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = check_weight(weight)
        self.reduction = check_reduction(reduction)
        self.class_weights = None if class_weights is None else check_nonnegative_weights(class_weights, "class_weights")

    def forward(self, ensemble_log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_logits(ensemble_log_probs, "ensemble_log_probs")
        _check_kind(ensemble_log_probs, "log_probs", "ConditionalCrossEntropyLoss")
        target = torch.as_tensor(target, device=ensemble_log_probs.device)
        if ensemble_log_probs.ndim == 2 and target.ndim == 2 and target.is_floating_point():
            if target.shape != ensemble_log_probs.shape:
                raise ValueError(f"soft target must have shape {tuple(ensemble_log_probs.shape)}, got {tuple(target.shape)}")
            target = target.to(ensemble_log_probs.dtype)
            w = self._weights(ensemble_log_probs)
            if w is None:
                return self.weight * reduce(-(target * ensemble_log_probs).sum(1), self.reduction)
            per_sample = -(target * w * ensemble_log_probs).sum(1)
            if self.reduction != "mean":
                return self.weight * reduce(per_sample, self.reduction)
            return self.weight * per_sample.sum() / (target * w).sum().clamp_min(torch.finfo(per_sample.dtype).tiny)
        if target.ndim == ensemble_log_probs.ndim and target.ndim > 2 and target.shape[1] == 1:
            target = target.squeeze(1)
        expected = (ensemble_log_probs.shape[0], *ensemble_log_probs.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(f"target must have shape {expected} (or with a channel dim of 1), got {tuple(target.shape)}")
        if target.is_floating_point():
            target = target.round()
        return self.weight * F.nll_loss(ensemble_log_probs, target.long(), weight=self._weights(ensemble_log_probs), reduction=self.reduction)

    def _weights(self, log_probs: torch.Tensor) -> torch.Tensor | None:
        if self.class_weights is None:
            return None
        if self.class_weights.numel() != log_probs.shape[1]:
            raise ValueError(f"{self.class_weights.numel()} class_weights for {log_probs.shape[1]} classes")
        return self.class_weights.to(dtype=log_probs.dtype, device=log_probs.device)


class LayoutDiceLoss(nn.Module):
    """Soft Dice of the ensemble to the layout the generator was asked to paint (layout-conditioned segmentation).

    ``forward(ensemble_log_probs, layout)``: ``(B, N, *spatial)`` log-probabilities and ``(B, *spatial)`` class
    indices; ``weight * (1 - mean Dice over the foreground classes)``, through MONAI's ``DiceLoss`` on the ensemble's
    probabilities (per sample and class, then averaged). Cross-entropy alone (:class:`ConditionalCrossEntropyLoss`)
    is dominated by the background when structures fill a few percent of the volume; Dice weighs every structure
    the same. Value in ``[0, weight]``.
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.weight = check_weight(weight)
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=False, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, ensemble_log_probs: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        check_logits(ensemble_log_probs, "ensemble_log_probs")
        if ensemble_log_probs.ndim < 3:
            raise ValueError("LayoutDiceLoss is for segmentation: ensemble_log_probs must be (B, N, *spatial)")
        layout = torch.as_tensor(layout, device=ensemble_log_probs.device)
        if layout.ndim == ensemble_log_probs.ndim - 1:
            layout = layout[:, None]
        if tuple(layout.shape) != (ensemble_log_probs.shape[0], 1, *ensemble_log_probs.shape[2:]):
            raise ValueError(f"layout must have shape {(ensemble_log_probs.shape[0], *ensemble_log_probs.shape[2:])}, got {tuple(layout.shape)}")
        return self.weight * self.dice(ensemble_log_probs.exp(), layout.long())


# ------------------------------------------------------------------------------------------------ adversarial
class AdversarialLoss(nn.Module):
    """Bounded, masked student-ensemble disagreement for the generator (to be *minimised*).

    Per sample/voxel: ``d = KL(ensemble || softmax(student / T))``, bounded as ``b = 1 - exp(-d)`` in
    ``[0, 1)`` (or ``tanh(d)`` with ``bound="tanh"``) and masked to where ``argmax(student) ==
    argmax(ensemble)`` (the generator searches for inputs the student gets "right for the wrong reasons";
    elements already disagreeing contribute 0 instead of an unbounded push). Returns
    ``-weight * mean(mask * b)`` (mean over *all* samples and voxels), in ``[-weight, 0]`` for ``weight >= 0``:
    minimising it maximises the disagreement.

    The module detaches the student (``detach_student=True``, default): the gradient flows only into the
    ensemble side, i.e. the sites' logits (and through them into x). The mask carries no gradient.

    ``forward(student_logits, ensemble)``: both ``(B, N, *spatial)``; ``ensemble`` is, per ``ensemble_input``,
    log-probabilities (``"log_probs"``, default; :func:`ensemble_log_probabilities`) or probabilities
    (``"probs"``; :func:`ensemble_probabilities`, ``0 log 0 = 0``), at the same temperature ``T`` (``T`` here
    is applied to the student). ``reduction="none"`` returns the per-element ``-weight * mask * b``.
    """

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 1.0,
        bound: str = "exp",
        detach_student: bool = True,
        reduction: str = "mean",
        ensemble_input: str = "log_probs",
    ) -> None:
        super().__init__()
        if ensemble_input not in ("log_probs", "probs"):
            raise ValueError(f"ensemble_input must be 'log_probs' or 'probs', got {ensemble_input!r}")
        self.ensemble_input = ensemble_input
        if bound not in ("exp", "tanh"):
            raise ValueError(f"bound must be 'exp' or 'tanh', got {bound!r}")
        self.weight = check_weight(weight)
        self.temperature = check_temperature(temperature)
        self.bound = bound
        self.detach_student = bool(detach_student)
        self.reduction = check_reduction(reduction)

    def forward(self, student_logits: torch.Tensor, ensemble: torch.Tensor) -> torch.Tensor:
        check_logits(student_logits, "student_logits")
        _same_shape(student_logits, ensemble, "AdversarialLoss student vs ensemble")
        _check_kind(ensemble, self.ensemble_input, "AdversarialLoss ensemble")
        student = student_logits.detach() if self.detach_student else student_logits
        log_s = torch.log_softmax(student / self.temperature, dim=1)
        if self.ensemble_input == "log_probs":
            d = _kl_from_log(ensemble, log_s)
        else:
            d = (xlogx(ensemble) - ensemble * log_s).sum(1)
        d = d.clamp_min(0.0)  # >= 0 up to rounding (zero gradient only where d ~ 0, its minimum)
        bounded = -torch.expm1(-d) if self.bound == "exp" else torch.tanh(d)
        mask = (student.detach().argmax(1) == ensemble.detach().argmax(1)).to(bounded.dtype)
        return -self.weight * reduce(mask * bounded, self.reduction)
