"""Central distillation in query mode: protocol, privacy boundary, resume, faults, and end-to-end bundle runs."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import dataset_info, ok as _ok, run_bundle, torch_threads
from monai_fedkd import cpu_heap
from monai_fedkd.networks import build_network, precision
from monai_fedkd.networks.memory_format import resolve_memory_format, to_memory_format
from monai_fedkd.pipeline import dataset_overrides
from monai_fedkd.server import CentralDistillation, check_site_cards
from monai_fedkd.site import load_site_model, read_site_card
from monai_fedkd.site.query import QuerySite
from monai_fedkd.transport import InProcessTransport, QueryRequest, SiteAnswerError

pytestmark = pytest.mark.slow


def _sites(cls_sites, tmp_path, **kw):
    return [QuerySite(d, real_datalist=dl, seed=7 + i, state_dir=tmp_path / "site_state" / Path(d).name, **kw) for i, (d, dl) in enumerate(cls_sites)]


def _distiller(transport, tmp_path, out="central", **kw):
    spec = check_site_cards(transport.site_cards())
    torch.manual_seed(0)
    gen = build_network("monai_fedkd.networks.generators.ConditionalGenerator", spatial_dims=2, out_channels=1, spatial_size=spec["spatial_size"],
                        num_classes=spec["num_classes"], latent_dim=16, base_channels=8, init_mean=0.4)
    student = build_network("Classifier", in_shape=[1, 28, 28], classes=2, channels=[8, 16], strides=[2, 2], num_res_units=0)
    args = dict(iterations=4, batch_size=8, student_steps=2, student_batch_size=8, cache_size=32, checkpoint_interval=2,
                montage_interval=2, seed=3, progress=False)
    args.update(kw)
    return CentralDistillation(transport, gen, student, tmp_path / out, **args)


class SpyTransport(InProcessTransport):
    """Records every tensor that crosses between server and sites."""

    def __init__(self, sites):
        super().__init__(sites)
        self.crossed: list[torch.Tensor] = []

    def query(self, request, sites=None):
        self.crossed.append(request.inputs)
        answers = super().query(request, sites)
        for a in answers.values():
            self.crossed += [a.outputs] + ([a.local_input_grad] if a.local_input_grad is not None else [])
        return answers

    def vjp(self, cotangents):
        self.crossed += list(cotangents.values())
        out = super().vjp(cotangents)
        self.crossed += list(out.values())
        return out


def test_no_site_parameter_reaches_the_server(cls_sites, tmp_path):
    sites = _sites(cls_sites, tmp_path)
    transport = SpyTransport(sites)
    distiller = _distiller(transport, tmp_path, iterations=2)
    distiller.run()
    site_params = [p for s in sites for m in (s.network, s.discriminator) for p in m.parameters()]
    assert transport.crossed
    batch = 8
    for t in transport.crossed:
        # every payload is shaped like an input batch (B, C, H, W) or an output batch (B, N)
        assert tuple(t.shape) in {(batch, 1, 28, 28), (batch, 2)}, tuple(t.shape)
        for p in site_params:
            assert not (t.shape == p.shape and torch.equal(t, p.detach()))
    # the server object graph holds no site module
    site_modules = {id(m) for s in sites for m in (s.network, s.discriminator)}
    seen = set()

    def walk(obj, depth=0):
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        assert id(obj) not in site_modules, "the server holds a site network"
        if isinstance(obj, torch.nn.Module):
            return
        items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else vars(obj).values() if hasattr(obj, "__dict__") and not isinstance(obj, InProcessTransport) else []
        for v in items:
            walk(v, depth + 1)

    walk(distiller)
    stats = transport.stats()
    assert all(s["queries"] == 2 and s["bytes_sent"] > 0 and s["bytes_received"] > 0 for s in stats.values())


def test_outputs_card_and_montages(cls_sites, tmp_path):
    distiller = _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path)
    model_path = distiller.run()
    out = model_path.parents[1]
    net, card = load_site_model(out)
    assert card["role"] == "central" and card["task"] == "classification"
    assert set(card["sites"]) == {"siteA", "siteB"}
    for s in card["sites"].values():
        assert s["transport"]["queries"] == 4 and s["transport"]["vjps"] >= 1
    w = torch.tensor(list(card["expertise_weights"].values()))
    torch.testing.assert_close(w.sum(0), torch.ones(2))
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 2)
    # the server's own costs are timed apart: the generator's passes, the cross-site terms, the student
    assert all(card["timing"][k] > 0 for k in ("generator_s", "server_s", "student_s"))
    assert sorted(p.name for p in (out / "montages").glob("*.png")) == ["iter_000002.png", "iter_000004.png"]
    assert any((out / "tensorboard").iterdir())


def test_a_batch_larger_than_the_montage_still_writes_it(cls_sites, tmp_path):
    # the montage shows 32 inputs; a larger generator batch once failed there with "40 labels for 32 images"
    distiller = _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, iterations=2, batch_size=40)
    out = distiller.run().parents[1]
    assert (out / "montages" / "iter_000002.png").is_file()


def test_boundary_targets_and_diversity_term(cls_sites, tmp_path):
    distiller = _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, iterations=2, boundary_fraction=0.5,
                           weights={"diversity": 0.5})
    z, targets = distiller._sample(0)
    assert targets.shape == (8, 2)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    mixed = (targets.max(1).values < 1).sum()
    assert mixed == 4, "half of the batch has a two-class target"
    z2, targets2 = distiller._sample(0)
    torch.testing.assert_close(targets, targets2)  # the same draw on resume
    distiller.run()
    card = json.loads((tmp_path / "central" / "central_card.json").read_text())
    assert card["boundary_fraction"] == 0.5 and card["weights"]["diversity"] == 0.5
    with pytest.raises(ValueError, match="boundary_fraction"):
        _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, boundary_fraction=1.5)


def test_resume_after_crash_equals_uninterrupted_run(cls_sites, tmp_path):
    reference = _distiller(InProcessTransport(_sites(cls_sites, tmp_path / "a")), tmp_path / "a", iterations=6).run()
    crashing = _distiller(InProcessTransport(_sites(cls_sites, tmp_path / "b")), tmp_path / "b", iterations=6)
    original = crashing._step

    def crash_at_5(engine, batch):
        if engine.state.iteration == 5:
            raise KeyboardInterrupt("simulated kill")
        return original(engine, batch)

    crashing._step = crash_at_5
    with pytest.raises(KeyboardInterrupt):
        crashing.run()
    out_b = tmp_path / "b" / "central"
    assert not (out_b / "models" / "model.pt").exists(), "a killed run must not leave a complete-looking model"
    resumed = _distiller(InProcessTransport(_sites(cls_sites, tmp_path / "b")), tmp_path / "b", iterations=6, resume=True).run()
    a, b = torch.load(reference, weights_only=True), torch.load(resumed, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")


def test_two_runs_of_one_config_give_the_same_student_on_several_threads(cls_sites, tmp_path):
    # "a run is reproducible from its config": no kernel whose result depends on the threads' timing (atomic adds)
    with torch_threads(2):
        runs = [_distiller(InProcessTransport(_sites(cls_sites, tmp_path / r)), tmp_path / r, batch_size=32).run() for r in "ab"]
    a, b = (torch.load(r, weights_only=True) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_frozen_generator_asks_forward_only_queries(cls_sites, tmp_path):
    """Past generator_iterations the generator stops changing, the sites get forward-only queries (no gradient, no
    VJP) whose answers still label the student's inputs, and the card says so."""
    transport = SpyTransport(_sites(cls_sites, tmp_path))
    requests = []
    query = transport.query
    transport.query = lambda request, sites=None: (requests.append(request), query(request, sites))[1]
    d = _distiller(transport, tmp_path, iterations=5, generator_iterations=2, checkpoint_interval=100)
    snapshots = []
    step = d._step

    def record(engine, batch):
        out = step(engine, batch)
        snapshots.append(([p.detach().clone() for p in d.generator.parameters()], [p.detach().clone() for p in d.student.parameters()]))
        return out

    d._step = record
    d.run()
    assert [r.forward_only for r in requests] == [False, False, True, True, True]
    assert not any(r.update_discriminator for r in requests[2:])
    assert all(s["vjps"] == 2 and s["queries"] == 5 for s in transport.stats().values())
    for later in snapshots[2:]:  # the generator is as it was after its last update
        assert all(torch.equal(a, b) for a, b in zip(snapshots[1][0], later[0]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1][1], snapshots[-1][1])), "the student still learns"
    card = json.loads((tmp_path / "central" / "central_card.json").read_text())
    assert card["generator_iterations"] == 2 and card["iterations"] == 5
    with pytest.raises(ValueError, match="generator_iterations"):
        _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, generator_iterations=-1)
    with pytest.raises(ValueError, match="class_intensity is for the layout-conditioned generator"):
        _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, weights={"class_intensity": 1.0})
    with pytest.raises(ValueError, match="class_gradient is for the layout-conditioned generator"):
        _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, weights={"class_gradient": 1.0})


