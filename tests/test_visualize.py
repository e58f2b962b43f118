"""Montages of synthetic inputs (monai_fedkd.visualize)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from monai_fedkd.visualize import add_montage_to_tensorboard, label_colors, montage_2d, montage_3d, save_png


def test_montage_2d_grid_shape_and_tiles():
    x = torch.rand(10, 1, 28, 28)
    m = montage_2d(x, nrow=4, scale=1, padding=2)
    assert m.dtype == np.uint8 and m.shape == (2 + 3 * 30, 2 + 4 * 30, 3)
    # first tile is the first image as grey, the last (unused) cell is padding
    tile = m[2:30, 2:30]
    assert np.array_equal(tile[..., 0], tile[..., 2])
    assert np.abs(tile[..., 0].astype(int) - np.round(x[0, 0].numpy() * 255)).max() <= 1
    assert (m[62:90, 92:120] == 0).all()


def test_montage_2d_default_scale_and_clipping():
    x = torch.linspace(-1.0, 2.0, 2 * 28 * 28).reshape(2, 1, 28, 28)
    m = montage_2d(x)  # 28x28 tiles are shown at 2x
    assert m.shape == (2 + 58, 2 + 2 * 58, 3)
    assert m.min() == 0 and m.max() == 255
    assert montage_2d(x, value_range=(-1.0, 2.0), scale=1)[2:30, 2:30].min() == 0


def test_montage_2d_rgb():
    x = torch.zeros(2, 3, 8, 8)
    x[:, 0] = 1.0  # red
    x[1, 2] = 1.0  # magenta
    m = montage_2d(x, scale=1, padding=1)
    assert tuple(m[1, 1]) == (255, 0, 0) and tuple(m[1, 10]) == (255, 0, 255)


def test_montage_2d_labels_are_drawn():
    x = torch.full((3, 1, 28, 28), 0.5)
    plain = montage_2d(x, nrow=3, scale=2)
    labelled = montage_2d(x, labels=["normal", "pneumonia", "a-very-long-class-name"], nrow=3, scale=2)
    assert labelled.shape[1] == plain.shape[1] and labelled.shape[0] > plain.shape[0]
    band = labelled[2 + 56 : labelled.shape[0] - 2, 2 : 2 + 56]
    assert band.max() > 150  # text pixels in the band under the first tile
    assert np.array_equal(labelled[2:58, 2:58], plain[2:58, 2:58])  # the tile itself is untouched
    with pytest.raises(ValueError, match="labels"):
        montage_2d(x, labels=["one"])


def test_montage_2d_segmentation_overlay():
    x = torch.full((1, 1, 10, 10), 0.5)
    seg = torch.zeros(1, 10, 10, dtype=torch.long)
    seg[0, 2:4, 2:4] = 1
    m = montage_2d(x, segmentation=seg, num_classes=2, scale=1, padding=0)
    assert len(set(m[3, 3])) > 1 and tuple(m[8, 8]) == (128, 128, 128)


def test_montage_3d_shapes():
    v = torch.rand(6, 1, 48, 48, 32)
    m = montage_3d(v, scale=1, padding=2, max_items=4)
    # 4 rows of tiles 48 high; tiles W=32 (first plane), W=32 (second), H=48 (third)
    assert m.dtype == np.uint8 and m.shape == (2 + 4 * 50, 2 + 34 + 34 + 50, 3)
    m = montage_3d(torch.rand(2, 2, 28, 28, 28))  # default scale 3
    assert m.shape == (2 + 2 * (84 + 2), 2 + 3 * (84 + 2), 3)
    # middle slices: first tile equals v[0, 0, 14] as grey
    v = torch.rand(1, 1, 9, 10, 11)
    m = montage_3d(v, scale=1, padding=0)
    assert np.abs(m[:10, :11, 0].astype(int) - np.round(v[0, 0, 4].numpy() * 255)).max() <= 1
    assert np.abs(m[:9, 11:22, 1].astype(int) - np.round(v[0, 0, :, 5].numpy() * 255)).max() <= 1
    assert np.abs(m[:9, 22:32, 2].astype(int) - np.round(v[0, 0, :, :, 5].numpy() * 255)).max() <= 1


def test_montage_3d_overlay_colours_labels_and_leaves_background_grey():
    v = torch.full((2, 1, 20, 20, 20), 0.5)
    seg = torch.zeros(2, 20, 20, 20, dtype=torch.long)
    seg[:, 8:12, 8:12, 8:12] = 1
    seg[:, 10:12, 14:18, 8:12] = 2
    m = montage_3d(v, segmentation=seg, num_classes=3, scale=1, padding=0)
    grey = (128, 128, 128)
    assert tuple(m[1, 1]) == grey  # background stays grey
    # first tile: slice 10 of the first axis, an (H, W) image: class 1 at rows/cols 8:12, class 2 at rows 14:18
    c1 = m[9, 9]
    assert len(set(c1)) > 1 and tuple(c1) != grey
    c2 = m[15, 9]
    assert len(set(c2)) > 1 and tuple(c2) != tuple(c1)
    # the second volume's row is overlaid the same way
    assert tuple(m[20 + 9, 9]) == tuple(c1)
    plain = montage_3d(v, scale=1, padding=0)
    assert (plain == 128).all()


def test_label_colors_distinct():
    colors = label_colors(20)
    assert colors.shape == (20, 3) and colors.dtype == np.uint8
    assert len({tuple(c) for c in colors[1:]}) == 19


def test_save_png_is_readable_and_leaves_no_temp(tmp_path):
    a = montage_2d(torch.rand(4, 1, 16, 16), labels=list("abcd"))
    path = save_png(a, tmp_path / "montages" / "iter_000001.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (a.shape[1], a.shape[0])
        assert np.array_equal(np.asarray(img.convert("RGB")), a)
    assert sorted(p.name for p in (tmp_path / "montages").iterdir()) == ["iter_000001.png"]
    save_png(a[..., 0], path)  # overwrite with a grey image
    with Image.open(path) as img:
        assert img.mode == "L"
    assert sorted(p.name for p in (tmp_path / "montages").iterdir()) == ["iter_000001.png"]
    with pytest.raises(ValueError):
        save_png(np.zeros((4, 4, 2), dtype=np.uint8), tmp_path / "bad.png")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_add_montage_to_tensorboard(tmp_path):
    calls = []

    class Writer:
        def add_image(self, tag, img, step, dataformats="CHW"):
            calls.append((tag, img.shape, step, dataformats))

    a = montage_3d(torch.rand(1, 1, 8, 8, 8), scale=1)
    add_montage_to_tensorboard(Writer(), "synthetic", a, 5)
    assert calls == [("synthetic", a.shape, 5, "HWC")]

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    add_montage_to_tensorboard(writer, "synthetic", a, 1)
    writer.close()
    assert any(p.name.startswith("events.out.tfevents") and p.stat().st_size > 0 for p in (tmp_path / "tb").iterdir())
