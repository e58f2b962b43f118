"""Federated baselines on the same sites, splits and site bundles as the distillation: FedAvg in rounds (through
``monai.fl.client.MonaiAlgo``, in-process), one-shot FedAvg of the trained site models, and a centralized model
trained on the pooled data. Each writes ``models/model.pt`` + ``central_card.json`` (with its ``role``), so the
evaluation bundle scores it beside the site models, their ensembles and the distilled central model."""

from monai_fedkd.baselines.fedavg import centralized, fedavg, one_shot_fedavg, weighted_average, write_global_model

__all__ = ["centralized", "fedavg", "one_shot_fedavg", "weighted_average", "write_global_model"]
