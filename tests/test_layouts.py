"""Layout-conditioned segmentation synthesis: the site's atlas under its policy, the server's layouts, the generator."""

from __future__ import annotations

import json
import math

import pytest
import torch

from monai_fedkd.losses import LayoutDiceLoss
from monai_fedkd.networks.generators import LayoutGenerator
from monai_fedkd.server.layouts import LayoutSampler, combined_atlas
from monai_fedkd.site.atlas import AtlasAccumulator, atlas_tensor, publish_atlas
from monai_fedkd.site.policy import AnswerPolicy, PolicyError


def _cube_labels(n: int, size=(12, 12, 8)) -> list[torch.Tensor]:
    """n subjects: class 1 a box that shifts by one voxel per subject, class 2 one fixed voxel."""
    out = []
    for k in range(n):
        lab = torch.zeros(1, *size, dtype=torch.long)
        lab[0, 2 + k % 2:6 + k % 2, 3:7, 2:6] = 1
        lab[0, 8, 8, 4] = 2
        out.append(lab)
    return out


def test_atlas_is_the_subject_mean_in_the_patch_frame():
    acc = AtlasAccumulator(3, [12, 12, 8], align="centre")
    for lab in _cube_labels(4):
        acc.add(lab)
    mean = acc.mean()
    assert mean.shape == (3, 12, 12, 8)
    torch.testing.assert_close(mean.sum(0), torch.ones(12, 12, 8))
    assert mean[1, 3, 4, 3] == 1.0 and mean[1, 2, 4, 3] == 0.5 and mean[2, 8, 8, 4] == 1.0
    # the frame is the first subject's size (at least the patch size); other sizes are centre-cropped / padded
    big = torch.zeros(1, 14, 12, 10, dtype=torch.long)
    big[0, 1 + 8, 8, 1 + 4] = 2
    acc2 = AtlasAccumulator(3, [12, 12, 8], align="centre")
    acc2.add(_cube_labels(1)[0])
    acc2.add(big)
    assert acc2.spatial_size == [12, 12, 8] and acc2.mean()[2, 8, 8, 4] == 1.0
    acc3 = AtlasAccumulator(3, [12, 12, 8])
    acc3.add(torch.zeros(1, 16, 10, 8, dtype=torch.long))
    assert acc3.spatial_size == [16, 12, 8], "the whole field of view, never smaller than the patch"
    with pytest.raises(ValueError, match="outside"):
        acc2.add(torch.full((1, 12, 12, 8), 3))


def _shifted_subject(shift, size=(20, 20, 12)):
    """One subject's anatomy (a box of class 1 beside a box of class 2) and its image, translated by ``shift``."""
    lab = torch.zeros(1, *size, dtype=torch.long)
    x, y, z = 6 + shift[0], 6 + shift[1], 3 + shift[2]
    lab[0, x:x + 4, y:y + 4, z:z + 4] = 1
    lab[0, x + 4:x + 6, y:y + 4, z:z + 4] = 2
    return lab, 0.5 * (lab > 0).float() + 0.1


