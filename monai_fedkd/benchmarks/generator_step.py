"""Forward + backward time of the server's generator on the CPU: the CPU path against the portable path.

:class:`~monai_fedkd.networks.generators.ConditionalGenerator` upsamples and pads with PyTorch's ``F.interpolate``
and replication padding on the CPU (deterministic there), and with concatenation-based equivalents elsewhere (whose
CUDA backward is deterministic). This times one generator update's forward and backward both ways, with the
bundle's default generator for each case, and writes the medians to ``docs/results/generator_step.json``:

    python -m monai_fedkd.benchmarks.generator_step --repeats 7

Run it alone: other jobs on the cores change the figures.
"""

from __future__ import annotations

import contextlib
import time

import torch

from monai_fedkd.benchmarks._timing import compare_variants
from monai_fedkd.networks import generators

# the central_distillation bundle's generator for each case (train.json: latent 64, base channels 32 in 2D, 16 in 3D)
CASES = {
    "pneumoniamnist_2d_28": {"spatial_dims": 2, "spatial_size": [28, 28], "base_channels": 32, "batch_size": 32},
    "adrenalmnist3d_3d_28": {"spatial_dims": 3, "spatial_size": [28, 28, 28], "base_channels": 16, "batch_size": 16},
}


@contextlib.contextmanager
def _portable_path():
    """Make the CPU take the path used off the CPU (for comparison only)."""
    forward, pad = generators.LinearUpsample.forward, generators._replicate_pad1
    generators.LinearUpsample.forward = lambda self, x: generators._linear_upsample2_by_concat(x, self.spatial_dims)
    generators._replicate_pad1 = generators._replicate_pad1_by_concat
    try:
        yield
    finally:
        generators.LinearUpsample.forward, generators._replicate_pad1 = forward, pad


def time_case(case: dict, repeats: int, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    g = generators.ConditionalGenerator(spatial_dims=case["spatial_dims"], out_channels=1, spatial_size=case["spatial_size"],
                                        num_classes=2, latent_dim=64, base_channels=case["base_channels"], value_range=[0.0, 1.0], init_mean=0.4)
    z, y = torch.randn(case["batch_size"], 64), torch.randint(2, (case["batch_size"],))
    times = []
    for i in range(repeats + 1):  # the first pass warms up allocators and is not counted
        g.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        g(z, y).square().mean().backward()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def _time_portable(case: dict, repeats: int) -> list[float]:
    with _portable_path():
        return time_case(case, repeats)


def main(argv=None) -> int:
    return compare_variants(argv, __doc__, CASES, {"cpu_path": time_case, "portable_path": _time_portable}, "generator_step")


if __name__ == "__main__":
    raise SystemExit(main())
