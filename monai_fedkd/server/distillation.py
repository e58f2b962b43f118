"""Query-mode central distillation (FedIOD-style) as an ignite ``Engine``.

One iteration = one generator step + ``student_steps`` student steps:

1. draw noise and target labels (seeded by ``seed`` and the iteration, so a resumed run repeats the same draws),
   synthesize ``x = G(z, y)``;
2. query every site through the transport: logits ``f_k(x)``, site-local terms and their input-gradient;
3. combine the sites on the server: expertise-weighted ensemble (class shares from the site cards), cross-entropy
   of the ensemble to the target labels, consensus (generalized Jensen-Shannon among sites), balance prior,
   adversarial disagreement with the student; send each site ``dL/df_k`` and receive ``J_k^T dL/df_k``;
4. update the generator with the summed input-gradients (plus a total-variation prior computed here);
5. push ``(x, ensemble probabilities)`` into a sample cache and train the student from the cache.

The server holds no site weights: it only sees :class:`~monai_fedkd.transport.base.Transport`.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from monai.utils import convert_to_tensor, min_version, optional_import

from monai_fedkd import __version__
from monai_fedkd.losses import (
    ENSEMBLE_COMBINATIONS,
    AdversarialLoss,
    BalanceLoss,
    ClassGradientLoss,
    ClassIntensityLoss,
    ConditionalCrossEntropyLoss,
    ConsensusLoss,
    DistillationLoss,
    DiversityLoss,
    LayoutDiceLoss,
    TotalVariationLoss,
    class_balance_weights,
    class_prior_from_counts,
    contrast_counts,
    ensemble_log_probabilities,
    site_weights,
)
from monai_fedkd.cpu_heap import cpu_heap_in_effect
from monai_fedkd.networks import network_definition
from monai_fedkd.networks.memory_format import resolve_memory_format, to_memory_format
from monai_fedkd.networks.precision import autocast, resolve_autocast_dtype
from monai_fedkd.server.layouts import LayoutSampler, combined_atlas, combined_class_gradient, combined_class_intensity, combined_intensity
from monai_fedkd.site.card import CENTRAL_CARD_NAME, atomic_write_json
from monai_fedkd.site.policy import AnswerPolicy, released_log_probabilities
from monai_fedkd.transport.base import QueryBudgetExhausted, QueryRequest, SiteAnswerError, Transport

Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")
Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
Checkpoint, _ = optional_import("ignite.handlers", "0.4.11", min_version, "Checkpoint")
DiskSaver, _ = optional_import("ignite.handlers", "0.4.11", min_version, "DiskSaver")
ProgressBar, _ = optional_import("ignite.contrib.handlers.tqdm_logger", "0.4.11", min_version, "ProgressBar")

__all__ = ["CentralDistillation", "SampleCache", "check_site_cards", "CENTRAL_CARD_NAME"]

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = {
    "conditional_ce": 1.0,   # ensemble agrees with the generator's target label (classification)
    "consensus": 1.0,        # sites agree with each other
    "balance": 1.0,          # batch-mean ensemble prediction matches the class prior
    "adversarial": 0.5,      # inputs where the student still disagrees with the ensemble
    "tv": 0.0,               # total-variation image prior
    "diversity": 0.5,        # mode seeking: different latent codes of a class give different inputs
    "entropy": 0.0,          # site-local: each site confident (0.1 cost ~0.01 AUROC on PneumoniaMNIST: it removes boundary samples)
    "realism": 0.5,          # site-local: each site's discriminator finds the inputs real
    "bn_statistics": 0.0,    # site-local: BatchNorm statistics prior (only sites whose network has BatchNorm)
    "pseudo_label": 0.0,     # ensemble confident in its own argmax (DENSE's cross-entropy; for unconditional generators)
    "layout_dice": 0.0,      # ensemble's soft Dice to the layout a layout-conditioned generator painted (segmentation)
    "class_intensity": 0.0,  # each painted structure's intensities follow the sites' quantiles for its class (segmentation)
    "class_gradient": 0.0,   # ... and its neighbour differences per axis follow the sites' (local contrast; segmentation)
}
SITE_LOCAL_TERMS = ("entropy", "realism", "bn_statistics")


STUDENT_LR_SCHEDULES = ("constant", "cosine")
STUDENT_TRANSFORM_TARGETS = ("unchanged", "queried")  # what the student's transformed inputs are taught


def cosine_lr(base: float, progress: float) -> float:
    """Half a cosine from ``base`` (progress 0) to 0 (progress 1 and beyond)."""
    return 0.5 * base * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def check_site_cards(cards: Mapping[str, Mapping]) -> dict:
    """The sites must describe the same task; returns the shared spec or raises naming the disagreeing sites."""
    if not cards:
        raise ValueError("no sites")

    def spec(c):
        s = {
            "task": c["task"],
            "spatial_dims": c["spatial_dims"],
            "channels": c["input"]["channels"],
            "num_classes": c["classes"]["num_classes"],
        }
        if c["task"] == "classification":
            s["spatial_size"] = list(c["input"]["spatial_size"])
        return s

    specs = {n: spec(c) for n, c in cards.items()}
    first_name = next(iter(specs))
    for key in specs[first_name]:
        values = {n: s.get(key) for n, s in specs.items()}
        if len({json.dumps(v) for v in values.values()}) > 1:
            detail = ", ".join(f"{n}={v}" for n, v in values.items())
            raise ValueError(f"site cards disagree on {key}: {detail}")
    shared = dict(specs[first_name])
    first = cards[first_name]
    shared["spatial_size"] = list(first["input"]["spatial_size"])
    shared["value_range"] = list(first["input"].get("value_range") or [0.0, 1.0])
    shared["class_names"] = list(first["classes"].get("names") or [])
    return shared


def sites_trained_on_other_patches(cards: Mapping[str, Mapping], size) -> dict[str, list[int]]:
    """The segmentation sites whose training patch (card ``input.spatial_size``) differs from ``size``, the patches
    the server synthesizes: name -> their patch. Networks with instance normalisation answer windows of another size
    much worse (IXI's sites: mean Dice 0.16 through 32^3 windows against 0.59 through their own 48^3), so the
    ensemble's labels on such patches are worse than the sites' knowledge."""
    size = [int(s) for s in size]
    patches = {n: [int(s) for s in c["input"]["spatial_size"]] for n, c in cards.items() if c["task"] == "segmentation"}
    return {n: p for n, p in patches.items() if p != size}


class SampleCache:
    """Ring buffer of queried ``(input, ensemble probabilities)`` pairs; student steps read it without new queries."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("cache capacity must be at least 1")
        self.capacity = int(capacity)
        self.inputs: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.size = 0
        self.cursor = 0

    def push(self, x: torch.Tensor, p: torch.Tensor) -> None:
        x, p = x.detach().to(torch.float16), p.detach().to(torch.float16)
        if self.inputs is None:
            self.inputs = torch.zeros((self.capacity, *x.shape[1:]), dtype=torch.float16)
            self.targets = torch.zeros((self.capacity, *p.shape[1:]), dtype=torch.float16)
        for i in range(x.shape[0]):
            self.inputs[self.cursor] = x[i]
            self.targets[self.cursor] = p[i]
            self.cursor = (self.cursor + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(self.size, (n,), generator=generator)
        return self.inputs[idx].float(), self.targets[idx].float()

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "inputs": self.inputs, "targets": self.targets, "size": self.size, "cursor": self.cursor}

    def load_state_dict(self, state: Mapping) -> None:
        self.capacity, self.inputs, self.targets = state["capacity"], state["inputs"], state["targets"]
        self.size, self.cursor = int(state["size"]), int(state["cursor"])


def _describe(transform) -> list[str] | str | None:
    """The class names of a transform (of each of a ``Compose``'s transforms), for the central card."""
    if transform is None:
        return None
    inner = getattr(transform, "transforms", None)
    return [type(t).__name__ for t in inner] if inner is not None else type(transform).__name__


def _hard(labels: torch.Tensor | None) -> torch.Tensor | None:
    """Class indices of (possibly soft) generator targets."""
    return labels.argmax(1) if labels is not None and labels.ndim == 2 else labels


class _EMA:
    """Exponential moving average of the student's weights (a smoother last iterate; no test data involved).

    With ``warmup`` the decay of update ``t`` is ``min(decay, (1 + t) / (10 + t))``: a short run (a few hundred
    student updates, as in 3D segmentation) is not dominated by the random initial weights, which a fixed 0.999
    would still weigh by ``0.999^t`` (70 % after 360 updates)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay, self.warmup, self.updates = decay, bool(warmup), 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        self.updates += 1
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(decay).add_(m.detach(), alpha=1 - decay)
            else:
                e.copy_(m)

    def state_dict(self):
        return {**self.model.state_dict(), "_ema_updates": torch.tensor(self.updates)}

    def load_state_dict(self, state):
        state = dict(state)
        self.updates = int(state.pop("_ema_updates", 0))
        self.model.load_state_dict(state)


class CentralDistillation:
    """Distil a central student from the sites behind ``transport``, by synthesized inputs only.

    Args:
        transport: the sites (see :mod:`monai_fedkd.transport`).
        generator: a :class:`~monai_fedkd.networks.generators.ConditionalGenerator` (or compatible: ``latent_dim``,
            ``num_classes``, ``forward(z, labels)``) producing inputs of the sites' spec.
        student: any network with the sites' input/output spec (built with ``monai_fedkd.networks.build_network``
            so the central card can record it).
        output_dir: receives ``models/model.pt``, ``central_card.json``, ``checkpoints/``, ``montages/``,
            ``tensorboard/``.
        iterations: generator steps.
        batch_size: synthetic inputs per generator step (one query per site per step).
        student_steps / student_batch_size: student updates per generator step, drawn from the sample cache.
        weights: loss weights (see ``DEFAULT_WEIGHTS``); site-local ones are sent to the sites with each query.
        temperature / distill_mode: student loss, "kl" at temperature T or "mse" on logits.
        student_lr_schedule: ``"constant"`` (default) or ``"cosine"``: the student's learning rate follows half a cosine
            from ``student_lr`` to 0 over the run's progress, the larger of ``iteration / iterations`` and (with a
            budget) ``elapsed / max_seconds``, so a run under a wall-time budget also ends at a small step size (a
            resumed run counts its elapsed time from the restart, as ``max_seconds`` does).
        student_dice_weight: segmentation with ``distill_mode="kl"``: adds this times a soft Dice term between the
            student and the ensemble over the foreground classes (:class:`~monai_fedkd.losses.DistillationLoss`
            ``dice_weight``), so that small structures weigh as much as in the Dice the model is judged by. 0: KL only.
        cache_size: capacity of the sample cache.
        boundary_fraction: share of each generator batch (classification) whose target is a random mixture of two
            classes instead of one class: inputs between classes, where the student must learn the sites' ranking.
        ema_decay / selection: "last" keeps the last student iterate, "ema" its weight average.
        ema_warmup: average with the decay ``min(ema_decay, (1 + t) / (10 + t))`` at update ``t`` (for short runs).
        checkpoint_interval / resume: regular checkpoints; ``resume=True`` continues from the newest one.
        drop_failed_sites / min_sites: drop a site that answers NaN/Inf or a wrong shape instead of stopping. A site
            whose query budget (its policy) runs out always leaves the run; fewer than ``min_sites`` left stops it.
        ensemble_weighting: ``"contrast"`` (default: each site weighted per class by what it saw of the class
            against the others, :func:`~monai_fedkd.losses.contrast_counts`, so a site of one class gets no say under
            extreme label skew), ``"expertise"`` (by its share of that class, from the cards' counts) or ``"mean"``
            (every site the same: the ablation without expertise weights, and DENSE's ensemble).
        ensemble_combination: ``"mixture"`` (the weighted mean of the sites' probabilities), ``"product"`` (the
            weighted geometric mean, a product of experts; :func:`~monai_fedkd.losses.ensemble_log_probabilities`) or
            ``"auto"`` (default): in classification, where a card shows a site that never saw some class, a product of
            equally weighted sites; otherwise the mixture with ``ensemble_weighting``. Under extreme label skew a site
            of one class answers its class with near certainty everywhere; in a mixture those saturated answers drown
            what it still tells apart, in a product its log-odds count (chosen on the PneumoniaMNIST sites'
            validation splits; segmentation keeps the mixture, whose per-class weights silence a site for a
            structure it never labelled).
        zeroth_order_directions / zeroth_order_step: for sites whose policy returns no gradients (but does return
            logits or probabilities), estimate their input-gradient from this many extra queries at
            ``x + zeroth_order_step * u`` (random directions ``u``). 0: such sites shape the student and the
            cross-site terms through their outputs, but the generator learns only from the other sites' gradients.
        layout_options: for a layout-conditioned generator (``generator.layout_conditioned``, segmentation), keyword
            arguments of :class:`~monai_fedkd.server.layouts.LayoutSampler` (deformation, texture, volume jitter).
            Its layouts come from the class atlases the sites publish in their cards; the ensemble is asked to agree
            with them (``conditional_ce``, ``layout_dice``).
        student_transform: a random transform (e.g. a MONAI ``Compose`` of intensity transforms) applied to each
            channel-first input the student draws from the cache, with the ensemble's answer on the unchanged input
            as its target; results are clipped to the sites' value range. Only label-preserving transforms belong
            here (intensity, not spatial): the target is not transformed (unless ``student_transform_targets`` is
            ``"queried"``). It is reseeded every step (``seed`` and the iteration, through its ``set_random_state``),
            so a resumed run repeats it. ``None``: no transform.
        student_transform_targets: what the student's transformed inputs are taught. ``"unchanged"`` (default): the
            ensemble's answer on the unchanged input (no extra query; only label-preserving transforms). ``"queried"``:
            every step the transform is applied once to the step's new inputs, the sites are asked forward-only (no
            input-gradient, no discriminator update) for their answers on exactly those transformed inputs, and both
            the unchanged and the transformed inputs enter the cache, each with the ensemble's answer on itself; the
            student's draws are then not transformed again. Teacher and student see the same view, so a transform
            need not preserve labels (a spatial transform in segmentation is labelled as transformed). One
            forward-only query of ``batch_size`` inputs per step more, counted against the sites' query budgets.
        autocast_dtype: ``"bfloat16"``: the generator's and the student's forward passes run under autocast (see
            :mod:`monai_fedkd.networks.precision`; outputs, losses, weights and optimizer states stay float32).
            ``None``: float32 throughout. ``"auto"``: bfloat16 where the device computes it natively and right
            (:func:`~monai_fedkd.networks.precision.resolve_autocast_dtype`), else float32
            (the card records what ran). The sites choose their own precision (``site_options.autocast_dtype``).
        memory_format: the student's layout (:mod:`monai_fedkd.networks.memory_format`): ``"channels_last"``,
            ``"contiguous"`` (or ``None``) or ``"auto"`` (channels-last for 3D on CPU, where its training steps run
            about a quarter faster; the card records what ran). The sites choose their own
            (``site_options.memory_format``). The model file is written contiguous either way.
        generator_iterations: train the generator for this many iterations only; later iterations sample it frozen
            and ask the sites forward-only queries (no input-gradient, no VJP, no discriminator update), whose
            answers only label the student's inputs. Once the generator has stopped improving (the layout generator
            plateaus after a few hundred steps) this spends the budget on the student: a forward-only query costs
            the sites about a third of a query with its VJP, and releases no gradient. ``None``: every iteration.
        prior_warmup_iterations: before the first query, this many generator updates on the server's image priors
            alone (``class_intensity``, ``class_gradient``, ``tv``, ``diversity``; with their own optimizer state). No site is asked, so
            nothing is released and the sites' compute is not spent on a generator that still paints intensities no
            scan has. They count against ``max_seconds``. Needs one of those weights above 0; a resumed run skips them
            (the checkpoint holds the generator). 0: none.
        conditional_ce_class_balance: segmentation: weight the conditional CE per layout class by the pooled class
            prior (from the cards' voxel counts) to this power, :func:`~monai_fedkd.losses.class_balance_weights`:
            0 (default) every voxel alike, 1 inverse frequency (a structure's voxels count as much in total as the
            background's), 0.5 in between. Nothing more is shared: the counts are already in the cards.
        class_intensity_options: keyword arguments of :class:`~monai_fedkd.losses.ClassIntensityLoss` besides its
            weight (``per_sample``, ``min_voxels``), for ``weights.class_intensity`` and ``weights.class_gradient``.
        consensus_voxel_stride: segmentation: the consensus term on every ``consensus_voxel_stride``-th voxel per axis
            from a random offset each step (:class:`~monai_fedkd.losses.ConsensusLoss` ``voxel_stride``), an unbiased
            estimate of its mean at a fraction of the cost (in 3D it was most of the server's time per step). 1:
            every voxel.
        max_seconds: a wall-time budget: the run stops after the first step that ends past it and writes its model
            as after ``iterations`` (the card records the steps done). ``None``: no budget. A resumed run counts
            from its restart.
    """

    def __init__(
        self,
        transport: Transport,
        generator: torch.nn.Module,
        student: torch.nn.Module,
        output_dir: str | os.PathLike,
        iterations: int = 200,
        batch_size: int = 32,
        student_steps: int = 5,
        student_batch_size: int | None = None,
        generator_lr: float = 1e-3,
        student_lr: float = 1e-3,
        student_lr_schedule: str = "constant",
        weights: Mapping[str, float] | None = None,
        temperature: float = 1.0,
        distill_mode: str = "kl",
        student_dice_weight: float = 0.0,
        cache_size: int = 512,
        boundary_fraction: float = 1.0,
        ema_decay: float = 0.999,
        ema_warmup: bool = False,
        selection: str = "ema",
        checkpoint_interval: int = 50,
        montage_interval: int = 50,
        resume: bool = False,
        seed: int = 0,
        drop_failed_sites: bool = False,
        min_sites: int = 1,
        zeroth_order_directions: int = 0,
        zeroth_order_step: float = 0.05,
        ensemble_weighting: str = "contrast",
        ensemble_combination: str = "auto",
        layout_options: Mapping | None = None,
        max_seconds: float | None = None,
        student_transform=None,
        student_transform_targets: str = "unchanged",
        generator_iterations: int | None = None,
        prior_warmup_iterations: int = 0,
        class_intensity_options: Mapping | None = None,
        conditional_ce_class_balance: float = 0.0,
        autocast_dtype: str | None = None,
        consensus_voxel_stride: int = 1,
        memory_format: str | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
        if selection not in ("last", "ema"):
            raise ValueError("selection must be 'last' or 'ema'")
        self.transport = transport
        self.device = torch.device(device)
        self.autocast_dtype = resolve_autocast_dtype(autocast_dtype, self.device)
        self.generator = generator.to(self.device)
        self.student = student.to(self.device)
        self.output_dir = Path(output_dir)
        self.iterations, self.batch_size = int(iterations), int(batch_size)
        self.student_steps = int(student_steps)
        self.student_batch_size = int(student_batch_size or batch_size)
        self.weights = {**DEFAULT_WEIGHTS, **dict(weights or {})}
        self.seed, self.resume, self.progress = int(seed), bool(resume), progress
        self.checkpoint_interval, self.montage_interval = int(checkpoint_interval), int(montage_interval)
        self.drop_failed_sites, self.min_sites = drop_failed_sites, int(min_sites)
        self.selection = selection
        if max_seconds is not None and not float(max_seconds) > 0:
            raise ValueError(f"max_seconds must be positive or None, got {max_seconds}")
        self.max_seconds = None if max_seconds is None else float(max_seconds)
        if generator_iterations is not None and int(generator_iterations) < 0:
            raise ValueError(f"generator_iterations must be >= 0 or None, got {generator_iterations}")
        self.generator_iterations = None if generator_iterations is None else int(generator_iterations)
        if int(prior_warmup_iterations) < 0:
            raise ValueError(f"prior_warmup_iterations must be >= 0, got {prior_warmup_iterations}")
        self.prior_warmup_iterations = int(prior_warmup_iterations)
        self.stopped_by_budget = False
        balance = float(conditional_ce_class_balance)
        if not (math.isfinite(balance) and balance >= 0):
            raise ValueError(f"conditional_ce_class_balance must be a finite number >= 0, got {conditional_ce_class_balance}")
        self.conditional_ce_class_balance = balance
        if not 0.0 <= float(boundary_fraction) <= 1.0:
            raise ValueError(f"boundary_fraction must be in [0, 1], got {boundary_fraction}")
        self.boundary_fraction = float(boundary_fraction)

        if ensemble_weighting not in ("expertise", "contrast", "mean"):
            raise ValueError(f"ensemble_weighting must be 'expertise', 'contrast' or 'mean', got {ensemble_weighting!r}")
        self.ensemble_weighting = ensemble_weighting
        if ensemble_combination not in ("auto", *ENSEMBLE_COMBINATIONS):
            raise ValueError(f"ensemble_combination must be one of {('auto', *ENSEMBLE_COMBINATIONS)}, got {ensemble_combination!r}")
        self.ensemble_option = ensemble_combination  # as configured; self.ensemble_used says what is used
        self.cards = transport.site_cards()
        self.spec = check_site_cards(self.cards)
        self.task, self.num_classes = self.spec["task"], self.spec["num_classes"]
        self.active_sites = sorted(self.cards)
        # what each site releases is its own decision, published in its card; the server adapts to it
        self.policies = {n: AnswerPolicy.from_dict(c.get("answer_policy")) for n, c in self.cards.items()}
        self.zeroth_order_directions, self.zeroth_order_step = int(zeroth_order_directions), float(zeroth_order_step)
        for n, p in sorted(self.policies.items()):
            logger.info("site '%s' answers with policy %s", n, "full answers (default)" if p.is_default else p.as_dict())
        if not any(p.return_gradients for p in self.policies.values()) and not self.zeroth_order_directions:
            logger.warning("no site returns gradients and zeroth_order_directions is 0: the generator learns only from its "
                           "image priors (tv, diversity); set zeroth_order_directions to estimate the sites' gradients")
        self.dropped: dict[str, str] = {}
        self._set_site_weights()
        # before the optimizer and the EMA copy are made, so that both hold the student's tensors in its layout
        self.memory_format = resolve_memory_format(memory_format, self.spec["spatial_dims"], self.device)
        self.student = to_memory_format(self.student, self.memory_format, self.spec["spatial_dims"])

        self.g_optimizer = torch.optim.Adam(self.generator.parameters(), lr=generator_lr, betas=(0.5, 0.999))
        self.s_optimizer = torch.optim.Adam(self.student.parameters(), lr=student_lr)
        if student_lr_schedule not in STUDENT_LR_SCHEDULES:
            raise ValueError(f"student_lr_schedule must be one of {STUDENT_LR_SCHEDULES}, got {student_lr_schedule!r}")
        self.student_lr, self.student_lr_schedule = float(student_lr), student_lr_schedule
        self._started: float | None = None  # perf_counter at the run's (re)start, for a time-based schedule
        self.ema = _EMA(self.student, ema_decay, warmup=ema_warmup)
        self.cache = SampleCache(cache_size)
        self.temperature = float(temperature)
        if student_dice_weight and self.task != "segmentation":
            raise ValueError(f"student_dice_weight is for segmentation (a Dice over classes of voxels); these sites do {self.task}")
        self.distill = DistillationLoss(weight=1.0, mode=distill_mode, temperature=temperature, dice_weight=student_dice_weight)
        self.layouts = self._layout_sampler(layout_options) if getattr(generator, "layout_conditioned", False) else None
        if self.task == "segmentation" and getattr(generator, "spatial_size", None) is not None:
            if other := sites_trained_on_other_patches(self.cards, generator.spatial_size):
                logger.warning("the generator synthesizes patches of %s voxels, and sites %s were trained on other patch sizes: "
                               "networks with instance normalisation label other window sizes worse (set synthesis_size to "
                               "their patch size)", list(generator.spatial_size), other)
            self._check_student_segments(list(generator.spatial_size))
        self.conditional = getattr(generator, "num_classes", None) is not None and self.task == "classification"
        self.terms = {
            "conditional_ce": ConditionalCrossEntropyLoss(weight=self.weights["conditional_ce"]),
            "pseudo_label": ConditionalCrossEntropyLoss(weight=self.weights["pseudo_label"]),
            "consensus": ConsensusLoss(weight=self.weights["consensus"], temperature=temperature, voxel_stride=consensus_voxel_stride),
            "balance": BalanceLoss(weight=self.weights["balance"], prior=self.class_prior),
            "adversarial": AdversarialLoss(weight=self.weights["adversarial"], temperature=temperature),
            "tv": TotalVariationLoss(weight=self.weights["tv"]),
            "diversity": DiversityLoss(weight=self.weights["diversity"]),
            "layout_dice": LayoutDiceLoss(weight=self.weights["layout_dice"]),
        }
        if self.conditional_ce_class_balance:
            if self.task != "segmentation":
                raise ValueError("conditional_ce_class_balance is for segmentation (layout classes of voxels); in classification "
                                 f"the generator already draws its target labels uniformly, and these sites do {self.task}")
            self._apply_class_prior()
        self.class_intensity_options = dict(class_intensity_options or {})
        unknown = set(self.class_intensity_options) - {"per_sample", "min_voxels"}
        if unknown:
            raise ValueError(f"unknown class_intensity_options {sorted(unknown)}; known: ['min_voxels', 'per_sample']")
        for term, loss_class, what in (("class_intensity", ClassIntensityLoss, "intensities"), ("class_gradient", ClassGradientLoss, "neighbour differences")):
            if not self.weights[term]:
                continue
            if self.layouts is None:
                raise ValueError(f"weights.{term} is for the layout-conditioned generator (segmentation): it compares each layout "
                                 f"class's synthetic {what} with the sites' quantiles")
            shared = getattr(self, term)
            if shared is None:
                raise ValueError(f"weights.{term} needs the sites' class {what} quantiles, and none of the sites {self.atlas_sites} "
                                 "that share an atlas shares them (a policy with atlas_noise > 0, inputs without a value_range, "
                                 "or sites whose monai_fedkd predates them)")
            channels = shared[1].shape[-3]
            if channels != self.generator.out_channels:
                raise ValueError(f"the sites' class {what} quantiles have {channels} channels, the generator paints {self.generator.out_channels}")
            extra = {"scales": shared[2]} if term == "class_gradient" else {}
            self.terms[term] = loss_class(*shared[:2], weight=self.weights[term], **extra, **self.class_intensity_options).to(self.device)
        if self.prior_warmup_iterations and not any(self.weights[k] for k in ("class_intensity", "class_gradient", "tv", "diversity")):
            raise ValueError("prior_warmup_iterations trains the generator on the server's image priors alone, and all of their "
                             "weights (class_intensity, class_gradient, tv, diversity) are 0")
        if student_transform is not None and not callable(student_transform):
            raise ValueError(f"student_transform must be callable (a MONAI transform), got {type(student_transform).__name__}")
        self.student_transform = student_transform
        if student_transform_targets not in STUDENT_TRANSFORM_TARGETS:
            raise ValueError(f"student_transform_targets must be one of {STUDENT_TRANSFORM_TARGETS}, got {student_transform_targets!r}")
        if student_transform_targets == "queried" and student_transform is None:
            raise ValueError("student_transform_targets 'queried' asks the sites about the student's transformed inputs, and "
                             "student_transform is None: set a transform, or leave student_transform_targets 'unchanged'")
        self.student_transform_targets = student_transform_targets
        self.timing = {"server_s": 0.0, "generator_s": 0.0, "student_s": 0.0, "prior_warmup_s": 0.0}

    def _check_student_segments(self, size: list[int]) -> None:
        """The student learns from the synthesized patches and is later run through sliding windows of the sites'
        patch size: refuse before any site is asked when it cannot map such a patch to a voxel-wise answer."""
        expected = (1, self.num_classes, *size)
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                shape = tuple(self.student(torch.zeros(1, self.spec["channels"], *size, device=self.device)).shape)
        except (RuntimeError, ValueError) as e:  # torch raises either for a size that does not fit
            raise ValueError(f"the student ({type(self.student).__name__}) cannot segment patches of {size} voxels, the "
                             f"synthesis_size: {str(e).splitlines()[0]} (choose student_def strides that divide it)") from e
        finally:
            self.student.train(was_training)
        if shape != expected:
            raise ValueError(f"the student maps a patch of {size} voxels to shape {shape}, expected {expected}")

    def _layout_sampler(self, options: Mapping | None) -> LayoutSampler:
        """Layouts from the atlases the sites chose to share (their policy); refuses when none does."""
        if self.task != "segmentation":
            raise ValueError("a layout-conditioned generator is for segmentation sites; these sites classify")
        self.atlas_sites = sorted(n for n, c in self.cards.items() if c.get("atlas"))
        if not self.atlas_sites:
            raise ValueError(f"the layout-conditioned generator needs a class atlas from at least one site, and none of "
                             f"{sorted(self.cards)} shares one (site policy share_atlas, atlas_min_subjects, or no site datalist); "
                             "use the unconditional generator instead (central_distillation configs/segmentation_unconditional.json)")
        # the atlas covers the sites' field of view; the generator paints random patches of it
        frame = list(self.cards[self.atlas_sites[0]]["atlas"].get("spatial_size") or self.spec["spatial_size"])
        logger.info("layouts from the atlases of sites %s (others share none: %s)", self.atlas_sites,
                    sorted(set(self.cards) - set(self.atlas_sites)) or "-")
        shared = {n: self.cards[n]["atlas"] for n in self.atlas_sites}
        atlas, intensity = combined_atlas(shared, self.num_classes, frame), combined_intensity(shared, frame)
        self.class_intensity = combined_class_intensity(shared, self.num_classes)
        self.class_gradient = combined_class_gradient(shared, self.num_classes, len(frame))
        self.layout_options = dict(options or {})
        crop = [int(c) for c in self.generator.spatial_size]
        if any(c > int(f) for c, f in zip(crop, frame)):
            raise ValueError(f"the generator's patch {crop} is larger than the sites' atlas frame {frame}")
        return LayoutSampler(atlas, crop_size=crop, intensity=intensity, **self.layout_options)

    # ---- site weights -----------------------------------------------------------------------------------------
    def _set_site_weights(self) -> None:
        counts = [self.cards[n].get("class_counts") for n in self.active_sites]
        withheld = [n for n, c in zip(self.active_sites, counts) if c is None]
        if withheld:
            logger.warning("sites %s withhold class counts: weighted equally in every class", withheld)
        combination, weighting = self.ensemble_option, self.ensemble_weighting
        if self.ensemble_option == "auto":
            one_class = [n for n, c in zip(self.active_sites, counts) if c is not None and min(c) == 0]
            combination = "product" if one_class and self.task == "classification" else "mixture"
            if combination == "product":
                weighting = "mean"  # class-share weights would silence exactly the sites of one class
                logger.info("sites %s never saw some class: the ensemble is a product of equally weighted sites", one_class)
        self.ensemble_used = {"combination": combination, "weighting": weighting}
        if weighting == "mean":  # every site counts the same in every class (ablation, DENSE)
            counts = [None] * len(counts)
        weighted = contrast_counts(counts) if weighting == "contrast" else counts
        self.expertise = site_weights(weighted, self.num_classes).to(self.device)  # (K, N), columns sum to one
        if self.task == "segmentation":
            self.class_prior = class_prior_from_counts(counts, self.num_classes).to(self.device)
        else:
            self.class_prior = None  # uniform: the generator draws target labels uniformly

    def _refresh_site_weights(self) -> None:
        """After the set of active sites changed: new expertise weights and (segmentation) class prior."""
        self._set_site_weights()
        self._apply_class_prior()

    def _apply_class_prior(self) -> None:
        """Hand the (segmentation) class prior to the terms that use it."""
        if self.class_prior is None:
            return
        self.terms["balance"].prior = self.class_prior
        if self.conditional_ce_class_balance:
            self.terms["conditional_ce"].class_weights = class_balance_weights(self.class_prior, self.conditional_ce_class_balance)

    def _drop_site(self, site: str, reason: str, step: int, by_policy: bool = False) -> None:
        if not (self.drop_failed_sites or by_policy):
            raise SiteAnswerError(site, reason)
        self.active_sites.remove(site)
        self.dropped[site] = f"step {step}: {reason}"
        logger.warning("dropping site '%s' at step %d: %s", site, step, reason)
        if len(self.active_sites) < self.min_sites:
            raise RuntimeError(f"only {len(self.active_sites)} site(s) left after dropping {sorted(self.dropped)}; min_sites={self.min_sites}")
        self._refresh_site_weights()

    # ---- one iteration ----------------------------------------------------------------------------------------
    def _stream_seed(self, step: int, stream: int) -> int:
        return (self.seed * 1_000_003 + step) * 8 + stream

    def _rng(self, step: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self._stream_seed(step, stream))

    def _sample(self, step: int, stream: int = 0):
        g = self._rng(step, stream)
        z = torch.randn(self.batch_size, self.generator.latent_dim, generator=g)
        if self.layouts is not None:
            layouts, prior = self.layouts.sample_with_prior(self.batch_size, g)
            self._prior = None if prior is None else prior.to(self.device)  # the generator's starting image
            return z.to(self.device), layouts.to(self.device)
        if not self.conditional:
            return z.to(self.device), None
        labels = torch.randint(self.num_classes, (self.batch_size,), generator=g)
        n_mix = int(round(self.boundary_fraction * self.batch_size)) if self.num_classes > 1 else 0
        if n_mix:
            soft = F.one_hot(labels, self.num_classes).float()
            other = (labels[:n_mix] + torch.randint(1, self.num_classes, (n_mix,), generator=g)) % self.num_classes
            share = torch.rand(n_mix, 1, generator=g)
            soft[:n_mix] = share * soft[:n_mix] + (1 - share) * F.one_hot(other, self.num_classes).float()
            labels = soft  # (B, N) class distributions
        return z.to(self.device), labels.to(self.device)

    def _query(self, x: torch.Tensor, step: int, forward_only: bool = False):
        local = {k: float(self.weights[k]) for k in SITE_LOCAL_TERMS}
        while True:
            try:
                request = QueryRequest(x.detach(), step, local, update_discriminator=not forward_only, forward_only=forward_only)
                answers = self.transport.query(request, sites=list(self.active_sites))
            except SiteAnswerError as e:
                self._drop_site(e.site, str(e), step, by_policy=isinstance(e, QueryBudgetExhausted))
                continue
            bad = {n: r for n, a in answers.items() if (r := self._answer_problem(a, x))}
            if not bad:
                return answers
            for n, r in bad.items():
                self._drop_site(n, r, step)

    def _zeroth_order_vjp(self, site: str, x: torch.Tensor, released: torch.Tensor, cotangent: torch.Tensor, step: int) -> torch.Tensor:
        """Estimate ``J^T c`` of a site that returns no gradients from extra queries along random directions:
        ``mean_i <c, r(x + mu u_i) - r(x)> / mu * u_i`` (a Gaussian-smoothing estimate; probes are kept in range)."""
        lo, hi = self.spec.get("value_range") or (0.0, 1.0)
        g, mu = self._rng(step, 2), self.zeroth_order_step
        estimate = torch.zeros_like(x)
        for _ in range(self.zeroth_order_directions):
            u = torch.randn(x.shape, generator=g).to(self.device)
            try:
                probe = self.transport.query(QueryRequest((x + mu * u).clamp(lo, hi), step, {}, want_input_grad=False,
                                                          update_discriminator=False), sites=[site])[site]
            except SiteAnswerError as e:
                self._drop_site(e.site, str(e), step, by_policy=isinstance(e, QueryBudgetExhausted))
                return estimate
            diff = ((probe.outputs.to(self.device).float() - released) * cotangent).flatten(1).sum(1)
            estimate += (diff / (mu * self.zeroth_order_directions)).view(-1, *[1] * (x.ndim - 1)) * u
        return estimate

    def _answer_problem(self, answer, x) -> str | None:
        spatial = tuple(x.shape[2:]) if self.task == "segmentation" else ()
        expected = (x.shape[0],) + spatial if answer.kind == "labels" else (x.shape[0], self.num_classes) + spatial
        if tuple(answer.outputs.shape) != expected:
            return f"answered {answer.kind} of shape {tuple(answer.outputs.shape)}, expected {expected}"
        if answer.kind == "labels" and ((answer.outputs < 0) | (answer.outputs >= self.num_classes)).any():
            return f"answered labels outside [0, {self.num_classes})"
        if not torch.isfinite(answer.outputs.float()).all():
            return f"answered NaN/Inf {answer.kind}"
        g = answer.local_input_grad
        if g is not None and (tuple(g.shape) != tuple(x.shape) or not torch.isfinite(g).all()):
            return "answered an input-gradient of the wrong shape or with NaN/Inf"
        return None

    def _generator_step(self, z, labels, step: int, out: dict):
        """One generator update: query the sites, the server's terms, the sites' VJPs, the image priors."""
        t0 = time.perf_counter()
        x = self._synthesize(z, labels)
        self.timing["generator_s"] += time.perf_counter() - t0
        answers = self._query(x, step)

        t0 = time.perf_counter()
        names = list(self.active_sites)
        # released outputs (logits, probabilities, top-k or labels, as each site's policy says) read as logits
        released = {n: answers[n].outputs.to(self.device).float().requires_grad_(answers[n].kind != "labels") for n in names}
        logits = {n: released_log_probabilities(released[n], answers[n].kind, self.num_classes) for n in names}
        stacked = torch.stack([logits[n] for n in names])
        log_probs = self._ensemble(stacked)
        # a term of weight 0 adds exactly 0 to the loss and to the gradients: it is not computed (in 3D the student's
        # forward pass for the adversarial term and the voxel-wise terms are a large share of the server's time)
        server_terms = {}
        if self.weights["consensus"]:
            server_terms["consensus"] = self.terms["consensus"](stacked, generator=self._rng(step, 4))  # stream 4: its voxel lattice
        if self.weights["balance"]:
            server_terms["balance"] = self.terms["balance"](log_probs)
        if self.weights["adversarial"]:
            with torch.no_grad():
                self.student.eval()
                student_logits = self._student_forward(x.detach())
            server_terms["adversarial"] = self.terms["adversarial"](student_logits, log_probs)
        if (self.conditional or self.layouts is not None) and self.weights["conditional_ce"]:
            server_terms["conditional_ce"] = self.terms["conditional_ce"](log_probs, labels)
        if self.layouts is not None and self.weights["layout_dice"]:
            server_terms["layout_dice"] = self.terms["layout_dice"](log_probs, labels)
        if self.weights["pseudo_label"]:
            server_terms["pseudo_label"] = self.terms["pseudo_label"](log_probs, log_probs.detach().argmax(1))
        total = sum(server_terms.values())
        differentiable = [n for n in names if released[n].requires_grad] if server_terms else []
        grads = torch.autograd.grad(total, [released[n] for n in differentiable], allow_unused=True) if differentiable else []
        cotangents = {n: c for n, c in zip(differentiable, grads) if c is not None}
        self.timing["server_s"] += time.perf_counter() - t0
        with_vjp = {n: c for n, c in cotangents.items() if self.policies[n].return_gradients}
        try:
            vjps = self.transport.vjp(with_vjp) if with_vjp else {}
        except SiteAnswerError as e:  # a site left between the two round trips: this step uses the others' VJPs
            self._drop_site(e.site, str(e), step)
            vjps = {n: v for n, v in e.partial.items() if n in self.active_sites}
        if self.zeroth_order_directions:
            for n, c in cotangents.items():
                if n not in with_vjp and n in self.active_sites:
                    vjps[n] = self._zeroth_order_vjp(n, x.detach(), released[n].detach(), c, step)

        grad_x = torch.zeros_like(x)
        for n in names:
            if n in vjps:
                grad_x = grad_x + vjps[n].to(self.device)
            if answers[n].local_input_grad is not None:
                grad_x = grad_x + answers[n].local_input_grad.to(self.device)
        t0 = time.perf_counter()
        image_terms = self._image_terms(x, z, labels)
        self.g_optimizer.zero_grad(set_to_none=True)
        ((x * grad_x.detach()).sum() + sum(image_terms.values())).backward()
        self.g_optimizer.step()
        self.timing["generator_s"] += time.perf_counter() - t0

        for k, v in server_terms.items():
            out[f"generator/{k}"] = float(v)
        for k, v in image_terms.items():
            out[f"generator/{k}"] = float(v)
        self._record_site_values(answers, out)
        return x, names, stacked, log_probs

    def _image_terms(self, x, z, labels) -> dict:
        """The server's priors on the synthetic inputs themselves (no site involved)."""
        # layouts differ per sample anyway: diversity compares all pairs then
        terms = {"tv": self.terms["tv"](x), "diversity": self.terms["diversity"](x, z, None if self.layouts is not None else _hard(labels))}
        for term in ("class_intensity", "class_gradient"):
            if term in self.terms:
                terms[term] = self.terms[term](x, labels)
        return terms

    def _prior_warmup(self) -> None:
        """``prior_warmup_iterations`` generator updates on the image priors only; no query leaves the server."""
        t0 = time.perf_counter()
        optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.g_optimizer.defaults["lr"], betas=self.g_optimizer.defaults["betas"])
        self.generator.train()
        for step in range(self.prior_warmup_iterations):
            torch.manual_seed(self._stream_seed(step, 3))  # the generator's noise channels
            z, labels = self._sample(step, stream=3)
            terms = self._image_terms(self._synthesize(z, labels), z, labels)
            optimizer.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            optimizer.step()
            if self.writer is not None:
                for k, v in terms.items():
                    self.writer.add_scalar(f"prior_warmup/{k}", float(v), step + 1)
        self.timing["prior_warmup_s"] += time.perf_counter() - t0
        logger.info("generator warmed up on the image priors for %d iterations (%.1f s): %s", self.prior_warmup_iterations,
                    self.timing["prior_warmup_s"], {k: round(float(v), 4) for k, v in terms.items()})

    @torch.no_grad()
    def _frozen_generator_sample(self, z, labels, step: int, out: dict):
        """Past ``generator_iterations``: a sample of the frozen generator, labelled by forward-only queries."""
        t0 = time.perf_counter()
        x = self._forward_only_inputs(z, labels, step)
        self.timing["generator_s"] += time.perf_counter() - t0
        names, stacked = self._forward_only_answers(x, step, out)
        return x, names, stacked, self._ensemble(stacked)

    @torch.no_grad()
    def _forward_only_answers(self, x: torch.Tensor, step: int, out: dict | None = None):
        """The active sites' names and stacked log-probabilities on ``x`` from forward-only queries."""
        answers = self._query(x, step, forward_only=True)
        names = list(self.active_sites)
        stacked = torch.stack([released_log_probabilities(answers[n].outputs.to(self.device).float(), answers[n].kind, self.num_classes) for n in names])
        if out is not None:
            self._record_site_values(answers, out)
        return names, stacked

    def _forward_only_inputs(self, z, labels, step: int) -> torch.Tensor:
        """The inputs of a step past ``generator_iterations`` (a diagnostic subclass feeds other inputs here)."""
        return self._synthesize(z, labels)

    def _ensemble(self, stacked: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """The ensemble's log-probabilities from the sites' stacked log-probabilities (weights and combination of the run)."""
        return ensemble_log_probabilities(stacked, self.expertise, temperature=temperature, combination=self.ensemble_used["combination"])

    def _synthesize(self, z, labels) -> torch.Tensor:
        with autocast(self.device, self.autocast_dtype):
            if self.layouts is not None:
                x = self.generator(z, labels, self._prior)
            else:
                x = self.generator(z, labels) if labels is not None else self.generator(z)
        x = x.float()  # what the sites and the losses see is float32, whatever the compute precision
        if not torch.isfinite(x).all():
            # the server's own failure: said here, before a site refuses the inputs and looks like the culprit
            raise FloatingPointError(f"the generator produced non-finite inputs (it diverged; autocast_dtype {self.autocast_dtype}, "
                                     f"generator_lr {self.g_optimizer.defaults['lr']}): lower generator_lr or set autocast_dtype float32")
        return x

    def _student_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_memory_format(x, self.memory_format, self.spec["spatial_dims"])
        with autocast(self.device, self.autocast_dtype):
            logits = self.student(x)
        return logits.float().contiguous()

    @staticmethod
    def _record_site_values(answers, out: dict) -> None:
        for n, answer in answers.items():
            for k, v in answer.local_values.items():
                out[f"site/{n}/{k}"] = v

    def _step(self, engine, _batch) -> dict:
        step = engine.state.iteration - 1
        torch.manual_seed(self.seed * 1_000_003 + step)  # anything else random in this step (dropout) repeats on resume
        out: dict[str, float] = {}
        self.generator.train()
        z, labels = self._sample(step)
        if self.generator_iterations is not None and step >= self.generator_iterations:
            x, names, stacked, log_probs = self._frozen_generator_sample(z, labels, step, out)
        else:
            x, names, stacked, log_probs = self._generator_step(z, labels, step, out)
        probs = log_probs.exp()
        with torch.no_grad():  # the student's soft targets: the ensemble at the distillation temperature
            targets = probs if self.temperature == 1.0 else self._ensemble(stacked.detach(), self.temperature).exp()
        self.cache.push(x.detach(), targets.detach())
        if self.student_transform is not None and hasattr(self.student_transform, "set_random_state"):
            self.student_transform.set_random_state(seed=(self.seed * 1_000_003 + step) % (2**32))
        if self.student_transform_targets == "queried":  # the views enter the cache labelled; draws stay as cached
            self._push_queried_views(x.detach(), step)
        transform_draws = self.student_transform is not None and self.student_transform_targets == "unchanged"

        t0 = time.perf_counter()
        lr = self._student_lr(step)
        for group in self.s_optimizer.param_groups:
            group["lr"] = lr
        self.student.train()
        g = self._rng(step, 1)
        losses = []
        for _ in range(self.student_steps):
            xb, pb = self.cache.sample(self.student_batch_size, g)
            if transform_draws:
                xb = self._transform_student_inputs(xb)
            loss = self.distill(self._student_forward(xb.to(self.device)), pb.to(self.device))
            self.s_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.s_optimizer.step()
            self.ema.update(self.student)
            losses.append(float(loss))
        self.timing["student_s"] += time.perf_counter() - t0
        out["student/distillation"] = sum(losses) / max(len(losses), 1)
        out["student/lr"] = lr
        if self.task == "segmentation":
            with torch.no_grad():
                out["generator/foreground_fraction"] = float((probs.argmax(1) > 0).float().mean())
                if self.layouts is not None:  # hard Dice of the ensemble's labels to the layouts, whatever the weights
                    from monai.metrics import compute_dice

                    pred = F.one_hot(probs.argmax(1), self.num_classes).movedim(-1, 1)
                    ref = F.one_hot(labels.long(), self.num_classes).movedim(-1, 1)
                    out["generator/layout_agreement"] = float(compute_dice(pred, ref, include_background=False, ignore_empty=True).nanmean())
        engine.state.last_layouts = labels if self.layouts is not None else None
        engine.state.last_inputs = x.detach()
        engine.state.last_probs = probs.detach()
        return out

    def _student_lr(self, step: int) -> float:
        """The student's learning rate at ``step`` (0-based) under ``student_lr_schedule``."""
        if self.student_lr_schedule == "constant":
            return self.student_lr
        progress = step / max(self.iterations, 1)
        if self.max_seconds is not None and self._started is not None:
            progress = max(progress, (time.perf_counter() - self._started) / self.max_seconds)
        return cosine_lr(self.student_lr, progress)

    @torch.no_grad()
    def _push_queried_views(self, x: torch.Tensor, step: int) -> None:
        """``student_transform_targets`` "queried": the step's inputs transformed once, labelled by the sites on the
        transformed inputs themselves (forward-only), into the cache."""
        t0 = time.perf_counter()
        views = self._transform_student_inputs(x, labels_follow=True)
        self.timing["student_s"] += time.perf_counter() - t0
        _, stacked = self._forward_only_answers(views.to(self.device), step)
        self.cache.push(views, self._ensemble(stacked, self.temperature).exp())

    def _transform_student_inputs(self, xb: torch.Tensor, labels_follow: bool = False) -> torch.Tensor:
        lo, hi = self.spec.get("value_range") or (float("-inf"), float("inf"))
        out = []
        for x in xb:
            y = convert_to_tensor(self.student_transform(x), track_meta=False).float()
            if y.shape != x.shape:
                why = ("the cache holds inputs of one shape" if labels_follow else
                       "only label-preserving (intensity) transforms keep the ensemble's answer a valid target")
                raise ValueError(f"student_transform changed an input's shape {tuple(x.shape)} to {tuple(y.shape)}: {why}")
            out.append(y)
        return torch.stack(out).clamp(lo, hi)

    # ---- outputs ------------------------------------------------------------------------------------------
    def _write_montage(self, engine) -> None:
        from monai_fedkd.visualize import montage_2d, montage_3d, save_png

        shown = 32 if self.spec["spatial_dims"] == 2 else 4  # a montage shows the first inputs of a batch of any size
        x, probs = engine.state.last_inputs[:shown].cpu(), engine.state.last_probs[:shown].cpu()
        seg = probs.argmax(1) if self.task == "segmentation" else None  # the ensemble's labels, overlaid
        if self.spec["spatial_dims"] == 2:
            names = self.spec["class_names"] or [str(i) for i in range(self.num_classes)]
            tags = [names[int(c)] for c in probs.argmax(1)] if seg is None else None
            image = montage_2d(x, labels=tags, segmentation=seg, num_classes=self.num_classes)
        else:
            image = montage_3d(x, segmentation=seg, num_classes=self.num_classes)
        path = self.output_dir / "montages" / f"iter_{engine.state.iteration:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(image, path)
        if getattr(engine.state, "last_layouts", None) is not None:  # the layouts the generator was asked to paint
            layouts = engine.state.last_layouts[:shown].cpu()
            save_png(montage_3d(x, segmentation=layouts, num_classes=self.num_classes) if x.ndim == 5
                     else montage_2d(x, segmentation=layouts, num_classes=self.num_classes), path.with_name(path.stem + "_layout.png"))
        if self.writer is not None:
            self.writer.add_image("synthetic_inputs", image, engine.state.iteration, dataformats="HWC")

    def _log_scalars(self, engine) -> None:
        if self.writer is not None:
            for k, v in engine.state.output.items():
                self.writer.add_scalar(k, v, engine.state.iteration)

    def _final_paths(self):
        return self.output_dir / "models" / "model.pt", self.output_dir / CENTRAL_CARD_NAME

    def _finish(self, engine) -> None:
        model_path, card_path = self._final_paths()
        model_path.parent.mkdir(parents=True, exist_ok=True)
        chosen = self.ema.model if self.selection == "ema" else self.student
        tmp = model_path.with_name(".model.pt.tmp")
        # contiguous, whatever layout the run used: whoever loads the file gets conventional tensors
        torch.save({k: v.contiguous() for k, v in chosen.state_dict().items()}, tmp)
        os.replace(tmp, model_path)
        atomic_write_json(card_path, self.central_card(engine))
        logger.info("central model written: %s and %s", model_path, card_path)

    def central_card(self, engine) -> dict:
        first = self.cards[self.active_sites[0]]
        stats = self.transport.stats()
        privacy = self.transport.privacy_reports()
        for n, report in sorted(privacy.items()):
            eps = report.get("epsilon")
            logger.info("site '%s': %d releases, epsilon %s at delta %g", n, report.get("releases", 0),
                        "unbounded (no noise)" if eps is None else f"{eps:.3g}", report.get("delta", float("nan")))
        return {
            "format_version": 1,
            "site": "central",
            "role": "central",
            "task": self.task,
            "spatial_dims": self.spec["spatial_dims"],
            "input": dict(first["input"]),
            "classes": dict(first["classes"]),
            "network_def": network_definition(self.student),
            "generator_def": network_definition(self.generator) if hasattr(self.generator, "_monai_fedkd_network_def") else None,
            "checkpoint": "models/model.pt",
            "selection": self.selection,
            "ema_warmup": self.ema.warmup,
            "autocast_dtype": self.autocast_dtype,
            "memory_format": self.memory_format,
            "cpu_heap": cpu_heap_in_effect(),  # set by the bundle's initialize (monai_fedkd.cpu_heap)
            "seed": self.seed,
            "iterations": int(engine.state.iteration),
            "max_seconds": self.max_seconds,
            "stopped_by_budget": self.stopped_by_budget,
            "batch_size": self.batch_size,
            "boundary_fraction": self.boundary_fraction,
            "student_steps": self.student_steps,
            "student_lr": self.student_lr,
            "student_lr_schedule": self.student_lr_schedule,
            "student_dice_weight": self.distill.dice_weight,
            "generator_iterations": self.generator_iterations,
            "prior_warmup_iterations": self.prior_warmup_iterations,
            "class_intensity_options": self.class_intensity_options,
            "conditional_ce_class_balance": self.conditional_ce_class_balance,
            "consensus_voxel_stride": self.terms["consensus"].voxel_stride,
            "student_transform": _describe(self.student_transform),
            "student_transform_targets": self.student_transform_targets,
            "weights": self.weights,
            "sites": {n: {"sample_count": c.get("sample_count"), "class_counts": c.get("class_counts"), "count_unit": c.get("count_unit"),
                          "policy": self.policies[n].as_dict(), "privacy": privacy.get(n),
                          "transport": stats.get(n), "dropped": self.dropped.get(n)} for n, c in self.cards.items()},
            "zeroth_order_directions": self.zeroth_order_directions,
            "ensemble_weighting": self.ensemble_weighting,
            "ensemble_combination": self.ensemble_option,
            "ensemble_used": dict(self.ensemble_used),
            "layouts": None if self.layouts is None else {
                "atlas_sites": self.atlas_sites, "options": self.layout_options,
                "class_intensity_sites": sorted(n for n in self.atlas_sites if self.cards[n]["atlas"].get("class_intensity")),
                "class_gradient_sites": sorted(n for n in self.atlas_sites if self.cards[n]["atlas"].get("class_gradient")),
                "atlas": {n: {k: v for k, v in self.cards[n]["atlas"].items() if k != "probabilities"} for n in self.atlas_sites}},
            "expertise_weights": {n: self.expertise[i].tolist() for i, n in enumerate(self.active_sites)},
            "timing": dict(self.timing),
            "sample_count": sum(int(c.get("sample_count") or 0) for c in self.cards.values()),
            "class_counts": None,
            "monai_fedkd_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    # ---- run -----------------------------------------------------------------------------------------------
    def _checkpoint_objects(self, engine) -> dict:
        return {"generator": self.generator, "student": self.student, "g_optimizer": self.g_optimizer,
                "s_optimizer": self.s_optimizer, "student_ema": self.ema, "cache": self.cache, "engine": engine}

    def run(self) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for stale in self._final_paths():
            if stale.exists():
                stale.unlink()  # a run (new or resumed) replaces the final outputs only when it completes
        ckpt_dir = self.output_dir / "checkpoints"
        engine = Engine(self._step)
        to_save = self._checkpoint_objects(engine)
        resumed = False
        if self.resume:
            ckpts = sorted(ckpt_dir.glob("distill_checkpoint_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
            if ckpts:
                it = int(ckpts[-1].stem.rsplit("_", 1)[-1])
                Checkpoint.load_objects(to_load=to_save, checkpoint=torch.load(ckpts[-1], map_location=self.device, weights_only=False))
                self._restore_extra(it)  # first: sites dropped before the checkpoint are not asked for their state
                self.transport.load_site_states(f"iter_{it}", sites=list(self.active_sites))
                logger.info("resuming from %s (iteration %d)", ckpts[-1], it)
                resumed = True
            else:
                logger.warning("resume requested but no checkpoint in %s: starting from scratch", ckpt_dir)
        elif ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        saver = Checkpoint(to_save, DiskSaver(str(ckpt_dir), require_empty=False, atomic=True), filename_prefix="distill", n_saved=2,
                           global_step_transform=lambda e, _: e.state.iteration)

        def save(e):
            self.transport.save_site_states(f"iter_{e.state.iteration}", sites=list(self.active_sites))
            self._save_extra(e.state.iteration)
            saver(e)

        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.checkpoint_interval), save)
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional for library users
            logger.warning("tensorboard is not installed: no scalars/images written")
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._log_scalars)
        self._started = time.perf_counter()
        if self.max_seconds is not None:
            started = self._started

            def over_budget(e):
                if time.perf_counter() - started > self.max_seconds and e.state.iteration < self.iterations:
                    logger.info("wall-time budget of %.0f s spent after %d of %d steps: stopping", self.max_seconds, e.state.iteration, self.iterations)
                    self.stopped_by_budget = True
                    e.terminate()

            engine.add_event_handler(Events.ITERATION_COMPLETED, over_budget)
        if self.prior_warmup_iterations and not resumed:
            self._prior_warmup()
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.montage_interval), self._write_montage)
        engine.add_event_handler(Events.COMPLETED, self._write_montage)
        engine.add_event_handler(Events.COMPLETED, self._finish)
        if self.progress:
            ProgressBar(persist=False).attach(engine, output_transform=lambda o: {"student": o["student/distillation"]})
        try:
            engine.run(range(self.iterations), max_epochs=1, epoch_length=self.iterations)
        finally:
            if self.writer is not None:
                self.writer.close()
        return self._final_paths()[0]

    # state that is not a module: active sites and timing
    def _extra_path(self, it: int) -> Path:
        return self.output_dir / "checkpoints" / f"server_state_{it}.json"

    def _save_extra(self, it: int) -> None:
        path = self._extra_path(it)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"active_sites": self.active_sites, "dropped": self.dropped, "timing": self.timing})
        for old in path.parent.glob("server_state_*.json"):
            if int(old.stem.rsplit("_", 1)[-1]) < it - 2 * self.checkpoint_interval:
                old.unlink()

    def _restore_extra(self, it: int) -> None:
        path = self._extra_path(it)
        if path.is_file():
            state = json.loads(path.read_text())
            self.active_sites, self.dropped = state["active_sites"], state["dropped"]
            self.timing = {**self.timing, **state["timing"]}  # a checkpoint of an older version lacks newer timers
            self._refresh_site_weights()