def test_foreground_aligned_atlas_is_sharp_where_centre_alignment_blurs():
    shifts = [(0, 0, 0), (3, -2, 1), (-2, 3, -1), (4, 1, 2)]
    sharp, blurred = AtlasAccumulator(3, [16, 16, 8]), AtlasAccumulator(3, [16, 16, 8], align="centre")
    assert sharp.align == "foreground", "the default aligns the structures"
    for s in shifts:
        lab, img = _shifted_subject(s)
        sharp.add(lab, img)
        blurred.add(lab, img)
    a, b = sharp.mean(), blurred.mean()
    assert sharp.spatial_size == [20, 20, 12]
    # every subject's anatomy lands on the same voxels: probabilities are 0 or 1, the class volumes are kept
    assert float(a[1:].max()) == 1.0 and bool(((a == 0) | (a == 1)).all())
    assert a[1].sum() == 64 and a[2].sum() == 32
    assert float(b[1].max()) < 1.0, "centre alignment averages shifted anatomy into a blur"
    # the structures' centroid sits at the frame centre, and the image moved with its labels
    centroid = (a[1:].sum(0) > 0).nonzero().float().mean(0)
    assert torch.allclose(centroid, torch.tensor([10.0, 10.0, 6.0]), atol=0.51)
    image, structures = sharp.mean_image(), a[1:].sum(0) > 0
    assert bool(((image - 0.6).abs() < 1e-6)[structures].all()) and bool((image < 0.11)[~structures].all())
    # a subject without structures keeps its volume centre; shifts beyond the frame pad with background
    empty = AtlasAccumulator(3, [16, 16, 8])
    empty.add(torch.zeros(1, 20, 20, 12, dtype=torch.long))
    empty.add(_shifted_subject((6, 6, 3))[0])
    torch.testing.assert_close(empty.mean().sum(0), torch.ones(20, 20, 12))
    assert publish_atlas(sharp, AnswerPolicy(atlas_min_subjects=1), None)["align"] == "foreground"
    # 2D sites alike: shifted squares land on the same pixels
    flat = AtlasAccumulator(2, [12, 12])
    for dx, dy in [(0, 0), (3, -2), (-1, 4)]:
        lab = torch.zeros(1, 16, 16, dtype=torch.long)
        lab[0, 5 + dx:9 + dx, 5 + dy:9 + dy] = 1
        flat.add(lab)
    assert flat.mean()[1].sum() == 16 and float(flat.mean()[1].max()) == 1.0
    with pytest.raises(ValueError, match="align"):
        AtlasAccumulator(3, [16, 16, 8], align="registration")
    with pytest.raises(PolicyError, match="atlas_align"):
        AnswerPolicy(atlas_align="affine")


def test_published_atlas_is_what_the_policy_allows():
    acc = AtlasAccumulator(3, [12, 12, 8])
    for lab in _cube_labels(6):
        acc.add(lab)
    atlas = publish_atlas(acc, AnswerPolicy(), spacing=[4.0, 4.0, 4.0])
    assert atlas["grid"] == [6, 6, 4] and atlas["spacing_mm"] == [8.0, 8.0, 8.0] and atlas["subjects"] == 6
    assert atlas["epsilon"] is None  # no noise: nothing bounds what it reveals
    t = atlas_tensor(json.loads(json.dumps(atlas)), 3)  # JSON-able, as it crosses FLARE in the card
    torch.testing.assert_close(t, torch.nn.functional.adaptive_avg_pool3d(acc.mean()[None], [6, 6, 4])[0], atol=1e-4, rtol=0)
    coarse = publish_atlas(acc, AnswerPolicy(atlas_pool=4), spacing=[4.0, 4.0, 4.0])
    assert coarse["grid"] == [3, 3, 2] and len(coarse["probabilities"]) == 3 * 18
    assert publish_atlas(acc, AnswerPolicy(share_atlas=False), None) is None
    assert publish_atlas(acc, AnswerPolicy(atlas_min_subjects=7), None) is None
    noisy = publish_atlas(acc, AnswerPolicy(atlas_noise=0.5), None, torch.Generator().manual_seed(0))
    t = atlas_tensor(noisy, 3)
    assert noisy["epsilon"] is not None and noisy["epsilon"] > 0 and (t >= 0).all()
    torch.testing.assert_close(t.sum(0), torch.ones(6, 6, 4), atol=1e-3, rtol=0)
    assert noisy["l2_sensitivity"] == pytest.approx(math.sqrt(2 * 144) / 6)
    with pytest.raises(PolicyError, match="atlas"):
        AnswerPolicy(atlas_pool=0)
    with pytest.raises(ValueError, match="expected 3 classes"):
        atlas_tensor({**atlas, "probabilities": atlas["probabilities"][:-1]}, 3)


def _toy_atlas(size=(24, 24, 16)) -> torch.Tensor:
    a = torch.zeros(3, *size)
    a[0] = 1.0
    a[:, 6:18, 6:18, 4:12] = torch.tensor([0.2, 0.8, 0.0])[:, None, None, None]
    a[:, 10:13, 10:13, 7:9] = torch.tensor([0.2, 0.4, 0.4])[:, None, None, None]  # never a majority: argmax would drop it
    return a


