"""Forward + backward time of the server's cross-site terms: closed-form gradients against autograd.

The consensus (:func:`~monai_fedkd.losses.generalized_js_divergence`) and the mixture ensemble
(:func:`~monai_fedkd.losses.ensemble_log_probabilities`) carry hand-written backward passes since central_distillation
0.7.5. This times both terms' forward and backward, as the generator step uses them (consensus on the stacked site
logits, a loss on the ensemble's log-probabilities), against the same formulas differentiated by autograd (the form
they had before), for the shapes of one generator step of each benchmark, and writes the medians to
``docs/results/server_terms.json``:

    python -m monai_fedkd.benchmarks.server_terms --repeats 7

Run it alone: other jobs on the cores change the figures.
"""

from __future__ import annotations

import math
import time

import torch

from monai_fedkd.benchmarks._timing import compare_variants
from monai_fedkd.losses import ensemble_log_probabilities, generalized_js_divergence, site_weights

# (sites, generator batch, classes, spatial) of one generator step with each benchmark's defaults
CASES = {
    "pneumoniamnist_a0.5": {"sites": 5, "batch_size": 32, "num_classes": 2, "spatial": []},
    "adrenalmnist3d_a0.5": {"sites": 4, "batch_size": 16, "num_classes": 2, "spatial": []},
    "ixi_acquisition": {"sites": 4, "batch_size": 4, "num_classes": 6, "spatial": [32, 32, 32]},
}


def _autograd_js(stacked: torch.Tensor) -> torch.Tensor:
    """The generalized JS with uniform site weights, differentiated by autograd (for comparison only)."""
    k = stacked.shape[0]
    log_p = torch.log_softmax(stacked, dim=2)
    log_m = torch.logsumexp(log_p, dim=0) - math.log(k)
    kl = (log_p.exp() * (log_p - log_m.unsqueeze(0))).sum(2)
    return (kl.mean(0) / math.log(k)).clamp_min(0.0)


def _autograd_mixture(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted mixture's log-probabilities, differentiated by autograd (for comparison only)."""
    w = weights.reshape(weights.shape[0], 1, weights.shape[1], *([1] * (stacked.ndim - 3)))
    mixed = torch.logsumexp(torch.log(w) + torch.log_softmax(stacked, dim=2), dim=0)
    return mixed - torch.logsumexp(mixed, dim=1, keepdim=True)


def time_case(case: dict, repeats: int, closed_form: bool, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    shape = (case["sites"], case["batch_size"], case["num_classes"], *case["spatial"])
    logits = torch.randn(shape, generator=g) * 3
    counts = torch.rand(case["sites"], case["num_classes"], generator=g) * 100 + 1
    weights = site_weights(counts.tolist(), case["num_classes"])
    target = torch.randint(case["num_classes"], (case["batch_size"], *case["spatial"]), generator=g)
    times = []
    for i in range(repeats + 1):  # the first pass warms up allocators and is not counted
        stacked = logits.clone().requires_grad_()
        t0 = time.perf_counter()
        if closed_form:
            consensus, log_p = generalized_js_divergence(stacked).mean(), ensemble_log_probabilities(stacked, weights)
        else:
            consensus, log_p = _autograd_js(stacked).mean(), _autograd_mixture(stacked, weights)
        loss = consensus + torch.nn.functional.nll_loss(log_p, target)  # a term on the ensemble, as conditional CE
        torch.autograd.grad(loss, stacked)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    variants = {"closed_form": lambda case, repeats: time_case(case, repeats, True),
                "autograd": lambda case, repeats: time_case(case, repeats, False)}
    return compare_variants(argv, __doc__, CASES, variants, "server_terms")


if __name__ == "__main__":
    raise SystemExit(main())
