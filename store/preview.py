"""A per-class image grid of a store, to see at a glance what a synthesis method makes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from .toolbox import fs
from .access import open as open_store
from .toolbox.errors import StoreError


def _to_rgb(img: np.ndarray) -> np.ndarray:
    """C×H×W uint8 -> H×W×3 for display (grey for one channel, first three channels otherwise)."""
    if img.shape[0] == 1:
        return np.repeat(img[0][..., None], 3, axis=-1)
    if img.shape[0] == 2:
        img = np.concatenate([img, img[:1]])
    return np.moveaxis(img[:3], 0, -1)


def preview(path: str, out: str, per_class: int = 8, min_cell: int = 32) -> tuple[int, int]:
    """Write a PNG with one row per class (by label, else teacher argmax); returns (rows, columns)."""
    if per_class < 1:
        raise StoreError(f"per_class must be >= 1, got {per_class}")
    reader = open_store(path)
    m = reader.meta
    rows: list[list[np.ndarray]] = [[] for _ in range(m.num_classes)]
    for _, rec in reader.iter_units():
        cls = np.where(rec.labels >= 0, rec.labels, np.asarray(rec.logits, np.float32).argmax(1))
        for img, k in zip(rec.images, cls):
            if len(rows[k]) < per_class:
                rows[k].append(img)
        if all(len(r) >= per_class for r in rows):
            break
    if not any(rows):
        raise StoreError(f"{path} has no finished samples to preview; finish it with --resume")
    _, h, w = m.image_shape
    scale = max(1, -(-min_cell // max(h, w)))
    ch, cw, gap, margin = h * scale, w * scale, 2, 28
    cols = max(len(r) for r in rows)  # as many columns as a class has images, not as many as were asked for
    canvas = Image.new("RGB", (margin + cols * (cw + gap), m.num_classes * (ch + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, imgs in enumerate(rows):
        y = k * (ch + gap)
        draw.text((2, y + ch // 2 - 5), str(k), fill=(0, 0, 0))
        for j, img in enumerate(imgs):
            tile = Image.fromarray(_to_rgb(img)).resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (margin + j * (cw + gap), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    fs.write_atomic(out, buf.getvalue())
    return m.num_classes, cols