def test_layouts_follow_the_atlas_volumes_and_support():
    atlas = _toy_atlas()
    sampler = LayoutSampler(atlas, rotate=0.0, scale=0.0, translate=0.0, elastic=0.0, volume_jitter=0.2)
    layouts = sampler.sample(6, torch.Generator().manual_seed(0))
    assert layouts.shape == (6, 24, 24, 16) and layouts.dtype == torch.long
    expected = atlas.flatten(1).sum(1)
    for c in (1, 2):
        counts = (layouts == c).flatten(1).sum(1).float()
        assert ((counts >= 0.8 * expected[c] - 1) & (counts <= 1.2 * expected[c] + 1)).all(), (c, counts, expected[c])
        assert ((atlas[c][None] > 0) | (layouts != c)).all(), "without deformation a class stays where its atlas is"
    assert not torch.equal(layouts[0], layouts[1])
    assert torch.equal(layouts, sampler.sample(6, torch.Generator().manual_seed(0)))
    moved = LayoutSampler(atlas, rotate=15.0, translate=0.1, elastic=0.05).sample(4, torch.Generator().manual_seed(1))
    assert moved.shape == (4, 24, 24, 16) and ((moved == 2).flatten(1).sum(1) > 0).all()


def test_combined_atlas_weights_sites_by_subjects():
    a, b = torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)
    a[0], b[1] = 1.0, 1.0
    pub = lambda t, n: {"grid": [4, 4], "subjects": n, "probabilities": t.flatten().tolist()}  # noqa: E731
    comb = combined_atlas({"s1": pub(a, 3), "s2": pub(b, 1)}, 2, [8, 8])
    assert comb.shape == (2, 8, 8)
    torch.testing.assert_close(comb[1], torch.full((8, 8), 0.25))
    with pytest.raises(ValueError, match="site 's2'"):
        combined_atlas({"s1": pub(a, 3), "s2": {"grid": [4, 4], "probabilities": [0.5]}}, 2, [8, 8])
    with pytest.raises(ValueError, match="no site"):
        combined_atlas({}, 2, [8, 8])


def test_layout_generator_paints_the_layout_it_is_given():
    torch.manual_seed(0)
    gen = LayoutGenerator(3, 1, [20, 16, 6], num_classes=3, features=(4, 4, 8, 8, 8, 4), value_range=(0.0, 1.0), init_mean=0.3)
    layouts = torch.zeros(2, 20, 16, 6, dtype=torch.long)
    layouts[1, 5:15, 4:12, 1:5] = 1
    z = torch.randn(2, 8)
    torch.manual_seed(1)
    x = gen(z, layouts)
    assert x.shape == (2, 1, 20, 16, 6) and 0.0 <= float(x.detach().min()) and float(x.detach().max()) <= 1.0
    assert abs(float(x.detach().mean()) - 0.3) < 0.1  # starts near the sites' mean intensity
    torch.manual_seed(1)
    same_noise = gen(z, torch.zeros_like(layouts))
    # the layout is an input: where it differs, the output differs; with the same noise and layout, it does not
    assert not torch.allclose(same_noise[1], x[1]) and torch.allclose(same_noise[0], x[0])
    x.mean().backward()
    assert all(p.grad is not None for p in gen.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="layout must have shape"):
        gen(z, layouts[:, :10])
    with pytest.raises(ValueError, match="layout values"):
        gen(z, layouts + 5)


def test_layout_dice_is_zero_when_the_ensemble_paints_the_layout():
    layout = torch.zeros(2, 8, 8, 4, dtype=torch.long)
    layout[:, 2:6, 2:6, 1:3] = 1
    perfect = torch.log(torch.nn.functional.one_hot(layout, 2).movedim(-1, 1).float().clamp(1e-6, 1))
    assert float(LayoutDiceLoss(weight=1.0)(perfect, layout)) < 1e-3
    wrong = torch.log(torch.nn.functional.one_hot(1 - layout, 2).movedim(-1, 1).float().clamp(1e-6, 1))
    assert float(LayoutDiceLoss(weight=2.0)(wrong, layout)) > 1.9


