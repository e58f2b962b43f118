"""``monai-fedkd``: prepare data, partition it into sites, evaluate models, run the demo."""

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
