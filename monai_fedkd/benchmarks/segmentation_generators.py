"""Which generator closes the data-free gap on 3D segmentation: every variant on the same sites, split and time budget.

``python -m monai_fedkd.benchmarks.segmentation_generators [BENCHMARK] --mirror ../shared/data --seconds 600``

For each seed the benchmark's sites (``monai-fedkd bench`` config, default ``ixi_acquisition``) are trained or
reused, then every generator variant distils a central model through the ``central_distillation`` bundle under the
same wall-time budget (``max_seconds``; or, with ``--steps N``, the same number of generator steps, which does not
depend on the machine), and one evaluation scores them, the site ensembles and the site models on
every site's test split. Beside them, the real-input upper bound: the same student, cache and loss, trained on the
sites' *real* training patches labelled by the site ensemble (not data-free; it separates the generator's gap from
the distillation's). Written: ``docs/results/segmentation_generators_<benchmark>.json`` (Dice per class and mean,
steps, wall time, final layout agreement and foreground share of every variant and seed),
``docs/results/segmentation_generators/<benchmark>/<variant>_<budget>_seed<k>.png`` (budget ``600s`` or ``180steps``;
synthetic volumes with the ensemble's labels, for layout variants also the layouts) and a section of ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from monai_fedkd.benchmarks._timing import processor_name
from monai_fedkd.benchmarks.suite import DOCS, load_config, prepare_sites, sites_checksum, write_section
from monai_fedkd.pipeline import BUNDLES_DIR, run_logged, bundle_command, distill_central

logger = logging.getLogger(__name__)

# the sites' atlas policy of the runs before atlas_align existed (played by the benchmark, as the sites' decision)
CENTRE_ALIGNED = {"site_options#policy": {"atlas_align": "centre"}}
# every variant measured before central_distillation 0.9.0 ran in float32; the bundle's "auto" precision would turn
# them into bfloat16 variants on CPUs with AMX, so they pin float32 and the *_bf16 variants ask for bfloat16. The pin
# is the name "float32": until 2026-12-04 it was None, which the bundle command line drops, so those runs got "auto"
# (float32 on the EPYC, whose bfloat16 check fails; the card records what ran)
FLOAT32 = {"autocast_dtype": "float32", "site_options#autocast_dtype": "float32"}
BFLOAT16 = {"autocast_dtype": "bfloat16", "site_options#autocast_dtype": "bfloat16"}
# the segmentation default from the class intensity round to central_distillation 0.10.0 (then with NARROW_GENERATOR's
# width), which the later variants change one thing of
CLASS_INTENSITY_10 = {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "weights#class_intensity": 10.0,
                      "site_options#policy": {"atlas_align": "foreground"}}
WIDE_GENERATOR = {"generator_def#features": [16, 16, 32, 64, 128, 16]}
# the layout generator's width of every variant measured before central_distillation 0.10.0 made WIDE_GENERATOR the
# default: the layout-generator variants pin it, so that their commands still reproduce them
NARROW_GENERATOR = {"generator_def#features": [8, 8, 16, 32, 64, 8]}
BALANCED_CROPS = {"layout_options#class_balanced_crops": True}
# the synthesis size of every variant measured before central_distillation 0.11.0 made the sites' own patch size the
# default: 32 voxels a side or the sites' patch, whichever is smaller (pinned like NARROW_GENERATOR)
PATCH_32 = {"synthesis_size": "$[min(int(s), 32) for s in @spatial_size]"}
SITE_PATCH_SIZE = {"synthesis_size": "$[int(s) for s in @spatial_size]"}
# the consensus term on every voxel: every variant measured before central_distillation 0.12.0 evaluated it so, and
# pins it (like FLOAT32); the consensus variants below say what they change
EVERY_VOXEL_CONSENSUS = {"consensus_voxel_stride": 1}
# the student's and the sites' networks in the contiguous layout: every variant measured before central_distillation
# 0.13.0 ("auto": channels-last in 3D on CPU) computed so, and pins it; the layout variant below says what it changes
CONTIGUOUS = {"memory_format": "contiguous", "site_options#memory_format": "contiguous"}
CHANNELS_LAST = {"memory_format": "channels_last", "site_options#memory_format": "channels_last"}
# the process heap as the C library keeps it: every variant measured before central_distillation 0.14.0 ("auto": freed
# blocks kept for reuse on CPU) ran so; under a wall-time budget the heap changes the step count, so they pin it
SYSTEM_HEAP = {"cpu_heap": "system"}
VARIANTS = {  # name -> (extra central_distillation configs, overrides)
    "unconditional": (("segmentation_unconditional.json",), {}),
    "layout": ((), {}),
    "layout_ce_only": ((), {"weights#layout_dice": 0.0}),
    "layout_with_discriminators": ((), {"weights#realism": 0.5, "with_real_images": True}),
    "layout_rigid": ((), {"layout_options": {"rotate": 0.0, "scale": 0.0, "translate": 0.0, "elastic": 0.0, "texture": 0.0}}),
    # the screening of this generator's options (docs/results.md): each pins what it changes, so that its name keeps its
    # meaning when the bundle default moves (the default became layout_fg_student_steps_6, then layout_aligned_atlas)
    "layout_uniform_crops": ((), {"layout_options#foreground_crop": 0.0, "student_steps": 3, **CENTRE_ALIGNED}),
    "layout_foreground_crops": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 3, **CENTRE_ALIGNED}),
    "layout_fg_student_augment": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 3, "student_augment": True, **CENTRE_ALIGNED}),
    "layout_fg_student_steps_6": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, **CENTRE_ALIGNED}),
    "layout_fg_student_steps_12": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 12, **CENTRE_ALIGNED}),
    "layout_fg_student_steps_6_tv": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "weights#tv": 1.0, **CENTRE_ALIGNED}),
    # sites align their subjects' structures before averaging the atlas (policy atlas_align), and finer cells
    "layout_aligned_atlas": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "site_options#policy": {"atlas_align": "foreground"}}),
    "layout_aligned_atlas_pool_1": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6,
                                         "site_options#policy": {"atlas_align": "foreground", "atlas_pool": 1}}),
    # the generator trains for its first 400 steps only (it plateaus after a few hundred), then labels inputs for the
    # student through forward-only queries
    "layout_generator_400": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "generator_iterations": 400,
                                  "site_options#policy": {"atlas_align": "foreground"}}),
    "layout_generator_400_pool_1": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "generator_iterations": 400,
                                         "site_options#policy": {"atlas_align": "foreground", "atlas_pool": 1}}),
    # each painted structure's intensities pulled towards the sites' class intensity quantiles
    "layout_class_intensity_1": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "weights#class_intensity": 1.0,
                                      "site_options#policy": {"atlas_align": "foreground"}}),
    "layout_class_intensity_10": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "weights#class_intensity": 10.0,
                                       "site_options#policy": {"atlas_align": "foreground"}}),
    "layout_class_intensity_30": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "weights#class_intensity": 30.0,
                                       "site_options#policy": {"atlas_align": "foreground"}}),
    # on top of weight 10: 300 server-only generator updates on the intensity prior before the first query, and the
    # intensity term per sample instead of pooled over the batch
    "layout_prior_warmup_300": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "weights#class_intensity": 10.0,
                                     "prior_warmup_iterations": 300, "site_options#policy": {"atlas_align": "foreground"}}),
    "layout_class_intensity_per_sample": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "weights#class_intensity": 10.0,
                                               "class_intensity_options": {"per_sample": True},
                                               "site_options#policy": {"atlas_align": "foreground"}}),
    # on top of weight 10: the student's loss adds a soft Dice term over the foreground classes to the voxel-wise KL
    "layout_student_dice_1": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "weights#class_intensity": 10.0,
                                   "student_dice_weight": 1.0, "site_options#policy": {"atlas_align": "foreground"}}),
    # on top of weight 10: the student's learning rate decays along half a cosine to 0 over the wall-time budget, from
    # the constant rate of the default (1e-3) or from the sites' own training rate (2e-3)
    "layout_student_cosine": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "weights#class_intensity": 10.0,
                                   "student_lr_schedule": "cosine", "site_options#policy": {"atlas_align": "foreground"}}),
    "layout_student_cosine_lr_2e-3": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "weights#class_intensity": 10.0,
                                           "student_lr_schedule": "cosine", "student_lr": 0.002,
                                           "site_options#policy": {"atlas_align": "foreground"}}),
    # on top of weight 10: a centred crop picks its structure first, each alike, then a voxel of it (small structures
    # such as the hippocampus are framed as often as the ventricles)
    "layout_class_balanced_crops": ((), {"layout_options#foreground_crop": 2 / 3, "layout_options#class_balanced_crops": True,
                                         "student_steps": 6, "weights#class_intensity": 10.0,
                                         "site_options#policy": {"atlas_align": "foreground"}}),
    # on top of weight 10: the conditional CE weights each layout class by the inverse of its pooled voxel share
    # (power 1) or its square root (0.5), so the generator's objective asks as much of the hippocampus as of the background
    "layout_ce_class_balance_05": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "weights#class_intensity": 10.0,
                                        "conditional_ce_class_balance": 0.5, "site_options#policy": {"atlas_align": "foreground"}}),
    "layout_ce_class_balance_1": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "weights#class_intensity": 10.0,
                                       "conditional_ce_class_balance": 1.0, "site_options#policy": {"atlas_align": "foreground"}}),
    # the class intensity default plus the neighbour-difference prior per axis (local contrast; against stripes and blobs)
    "layout_class_gradient_10": ((), {"layout_options#foreground_crop": 2 / 3, "student_steps": 6, "weights#class_intensity": 10.0,
                                      "weights#class_gradient": 10.0, "site_options#policy": {"atlas_align": "foreground"}}),
    # the default with the generator's, the student's and the sites' forward passes in bfloat16 (autocast): the same
    # objective, more steps in the same wall time where the CPU (AMX) or GPU computes bfloat16 faster
    "layout_class_intensity_10_bf16": ((), {**CLASS_INTENSITY_10, **BFLOAT16}),
    # the class intensity default (float32) with the generator's BasicUNet at twice the width (LayoutGenerator's own
    # default, and the bundle's since central_distillation 0.10.0), alone
    # and with the ninth round's class-balanced crops
    "layout_wide_generator": ((), {**CLASS_INTENSITY_10, **WIDE_GENERATOR}),
    "layout_wide_generator_balanced_crops": ((), {**CLASS_INTENSITY_10, **WIDE_GENERATOR, **BALANCED_CROPS}),
    # the generator at MONAI's BasicUNet default width (four times the old default's, twice the new one's)
    "layout_widest_generator": ((), {**CLASS_INTENSITY_10, "generator_def#features": [32, 32, 64, 128, 256, 32]}),
    # on top of the bfloat16 default: the wider generator, and the class-balanced crops of the ninth round in bfloat16
    # (on CPUs whose bfloat16 convolutions fail precision.bfloat16_convolutions_agree the generator diverges: the run stops)
    "layout_wide_generator_bf16": ((), {**CLASS_INTENSITY_10, **WIDE_GENERATOR, **BFLOAT16}),
    "layout_class_balanced_crops_bf16": ((), {**CLASS_INTENSITY_10, **BALANCED_CROPS, **BFLOAT16}),
    # the wider generator synthesizing at the sites' own training patch size instead of 32 voxels a side: the sites
    # were trained on patches of that size with instance norm, and answer a smaller window far worse (IXI's sites
    # score 0.16 mean Dice through 32^3 sliding windows against 0.59 through their own 48^3)
    "layout_site_patch_size": ((), {**CLASS_INTENSITY_10, **WIDE_GENERATOR, **SITE_PATCH_SIZE}),
    # the 0.11.0 default with the consensus term on one voxel in eight (every second voxel per axis, a random lattice
    # each step; in 3D the term was most of the server's time per step), and without it (the suite's ablation)
    "site_patch_consensus_stride_2": ((), {**CLASS_INTENSITY_10, **WIDE_GENERATOR, **SITE_PATCH_SIZE, "consensus_voxel_stride": 2}),
    "site_patch_no_consensus": ((), {**CLASS_INTENSITY_10, **WIDE_GENERATOR, **SITE_PATCH_SIZE, "weights#consensus": 0.0}),
    # the 0.12.0 default with the student and the site networks in channels-last (the same objective, faster steps
    # in 3D on CPU)
    "site_patch_channels_last": ((), {**CLASS_INTENSITY_10, **WIDE_GENERATOR, **SITE_PATCH_SIZE, "consensus_voxel_stride": 2, **CHANNELS_LAST}),
    # the 0.13.0 default with freed blocks kept in the heap (the same numbers, cheaper server terms in 3D)
    "site_patch_retained_heap": ((), {**CLASS_INTENSITY_10, **WIDE_GENERATOR, **SITE_PATCH_SIZE, "consensus_voxel_stride": 2, **CHANNELS_LAST,
                                      "cpu_heap": "retain"}),
}
UPPER_BOUND = "real_inputs"
# name -> overrides of the bundle config: the real-input bounds, the bundle's student on the sites' real patches of
# the size the data-free runs of that time synthesized (32^3 until central_distillation 0.11.0, then the sites' own)
UPPER_BOUNDS = {UPPER_BOUND: PATCH_32, "real_inputs_site_patch_size": SITE_PATCH_SIZE}


def real_input_upper_bound(sites_json: Path, output_dir: Path, seconds: float | None, seed: int, overrides: dict | None = None,
                           steps: int | None = None) -> Path:
    """The bundle's student, cache and distillation loss on the sites' real training patches labelled by the
    site ensemble, for ``seconds`` (or ``steps`` queries of the ensemble, when given); its card (role
    ``real_input_bound``) names the student and says it is not data-free.
    ``overrides`` change the bundle config (such as ``synthesis_size``, the size of the real patches)."""
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    from monai_fedkd.baselines.fedavg import write_global_model
    from monai_fedkd.losses import DistillationLoss, ensemble_log_probabilities, site_weights
    from monai_fedkd.networks import network_definition
    from monai_fedkd.server.distillation import SampleCache, _EMA, cosine_lr
    from monai_fedkd.site.policy import released_log_probabilities
    from monai_fedkd.transport import QueryRequest

    set_determinism(seed)
    root = BUNDLES_DIR / "central_distillation" / "configs"
    parser = ConfigParser()
    parser.read_config([str(root / "train.json"), str(root / "segmentation.json")])
    # the bound trains on the sites' real patches: they load them whatever the data-free default says
    parser.update({"sites": str(sites_json), "output_dir": str(output_dir), "seed": seed, "with_real_images": True, **FLOAT32, **(overrides or {})})
    cfg = {k: parser.get_parsed_content(k) for k in ("batch_size", "student_batch_size", "student_steps", "student_lr", "cache_size", "ema_decay", "ema_warmup",
                                                     "student_dice_weight", "student_lr_schedule")}
    transport, student = parser.get_parsed_content("transport"), parser.get_parsed_content("student_def")
    sites, size = parser.get_parsed_content("query_sites"), parser.get_parsed_content("synthesis_size")
    cards = transport.site_cards()
    names = sorted(cards)
    num_classes = cards[names[0]]["classes"]["num_classes"]
    expertise = site_weights([cards[n].get("class_counts") for n in names], num_classes)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg["student_lr"])
    ema, cache, loss_fn = _EMA(student, cfg["ema_decay"], warmup=cfg["ema_warmup"]), SampleCache(cfg["cache_size"]), DistillationLoss(dice_weight=cfg["student_dice_weight"])
    g, start, step = torch.Generator().manual_seed(seed), time.perf_counter(), 0

    def progress() -> float:  # the share of the budget spent, for the stopping rule and a cosine schedule
        return step / steps if steps is not None else (time.perf_counter() - start) / seconds

    while progress() < 1.0:
        site = sites[step % len(sites)]
        x = site._real_batch(cfg["batch_size"], g, size=size)  # in-process diagnostic: the site's own real patches, generator-sized
        answers = transport.query(QueryRequest(x, step, {}, want_input_grad=False, update_discriminator=False), sites=names)
        stacked = torch.stack([released_log_probabilities(answers[n].outputs.float(), answers[n].kind, num_classes) for n in names])
        log_probs = ensemble_log_probabilities(stacked, expertise)
        cache.push(x, log_probs.exp())
        student.train()
        if cfg["student_lr_schedule"] == "cosine":  # the bundle's schedule over the same budget
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(cfg["student_lr"], progress())
        for _ in range(cfg["student_steps"]):
            xb, pb = cache.sample(cfg["student_batch_size"], g)
            loss = loss_fn(student(xb), pb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.update(student)
        step += 1
    template = {**cards[names[0]], "network_def": network_definition(student), "seed": seed, "iterations": step, "max_seconds": None if steps is not None else seconds,
                "upper_bound": "student distilled on the sites' real training patches (not data-free)"}
    write_global_model(ema.model.state_dict(), template, output_dir, "real_input_bound",
                       {"sites": names, "batch_size": cfg["batch_size"], "student_steps": cfg["student_steps"], "student_lr": cfg["student_lr"],
                        "synthesis_size": [int(s) for s in size]})
    return output_dir


def _scalars(run_dir: Path, tags) -> dict:
    """Mean of the last 20 values of each TensorBoard scalar in ``tags`` (absent tags are left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = run_dir / "tensorboard"
    if not tb.is_dir():
        return {}
    acc = EventAccumulator(str(tb))
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    return {t: statistics.mean(e.value for e in acc.Scalars(t)[-20:]) for t in tags if t in have}


def _finished(model_dir: Path, seconds: float | None, steps: int | None = None) -> dict | None:
    """The card of a variant already built under the same budget (reused with ``reuse=True``)."""
    card = model_dir / "central_card.json"
    if not (card.is_file() and (model_dir / "models" / "model.pt").is_file()):
        return None
    card = json.loads(card.read_text())
    if steps is not None:
        return card if card.get("max_seconds") is None and card.get("iterations") == steps else None
    return card if card.get("max_seconds") == seconds else None


def _budget_name(seconds: float | None, steps: int | None) -> str:
    """A budget in folder and file names: ``600s`` (wall time) or ``150steps`` (generator steps)."""
    return f"{steps}steps" if steps is not None else f"{seconds:.0f}s"


def run(benchmark: str = "ixi_acquisition", mirror=None, workdir="runs/bench", seeds=None, seconds: float = 600.0, variants=None,
        docs: Path | None = DOCS, reuse: bool = False, steps: int | None = None) -> dict:
    """``steps``: give every variant this many generator steps instead of ``seconds`` of wall time. A wall-time budget
    compares what each variant buys in the same time, but its step count follows the processor and whatever else
    slows the machine; a step budget compares the variants' objectives alone, reproducibly."""
    cfg = load_config(benchmark)
    if steps is not None:
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        steps, seconds = int(steps), None
    budget = _budget_name(seconds, steps)
    variants = list(variants or VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS) - set(UPPER_BOUNDS))
    if unknown:
        raise ValueError(f"unknown generator variants {unknown}; known: {[*VARIANTS, *UPPER_BOUNDS]}")
    out_json = None if docs is None else Path(docs) / "results" / f"segmentation_generators_{cfg['name']}.json"
    results = {"benchmark": cfg["name"], "seconds_per_variant": seconds, "variants": {v: {"configs": list(VARIANTS[v][0]), "overrides": VARIANTS[v][1]}
                                                                                        for v in variants if v in VARIANTS}, "runs": []}
    failed = []
    for seed in seeds or cfg["seeds"]:
        run_dir, site_dirs, site_files, info = prepare_sites(cfg, seed, workdir, mirror)
        if info["task"] != "segmentation":
            raise ValueError(f"benchmark {cfg['name']} is {info['task']}; this compares segmentation generators")
        results["spatial_dims"] = info["spatial_dims"]
        sites_sha256 = sites_checksum(site_dirs)
        elsewhere = _published_on_other_sites(out_json, sites_sha256)  # their montages keep their names
        built = {}
        for v in variants:
            name = f"generator_{v}_{budget}"  # one folder per variant and budget
            t0 = time.perf_counter()
            if reuse and (card := _finished(run_dir / name, seconds, steps)) is not None:
                logger.info("reusing %s (built under the same budget)", run_dir / name)
                built[v] = (run_dir / name, None, card)
                continue
            try:
                if v in UPPER_BOUNDS:
                    model_dir = real_input_upper_bound(run_dir / "sites.json", run_dir / name, seconds, seed, UPPER_BOUNDS[v], steps=steps)
                else:
                    extra, overrides = VARIANTS[v]
                    pinned = {**FLOAT32, **EVERY_VOXEL_CONSENSUS, **CONTIGUOUS, **SYSTEM_HEAP, **({} if extra else {**NARROW_GENERATOR, **PATCH_32})}  # extra configs bring another generator
                    model_dir = distill_central(run_dir, site_dirs, site_files, "segmentation",
                                                {"seed": seed, **({"iterations": steps} if steps else {"iterations": 1_000_000, "max_seconds": seconds}),
                                                 "checkpoint_interval": 1_000_000,
                                                 "montage_interval": 1_000_000, **pinned, **overrides}, name=name, extra_configs=extra)
            except Exception as e:  # a queue of hour-long variants goes on past one that fails; the run says so at the end
                logger.error("variant %s failed on seed %d; the others go on: %s", v, seed, e)
                failed.append(f"{v} (seed {seed}): {str(e).splitlines()[0]}")
                continue
            built[v] = (model_dir, time.perf_counter() - t0, json.loads((model_dir / "central_card.json").read_text()))
        if not built:
            continue
        # one evaluation folder per budget and set of variants: runs of other variants may evaluate at the same time
        tag = f"{budget}_" + "_".join(sorted(variants))

        def evaluate(key: str) -> dict:
            out = run_dir / f"eval_generators_{tag}" if key == "test" else run_dir / f"eval_generators_{tag}_{key}"
            cmd = bundle_command("evaluation", "evaluate.json", {"models": [str(d) for d in site_dirs], "test_datalists": [str(f) for f in site_files],
                                                                 "output_dir": str(out), "extra_models": {v: str(d) for v, (d, _, _) in built.items()},
                                                                 "ensemble": True, "test_key": key})
            run_logged(cmd, out.with_suffix(".log"), f"{key} evaluation")
            return json.loads((out / "metrics.json").read_text())

        # variants are chosen on the sites' validation splits, never on test: both are recorded
        metrics, validation = evaluate("test"), evaluate("validation")
        sites = [m for m, meta in metrics["meta"]["models"].items() if meta["role"] == "site"]
        reference = {"ensemble_weighted": metrics["ensemble_weighted"]["pooled"], "ensemble_mean": metrics["ensemble_mean"]["pooled"],
                     "mean_local": {"mean_dice": statistics.mean(metrics[s]["pooled"]["mean_dice"] for s in sites)}}
        for v, (d, wall, card) in built.items():
            # under a wall-time budget the step count depends on the processor and the threads the distillation had
            record = {"seed": seed, "variant": v, "seconds": seconds, **({"steps_budget": steps} if steps else {}),
                      "torch_threads": torch.get_num_threads(), "processor": processor_name(), "sites_sha256": sites_sha256,
                      "pooled": metrics[v]["pooled"],
                      "validation": {"mean_dice": validation[v]["pooled"]["mean_dice"], "ensemble_weighted": validation["ensemble_weighted"]["pooled"]["mean_dice"]},
                      "steps": card["iterations"], "wall_s": wall,
                      "reference": reference, **_scalars(d, ["generator/layout_agreement", "generator/foreground_fraction", "student/distillation"])}
            results["runs"].append(record)
            montages = sorted((d / "montages").glob("iter_*.png"))
            if docs is not None and montages:
                folder = Path(docs) / "results" / "segmentation_generators" / cfg["name"]  # variant names repeat across benchmarks
                folder.mkdir(parents=True, exist_ok=True)
                last = [m for m in montages if not m.stem.endswith("_layout")][-1]
                stem = f"{v}_{budget}_seed{seed}" + (f"_{_threads(record)}threads" if _threads(record) > 1 else "")
                if (seed, v, seconds, steps) in elsewhere:
                    stem += f"_sites{sites_sha256[:8]}"  # the published montage of that name shows the earlier sites' run
                shutil.copyfile(last, folder / f"{stem}.png")
                layout = last.with_name(last.stem + "_layout.png")
                if layout.is_file():
                    shutil.copyfile(layout, folder / f"{stem}_layout.png")
        if out_json is not None:
            published = _merge_published(out_json, results)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_json.with_name(f".{out_json.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(published, indent=2) + "\n")
            os.replace(tmp, out_json)
            write_markdown(published, Path(docs) / "results.md")
    if failed:
        raise RuntimeError(f"{len(failed)} generator variant run(s) failed (the others are recorded): " + "; ".join(failed))
    return published if out_json is not None else results


def atlas_layout_match(site_dirs, site_files, aligns=("centre", "foreground"), pools=(2, 1)) -> dict:
    """How much a layout drawn from the sites' atlas looks like a real subject, per atlas alignment and cell size.

    Leave one out over all training subjects of all sites: the atlas of the others (aligned and pooled into cells as
    the sites do it, read back at full size as the server does it) gives an undeformed layout with the atlas's class
    volumes (:class:`~monai_fedkd.server.layouts.LayoutSampler` without jitter), scored by Dice per class against the
    subject left out (in the same alignment). A data-free proxy for the synthesis: the generator paints these layouts.
    """
    from monai_fedkd.server.layouts import LayoutSampler, upsampled_atlas
    from monai_fedkd.site.atlas import AtlasAccumulator, pool_cells, preprocessed_subjects

    labels, card = [], None
    for site_dir, datalist in zip(site_dirs, site_files):
        card = json.loads((Path(site_dir) / "site_card.json").read_text())
        num_classes = card["classes"]["num_classes"]
        labels += [torch.as_tensor(label) for label, _ in preprocessed_subjects(card, datalist)]
    if len(labels) < 2:
        raise ValueError(f"atlas layout match needs at least 2 training subjects, the sites hold {len(labels)}")
    out = {"subjects": len(labels), "classes": card["classes"]["names"][1:], "runs": []}
    for align in aligns:
        frame = AtlasAccumulator(num_classes, card["input"]["spatial_size"], align=align)
        frame.add(labels[0])
        singles = []  # each subject's one-hot map in the common frame
        for lab in labels:
            one = AtlasAccumulator(num_classes, frame.spatial_size, align=align)
            one.add(lab)
            if one.spatial_size != frame.spatial_size:
                raise ValueError(f"subjects of different frames ({one.spatial_size} vs {frame.spatial_size}): resample them alike")
            singles.append(one.mean())
        total, n = torch.stack(singles).sum(0), len(singles)
        for pool in pools:
            pooled_total = pool_cells(total, pool)
            dice = []
            for one in singles:
                atlas = upsampled_atlas((pooled_total - pool_cells(one, pool)) / (n - 1), frame.spatial_size)
                layout = LayoutSampler(atlas, rotate=0, scale=0, translate=0, elastic=0, texture=0, volume_jitter=0).sample(1, torch.Generator())[0]
                truth = one.argmax(0)
                dice.append([float(2 * ((layout == c) & (truth == c)).sum() / max(int((layout == c).sum() + (truth == c).sum()), 1))
                             for c in range(1, num_classes)])
            per_class = torch.tensor(dice).mean(0)
            out["runs"].append({"align": align, "pool": pool, "dice": dict(zip(out["classes"], per_class.tolist())),
                                "mean_dice": float(per_class.mean())})
            logger.info("atlas %s-aligned, pool %d: leave-one-out layout Dice %.3f", align, pool, float(per_class.mean()))
    return out


def _merge_published(out_json: Path, results: dict) -> dict:
    """The published runs (including those another variant's process wrote since this one started) with the runs
    this call made (``results["runs"]``) in place of those of the same seed, variant, budget and site models. Runs
    made from other site models of a seed (its sites were trained anew) are kept: the tables compare runs of the
    same site models only (:func:`write_markdown`)."""
    produced = results["runs"]
    if not out_json.is_file():
        return {**results, "runs": list(produced)}
    old = json.loads(out_json.read_text())
    mine = {_run_key(r) for r in produced}
    kept = [{"seconds": old.get("seconds_per_variant"), **r} for r in old["runs"]]  # early records named their budget once
    kept = [r for r in kept if _run_key(r) not in mine]
    # a step-budget run has no wall-time budget: the file's legacy default (the budget of records that did not name one) stays
    seconds_per_variant = results.get("seconds_per_variant") or old.get("seconds_per_variant")
    return {**results, "seconds_per_variant": seconds_per_variant, "variants": {**old.get("variants", {}), **results["variants"]}, "runs": kept + produced}


def _published_on_other_sites(out_json: Path | None, sites_sha256: str) -> set[tuple]:
    """(seed, variant, seconds, steps budget) of the published runs made from other site models than ``sites_sha256``."""
    if out_json is None or not out_json.is_file():
        return set()
    old = json.loads(out_json.read_text())
    return {(r["seed"], r["variant"], r.get("seconds", old.get("seconds_per_variant")), r.get("steps_budget")) for r in old["runs"]
            if r.get("sites_sha256") != sites_sha256}


def _threads(r: dict) -> int:
    """The torch threads a run had (records before 2026-12-02 did not say; most ran at one)."""
    return r.get("torch_threads", 1)


def _run_key(r: dict) -> tuple:
    return r["seed"], r["variant"], r["seconds"], r.get("steps_budget"), _threads(r), r.get("processor"), r.get("sites_sha256")


MARK_START, MARK_END = "<!-- segmentation_generators:{}:start -->", "<!-- segmentation_generators:{}:end -->"


def _reference(r: dict) -> dict:
    """A run's references on test: weighted ensemble, the target 0.9 x ensemble, mean local model."""
    ref = r.get("reference") or {}
    ens, local = (ref.get("ensemble_weighted") or {}).get("mean_dice"), (ref.get("mean_local") or {}).get("mean_dice")
    return {"ensemble": ens, "target": None if ens is None else 0.9 * ens, "local": local}


_mean = lambda xs: statistics.mean(xs) if xs else float("nan")  # noqa: E731
_fmt = lambda x: "–" if x is None or x != x else f"{x:.3f}"  # noqa: E731


def _by_variant(runs, default_seconds) -> dict[str, list[dict]]:
    by_variant: dict[str, list[dict]] = {}
    for r in runs:
        threads = f", {_threads(r)} threads" if _threads(r) > 1 else ""
        processor = f", {r['processor']}" if r.get("processor") else ""  # records before 2026-12-05 did not say
        budget = f"{r['steps_budget']} steps" if r.get("steps_budget") else f"{r.get('seconds', default_seconds):.0f} s"
        by_variant.setdefault(f"{r['variant']} ({budget}{threads}{processor})", []).append(r)
    return by_variant


def _screening_lines(by_variant: dict[str, list[dict]], classes: list[str]) -> tuple[list[int], list[str]]:
    """The screening table of ``by_variant`` on the seeds every variant ran, ranked by validation Dice, and each
    of those seeds' references."""
    screen = sorted(set.intersection(*[{r["seed"] for r in rs} for rs in by_variant.values()])) if by_variant else []
    mean, fmt = _mean, _fmt
    lines = ["| variant | validation Dice | test Dice | " + " | ".join(classes) + " | steps | wall (s) | layout Dice (ensemble vs layout) | foreground share |",
             "|---|---|---|" + "---|" * len(classes) + "---|---|---|---|"]

    def rank(rs):  # by validation Dice where recorded
        val = [r["validation"]["mean_dice"] for r in rs if r.get("validation")]
        return -(mean(val) if val else mean([r["pooled"]["mean_dice"] or 0 for r in rs]))

    screened = {v: [r for r in rs if r["seed"] in screen] for v, rs in by_variant.items()}
    for v, rs in sorted(screened.items(), key=lambda kv: rank(kv[1])):
        per_class = [mean([r["pooled"]["dice"].get(c) for r in rs if r["pooled"]["dice"].get(c) is not None]) for c in classes]
        ld = [r["generator/layout_agreement"] for r in rs if "generator/layout_agreement" in r]
        fg = [r["generator/foreground_fraction"] for r in rs if "generator/foreground_fraction" in r]
        val = [r["validation"]["mean_dice"] for r in rs if r.get("validation")]
        walls = [r["wall_s"] for r in rs if r.get("wall_s")]
        lines.append(f"| {v} | {fmt(mean(val) if val else None)} | {mean([r['pooled']['mean_dice'] or 0 for r in rs]):.3f} | "
                     + " | ".join(fmt(x) for x in per_class) + f" | {mean([r['steps'] for r in rs]):.0f} | "
                     + (f"{mean(walls):.0f}" if walls else "–") + f" | {fmt(mean(ld) if ld else None)} | " + (f"{mean(fg):.4f}" if fg else "–") + " |")
    for seed in screen:
        ref = next((_reference(r) for rs in screened.values() for r in rs if r["seed"] == seed and r.get("reference")), None)
        if ref:
            lines += ["", f"References (seed {seed}, test): weighted ensemble {fmt(ref['ensemble'])}, target 0.9 × ensemble {fmt(ref['target'])}, "
                      f"mean local model {fmt(ref['local'])}. Target: central ≥ 0.9 × ensemble and ≥ mean local."]
    return screen, lines


def _suite_sites(suite_json: Path) -> dict[int, str]:
    """seed -> the site models' checksum of each seed the benchmark suite published (``monai-fedkd bench``), if any."""
    if not suite_json.is_file():
        return {}
    return {r["seed"]: r["sites_sha256"] for r in json.loads(suite_json.read_text()).get("runs", []) if r.get("sites_sha256")}


def write_markdown(results: dict, page: Path) -> None:
    """One screening table per seed (every variant run on that seed, so that rows compare like with like) and the
    finalists' table (every variant run on more than one seed: each seed against its own references and the target),
    both over the runs made from each seed's current site models (those the benchmark suite published for the seed, else
    those of its latest generator run: a real-input bound alone on other sites has nothing data-free beside it); below
    them, one screening table per seed and other site models, over the runs made from those."""
    name = results["benchmark"]
    mean, fmt = _mean, _fmt
    current = {r["seed"]: r.get("sites_sha256") for r in results["runs"]}  # records are in the order they were made
    current.update({r["seed"]: r.get("sites_sha256") for r in results["runs"] if r["variant"] not in UPPER_BOUNDS})
    # where the benchmark suite published a seed, its site models are the seed's current ones, so that this comparison
    # and the suite's tables speak of the same models (runs on sites trained anew elsewhere go to the tables below)
    made = {(r["seed"], r.get("sites_sha256")) for r in results["runs"]}
    current.update({seed: sha for seed, sha in _suite_sites(page.parent / "results" / f"{name}.json").items() if (seed, sha) in made})
    now = [r for r in results["runs"] if r.get("sites_sha256") == current[r["seed"]]]
    earlier = [r for r in results["runs"] if r.get("sites_sha256") != current[r["seed"]]]
    classes = sorted({c for r in results["runs"] for c in (r["pooled"].get("dice") or {})})
    by_variant = _by_variant(now, results["seconds_per_variant"])
    lines = [MARK_START.format(name), f"## {results.get('spatial_dims', 3)}D segmentation generators: {name}", "",
             "Pooled Dice of the central model per generator variant and distillation budget, one table per seed (each seed's "
             "current site models, the same for every row of its table): on the sites' validation splits (what variants are chosen "
             "by) and on their test splits (reported, never chosen by), with the test Dice per foreground class."]
    for seed in sorted({r["seed"] for r in now}):  # a table per seed: variants compare only on the same sites
        _, table = _screening_lines(_by_variant([r for r in now if r["seed"] == seed], results["seconds_per_variant"]), classes)
        lines += ["", f"Seed {seed} (site models sha256 {str(current[seed])[:12]}…):", "", *table]
    finalists = {v: sorted(rs, key=lambda r: r["seed"]) for v, rs in by_variant.items() if len({r["seed"] for r in rs}) > 1}
    if finalists:
        lines += ["", "Finalists, every seed against its own sites' references (test Dice; the target: ≥ 0.9 × the weighted ensemble "
                  "and ≥ the mean local model):", "",
                  "| variant | seed | validation Dice | test Dice | 0.9 × ensemble | mean local | gap to the target |", "|---|---|---|---|---|---|---|"]
        for v, rs in finalists.items():
            refs, gaps = [_reference(r) for r in rs], []
            for r, ref in zip(rs, refs):
                test, bars = r["pooled"]["mean_dice"], [x for x in (ref["target"], ref["local"]) if x is not None]
                gap = test - max(bars) if bars and test is not None else None  # the stricter of the two targets
                gaps.append(gap)
                lines.append(f"| {v} | {r['seed']} | {fmt((r.get('validation') or {}).get('mean_dice'))} | {fmt(test)} | {fmt(ref['target'])} | "
                             f"{fmt(ref['local'])} | {'–' if gap is None else f'{gap:+.3f}'} |")
            col = lambda k: [x[k] for x in refs if x[k] is not None]  # noqa: E731
            lines.append(f"| {v} | mean | {fmt(mean([r['validation']['mean_dice'] for r in rs if r.get('validation')]))} | "
                         f"{fmt(mean([r['pooled']['mean_dice'] for r in rs if r['pooled']['mean_dice'] is not None]))} | {fmt(mean(col('target')))} | "
                         f"{fmt(mean(col('local')))} | " + (f"{mean([g for g in gaps if g is not None]):+.3f}" if any(g is not None for g in gaps) else "–") + " |")
    groups: dict[tuple, list[dict]] = {}
    for r in earlier:
        groups.setdefault((r["seed"], r.get("sites_sha256")), []).append(r)
    for (seed, sites), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        _, table = _screening_lines(_by_variant(rs, results["seconds_per_variant"]), classes)
        lines += ["", f"Seed {seed}, other site models (sha256 {str(sites)[:12]}…; the seed's sites trained anew, so these runs compare "
                  "with each other only):", "", *table]
    lines += ["", "Montages (synthetic volumes with the ensemble's labels; `_layout`: with the layout asked for): "
              f"`docs/results/segmentation_generators/{name}/`.", "",
              f"Reproduce: `python -m monai_fedkd.benchmarks.segmentation_generators {name} --mirror ../shared/data "
              f"--seconds S --seeds K --variants ...`, or `--steps N` for the rows of N steps (records: "
              f"`docs/results/segmentation_generators_{name}.json`).", MARK_END.format(name)]
    write_section(page, MARK_START.format(name), MARK_END.format(name), lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", nargs="?", default="ixi_acquisition")
    parser.add_argument("--mirror", default=None)
    parser.add_argument("--workdir", default="runs/bench")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--seconds", type=float, default=600.0, help="distillation wall-time budget per variant")
    parser.add_argument("--steps", type=int, default=None, help="a budget of generator steps per variant instead of --seconds "
                        "(reproducible on any machine; the wall time is recorded)")
    parser.add_argument("--variants", nargs="+", default=None, help=f"default: all of {list(VARIANTS)}; also {list(UPPER_BOUNDS)}")
    parser.add_argument("--docs", default=str(DOCS))
    parser.add_argument("--reuse", action="store_true", help="keep variants already built under the same budget")
    parser.add_argument("--atlas-match", action="store_true", help="only score layouts of the sites' atlas against held-out "
                        "training subjects per alignment and cell size (docs/results/segmentation_generators/atlas_match_<benchmark>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.atlas_match:
        cfg = load_config(args.benchmark)
        for seed in args.seeds or cfg["seeds"][:1]:
            _, site_dirs, site_files, _ = prepare_sites(cfg, seed, args.workdir, args.mirror)
            match = {"benchmark": cfg["name"], "seed": seed, **atlas_layout_match(site_dirs, site_files)}
            if args.docs:
                path = Path(args.docs) / "results" / "segmentation_generators" / f"atlas_match_{cfg['name']}_seed{seed}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(match, indent=2) + "\n")
        return 0
    run(args.benchmark, args.mirror, args.workdir, args.seeds, args.seconds, args.variants, Path(args.docs) if args.docs else None, args.reuse,
        steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