def test_real_input_bound_labels_the_sites_real_images_and_says_it_is_not_data_free(cls_sites, tmp_path):
    """The classification bound (variant real_inputs): every query carries rows of the sites' real training images,
    forward-only; the generator is untouched; the card says the student is not data-free; wrong set-ups are named."""
    from monai_fedkd.benchmarks.classification_variants import REAL_INPUTS
    from monai_fedkd.benchmarks.real_input_bound import RealInputDistillation

    sites = _sites(cls_sites, tmp_path)
    transport = SpyTransport(sites)
    requests = []
    query = transport.query
    transport.query = lambda request, sites=None: (requests.append(request), query(request, sites))[1]
    d = _distiller(transport, tmp_path, iterations=3, generator_iterations=0, checkpoint_interval=100)
    bound = RealInputDistillation(transport, d.generator, d.student, tmp_path / "bound", iterations=3, batch_size=8, student_steps=2,
                                  student_batch_size=8, cache_size=32, checkpoint_interval=100, montage_interval=1, seed=3, progress=False,
                                  generator_iterations=0, real_sites=sites)
    before = [p.detach().clone() for p in bound.generator.parameters()]
    bound.run()
    real = torch.cat([s.real_images for s in sites])
    assert len(requests) == 3 and all(r.forward_only and not r.update_discriminator for r in requests)
    for r in requests:  # each input is one of the sites' real images, bit for bit
        assert all((real == x).flatten(1).all(1).any() for x in r.inputs)
    assert all(torch.equal(a, b) for a, b in zip(before, bound.generator.parameters()))
    card = json.loads((tmp_path / "bound" / "central_card.json").read_text())
    assert "not data-free" in card["upper_bound"] and card["generator_def"] is None and card["iterations"] == 3
    assert not (tmp_path / "bound" / "montages").exists()  # the sites' images are not written out
    with pytest.raises(ValueError, match="generator_iterations 0"):
        RealInputDistillation(transport, d.generator, d.student, tmp_path / "b2", real_sites=sites, progress=False)
    without = [QuerySite(cls_sites[0][0], name="no_images", seed=1, state_dir=tmp_path / "s3")]
    with pytest.raises(ValueError, match="no_images"):
        RealInputDistillation(InProcessTransport(without), d.generator, d.student, tmp_path / "b3", generator_iterations=0,
                              real_sites=without, progress=False)
    # the variant's overrides build it through the bundle
    sites_json = _sites_json(tmp_path / "sites.json", cls_sites)
    _ok(run_bundle("central_distillation", "train.json", {"sites": str(sites_json), "output_dir": str(tmp_path / "bundle"), "iterations": 2,
                                                          "batch_size": 8, "student_batch_size": 8, **REAL_INPUTS}))
    assert "not data-free" in read_site_card(tmp_path / "bundle")["upper_bound"]


def test_prior_warmup_trains_the_generator_without_asking_a_site(cls_sites, tmp_path):
    """prior_warmup_iterations update the generator on the server's image priors before the first query: the sites
    see only the run's own queries, the generator they first see is no longer the initial one, the card says so."""
    transport = SpyTransport(_sites(cls_sites, tmp_path))
    d = _distiller(transport, tmp_path, iterations=2, prior_warmup_iterations=3, checkpoint_interval=100)
    initial = [p.detach().clone() for p in d.generator.parameters()]
    first_seen = []
    step = d._step

    def record(engine, batch):
        if not first_seen:
            first_seen.extend(p.detach().clone() for p in d.generator.parameters())
        return step(engine, batch)

    d._step = record
    d.run()
    assert all(s["queries"] == 2 and s["vjps"] == 2 for s in transport.stats().values()), "the warm-up asks no site"
    assert not all(torch.equal(a, b) for a, b in zip(initial, first_seen)), "the warm-up changed the generator"
    card = json.loads((tmp_path / "central" / "central_card.json").read_text())
    assert card["prior_warmup_iterations"] == 3 and card["timing"]["prior_warmup_s"] > 0
    with pytest.raises(ValueError, match="all of their weights"):
        _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, prior_warmup_iterations=1, weights={"diversity": 0.0})
    with pytest.raises(ValueError, match="prior_warmup_iterations must be"):
        _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, prior_warmup_iterations=-1)
    with pytest.raises(ValueError, match="unknown class_intensity_options"):
        _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, class_intensity_options={"per_voxel": True})
    with pytest.raises(ValueError, match="student_dice_weight is for segmentation"):
        _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, student_dice_weight=1.0)
    with pytest.raises(ValueError, match="conditional_ce_class_balance is for segmentation"):
        _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, conditional_ce_class_balance=1.0)


