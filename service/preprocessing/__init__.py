"""The one path from image bytes to a model's input tensor.

Training evaluation, export checks, batch jobs and the HTTP service all call
:func:`image_to_tensor`, so the accuracy reported at training time is the
accuracy users get. Nothing else in the project turns bytes into a tensor.

The bytes come from untrusted clients, so decoding is defensive: the format is
taken from the magic numbers (never a file name), Pillow may only use the
matching plugin, sizes are checked from the header before any pixel is decoded,
and every failure inside Pillow becomes an :class:`ImageInputError` (a 4xx),
never a 500. Nothing here touches Pillow's global settings
(``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``) or keeps any
mutable state of its own, so the functions are safe to call from many threads.

Pillow still reports some oddities of damaged files through :mod:`warnings`
(for example TIFF's "Corrupt EXIF data"); silencing those would need
``warnings.catch_warnings``, which is not thread-safe, so it is left to the
application. Pillow's ``DecompressionBombWarning`` is not among them: images
that large are refused from their header before Pillow looks at them.

Modules: ``spec`` (the contract type and errors), ``sniff`` (format and header probes),
``bmff`` (the boxes of AVIF and HEIF/HEIC headers), ``decode`` (Pillow, EXIF, colour),
``tensor`` (resize, crop, normalise).
"""

from service.preprocessing.decode import decode_for_spec, decode_image
from service.preprocessing.sniff import IMAGE_SUFFIXES, SUPPORTED_FORMATS, detect_format
from service.preprocessing.spec import (
    ColorMode,
    DecodeLimits,
    ImageInputError,
    ImageTooLargeError,
    Interpolation,
    PreprocessSpec,
    UnsupportedFormatError,
)
from service.preprocessing.tensor import image_to_tensor, resize_and_crop, to_array

__all__ = [
    "IMAGE_SUFFIXES", "SUPPORTED_FORMATS", "ColorMode", "DecodeLimits", "ImageInputError", "ImageTooLargeError",
    "Interpolation", "PreprocessSpec", "UnsupportedFormatError", "decode_for_spec", "decode_image",
    "detect_format", "image_to_tensor", "resize_and_crop", "to_array",
]
