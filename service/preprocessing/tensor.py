"""Resize, centre-crop and normalise: the eval preset (torchvision's ``ClassificationPresetEval``),
and :func:`image_to_tensor`, the one function from bytes to a model's input."""

from __future__ import annotations

import numpy as np
from PIL import Image

from service.preprocessing.decode import decode_for_spec
from service.preprocessing.spec import DecodeLimits, ImageTooLargeError, PreprocessSpec

_PIL_RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resize_and_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize the shorter side to ``spec.resize_size`` and centre-crop ``spec.input_size``.

    Only the crop window is resampled (Pillow's ``box``): the same mapping as
    resizing the whole image and cropping, up to 1 grey level of rounding (the
    "box" filter may also settle exact ties the other way), but memory and time
    are spent on the output only; an 8x5_000_000 strip would otherwise be
    resized to 256x160_000_000 first. No ``reducing_gap``: it would shave a
    few ms off large non-JPEG inputs at the price of changing the filter the
    spec names.
    """
    w, h = img.size
    th, tw = spec.input_size
    scale = spec.resize_size / min(w, h)
    new_w, new_h = max(tw, round(w * scale)), max(th, round(h * scale))
    left, top = round((new_w - tw) / 2.0), round((new_h - th) / 2.0)
    if (new_w, new_h) == (w, h):
        return img.crop((left, top, left + tw, top + th))
    sx, sy = w / new_w, h / new_h
    box = (
        max(0.0, left * sx),
        max(0.0, top * sy),
        min(float(w), (left + tw) * sx),
        min(float(h), (top + th) * sy),
    )
    return img.resize((tw, th), _PIL_RESAMPLE[spec.interpolation], box=box, reducing_gap=None)


def to_array(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Scale to [0, 1], normalise with the spec's mean/std, return float32 CHW."""
    if img.mode != spec.color_mode:
        raise ValueError(f"to_array needs a {spec.color_mode} image, got mode {img.mode}")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1))


def image_to_tensor(data: bytes, spec: PreprocessSpec, limits: DecodeLimits | None = None) -> np.ndarray:
    """Bytes -> float32 (C, H, W) array ready for the model. The only such function.

    For any bytes it returns a finite array of shape ``(spec.channels, *spec.input_size)``
    or raises :class:`ImageInputError` (or a subclass).
    """
    img = decode_for_spec(data, spec, limits)
    try:
        return to_array(resize_and_crop(img, spec), spec)
    except MemoryError as exc:
        raise ImageTooLargeError("image is too large to resize in the available memory") from exc