def test_layout_crops_keep_the_anatomy_at_its_scale():
    atlas = _toy_atlas()
    full = LayoutSampler(atlas, rotate=0.0, scale=0.0, translate=0.0, elastic=0.0, texture=0.0, volume_jitter=0.0)
    cropped = LayoutSampler(atlas, rotate=0.0, scale=0.0, translate=0.0, elastic=0.0, texture=0.0, volume_jitter=0.0, crop_size=[16, 16, 8])
    whole, crops = full.sample(8, torch.Generator().manual_seed(0)), cropped.sample(8, torch.Generator().manual_seed(0))
    assert crops.shape == (8, 16, 16, 8)
    # every crop is a window of the full layout (nothing rescaled)
    for c in crops:
        windows = whole[0].unfold(0, 16, 1).unfold(1, 16, 1).unfold(2, 8, 1)
        assert (windows == c).flatten(3).all(-1).any()
    with pytest.raises(ValueError, match="crop_size"):
        LayoutSampler(atlas, crop_size=[32, 16, 8])


def test_intensity_atlas_and_prior_follow_the_layouts():
    from monai_fedkd.site.atlas import atlas_intensity

    acc = AtlasAccumulator(3, [12, 12, 8], align="centre")  # whole-frame images: no padding from a shift
    for k, lab in enumerate(_cube_labels(6)):
        acc.add(lab, torch.full((1, 12, 12, 8), float(k)))  # subject k: constant intensity k
    atlas = publish_atlas(acc, AnswerPolicy(), None)
    torch.testing.assert_close(atlas_intensity(atlas), torch.full((6, 6, 4), 2.5))  # mean of 0..5, pooled
    with pytest.raises(ValueError, match="differ in size"):
        acc.add(_cube_labels(1)[0], torch.zeros(1, 10, 12, 8))
    # the prior is deformed and cropped with its layout: without deformation it is the map's window
    intensity = torch.linspace(0, 1, 24)[:, None, None].expand(24, 24, 16).contiguous()
    sampler = LayoutSampler(_toy_atlas(), rotate=0.0, scale=0.0, translate=0.0, elastic=0.0, crop_size=[16, 16, 8], intensity=intensity)
    layouts, prior = sampler.sample_with_prior(3, torch.Generator().manual_seed(0))
    assert prior.shape == (3, 1, 16, 16, 8) and layouts.shape == (3, 16, 16, 8)
    for p in prior[:, 0]:
        start = int(torch.argmin((intensity[:, 0, 0] - p[0, 0, 0]).abs()))
        torch.testing.assert_close(p, intensity[start:start + 16, :16, :8], atol=1e-5, rtol=0)
    gen = LayoutGenerator(3, 1, [16, 16, 8], num_classes=3, features=(4, 4, 8, 8, 8, 4))
    x = gen(torch.randn(3, 8), layouts, prior.clamp(0.05, 0.95))
    assert (x - prior.clamp(0.05, 0.95)).abs().mean() < 0.1, "the generator starts at the prior image"


def test_foreground_crops_are_centred_on_structures():
    # a structure in one corner of a large frame: uniform 8^3 crops mostly miss it, foreground-centred ones never do
    atlas = torch.zeros(2, 32, 32, 32)
    atlas[0] = 1.0
    atlas[:, 2:6, 2:6, 2:6] = torch.tensor([0.0, 1.0])[:, None, None, None]
    rigid = dict(rotate=0.0, scale=0.0, translate=0.0, elastic=0.0, texture=0.0, volume_jitter=0.0, crop_size=[8, 8, 8])
    uniform = LayoutSampler(atlas, **rigid).sample(16, torch.Generator().manual_seed(0))
    centred = LayoutSampler(atlas, foreground_crop=1.0, **rigid).sample(16, torch.Generator().manual_seed(0))
    assert (centred > 0).flatten(1).any(1).all(), "every foreground-centred crop holds the structure"
    assert (uniform > 0).flatten(1).any(1).float().mean() < 0.5
    # a centre near the border moves the crop inside the volume: every crop keeps its size
    assert centred.shape == (16, 8, 8, 8)
    half = LayoutSampler(atlas, foreground_crop=0.5, **rigid)
    torch.testing.assert_close(half.sample(16, torch.Generator().manual_seed(3)), half.sample(16, torch.Generator().manual_seed(3)))
    # a layout without foreground falls back to a uniform crop
    empty = torch.zeros(2, 16, 16, 16)
    empty[0] = 1.0
    assert (LayoutSampler(empty, foreground_crop=1.0, **rigid).sample(2, torch.Generator().manual_seed(0)) == 0).all()
    with pytest.raises(ValueError, match="foreground_crop"):
        LayoutSampler(atlas, foreground_crop=1.5)


