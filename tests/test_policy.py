"""Site answer policies: what leaves a site, the DP accountant, and the engine with sites of different policies."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_fedkd.site.policy import AnswerPolicy, PolicyError, PrivacyLedger, gaussian_epsilon, released_log_probabilities


# ---- the policy on its own ------------------------------------------------------------------------------------------


def test_policy_rejects_what_it_cannot_enforce():
    with pytest.raises(PolicyError, match="unknown policy keys"):
        AnswerPolicy.from_dict({"outputs": "logits", "noise": 1.0})
    with pytest.raises(PolicyError, match="outputs must be one of"):
        AnswerPolicy(outputs="embeddings")
    with pytest.raises(PolicyError, match="needs clip_outputs"):
        AnswerPolicy(noise_multiplier=1.0, return_gradients=False)
    with pytest.raises(PolicyError, match="needs clip_gradients"):
        AnswerPolicy(outputs="probabilities", noise_multiplier=1.0)
    assert AnswerPolicy(outputs="labels").return_gradients is False  # labels never come with gradients


def test_released_outputs_follow_the_policy():
    logits = torch.tensor([[4.0, 1.0, 0.0], [0.0, 0.5, 3.0]]) * 10
    out, kind, n = AnswerPolicy(outputs="labels").release_outputs(logits)
    assert kind == "labels" and out.dtype == torch.int64 and out.tolist() == [0, 2] and n == 2
    out, kind, _ = AnswerPolicy(outputs="probabilities").release_outputs(logits)
    torch.testing.assert_close(out, torch.softmax(logits, 1))
    out, kind, _ = AnswerPolicy(outputs="top_k", top_k=1).release_outputs(torch.tensor([[2.0, 1.0, 0.0]]))
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)
    torch.testing.assert_close(out[0], torch.tensor([p[0], (1 - p[0]) / 2, (1 - p[0]) / 2]))
    out, kind, _ = AnswerPolicy(clip_outputs=1.0).release_outputs(logits)
    assert kind == "logits" and torch.all(out.norm(dim=1) <= 1.0 + 1e-6)
    # noise of the declared scale: std = noise_multiplier x 2 x clip
    policy = AnswerPolicy(clip_outputs=1.0, noise_multiplier=3.0, return_gradients=False)
    big = torch.zeros(4000, 2)
    out, _, n = policy.release_outputs(big, torch.Generator().manual_seed(0))
    assert n == 4000 and out.std().item() == pytest.approx(6.0, rel=0.05)
    # segmentation: unclipped probabilities are bounded per voxel, so every voxel is one mechanism
    _, _, n = AnswerPolicy(outputs="probabilities").release_outputs(torch.zeros(2, 3, 4, 5))
    assert n == 2 * 4 * 5


def test_gradient_clipping_and_server_reading_of_answers():
    g = torch.randn(5, 1, 8, 8) * 10
    clipped = AnswerPolicy(clip_gradients=0.5).release_gradient(g)
    assert torch.all(clipped.flatten(1).norm(dim=1) <= 0.5 + 1e-5)
    lp = released_log_probabilities(torch.tensor([1, 0]), "labels", 3)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(2))
    assert lp.argmax(1).tolist() == [1, 0]
    probs = torch.tensor([[0.7, 0.3, -0.1]])  # noisy probabilities may leave the simplex
    assert torch.isfinite(released_log_probabilities(probs, "probabilities", 3)).all()


def test_accountant_against_known_cases():
    sigma, delta = 2.0, 1e-5
    # T compositions of a Gaussian mechanism equal one mechanism with noise sigma / sqrt(T) (exact in RDP)
    assert gaussian_epsilon(sigma, 16, delta) == pytest.approx(gaussian_epsilon(sigma / 4, 1, delta), rel=1e-6)
    # one Gaussian mechanism: RDP eps(a) = a / (2 sigma^2), converted with Balle et al. (2020), minimised over orders
    orders = np.concatenate([np.linspace(1.01, 8, 1000), np.arange(8, 256)])
    rdp = orders / (2 * sigma**2)
    eps = rdp + np.log1p(-1 / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    assert gaussian_epsilon(sigma, 1, delta) == pytest.approx(eps.min(), rel=0.02)
    # and it is tighter than the classical bound sigma = sqrt(2 ln(1.25/delta)) / eps
    assert gaussian_epsilon(sigma, 1, delta) < math.sqrt(2 * math.log(1.25 / delta)) / sigma
    ledger = PrivacyLedger(AnswerPolicy())
    assert ledger.epsilon() == 0.0
    ledger.record(3)
    assert ledger.epsilon() is None  # answers without noise: unbounded
