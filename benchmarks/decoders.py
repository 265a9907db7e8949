"""Is a libjpeg-turbo binding faster than Pillow's decoder for what imgclf does with JPEGs?

Both sides decode the same real-photo JPEGs at the same DCT-domain scale (Pillow's ``draft`` as
``service.preprocessing.decode`` asks for it; ``simplejpeg``'s ``min_width``/``min_height`` to the
same size) with the same IDCT and upsampling (libjpeg's defaults: islow, fancy upsampling), to RGB
numpy arrays. Reported: median ms per image over alternating rounds, the ratio, whether the pixels
are identical, and what share of the whole ``image_to_tensor`` the decode is. Sizes: ImageNet-sized
(500x375) and 12-megapixel phone-sized photos.

    python -m benchmarks.decoders [--rounds 7] [--megapixels 12]
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.machine import RESULTS, machine_info, write_results


def draft_size(width: int, height: int, min_short_side: int) -> tuple[int, int] | None:
    """The size ``_apply_draft`` requests (None: no reduction)."""
    target = 2 * min_short_side
    if min(width, height) < 2 * target:
        return None
    scale = target / min(width, height)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def pillow(data: bytes, min_short_side: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data), formats=["JPEG"])
    size = draft_size(*img.size, min_short_side)
    if size:
        img.draft("RGB", size)
    return np.asarray(img.convert("RGB"))


def simplejpeg_decode(data: bytes, min_short_side: int) -> np.ndarray:
    import simplejpeg

    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    size = draft_size(width, height, min_short_side)
    # Pillow's draft takes the largest 1/k (k = 8, 4, 2, 1) that keeps both sides >= the request;
    # simplejpeg also has libjpeg-turbo's M/8 factors, so it is asked for exactly 1/k's size.
    k = next((k for k in (8, 4, 2) if size and min(width // size[0], height // size[1]) >= k), 1)
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=math.ceil(width / k),
                                  min_height=math.ceil(height / k), fastdct=False, fastupsample=False)


def per_image_ms(decode: Callable[[bytes, int], np.ndarray], images: list[bytes], side: int) -> float:
    start = time.perf_counter()
    for data in images:
        decode(data, side)
    return 1000 * (time.perf_counter() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from benchmarks.draft_effect import enlarge
    from service.preprocessing import PreprocessSpec, image_to_tensor
    from training.sample_images import real_photos

    spec = PreprocessSpec(input_size=(224, 224), resize_size=256, mean=(0.5,) * 3, std=(0.5,) * 3,
                          interpolation="bicubic")
    side = spec.draft_short_side or 256
    photos = list(real_photos().values())
    sets = {"small": [], "12 MP": [enlarge(p, args.megapixels) for p in photos]}
    for p in photos:
        img = Image.open(io.BytesIO(p)).convert("RGB")
        img.thumbnail((500, 500))
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=90)
        sets["small"].append(buffer.getvalue())

    rows = {}
    for kind, images in sets.items():
        same = all(np.array_equal(pillow(d, side), simplejpeg_decode(d, side)) for d in images)
        times: dict[str, list[float]] = {"pillow": [], "simplejpeg": [], "image_to_tensor": []}
        for r in range(args.rounds):
            order = [("pillow", pillow), ("simplejpeg", simplejpeg_decode)]
            for key, fn in order if r % 2 == 0 else order[::-1]:
                times[key].append(per_image_ms(fn, images, side))
            times["image_to_tensor"].append(per_image_ms(lambda d, _: image_to_tensor(d, spec), images, side))
        medians = {k: statistics.median(v) for k, v in times.items()}
        rows[kind] = {"images": len(images), "identical_pixels": same, "ms": medians, "rounds": times,
                      "ratio": statistics.median(p / s for p, s in zip(times["pillow"], times["simplejpeg"], strict=True))}

    info = machine_info(("pillow", "simplejpeg", "numpy"))
    lines = [
        "# JPEG decoding: Pillow (draft) against simplejpeg (libjpeg-turbo's own scaling)", "",
        (f"{info['cpu']}, {info['cores']} cores; Pillow {info['versions']['pillow']}, simplejpeg "
        f"{info['versions']['simplejpeg']}; {info['date']}. One thread, {args.rounds} alternating rounds."), "",
        "| photos | images | Pillow ms | simplejpeg ms | Pillow / simplejpeg | identical pixels | whole image_to_tensor ms |",
        "|---|---|---|---|---|---|---|",
        *[f"| {k} | {r['images']} | {r['ms']['pillow']:.2f} | {r['ms']['simplejpeg']:.2f} | {r['ratio']:.2f} | "
          f"{'yes' if r['identical_pixels'] else 'no'} | {r['ms']['image_to_tensor']:.2f} |" for k, r in rows.items()],
        "",
    ]
    write_results("decoders", {"machine": info, "rows": rows}, "\n".join(lines), args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
