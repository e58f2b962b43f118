"""Export trained models (central or site) as self-contained MONAI bundles for hospital pipelines.

``monai_fedkd.export.runtime`` (the bundles' inference code) imports only MONAI, so the library may use it without
loading the exporter; the exporter's names are loaded on first use.
"""

__all__ = ["ExportError", "export_bundle", "plain_network_def"]


def __getattr__(name: str):
    if name in __all__:
        from monai_fedkd.export import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module 'monai_fedkd.export' has no attribute {name!r}")
