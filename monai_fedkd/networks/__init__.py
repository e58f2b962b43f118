"""Network factory over ``monai.networks.nets`` that remembers how each network was built.

A site card must record the network definition so that evaluation (and later the site side of the
distillation) can rebuild the network from ``model.pt``. A torch module does not keep its constructor
arguments, so bundles build networks through :func:`build_network`, which attaches the definition.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from monai.utils import optional_import

__all__ = ["build_network", "network_definition", "NETWORK_DEF_ATTR"]

NETWORK_DEF_ATTR = "_monai_fedkd_network_def"


def _resolve_class(name: str):
    """``"UNet"`` -> ``monai.networks.nets.UNet``; a dotted path is imported as is."""
    if "." not in name:
        import monai.networks.nets as nets

        if not hasattr(nets, name):
            raise ValueError(f"network '{name}' is not in monai.networks.nets; give a dotted path for other modules")
        return getattr(nets, name), f"monai.networks.nets.{name}"
    module, _, attr = name.rpartition(".")
    cls, ok = optional_import(module, name=attr)
    if not ok:
        raise ValueError(f"cannot import network '{name}'")
    return cls, name


def build_network(name: str, **kwargs: Any) -> torch.nn.Module:
    """Instantiate network ``name`` (a ``monai.networks.nets`` class name or a dotted path) with ``kwargs``.

    The returned module carries its definition (``{"_target_": ..., **kwargs}``, a plain JSON-able dict)
    so that :func:`network_definition` can write it into a site card.
    """
    cls, target = _resolve_class(name)
    net = cls(**kwargs)
    definition = {"_target_": "monai_fedkd.networks.build_network", "name": target, **copy.deepcopy(kwargs)}
    setattr(net, NETWORK_DEF_ATTR, _jsonable(definition))
    return net


def network_definition(net: torch.nn.Module) -> dict:
    """The definition :func:`build_network` attached to ``net`` (error if the network was built otherwise)."""
    definition = getattr(net, NETWORK_DEF_ATTR, None)
    if definition is None:
        raise ValueError(
            f"network {type(net).__name__} was not built with monai_fedkd.networks.build_network, so its definition "
            "cannot be recorded in the site card; define `network_def` as "
            '{"_target_": "monai_fedkd.networks.build_network", "name": "<monai.networks.nets class>", ...args}'
        )
    return copy.deepcopy(definition)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    if hasattr(value, "value") and isinstance(getattr(value, "value"), str):  # str enums such as Norm.BATCH
        return value.value
    raise TypeError(f"network argument {value!r} ({type(value).__name__}) cannot be recorded as JSON")
