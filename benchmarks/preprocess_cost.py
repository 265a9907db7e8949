"""Preprocessing cost: core-milliseconds per image, naive Pillow versus the project's `image_to_tensor`.

Naive = what a first version does: ``Image.open(...).convert("RGB")`` (a full-size decode), resize the
shorter side to 256 (bicubic), centre-crop 224, scale and normalise with numpy. Ours = the one
bytes->tensor function with the ImageNet model's spec (header checks, EXIF, colour handling, JPEG draft
decoding, resize with a crop box). Single thread, CPU time of the process, median of rounds.

    python -m benchmarks.preprocess_cost [--rounds 5] [--megapixels 12]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.machine import RESULTS, machine_info, write_results

SPEC = {"input_size": [224, 224], "resize_size": 256, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}


def naive(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    scale = 256 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    arr = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    return ((arr - 0.5) / 0.5).transpose(2, 0, 1)


def inputs(megapixels: float) -> dict[str, bytes]:
    from training.sample_images import real_photos

    photo = Image.open(io.BytesIO(real_photos()["chelsea"])).convert("RGB")  # 451x300

    def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kwargs)
        return buf.getvalue()

    imagenet = photo.resize((500, 375), Image.Resampling.BICUBIC)
    scale = (megapixels * 1e6 / (photo.width * photo.height)) ** 0.5
    big = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BICUBIC)
    return {
        "jpeg_500x375": encode(imagenet, "JPEG", quality=90),
        f"jpeg_{megapixels:g}mp": encode(big, "JPEG", quality=90),
        "png_500x375": encode(imagenet, "PNG"),
        "webp_500x375": encode(imagenet, "WEBP", quality=90),
    }


def core_ms(fn: Callable[[bytes], object], data: bytes, min_seconds: float) -> float:
    fn(data)
    calls, start = 0, time.process_time()
    while (elapsed := time.process_time() - start) < min_seconds or calls < 3:
        fn(data)
        calls += 1
    return elapsed * 1000 / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU time per measurement")
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from service.preprocessing import PreprocessSpec, image_to_tensor

    spec = PreprocessSpec.model_validate(SPEC)
    ours: Callable[[bytes], object] = lambda data: image_to_tensor(data, spec)
    results: dict[str, Any] = {}
    for name, data in inputs(args.megapixels).items():
        timings: dict[str, list[float]] = {"naive": [], "ours": []}
        for _ in range(args.rounds):
            timings["naive"].append(core_ms(naive, data, args.seconds))
            timings["ours"].append(core_ms(ours, data, args.seconds))
        medians = {k: statistics.median(v) for k, v in timings.items()}
        results[name] = {"bytes": len(data), "core_ms": medians, "speedup": medians["naive"] / medians["ours"],
                         "max_abs_difference": float(np.abs(naive(data) - ours(data)).max())}
        print(name, results[name], flush=True)
    payload = {"machine": machine_info(("pillow", "numpy")), "settings": {"rounds": args.rounds, "spec": SPEC},
               "results": results}
    m = payload["machine"]
    lines = ["# Preprocessing cost: core-ms per image, naive Pillow vs `image_to_tensor`", "",
             (f"{m['cpu']}; pillow {m['versions']['pillow']}, numpy {m['versions']['numpy']}; {m['date']}. "
              f"Single thread, process CPU time, median of {args.rounds} rounds. Spec: resize 256 bicubic, crop 224."),
             "", "| input | bytes | naive core-ms | ours core-ms | naive / ours | max pixel difference |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r['bytes']:,} | {r['core_ms']['naive']:.2f} | {r['core_ms']['ours']:.2f} | "
              f"{r['speedup']:.2f}x | {r['max_abs_difference']:.3f} |" for n, r in results.items()]
    write_results("preprocess_cost", payload, "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
