"""FLARE Client API script for the FedAvg baseline: one site's rounds through ``monai.fl.client.MonaiAlgo``.

FLARE runs this file in each site's process (``FedAvgRecipe(train_script=...)``). The site trains its own site
bundle (``--bundle``, e.g. ``bundles/site_classification``) on its own datalist for ``--local-epochs`` per round,
starting from the global weights it receives, and sends back its full weights with the number of steps it ran
(FedAvg weights sites by it). The site finds its datalist in ``--sites`` by its FLARE client name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", required=True, help="sites JSON: name, datalist (and dir) per site")
    parser.add_argument("--bundle", required=True, help="site bundle root (with configs/train.json)")
    parser.add_argument("--workdir", required=True, help="this run's site outputs go to <workdir>/<site name>")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--overrides", default="{}", help="JSON dict of site bundle overrides (same for every site)")
    args = parser.parse_args(argv)

    import torch
    import nvflare.client as flare
    from monai.fl.client import MonaiAlgo
    from monai.fl.utils.constants import ExtraItems, FlStatistics, WeightType
    from monai.fl.utils.exchange_object import ExchangeObject

    flare.init()
    site = flare.get_site_name()
    sites_file = Path(args.sites)
    entries = {e["name"]: e for e in json.loads(sites_file.read_text())}
    if site not in entries:
        raise ValueError(f"FLARE client '{site}' is not in {sites_file} (sites: {sorted(entries)})")
    datalist = Path(entries[site]["datalist"])
    datalist = datalist if datalist.is_absolute() else sites_file.parent / datalist
    train_kwargs = {**json.loads(args.overrides), "datalist": str(datalist.resolve()),
                    "output_dir": str((Path(args.workdir) / site).resolve()), "site_name": site}
    algo = MonaiAlgo(bundle_root=str(Path(args.bundle).resolve()), local_epochs=args.local_epochs, send_weight_diff=False,
                     config_train_filename="configs/train.json", config_evaluate_filename=None, train_kwargs=train_kwargs)
    algo.initialize(extra={ExtraItems.CLIENT_NAME: site})

    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        weights = {k: torch.as_tensor(v) for k, v in (received.params or {}).items()}
        if flare.is_evaluate():  # no site-side metric for the global model here: the evaluation bundle scores it
            flare.send(flare.FLModel(metrics={}))
            continue
        if weights:
            algo.train(ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS))
        out = algo.get_weights()
        steps = int((out.statistics or {}).get(FlStatistics.NUM_EXECUTED_ITERATIONS, 0))
        flare.send(flare.FLModel(params={k: v.cpu() for k, v in out.weights.items()}, meta={"NUM_STEPS_CURRENT_ROUND": steps}))
    algo.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