def test_cosine_student_lr_decays_with_progress_and_constant_stays(cls_sites, tmp_path):
    """student_lr_schedule "cosine": each step's student updates use half a cosine of the run's progress (steps, and
    the wall-time budget when that is further along); "constant" keeps student_lr; the card records the schedule."""
    from monai_fedkd.server.distillation import cosine_lr

    def lrs(out, **kw):
        d = _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, out=out, iterations=4, checkpoint_interval=100,
                       student_lr=2e-3, **kw)
        seen, step = [], d._step

        def spied(engine, batch):
            out = step(engine, batch)
            seen.append((out["student/lr"], d.s_optimizer.param_groups[0]["lr"]))
            return out

        d._step = spied
        d.run()
        assert all(a == b for a, b in seen), "the optimizer used the logged rate"
        return [a for a, _ in seen], json.loads((tmp_path / out / "central_card.json").read_text())

    cosine, card = lrs("cosine", student_lr_schedule="cosine")
    assert cosine == pytest.approx([cosine_lr(2e-3, k / 4) for k in range(4)])
    assert cosine[0] == pytest.approx(2e-3) and all(a > b for a, b in zip(cosine, cosine[1:])) and cosine[-1] > 0
    assert card["student_lr_schedule"] == "cosine" and card["student_lr"] == 2e-3
    constant, card = lrs("constant")
    assert constant == [2e-3] * 4 and card["student_lr_schedule"] == "constant"
    # under a wall-time budget the schedule follows the elapsed share when it is ahead of the steps: a 1 ms budget is
    # spent by the first generator step, so its student updates already run at rate 0 (and the run stops after it)
    budget, card = lrs("budget", student_lr_schedule="cosine", max_seconds=1e-3)
    assert budget == [0.0] and card["stopped_by_budget"]
    assert cosine_lr(1.0, 0.5) == pytest.approx(0.5) and cosine_lr(1.0, 2.0) == 0.0 and cosine_lr(1.0, -1.0) == 1.0
    with pytest.raises(ValueError, match="student_lr_schedule must be one of"):
        _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, student_lr_schedule="linear")


def test_server_terms_of_weight_zero_are_not_computed(cls_sites, tmp_path):
    """A server term of weight 0 costs nothing: without the adversarial term the generator step runs no student
    forward pass; with every server term at 0 the run still trains (image priors only)."""
    calls = {"in_generator_step": 0}
    inside = [False]

    def run(weights, out):
        d = _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, out=out, iterations=2, checkpoint_interval=100, weights=weights)
        d.student.register_forward_hook(lambda *_: calls.__setitem__("in_generator_step", calls["in_generator_step"] + inside[0]))
        step = d._generator_step

        def spied(*a, **k):
            inside[0] = True
            try:
                return step(*a, **k)
            finally:
                inside[0] = False

        d._generator_step = spied
        d.run()

    run({"adversarial": 1.0}, "with")
    assert calls["in_generator_step"] == 2, "the adversarial term asks the student once per generator step"
    calls["in_generator_step"] = 0
    run({"adversarial": 0.0}, "without")
    assert calls["in_generator_step"] == 0
    run({k: 0.0 for k in ("consensus", "balance", "adversarial", "conditional_ce", "pseudo_label")}, "priors_only")
    card = json.loads((tmp_path / "priors_only" / "central_card.json").read_text())
    assert card["iterations"] == 2 and (tmp_path / "priors_only" / "models" / "model.pt").is_file()


def test_forward_only_query_builds_no_graph_and_refuses_a_vjp(cls_sites):
    site = QuerySite(cls_sites[1][0])
    x = torch.rand(3, 1, 28, 28)
    ans = site.answer(QueryRequest(x, step=0, local_weights={"entropy": 1.0}, forward_only=True))
    assert ans.local_input_grad is None and not ans.outputs.requires_grad
    differentiable = site.answer(QueryRequest(x, step=1, local_weights={"entropy": 1.0}))
    torch.testing.assert_close(ans.outputs, differentiable.outputs)  # the same answer, only no gradient
    site.answer(QueryRequest(x, step=3, local_weights={}, want_input_grad=False))  # no local gradient, but a VJP may follow
    assert site.vjp(torch.randn_like(ans.outputs)).shape == x.shape
    site.answer(QueryRequest(x, step=2, local_weights={}, forward_only=True))
    with pytest.raises(SiteAnswerError, match="forward-only"):
        site.vjp(torch.randn_like(ans.outputs))


def test_student_transform_reaches_every_student_input_and_keeps_shapes(cls_sites, tmp_path):
    seen = []

    def darken(x):  # a label-preserving intensity transform, pushed out of the value range on purpose
        seen.append(tuple(x.shape))
        return x - 10.0

    transport = InProcessTransport(_sites(cls_sites, tmp_path))
    d = _distiller(transport, tmp_path, iterations=2, student_transform=darken)
    d.run()
    assert seen == [(1, 28, 28)] * (2 * 2 * 8), "every sample of every student batch is transformed"
    assert d._transform_student_inputs(torch.full((2, 1, 28, 28), 0.5)).min() >= 0.0, "clipped to the sites' value range"
    assert json.loads((tmp_path / "central" / "central_card.json").read_text())["student_transform"] == "function"
    with pytest.raises(ValueError, match="changed an input's shape"):
        _distiller(transport, tmp_path, out="c2", iterations=1, student_transform=lambda x: x[:, :14]).run()
    assert not (tmp_path / "c2" / "models" / "model.pt").exists()
    with pytest.raises(ValueError, match="must be callable"):
        _distiller(transport, tmp_path, out="c3", student_transform="RandGaussianNoise")


def test_queried_targets_label_the_transformed_inputs_themselves(cls_sites, tmp_path):
    """student_transform_targets 'queried': each step's new inputs are transformed once, the sites are asked
    forward-only about exactly those views, both the inputs and the views enter the cache with the ensemble's answer on
    each, and the student's draws are not transformed again."""
    calls = []

    def flip(x):  # not label-preserving in general: why the views need their own answers
        calls.append(tuple(x.shape))
        return torch.flip(x, dims=(-1,))

    transport = SpyTransport(_sites(cls_sites, tmp_path))
    requests = []
    query = transport.query
    transport.query = lambda request, sites=None: (requests.append(request), query(request, sites))[1]
    d = _distiller(transport, tmp_path, iterations=3, student_transform=flip, student_transform_targets="queried",
                   cache_size=64, checkpoint_interval=100)
    d.run()
    assert [r.forward_only for r in requests] == [False, True] * 3
    for full, view in zip(requests[0::2], requests[1::2]):  # the view query carries the step's inputs, flipped
        torch.testing.assert_close(view.inputs, torch.flip(full.inputs, dims=(-1,)).clamp(0, 1))
    assert calls == [(1, 28, 28)] * (3 * 8), "one transform per new input, none on the student's draws"
    assert d.cache.size == 3 * 2 * 8
    assert all(st["queries"] == 6 and st["vjps"] == 3 for st in transport.stats().values())
    # the cached views' targets are the ensemble's answers on the views (float16 in the cache), not on the inputs
    with torch.no_grad():
        _, stacked = d._forward_only_answers(d.cache.inputs[8:16].float(), step=99)
        torch.testing.assert_close(d.cache.targets[8:16].float(), d._ensemble(stacked).exp(), atol=2e-3, rtol=0)
        assert not torch.allclose(d.cache.targets[8:16].float(), d.cache.targets[0:8].float(), atol=2e-3)
    card = json.loads((tmp_path / "central" / "central_card.json").read_text())
    assert card["student_transform_targets"] == "queried"
    with pytest.raises(ValueError, match="student_transform is None"):
        _distiller(transport, tmp_path, out="c2", student_transform_targets="queried")
    with pytest.raises(ValueError, match="student_transform_targets must be one of"):
        _distiller(transport, tmp_path, out="c3", student_transform=flip, student_transform_targets="teacher")


