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


# ---- the site enforces its policy; the engine adapts to each site's policy --------------------------------------------

from conftest import ok  # noqa: E402
from monai_fedkd.site.query import POLICY_FILE, QuerySite  # noqa: E402
from monai_fedkd.transport import InProcessTransport, QueryRequest, SiteAnswerError  # noqa: E402


def _site_copy(site_dir: Path, tmp_path: Path, name: str, policy: dict | None) -> Path:
    """A site's own copy of its output with the policy file the site placed beside its model."""
    copy = tmp_path / name
    shutil.copytree(site_dir, copy, ignore=shutil.ignore_patterns("distillation_state", "tensorboard"))
    if policy is not None:
        (copy / POLICY_FILE).write_text(json.dumps(policy))
    return copy


def _run(sites, tmp_path, out="central", **kw):
    from test_distillation import _distiller

    return _distiller(InProcessTransport(sites), tmp_path, out=out, **kw)


@pytest.mark.slow
def test_label_only_site_never_returns_logits_or_gradients(cls_sites, tmp_path):
    site = QuerySite(_site_copy(cls_sites[0][0], tmp_path, "labels_site", {"outputs": "labels"}))
    assert site.card["answer_policy"]["outputs"] == "labels" and site.card["answer_policy"]["return_gradients"] is False
    ans = site.answer(QueryRequest(torch.rand(4, 1, 28, 28), step=0, local_weights={"entropy": 1.0}, want_input_grad=True))
    assert ans.kind == "labels" and ans.outputs.dtype == torch.int64 and tuple(ans.outputs.shape) == (4,)
    assert ans.local_input_grad is None
    with pytest.raises(SiteAnswerError, match="no gradients"):
        site.vjp(torch.zeros(4, 2))
    # a broken policy file is named, not ignored
    bad = _site_copy(cls_sites[0][0], tmp_path, "bad_policy", {"outputs": "labels", "noise": 2})
    with pytest.raises(ValueError, match="site_policy.json.*unknown policy keys"):
        QuerySite(bad)


@pytest.mark.slow
def test_query_budget_stops_queries_and_the_site_leaves(cls_sites, tmp_path):
    limited = QuerySite(_site_copy(cls_sites[0][0], tmp_path, "limited", {"max_queries": 3}), name="limited", real_datalist=cls_sites[0][1], seed=1)
    other = QuerySite(_site_copy(cls_sites[1][0], tmp_path, "other", None), name="other", real_datalist=cls_sites[1][1], seed=2)
    path = _run([limited, other], tmp_path, iterations=5).run()
    card = json.loads((path.parents[1] / "central_card.json").read_text())
    assert "query budget of 3" in card["sites"]["limited"]["dropped"] and card["sites"]["other"]["dropped"] is None
    assert card["sites"]["limited"]["privacy"]["queries"] == 3 and card["sites"]["other"]["privacy"]["queries"] == 5
    with pytest.raises(SiteAnswerError, match="query budget"):
        limited.answer(QueryRequest(torch.rand(2, 1, 28, 28), step=9))
    # alone, a site whose budget runs out stops the run and no model is written
    alone = QuerySite(_site_copy(cls_sites[0][0], tmp_path, "alone", {"max_queries": 2}), real_datalist=cls_sites[0][1])
    with pytest.raises(RuntimeError, match="min_sites"):
        _run([alone], tmp_path, out="c_alone", iterations=4).run()
    assert not (tmp_path / "c_alone" / "models" / "model.pt").exists()


@pytest.mark.slow
def test_sites_with_different_policies_in_one_run(cls_sites, tmp_path):
    noisy = {"outputs": "probabilities", "clip_outputs": 1.0, "clip_gradients": 0.1, "noise_multiplier": 2.0}
    a = QuerySite(_site_copy(cls_sites[0][0], tmp_path, "labels_only", {"outputs": "labels"}), name="labels_only", real_datalist=cls_sites[0][1], seed=1)
    b = QuerySite(_site_copy(cls_sites[1][0], tmp_path, "noisy", noisy), name="noisy", real_datalist=cls_sites[1][1], seed=2)
    iterations, batch = 3, 8
    path = _run([a, b], tmp_path, iterations=iterations).run()
    card = json.loads((path.parents[1] / "central_card.json").read_text())
    sites = card["sites"]
    assert sites["labels_only"]["policy"]["outputs"] == "labels" and sites["noisy"]["policy"]["noise_multiplier"] == 2.0
    assert sites["labels_only"]["transport"]["vjps"] == 0 and sites["noisy"]["transport"]["vjps"] == iterations
    assert sites["labels_only"]["privacy"]["epsilon"] is None  # labels without noise: no DP guarantee, said so
    # per step the noisy site releases: outputs, local input-gradients and VJPs, one mechanism per input each
    assert sites["noisy"]["privacy"]["releases"] == 3 * batch * iterations
    from monai_fedkd.site.policy import gaussian_epsilon

    assert sites["noisy"]["privacy"]["epsilon"] == pytest.approx(gaussian_epsilon(2.0, 3 * batch * iterations, 1e-5))


