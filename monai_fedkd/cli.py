"""``monai-fedkd``: prepare data, partition it into sites, evaluate models, run the demo, distil over NVIDIA FLARE."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _prepare(args) -> int:
    from monai_fedkd.data.prepare import kwargs_from_args, prepare_dataset

    kwargs = {k: v for k, v in kwargs_from_args(args).items() if v is not None or k in ("mirror",)}
    print(prepare_dataset(args.name, args.output, **kwargs))
    return 0


def _partition(args) -> int:
    from monai_fedkd.data.partition import run_partition

    print(run_partition(args))
    return 0


def _evaluate(args) -> int:
    from monai_fedkd.evaluation import run_evaluate

    return run_evaluate(args)


def _demo(args) -> int:
    from monai_fedkd.pipeline import run_pipeline

    run_pipeline(
        dataset=args.dataset,
        workdir=args.workdir,
        data_dir=args.data_dir,
        mirror=args.mirror,
        num_sites=args.num_sites,
        method=args.method,
        alpha=args.alpha,
        seed=args.seed,
        max_epochs=args.max_epochs,
        max_per_split=args.max_per_split,
        site_overrides=dict(kv.split("=", 1) for kv in args.override),
        distill=not args.no_distill,
        central_overrides=dict(kv.split("=", 1) for kv in args.central_override),
    )
    return 0


def _override_value(text: str):
    """``ID=VALUE`` values are JSON where they parse as JSON (numbers, lists, true/false), strings otherwise."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _flare_env(args, clients: list[str]):
    """FLARE's simulator (this machine) or POC environment for the named clients."""
    from nvflare.recipe import PocEnv, SimEnv

    return SimEnv(clients=clients, workspace_root=args.workspace) if args.env == "sim" else PocEnv(clients=clients)


