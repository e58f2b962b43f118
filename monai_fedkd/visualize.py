"""Montages of synthetic inputs: RGB ``uint8`` arrays ``(H, W, 3)`` for PNG files (Pillow) and TensorBoard.

* :func:`montage_2d`: a grid of 2D images (first channel as grey, or RGB when there are 3 channels), with optional
  text labels (e.g. target or predicted class names) under each tile and an optional label-map overlay;
* :func:`montage_3d`: one row per volume with its middle slices across the three spatial axes side by side,
  with an optional segmentation overlay (alpha-blended colour per class, background transparent);
* :func:`save_png` writes atomically (temporary name in the same folder, then rename);
* :func:`add_montage_to_tensorboard` logs a montage with ``writer.add_image(..., dataformats="HWC")``.
"""

from __future__ import annotations

import colorsys
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["montage_2d", "montage_3d", "label_colors", "save_png", "add_montage_to_tensorboard"]

# distinct colours for classes 1, 2, ... (class 0, the background, is not drawn)
_BASE_COLORS = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
]
_PAD_VALUE = 0  # colour of the gaps between tiles
_LABEL_BG = 32  # background of the text band under labelled 2D tiles


def label_colors(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 colours; row 0 (background) is black and is never drawn by the overlays."""
    colors = np.zeros((max(int(num_classes), 1), 3), dtype=np.uint8)
    for c in range(1, len(colors)):
        if c - 1 < len(_BASE_COLORS):
            colors[c] = _BASE_COLORS[c - 1]
        else:  # golden-ratio hue steps for further classes
            h = (0.13 + 0.618033988749895 * c) % 1.0
            colors[c] = [round(255 * v) for v in colorsys.hsv_to_rgb(h, 0.85, 0.95)]
    return colors


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.dtype.is_floating_point:
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _to_uint8(x: np.ndarray, value_range: Sequence[float]) -> np.ndarray:
    low, high = float(value_range[0]), float(value_range[1])
    if not high > low:
        raise ValueError(f"value_range must be [low, high] with high > low, got {list(value_range)}")
    x = np.nan_to_num(x.astype(np.float64), nan=low, posinf=high, neginf=low)
    x = (x - low) / (high - low)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _overlay(rgb: np.ndarray, labels: np.ndarray, colors: np.ndarray, alpha: float) -> np.ndarray:
    """Alpha-blend ``colors[labels]`` over ``rgb`` where ``labels > 0``; ``labels`` is ``rgb.shape[:2]``."""
    labels = labels.astype(np.int64)
    if labels.min(initial=0) < 0:
        raise ValueError("segmentation labels must be >= 0")
    mask = labels > 0
    if not mask.any():
        return rgb
    if labels.max() >= len(colors):
        colors = label_colors(int(labels.max()) + 1)
    out = rgb.astype(np.float32)
    out[mask] = (1.0 - alpha) * out[mask] + alpha * colors[labels[mask]].astype(np.float32)
    return np.round(out).clip(0, 255).astype(np.uint8)


def _upscale(a: np.ndarray, scale: int) -> np.ndarray:
    if scale == 1:
        return a
    return np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)


def _grey_rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=-1)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _fit_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".." if text else ""


def montage_2d(
    images,
    labels: Sequence[str] | None = None,
    nrow: int = 8,
    value_range: Sequence[float] = (0.0, 1.0),
    padding: int = 2,
    scale: int | None = None,
    segmentation=None,
    num_classes: int | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Grid of 2D images ``(B, C, H, W)`` (tensor or array) as an RGB ``uint8`` array ``(H', W', 3)``.

    Args:
        images: ``(B, C, H, W)``; ``C == 3`` is shown as RGB, otherwise the first channel as grey.
        labels: optional text per image (e.g. class names), drawn with PIL's default font under each tile.
        nrow: images per grid row.
        value_range: intensity range mapped to black..white (values outside are clipped).
        padding: pixels between tiles and around the grid.
        scale: integer nearest-neighbour upscaling of each tile; ``None``: ``max(1, 64 // max(H, W))`` (28x28 -> 2).
        segmentation: optional ``(B, H, W)`` (or ``(B, 1, H, W)``) integer label maps overlaid in colour.
        num_classes: number of segmentation classes (colour table size); default ``max label + 1``.
        alpha: overlay opacity.
    """
    x = _to_numpy(images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[0] < 1:
        raise ValueError(f"images must be (B, C, H, W), got shape {x.shape}")
    b, c, h, w = x.shape
    if labels is not None and len(labels) != b:
        raise ValueError(f"{len(labels)} labels for {b} images")
    seg = None
    if segmentation is not None:
        seg = _to_numpy(segmentation)
        if seg.ndim == 4 and seg.shape[1] == 1:
            seg = seg[:, 0]
        if seg.shape != (b, h, w):
            raise ValueError(f"segmentation must be (B, H, W) = {(b, h, w)}, got {seg.shape}")
    scale = max(1, 64 // max(h, w)) if scale is None else int(scale)
    if scale < 1 or nrow < 1 or padding < 0:
        raise ValueError("scale and nrow must be >= 1, padding >= 0")
    colors = label_colors(num_classes if num_classes is not None else (int(seg.max()) + 1 if seg is not None else 1))

    x8 = _to_uint8(x, value_range)
    tiles = []
    for i in range(b):
        rgb = np.moveaxis(x8[i, :3], 0, -1) if c == 3 else _grey_rgb(x8[i, 0])
        if seg is not None:
            rgb = _overlay(rgb, seg[i], colors, alpha)
        tiles.append(_upscale(rgb, scale))

    th, tw = h * scale, w * scale
    font = draw = None
    text_h = 0
    if labels is not None:
        from PIL import Image, ImageDraw

        font = _font()
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        top, bottom = probe.textbbox((0, 0), "Ag|", font=font)[1::2]
        text_h = int(bottom - top) + 3
    cols = min(int(nrow), b)
    rows = -(-b // cols)
    cell_h, cell_w = th + text_h, tw
    out = np.full(
        (padding + rows * (cell_h + padding), padding + cols * (cell_w + padding), 3), _PAD_VALUE, dtype=np.uint8
    )
    for i, tile in enumerate(tiles):
        r, col = divmod(i, cols)
        y0, x0 = padding + r * (cell_h + padding), padding + col * (cell_w + padding)
        out[y0 : y0 + th, x0 : x0 + tw] = tile
        if text_h:
            out[y0 + th : y0 + cell_h, x0 : x0 + tw] = _LABEL_BG
    if labels is not None:
        from PIL import Image, ImageDraw

        img = Image.fromarray(out)
        draw = ImageDraw.Draw(img)
        for i, text in enumerate(labels):
            r, col = divmod(i, cols)
            y0, x0 = padding + r * (cell_h + padding), padding + col * (cell_w + padding)
            text = _fit_text(draw, str(text), font, tw - 2)
            if text:
                top = draw.textbbox((0, 0), text, font=font)[1]
                draw.text((x0 + 1, y0 + th + 1 - top), text, fill=(235, 235, 235), font=font)
        out = np.asarray(img, dtype=np.uint8).copy()
    return out


def _pad_to(a: np.ndarray, height: int, width: int) -> np.ndarray:
    if a.shape[0] == height and a.shape[1] == width:
        return a
    out = np.full((height, width, 3), _PAD_VALUE, dtype=np.uint8)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def montage_3d(
    volumes,
    segmentation=None,
    num_classes: int | None = None,
    max_items: int = 4,
    value_range: Sequence[float] = (0.0, 1.0),
    padding: int = 2,
    scale: int | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Middle slices of volumes ``(B, C, D, H, W)`` as an RGB ``uint8`` array, one row per volume.

    Each row shows, side by side, the middle slice across the first spatial axis (an ``H x W`` image), across
    the second (``D x W``) and across the third (``D x H``): the axial/coronal/sagittal planes for volumes stored
    ``(D, H, W)`` with ``D`` the slice axis (for MONAI's ``(H, W, D)`` RAS volumes, the third tile is axial).

    Args:
        volumes: ``(B, C, D, H, W)`` tensor or array (first channel shown, as grey).
        segmentation: optional ``(B, D, H, W)`` (or ``(B, 1, D, H, W)``) integer label maps, overlaid with a
            distinct colour per class (alpha-blended; background 0 transparent).
        num_classes: number of segmentation classes (colour table size); default ``max label + 1``.
        max_items: at most this many volumes (rows).
        value_range: intensity range mapped to black..white.
        padding: pixels between tiles and around the montage.
        scale: integer nearest-neighbour upscaling; ``None``: ``max(1, 96 // max(D, H, W))`` (28^3 -> 3).
        alpha: overlay opacity.
    """
    v = _to_numpy(volumes)
    if v.ndim == 4:
        v = v[:, None]
    if v.ndim != 5 or v.shape[0] < 1:
        raise ValueError(f"volumes must be (B, C, D, H, W), got shape {v.shape}")
    n = min(v.shape[0], int(max_items))
    if n < 1:
        raise ValueError("max_items must be >= 1")
    v = v[:n, 0]
    size = v.shape[1:]
    seg = None
    if segmentation is not None:
        seg = _to_numpy(segmentation)
        if seg.ndim == 5 and seg.shape[1] == 1:
            seg = seg[:, 0]
        if seg.ndim != 4 or seg.shape[1:] != size or seg.shape[0] < n:
            raise ValueError(f"segmentation must be (B, D, H, W) with spatial size {size}, got {seg.shape}")
        seg = seg[:n]
    scale = max(1, 96 // max(size)) if scale is None else int(scale)
    if scale < 1 or padding < 0:
        raise ValueError("scale must be >= 1 and padding >= 0")
    colors = label_colors(num_classes if num_classes is not None else (int(seg.max()) + 1 if seg is not None else 1))

    v8 = _to_uint8(v, value_range)
    mid = [s // 2 for s in size]

    def planes(a: np.ndarray) -> list[np.ndarray]:
        return [a[mid[0], :, :], a[:, mid[1], :], a[:, :, mid[2]]]

    tile_h = max(size[1], size[0]) * scale  # H (first plane) or D (other planes)
    widths = [size[2] * scale, size[2] * scale, size[1] * scale]
    width = padding + sum(w + padding for w in widths)
    out = np.full((padding + n * (tile_h + padding), width, 3), _PAD_VALUE, dtype=np.uint8)
    for i in range(n):
        grey = planes(v8[i])
        labs = planes(seg[i]) if seg is not None else [None] * 3
        y0 = padding + i * (tile_h + padding)
        x0 = padding
        for img, lab, w in zip(grey, labs, widths):
            rgb = _grey_rgb(img)
            if lab is not None:
                rgb = _overlay(rgb, lab, colors, alpha)
            tile = _pad_to(_upscale(rgb, scale), tile_h, w)
            out[y0 : y0 + tile_h, x0 : x0 + w] = tile
            x0 += w + padding
    return out


def save_png(array, path: str | os.PathLike) -> Path:
    """Write ``array`` (``(H, W, 3)``/``(H, W, 4)``/``(H, W)`` uint8, or floats in [0, 1]) as a PNG, atomically.

    The image is written under a temporary name in the destination folder and renamed into place, so a reader
    never sees a partial file; parent folders are created. Returns the path.
    """
    from PIL import Image

    a = _to_numpy(array)
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"save_png expects uint8 (or float in [0, 1]) arrays, got {a.dtype}")
        a = _to_uint8(a, (0.0, 1.0))
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ValueError(f"save_png expects (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name opened exclusively (not mkstemp, whose 0600 mode would stay on the renamed file)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "xb") as f:
            Image.fromarray(np.ascontiguousarray(a)).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def add_montage_to_tensorboard(writer, tag: str, array, step: int) -> None:
    """Log a montage (``(H, W, 3)`` or ``(H, W)`` uint8) to a TensorBoard ``SummaryWriter``."""
    a = _to_numpy(array)
    writer.add_image(tag, a, step, dataformats="HWC" if a.ndim == 3 else "HW")
