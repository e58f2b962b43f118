"""FLARE Client API script for the FedAvg baseline: one site's rounds through ``monai.fl.client.MonaiAlgo``.

FLARE runs this file in each site's process (``FedAvgRecipe(train_script=...)``). The site trains its own site
bundle (``--bundle``, e.g. ``bundles/site_classification``) on its own datalist for ``--local-epochs`` per round,
starting from the global weights it receives, and sends back its full weights with the number of steps it ran
(FedAvg weights sites by it). The site finds its datalist in the job's config by its FLARE client name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    # one JSON file: FLARE splits train_args on white space, so structured values travel in a file
    parser.add_argument("--config", required=True, help="JSON: datalists (per site), bundle, workdir, local_epochs, overrides")
    args = parser.parse_args(argv)
    config = json.loads(Path(args.config).read_text())

    import torch
    import nvflare.client as flare
    from monai.fl.client import MonaiAlgo
    from monai.fl.utils.constants import ExtraItems, FlStatistics, WeightType
    from monai.fl.utils.exchange_object import ExchangeObject

    flare.init()
    site = flare.get_site_name()
    datalists = config["datalists"]
    if not datalists.get(site):
        raise ValueError(f"FLARE client '{site}' has no datalist in {args.config} (sites: {sorted(datalists)})")
    train_kwargs = {**config.get("overrides", {}), "datalist": datalists[site],
                    "output_dir": str((Path(config["workdir"]) / site).resolve()), "site_name": site}
    algo = MonaiAlgo(bundle_root=config["bundle"], local_epochs=int(config.get("local_epochs", 1)), send_weight_diff=False,
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