def test_class_balanced_crops_give_small_structures_as_many_crops_as_large_ones():
    # a large structure in one corner, a tiny one in the opposite corner: 8^3 crops centred on a foreground voxel
    # almost always frame the large one; class-balanced crops frame each in about half of the samples
    atlas = torch.zeros(3, 32, 32, 32)
    atlas[0] = 1.0
    atlas[:, 1:13, 1:13, 1:13] = torch.tensor([0.0, 1.0, 0.0])[:, None, None, None]
    atlas[:, 28:30, 28:30, 28:30] = torch.tensor([0.0, 0.0, 1.0])[:, None, None, None]
    rigid = dict(rotate=0.0, scale=0.0, translate=0.0, elastic=0.0, texture=0.0, volume_jitter=0.0, crop_size=[8, 8, 8],
                 foreground_crop=1.0)
    by_voxel = LayoutSampler(atlas, **rigid).sample(64, torch.Generator().manual_seed(0))
    balanced = LayoutSampler(atlas, class_balanced_crops=True, **rigid)
    by_class = balanced.sample(64, torch.Generator().manual_seed(0))
    small_by_voxel = (by_voxel == 2).flatten(1).any(1).float().mean()
    small_by_class = (by_class == 2).flatten(1).any(1).float().mean()
    assert small_by_voxel < 0.1, small_by_voxel
    assert 0.3 < small_by_class < 0.7, small_by_class
    assert (by_class > 0).flatten(1).any(1).all(), "every class-balanced crop still holds a structure"
    torch.testing.assert_close(balanced.sample(8, torch.Generator().manual_seed(5)), balanced.sample(8, torch.Generator().manual_seed(5)))


def test_class_intensity_quantiles_are_published_without_atlas_noise_only():
    from monai_fedkd.site.atlas import INTENSITY_LEVELS, atlas_class_intensity

    g = torch.Generator().manual_seed(0)
    acc = AtlasAccumulator(3, [12, 12, 8], value_range=(0.0, 1.0))
    for lab in _cube_labels(5):
        # class 0 ~ U(0, 0.4), class 1 ~ U(0.6, 1.0), class 2 (one voxel) 0.5; two channels, the second inverted
        img = torch.where(lab == 1, 0.6 + 0.4 * torch.rand(lab.shape, generator=g), 0.4 * torch.rand(lab.shape, generator=g))
        img = torch.where(lab == 2, torch.full_like(img, 0.5), img)
        acc.add(lab, torch.cat([img, 1 - img]))
    shared = publish_atlas(acc, AnswerPolicy(atlas_min_subjects=1), [1.0, 1.0, 1.0])["class_intensity"]
    assert shared["levels"] == list(INTENSITY_LEVELS) and shared["value_range"] == [0.0, 1.0]
    levels, q = atlas_class_intensity({"class_intensity": shared}, 3)
    assert q.shape == (2, 3, len(INTENSITY_LEVELS))
    expected = torch.tensor(INTENSITY_LEVELS)
    torch.testing.assert_close(q[0, 0], 0.4 * expected, atol=0.01, rtol=0)  # uniform: the quantile is linear in the level
    torch.testing.assert_close(q[0, 1], 0.6 + 0.4 * expected, atol=0.02, rtol=0)
    torch.testing.assert_close(q[1, 1], 1 - (0.6 + 0.4 * expected.flip(0)), atol=0.02, rtol=0)
    assert ((q[0, 2] - 0.5).abs() <= 1 / 256).all()
    assert publish_atlas(acc, AnswerPolicy(atlas_min_subjects=1, atlas_noise=0.01), [1.0, 1.0, 1.0])["class_intensity"] is None
    # without a value range there is no histogram to publish
    plain = AtlasAccumulator(3, [12, 12, 8])
    plain.add(_cube_labels(1)[0], torch.rand(1, 12, 12, 8))
    assert publish_atlas(plain, AnswerPolicy(atlas_min_subjects=1), None)["class_intensity"] is None
    with pytest.raises(ValueError, match="class_intensity quantiles are"):
        atlas_class_intensity({"class_intensity": shared}, 4)


