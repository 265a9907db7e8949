"""int8 static quantization of the digits EfficientNet-Lite0: accuracy and speed relative to fp32.

Trains the run (or takes --run), exports a version with its int8 variant through the real export path
(both checked and measured on the validation split), then times ONNX Runtime on both, in
alternating rounds in the same process, and reports medians and their ratio.

    python -m benchmarks.int8_digits [--run RUN_DIR] [--epochs N] [--image-size 64] [--rounds 7]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import RESULTS, machine_info, write_results


def images_per_second(session, batch: np.ndarray, repeats: int) -> float:
    from service.runtime import run_logits

    run_logits(session, batch)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        run_logits(session, batch)
    return repeats * len(batch) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="an existing digits efficientnet_lite0 run directory")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs when no --run (default: recipe)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=10, help="batches per timing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from service.repository import ModelRepository
    from service.runtime import create_session
    from training.config import resolve_config
    from training.export import export, from_run, preprocess_all
    from training.train import train

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            run = Path(tmp) / "run"
            overrides = {"model": {"arch": "efficientnet_lite0", "pretrained": True, "image_size": args.image_size},
                         "seed": 0} | ({"epochs": args.epochs} if args.epochs else {})
            train(resolve_config(None, overrides), run)
        exported = from_run(run)
        repo = ModelRepository(Path(tmp) / "models")
        # One version holds both files: model.onnx (fp32) and its int8 variant.
        version = export(exported, repo, "digits-lite0", precision="int8", max_top1_drop=1.0)  # measure, don't gate
        manifest = version.manifest
        (variant,) = manifest.variants
        batch = preprocess_all(exported.check_images[:32], exported.spec)
        sessions = {"fp32": create_session(version.model_path, intra_op_threads=0),
                    "int8": create_session(version.path / variant.file, intra_op_threads=0)}
        timings: dict[str, dict[int, list[float]]] = {k: {1: [], 32: []} for k in sessions}
        for _ in range(args.rounds):
            for name, session in sessions.items():  # alternate, so drift affects both equally
                for size in (1, 32):
                    reps = args.repeats * (8 if size == 1 else 1)
                    timings[name][size].append(images_per_second(session, batch[:size], reps))
        med = {k: {s: statistics.median(v) for s, v in d.items()} for k, d in timings.items()}
        payload = {
            "benchmark": "int8_digits",
            "machine": machine_info(),
            "settings": {"image_size": exported.spec.input_size, "rounds": args.rounds, "repeats": args.repeats,
                         "quantization": variant.quantization},
            "top1": {"fp32": manifest.metrics.top1, "int8": variant.top1},
            "images_per_second_median": med,
            "speedup_int8_over_fp32": {str(s): med["int8"][s] / med["fp32"][s] for s in (1, 32)},
            "model_bytes": {"fp32": manifest.files["model.onnx"].size, "int8": manifest.files[variant.file].size},
        }
    md = markdown(payload)
    write_results("int8_digits", payload, md, args.out)
    print(md)


def markdown(p: dict) -> str:
    m, med, sp = p["machine"], p["images_per_second_median"], p["speedup_int8_over_fp32"]
    return "\n".join([
        "# int8 static quantization (QDQ, per-channel) of the digits EfficientNet-Lite0",
        "",
        (
            f"Machine: {m['cpu']}, {m['cores']} cores; onnxruntime {m['versions']['onnxruntime']}; {m['date']}. "
            f"Input {p['settings']['image_size']}, medians of {p['settings']['rounds']} alternating rounds."
        ),
        "",
        "| precision | val top-1 | images/s batch 1 | images/s batch 32 | model size |",
        "|---|---|---|---|---|",
        *(f"| {k} | {p['top1'][k]:.4f} | {med[k][1]:.0f} | {med[k][32]:.0f} | {p['model_bytes'][k] / 1e6:.1f} MB |"
          for k in ("fp32", "int8")),
        "",
        (
            f"int8 / fp32 throughput: {sp['1']:.2f}x at batch 1, {sp['32']:.2f}x at batch 32; "
            f"top-1 change {(p['top1']['int8'] - p['top1']['fp32']) * 100:+.2f} points."
        ),
        "",
    ])


if __name__ == "__main__":
    main()
