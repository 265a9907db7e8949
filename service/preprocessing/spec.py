"""The contract between a model and its pixels: the preprocessing spec, decode limits, input errors.

The spec travels with the weights (like timm's ``pretrained_cfg``) into the manifest; this module
imports no Pillow so the manifest and the schemas can use it cheaply.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
ColorMode = Literal["RGB", "L"]


class PreprocessSpec(BaseModel):
    """How a model wants its pixels: travels with the weights, like timm's pretrained_cfg."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: tuple[int, int] = Field(description="(height, width) of the model input")
    resize_size: int = Field(gt=0, description="shorter side after resizing, before the centre crop")
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    color_mode: ColorMode = "RGB"
    background: tuple[int, int, int] = Field(
        default=(255, 255, 255), description="RGB colour that transparent pixels are composited on"
    )
    draft: bool = Field(
        default=True,
        description="decode large JPEGs at reduced scale (libjpeg draft) when the target allows",
    )

    @property
    def channels(self) -> int:
        return 3 if self.color_mode == "RGB" else 1

    @property
    def draft_short_side(self) -> int | None:
        """What to pass as ``decode_image(min_short_side=...)``; None when draft is off.

        The largest side the resize can produce: ``resize_size``, or a side of
        ``input_size`` if that is longer (the crop then stretches the image).
        """
        if not self.draft:
            return None
        return max(self.resize_size, *self.input_size)

    @model_validator(mode="after")
    def _check(self) -> PreprocessSpec:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values for color_mode {self.color_mode}")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError("mean and std values must be finite")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if min(self.input_size) <= 0:
            raise ValueError("input_size must be positive")
        if self.resize_size < min(self.input_size):
            raise ValueError("resize_size must be at least the smaller side of input_size")
        if not all(0 <= c <= 255 for c in self.background):
            raise ValueError("background values must be in 0..255")
        return self


class DecodeLimits(BaseModel):
    """What an input may cost before we refuse it.

    ``max_pixels`` is capped by Pillow's own ``Image.MAX_IMAGE_PIXELS`` (read,
    never changed), so Pillow's bomb protection never fires before ours.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=50_000_000, gt=0)
    min_side: int = Field(default=8, gt=0)


class ImageInputError(ValueError):
    """A client's image cannot be used; ``status_code`` says which 4xx it maps to."""

    status_code = 400
    kind = "invalid_image"


class UnsupportedFormatError(ImageInputError):
    status_code = 415
    kind = "unsupported_format"


class ImageTooLargeError(ImageInputError):
    status_code = 413
    kind = "image_too_large"

