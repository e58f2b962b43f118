"""The site's answer policy: what a site releases to the server, and the differential-privacy cost of releasing it.

A policy belongs to the site. It is set in the site's own configuration (the site bundle's ``answer_policy`` id,
recorded in its card, or a ``site_policy.json`` the site places beside its model later), enforced by the site's
:class:`~monai_fedkd.site.query.QuerySite`, and published in the site card so the server knows what to expect.

What a policy controls:

- ``outputs``: ``"logits"``, ``"probabilities"``, ``"top_k"`` (the ``top_k`` largest probabilities, the rest of the
  mass spread evenly over the other classes) or ``"labels"`` (class indices only);
- ``return_gradients``: whether the site returns input-gradients (of its local terms) and vector-Jacobian products;
- ``clip_outputs`` / ``clip_gradients``: per-sample L2 bounds of the released outputs and gradients;
- ``noise_multiplier``: Gaussian noise of standard deviation ``noise_multiplier x sensitivity`` on every released
  value; for labels, on the one-hot vote before the argmax (report-noisy-max);
- ``max_queries``: the number of queries the site answers before it refuses;
- ``delta``: the delta at which the site reports epsilon;
- ``share_atlas`` / ``atlas_pool`` / ``atlas_min_subjects`` / ``atlas_noise`` / ``atlas_align`` (segmentation
  sites): whether the site publishes a coarse class-probability atlas of its training labels in its card (the
  layout-conditioned generator samples label layouts from it), how many voxels per axis each atlas cell pools, the
  fewest training subjects it averages over, the Gaussian noise (in probability units) added to each cell, and how
  the subjects are aligned before averaging (``"foreground"``: their structures' centroids; ``"centre"``: their
  volume centres). See :mod:`monai_fedkd.site.atlas`.

Accounting: the site's model is a deterministic function of its training data, so one training record may change an
answer arbitrarily; only clipping bounds it. Each per-sample release (one input's output, local input-gradient or VJP)
is a Gaussian mechanism with L2 sensitivity ``2 x clip`` (replace-one neighbours; probabilities: ``sqrt(2)`` per
voxel without a clip; labels: ``sqrt(2)`` per voxel). Releases compose; epsilon at ``delta`` comes from Opacus' RDP
accountant over all of them. Without noise, epsilon is unbounded (reported as ``None``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F

__all__ = ["AnswerPolicy", "PolicyError", "PrivacyLedger", "released_log_probabilities", "OUTPUT_KINDS"]

OUTPUT_KINDS = ("logits", "probabilities", "top_k", "labels")
ATLAS_ALIGNMENTS = ("foreground", "centre")
LABEL_SMOOTHING = 0.1  # how the server reads a released label: 0.9 on the label, the rest spread (a bounded log-probability)


class PolicyError(ValueError):
    """A policy that cannot be enforced as written (unknown key, bad value, noise without a bound)."""


@dataclass(frozen=True)
class AnswerPolicy:
    outputs: str = "logits"
    top_k: int = 1
    return_gradients: bool = True
    clip_outputs: float | None = None
    clip_gradients: float | None = None
    noise_multiplier: float = 0.0
    max_queries: int | None = None
    delta: float = 1e-5
    share_atlas: bool = True
    atlas_pool: int = 2
    atlas_min_subjects: int = 5
    atlas_noise: float = 0.0
    atlas_align: str = "foreground"

    def __post_init__(self) -> None:
        if self.outputs not in OUTPUT_KINDS:
            raise PolicyError(f"policy outputs must be one of {OUTPUT_KINDS}, got {self.outputs!r}")
        if self.top_k < 1:
            raise PolicyError(f"policy top_k must be >= 1, got {self.top_k}")
        for name in ("clip_outputs", "clip_gradients"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise PolicyError(f"policy {name} must be a positive number or null, got {v}")
        if self.noise_multiplier < 0:
            raise PolicyError(f"policy noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.noise_multiplier > 0 and self.outputs == "logits" and self.clip_outputs is None:
            raise PolicyError("noise on logits needs clip_outputs: without a bound the noise protects nothing")
        if self.noise_multiplier > 0 and self.return_gradients and self.clip_gradients is None:
            raise PolicyError("noise on gradients needs clip_gradients (or return_gradients: false)")
        if self.max_queries is not None and self.max_queries < 0:
            raise PolicyError(f"policy max_queries must be >= 0 or null, got {self.max_queries}")
        if self.outputs == "labels" and self.return_gradients:
            # an argmax has no useful gradient, and a VJP would reveal what the labels hide
            object.__setattr__(self, "return_gradients", False)
        if not 0 < self.delta < 1:
            raise PolicyError(f"policy delta must be in (0, 1), got {self.delta}")
        if int(self.atlas_pool) < 1 or int(self.atlas_min_subjects) < 1 or self.atlas_noise < 0:
            raise PolicyError("policy atlas_pool and atlas_min_subjects must be >= 1 and atlas_noise >= 0, got "
                              f"{self.atlas_pool}, {self.atlas_min_subjects}, {self.atlas_noise}")
        if self.atlas_align not in ATLAS_ALIGNMENTS:
            raise PolicyError(f"policy atlas_align must be one of {ATLAS_ALIGNMENTS}, got {self.atlas_align!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "AnswerPolicy":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PolicyError(f"unknown policy keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def is_default(self) -> bool:
        return self == AnswerPolicy()

    # ---- what leaves the site --------------------------------------------------------------------------------
    def pre_release(self, logits: torch.Tensor) -> torch.Tensor:
        """The differentiable part of what is released: logits or probabilities, scaled to the per-sample clip bound
        (the scale counts as a constant, as in DP-SGD). A vector-Jacobian product goes through this tensor."""
        if self.outputs == "labels":
            return logits
        values = logits if self.outputs == "logits" else torch.softmax(logits, 1)
        return _clip(values, self.clip_outputs)

    def release_outputs(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, str, int]:
        """``(released tensor, kind, number of mechanisms)`` for the network's ``logits`` ``(B, N, *spatial)``.

        Per-sample clipping bounds a whole sample (one mechanism per sample); unclipped probabilities and labels are
        bounded per voxel (one mechanism per voxel).
        """
        return self.release(self.pre_release(logits.detach().float()), generator)

    def release(self, pre: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, str, int]:
        """:meth:`release_outputs` from the values :meth:`pre_release` already gave (detached): noise, top-k, argmax."""
        sigma = self.noise_multiplier
        per_sample, per_voxel = pre.shape[0], pre.shape[0] * int(math.prod(pre.shape[2:]))
        if self.outputs == "labels":
            votes = F.one_hot(pre.argmax(1), pre.shape[1]).movedim(-1, 1).float()
            if sigma > 0:
                votes = votes + _noise(votes, sigma * math.sqrt(2.0), generator)
            return votes.argmax(1), "labels", per_voxel
        if self.outputs == "logits":
            sensitivity, count = (2.0 * self.clip_outputs if self.clip_outputs else 0.0), per_sample
        elif self.clip_outputs is not None:
            sensitivity, count = 2.0 * self.clip_outputs, per_sample
        else:
            sensitivity, count = math.sqrt(2.0), per_voxel
        out = pre + _noise(pre, sigma * sensitivity, generator) if sigma > 0 else pre
        if self.outputs == "top_k" and self.top_k < out.shape[1]:
            return _keep_top_k(out, self.top_k), "top_k", count
        return out, ("logits" if self.outputs == "logits" else "probabilities"), count

    def release_gradient(self, grad: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """An input-gradient or VJP ``(B, C, *spatial)`` after per-sample clipping and noise."""
        out = _clip(grad.detach().float(), self.clip_gradients)
        if self.noise_multiplier > 0:
            out = out + _noise(out, self.noise_multiplier * 2.0 * self.clip_gradients, generator)
        return out


def _clip(x: torch.Tensor, bound: float | None) -> torch.Tensor:
    """Scale each sample (first dimension) to L2 norm at most ``bound`` (the scale itself is not differentiated)."""
    if bound is None:
        return x
    norms = x.detach().flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (bound / norms).clamp(max=1.0)
    return x * scale.view(-1, *[1] * (x.ndim - 1))


def _noise(like: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=like.dtype) * std


def _keep_top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries along dim 1; spread the remaining mass evenly over the others (clamped at 0)."""
    p = probs.clamp_min(0)
    top = p.topk(k, dim=1)
    kept = torch.zeros_like(p).scatter(1, top.indices, top.values)
    rest = (1.0 - top.values.sum(1, keepdim=True)).clamp_min(0) / (p.shape[1] - k)
    mask = torch.zeros_like(p, dtype=torch.bool).scatter(1, top.indices, True)
    return torch.where(mask, kept, rest.expand_as(p))