class OneClassCardTransport(InProcessTransport):
    """As the sites' own transport, but the first site's card says it never saw the last class."""

    def site_cards(self):
        cards = json.loads(json.dumps(super().site_cards()))
        first = cards[next(iter(cards))]
        first["class_counts"] = [sum(first["class_counts"]), *([0] * (len(first["class_counts"]) - 1))]
        return cards


def test_auto_ensemble_is_a_product_of_equal_sites_only_where_a_card_shows_one_class(cls_sites, tmp_path):
    sites = _sites(cls_sites, tmp_path)
    both = _distiller(InProcessTransport(sites), tmp_path, out="both")  # the default, "auto"
    assert both.ensemble_used == {"combination": "mixture", "weighting": "contrast"}
    one = _distiller(OneClassCardTransport(sites), tmp_path, out="one")
    assert one.ensemble_used == {"combination": "product", "weighting": "mean"}
    torch.testing.assert_close(one.expertise, torch.full_like(one.expertise, 0.5))
    logits = torch.randn(2, 3, 2)
    geometric = torch.log_softmax(logits, 2).mean(0)
    torch.testing.assert_close(one._ensemble(logits), geometric - torch.logsumexp(geometric, 1, keepdim=True))
    # a configured combination is kept whatever the cards show
    fixed = _distiller(OneClassCardTransport(sites), tmp_path, out="fixed", ensemble_combination="mixture")
    assert fixed.ensemble_used == {"combination": "mixture", "weighting": "contrast"}
    assert fixed.expertise[0, 1] == 0  # contrast weights: the site of one class has no say


def test_cards_that_disagree_name_the_sites(cls_sites, tmp_path):
    a = read_site_card(cls_sites[0][0])
    b = json.loads(json.dumps(a))
    b["classes"]["num_classes"] = 3
    with pytest.raises(ValueError, match=r"num_classes.*siteA=2.*siteX=3"):
        check_site_cards({"siteA": a, "siteX": b})
    b = json.loads(json.dumps(a))
    b["spatial_dims"] = 3
    with pytest.raises(ValueError, match="spatial_dims"):
        check_site_cards({"siteA": a, "siteX": b})


class NaNSite(QuerySite):
    def answer(self, request):
        ans = super().answer(request)
        if request.step >= 1:
            ans.outputs = torch.full_like(ans.outputs, float("nan"))
        return ans


def test_site_answering_nan_is_named_or_dropped(cls_sites, tmp_path):
    (d0, dl0), (d1, dl1) = cls_sites
    good = QuerySite(d0, real_datalist=dl0, state_dir=tmp_path / "s0")
    bad = NaNSite(d1, name="broken", real_datalist=dl1, state_dir=tmp_path / "s1")
    with pytest.raises(SiteAnswerError, match="broken.*NaN"):
        _distiller(InProcessTransport([good, bad]), tmp_path, out="c1").run()
    assert not (tmp_path / "c1" / "models" / "model.pt").exists()
    good = QuerySite(d0, real_datalist=dl0, state_dir=tmp_path / "s0")
    bad = NaNSite(d1, name="broken", real_datalist=dl1, state_dir=tmp_path / "s1")
    path = _distiller(InProcessTransport([good, bad]), tmp_path, out="c2", drop_failed_sites=True).run()
    card = json.loads((path.parents[1] / "central_card.json").read_text())
    assert "step 1" in card["sites"]["broken"]["dropped"] and card["sites"][good.name]["dropped"] is None
    assert list(card["expertise_weights"]) == [good.name]


def test_a_diverged_generator_is_named_as_the_cause_not_the_site_that_refuses_its_inputs(cls_sites, tmp_path):
    sites = [QuerySite(d, real_datalist=dl, state_dir=tmp_path / f"s{i}") for i, (d, dl) in enumerate(cls_sites)]
    distiller = _distiller(InProcessTransport(sites), tmp_path, out="diverged")
    with torch.no_grad():
        next(distiller.generator.parameters()).fill_(float("nan"))  # what a blown-up update leaves behind
    with pytest.raises(FloatingPointError, match="generator produced non-finite inputs.*generator_lr"):
        distiller.run()
    assert not (tmp_path / "diverged" / "models" / "model.pt").exists()


def test_site_refuses_inputs_outside_its_spec(cls_sites, tmp_path):
    site = QuerySite(cls_sites[0][0])
    with pytest.raises(SiteAnswerError, match="shape"):
        site.answer(QueryRequest(torch.rand(2, 3, 28, 28), step=0))
    with pytest.raises(SiteAnswerError, match="value range"):
        site.answer(QueryRequest(torch.rand(2, 1, 28, 28) * 5, step=0))
    with pytest.raises(SiteAnswerError, match="without a differentiable query"):
        site.vjp(torch.zeros(2, 2))


def test_missing_site_directory_is_named(tmp_path):
    from monai_fedkd.site.card import SiteCardError

    with pytest.raises(SiteCardError, match="nowhere"):
        QuerySite(tmp_path / "nowhere")


def test_vjp_matches_autograd_through_the_site_network(cls_sites):
    site = QuerySite(cls_sites[1][0])
    x = torch.rand(3, 1, 28, 28)
    ans = site.answer(QueryRequest(x, step=0, local_weights={"entropy": 0.0}))
    c = torch.randn_like(ans.outputs)
    v = site.vjp(c)
    net, _ = load_site_model(cls_sites[1][0])
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((net(xr) * c).sum(), xr)
    torch.testing.assert_close(v, expected, rtol=1e-4, atol=1e-6)


