"""Export trained models (central or site) as self-contained MONAI bundles for hospital pipelines."""

from monai_fedkd.export.bundle import ExportError, export_bundle, plain_network_def

__all__ = ["ExportError", "export_bundle", "plain_network_def"]