def released_log_probabilities(outputs: torch.Tensor, kind: str, num_classes: int) -> torch.Tensor:
    """How the server reads a site's released outputs: logits it uses as they are; probabilities (possibly noisy or
    top-k) it clamps and renormalises and takes the log of; labels it reads as smoothed one-hot distributions.
    Differentiable in ``outputs`` except for labels."""
    if kind == "logits":
        return outputs
    if kind in ("probabilities", "top_k"):
        p = outputs.clamp_min(1e-4)
        return torch.log(p / p.sum(1, keepdim=True))
    if kind == "labels":
        off = LABEL_SMOOTHING / max(num_classes - 1, 1)
        onehot = F.one_hot(outputs.long(), num_classes).movedim(-1, 1).float()
        return torch.log(onehot * (1.0 - LABEL_SMOOTHING - off) + off)
    raise PolicyError(f"unknown answer kind {kind!r}")


class PrivacyLedger:
    """Counts a site's per-sample releases and gives epsilon at the policy's delta (Opacus RDP accountant)."""

    def __init__(self, policy: AnswerPolicy) -> None:
        self.policy = policy
        self.releases = 0

    def record(self, n: int) -> None:
        self.releases += int(n)

    def epsilon(self) -> float | None:
        """Epsilon at ``policy.delta``; ``0.0`` before any release; ``None`` (unbounded) for releases without noise."""
        if self.releases == 0:
            return 0.0
        if self.policy.noise_multiplier <= 0:
            return None
        return gaussian_epsilon(self.policy.noise_multiplier, self.releases, self.policy.delta)

    def report(self) -> dict:
        return {"policy": self.policy.as_dict(), "releases": self.releases, "epsilon": self.epsilon(), "delta": self.policy.delta}


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of ``releases`` composed Gaussian mechanisms of noise multiplier ``noise_multiplier`` (no subsampling)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), 1.0, int(releases))]
    return float(accountant.get_epsilon(delta))