def test_class_gradient_quantiles_follow_the_neighbour_differences_per_axis():
    """Stripes along one axis show in that axis' differences only, and cancel in 2-voxel blocks; published beside
    the intensity quantiles, under the same policy."""
    from monai_fedkd.site.atlas import GRADIENT_SCALES, INTENSITY_LEVELS, atlas_class_gradient

    acc = AtlasAccumulator(3, [12, 12, 8], value_range=(0.0, 2.0))
    for lab in _cube_labels(3):
        # class 1 alternates 0.2 / 1.0 along the first axis (stripes) and is constant along the others; the rest is 0
        stripes = torch.tensor([0.2, 1.0]).repeat(6)[:, None, None].expand(lab.shape[1:])
        acc.add(lab, torch.where(lab == 1, stripes[None], torch.zeros(lab.shape)))
    shared = publish_atlas(acc, AnswerPolicy(atlas_min_subjects=1), [1.0, 1.0, 1.0])["class_gradient"]
    assert shared["levels"] == list(INTENSITY_LEVELS) and shared["value_range"] == [0.0, 2.0] and shared["scales"] == list(GRADIENT_SCALES)
    levels, q, scales = atlas_class_gradient({"class_gradient": shared}, 3, 3)
    assert q.shape == (len(GRADIENT_SCALES), 3, 1, 3, len(INTENSITY_LEVELS)) and scales == [1, 2]
    assert abs(float(q[0, 0, 0, 1, 7]) - 0.8) <= 2 * 2 / 256, "along the stripes' axis class 1's median difference is the stripe"
    assert float(q[0, 1, 0, 1, 7]) < 0.02 and float(q[0, 2, 0, 1, 7]) < 0.02, "along the other axes class 1 is constant"
    assert float(q[0, :, 0, 0, 7].max()) < 0.02, "the constant background's differences are 0"
    # in 2-voxel blocks the stripes average out: inside the cube the blocks along the stripes' axis are alike
    assert float(q[1, 0, 0, 1, 3]) < 0.02
    assert publish_atlas(acc, AnswerPolicy(atlas_min_subjects=1, atlas_noise=0.01), [1.0, 1.0, 1.0])["class_gradient"] is None
    with pytest.raises(ValueError, match="class_gradient quantiles are"):
        atlas_class_gradient({"class_gradient": shared}, 3, 2)
    with pytest.raises(ValueError, match="class_gradient is malformed"):
        atlas_class_gradient({"class_gradient": {k: v for k, v in shared.items() if k != "scales"}}, 3, 3)
    # a single-slice volume: no differences along its thin axis, and it is not pooled there
    thin = AtlasAccumulator(2, [8, 8, 1], value_range=(0.0, 1.0))
    thin.add(torch.zeros(1, 8, 8, 1, dtype=torch.long), torch.rand(1, 8, 8, 1))
    assert all(r is None for r in [thin.class_gradient_quantiles()[s][2][0][0] for s in range(2)])
    assert thin.class_gradient_quantiles()[1][0][0][0] is not None


