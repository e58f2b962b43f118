"""Tests for monai_fedkd.data.acquisition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from monai_fedkd.data.acquisition import (
    AcquisitionShiftd,
    apply_acquisition_shift,
    default_site_shifts,
    validate_acquisition_params,
)

FULL = {"gamma": 1.3, "bias_strength": 0.3, "bias_order": 3, "downsample": 2.0, "blur_sigma": 0.8,
        "noise_std": 0.03, "seed": 11}


def meta_image(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    affine = torch.eye(len(shape))  # (spatial + 1) x (spatial + 1)
    affine[0, 0], affine[1, 1], affine[0, -1] = 0.7, 1.5, -20.0
    img = MetaTensor(torch.rand(shape, generator=g) * 200 - 50, affine=affine, meta={"filename_or_obj": "x.nii.gz"})
    return img


@pytest.mark.parametrize("params", [None, {}])
def test_identity_without_params(params):
    img = meta_image((1, 8, 8))
    data = {"image": img, "label": 1}
    if params is not None:
        data["acquisition"] = params
    out = AcquisitionShiftd(keys="image")(data)
    assert out["image"] is img
    assert apply_acquisition_shift(img, params) is img
    out = AcquisitionShiftd(keys="image")({"image": img})  # no params key at all
    assert out["image"] is img


@pytest.mark.parametrize("shape", [(1, 20, 24), (3, 20, 24), (2, 12, 10, 8)])
def test_shape_dtype_affine_preserved(shape):
    img = meta_image(shape).to(torch.float64)
    out = apply_acquisition_shift(img, FULL)
    assert isinstance(out, MetaTensor)
    assert out.shape == img.shape and out.dtype == torch.float32
    assert torch.equal(out.affine, img.affine)
    assert out.meta["filename_or_obj"] == "x.nii.gz"
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, img.float())
    # plain tensors and numpy arrays come back as the same kind
    arr = img.numpy().astype(np.float64)
    out_np = apply_acquisition_shift(arr, FULL)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32 and out_np.shape == arr.shape
    np.testing.assert_allclose(out_np, out.numpy(), rtol=1e-5, atol=1e-4)
    out_t = apply_acquisition_shift(img.as_tensor(), FULL)
    assert type(out_t) is torch.Tensor and out_t.dtype == torch.float32


def test_odd_shapes_and_non_integer_downsample():
    for shape in [(1, 7, 5), (1, 9, 6, 5), (2, 3, 3)]:
        img = meta_image(shape)
        for factor in (1.5, 3.0, 10.0):
            out = apply_acquisition_shift(img, {"downsample": factor})
            assert out.shape == img.shape


def test_deterministic_same_params():
    img = meta_image((1, 16, 16, 8))
    a = apply_acquisition_shift(img, FULL)
    b = apply_acquisition_shift(img.clone(), dict(FULL))
    assert torch.equal(a, b)
    t = AcquisitionShiftd(keys="image")
    assert torch.equal(t({"image": img, "acquisition": FULL})["image"], a)


def test_different_seeds_differ():
    img = meta_image((1, 16, 16))
    a = apply_acquisition_shift(img, {"noise_std": 0.05, "seed": 1})
    b = apply_acquisition_shift(img, {"noise_std": 0.05, "seed": 2})
    assert not torch.allclose(a, b)
    # noise std is relative to the intensity range (200 here)
    resid = (a - img).flatten()
    assert 0.05 * 200 * 0.7 < float(resid.std()) < 0.05 * 200 * 1.3
    c = apply_acquisition_shift(img, {"bias_strength": 0.5, "seed": 1})
    d = apply_acquisition_shift(img, {"bias_strength": 0.5, "seed": 2})
    assert not torch.allclose(c, d)


def test_gamma_below_one_brightens_midtones():
    ramp = torch.linspace(10.0, 110.0, 101).reshape(1, 101, 1).repeat(1, 1, 4)
    bright = apply_acquisition_shift(ramp, {"gamma": 0.5})
    dark = apply_acquisition_shift(ramp, {"gamma": 2.0})
    mid = ramp[0, 50, 0]  # 60, the middle of the range
    assert bright[0, 50, 0] > mid + 10 and dark[0, 50, 0] < mid - 10
    # the range is kept: end points map to themselves
    for out in (bright, dark):
        assert float(out.min()) == pytest.approx(10.0, abs=1e-4)
        assert float(out.max()) == pytest.approx(110.0, abs=1e-4)
    assert float(bright.mean()) > float(ramp.mean()) > float(dark.mean())


def test_gamma_is_per_channel():
    img = torch.stack([torch.linspace(0, 1, 50), torch.linspace(-1000, 3000, 50)]).reshape(2, 50, 1)
    out = apply_acquisition_shift(img, {"gamma": 0.7})
    for c in range(2):
        assert float(out[c].min()) == pytest.approx(float(img[c].min()), abs=1e-3)
        assert float(out[c].max()) == pytest.approx(float(img[c].max()), rel=1e-5)


def test_bias_field_mean_one_and_smooth():
    img = torch.ones(1, 32, 32, 16)
    img[0, 0, 0, 0] = 0.0  # background level 0: the field scales everything above it
    out = apply_acquisition_shift(img, {"bias_strength": 0.4, "seed": 3})
    field = out[0][img[0] > 0]
    assert float(field.mean()) == pytest.approx(1.0, abs=1e-3)
    assert float(field.std()) > 0.02
    assert float(field.min()) > 0
    # smooth: neighbouring voxels differ much less than the field's overall spread
    step = (out[0, 1:, 1:, 1:] - out[0, :-1, 1:, 1:]).abs().max()
    assert float(step) < 0.25 * float(field.max() - field.min())


def test_resolution_loss_and_blur_smooth_the_image():
    img = meta_image((1, 32, 32))
    hf = lambda x: float((x[0, 1:, :] - x[0, :-1, :]).abs().mean())  # noqa: E731
    down = apply_acquisition_shift(img, {"downsample": 4.0})
    blur = apply_acquisition_shift(img, {"blur_sigma": 1.5})
    assert down.shape == img.shape and blur.shape == img.shape
    assert hf(down) < 0.5 * hf(img)
    assert hf(blur) < 0.5 * hf(img)
    aniso = apply_acquisition_shift(img, {"blur_sigma": [2.0, 0.0]})
    assert hf(aniso) < 0.5 * hf(img)
    with pytest.raises(ValueError, match="spatial dims"):
        apply_acquisition_shift(img, {"blur_sigma": [1.0, 1.0, 1.0]})


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"gamma": 0}, "gamma"),
        ({"gamma": -0.5}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"gamma": "1.2"}, "gamma"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"blur_sigma": -1}, "blur_sigma"),
        ({"downsample": 0.5}, "downsample"),
        ({"bias_strength": -0.2}, "bias_strength"),
        ({"bias_order": 1.5}, "bias_order"),
        ({"seed": -3}, "seed"),
        ({"seed": True}, "seed"),
        ({"gama": 1.1}, "unknown"),
    ],
)
def test_invalid_params_raise(bad, match):
    img = meta_image((1, 8, 8))
    with pytest.raises(ValueError, match=match):
        apply_acquisition_shift(img, bad)
    with pytest.raises(ValueError, match=match):
        AcquisitionShiftd(keys="image")({"image": img, "acquisition": bad})


def test_invalid_image_shape():
    with pytest.raises(ValueError, match="channel-first"):
        apply_acquisition_shift(torch.rand(5), {"gamma": 0.8})


def test_dict_transform_keys_and_compose():
    img = meta_image((1, 16, 16))
    label = MetaTensor(torch.randint(0, 3, (1, 16, 16)).float())
    data = {"image": img, "label": label, "acquisition": dict(FULL)}
    out = Compose([AcquisitionShiftd(keys="image")])(data)
    assert out["label"] is label  # labels are never shifted
    assert not torch.allclose(out["image"], img)
    out2 = AcquisitionShiftd(keys=["image", "extra"], allow_missing_keys=True)(data)
    assert torch.equal(out2["image"], out["image"])
    with pytest.raises(KeyError):
        AcquisitionShiftd(keys=["image", "extra"])(data)
    out3 = AcquisitionShiftd(keys="image", params_key="shift")({"image": img, "shift": {"gamma": 0.5}})
    assert float(out3.get("image").mean()) > float(img.mean())


def test_default_site_shifts():
    shifts = default_site_shifts(5, seed=3)
    assert shifts == default_site_shifts(5, seed=3)
    assert shifts != default_site_shifts(5, seed=4)
    assert default_site_shifts(3, seed=3) == shifts[:3]  # a site's shift does not depend on the number of sites
    assert validate_acquisition_params({**shifts[0], "seed": 0}) == validate_acquisition_params({})  # site 0: identity
    img = meta_image((1, 8, 8))
    assert torch.allclose(apply_acquisition_shift(img, shifts[0]), img)
    for s in shifts[1:]:
        assert "seed" not in s
        assert 0.6 <= s["gamma"] <= 1.6
        assert 0 < s["bias_strength"] <= 0.5 and 1.0 <= s["downsample"] <= 2.5
        assert 0 <= s["blur_sigma"] <= 1.5 and 0 <= s["noise_std"] <= 0.05
        validate_acquisition_params(s)
    assert len({s["gamma"] for s in shifts[1:]}) == 4
    with pytest.raises(ValueError):
        default_site_shifts(0, seed=1)
