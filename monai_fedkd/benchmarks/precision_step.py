"""Forward + backward time of the 3D networks of a distillation step in float32 and under bfloat16 autocast.

``autocast_dtype: bfloat16`` (central_distillation's option for the generator and student, and
``site_options.autocast_dtype`` for the sites) runs these passes in bfloat16. This times one forward and backward
(to the input, as a site answering a query does, and to the weights, as the student's update does) of each 3D
benchmark's site network at the distillation's batch and patch size, and of the AdrenalMNIST3D generator, both
ways, and writes the medians to ``docs/results/precision_step.json`` (``speedup``: float32's median over
bfloat16's):

    python -m monai_fedkd.benchmarks.precision_step --repeats 25

Run it alone: other jobs on the cores change the figures. The speed-up depends on the processor (bfloat16 matrix
units such as AMX, or a GPU's); where it has none, bfloat16 can be slower than float32.
"""

from __future__ import annotations

import torch

from monai_fedkd.benchmarks import generator_step
from monai_fedkd.benchmarks._timing import compare_variants, forward_backward_times
from monai_fedkd.networks import build_network
from monai_fedkd.networks.precision import autocast, resolve_autocast_dtype

# the site bundles' default networks for the 3D benchmarks, at central_distillation's batch and synthesis size
CASES = {
    "ixi_segmentation_unet_4x32^3": {"network": {"name": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 6, "channels": [16, 32, 64, 128],
                                                 "strides": [2, 2, 2], "num_res_units": 1, "norm": "instance"}, "input": [4, 1, 32, 32, 32]},
    "adrenalmnist3d_classifier_16x28^3": {"network": {"name": "Classifier", "in_shape": [1, 28, 28, 28], "classes": 2, "channels": [16, 32, 64],
                                                      "strides": [2, 2, 2], "num_res_units": 1, "dropout": 0.1}, "input": [16, 1, 28, 28, 28]},
    "adrenalmnist3d_generator_16x28^3": {"generator": generator_step.CASES["adrenalmnist3d_3d_28"]},
}


def _time(case: dict, repeats: int, dtype: str | None, seed: int = 0) -> list[float]:
    if "generator" in case:
        with autocast("cpu", dtype):
            return generator_step.time_case(case["generator"], repeats, seed)
    torch.manual_seed(seed)
    return forward_backward_times(build_network(**case["network"]), torch.rand(*case["input"], requires_grad=True), repeats, dtype)


def main(argv=None) -> int:
    return compare_variants(argv, __doc__, CASES, {"bfloat16": lambda c, r: _time(c, r, "bfloat16"), "float32": lambda c, r: _time(c, r, None)},
                            "precision_step", context={"auto_resolves_to": resolve_autocast_dtype("auto", "cpu")})


if __name__ == "__main__":
    raise SystemExit(main())
