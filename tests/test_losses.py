"""Unit tests of monai_fedkd.losses (CPU, a few seconds)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import torch_threads

from monai_fedkd.losses import (
    AdversarialLoss,
    BalanceLoss,
    BatchNormStatisticsLoss,
    ConditionalCrossEntropyLoss,
    ConsensusLoss,
    DistillationLoss,
    DiversityLoss,
    EntropyLoss,
    TotalVariationLoss,
    bn_statistics_loss,
    class_balance_weights,
    class_prior_from_counts,
    ensemble_log_probabilities,
    ensemble_probabilities,
    generalized_js_divergence,
    has_batchnorm,
    site_weights,
    withheld_sites,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def num(t) -> float:
    """A Python float of a (possibly graph-carrying) scalar tensor."""
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


# ------------------------------------------------------------------------------------------ Jensen-Shannon
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4, 5, 6)])
def test_js_zero_when_sites_agree(shape):
    f = torch.randn(shape) * 5
    value = ConsensusLoss()([f, f.clone(), f.clone()])
    assert abs(num(value)) < 1e-6
    assert num(generalized_js_divergence([f, f], normalize=False).abs().max()) < 1e-6


@pytest.mark.parametrize("scale", [1.0, 10.0, 1e4])
def test_js_normalised_in_unit_interval(scale):
    sites = [torch.randn(16, 5, 3, 3) * scale for _ in range(4)]
    per_element = generalized_js_divergence(sites, normalize=True)
    assert per_element.shape == (16, 3, 3)
    assert _finite(per_element)
    assert num(per_element.min()) >= 0.0
    assert num(per_element.max()) <= 1.0 + 1e-6
    # maximal disagreement: K = N sites, each certain of a different class -> log K, i.e. 1 normalised
    eye = torch.eye(4).unsqueeze(1) * 1e4  # (K=4, B=1, N=4)
    assert num(ConsensusLoss()(eye)) == pytest.approx(1.0, abs=1e-5)
    assert num(ConsensusLoss(normalize=False)(eye)) == pytest.approx(math.log(4), abs=1e-5)


def test_js_closed_form_two_sites_two_classes():
    p1, p2 = (0.9, 0.1), (0.2, 0.8)
    f1 = torch.tensor([[math.log(p1[0]), math.log(p1[1])]])
    f2 = torch.tensor([[math.log(p2[0]), math.log(p2[1])]])

    def h(p):
        return -sum(x * math.log(x) for x in p)

    m = ((p1[0] + p2[0]) / 2, (p1[1] + p2[1]) / 2)
    expected = h(m) - 0.5 * (h(p1) + h(p2))  # = 0.5 KL(p1||m) + 0.5 KL(p2||m)
    assert num(ConsensusLoss(normalize=False)([f1, f2])) == pytest.approx(expected, rel=1e-5)
    assert num(ConsensusLoss(normalize=True)([f1, f2])) == pytest.approx(expected / math.log(2), rel=1e-5)
    assert num(ConsensusLoss(weight=3.0, normalize=False)([f1, f2])) == pytest.approx(3 * expected, rel=1e-5)
    # weighted mixture pi = (0.25, 0.75)
    mw = (0.25 * p1[0] + 0.75 * p2[0], 0.25 * p1[1] + 0.75 * p2[1])
    expected_w = h(mw) - 0.25 * h(p1) - 0.75 * h(p2)
    got = ConsensusLoss(normalize=False, site_weights=[1.0, 3.0])([f1, f2])
    assert num(got) == pytest.approx(expected_w, rel=1e-5)


def test_js_gradients_finite_for_huge_logits_and_nonzero_on_disagreement():
    huge = [(torch.randn(8, 4, 5, 5).sign() * 1e4 * torch.rand(8, 4, 5, 5)).requires_grad_() for _ in range(3)]
    ConsensusLoss()(huge).backward()
    for f in huge:
        assert f.grad is not None and _finite(f.grad)
    moderate = [torch.randn(8, 4, requires_grad=True) for _ in range(3)]
    ConsensusLoss()(moderate).backward()
    for f in moderate:
        assert num(f.grad.abs().sum()) > 0


def test_js_symmetric_in_site_order():
    sites = [torch.randn(6, 3, 4, 4) for _ in range(3)]
    a = ConsensusLoss(reduction="none")(sites)
    b = ConsensusLoss(reduction="none")([sites[2], sites[0], sites[1]])
    assert torch.allclose(a, b, atol=1e-6)
    stacked = torch.stack(sites)
    assert torch.allclose(ConsensusLoss(reduction="none")(stacked), a, atol=1e-7)

def test_js_voxel_stride_takes_one_lattice_per_call_and_estimates_the_mean():
    g = torch.Generator().manual_seed(0)
    sites = torch.randn(3, 2, 4, 8, 8, 8, generator=g) * 2  # (K, B, N, D, H, W)
    full = ConsensusLoss(reduction="none")(sites)
    strided = ConsensusLoss(voxel_stride=2)
    # the value is the mean over exactly one of the 8 lattices (offset per axis in {0, 1})
    lattices = {(a, b, c): num(full[:, a::2, b::2, c::2].mean()) for a in (0, 1) for b in (0, 1) for c in (0, 1)}
    seen = set()
    for seed in range(40):
        value = num(strided(sites, generator=torch.Generator().manual_seed(seed)))
        match = [k for k, v in lattices.items() if v == pytest.approx(value, rel=1e-5)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 4  # the offset is random, not fixed
    # unbiased: the lattice means average to the full mean; "sum" is rescaled to the full voxel count
    assert sum(lattices.values()) / 8 == pytest.approx(num(full.mean()), rel=1e-5)
    lattice_sum = num(ConsensusLoss(voxel_stride=2, reduction="sum")(sites, generator=torch.Generator().manual_seed(3)))
    offsets = torch.randint(2, (3,), generator=torch.Generator().manual_seed(3)).tolist()
    assert lattice_sum == pytest.approx(8 * num(full[:, offsets[0]::2, offsets[1]::2, offsets[2]::2].sum()), rel=1e-5)
    # gradients reach only the lattice's voxels
    x = sites.clone().requires_grad_()
    ConsensusLoss(voxel_stride=2)(x, generator=torch.Generator().manual_seed(3)).backward()
    touched = (x.grad.abs().sum((0, 1, 2)) > 0)
    assert int(touched.sum()) == 4 * 4 * 4
    assert touched[offsets[0]::2, offsets[1]::2, offsets[2]::2].all()
    # classification outputs (no spatial axes) are unaffected; an axis shorter than the stride keeps a voxel
    logits = torch.randn(3, 5, 2, generator=g)
    assert num(ConsensusLoss(voxel_stride=4)(logits)) == pytest.approx(num(ConsensusLoss()(logits)), rel=1e-6)
    thin = torch.randn(3, 2, 4, 1, 6, generator=g)
    assert torch.isfinite(ConsensusLoss(voxel_stride=2)(thin, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("stride", [0, 1.5, True])
def test_js_voxel_stride_rejects_non_integers_and_per_voxel_output(stride):
    with pytest.raises(ValueError, match="voxel_stride"):
        ConsensusLoss(voxel_stride=stride)
    with pytest.raises(ValueError, match="reduction"):
        ConsensusLoss(voxel_stride=2, reduction="none")


# ------------------------------------------------------------------------------------------- site weights
def test_site_weights_columns_sum_to_one_and_expert_gets_one():
    counts = [[10, 0, 5], [30, 4, 0], [60, 0, 0]]
    w = site_weights(counts, 3)
    assert w.shape == (3, 3)
    assert torch.allclose(w.sum(0), torch.ones(3))
    assert torch.allclose(w[:, 0], torch.tensor([0.1, 0.3, 0.6]))
    assert num(w[1, 1]) == pytest.approx(1.0)  # site 1 holds all of class 1
    assert num(w[0, 2]) == pytest.approx(1.0)
    assert withheld_sites(counts) == []


def test_site_weights_withheld_site_and_empty_class():
    counts = [[10, 0, 0], None, [30, 5, 0]]
    w = site_weights(counts, 3)
    assert withheld_sites(counts) == [1]
    assert torch.allclose(w.sum(0), torch.ones(3))
    assert torch.allclose(w[1], torch.full((3,), 1 / 3))
    # the two sites with counts share the remaining 2/3 in proportion to their counts
    assert torch.allclose(w[[0, 2], 0], torch.tensor([2 / 3 * 0.25, 2 / 3 * 0.75]))
    assert torch.allclose(w[[0, 2], 1], torch.tensor([0.0, 2 / 3]))
    assert torch.allclose(w[:, 2], torch.full((3,), 1 / 3))  # nobody has class 2
    assert torch.allclose(site_weights([None, None], 4), torch.full((2, 4), 0.5))
    with pytest.raises(ValueError):
        site_weights([[1, 2], [1, 2, 3]], 2)
    with pytest.raises(ValueError):
        site_weights([[1, -2]], 2)


def test_site_weights_segmentation_voxel_counts():
    counts = [[2_000_000, 40_000, 0], [1_000_000, 0, 6_000], [1_000_000, 40_000, 2_000]]
    w = site_weights(counts, 3)
    assert torch.allclose(w.sum(0), torch.ones(3))
    assert torch.allclose(w[:, 0], torch.tensor([0.5, 0.25, 0.25]))
    assert torch.allclose(w[:, 1], torch.tensor([0.5, 0.0, 0.5]))
    assert torch.allclose(w[:, 2], torch.tensor([0.0, 0.75, 0.25]))


def test_class_prior_from_counts():
    prior = class_prior_from_counts([[3, 1, 0], None, [1, 1, 2]])
    assert torch.allclose(prior, torch.tensor([0.5, 0.25, 0.25]))
    assert torch.allclose(class_prior_from_counts([None, None], num_classes=4), torch.full((4,), 0.25))
    with pytest.raises(ValueError):
        class_prior_from_counts([None])


# ---------------------------------------------------------------------------------------------- ensemble
def test_ensemble_plain_mean_and_one_hot_weights():
    sites = [torch.randn(5, 4, 3, 3) * 3 for _ in range(3)]
    mean = torch.stack([torch.softmax(f, 1) for f in sites]).mean(0)
    assert torch.allclose(ensemble_probabilities(sites), mean, atol=1e-6)
    assert torch.allclose(ensemble_probabilities(torch.stack(sites)), mean, atol=1e-6)
    one_hot = torch.zeros(3, 4)
    one_hot[1] = 1.0
    assert torch.allclose(ensemble_probabilities(sites, one_hot), torch.softmax(sites[1], 1), atol=1e-6)
    # temperature applies to each site's logits
    mean_t = torch.stack([torch.softmax(f / 2.0, 1) for f in sites]).mean(0)
    assert torch.allclose(ensemble_probabilities(sites, temperature=2.0), mean_t, atol=1e-6)


def test_ensemble_class_share_weights_match_renormalised_sum():
    sites = [torch.randn(6, 3) for _ in range(2)]
    w = site_weights([[10, 0, 5], [30, 4, 5]], 3)
    probs = torch.stack([torch.softmax(f, 1) for f in sites])
    mixed = (w[:, None, :] * probs).sum(0)
    expected = mixed / mixed.sum(1, keepdim=True)
    got = ensemble_probabilities(sites, w)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(ensemble_log_probabilities(sites, w).exp().sum(1), torch.ones(6), atol=1e-6)


def test_ensemble_product_keeps_what_one_class_sites_tell_apart():
    """Two sites that each saw one class answer it with near certainty on both inputs; only their log-odds differ
    (each is less sure of its class on the input of the other). The mixture of their probabilities ranks the two
    inputs alike; their product (geometric mean) ranks the second input far above the first."""
    normal_site = torch.tensor([[20.0, 0.0], [10.0, 0.0]])  # logits (normal, pneumonia) on inputs 1 and 2
    pneumonia_site = torch.tensor([[0.0, 10.0], [0.0, 20.0]])
    sites = [normal_site, pneumonia_site]
    mixture = ensemble_probabilities(sites)[:, 1]
    product = ensemble_probabilities(sites, combination="product")[:, 1]
    assert float(mixture[1] - mixture[0]) < 1e-3
    assert float(product[1] - product[0]) > 0.9
    # the product is the renormalised geometric mean of the sites' probabilities
    logits = [torch.randn(5, 4, 3, 3) * 3 for _ in range(3)]
    geometric = torch.stack([torch.softmax(f, 1) for f in logits]).prod(0) ** (1 / 3)
    torch.testing.assert_close(ensemble_probabilities(logits, combination="product"), geometric / geometric.sum(1, keepdim=True))
    # per-class weights: a site with weight 0 for every class has no say; the result is a distribution
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 1.0, 1.0]])
    without = ensemble_log_probabilities([logits[0], torch.randn(5, 4, 3, 3) * 9, logits[2]], w, combination="product")
    torch.testing.assert_close(without, ensemble_log_probabilities(logits, w, combination="product"))
    torch.testing.assert_close(without.exp().sum(1), torch.ones(5, 3, 3))
    with pytest.raises(ValueError, match="combination must be one of"):
        ensemble_log_probabilities(logits, combination="median")


def test_ensemble_huge_logits_finite_gradients():
    sites = [(torch.randn(4, 3, 2, 2) * 1e4).requires_grad_() for _ in range(3)]
    w = site_weights([[1, 0, 0], [0, 1, 0], [1, 1, 1]], 3)
    log_p = ensemble_log_probabilities(sites, w)
    assert _finite(log_p)
    log_p.sum().backward()
    for f in sites:
        assert _finite(f.grad)


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4, 2, 2)])
def test_closed_form_gradients_of_js_and_mixture_match_finite_differences(shape):
    """The consensus and the mixture ensemble carry hand-written backward passes (for speed): numerical
    gradients, with a zero-weight site (consensus) and a site withheld from one class (ensemble), check them."""
    logits = (torch.randn(3, *shape, dtype=torch.double) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda f: generalized_js_divergence(f, [0.5, 0.0, 0.5], temperature=2.0), (logits,))
    w = site_weights([[4, 0, 1], [1, 3, 1], [0, 2, 5]], 3).double()
    for weights in (w, None):
        assert torch.autograd.gradcheck(lambda f: ensemble_log_probabilities(f, weights, temperature=0.5), (logits,))


# ------------------------------------------------------------------------------------------- distillation
def test_distillation_kl_zero_on_match_positive_otherwise():
    student = torch.randn(8, 5)
    teacher = torch.softmax(student, 1)
    assert abs(num(DistillationLoss()(student, teacher))) < 1e-6
    other = torch.softmax(torch.randn(8, 5), 1)
    value = DistillationLoss()(student, other)
    expected = F.kl_div(torch.log_softmax(student, 1), other, reduction="batchmean")
    assert num(value) > 0
    assert num(value) == pytest.approx(num(expected), rel=1e-5)
    # teacher given as log-probabilities or logits gives the same value
    log_other = other.log()
    assert num(DistillationLoss(teacher_input="log_probs")(student, log_other)) == pytest.approx(num(value), rel=1e-5)
    assert num(DistillationLoss(teacher_input="logits")(student, log_other)) == pytest.approx(num(value), rel=1e-5)


def test_distillation_temperature_squared_scaling():
    student, teacher_logits = torch.randn(6, 4), torch.randn(6, 4)
    t = 3.0
    teacher = torch.softmax(teacher_logits / t, 1)
    kl = F.kl_div(torch.log_softmax(student / t, 1), teacher, reduction="batchmean")
    value = DistillationLoss(temperature=t)(student, teacher)
    assert num(value) == pytest.approx(t * t * num(kl), rel=1e-5)
    assert num(DistillationLoss(weight=0.5, temperature=t)(student, teacher)) == pytest.approx(0.5 * num(value), rel=1e-6)


def test_distillation_mse_equals_mse_loss():
    student, teacher = torch.randn(4, 3, 5, 5, 5), torch.randn(4, 3, 5, 5, 5)
    value = DistillationLoss(mode="mse")(student, teacher)
    assert num(value) == pytest.approx(num(F.mse_loss(student, teacher)), rel=1e-6)
    with pytest.raises(ValueError):
        DistillationLoss(mode="mse", teacher_input="probs")


def test_distillation_voxelwise_shapes():
    student = torch.randn(2, 4, 3, 5, 6, requires_grad=True)
    teacher = ensemble_probabilities([torch.randn(2, 4, 3, 5, 6) for _ in range(3)])
    per_voxel = DistillationLoss(reduction="none")(student, teacher)
    assert per_voxel.shape == (2, 3, 5, 6)
    value = DistillationLoss()(student, teacher)
    assert value.detach().item() == pytest.approx(per_voxel.mean().detach().item(), rel=1e-6)
    value.backward()
    assert _finite(student.grad) and num(student.grad.abs().sum()) > 0
    # a one-hot teacher (zeros) and saturated student stay finite
    hard = F.one_hot(torch.randint(0, 4, (2, 3, 5, 6)), 4).permute(0, 4, 1, 2, 3).float()
    assert _finite(DistillationLoss()(student.detach() * 1e4, hard))


def test_distillation_dice_weighs_a_small_structure_like_a_large_one():
    """The same number of voxels wrong costs the same KL whatever class they belong to; with the Dice term, losing a
    small structure costs more than eroding a large one by as many voxels."""
    labels = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    labels[:, :4] = 1  # a large structure (256 voxels)
    labels[:, 7, 7, :4] = 2  # a small one (4 voxels)
    teacher = F.one_hot(labels, 3).movedim(-1, 1).float() * 0.97 + 0.01
    def student_with(wrong):  # logits matching the teacher except at ``wrong``, answered as background
        answer = labels.clone()
        answer[wrong] = 0
        return torch.log(F.one_hot(answer, 3).movedim(-1, 1).float() * 0.97 + 0.01)
    small_lost = student_with(labels == 2)
    large_eroded = student_with((labels == 1) & (torch.arange(512).reshape(1, 8, 8, 8) < 4))
    kl, with_dice = DistillationLoss(), DistillationLoss(dice_weight=1.0)
    assert num(kl(small_lost, teacher)) == pytest.approx(num(kl(large_eroded, teacher)), rel=1e-5)
    dice_cost = {k: num(with_dice(x, teacher)) - num(kl(x, teacher)) for k, x in (("small", small_lost), ("large", large_eroded))}
    assert dice_cost["small"] > 0.1 and dice_cost["small"] > 10 * dice_cost["large"], dice_cost
    # matching the teacher costs nothing in either term, whatever form the teacher is given in
    assert abs(num(with_dice(teacher.log(), teacher))) < 1e-5
    assert abs(num(DistillationLoss(dice_weight=1.0, teacher_input="log_probs")(teacher.log(), teacher.log()))) < 1e-5
    student = small_lost.clone().requires_grad_(True)
    with_dice(student, teacher).backward()
    assert _finite(student.grad)
    with pytest.raises(ValueError, match="dice_weight must be >= 0"):
        DistillationLoss(dice_weight=-1.0)
    with pytest.raises(ValueError, match="mode='kl' and reduction='mean'"):
        DistillationLoss(dice_weight=1.0, mode="mse")
    with pytest.raises(ValueError, match="mode='kl' and reduction='mean'"):
        DistillationLoss(dice_weight=1.0, reduction="none")
    with pytest.raises(ValueError, match="segmentation logits"):
        with_dice(torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1))


def test_weight_zero_keeps_graph():
    f = torch.randn(4, 3, requires_grad=True)
    value = ConsensusLoss(weight=0.0)([f, f * 2])
    assert value.detach().item() == 0.0 and value.requires_grad
    value.backward()
    assert num(f.grad.abs().sum()) == 0.0


# ------------------------------------------------------------------------------------------------ entropy
def test_entropy_bounds_and_per_site():
    n = 6
    equal = torch.zeros(3, n, 4, 4)
    assert num(EntropyLoss()(equal)) == pytest.approx(math.log(n), rel=1e-6)
    confident = torch.zeros(3, n)
    confident[:, 2] = 1e4
    assert num(EntropyLoss()(confident)) == pytest.approx(0.0, abs=1e-6)
    per_site = EntropyLoss(weight=2.0)([equal[:, :, 0, 0], confident])
    assert per_site.shape == (2,)
    assert torch.allclose(per_site, torch.tensor([2 * math.log(n), 0.0]), atol=1e-5)
    f = (torch.randn(5, n) * 1e4).requires_grad_()
    EntropyLoss()(f).backward()
    assert _finite(f.grad)


# ------------------------------------------------------------------------------------------------ balance
def test_balance_zero_when_batch_mean_equals_prior():
    n = 4
    logits = torch.eye(n) * 3.0  # sample i favours class i: by symmetry the batch mean is uniform
    log_p = torch.log_softmax(logits, 1)
    assert abs(num(BalanceLoss()(log_p))) < 1e-6
    prior = torch.tensor([0.4, 0.3, 0.2, 0.1])
    probs = prior.expand(5, n).clone()
    assert abs(num(BalanceLoss(prior=prior)(probs.log()))) < 1e-6
    assert abs(num(BalanceLoss(prior=prior, input_type="probs")(probs))) < 1e-6
    # segmentation: pooled over samples and voxels
    seg = prior.reshape(1, n, 1, 1, 1).expand(2, n, 3, 3, 3).log()
    assert abs(num(BalanceLoss(prior=prior * 7)(seg))) < 1e-6
    assert num(BalanceLoss(prior=prior)(torch.log_softmax(torch.randn(2, n, 3, 3, 3), 1))) > 0


@pytest.mark.parametrize("scale", [30.0, 1e4])
def test_balance_collapse_gives_finite_positive_value_and_gradient(scale):
    n, k = 3, 2
    collapsed = torch.zeros(k, 8, n, 4, 4)
    collapsed[:, :, 0] = scale  # every site and sample confidently predicts class 0
    sites = collapsed.clone().requires_grad_()
    log_p = ensemble_log_probabilities(sites)
    value = BalanceLoss()(log_p)
    assert _finite(value) and value.detach().item() > 0
    value.backward()
    assert _finite(sites.grad)
    assert num(sites.grad.abs().sum()) > 0
    # gradient pushes the unused classes up: d value / d f_c < 0 for c = 1, 2
    assert num(sites.grad[:, :, 1:].max()) < 0


# ------------------------------------------------------------------------------------------ conditional CE
def test_conditional_ce_matches_nll_classification_and_voxelwise():
    sites = [torch.randn(6, 4, requires_grad=True) for _ in range(2)]
    log_p = ensemble_log_probabilities(sites)
    target = torch.randint(0, 4, (6,))
    value = ConditionalCrossEntropyLoss()(log_p, target)
    assert num(value) == pytest.approx(num(F.nll_loss(log_p, target)), rel=1e-6)
    value.backward()
    assert all(num(f.grad.abs().sum()) > 0 for f in sites)

    seg = ensemble_log_probabilities([torch.randn(2, 3, 4, 5, 6) for _ in range(2)])
    target = torch.randint(0, 3, (2, 4, 5, 6))
    expected = F.nll_loss(seg, target)
    assert num(ConditionalCrossEntropyLoss()(seg, target)) == pytest.approx(num(expected), rel=1e-6)
    assert num(ConditionalCrossEntropyLoss()(seg, target.unsqueeze(1).float())) == pytest.approx(num(expected), rel=1e-6)
    assert ConditionalCrossEntropyLoss(reduction="none")(seg, target).shape == (2, 4, 5, 6)


def test_conditional_ce_soft_targets():
    sites = [torch.randn(5, 3, requires_grad=True) for _ in range(2)]
    log_p = ensemble_log_probabilities(sites)
    soft = torch.softmax(torch.randn(5, 3), 1)
    value = ConditionalCrossEntropyLoss()(log_p, soft)
    assert num(value) == pytest.approx(num(-(soft * log_p).sum(1).mean()), rel=1e-6)
    # one-hot soft targets give the hard-label value
    hard = torch.tensor([0, 2, 1, 1, 0])
    assert num(ConditionalCrossEntropyLoss()(log_p, F.one_hot(hard, 3).float())) == pytest.approx(num(F.nll_loss(log_p, hard)), rel=1e-6)
    # the minimum over ensembles is reached where the ensemble reproduces the soft target
    at_target = ConditionalCrossEntropyLoss()(soft.log(), soft)
    assert num(at_target) < num(value)
    value.backward()
    assert all(_finite(f.grad) and num(f.grad.abs().sum()) > 0 for f in sites)
    with pytest.raises(ValueError, match="soft target"):
        ConditionalCrossEntropyLoss()(log_p, torch.rand(5, 2))


def test_class_balance_weights_keep_the_scale_and_rebalance_the_classes():
    prior = torch.tensor([0.90, 0.08, 0.02, 0.0])
    w = class_balance_weights(prior, power=1.0)
    assert num((prior * w).sum()) == pytest.approx(1.0)  # the prior-weighted mean weight is 1: the loss keeps its scale
    # power 1: every seen class carries the same total weight; a class never seen gets none
    assert (prior[:3] * w[:3]).tolist() == pytest.approx([1 / 3] * 3) and num(w[3]) == 0.0
    half = class_balance_weights(prior.tolist(), power=0.5)
    assert num(half[2] / half[0]) == pytest.approx(math.sqrt(0.90 / 0.02))
    assert class_balance_weights(prior, power=0.0)[:3].tolist() == pytest.approx([1.0] * 3)
    for bad in ([0.5, -0.1], [0.0, 0.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match="prior must be"):
            class_balance_weights(bad)
    with pytest.raises(ValueError, match="power must be"):
        class_balance_weights(prior, power=-1.0)


def test_conditional_ce_class_weights_are_a_weighted_mean_over_voxels():
    seg = ensemble_log_probabilities([torch.randn(2, 3, 4, 5, 6, requires_grad=True) for _ in range(2)])
    target = torch.randint(0, 3, (2, 4, 5, 6))
    w = torch.tensor([0.2, 1.0, 5.0])
    per_voxel = -seg.gather(1, target[:, None])[:, 0]
    expected = (w[target] * per_voxel).sum() / w[target].sum()
    assert num(ConditionalCrossEntropyLoss(class_weights=w)(seg, target)) == pytest.approx(num(expected), rel=1e-5)
    # a class of weight 0 drops out: only the other classes' voxels count
    only_fg = ConditionalCrossEntropyLoss(class_weights=[0.0, 1.0, 1.0])(seg, target)
    assert num(only_fg) == pytest.approx(num(per_voxel[target > 0].mean()), rel=1e-5)
    # soft (classification) targets: weighted by the target-weighted class weight, one-hot gives the hard value
    log_p = ensemble_log_probabilities([torch.randn(5, 3) for _ in range(2)])
    hard = torch.tensor([0, 2, 1, 1, 0])
    weighted = ConditionalCrossEntropyLoss(class_weights=w)
    assert num(weighted(log_p, F.one_hot(hard, 3).float())) == pytest.approx(num(F.nll_loss(log_p, hard, weight=w)), rel=1e-5)
    with pytest.raises(ValueError, match="3 class_weights for 4 classes"):
        weighted(ensemble_log_probabilities([torch.randn(2, 4, 3, 3)]), torch.zeros(2, 3, 3, dtype=torch.long))
    for bad in ([1.0, -1.0], [0.0, 0.0], [float("inf"), 1.0]):
        with pytest.raises(ValueError, match="class_weights must be"):
            ConditionalCrossEntropyLoss(class_weights=bad)


# --------------------------------------------------------------------------------------------- adversarial
def test_adversarial_bounds_mask_and_no_student_gradient():
    weight = 0.7
    student = torch.tensor([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0]], requires_grad=True)
    site = torch.tensor([[1.0, 0.5, 0.0], [4.0, 0.0, 0.0]], requires_grad=True)  # agrees on 0, disagrees on 1
    log_ens = ensemble_log_probabilities([site])
    per_sample = AdversarialLoss(weight=weight, reduction="none")(student, log_ens)
    assert num(per_sample[1]) == 0.0  # masked: argmax differs
    assert -weight < num(per_sample[0]) < 0.0
    value = AdversarialLoss(weight=weight)(student, log_ens)
    assert -weight <= num(value) <= 0.0
    value.backward()
    assert student.grad is None
    assert site.grad is not None and num(site.grad[0].abs().sum()) > 0
    assert num(site.grad[1].abs().sum()) == 0.0


def test_adversarial_bounded_for_huge_logits_voxelwise():
    student = torch.randn(2, 3, 4, 4, 4) * 1e4
    sites = [(torch.randn(2, 3, 4, 4, 4) * 1e4).requires_grad_() for _ in range(2)]
    for bound in ("exp", "tanh"):
        value = AdversarialLoss(weight=2.0, bound=bound)(student, ensemble_log_probabilities(sites))
        assert -2.0 <= num(value) <= 0.0
        value.backward()
        assert all(_finite(f.grad) for f in sites)


def test_adversarial_probability_input_and_input_kind_checks():
    student = torch.randn(5, 3, 4, 4)
    sites = [torch.randn(5, 3, 4, 4) for _ in range(2)]
    log_ens = ensemble_log_probabilities(sites)
    a = AdversarialLoss()(student, log_ens)
    b = AdversarialLoss(ensemble_input="probs")(student, log_ens.exp())
    assert num(a) == pytest.approx(num(b), rel=1e-5)
    with pytest.raises(ValueError, match="log-probabilities"):
        AdversarialLoss()(student, log_ens.exp())  # probabilities where log-probabilities are expected
    with pytest.raises(ValueError, match="log-probabilities"):
        BalanceLoss()(log_ens.exp())
    with pytest.raises(ValueError, match="log-probabilities"):
        ConditionalCrossEntropyLoss()(log_ens.exp(), torch.zeros(5, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="probabilities in"):
        DistillationLoss()(student, log_ens)  # log-probabilities where probabilities are expected


# ---------------------------------------------------------------------------------------- image priors
@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 2, 4, 5, 6)])
def test_total_variation(shape):
    tv = TotalVariationLoss()
    assert num(tv(torch.full(shape, 3.0))) == 0.0
    x = torch.randn(shape, requires_grad=True)
    value = tv(x)
    assert num(value) > 0
    value.backward()
    assert _finite(x.grad)
    # a ramp along the last axis: |difference| = 1 there, 0 elsewhere
    ramp = torch.arange(shape[-1], dtype=torch.float32).expand(shape)
    assert num(tv(ramp)) == pytest.approx(1.0)
    assert tv.__class__(reduction="none")(x).shape == (shape[0],)


def test_diversity_zero_for_identical_inputs_and_rewards_spread():
    z = torch.randn(6, 8)
    same = torch.full((6, 1, 5, 5), 0.3, requires_grad=True)
    value = DiversityLoss()(same, z)
    assert num(value) == 0.0
    value.backward()
    assert _finite(same.grad)
    spread = torch.rand(6, 1, 5, 5)
    assert num(DiversityLoss()(spread, z)) < 0
    assert num(DiversityLoss()(2 * spread, z)) == pytest.approx(2 * num(DiversityLoss()(spread, z)), rel=1e-5)
    # pairs are taken within a class only: two classes, each with identical members -> zero
    two = torch.cat([torch.zeros(3, 1, 5, 5), torch.ones(3, 1, 5, 5)])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert num(DiversityLoss()(two, z, labels)) == 0.0
    assert num(DiversityLoss()(two, z)) < 0
    assert num(DiversityLoss()(two[:2], z[:2], torch.tensor([0, 1]))) == 0.0  # no same-class pair
    x = torch.rand(6, 1, 5, 5, requires_grad=True)
    (DiversityLoss(weight=0.5)(x, z)).backward()
    assert _finite(x.grad) and num(x.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="samples"):
        DiversityLoss()(x, z[:3])


def test_diversity_gradient_repeats_bit_for_bit_on_several_threads():
    # every sample is in many pairs: a backward that accumulates repeated indices with atomics on several CPU
    # threads (x[i] does) gives a different last bit most times, and the whole distillation then stops repeating
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(32, 1, 28, 28, generator=g), torch.randn(32, 8, generator=g)

    def grad():
        x = x0.clone().requires_grad_()
        DiversityLoss()(x, z).backward()
        return x.grad

    with torch_threads(2):
        first = grad()
        assert all(torch.equal(first, grad()) for _ in range(30))


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def test_bn_statistics_zero_on_matching_stats_positive_otherwise():
    net = _BNNet().eval()
    x = torch.randn(4, 1, 6, 6, 6)
    with torch.no_grad():
        h = net.conv(x)
        net.bn.running_mean.copy_(h.mean((0, 2, 3, 4)))
        net.bn.running_var.copy_(h.var((0, 2, 3, 4), unbiased=False))
    assert num(bn_statistics_loss(net, x)) < 1e-5

    x_other = (torch.randn(4, 1, 6, 6, 6) * 3 + 1).requires_grad_()
    reference = num(bn_statistics_loss(net, x_other))
    loss = BatchNormStatisticsLoss(weight=2.0)
    assert loss.attach(net) == 1
    net(x_other)
    value = loss()
    assert num(value) > 0.1
    assert num(value) == pytest.approx(2 * reference, rel=1e-5)
    value.backward()
    assert _finite(x_other.grad) and num(x_other.grad.abs().sum()) > 0
    assert loss() is None  # records cleared after each call
    net(x_other)
    loss.reset()  # alias of clear()
    assert loss.value() is None
    net(x_other)
    assert num(loss.value()) == pytest.approx(2 * reference, rel=1e-5)
    loss.detach()
    net(x_other)
    assert loss() is None  # hooks removed


def test_has_batchnorm():
    from monai.networks.nets import UNet

    unet = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1, norm="instance")
    assert not has_batchnorm(unet)
    assert bn_statistics_loss(unet, torch.randn(1, 1, 8, 8, 8)) is None
    assert has_batchnorm(_BNNet())


def test_contrast_counts_silence_sites_of_one_class():
    from monai_fedkd.losses import contrast_counts, site_weights

    # Dirichlet alpha 0.1: two sites of one class each, one mixed site, one that withholds its counts
    counts = [[959, 0], [0, 3412], [254, 30], None]
    contrast = contrast_counts(counts)
    assert contrast[0] == [0.0, 0.0] and contrast[1] == [0.0, 0.0] and contrast[3] is None
    assert contrast[2] == pytest.approx([2 * 254 * 30 / 284] * 2)
    assert contrast_counts([[50, 50]])[0] == [50.0, 50.0], "a balanced site keeps its size"
    w = site_weights(contrast, 2)
    # by counts the one-class sites would own their class; by contrast the mixed site and the withheld one share it
    assert site_weights(counts, 2)[1, 1] > 0.7 and w[1, 1] == 0
    torch.testing.assert_close(w[2], torch.tensor([0.75, 0.75]))
    torch.testing.assert_close(w[3], torch.tensor([0.25, 0.25]))
    # no site contrasts any class: every site counts the same
    torch.testing.assert_close(site_weights(contrast_counts([[5, 0], [0, 7]]), 2), torch.full((2, 2), 0.5))
