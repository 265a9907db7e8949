"""What JPEG draft decoding (libjpeg reduced-scale decode) costs in accuracy and buys in time.

Real photos are enlarged to phone-photo size (about 12 megapixels, saved as JPEG), then fed to the
ImageNet EfficientNet-Lite0 through the shared preprocessing twice: draft on (the default) and off.
Reported: top-1 agreement, largest probability difference, and the median decode+preprocess time.

    python -m benchmarks.draft_effect [--repo DIR] [--megapixels 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.machine import RESULTS, machine_info, write_results


def enlarge(data: bytes, megapixels: float) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    scale = (megapixels * 1e6 / (img.width * img.height)) ** 0.5
    big = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="model repository holding imagenet-lite0 (default: bootstrap one)")
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from service.preprocessing import image_to_tensor
    from service.repository import ModelRepository
    from service.runtime import create_session, run_logits, softmax
    from training.sample_images import real_photos

    with tempfile.TemporaryDirectory() as tmp:
        repo = ModelRepository(args.repo or Path(tmp))
        if not args.repo:
            from training.bootstrap import bootstrap

            bootstrap(repo)
        version = repo.get("imagenet-lite0")
        session = create_session(version.model_path)
        specs = {"draft": version.manifest.preprocessing,
                 "full": version.manifest.preprocessing.model_copy(update={"draft": False})}
        photos = {name: enlarge(data, args.megapixels) for name, data in real_photos().items()}
        ms: dict[str, list[float]] = {k: [] for k in specs}
        probs: dict[str, dict[str, np.ndarray]] = {k: {} for k in specs}
        for _ in range(args.rounds):
            for name, data in photos.items():
                for mode, spec in specs.items():  # alternate, so drift affects both equally
                    start = time.perf_counter()
                    tensor = image_to_tensor(data, spec)
                    ms[mode].append((time.perf_counter() - start) * 1000)
                    probs[mode][name] = softmax(run_logits(session, tensor[None]))[0]
    labels = version.manifest.labels
    rows = {
        name: {"full": labels[int(probs["full"][name].argmax())], "draft": labels[int(probs["draft"][name].argmax())],
               "max_prob_diff": float(np.abs(probs["full"][name] - probs["draft"][name]).max())}
        for name in photos
    }
    payload = {
        "benchmark": "draft_effect",
        "machine": machine_info(),
        "settings": {"megapixels": args.megapixels, "rounds": args.rounds, "images": len(photos)},
        "median_ms_per_image": {k: statistics.median(v) for k, v in ms.items()},
        "top1_agreement": float(np.mean([r["full"] == r["draft"] for r in rows.values()])),
        "max_prob_diff": max(r["max_prob_diff"] for r in rows.values()),
        "per_image": rows,
    }
    med = payload["median_ms_per_image"]
    md = "\n".join([
        "# JPEG draft decoding: effect on answers and time",
        "",
        (
            f"Machine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores; {len(photos)} real photos "
            f"enlarged to {args.megapixels:g} MP JPEGs; imagenet-lite0; {payload['machine']['date']}."
        ),
        "",
        (
            f"- decode + preprocess, median per image: full {med['full']:.1f} ms, draft {med['draft']:.1f} ms "
            f"({med['full'] / med['draft']:.1f}x faster)"
        ),
        f"- top-1 agreement: {payload['top1_agreement']:.0%}; largest probability difference: {payload['max_prob_diff']:.4f}",
        "",
        "| photo | top-1 full decode | top-1 draft | max prob diff |",
        "|---|---|---|---|",
        *(f"| {n} | {r['full']} | {r['draft']} | {r['max_prob_diff']:.4f} |" for n, r in rows.items()),
        "",
    ])
    write_results("draft_effect", payload, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