def test_combined_class_gradient_averages_per_axis_by_subjects():
    from monai_fedkd.server.layouts import combined_class_gradient

    levels = [0.1, 0.5, 0.9]
    a = {"subjects": 1, "class_gradient": {"levels": levels, "scales": [1], "quantiles": [[[[[0.0, 0.1, 0.2], None]], [[[0.2, 0.2, 0.2], None]]]]}}
    b = {"subjects": 1, "class_gradient": {"levels": levels, "scales": [1], "quantiles": [[[[[0.2, 0.3, 0.4], [0.1, 0.2, 0.3]]], [[[0.0, 0.0, 0.0], None]]]]}}
    lv, q, scales = combined_class_gradient({"a": a, "b": b, "none": {"subjects": 9}}, 2, 2)
    assert q.shape == (1, 2, 1, 2, 3) and scales == [1]
    torch.testing.assert_close(q[0, 0, 0, 0], torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(q[0, 0, 0, 1], torch.tensor([0.1, 0.2, 0.3]))  # only b reports class 1 along axis 0
    assert not torch.isfinite(q[0, 1, 0, 1]).any(), "no site reports class 1 along axis 1"
    with pytest.raises(ValueError, match="site 'a'.*class_gradient quantiles are"):
        combined_class_gradient({"a": a, "b": b}, 2, 3)
    b["class_gradient"]["scales"] = [2]
    with pytest.raises(ValueError, match="site 'b'.*scales"):
        combined_class_gradient({"a": a, "b": b}, 2, 2)


def test_class_gradient_loss_charges_stripes_along_their_axis_and_noise_at_the_coarse_scale():
    from monai_fedkd.losses import ClassGradientLoss

    levels = torch.linspace(0.01, 0.99, 15)
    # one class; real scans: differences ~ U(0, 0.1) along every axis, at one scale
    quantiles = (0.1 * levels)[None, None, None, None].expand(1, 3, 1, 1, -1)
    loss = ClassGradientLoss(levels, quantiles, weight=1.0)
    layout = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    smooth = torch.full((2, 1, 16, 16, 16), 0.5)
    assert abs(float(loss(smooth, layout)) - 0.05) < 0.01, "a flat image lacks the sites' contrast: half the mean difference"
    stripes = (smooth + 0.3 * (torch.arange(16) % 2).float()[:, None, None]).requires_grad_(True)  # along the first axis
    value = loss(stripes, layout)
    # along axis 0 every difference is 0.3 (0.25 above the target's mean), along the others 0 (0.05 below)
    assert abs(float(value.detach()) - (0.25 + 0.05 + 0.05) / 3) < 0.01
    value.backward()
    assert float(stripes.grad.abs().sum()) > 0
    # white noise whose voxel differences match a target with contrast at both scales still pays at the coarse one
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 1, 16, 16, 16, generator=g)
    fine = (noise.diff(dim=2).abs().flatten().quantile(levels)).clamp_min(0)
    two = ClassGradientLoss(levels, fine[None, None, None, None].expand(2, 3, 1, 1, -1), scales=(1, 2))
    voxels_only = ClassGradientLoss(levels, fine[None, None, None, None].expand(1, 3, 1, 1, -1))
    assert float(voxels_only(noise, layout)) < 0.01
    assert float(two(noise, layout)) > 0.05, "2-voxel blocks of noise lose most of their contrast"
    # a single slice has no neighbours along its axis: that axis is left out, not an error
    assert torch.isfinite(loss(smooth[:, :, :1], layout[:, :1]))
    with pytest.raises(ValueError, match="must not be negative"):
        ClassGradientLoss(levels, quantiles - 1.0)
    with pytest.raises(ValueError, match="quantiles must be"):
        ClassGradientLoss(levels, quantiles, scales=(1, 2))
    with pytest.raises(ValueError, match=r"x must be \(B, channels, 3 spatial dims"):
        loss(torch.rand(2, 1, 16, 16), layout[:, 0])


def test_combined_class_intensity_averages_the_quantile_functions_by_subjects():
    from monai_fedkd.server.layouts import combined_class_intensity

    levels = [0.1, 0.5, 0.9]
    a = {"subjects": 3, "class_intensity": {"levels": levels, "quantiles": [[[0.0, 0.1, 0.2], [0.5, 0.6, 0.7]]]}}
    b = {"subjects": 1, "class_intensity": {"levels": levels, "quantiles": [[[0.4, 0.5, 0.6], None]]}}
    lv, q = combined_class_intensity({"a": a, "b": b, "none": {"subjects": 9}}, 2)
    torch.testing.assert_close(lv, torch.tensor(levels))
    torch.testing.assert_close(q[0, 0], torch.tensor([0.1, 0.2, 0.3]))  # (3 * a + 1 * b) / 4
    torch.testing.assert_close(q[0, 1], torch.tensor([0.5, 0.6, 0.7]))  # only a reports class 1
    assert combined_class_intensity({"none": {"subjects": 9}}, 2) is None
    b["class_intensity"]["levels"] = [0.2, 0.5, 0.9]
    with pytest.raises(ValueError, match="site 'b'.*other levels"):
        combined_class_intensity({"a": a, "b": b}, 2)


