"""Forward + backward time of the site and student networks in the contiguous and the channels-last memory layout.

``memory_format`` (central_distillation's option for the student, ``site_options.memory_format`` for the sites)
lays the networks' tensors out channels-last; ``"auto"`` does so for 3D networks on CPU. This times one forward and
backward (to the input, as a site answering a query does, and to the weights, as the student's update does) of each
benchmark's site network at the distillation's batch and patch size, in float32 and under bfloat16 autocast (the
segmentation default ``"auto"`` precision picks bfloat16 on CPUs with AMX), both layouts, and writes the medians to
``docs/results/memory_format_step.json`` (``speedup``: the contiguous median over the channels-last one):

    python -m monai_fedkd.benchmarks.memory_format_step --repeats 25

Run it alone: other jobs on the cores change the figures. The gain depends on the processor and the convolution
library; this is why ``"auto"`` covers only what was measured to gain.
"""

from __future__ import annotations

import torch

from monai_fedkd.benchmarks._timing import compare_variants, forward_backward_times
from monai_fedkd.networks import build_network
from monai_fedkd.networks.memory_format import to_memory_format
from monai_fedkd.networks.precision import resolve_autocast_dtype

_IXI_UNET = {"name": "UNet", "in_channels": 1, "out_channels": 6, "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1,
             "norm": "instance"}
_ADRENAL = {"name": "Classifier", "in_shape": [1, 28, 28, 28], "classes": 2, "channels": [16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1,
            "dropout": 0.1}
# the site bundles' default networks, at central_distillation's batch and synthesis size (3D IXI: the sites' 48^3 patch;
# 2D IXI axial slices: their 64^2 patch)
CASES = {
    "ixi_unet_4x48^3_float32": {"network": {**_IXI_UNET, "spatial_dims": 3}, "input": [4, 1, 48, 48, 48], "dtype": None},
    "ixi_unet_4x48^3_bfloat16": {"network": {**_IXI_UNET, "spatial_dims": 3}, "input": [4, 1, 48, 48, 48], "dtype": "bfloat16"},
    "ixi_axial_unet_4x64^2_float32": {"network": {**_IXI_UNET, "spatial_dims": 2}, "input": [4, 1, 64, 64], "dtype": None},
    "adrenalmnist3d_classifier_16x28^3_float32": {"network": _ADRENAL, "input": [16, 1, 28, 28, 28], "dtype": None},
}


def _time(case: dict, repeats: int, memory_format: str, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    dims = len(case["input"]) - 2
    net = to_memory_format(build_network(**case["network"]), memory_format, dims)
    x = to_memory_format(torch.rand(*case["input"]), memory_format, dims).requires_grad_(True)
    return forward_backward_times(net, x, repeats, case["dtype"])


def main(argv=None) -> int:
    return compare_variants(argv, __doc__, CASES, {"channels_last": lambda c, r: _time(c, r, "channels_last"),
                                                   "contiguous": lambda c, r: _time(c, r, "contiguous")},
                            "memory_format_step", context={"auto_precision_resolves_to": resolve_autocast_dtype("auto", "cpu")})


if __name__ == "__main__":
    raise SystemExit(main())
