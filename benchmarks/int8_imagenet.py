"""Should the bootstrap ImageNet model serve int8 on CPUs? Top-1 agreement with fp32 on real photos.

The bootstrap EfficientNet-Lite0 has no labelled validation set offline, so the export gate's
accuracy check cannot decide for it. This measures what it can: how often int8 and fp32 agree on
the top-1 class and how far the top-1 score moves, on the real photos bundled with scikit-image,
scikit-learn and matplotlib and on crops and mirror images of them, each through the one
preprocessing path (``image_to_tensor``). Calibration and evaluation never share a photo: the
photos are split in two, each half calibrates a model that is judged on the other half.
The rule (issue 18): int8 becomes the CPU default only if agreement is at least 99%.

    python -m benchmarks.int8_imagenet [--models DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from benchmarks.int8_digits import images_per_second
from benchmarks.machine import RESULTS, imagenet_repository, machine_info, write_results

log = logging.getLogger("benchmarks.int8_imagenet")
AGREEMENT_RULE = 0.99
SCALES = (1.0, 0.8, 0.6, 0.45)  # crop side / shorter image side; 1.0 is the whole photo


def photos() -> dict[str, bytes]:
    """Every real photo the offline wheels carry (grey ones too: users send them)."""
    from skimage import data

    from training.sample_images import _jpeg, real_photos

    out = real_photos()
    for name in ("clock", "coins", "brick", "gravel", "grass", "hubble_deep_field", "immunohistochemistry", "moon"):
        try:
            out[name] = _jpeg(getattr(data, name)())
        except Exception as exc:  # noqa: BLE001 - an image the installed scikit-image lacks or must download
            log.warning("skipping skimage %s: %s", name, exc)
    return out


def views(jpeg: bytes) -> list[bytes]:
    """The photo, square crops at four scales on a 3x3 grid, and the mirror image of each."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    side = min(image.size)
    out = []
    for scale in SCALES:
        s = int(side * scale)
        positions = [(0, 0)] if scale == 1.0 else [(fx, fy) for fx in (0, 0.5, 1) for fy in (0, 0.5, 1)]
        for fx, fy in positions:
            left, top = int((image.width - s) * fx), int((image.height - s) * fy)
            crop = image if scale == 1.0 else image.crop((left, top, left + s, top + s))
            for view in (crop, ImageOps.mirror(crop)):
                buffer = io.BytesIO()
                view.save(buffer, "JPEG", quality=92)
                out.append(buffer.getvalue())
    return out


def tensors(items: list[bytes], spec: Any) -> np.ndarray:
    from service.preprocessing import image_to_tensor

    return np.stack([image_to_tensor(b, spec) for b in items])


def probabilities(session: Any, batch: np.ndarray) -> np.ndarray:
    from service.runtime import run_logits, softmax

    return np.concatenate([softmax(run_logits(session, batch[i:i + 32])) for i in range(0, len(batch), 32)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help="a model repository holding imagenet-lite0 (default: bootstrap one)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--photos", type=int, default=None, help="use only the first N photos (a smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from service.repository import ModelRepository
    from service.runtime import create_session
    from training.export.variants import quantize_int8

    with tempfile.TemporaryDirectory() as tmp:
        version = ModelRepository(imagenet_repository(args.models, Path(tmp))).get("imagenet-lite0")
        spec = version.manifest.preprocessing
        fp32 = create_session(version.model_path, intra_op_threads=0)
        every = photos()
        names = sorted(every)[:args.photos]
        by_photo = {name: tensors(views(every[name]), spec) for name in names}
        halves = (names[0::2], names[1::2])
        rows: list[dict[str, Any]] = []
        int8_paths = []
        for fold, (calibrate, judge) in enumerate((halves, halves[::-1])):
            path = Path(tmp) / f"int8-{fold}.onnx"
            quantize_int8(version.model_path, path, np.concatenate([by_photo[n] for n in calibrate]))
            int8_paths.append(path)
            int8 = create_session(path, intra_op_threads=0)
            for name in judge:
                p32, p8 = probabilities(fp32, by_photo[name]), probabilities(int8, by_photo[name])
                top32, top8 = p32.argmax(1), p8.argmax(1)
                sure = p32.max(1) >= 0.5  # views where fp32 itself is fairly sure
                rows.append({"photo": name, "fold": fold, "views": len(top32), "agree": int((top32 == top8).sum()),
                             "sure_views": int(sure.sum()), "sure_agree": int((top32 == top8)[sure].sum()),
                             "top1_score_change": float(np.abs(p32.max(1) - p8[np.arange(len(top8)), top32]).mean())})
        views_total, agree_total = sum(r["views"] for r in rows), sum(r["agree"] for r in rows)
        agreement = agree_total / views_total
        sure_total, sure_agree = sum(r["sure_views"] for r in rows), sum(r["sure_agree"] for r in rows)
        batch = by_photo[names[0]][:8]
        int8 = create_session(int8_paths[0], intra_op_threads=0)
        speed: dict[str, list[float]] = {"fp32": [], "int8": []}
        for _ in range(args.rounds):
            for key, session in (("fp32", fp32), ("int8", int8)):
                speed[key].append(images_per_second(session, batch, repeats=5))
        ratio = statistics.median(b / a for a, b in zip(speed["fp32"], speed["int8"], strict=True))

    verdict = "meets" if agreement >= AGREEMENT_RULE else "misses"
    payload = {"machine": machine_info(), "photos": len(names), "views": views_total, "agreement": agreement,
               "rule": AGREEMENT_RULE, "sure_views": sure_total,
               "sure_agreement": sure_agree / sure_total if sure_total else None, "rows": rows, "images_per_s": speed, "int8_speedup_median": ratio}
    lines = [
        "# int8 against fp32 for the bootstrap ImageNet model (EfficientNet-Lite0)", "",
        (f"{payload['machine']['cpu']}, {payload['machine']['cores']} cores; onnxruntime "
        f"{payload['machine']['versions']['onnxruntime']}; {payload['machine']['date']}."), "",
        (f"{len(names)} real photos, {views_total} views (the photo, square crops at scales {list(SCALES)} on a "
        "3x3 grid, each mirrored), through `image_to_tensor`. Static per-channel QDQ with 7-bit weights "
        "(the export's `quantize_int8`), calibrated on the other half of the photos (two folds)."), "",
        (f"**Top-1 agreement: {agreement:.1%}** ({agree_total}/{views_total}); the rule is >= {AGREEMENT_RULE:.0%}: "
        f"it **{verdict}** it. On the {sure_total} views where fp32's top-1 score is at least 0.5: "
         f"{sure_agree}/{sure_total}. int8 speed-up at batch 8: {ratio:.2f}x (median of {args.rounds} alternating "
         "rounds)."), "",
        "| photo | views | agree | fp32 score >= 0.5: views, agree | mean change of fp32's top-1 score |",
        "|---|---|---|---|---|",
        *[f"| {r['photo']} | {r['views']} | {r['agree']} | {r['sure_views']}, {r['sure_agree']} | "
          f"{r['top1_score_change']:.3f} |" for r in rows], "",
    ]
    write_results("int8_imagenet", payload, "\n".join(lines), args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