def test_class_intensity_loss_is_the_transport_cost_to_the_sites_quantiles():
    from monai_fedkd.losses import ClassIntensityLoss

    levels = torch.linspace(0.01, 0.99, 15)
    quantiles = torch.stack([0.4 * levels, 0.6 + 0.4 * levels])[None]  # class 0 ~ U(0, 0.4), class 1 ~ U(0.6, 1)
    loss = ClassIntensityLoss(levels, quantiles, weight=2.0)
    layout = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    layout[:, 4:12, 4:12, 4:12] = 1
    g = torch.Generator().manual_seed(0)
    real = torch.where(layout == 1, 0.6 + 0.4 * torch.rand(layout.shape, generator=g), 0.4 * torch.rand(layout.shape, generator=g))[:, None]
    assert float(loss(real, layout)) < 0.01
    # class 1 painted 0.2 too dark everywhere: the cost is the shift (weight 2, averaged over the two classes)
    shifted = torch.where(layout[:, None] == 1, real - 0.2, real).requires_grad_(True)
    value = loss(shifted, layout)
    assert abs(float(value.detach()) - 2.0 * 0.2 / 2.0) < 0.01
    value.backward()
    assert (shifted.grad[layout[:, None] == 1] < 0).all(), "every voxel of the dark class is pushed up"
    # a class with too few voxels in the batch, or a class no site reported, is left out
    tiny = torch.zeros_like(layout)
    tiny[0, 0, 0, 0] = 1
    assert float(loss(0.4 * torch.rand(2, 1, 16, 16, 16, generator=g), tiny)) < 0.01  # class 0 right, class 1 one voxel
    unknown = ClassIntensityLoss(levels, torch.stack([0.4 * levels, torch.full_like(levels, float("nan"))])[None])
    assert float(unknown(shifted.detach(), layout)) < 0.01
    with pytest.raises(ValueError, match="must not decrease"):
        ClassIntensityLoss(levels, quantiles.flip(-1))
    with pytest.raises(ValueError, match=r"x must be \(B, 1"):
        loss(torch.rand(2, 2, 16, 16, 16), layout)


def test_per_sample_class_intensity_sees_samples_that_only_match_pooled():
    """One sample painted too dark and one too bright match the target pooled over the batch; per sample they do not."""
    from monai_fedkd.losses import ClassIntensityLoss

    levels = torch.linspace(0.01, 0.99, 15)
    quantiles = (0.2 + 0.6 * levels)[None, None]  # one class ~ U(0.2, 0.8)
    layout = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    dark, bright = 0.2 + 0.3 * torch.rand(1, 1, 8, 8, 8, generator=g), 0.5 + 0.3 * torch.rand(1, 1, 8, 8, 8, generator=g)
    x = torch.cat([dark, bright]).requires_grad_(True)
    pooled, per_sample = ClassIntensityLoss(levels, quantiles), ClassIntensityLoss(levels, quantiles, per_sample=True)
    assert float(pooled(x, layout)) < 0.01
    value = per_sample(x, layout)
    assert abs(float(value.detach()) - 0.15) < 0.01  # each half of U(0.2, 0.8) sits 0.15 away from the whole, on average
    value.backward()
    assert (x.grad[0] < 0).all() and (x.grad[1] > 0).all(), "the dark sample is pushed up, the bright one down"
    same = torch.rand(1, 1, 8, 8, 8, generator=g).expand(2, -1, -1, -1, -1)  # identical samples: both modes agree
    torch.testing.assert_close(pooled(same, layout), per_sample(same, layout))
