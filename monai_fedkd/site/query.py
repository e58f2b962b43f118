"""The site side of query-mode distillation: answer queries on synthetic inputs, never hand out weights.

A :class:`QuerySite` owns the site's trained network (rebuilt from its bundle output), the site's own real training
images (for its discriminator only) and the discriminator itself. It answers:

- ``answer(request)``: logits on the server's inputs, the values of its site-local terms and the input-gradient of
  their weighted sum (entropy of its own prediction, its discriminator's realism score, and a BatchNorm-statistics
  prior when its network has BatchNorm); then, locally, one discriminator update on real vs the server's inputs;
- ``vjp(cotangent)``: ``J^T c`` through its network for the inputs of the last query.

What it releases follows the site's own :class:`~monai_fedkd.site.policy.AnswerPolicy` (``site_policy.json`` beside
its model, else the ``answer_policy`` of its card, else full answers): outputs as logits, probabilities, top-k or
labels, gradients or none, clipping, Gaussian noise and a query budget; it keeps its own privacy ledger and
publishes the policy in its card. Inputs outside the card's input spec are refused. It counts queries and payload
bytes.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Mapping

import torch

from monai.data import CacheDataset
from monai.transforms import Compose, SpatialPadd

from monai_fedkd.data.datalist import load_datalist
from monai_fedkd.data.transforms import card_preprocessing
from monai_fedkd.losses import BatchNormStatisticsLoss, EntropyLoss, has_batchnorm
from monai_fedkd.networks.discriminators import PatchDiscriminatorScore, discriminator_loss, realism_loss
from monai_fedkd.networks.memory_format import resolve_memory_format, to_memory_format
from monai_fedkd.networks.precision import autocast, resolve_autocast_dtype
from monai_fedkd.site.atlas import AtlasAccumulator, preprocessed_subjects, publish_atlas
from monai_fedkd.site.card import load_site_model
from monai_fedkd.site.policy import AnswerPolicy, PrivacyLedger
from monai_fedkd.transport.base import QueryBudgetExhausted, QueryRequest, SiteAnswer, SiteAnswerError, TransportStats, payload_bytes

__all__ = ["POLICY_FILE", "QuerySite", "load_query_sites", "read_site_policy", "site_entries"]

POLICY_FILE = "site_policy.json"


def read_site_policy(site_dir: str | os.PathLike, card: Mapping) -> AnswerPolicy:
    """The site's answer policy: ``site_policy.json`` beside its model (the site may change it without retraining),
    else the ``answer_policy`` its bundle recorded in the card, else full answers."""
    import json

    path = Path(site_dir) / POLICY_FILE
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"site policy {path} is not valid JSON: {e}") from None
        try:
            return AnswerPolicy.from_dict(raw)
        except ValueError as e:
            raise ValueError(f"site policy {path}: {e}") from None
    return AnswerPolicy.from_dict(card.get("answer_policy"))

logger = logging.getLogger(__name__)


class QuerySite:
    """One site answering distillation queries.

    Args:
        site_dir: the site bundle's ``output_dir`` (``models/model.pt`` + ``site_card.json``).
        name: site name (default: the card's).
        real_datalist: the site's own datalist; its ``real_key`` images train the site's discriminator. Without it
            the site has no discriminator and reports no realism term.
        atlas_datalist: the site's own datalist for its class-probability atlas (segmentation; default
            ``real_datalist``): the ``real_key`` label maps, published in the card as the policy allows
            (:mod:`monai_fedkd.site.atlas`). Without either datalist the site publishes no atlas.
        discriminator: keyword arguments of :class:`PatchDiscriminatorScore` (``spatial_dims``/``in_channels`` from the card).
        discriminator_lr: Adam learning rate of the discriminator.
        real_batch_size: real images per discriminator step (default: the query batch size).
        max_real: keep at most this many real images in memory (``None``: all).
        seed: seeds the site's real-batch sampling (with the server's step) and its discriminator's initialisation.
        state_dir: where the site checkpoints its own distillation state (resume).
        policy: fields that replace those of the site's own policy (``site_policy.json`` or its card). For
            simulations and benchmarks that play a site's decision; a deployed site writes ``site_policy.json``.
        autocast_dtype: ``"bfloat16"``: the site's network and discriminator run their forward passes under autocast
            (:mod:`monai_fedkd.networks.precision`); what the site releases is float32 either way. ``None``: float32.
            ``"auto"``: bfloat16 where this site's device computes it natively and right, else float32.
        memory_format: the layout its network computes in (:mod:`monai_fedkd.networks.memory_format`):
            ``"channels_last"``, ``"contiguous"`` (or ``None``) or ``"auto"`` (channels-last for 3D on CPU). What the
            site releases is the same up to float rounding and is sent contiguous.
    """

    # building the site (network, discriminator) must not move the caller's random state: the server's generator
    # and student are initialised the same whether the sites live in this process or elsewhere
    @torch.random.fork_rng(devices=[])
    def __init__(
        self,
        site_dir: str | os.PathLike,
        name: str | None = None,
        real_datalist: str | os.PathLike | None = None,
        real_key: str = "training",
        atlas_datalist: str | os.PathLike | None = None,
        discriminator: Mapping | None = None,
        discriminator_lr: float = 2e-4,
        discriminator_loss_mode: str = "bce",
        real_batch_size: int | None = None,
        max_real: int | None = None,
        seed: int = 0,
        state_dir: str | os.PathLike | None = None,
        policy: Mapping | None = None,
        autocast_dtype: str | None = None,
        memory_format: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.autocast_dtype = resolve_autocast_dtype(autocast_dtype, self.device)
        self.network, self.card = load_site_model(site_dir, device=self.device)
        self.memory_format = resolve_memory_format(memory_format, self.card["spatial_dims"], self.device)
        self.network = to_memory_format(self.network, self.memory_format, self.card["spatial_dims"])
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.name = name or self.card["site"]
        self.seed = int(seed)
        own = read_site_policy(site_dir, self.card)
        self.set_policy(AnswerPolicy.from_dict({**own.as_dict(), **dict(policy or {})}) if policy else own)
        self.spec = self.card["input"]
        self.stats = TransportStats()
        self.state_dir = Path(state_dir) if state_dir else Path(site_dir) / "distillation_state"
        self._entropy = EntropyLoss(weight=1.0)
        self._bn = BatchNormStatisticsLoss(weight=1.0) if has_batchnorm(self.network) else None
        if self._bn is not None:
            self._bn.attach(self.network)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.d_mode = discriminator_loss_mode
        self.real_batch_size = real_batch_size
        self.discriminator = None
        self.real_images: torch.Tensor | list[torch.Tensor] | None = None
        self._atlas: AtlasAccumulator | None = None
        atlas_datalist = atlas_datalist if atlas_datalist is not None else real_datalist
        self._atlas_source = (atlas_datalist, real_key) if self.card["task"] == "segmentation" and atlas_datalist is not None else None
        if self._atlas_source is not None:
            self._atlas = self._accumulate_atlas(*self._atlas_source)
            self._publish_atlas()
        if real_datalist is not None:
            self.real_images = self._load_real_images(real_datalist, real_key, max_real)
            torch.manual_seed(self.seed)  # the discriminator's initialisation belongs to the site's seed
            kwargs = {"spatial_dims": self.card["spatial_dims"], "in_channels": self.spec["channels"], **dict(discriminator or {})}
            self.discriminator = PatchDiscriminatorScore(**kwargs).to(self.device)
            self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=discriminator_lr, betas=(0.5, 0.999))

    def set_policy(self, policy: AnswerPolicy) -> None:
        """Adopt ``policy`` (the site's own decision; the audit tries candidates) and publish it in the card."""
        self.policy = policy
        self.card = {**self.card, "answer_policy": policy.as_dict()}
        self.ledger = PrivacyLedger(policy)
        self._noise = torch.Generator().manual_seed(self.seed * 1_000_033 + 17)  # the site's own noise stream
        if getattr(self, "_atlas", None) is not None:
            self._publish_atlas()

    def _publish_atlas(self) -> None:
        """Put the atlas the policy allows (or none) in the card; its bytes count as sent once."""
        self.card.pop("atlas", None)
        if self._atlas.align != self.policy.atlas_align:  # the policy changed how subjects are aligned
            self._atlas = self._accumulate_atlas(*self._atlas_source)
        atlas = publish_atlas(self._atlas, self.policy, self.spec.get("spacing"), torch.Generator().manual_seed(self.seed * 1_000_033 + 29))
        if atlas is not None:
            self.card["atlas"] = atlas
            shared = len(atlas["probabilities"]) + len(atlas["intensity"])
            if atlas.get("class_intensity") is not None:
                shared += sum(len(r or ()) for per_class in atlas["class_intensity"]["quantiles"] for r in per_class)
            if atlas.get("class_gradient") is not None:
                shared += sum(len(r or ()) for per_scale in atlas["class_gradient"]["quantiles"] for per_axis in per_scale
                              for per_class in per_axis for r in per_class)
            self.stats.bytes_sent += 4 * shared  # shared information: counted as sent (float32)
            logger.info("site '%s' shares a %s class atlas of %d subjects (epsilon %s)", self.name, atlas["grid"], atlas["subjects"],
                        atlas["epsilon"])

    def privacy_report(self) -> dict:
        return {**self.ledger.report(), "queries": self.stats.queries}

    # ---- data ------------------------------------------------------------------------------------------------
    def _load_real_images(self, datalist, key: str, max_real: int | None) -> torch.Tensor:
        items = load_datalist(datalist, key=key, task=self.card["task"], num_classes=self.card["classes"]["num_classes"])
        if max_real is not None:
            items = items[:max_real]
        xforms = card_preprocessing(self.card, with_label=False)
        if self.card["task"] == "segmentation":
            # whole volumes, padded to at least the patch size; patches are cut at sampling time
            xforms.append(SpatialPadd(keys="image", spatial_size=self.spec["spatial_size"]))
        ds = CacheDataset([{"image": i["image"], **({"acquisition": i["acquisition"]} if "acquisition" in i else {})} for i in items],
                          transform=Compose(xforms), progress=False)
        images = [torch.as_tensor(ds[i]["image"]).float().to(self.device) for i in range(len(ds))]
        return images if self.card["task"] == "segmentation" else torch.stack(images)

    def _accumulate_atlas(self, datalist, key: str) -> AtlasAccumulator:
        acc = AtlasAccumulator(self.card["classes"]["num_classes"], self.spec["spatial_size"], align=self.policy.atlas_align,
                               value_range=self.spec.get("value_range"))
        for label, image in preprocessed_subjects(self.card, datalist, key):
            acc.add(label, image)
        return acc

    def _real_batch(self, n: int, g: torch.Generator, size=None) -> torch.Tensor:
        idx = torch.randint(len(self.real_images), (n,), generator=g).tolist()
        if self.card["task"] != "segmentation":
            return self.real_images[idx]
        # the discriminator sees real patches of the synthetic patches' size (default: the site's training patch size)
        size = list(self.spec["spatial_size"] if size is None else size)
        patches = []
        for i in idx:
            vol = self.real_images[i]
            starts = [int(torch.randint(vol.shape[1 + d] - size[d] + 1, (1,), generator=g)) for d in range(len(size))]
            patches.append(vol[(slice(None), *[slice(b, b + s) for b, s in zip(starts, size)])])
        return torch.stack(patches)

    # ---- checks ----------------------------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor) -> None:
        sd = self.card["spatial_dims"]
        if x.ndim != sd + 2 or x.shape[1] != self.spec["channels"]:
            raise SiteAnswerError(self.name, f"refused inputs of shape {tuple(x.shape)}: expected (B, {self.spec['channels']}, {sd} spatial dims)")
        if self.card["task"] == "classification" and list(x.shape[2:]) != list(self.spec["spatial_size"]):
            raise SiteAnswerError(self.name, f"refused inputs of spatial size {list(x.shape[2:])}: the card declares {self.spec['spatial_size']}")
        lo, hi = self.spec.get("value_range") or (float("-inf"), float("inf"))
        tol = 1e-4 * max(1.0, hi - lo)
        if not torch.isfinite(x).all() or x.min() < lo - tol or x.max() > hi + tol:
            raise SiteAnswerError(self.name, f"refused inputs outside the declared value range {[lo, hi]} (or not finite)")

    # ---- round trip 1 ----------------------------------------------------------------------------------------
    def answer(self, request: QueryRequest) -> SiteAnswer:
        start = time.perf_counter()
        x = request.inputs.to(self.device).float()
        self._check_inputs(x)
        budget = self.policy.max_queries
        if budget is not None and self.stats.queries >= budget:
            raise QueryBudgetExhausted(self.name, f"its query budget of {budget} queries is exhausted (site policy)")
        self.stats.queries += 1
        self.stats.bytes_received += payload_bytes(request.inputs)
        # a forward-only query builds no graph: no gradient is returned and no VJP can follow it
        differentiable = not request.forward_only
        x = to_memory_format(x.detach(), self.memory_format, self.card["spatial_dims"]).requires_grad_(differentiable)
        with torch.set_grad_enabled(differentiable):
            self.network.eval()
            if self._bn is not None:
                self._bn.reset()
            with autocast(self.device, self.autocast_dtype):
                logits = self.network(x)
            logits = logits.float()
            if not torch.isfinite(logits).all():
                raise SiteAnswerError(self.name, "its network answered NaN/Inf")
            weights = dict(request.local_weights)
            values: dict[str, float] = {}
            local = logits.new_zeros(())
            entropy = self._entropy(logits)
            values["entropy"] = float(entropy.detach())
            local = local + float(weights.get("entropy", 0.0)) * entropy
            if self._bn is not None:
                bn = self._bn.value()
                values["bn_statistics"] = float(bn.detach())
                local = local + float(weights.get("bn_statistics", 0.0)) * bn
            if self.discriminator is not None:
                self.discriminator.eval()
                with autocast(self.device, self.autocast_dtype):
                    score = self.discriminator(x)
                realism = realism_loss(score.float(), mode=self.d_mode)
                values["realism"] = float(realism.detach())
                local = local + float(weights.get("realism", 0.0)) * realism
            grad = None
            if differentiable and request.want_input_grad and self.policy.return_gradients:
                grad = torch.autograd.grad(local, x, retain_graph=True)[0] if local.requires_grad else torch.zeros_like(x)
                grad = self.policy.release_gradient(grad.cpu().contiguous(), self._noise)
                self.ledger.record(grad.shape[0])
            pre = self.policy.pre_release(logits)  # what a VJP differentiates: the released values before noise
            outputs, kind, mechanisms = self.policy.release(pre.detach().float().cpu().contiguous(), self._noise)
            self.ledger.record(mechanisms)
        self._last = (x, pre) if differentiable else None
        if request.update_discriminator and self.discriminator is not None:
            values["discriminator_loss"] = self._update_discriminator(x.detach(), request.step)
        answer = SiteAnswer(self.name, outputs, values, grad, kind)
        self.stats.bytes_sent += payload_bytes(answer.outputs, answer.local_input_grad) + 8 * len(values)
        self.stats.seconds_at_site += time.perf_counter() - start
        return answer

    def _update_discriminator(self, fake: torch.Tensor, step: int) -> float:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        real = self._real_batch(self.real_batch_size or fake.shape[0], g, size=fake.shape[2:] if self.card["task"] == "segmentation" else None)
        self.discriminator.train()
        self.d_optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.autocast_dtype):
            real_score, fake_score = self.discriminator(real), self.discriminator(fake)
        loss = discriminator_loss(real_score.float(), fake_score.float(), mode=self.d_mode)
        loss.backward()
        self.d_optimizer.step()
        return float(loss)

    # ---- round trip 2 ----------------------------------------------------------------------------------------
    def vjp(self, cotangent: torch.Tensor) -> torch.Tensor:
        """``J^T c`` through the released values (before noise) for the inputs of the last query, clipped and noised
        as the policy says; refused when the policy returns no gradients."""
        if not self.policy.return_gradients:
            raise SiteAnswerError(self.name, "its policy returns no gradients: vector-Jacobian products are refused")
        if self._last is None:
            raise SiteAnswerError(self.name, "vector-Jacobian product requested without a differentiable query before it (none yet, or a forward-only one)")
        start = time.perf_counter()
        x, released = self._last
        if tuple(cotangent.shape) != tuple(released.shape):
            raise SiteAnswerError(self.name, f"cotangent shape {tuple(cotangent.shape)} does not match its outputs {tuple(released.shape)}")
        self.stats.vjps += 1
        self.stats.bytes_received += payload_bytes(cotangent)
        (grad,) = torch.autograd.grad(released, x, cotangent.to(released), retain_graph=False)
        self._last = None
        grad = self.policy.release_gradient(grad.cpu().contiguous(), self._noise)
        self.ledger.record(grad.shape[0])
        self.stats.bytes_sent += payload_bytes(grad)
        self.stats.seconds_at_site += time.perf_counter() - start
        return grad

    # ---- the site's own state (resume) --------------------------------------------------------------------
    def save_state(self, tag: str) -> None:
        """Checkpoint what the site changes during a run: its discriminator, its counters, its noise stream, its ledger."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / f".{tag}.pt.tmp"
        state = {"stats": self.stats.as_dict(), "noise_rng": self._noise.get_state(), "releases": self.ledger.releases}
        if self.discriminator is not None:
            state.update(discriminator=self.discriminator.state_dict(), optimizer=self.d_optimizer.state_dict())
        torch.save(state, tmp)
        os.replace(tmp, self.state_dir / f"{tag}.pt")

    def load_state(self, tag: str) -> None:
        path = self.state_dir / f"{tag}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"site '{self.name}' has no saved distillation state {path} to resume from")
        state = torch.load(path, map_location=self.device, weights_only=True)
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.d_optimizer.load_state_dict(state["optimizer"])
        self.stats = TransportStats(**state["stats"])
        self._noise.set_state(state["noise_rng"])
        self.ledger.releases = int(state["releases"])


def site_entries(sites, seed: int = 0) -> list[dict]:
    """The central bundle's sites (output dirs, ``{"dir", "datalist", "name"}`` entries, or the path of a JSON file
    holding them; relative paths resolve against that file) as ``{"name", "site_dir", "datalist", "seed"}`` with
    absolute paths and each site's seed (``seed + 7919 * (index + 1)``), whichever transport serves them."""
    base = None
    if isinstance(sites, (str, os.PathLike)):
        import json

        path = Path(sites)
        if not path.is_file():
            raise FileNotFoundError(f"sites file {path} does not exist")
        base = path.parent
        sites = json.loads(path.read_text())
    if not sites:
        raise ValueError("no sites given for the distillation")
    out = []
    for k, entry in enumerate(sites):
        entry = {"dir": entry} if isinstance(entry, (str, os.PathLike)) else dict(entry)
        site_dir = Path(entry["dir"])
        datalist = entry.get("datalist")
        if base is not None:
            site_dir = site_dir if site_dir.is_absolute() else base / site_dir
            datalist = None if datalist is None else Path(datalist) if Path(datalist).is_absolute() else base / datalist
        out.append({"name": entry.get("name") or site_dir.name, "site_dir": str(site_dir.resolve()),
                    "datalist": None if datalist is None else str(Path(datalist).resolve()), "seed": seed + 7919 * (k + 1)})
    names = [e["name"] for e in out]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names}")
    return out


def load_query_sites(sites, seed: int = 0, state_root: str | os.PathLike | None = None, with_real_images: bool = True,
                     **common) -> list[QuerySite]:
    """Build the in-process sites (see :func:`site_entries` for ``sites``).

    ``datalist`` is the site's own datalist; it stays at the site and feeds only its discriminator
    (``with_real_images=False``: no discriminator, as for a one-shot baseline that holds only uploaded weights) and,
    for segmentation, the class atlas its policy lets it publish.
    """
    return [QuerySite(e["site_dir"], name=e["name"], real_datalist=e["datalist"] if with_real_images else None,
                      atlas_datalist=e["datalist"], seed=e["seed"],
                      state_dir=Path(state_root) / e["name"] if state_root else None, **common) for e in site_entries(sites, seed)]