@pytest.mark.slow
def test_gradient_free_sites_reach_the_generator_through_zeroth_order_queries(cls_sites, tmp_path):
    policy = {"outputs": "probabilities", "return_gradients": False}
    sites = [QuerySite(_site_copy(d, tmp_path, f"nograd{k}", policy), name=f"nograd{k}", real_datalist=dl, seed=k) for k, (d, dl) in enumerate(cls_sites)]
    distiller = _run(sites, tmp_path, iterations=2, zeroth_order_directions=3, weights={"diversity": 0.0, "tv": 0.0})
    before = [p.detach().clone() for p in distiller.generator.parameters()]
    path = distiller.run()
    card = json.loads((path.parents[1] / "central_card.json").read_text())
    for s in card["sites"].values():
        assert s["transport"]["vjps"] == 0 and s["transport"]["queries"] == 2 * (1 + 3)
    # with the image priors off, any change of the generator came from the sites' estimated gradients
    assert any(not torch.equal(b, p) for b, p in zip(before, distiller.generator.parameters()))


def test_site_bundle_refuses_a_policy_it_cannot_enforce():
    from monai_fedkd.networks import build_network
    from monai_fedkd.site import SiteOutputWriter

    net = build_network("Classifier", in_shape=[1, 8, 8], classes=2, channels=[4], strides=[2])
    with pytest.raises(PolicyError, match="needs clip_outputs"):
        SiteOutputWriter("/tmp/never", "classification", 2, 1, 2, net, [], [8, 8], answer_policy={"noise_multiplier": 1.0})


# ---- the audit ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overfit_site(tmp_path_factory):
    """A deliberately overfit site: 150 PneumoniaMNIST training images, 100 epochs, no dropout, its last weights."""
    from conftest import SHARED_DATA, require, run_bundle
    from monai_fedkd.data.prepare import prepare_dataset
    from monai_fedkd.pipeline import dataset_overrides

    require("pneumoniamnist", "pneumoniamnist.npz")
    root = tmp_path_factory.mktemp("overfit")
    datalist = Path(prepare_dataset("pneumoniamnist", root / "data", mirror=SHARED_DATA, max_per_split=150))
    _, overrides = dataset_overrides(json.loads((datalist.parent / "dataset_info.json").read_text()))
    site = root / "overfit_site"
    ok(run_bundle("site_classification", "train.json", {"datalist": str(datalist), "output_dir": str(site), "max_epochs": 100,
                                                        "batch_size": 16, "val_interval": 1000, "network_def#dropout": 0.0, **overrides}))
    return site, datalist


@pytest.mark.slow
def test_audit_detects_an_overfit_site_and_noise_hides_it(overfit_site, tmp_path, capsys):
    from monai_fedkd.cli import main
    from monai_fedkd.site.audit import membership_inference

    site, datalist = overfit_site
    leaky = membership_inference(site, datalist)
    # non-members are the site's validation images (same distribution); 150 each: chance is 0.5 +- 0.03
    assert leaky["members"] == 150 and leaky["best_attack_auroc"] > 0.57, leaky
    noisy = {"outputs": "probabilities", "clip_outputs": 1.0, "clip_gradients": 0.1, "noise_multiplier": 20.0}
    hidden = membership_inference(site, datalist, policy=noisy)
    assert hidden["attack_auroc"]["loss"] < leaky["attack_auroc"]["loss"] - 0.08, (leaky, hidden)
    assert hidden["best_attack_auroc"] < 0.56, hidden
    assert hidden["privacy"]["epsilon"] is not None and leaky["privacy"]["epsilon"] is None
    # the whole audit through the CLI: both attacks, a report and the inverted images
    out = tmp_path / "audit"
    assert main(["audit", "--site", str(site), "--datalist", str(datalist), "--output-dir", str(out), "--inversion-steps", "20",
                 "--max-items", "40"]) == 0
    report = json.loads((out / "audit.json").read_text())
    inv = report["input_inversion"]
    assert set(inv["ssim_to_nearest_training_image"]) == {"inverted", "held_out_real", "noise"}
    assert all(-1 <= v <= 1 for v in inv["ssim_to_nearest_training_image"].values())
    assert (out / "inversion.png").is_file() and "membership inference" in capsys.readouterr().out
