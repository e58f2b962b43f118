"""NVIDIA FLARE transport: the sites are FLARE clients, the distillation runs in the FLARE server job.

Built on FLARE's Collab API (``nvflare.collab``, nvflare 2.9): every site process holds a :class:`FlareSite`, which
loads only that site's bundle output (model, card) and its own training images (for its discriminator) and
publishes the two round trips of :mod:`monai_fedkd.transport.base` as remote functions. The server process holds a
:class:`FlareDistillationServer`, whose ``@collab.main`` runs the unchanged ``central_distillation`` bundle config with
its ``transport`` replaced by :class:`FlareTransport` (so the configuration differs only in the transport).

What crosses the network is what crosses the in-process transport: input-shaped and output-shaped tensors, a few
scalars and the site card. Answers arrive unordered and are keyed by site name. A site that fails, raises or times
out is reported as :class:`~monai_fedkd.transport.base.SiteAnswerError` naming it, which the engine turns into a stop
or (``drop_failed_sites``) a drop.

:func:`distillation_recipe` builds the FLARE job from a sites JSON (per-site seeds as in-process, from
:func:`monai_fedkd.site.query.site_entries`); run it with ``SimEnv`` (one machine), ``PocEnv``
(several local processes) or ``ProdEnv`` (a provisioned deployment), or export it with ``recipe.export(dir)``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from monai.utils import optional_import

from monai_fedkd.transport.base import QueryBudgetExhausted, QueryRequest, SiteAnswer, SiteAnswerError, Transport, TransportStats, payload_bytes

collab, has_nvflare = optional_import("nvflare.collab", name="collab")
CollabRecipe, _ = optional_import("nvflare.collab", name="CollabRecipe")

__all__ = ["ERROR_FILE", "FlareDistillationServer", "FlareSite", "FlareTransport", "distillation_recipe"]

logger = logging.getLogger(__name__)

ERROR_FILE = "distillation_error.txt"  # written by the server job when the distillation fails
SITE_PROPS = ("site_dir", "datalist", "seed", "state_dir", "site_options", "device", "num_threads")


def _decorate(name: str):
    """``collab.<name>`` when nvflare is installed; otherwise leave the function as it is (import stays cheap)."""
    if has_nvflare:
        return getattr(collab, name)
    return lambda f: f


def _wire(t: torch.Tensor | None) -> torch.Tensor | None:
    # FLARE serialises tensors with safetensors: CPU and contiguous
    return None if t is None else t.detach().cpu().contiguous()


# --------------------------------------------------------------------------------------------------- site side
class FlareSite:
    """The site side in a FLARE client process: a :class:`~monai_fedkd.site.query.QuerySite` behind remote functions.

    Its settings come from the site's own FLARE app properties (``recipe.set_per_site_config``): ``site_dir`` (the
    site bundle's ``output_dir``), ``datalist`` (its own datalist, for its discriminator; optional), ``seed``,
    ``state_dir`` (where it checkpoints its discriminator), ``site_options`` (keyword arguments of ``QuerySite``),
    ``device`` and ``num_threads`` (torch CPU threads; set it when several sites share a machine). The site name is
    the FLARE client name.
    """

    def __init__(self) -> None:
        self.site = None
        self._lock = threading.Lock()  # FLARE may deliver calls concurrently; a site answers one at a time

    @_decorate("init")
    def setup(self) -> None:
        from monai_fedkd.site.query import QuerySite

        props = {k: collab.get_app_prop(k, None) for k in SITE_PROPS}
        if props["num_threads"]:  # several sites sharing one machine (simulator, POC): no thread oversubscription
            torch.set_num_threads(int(props["num_threads"]))
        if not props["site_dir"]:
            raise ValueError(f"FLARE site '{collab.site_name}' has no 'site_dir' in its app properties (set_per_site_config)")
        self.site = QuerySite(
            props["site_dir"],
            name=collab.site_name,
            real_datalist=props["datalist"],
            seed=int(props["seed"] or 0),
            state_dir=props["state_dir"],
            device=props["device"] or "cpu",
            **dict(props["site_options"] or {}),
        )
        logger.info("FLARE site '%s' serves %s", collab.site_name, props["site_dir"])

    @_decorate("publish")
    def card(self) -> dict:
        return json.loads(json.dumps(self.site.card))  # plain builtins only cross

    @_decorate("publish")
    def answer(self, inputs: torch.Tensor, step: int, local_weights: dict, want_input_grad: bool, update_discriminator: bool,
               forward_only: bool = False) -> dict:
        with self._lock:
            ans = self.site.answer(QueryRequest(inputs, int(step), dict(local_weights), bool(want_input_grad), bool(update_discriminator),
                                                bool(forward_only)))
        return {"outputs": _wire(ans.outputs), "kind": ans.kind, "local_values": dict(ans.local_values),
                "local_input_grad": _wire(ans.local_input_grad)}

    @_decorate("publish")
    def vjp(self, cotangent: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return _wire(self.site.vjp(cotangent))

    @_decorate("publish")
    def stats(self) -> dict:
        return self.site.stats.as_dict()

    @_decorate("publish")
    def privacy(self) -> dict:
        return json.loads(json.dumps(self.site.privacy_report()))

    @_decorate("publish")
    def save_state(self, tag: str) -> bool:
        with self._lock:
            self.site.save_state(tag)
        return True

    @_decorate("publish")
    def load_state(self, tag: str) -> bool:
        with self._lock:
            self.site.load_state(tag)
        return True


# ------------------------------------------------------------------------------------------------- server side
class FlareTransport(Transport):
    """Server-side transport over FLARE's Collab API; use only inside a ``@collab.main`` (the FLARE server job).

    Args:
        timeout: seconds a site may take to answer one call; a site that takes longer is reported as failed.
        sites: restrict to these FLARE clients (default: every client in the job).
    """

    def __init__(self, timeout: float = 600.0, sites: Sequence[str] | None = None) -> None:
        if not has_nvflare:
            raise ImportError("FlareTransport needs NVIDIA FLARE: pip install 'nvflare==2.9.*' (or monai_fedkd[nvflare])")
        self.timeout = float(timeout)
        clients = list(collab.clients)  # proxies are taken here, in the collab thread: worker threads may then use them
        self._proxies = {p.name: p for p in clients if sites is None or p.name in set(sites)}
        if not self._proxies:
            raise ValueError(f"no FLARE client among {[p.name for p in clients]} matches sites={list(sites or [])}")
        self._stats = {n: TransportStats() for n in self._proxies}
        self._failed: set[str] = set()  # sites whose call failed: left out of later bookkeeping calls
        self._cards = {n: dict(c) for n, c in self._each(lambda p: p.card(), list(self._proxies)).items()}

    def _each(self, call, names: list[str], args: Mapping[str, tuple] | None = None) -> dict:
        """Call every named site in parallel (one thread per site); raise SiteAnswerError naming a failed site."""
        results, errors = {}, {}
        self._elapsed = {}

        def one(name):
            t0 = time.perf_counter()
            try:
                results[name] = call(self._proxies[name](timeout=self.timeout), *(args or {}).get(name, ()))
            except Exception as e:  # CollabCallError carries the site's exception type and message as text
                errors[name] = e
            self._elapsed[name] = time.perf_counter() - t0  # this site's round trip, not the slowest site's

        unknown = [n for n in names if n not in self._proxies]
        if unknown:
            raise SiteAnswerError(unknown[0], "unknown site (not a client of this FLARE job)")
        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self._failed.update(errors)
            name = sorted(errors)[0]
            cause = getattr(errors[name], "cause", None) or str(errors[name])
            if QueryBudgetExhausted.__name__ in f"{cause} {type(errors[name]).__name__}":  # the site's policy, not a fault
                raise QueryBudgetExhausted(name, str(cause), partial=results)
            raise SiteAnswerError(name, f"FLARE call failed: {cause}", partial=results)
        return results

    def site_cards(self) -> dict[str, dict]:
        return {n: dict(c) for n, c in self._cards.items()}

    def query(self, request: QueryRequest, sites: list[str] | None = None) -> dict[str, SiteAnswer]:
        names = list(sites or self._proxies)
        x = _wire(request.inputs)
        raw = self._each(lambda p: p.answer(x, int(request.step), dict(request.local_weights), bool(request.want_input_grad),
                                            bool(request.update_discriminator), bool(request.forward_only)), names)
        out = {}
        for n in names:
            r = raw[n]
            ans = SiteAnswer(n, r["outputs"], {k: float(v) for k, v in r["local_values"].items()}, r.get("local_input_grad"), r["kind"])
            s = self._stats[n]
            s.queries += 1
            s.bytes_sent += payload_bytes(x)
            s.bytes_received += payload_bytes(ans.outputs, ans.local_input_grad) + 8 * len(ans.local_values)
            s.seconds_in_transport += self._elapsed[n]  # round trip incl. site compute; stats() subtracts the latter
            out[n] = ans
        return out

    def vjp(self, cotangents: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = list(cotangents)
        wired = {n: (_wire(c),) for n, c in cotangents.items()}
        out = self._each(lambda p, c: p.vjp(c), names, wired)
        for n in names:
            s = self._stats[n]
            s.vjps += 1
            s.bytes_sent += payload_bytes(*wired[n])
            s.bytes_received += payload_bytes(out[n])
            s.seconds_in_transport += self._elapsed[n]
        return out

    def stats(self) -> dict[str, dict]:
        """Bytes and calls as counted on the server; ``seconds_at_site`` as each site reports it."""
        try:
            at_site = self._each(lambda p: p.stats(), self._reachable(None))
        except SiteAnswerError:
            at_site = {}
        out = {}
        for n, s in self._stats.items():
            d = s.as_dict()
            d["seconds_at_site"] = float(at_site.get(n, {}).get("seconds_at_site", float("nan")))
            d["seconds_in_transport"] = max(d["seconds_in_transport"] - d["seconds_at_site"], 0.0) if n in at_site else d["seconds_in_transport"]
            out[n] = d
        return out

    def privacy_reports(self) -> dict[str, dict]:
        try:
            return self._each(lambda p: p.privacy(), self._reachable(None))
        except SiteAnswerError:  # a site that left keeps its own ledger; the card says it was dropped
            return {}

    def _reachable(self, sites: list[str] | None) -> list[str]:
        """The named (default: all) sites, less those whose call already failed."""
        return [n for n in sites or self._proxies if n not in self._failed]

    def save_site_states(self, tag: str, sites: list[str] | None = None) -> None:
        self._each(lambda p: p.save_state(tag), self._reachable(sites))

    def load_site_states(self, tag: str, sites: list[str] | None = None) -> None:
        self._each(lambda p: p.load_state(tag), self._reachable(sites))


class FlareDistillationServer:
    """The FLARE server job: runs the ``central_distillation`` bundle with :class:`FlareTransport`.

    Args:
        config_file: the bundle's config file(s) (``train.json``, plus ``segmentation.json`` for segmentation).
        overrides: bundle overrides (``output_dir``, ``seed``, ``iterations``, ...), as for ``monai.bundle run``.
        timeout: seconds a site may take for one call.
    """

    def __init__(self, config_file: list | str, overrides: dict | None = None, timeout: float = 600.0) -> None:
        self.config_file = config_file
        self.overrides = overrides
        self.timeout = timeout

    @_decorate("main")
    def run(self) -> str:
        from monai.bundle import ConfigWorkflow

        overrides = dict(self.overrides or {})
        overrides["transport"] = {"_target_": "monai_fedkd.transport.flare.FlareTransport", "timeout": float(self.timeout)}
        error_file = Path(overrides["output_dir"]) / ERROR_FILE if "output_dir" in overrides else None
        if error_file is not None and error_file.exists():
            error_file.unlink()
        try:
            workflow = ConfigWorkflow(config_file=self.config_file, workflow_type=None, **overrides)
            workflow.initialize()
            try:
                workflow.run()
            finally:
                workflow.finalize()
        except BaseException as e:
            # the FLARE runner only reports "job failed": leave the cause where the submitter looks
            if error_file is not None:
                root = e
                while root.__cause__ is not None or root.__context__ is not None:  # past MONAI's config-expression wrapper
                    root = root.__cause__ or root.__context__
                error_file.parent.mkdir(parents=True, exist_ok=True)
                error_file.write_text(f"{type(root).__name__}: {root}\n")
            raise
        output_dir = workflow.parser.get_parsed_content("output_dir")
        logger.info("central distillation over FLARE finished: %s", output_dir)
        return str(output_dir)


# ------------------------------------------------------------------------------------------------ the FLARE job
def distillation_recipe(
    sites: str | os.PathLike | Sequence,
    config_file: str | Sequence[str],
    output_dir: str | os.PathLike,
    overrides: Mapping | None = None,
    job_name: str = "monai_fedkd_distillation",
    timeout: float = 600.0,
    device: str = "cpu",
    site_threads: int | None = None,
):
    """A FLARE ``CollabRecipe``: one client per site of ``sites`` (named as in the sites JSON), the server running the
    bundle ``config_file`` with ``overrides`` over :class:`FlareTransport`. ``site_threads``: torch CPU threads per site
    process (for several sites on one machine; ``None`` leaves torch's default).

    The sites' options (``site_options``: discriminator, its learning rate, ``max_real``) and seeds are read from the
    bundle config so that a simulator run reproduces the in-process one; in a deployment each site sets its own
    properties (``set_per_site_config``) and the server never needs its paths.
    """
    if not has_nvflare:
        raise ImportError("the FLARE job needs NVIDIA FLARE: pip install 'nvflare==2.9.*' (or monai_fedkd[nvflare])")
    from monai.bundle import ConfigParser

    from monai_fedkd.site.query import site_entries

    files = [str(Path(f).resolve()) for f in ([config_file] if isinstance(config_file, (str, os.PathLike)) else config_file)]
    overrides = {**dict(overrides or {}), "output_dir": str(Path(output_dir).resolve())}
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(overrides)
    seed = int(parser.get_parsed_content("seed"))
    site_options = parser.get_parsed_content("site_options") if "site_options" in parser.config else {}
    entries = site_entries(sites, seed=seed)
    recipe = CollabRecipe(job_name=job_name, server=FlareDistillationServer(files, overrides, timeout=timeout), client=FlareSite(),
                          min_clients=len(entries))
    recipe.set_per_site_config({
        e["name"]: {"site_dir": e["site_dir"], "datalist": e["datalist"], "seed": e["seed"], "device": device,
                    "state_dir": str(Path(overrides["output_dir"]) / "site_state" / e["name"]), "site_options": dict(site_options),
                    "num_threads": site_threads}
        for e in entries
    })
    return recipe
