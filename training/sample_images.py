"""Real photographs that install with our dependencies: export checks need real images offline."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def _jpeg(array: np.ndarray | Image.Image, quality: int = 92) -> bytes:
    img = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def real_photos() -> dict[str, bytes]:
    """scikit-image, scikit-learn and matplotlib's bundled photos, as JPEG bytes."""
    import matplotlib
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: _jpeg(getattr(data, name)()) for name in ("chelsea", "coffee", "astronaut", "rocket", "camera")}
    sample = load_sample_images()
    for filename, image in zip(sample.filenames, sample.images, strict=True):
        photos[Path(filename).stem] = _jpeg(image)
    photos["grace_hopper"] = (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes()
    return photos


def photo_variants(count: int) -> list[bytes]:
    """At least ``count`` real images: the photos, then flipped, cropped and rotated views of them."""
    photos = list(real_photos().values())
    views = [
        ImageOps.mirror,
        lambda im: im.crop((im.width // 6, im.height // 6, im.width * 5 // 6, im.height * 5 // 6)),
        lambda im: im.rotate(90, expand=True),
        lambda im: ImageOps.mirror(im.crop((0, 0, im.width * 2 // 3, im.height * 2 // 3))),
    ]
    out = photos[:count]
    for view in views:
        for photo in photos:
            if len(out) >= count:
                return out
            out.append(_jpeg(view(Image.open(io.BytesIO(photo)))))
    return out
