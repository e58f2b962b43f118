"""In-process transport: the sites are objects in this process (one machine, the embedded default).

The server only ever sees this transport: answers are copied tensors, and no attribute hands out a site object.
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import torch

from monai_fedkd.transport.base import QueryRequest, SiteAnswer, SiteAnswerError, Transport

__all__ = ["InProcessTransport"]


class InProcessTransport(Transport):
    def __init__(self, sites: Sequence) -> None:
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        if not sites:
            raise ValueError("no sites given")
        self.__sites = {s.name: s for s in sites}  # name-mangled: the server has no business with site objects

    def site_cards(self) -> dict[str, dict]:
        return {n: dict(s.card) for n, s in self.__sites.items()}

    def query(self, request: QueryRequest, sites: list[str] | None = None) -> dict[str, SiteAnswer]:
        out = {}
        for name in sites or list(self.__sites):
            t0 = time.perf_counter()
            # copies stand for serialisation: the server cannot hold a view into site memory
            req = QueryRequest(request.inputs.detach().clone(), request.step, dict(request.local_weights),
                               request.want_input_grad, request.update_discriminator, request.forward_only)
            site = self.__sites[name]
            at_site = site.stats.seconds_at_site
            ans = site.answer(req)
            out[name] = SiteAnswer(name, ans.outputs.clone(), dict(ans.local_values),
                                   None if ans.local_input_grad is None else ans.local_input_grad.clone(), ans.kind)
            site.stats.seconds_in_transport += (time.perf_counter() - t0) - (site.stats.seconds_at_site - at_site)
        return out

    def vjp(self, cotangents: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, c in cotangents.items():
            if name not in self.__sites:
                raise SiteAnswerError(name, "unknown site")
            out[name] = self.__sites[name].vjp(c.detach().clone()).clone()
        return out

    def stats(self) -> dict[str, dict]:
        return {n: s.stats.as_dict() for n, s in self.__sites.items()}

    def privacy_reports(self) -> dict[str, dict]:
        return {n: s.privacy_report() for n, s in self.__sites.items()}

    def save_site_states(self, tag: str, sites: list[str] | None = None) -> None:
        for name in sites or list(self.__sites):
            self.__sites[name].save_state(tag)

    def load_site_states(self, tag: str, sites: list[str] | None = None) -> None:
        for name in sites or list(self.__sites):
            self.__sites[name].load_state(tag)
