"""The server side of query-mode distillation: generator, student, cross-site terms, the training engine."""

from monai_fedkd.server.distillation import CentralDistillation, SampleCache, check_site_cards

__all__ = ["CentralDistillation", "SampleCache", "check_site_cards"]