def _flare_distill(args) -> int:
    import os
    from pathlib import Path

    from monai_fedkd.pipeline import BUNDLES_DIR
    from monai_fedkd.site.card import read_site_card
    from monai_fedkd.site.query import site_entries
    from monai_fedkd.transport.flare import ERROR_FILE, distillation_recipe

    entries = site_entries(args.sites)
    configs = args.config
    if not configs:
        configs = [str(BUNDLES_DIR / "central_distillation" / "configs" / "train.json")]
        if read_site_card(entries[0]["site_dir"])["task"] == "segmentation":
            configs.append(str(BUNDLES_DIR / "central_distillation" / "configs" / "segmentation.json"))
    overrides = {k: _override_value(v) for k, v in (kv.split("=", 1) for kv in args.override)}
    threads = args.site_threads
    if threads is None and not args.export:  # every site on this machine: share its cores instead of oversubscribing
        threads = max(1, (os.cpu_count() or 1) // (len(entries) + 1))
    recipe = distillation_recipe(args.sites, configs, args.output_dir, overrides, job_name=args.job_name, timeout=args.timeout,
                                 device=args.device, site_threads=threads)
    if args.export:
        recipe.export(args.export)
        print(f"FLARE job written to {args.export}/{args.job_name}")
        return 0
    # tensors inline in the message instead of FLARE's pull-download path: ~35 ms less per call for small
    # tensors (measured in the simulator); on real sites set the same variables in each site's environment
    for var in ("NVFLARE_TENSOR_DOWNLOAD_CHUNK_SIZE", "NVFLARE_NP_DOWNLOAD_CHUNK_SIZE"):
        os.environ.setdefault(var, "0")
    error_file = Path(args.output_dir) / ERROR_FILE
    try:
        result = recipe.execute(_flare_env(args, recipe.configured_sites())).get_result()
    except RuntimeError as e:
        result = f"failed ({e})"
    model = Path(args.output_dir) / "models" / "model.pt"
    if error_file.is_file() or not model.is_file():
        cause = error_file.read_text().strip() if error_file.is_file() else f"no central model written; FLARE run: {result}"
        raise RuntimeError(f"central distillation over FLARE failed: {cause} (server log under {args.workspace})")
    print(f"FLARE run finished: {result}; central model in {model.parent.parent}")
    return 0


def _flare_fedavg(args) -> int:
    from pathlib import Path

    from monai_fedkd.pipeline import BUNDLES_DIR
    from monai_fedkd.site.card import read_site_card
    from monai_fedkd.site.query import site_entries
    from monai_fedkd.transport.flare_fedavg import fedavg_recipe, write_fedavg_model

    entries = site_entries(args.sites)
    bundle = args.bundle
    if bundle is None:
        task = read_site_card(entries[0]["site_dir"])["task"]
        bundle = BUNDLES_DIR / ("site_segmentation" if task == "segmentation" else "site_classification")
    overrides = {k: _override_value(v) for k, v in (kv.split("=", 1) for kv in args.override)}
    recipe = fedavg_recipe(args.sites, bundle, args.output_dir, num_rounds=args.rounds, local_epochs=args.local_epochs,
                           overrides=overrides, name=args.job_name)
    if args.export:
        recipe.export(args.export)
        print(f"FLARE job written to {args.export}/{args.job_name}")
        return 0
    result = recipe.execute(_flare_env(args, [e["name"] for e in entries])).get_result()
    found = sorted(Path(args.workspace).rglob("FL_global_model.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"FedAvg over FLARE wrote no global model under {args.workspace} (FLARE run: {result})")
    model = write_fedavg_model(found[-1], args.sites, args.output_dir, args.rounds, args.local_epochs)
    print(f"FedAvg over FLARE finished ({args.rounds} rounds): {model}")
    return 0


def _export(args) -> int:
    from monai_fedkd.export import export_bundle

    out = export_bundle(args.model_dir, args.bundle_dir, metrics=args.metrics, modality=args.modality, name=args.name,
                        version=args.version, overwrite=args.overwrite)
    print(f"bundle written to {out}; run it with: python -m monai.bundle run --config_file {out}/configs/inference.json "
          "--input_dir <studies> --output_dir <out>")
    return 0


def _bench(args) -> int:
    from monai_fedkd.benchmarks.suite import run_benchmark, summary

    results = run_benchmark(args.config, mirror=args.mirror, workdir=args.workdir, seeds=args.seeds, docs=args.docs, methods=args.methods)
    for method, s in sorted(summary(results).items(), key=lambda kv: -kv[1]["mean"]):
        print(f"{method:24s} {s['mean']:.4f} ± {s['sd']:.4f}")
    return 0


def _audit(args) -> int:
    from monai_fedkd.site.audit import policy_argument, run_audit

    report = run_audit(args.site, args.datalist, args.output_dir, policy=policy_argument(args.policy), max_items=args.max_items,
                       inversion_steps=args.inversion_steps, seed=args.seed, members_key=args.members_key,
                       nonmembers_key=args.nonmembers_key)
    mia, inv = report["membership_inference"], report["input_inversion"]
    ssim = inv["ssim_to_nearest_training_image"]
    print(f"membership inference: best attack AUROC {mia['best_attack_auroc']:.3f} {mia['attack_auroc']}; input inversion: SSIM to "
          f"nearest training image {ssim['inverted']:.3f} (held-out real {ssim['held_out_real']:.3f}, noise {ssim['noise']:.3f}); "
          f"written to {args.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from monai_fedkd.data.partition import add_partition_arguments
    from monai_fedkd.data.prepare import DATASETS, add_prepare_arguments
    from monai_fedkd.evaluation import add_evaluate_arguments

    parser = argparse.ArgumentParser(prog="monai-fedkd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="download (or take from --mirror) a public dataset and write a datalist")
    p.add_argument("name", choices=DATASETS)
    add_prepare_arguments(p)
    p.set_defaults(func=_prepare)

    p = sub.add_parser("partition", help="split a pooled datalist into per-site datalists plus a manifest")
    add_partition_arguments(p)
    p.set_defaults(func=_partition)

    p = sub.add_parser("evaluate", help="score site models and their ensembles on test datalists")
    add_evaluate_arguments(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("demo", help="prepare -> partition -> train every site bundle -> evaluate, printing the table")
    p.add_argument("--dataset", default="pneumoniamnist", choices=DATASETS)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--data-dir", default="data", help="where prepared datasets are written")
    p.add_argument("--mirror", default=None, help="local copy of the official files (no download)")
    p.add_argument("--num-sites", type=int, default=5)
    p.add_argument("--method", default="dirichlet", choices=("dirichlet", "quantity", "acquisition", "metadata"))
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=None, help="site training epochs (bundle default if omitted)")
    p.add_argument("--max-per-split", type=int, default=None, help="subsample the dataset (quick runs)")
    p.add_argument("--override", action="append", default=[], metavar="ID=VALUE", help="extra site bundle override")
    p.add_argument("--central-override", action="append", default=[], metavar="ID=VALUE", help="central_distillation bundle override")
    p.add_argument("--no-distill", action="store_true", help="stop after the site models (no central model)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("export", help="write a trained model (central or site) as a MONAI bundle that runs without monai_fedkd")
    p.add_argument("model_dir", help="the model's output_dir (models/model.pt + central_card.json or site_card.json)")
    p.add_argument("bundle_dir", help="the bundle folder to create")
    p.add_argument("--metrics", default=None, help="evaluation metrics.json that scored this model (goes into the bundle's README)")
    p.add_argument("--modality", default=None, help="DICOM Modality the model accepts, e.g. MR (other series are refused; default: any)")
    p.add_argument("--name", default=None, help="bundle name (default: monai_fedkd <role> <task>)")
    p.add_argument("--version", default="0.1.0", help="bundle version")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle_dir")
    p.set_defaults(func=_export)

    from monai_fedkd.benchmarks.suite import add_bench_arguments

    p = sub.add_parser("bench", help="run one benchmark end to end: every method on the same sites, splits and seeds")
    add_bench_arguments(p)
    p.set_defaults(func=_bench)

    p = sub.add_parser("audit", help="what a site's answers leak under a policy: membership inference and input inversion")
    p.add_argument("--site", required=True, help="the site's output_dir (models/model.pt + site_card.json)")
    p.add_argument("--datalist", required=True, help="the site's own datalist (members: --members-key, non-members: --nonmembers-key)")
    p.add_argument("--output-dir", required=True, help="where audit.json and inversion.png go")
    p.add_argument("--policy", default=None, help="policy to audit, as JSON or a JSON file (default: the site's own policy)")
    p.add_argument("--members-key", default="training")
    p.add_argument("--nonmembers-key", default="validation",
                   help="held-out images of the same distribution as the training images (default: the site's validation split)")
    p.add_argument("--max-items", type=int, default=500, help="members and non-members each")
    p.add_argument("--inversion-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_audit)

    p = sub.add_parser("flare-distill", help="run the central_distillation bundle over NVIDIA FLARE (simulator, POC, or export a job)")
    p.add_argument("--sites", required=True, help="sites JSON of the central bundle (name, dir, datalist per site)")
    p.add_argument("--output-dir", required=True, help="where the central model, card and checkpoints are written")
    p.add_argument("--config", action="append", default=[], help="bundle config file(s) (default: central_distillation train.json [+ segmentation.json])")
    p.add_argument("--override", action="append", default=[], metavar="ID=VALUE", help="central_distillation bundle override")
    p.add_argument("--env", choices=("sim", "poc"), default="sim", help="FLARE simulator (one machine) or POC (local processes)")
    p.add_argument("--workspace", default="runs/flare", help="FLARE simulator workspace")
    p.add_argument("--export", default=None, metavar="DIR", help="write the FLARE job to DIR instead of running it")
    p.add_argument("--job-name", default="monai_fedkd_distillation")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a site may take to answer one call")
    p.add_argument("--device", default="cpu", help="device of the site models in the site processes")
    p.add_argument("--site-threads", type=int, default=None,
                   help="torch CPU threads per site process (default for sim/POC: this machine's cores / (sites + 1))")
    p.set_defaults(func=_flare_distill)

    p = sub.add_parser("flare-fedavg", help="FedAvg baseline over NVIDIA FLARE: the site bundles in rounds through MonaiAlgo")
    p.add_argument("--sites", required=True, help="sites JSON (name, dir, datalist per site)")
    p.add_argument("--output-dir", required=True, help="global model + card, and each site's round outputs under sites/")
    p.add_argument("--bundle", default=None, help="site bundle root (default: site_classification or site_segmentation by task)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--override", action="append", default=[], metavar="ID=VALUE", help="site bundle override (every site)")
    p.add_argument("--env", choices=("sim", "poc"), default="sim")
    p.add_argument("--workspace", default="runs/flare_fedavg")
    p.add_argument("--export", default=None, metavar="DIR", help="write the FLARE job to DIR instead of running it")
    p.add_argument("--job-name", default="monai_fedkd_fedavg")
    p.set_defaults(func=_flare_fedavg)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        if args.verbose:
            raise
        # one line that names the cause; --verbose shows the traceback
        print(f"monai-fedkd {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
