"""Generator (monai_fedkd.networks.generators) and site discriminators (monai_fedkd.networks.discriminators)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_fedkd.networks import build_network, generators, network_definition
from monai_fedkd.networks.discriminators import (
    MultiScaleDiscriminator,
    PatchDiscriminatorScore,
    build_discriminator,
    discriminator_loss,
    patch_output_size,
    realism_loss,
)
from monai_fedkd.networks.generators import ConditionalGenerator, LinearUpsample, default_num_upsamples

GEN = "monai_fedkd.networks.generators.ConditionalGenerator"


def small(spatial_size, out_channels=1, **kwargs) -> ConditionalGenerator:
    kwargs = {"latent_dim": 16, "base_channels": 8, **kwargs}
    return ConditionalGenerator(len(spatial_size), out_channels, spatial_size, **kwargs)


# ---- generator ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spatial_size, out_channels, num_classes",
    [([28, 28], 1, 2), ([28, 28], 3, 5), ([28, 28, 28], 1, 2), ([48, 48, 32], 1, None), ([40, 32, 32], 2, 3), ([30, 17], 1, 4)],
)
def test_output_shape_and_range(spatial_size, out_channels, num_classes):
    torch.manual_seed(0)
    g = small(spatial_size, out_channels, num_classes=num_classes, value_range=[-1.0, 2.0])
    z, labels = g.sample_inputs(2, torch.Generator().manual_seed(0))
    assert (labels is None) == (num_classes is None)
    x = g(z, labels)
    assert tuple(x.shape) == (2, out_channels, *spatial_size)
    assert x.min() >= -1.0 and x.max() <= 2.0
    # values are spread inside the range, not a constant volume
    assert x.std() > 1e-3


def test_seed_grid_for_odd_and_anisotropic_sizes():
    assert default_num_upsamples([28, 28]) == 2
    assert small([28, 28]).seed_size == [7, 7]
    assert small([48, 48, 32]).seed_size == [6, 6, 4]
    assert small([40, 32, 32]).seed_size == [5, 4, 4]
    g = small([27, 13], num_upsamples=3)  # ceil(27/8)=4, ceil(13/8)=2 -> 32x16 cropped to 27x13
    assert g.seed_size == [4, 2]
    assert tuple(g(torch.randn(1, 16)).shape) == (1, 1, 27, 13)


def test_extreme_values_stay_in_range():
    g = small([28, 28], value_range=[0.0, 1.0], init_mean=0.99)
    with torch.no_grad():
        g.final.bias.fill_(1e4)  # saturate the sigmoid
    x = g(torch.randn(2, 16))
    assert x.min() >= 0.0 and x.max() <= 1.0


@pytest.mark.parametrize("condition", ["label", "label_mul"])
def test_label_conditioning_changes_output(condition):
    torch.manual_seed(0)
    g = small([28, 28], num_classes=3, condition=condition).eval()
    z = torch.randn(1, 16).repeat(3, 1)
    x = g(z, torch.tensor([0, 1, 2]))
    assert (x[0] - x[1]).abs().max() > 1e-3 and (x[1] - x[2]).abs().max() > 1e-3
    same = g(z, torch.tensor([1, 1, 1]))
    assert torch.allclose(same[0], same[2])


def test_soft_labels_mix_class_embeddings():
    torch.manual_seed(0)
    g = small([28, 28], num_classes=3).eval()
    z = torch.randn(2, 16)
    hard = torch.tensor([0, 2])
    torch.testing.assert_close(g(z, torch.nn.functional.one_hot(hard, 3).float()), g(z, hard))
    half = torch.tensor([[0.5, 0.0, 0.5], [0.5, 0.0, 0.5]])
    mixed = g(z, half)
    assert (mixed - g(z, torch.tensor([0, 0]))).abs().max() > 1e-4 and (mixed - g(z, torch.tensor([2, 2]))).abs().max() > 1e-4
    with pytest.raises(ValueError, match="soft labels"):
        g(z, torch.rand(2, 2))


def test_labels_required_when_conditioned():
    g = small([28, 28], num_classes=2)
    with pytest.raises(ValueError, match="labels"):
        g(torch.randn(2, 16))
    with pytest.raises(ValueError, match="z must have shape"):
        g(torch.randn(2, 15), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize(
    "spatial_size, value_range, init_mean",
    [([28, 28], [0.0, 1.0], 0.1), ([28, 28], [0.0, 1.0], 0.45), ([28, 28], [0.0, 1.0], 0.85), ([28, 28], [-1.0, 1.0], -0.6),
     ([28, 28, 28], [0.0, 1.0], 0.3)],
)
def test_init_mean(spatial_size, value_range, init_mean):
    torch.manual_seed(1)
    g = small(spatial_size, num_classes=2, value_range=value_range, init_mean=init_mean)
    z, labels = g.sample_inputs(4, torch.Generator().manual_seed(2))
    mean = float(g(z, labels).detach().mean())
    assert abs(mean - init_mean) < 0.1 * (value_range[1] - value_range[0]), mean


def test_init_mean_outside_range_is_refused():
    with pytest.raises(ValueError, match="init_mean"):
        small([28, 28], init_mean=1.5)


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
@pytest.mark.parametrize("spatial_size", [[28, 28], [12, 12, 8]])
def test_gradients_reach_every_parameter(norm, spatial_size):
    torch.manual_seed(0)
    g = small(spatial_size, num_classes=3, norm=norm)
    z = torch.randn(3, 16)
    x = g(z, torch.tensor([0, 1, 2]))
    (x * torch.randn_like(x)).sum().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_no_transposed_convolutions():
    for size in ([28, 28], [28, 28, 28]):
        g = small(size, num_classes=2)
        kinds = {type(m) for m in g.modules()}
        assert not any(issubclass(k, nn.modules.conv._ConvTransposeNd) for k in kinds)
        assert any(isinstance(m, LinearUpsample) for m in g.modules())


@pytest.mark.parametrize("spatial_dims, mode", [(2, "bilinear"), (3, "trilinear")])
def test_linear_upsample_matches_interpolate(spatial_dims, mode):
    x = torch.randn(2, 3, *[5, 4, 7][:spatial_dims])
    expected = F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)
    assert torch.allclose(LinearUpsample(spatial_dims)(x), expected, atol=1e-6)
    # the path taken off the CPU (deterministic CUDA backward) gives the same numbers and the same gradient
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight = torch.randn_like(expected)
    portable = generators._linear_upsample2_by_concat(a, spatial_dims)
    assert torch.allclose(portable, expected, atol=1e-6)
    (portable * weight).sum().backward()
    (LinearUpsample(spatial_dims)(b) * weight).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_replicate_padding_paths_agree(spatial_dims):
    x = torch.randn(2, 3, *[5, 4, 7][:spatial_dims])
    cpu = generators._replicate_pad1(x, spatial_dims)
    assert cpu.shape == (2, 3, *[s + 2 for s in x.shape[2:]])
    assert torch.equal(cpu, generators._replicate_pad1_by_concat(x, spatial_dims))
    for axis in range(2, 2 + spatial_dims):  # the border repeats the edge, on both sides of every axis
        n = cpu.shape[axis]
        assert torch.equal(cpu.narrow(axis, 0, 1), cpu.narrow(axis, 1, 1))
        assert torch.equal(cpu.narrow(axis, n - 1, 1), cpu.narrow(axis, n - 2, 1))


def test_deterministic_with_seeded_generator():
    def run():
        torch.manual_seed(123)
        g = small([12, 12, 8], num_classes=4)
        z, labels = g.sample_inputs(3, torch.Generator().manual_seed(7))
        x = g(z, labels)
        x.square().mean().backward()
        return z, labels, x.detach(), g.fc.weight.grad.clone()

    a, b = run(), run()
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    other = small([12, 12, 8], num_classes=4).sample_inputs(3, torch.Generator().manual_seed(8))
    assert not torch.equal(a[0], other[0])
    assert a[1].dtype == torch.long and a[1].min() >= 0 and a[1].max() < 4


def test_build_network_and_definition():
    kwargs = dict(spatial_dims=2, out_channels=1, spatial_size=[28, 28], num_classes=2, latent_dim=16,
                  base_channels=8, value_range=(0.0, 1.0), init_mean=0.4)
    net = build_network(GEN, **kwargs)
    assert isinstance(net, ConditionalGenerator)
    definition = network_definition(net)
    text = json.dumps(definition)
    assert json.loads(text)["value_range"] == [0.0, 1.0]
    assert definition["name"] == GEN
    rebuilt = build_network(**{k: v for k, v in json.loads(text).items() if k != "_target_"})
    rebuilt.load_state_dict(net.state_dict())
    net.eval(), rebuilt.eval()
    z, labels = net.sample_inputs(2, torch.Generator().manual_seed(0))
    assert torch.equal(net(z, labels), rebuilt(z, labels))


# ---- discriminators -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial_size, expected", [([28, 28], [5, 5]), ([28, 28, 28], [5, 5, 5]), ([48, 48, 48], [10, 10, 10])])
def test_patch_discriminator_map_shape(spatial_size, expected):
    torch.manual_seed(0)
    d = build_discriminator(len(spatial_size), 1, num_layers_d=2, channels=8)
    x = torch.rand(2, 1, *spatial_size)
    outputs = d(x)
    assert isinstance(outputs, list) and tuple(outputs[-1].shape) == (2, 1, *expected)
    score = PatchDiscriminatorScore(len(spatial_size), 1, num_layers_d=2, channels=8)
    assert tuple(score(x).shape) == (2, 1, *expected)
    assert patch_output_size(spatial_size) == expected == score.output_size(spatial_size)


def test_patch_discriminator_two_channels_2d():
    score = PatchDiscriminatorScore(2, 3, channels=8)
    assert tuple(score(torch.rand(1, 3, 28, 28)).shape) == (1, 1, 5, 5)


@pytest.mark.parametrize("mode", ["hinge", "bce", "lsgan"])
def test_discriminator_loss_prefers_high_real_low_fake(mode):
    high, low = (1.0, 0.0) if mode == "lsgan" else (3.0, -3.0)  # lsgan's targets are 1 (real) and 0 (fake)
    hi, lo = torch.full((2, 1, 5, 5), high), torch.full((2, 1, 5, 5), low)
    mid = torch.full((2, 1, 5, 5), 0.5 * (high + low))
    good = discriminator_loss(hi, lo, mode=mode)
    bad = discriminator_loss(lo, hi, mode=mode)
    assert good < discriminator_loss(mid, mid, mode=mode) < bad
    assert discriminator_loss(hi, lo, mode=mode) < discriminator_loss(hi, mid, mode=mode)


@pytest.mark.parametrize("mode", ["hinge", "bce", "lsgan"])
def test_realism_loss_decreases_with_fake_logits(mode):
    values = [float(realism_loss(torch.full((2, 1, 4, 4), v), mode=mode)) for v in (-2.0, -0.5, 0.0, 0.5)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    if mode == "hinge":
        assert values[-1] == pytest.approx(-0.5)
    if mode == "bce":
        assert values[2] == pytest.approx(F.softplus(torch.tensor(0.0)).item())


def test_realism_loss_gradient_pushes_fake_logits_up():
    fake = torch.zeros(2, 1, 3, 3, requires_grad=True)
    realism_loss(fake, mode="bce").backward()
    assert (fake.grad < 0).all()


def test_losses_accept_lists_and_raw_patch_output():
    torch.manual_seed(0)
    d = build_discriminator(2, 1, channels=8)
    x = torch.rand(2, 1, 28, 28)
    raw = d(x)
    assert torch.allclose(realism_loss(raw), realism_loss(raw[-1]))
    maps = [torch.full((2, 1, 5, 5), 1.0), torch.full((2, 1, 2, 2), 3.0)]
    assert float(realism_loss(maps)) == pytest.approx(-2.0)
    assert float(discriminator_loss(maps, [m * 0 - 1 for m in maps])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="B, 1"):
        realism_loss(torch.zeros(2, 4, 5, 5))
    with pytest.raises(ValueError, match="real maps"):
        discriminator_loss(maps, maps[:1])
    with pytest.raises(ValueError, match="mode"):
        realism_loss(maps, mode="wasserstein")


@pytest.mark.parametrize("spatial_size", [[28, 28], [28, 28, 28], [48, 48, 32]])
def test_multiscale_returns_one_map_per_scale(spatial_size):
    torch.manual_seed(0)
    d = MultiScaleDiscriminator(len(spatial_size), 1, num_scales=3, channels=4, spatial_size=spatial_size)
    maps = d(torch.rand(2, 1, *spatial_size))
    assert len(maps) == 3
    for m in maps:
        assert m.shape[:2] == (2, 1) and min(m.shape[2:]) >= 1
    assert maps[0].shape[2:] == torch.Size(patch_output_size(spatial_size))
    assert torch.isfinite(discriminator_loss(maps, maps)) and torch.isfinite(realism_loss(maps))


def test_multiscale_too_small_input_is_refused():
    with pytest.raises(ValueError, match="too small"):
        MultiScaleDiscriminator(2, 1, num_scales=4, spatial_size=[16, 16])


def test_discriminator_learns_to_separate():
    """A few Adam steps on bright real vs. dark fake images drive the D loss down."""
    torch.manual_seed(0)
    d = PatchDiscriminatorScore(2, 1, channels=4)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3)
    real = 0.7 + 0.1 * torch.rand(4, 1, 16, 16)
    fake = 0.3 + 0.1 * torch.rand(4, 1, 16, 16)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = discriminator_loss(d(real), d(fake), mode="hinge")
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