def test_bfloat16_site_answers_float32_values_close_to_its_float32_answers(cls_sites):
    x = torch.rand(4, 1, 28, 28)
    answers, vjps = {}, {}
    for dtype in (None, "bfloat16"):
        site = QuerySite(cls_sites[1][0], real_datalist=cls_sites[1][1], seed=5, autocast_dtype=dtype)
        answers[dtype] = site.answer(QueryRequest(x, step=0, local_weights={"entropy": 1.0, "realism": 1.0}))
        vjps[dtype] = site.vjp(torch.ones_like(answers[dtype].outputs))
    full, half = answers[None], answers["bfloat16"]
    for a in (full, half):  # what crosses the transport is float32 whatever the site computes in
        assert a.outputs.dtype == a.local_input_grad.dtype == torch.float32
    assert not torch.equal(full.outputs, half.outputs)  # the network did run in bfloat16 ...
    torch.testing.assert_close(half.outputs, full.outputs, rtol=0.05, atol=0.05)  # ... and answers nearly the same
    for g16, g32 in ((half.local_input_grad, full.local_input_grad), (vjps["bfloat16"], vjps[None])):
        assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.95
    with pytest.raises(ValueError, match="float16 would need loss scaling"):
        QuerySite(cls_sites[1][0], autocast_dtype="float16")


def test_bfloat16_distillation_sends_float32_and_records_its_precision(cls_sites, tmp_path):
    transport = SpyTransport(_sites(cls_sites, tmp_path, autocast_dtype="bfloat16"))
    distiller = _distiller(transport, tmp_path, autocast_dtype="bfloat16")
    computed = set()  # the dtypes the generator's and the student's forward passes produced
    for net in (distiller.generator, distiller.student):
        net.register_forward_hook(lambda _m, _i, out: computed.add(out.dtype))
    model_path = distiller.run()
    assert computed == {torch.bfloat16}
    net, card = load_site_model(model_path.parents[1])
    assert card["autocast_dtype"] == "bfloat16"
    assert transport.crossed and all(t.dtype == torch.float32 for t in transport.crossed)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert torch.isfinite(net(torch.rand(2, 1, 28, 28))).all()
    with pytest.raises(ValueError, match="autocast_dtype must be None"):
        _distiller(InProcessTransport(_sites(cls_sites, tmp_path)), tmp_path, out="bad", autocast_dtype="half")


