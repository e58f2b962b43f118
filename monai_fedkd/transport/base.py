"""The query interface between the distillation server and the sites.

One generator step is two round trips (see docs/architecture.md):

1. ``query``: the server sends synthetic inputs ``x`` and the weights of the site-local terms; every site returns
   its logits on ``x``, the values of its local terms (entropy of its own prediction, its discriminator's
   realism score, BatchNorm-statistics prior) and the input-gradient of their weighted sum.
2. ``vjp``: the server sends each site the cotangent ``dL/df_k`` of the cross-site terms; the site returns the
   vector-Jacobian product ``dL/dx`` through its own network.

Answers are keyed by site name (remote transports deliver them unordered).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Mapping

import torch

__all__ = ["QueryBudgetExhausted", "QueryRequest", "SiteAnswer", "SiteAnswerError", "Transport", "TransportStats", "payload_bytes"]


class SiteAnswerError(RuntimeError):
    """A site answered with NaN/Inf, a wrong shape, or not at all."""

    def __init__(self, site: str, reason: str, partial: Mapping | None = None):
        super().__init__(f"site '{site}': {reason}")
        self.site = site
        self.partial = dict(partial or {})  # answers of the other sites of the same call, when there were any


class QueryBudgetExhausted(SiteAnswerError):
    """A site's policy allows no more queries: the site leaves the run (its right, not a fault)."""


def payload_bytes(*tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


@dataclass
class QueryRequest:
    """What the server sends with synthetic inputs. ``step`` seeds any site-side sampling (reproducible resume).

    ``want_input_grad=False``: no local input-gradient (a VJP may still follow). ``forward_only=True``: no gradient of
    any kind; the site builds no graph and refuses a VJP of this query (used to label inputs, e.g. of a frozen
    generator)."""

    inputs: torch.Tensor
    step: int
    local_weights: Mapping[str, float] = field(default_factory=dict)
    want_input_grad: bool = True
    update_discriminator: bool = True
    forward_only: bool = False


@dataclass
class SiteAnswer:
    """What a site releases under its answer policy.

    ``outputs`` are of ``kind`` ``"logits"`` ``(B, N, *spatial)``, ``"probabilities"`` / ``"top_k"`` (same shape) or
    ``"labels"`` (class indices ``(B, *spatial)``); ``local_input_grad`` is ``None`` when the policy returns no gradients.
    """

    site: str
    outputs: torch.Tensor
    local_values: dict[str, float] = field(default_factory=dict)
    local_input_grad: torch.Tensor | None = None
    kind: str = "logits"


@dataclass
class TransportStats:
    queries: int = 0
    vjps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds_at_site: float = 0.0
    seconds_in_transport: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Transport(abc.ABC):
    """Server-side view of the sites. Nothing behind it may hand out a site object or its parameters."""

    @abc.abstractmethod
    def site_cards(self) -> dict[str, dict]:
        """Public site cards, keyed by site name."""

    @abc.abstractmethod
    def query(self, request: QueryRequest, sites: list[str] | None = None) -> dict[str, SiteAnswer]:
        """Round trip 1: logits, local terms and their input-gradient from every (or the named) site."""

    @abc.abstractmethod
    def vjp(self, cotangents: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Round trip 2: ``J_k^T c_k`` for the inputs of the last query, for each site named in ``cotangents``."""

    @abc.abstractmethod
    def stats(self) -> dict[str, dict]:
        """Per-site counters: queries, VJPs, bytes sent to / received from the site, time at the site."""

    def privacy_reports(self) -> dict[str, dict]:
        """Per-site privacy accounting as each site reports it: its policy, releases and epsilon at its delta."""
        return {}

    def save_site_states(self, tag: str, sites: list[str] | None = None) -> None:
        """Ask every (or each named) site to checkpoint its own distillation state (its discriminator) under ``tag``."""

    def load_site_states(self, tag: str, sites: list[str] | None = None) -> None:
        """Ask every (or each named) site to restore the state it saved under ``tag`` (resume)."""

    def close(self) -> None:
        pass