def test_auto_precision_is_bfloat16_only_where_the_device_has_it_natively_and_right(cls_sites, monkeypatch):
    for native, agree, expected in ((True, True, "bfloat16"), (False, True, None), (True, False, None)):
        monkeypatch.setattr(precision, "native_bfloat16", lambda device, native=native: native)
        monkeypatch.setattr(precision, "bfloat16_convolutions_agree", lambda device, agree=agree: agree)
        assert precision.resolve_autocast_dtype("auto", "cpu") == expected
        assert QuerySite(cls_sites[1][0], autocast_dtype="auto").autocast_dtype == expected
    monkeypatch.undo()
    # the check itself: a device whose bfloat16 convolutions answer differently from float32 is caught
    real_autocast = precision.autocast

    @contextlib.contextmanager
    def skewed_autocast(device, dtype):
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o * 1.5) if dtype else None
        with real_autocast(device, dtype):
            yield
        if handle is not None:
            handle.remove()

    precision._probe.cache_clear()
    monkeypatch.setattr(precision, "autocast", skewed_autocast)
    assert precision.bfloat16_convolutions_agree("cpu") is False
    assert "output off by" in precision._probe("cpu", 0.05)[1]
    monkeypatch.undo()
    precision._probe.cache_clear()
    state = torch.random.get_rng_state()
    assert isinstance(precision.bfloat16_convolutions_agree("cpu"), bool)
    assert torch.equal(torch.random.get_rng_state(), state), "the check must not move a seeded run's random stream"
    assert precision.resolve_autocast_dtype("bfloat16", "cpu") == "bfloat16"  # an explicit choice is not second-guessed
    assert precision.resolve_autocast_dtype(None, "cpu") is None
    # "float32" names full precision for command lines, which cannot pass None
    assert precision.resolve_autocast_dtype("float32", "cpu") is None and QuerySite(cls_sites[1][0], autocast_dtype="float32").autocast_dtype is None
    with precision.autocast("cpu", "float32"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.undo()
    assert precision.native_bfloat16("meta") is False  # a device without a known bfloat16 unit stays float32
    assert isinstance(precision.native_bfloat16("cpu"), bool)


# ---- end to end through `python -m monai.bundle run` ----------------------------------------------------------

def _sites_json(path: Path, entries) -> Path:
    path.write_text(json.dumps([{"name": Path(d).name, "dir": str(d), "datalist": str(dl)} for d, dl in entries]))
    return path


def test_bundle_2d_classification(cls_sites, tmp_path):
    sites = _sites_json(tmp_path / "sites.json", cls_sites)
    out = tmp_path / "central"
    _ok(run_bundle("central_distillation", "train.json", {"sites": str(sites), "output_dir": str(out), "iterations": 3, "batch_size": 8,
                                                          "student_batch_size": 8, "checkpoint_interval": 2, "montage_interval": 2,
                                                          "ensemble_combination": "product"}))
    net, card = load_site_model(out)
    assert card["iterations"] == 3 and card["network_def"]["name"] == "monai.networks.nets.Classifier"
    assert card["ensemble_combination"] == "product"
    refused = run_bundle("central_distillation", "train.json", {"sites": str(sites), "output_dir": str(tmp_path / "refused"), "iterations": 1,
                                                                "ensemble_combination": "median"})
    assert refused.returncode != 0 and "ensemble_combination must be one of" in refused.stdout + refused.stderr


def test_bundle_3d_classification(adrenal_dir, tmp_path):
    bundle, overrides = dataset_overrides(dataset_info(adrenal_dir))
    datalist = str(adrenal_dir / "datalist.json")
    entries = []
    for k in range(2):
        d = tmp_path / f"adrenal{k}"
        _ok(run_bundle(bundle, "train.json", {"datalist": datalist, "output_dir": str(d), "max_epochs": 1, "batch_size": 8, "seed": k, **overrides}))
        entries.append((d, datalist))
    out = tmp_path / "central"
    _ok(run_bundle("central_distillation", "train.json", {"sites": str(_sites_json(tmp_path / "sites.json", entries)), "output_dir": str(out),
                                                          "iterations": 2, "batch_size": 4, "student_batch_size": 4, "generator_def#base_channels": 8,
                                                          # 3D is where bfloat16 pays: the server's and the sites' precision through the bundle
                                                          "autocast_dtype": "bfloat16", "site_options#autocast_dtype": "bfloat16"}))
    net, card = load_site_model(out)
    assert card["spatial_dims"] == 3 and net(torch.rand(1, 1, 28, 28, 28)).shape == (1, 2)
    assert card["autocast_dtype"] == "bfloat16" and next(net.parameters()).dtype == torch.float32
    assert (out / "montages" / "iter_000002.png").exists()


@pytest.fixture(scope="module")
def seg_sites(ixi_dir, tmp_path_factory):
    from test_site_bundles import SEG_SMALL

    root = tmp_path_factory.mktemp("seg_sites")
    bundle, overrides = dataset_overrides(dataset_info(ixi_dir))
    datalist = str(ixi_dir / "datalist.json")
    entries = []
    for k in range(2):
        d = root / f"ixi{k}"
        _ok(run_bundle(bundle, "train.json", {"datalist": datalist, "output_dir": str(d), "seed": k, **overrides, **SEG_SMALL}))
        entries.append((d, datalist))
    return entries


def test_segmentation_site_discriminator_sees_real_patches(seg_sites):
    site = QuerySite(seg_sites[0][0], real_datalist=seg_sites[0][1], seed=1)
    size = site.card["input"]["spatial_size"]
    a = site._real_batch(3, torch.Generator().manual_seed(0))
    b = site._real_batch(3, torch.Generator().manual_seed(1))
    assert tuple(a.shape) == (3, 1, *size)
    assert not torch.equal(a, b), "patches are cut anew at every step"
    torch.testing.assert_close(a, site._real_batch(3, torch.Generator().manual_seed(0)))
    # one voxel-wise answer: logits for every voxel of the synthetic patch
    ans = site.answer(QueryRequest(torch.rand(2, 1, *size), step=0, local_weights={"entropy": 1.0, "realism": 1.0}))
    assert tuple(ans.outputs.shape) == (2, site.card["classes"]["num_classes"], *size)
    assert ans.local_input_grad.abs().sum() > 0 and {"entropy", "realism", "discriminator_loss"} <= set(ans.local_values)


def test_bundle_3d_segmentation(seg_sites, tmp_path):
    """The bundle default: the layout-conditioned generator, layouts from the sites' atlases."""
    for site_dir, _ in seg_sites:  # the tiny test sites hold 2 training subjects; their policy lets them share an atlas of 2
        (Path(site_dir) / "site_policy.json").write_text(json.dumps({"atlas_min_subjects": 1}))
    out = tmp_path / "central"
    try:
        _ok(run_bundle("central_distillation", ["train.json", "segmentation.json"],
                       {"sites": str(_sites_json(tmp_path / "sites.json", seg_sites)), "output_dir": str(out), "iterations": 2, "batch_size": 2,
                        "student_batch_size": 2, "generator_def#features": [4, 4, 8, 8, 8, 4], "student_def#channels": [8, 16, 32],
                        "student_def#strides": [2, 2], "student_augment": True, "layout_options#foreground_crop": 1.0,
                        "layout_options#class_balanced_crops": True, "generator_iterations": 1, "weights#class_intensity": 1.0, "weights#class_gradient": 1.0, "prior_warmup_iterations": 2,
                        "class_intensity_options": {"per_sample": True}, "student_dice_weight": 0.5,
                        "conditional_ce_class_balance": 1.0}))
    finally:
        for site_dir, _ in seg_sites:
            (Path(site_dir) / "site_policy.json").unlink()
    net, card = load_site_model(out)
    assert card["task"] == "segmentation"
    assert net(torch.rand(1, 1, 16, 16, 16)).shape == (1, 6, 16, 16, 16)
    assert (out / "montages" / "iter_000002.png").exists() and (out / "montages" / "iter_000002_layout.png").exists()
    assert card["layouts"]["atlas_sites"] == sorted(Path(d).name for d, _ in seg_sites)
    assert card["layouts"]["options"]["class_balanced_crops"] is True
    assert card["layouts"]["options"]["foreground_crop"] == 1.0 and "RandBiasField" in card["student_transform"]
    assert card["generator_iterations"] == 1 and all(s["transport"]["vjps"] == 1 for s in card["sites"].values())
    assert card["layouts"]["class_intensity_sites"] == card["layouts"]["atlas_sites"] and card["weights"]["class_intensity"] == 1.0
    assert card["layouts"]["class_gradient_sites"] == card["layouts"]["atlas_sites"] and card["weights"]["class_gradient"] == 1.0
    assert card["prior_warmup_iterations"] == 2 and card["class_intensity_options"] == {"per_sample": True}
    assert card["student_dice_weight"] == 0.5 and card["conditional_ce_class_balance"] == 1.0
    assert card["consensus_voxel_stride"] == 2, "3D segmentation evaluates the consensus on one voxel in eight by default"
    assert card["memory_format"] == "channels_last", "3D segmentation on CPU runs the student channels-last by default"
    # the bundle's initialize kept freed blocks in the heap (cpu_heap "auto" on a CPU with glibc), and the card says so
    assert card["cpu_heap"] == ("retain" if cpu_heap._glibc()[0] is not None else "system")
    assert all(p.is_contiguous() for p in net.parameters()), "the model file is written contiguous whatever the run's layout"
    # segmentation's default precision "auto" resolves on this machine's CPU, and the card says what ran
    assert card["autocast_dtype"] == precision.resolve_autocast_dtype("auto", "cpu")
    assert next(net.parameters()).dtype == torch.float32
    for a in card["layouts"]["atlas"].values():  # the whole field of view (at least the 16^3 patch), 2-voxel cells
        assert a["subjects"] == 2 and all(s >= 16 for s in a["spatial_size"]) and a["grid"] == [-(-s // 2) for s in a["spatial_size"]]


def test_memory_format_is_resolved_per_dims_and_device_and_bad_names_are_refused():
    assert resolve_memory_format("auto", 3, "cpu") == "channels_last"
    assert resolve_memory_format("auto", 2, "cpu") == resolve_memory_format("auto", 3, "meta") == "contiguous"
    assert resolve_memory_format(None, 3, "cpu") == "contiguous" and resolve_memory_format("channels_last", 2, "cpu") == "channels_last"
    with pytest.raises(ValueError, match="memory_format must be one of"):
        resolve_memory_format("nhwc", 3, "cpu")
    with pytest.raises(ValueError, match="needs 2 or 3 spatial dims"):
        resolve_memory_format("channels_last", 1, "cpu")
    net = to_memory_format(torch.nn.Conv3d(2, 4, 3), "channels_last", 3)
    assert net.weight.is_contiguous(memory_format=torch.channels_last_3d) and not net.weight.is_contiguous()
    assert to_memory_format(torch.rand(2, 3), "channels_last", 3).is_contiguous(), "a (B, C) output has no layout to change"


def _in_channels_last(net: torch.nn.Module) -> bool:
    """Whether the 3D kernels of ``net`` are laid out channels-last (kernels of one input channel or of one voxel are
    both layouts at once, so they are left out)."""
    kernels = [p for p in net.parameters() if p.ndim == 5 and p.shape[1] > 1 and p.shape[2:].numel() > 1]
    return bool(kernels) and all(p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous() for p in kernels)


def test_channels_last_site_and_student_compute_the_same_as_contiguous(seg_sites, tmp_path):
    """The layout changes how the networks compute, not what: a channels-last site answers (outputs, input-gradient,
    VJP) as a contiguous one does up to float rounding and sends contiguous tensors; a channels-last student learns the
    same model from the same queries."""
    size = QuerySite(seg_sites[0][0]).card["input"]["spatial_size"]
    x = torch.rand(2, 1, *size)
    answers, vjps = {}, {}
    for fmt in ("contiguous", "channels_last"):
        site = QuerySite(seg_sites[0][0], seed=1, memory_format=fmt)
        assert site.memory_format == fmt
        answers[fmt] = site.answer(QueryRequest(x, step=0, local_weights={"entropy": 1.0}))
        vjps[fmt] = site.vjp(torch.ones_like(answers[fmt].outputs))
    assert _in_channels_last(site.network)
    for a, b in ((answers["channels_last"].outputs, answers["contiguous"].outputs),
                 (answers["channels_last"].local_input_grad, answers["contiguous"].local_input_grad), (vjps["channels_last"], vjps["contiguous"])):
        assert a.is_contiguous(), "what crosses the transport is contiguous"
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)

    def central(fmt):
        sites = [QuerySite(d, seed=7 + i, memory_format=fmt) for i, (d, _) in enumerate(seg_sites)]
        for s in sites:  # the tiny test sites share no atlas: the unconditional 3D generator
            s.card.pop("atlas", None)
        torch.manual_seed(0)
        gen = build_network("monai_fedkd.networks.generators.ConditionalGenerator", spatial_dims=3, out_channels=1, spatial_size=size,
                            num_classes=None, latent_dim=8, base_channels=4, init_mean=0.4)
        student = build_network("UNet", spatial_dims=3, in_channels=1, out_channels=6, channels=[4, 8], strides=[2], num_res_units=0)
        engine = CentralDistillation(InProcessTransport(sites), gen, student, tmp_path / fmt, iterations=2, batch_size=2, student_steps=2,
                                     student_batch_size=2, cache_size=8, checkpoint_interval=10, montage_interval=10, seed=3, progress=False,
                                     memory_format=fmt)
        assert _in_channels_last(engine.student) == (fmt == "channels_last") and _in_channels_last(engine.ema.model) == (fmt == "channels_last")
        return load_site_model(engine.run().parents[1])

    (net_c, card_c), (net_l, card_l) = central("contiguous"), central("channels_last")
    assert (card_c["memory_format"], card_l["memory_format"]) == ("contiguous", "channels_last")
    for a, b in zip(net_l.state_dict().values(), net_c.state_dict().values()):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_bundle_3d_segmentation_unconditional(seg_sites, tmp_path):
    """Without shared atlases the layout generator refuses with the reason; the unconditional generator stays reachable."""
    out = tmp_path / "central"
    sites = str(_sites_json(tmp_path / "sites.json", seg_sites))
    small = {"iterations": 2, "batch_size": 2, "student_batch_size": 2, "student_def#channels": [8, 16, 32], "student_def#strides": [2, 2]}
    refused = run_bundle("central_distillation", ["train.json", "segmentation.json"], {"sites": sites, "output_dir": str(out), **small})
    assert refused.returncode != 0 and "shares one" in refused.stdout + refused.stderr
    assert not (out / "models" / "model.pt").exists()
    # a student whose five halvings do not divide the sites' 16^3 patch is refused before any site is asked
    unfit = run_bundle("central_distillation", ["train.json", "segmentation.json", "segmentation_unconditional.json"],
                       {"sites": sites, "output_dir": str(out), **small, "student_def#channels": [4, 4, 4, 4, 4, 4],
                        "student_def#strides": [2, 2, 2, 2, 2]})
    assert unfit.returncode != 0 and "cannot segment patches of [16, 16, 16] voxels" in unfit.stdout + unfit.stderr
    assert not (out / "models" / "model.pt").exists()
    _ok(run_bundle("central_distillation", ["train.json", "segmentation.json", "segmentation_unconditional.json"],
                   {"sites": sites, "output_dir": str(out), "generator_def#base_channels": 8, **small}))
    net, card = load_site_model(out)
    assert card["layouts"] is None and card["generator_def"]["name"].endswith("ConditionalGenerator")


def test_segmentation_site_publishes_the_atlas_its_policy_allows(seg_sites):
    from monai_fedkd.site.atlas import atlas_tensor
    from monai_fedkd.site.policy import AnswerPolicy

    site_dir, datalist = seg_sites[0]
    site = QuerySite(site_dir, atlas_datalist=datalist)
    assert site.discriminator is None and "atlas" not in site.card  # 2 training subjects, the default policy needs 5
    site.set_policy(AnswerPolicy(atlas_min_subjects=1, atlas_pool=4))
    atlas = site.card["atlas"]
    assert atlas["subjects"] == 2 and site.card["answer_policy"]["atlas_pool"] == 4
    assert atlas["grid"] == [-(-s // 4) for s in atlas["spatial_size"]] and all(s >= 16 for s in atlas["spatial_size"])
    t = atlas_tensor(atlas, site.card["classes"]["num_classes"])
    torch.testing.assert_close(t.sum(0), torch.ones(atlas["grid"]), atol=1e-3, rtol=0)
    assert float(t[1:].sum()) > 0, "the atlas holds the site's structures"
    assert site.stats.bytes_sent >= 4 * len(atlas["probabilities"])  # shared information is counted
    assert atlas["align"] == "foreground"
    site.set_policy(AnswerPolicy(atlas_min_subjects=1, atlas_pool=4, atlas_align="centre"))  # accumulated anew
    centred = atlas_tensor(site.card["atlas"], site.card["classes"]["num_classes"])
    assert site.card["atlas"]["align"] == "centre" and not torch.equal(centred, t)
    site.set_policy(AnswerPolicy(share_atlas=False, atlas_min_subjects=1))
    assert "atlas" not in site.card
    # a simulation plays the site's decision through `policy`; fields it leaves out stay the site's own
    played = QuerySite(site_dir, atlas_datalist=datalist, policy={"atlas_min_subjects": 1, "atlas_align": "centre"})
    assert played.card["answer_policy"]["atlas_align"] == "centre" and played.card["answer_policy"]["atlas_pool"] == 2
    torch.testing.assert_close(atlas_tensor(played.card["atlas"], played.card["classes"]["num_classes"]).sum(0),
                               torch.ones(played.card["atlas"]["grid"]), atol=1e-3, rtol=0)


def test_conditional_ce_class_balance_weights_the_layout_classes_by_the_cards_prior(seg_sites, tmp_path):
    """conditional_ce_class_balance: the generator's conditional CE weights each layout class by the pooled voxel
    prior from the cards' class counts (nothing else shared); the rarest structure weighs most, the default none."""
    from monai_fedkd.losses import class_balance_weights
    from monai_fedkd.networks.generators import LayoutGenerator

    sites = [QuerySite(d, real_datalist=dl, seed=i, policy={"atlas_min_subjects": 1}) for i, (d, dl) in enumerate(seg_sites)]
    spec = check_site_cards(InProcessTransport(sites).site_cards())

    def distiller(out, **kw):
        torch.manual_seed(0)
        gen = LayoutGenerator(3, 1, [16, 16, 16], num_classes=spec["num_classes"], features=(4, 4, 8, 8, 8, 4))
        student = build_network("UNet", spatial_dims=3, in_channels=1, out_channels=spec["num_classes"], channels=[8, 16], strides=[2])
        return CentralDistillation(InProcessTransport(sites), gen, student, tmp_path / out, iterations=1, batch_size=2,
                                   student_batch_size=2, student_steps=1, cache_size=4, weights={"layout_dice": 1.0},
                                   ensemble_weighting="expertise", progress=False, **kw)

    assert distiller("plain").terms["conditional_ce"].class_weights is None
    d = distiller("balanced", conditional_ce_class_balance=1.0)
    w, prior = d.terms["conditional_ce"].class_weights, d.class_prior
    torch.testing.assert_close(w, class_balance_weights(prior, 1.0))
    seen = prior > 0
    assert int(torch.argmax(w)) == int(torch.argmin(torch.where(seen, prior, torch.inf))) and float(w[0]) < 1.0
    d.run()  # one weighted generator step end to end
    card = json.loads((tmp_path / "balanced" / "central_card.json").read_text())
    assert card["conditional_ce_class_balance"] == 1.0 and card["iterations"] == 1
    with pytest.raises(ValueError, match="conditional_ce_class_balance must be"):
        distiller("bad", conditional_ce_class_balance=-0.5)


def test_precision_benchmark_records_the_processor_and_what_auto_chose(tmp_path):
    from monai_fedkd.benchmarks import precision_step

    assert precision_step.main(["--repeats", "1", "--docs", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results" / "precision_step.json").read_text())
    # a speed-up is only meaningful with the processor it was measured on and what "auto" picks there
    assert record["processor"] and record["auto_resolves_to"] == precision.resolve_autocast_dtype("auto", "cpu")
    assert set(record["cases"]) == set(precision_step.CASES)
    for case in record["cases"].values():
        assert case["bfloat16_s"] > 0 and case["float32_s"] > 0 and len(case["bfloat16_all_s"]) == 1
        assert case["speedup"] == pytest.approx(case["float32_s"] / case["bfloat16_s"])


def test_memory_format_benchmark_times_both_layouts_of_every_case(tmp_path, monkeypatch):
    from monai_fedkd.benchmarks import memory_format_step

    laid_out = []  # the layout of the input each timed pass saw
    real = memory_format_step.to_memory_format
    monkeypatch.setattr(memory_format_step, "to_memory_format", lambda v, fmt, dims: laid_out.append(fmt) or real(v, fmt, dims))
    assert memory_format_step.main(["--repeats", "1", "--docs", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results" / "memory_format_step.json").read_text())
    assert record["processor"] and record["auto_precision_resolves_to"] == precision.resolve_autocast_dtype("auto", "cpu")
    assert set(record["cases"]) == set(memory_format_step.CASES)
    assert laid_out.count("channels_last") == laid_out.count("contiguous") == 2 * len(memory_format_step.CASES)  # net and input
    for case in record["cases"].values():
        assert case["channels_last_s"] > 0 and case["contiguous_s"] > 0 and len(case["contiguous_all_s"]) == 1
        assert case["speedup"] == pytest.approx(case["contiguous_s"] / case["channels_last_s"])


def test_segmentation_synthesizes_at_the_sites_patch_size_and_warns_otherwise():
    """The sites label the server's patches with networks trained on patches of their card's size; the segmentation
    default synthesizes that size (any size, anisotropic too), and a smaller one is named per site."""
    from monai.bundle import ConfigParser

    from monai_fedkd.pipeline import BUNDLES_DIR
    from monai_fedkd.server.distillation import sites_trained_on_other_patches

    root = BUNDLES_DIR / "central_distillation" / "configs"
    parser = ConfigParser()
    parser.read_config([str(root / "train.json"), str(root / "segmentation.json")])
    parser["spatial_size"] = [48, 40, 24]
    assert parser.get_parsed_content("synthesis_size") == [48, 40, 24]

    def card(size, task="segmentation"):
        return {"task": task, "input": {"spatial_size": size}}

    cards = {"a": card([48, 40, 24]), "b": card([32, 32, 32]), "c": card([48, 40, 24])}
    assert sites_trained_on_other_patches(cards, [48, 40, 24]) == {"b": [32, 32, 32]}
    assert sites_trained_on_other_patches(cards, (32, 32, 32)) == {"a": [48, 40, 24], "c": [48, 40, 24]}
    assert sites_trained_on_other_patches({"k": card([28, 28], "classification")}, [32, 32]) == {}


def test_bundle_2d_segmentation(seg2d_sites, tmp_path):
    """The segmentation default on 2D sites: 2D atlases and layouts, a 2D layout generator at the sites' patch size, a
    2D student; the evaluation bundle scores it beside the sites."""
    out = tmp_path / "central"
    _ok(run_bundle("central_distillation", ["train.json", "segmentation.json"],
                   {"sites": str(_sites_json(tmp_path / "sites.json", seg2d_sites)), "output_dir": str(out), "iterations": 2,
                    "batch_size": 2, "student_batch_size": 2, "generator_def#features": [4, 4, 8, 8, 8, 4],
                    "student_def#channels": [8, 16, 32], "student_def#strides": [2, 2]}))
    net, card = load_site_model(out)
    assert card["spatial_dims"] == 2 and card["input"]["spatial_size"] == [32, 32]
    assert card["generator_def"]["name"].endswith("LayoutGenerator") and card["generator_def"]["spatial_dims"] == 2
    assert card["generator_def"]["spatial_size"] == [32, 32], "synthesis at the sites' own 2D patch"
    assert card["consensus_voxel_stride"] == 1, "2D segmentation keeps the consensus on every pixel"
    assert card["memory_format"] == "contiguous", "'auto' picks channels-last only for 3D, where it was measured"
    assert card["layouts"]["atlas_sites"] == sorted(Path(d).name for d, _ in seg2d_sites)
    assert all(len(a["spatial_size"]) == 2 and a["subjects"] == 2 for a in card["layouts"]["atlas"].values())
    assert net(torch.rand(1, 1, 32, 32)).shape == (1, card["classes"]["num_classes"], 32, 32)
    for montage in ("iter_000002.png", "iter_000002_layout.png"):  # the ensemble's labels and the layouts in colour
        rgb = np.asarray(Image.open(out / "montages" / montage).convert("RGB")).astype(int)
        assert (rgb.max(-1) - rgb.min(-1) > 0).any(), f"{montage} shows no label overlay"

    evaluation = tmp_path / "eval"
    models = [str(d) for d, _ in seg2d_sites]
    _ok(run_bundle("evaluation", "evaluate.json", {"models": models, "extra_models": {"central": str(out)},
                                                   "test_datalists": [str(seg2d_sites[0][1])], "output_dir": str(evaluation)}))
    metrics = json.loads((evaluation / "metrics.json").read_text())
    for model in ("central", "ensemble_weighted"):
        scores = metrics[model]["datalist"]  # the test set is named by its file's stem
        assert scores["n"] == 2 and 0.0 <= scores["mean_dice"] <= 1.0
        assert set(scores["dice"]) == set(card["classes"]["names"][1:])  # every foreground class, background left out
