"""`imgclf batch` against the machine's ceiling, and its peak memory at 10k and 100k inputs.

Ceiling, measured in the same run on the same files, once per round between the jobs (the rate the
cores would reach doing only the necessary work; the median round is reported):

    cores / (decode-and-preprocess core-seconds per image + inference core-seconds per image)

with decode measured as process CPU time of ``read_input`` + ``image_to_tensor`` over the files, and
inference as CPU time of a single-threaded session at its best batch size (1, 8, 32, 64). The job runs
as a user runs it: ``imgclf batch`` in a subprocess, default settings, wall time from process start to
exit (worker start-up and model loading included). Inputs are listed in a manifest that repeats a set
of distinct files, so 12-megapixel photos need not fill the disk; they are read from the page cache.

Memory: a LeNet-5 on digits (cheap inference, so the job is dominated by listing, scheduling and
writing) over 10,000 and 100,000 small PNG files in directories of 1,000; the peak of the summed
resident memory of the job and its workers, sampled every 20 ms.

    python -m benchmarks.batch_throughput [--repo DIR] [--imagenet-inputs 3000] [--photo-inputs 1200]
                                          [--memory-inputs 10000 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

from benchmarks.machine import RESULTS, imagenet_repository, machine_info, write_results

ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZES = (1, 8, 32, 64)


def write_jpegs(folder: Path, photos: dict[str, bytes], count: int, size: tuple[int, int] | None,
                megapixels: float | None = None) -> list[Path]:
    """``count`` distinct JPEGs: crops of the real photos, resized to ``size`` or to ``megapixels``."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = [Image.open(io.BytesIO(d)).convert("RGB") for d in photos.values()]
    paths = []
    for i in range(count):
        img = sources[i % len(sources)]
        shift = (i // len(sources)) * 7 % max(1, img.width // 10)
        crop = img.crop((shift, 0, img.width - (i % 5) * 3, img.height))
        if megapixels is not None:
            scale = (megapixels * 1e6 / (crop.width * crop.height)) ** 0.5
            target = (round(crop.width * scale), round(crop.height * scale))
        else:
            target = size or crop.size
        path = folder / f"{i:05d}.jpg"
        crop.resize(target, Image.Resampling.BICUBIC).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def manifest(path: Path, files: list[Path], inputs: int) -> Path:
    path.write_text("".join(f"{files[i % len(files)]}\n" for i in range(inputs)))
    return path


def inference_core_seconds(model_path: Any, tensors: list[np.ndarray], sizes: tuple[int, ...] | list[int],
                           images_per_size: int) -> dict[int, float]:
    """Core-seconds per image of a one-thread session at each batch size (after one warm-up batch)."""
    from service.runtime import create_session, run_logits

    session = create_session(model_path, "cpu", intra_op_threads=1)
    per_batch: dict[int, float] = {}
    for size in sizes:
        batch = np.stack([tensors[i % len(tensors)] for i in range(size)])
        run_logits(session, batch)
        reps = max(2, images_per_size // size)
        start = time.process_time()
        for _ in range(reps):
            run_logits(session, batch)
        per_batch[size] = (time.process_time() - start) / (reps * size)
    return per_batch


def ceiling(files: list[Path], model_path: Path, spec: Any, cores: int) -> dict[str, Any]:
    """Core-seconds per image for decode+preprocess and for inference at each batch size."""
    from service.batch.inputs import read_input
    from service.preprocessing import DecodeLimits, image_to_tensor

    limits = DecodeLimits()
    for f in files[:4]:  # warm the page cache and Pillow
        image_to_tensor(read_input(str(f), limits.max_bytes), spec, limits)
    start = time.process_time()
    tensors = [image_to_tensor(read_input(str(f), limits.max_bytes), spec, limits) for f in files]
    decode = (time.process_time() - start) / len(files)
    per_batch = inference_core_seconds(model_path, tensors, BATCH_SIZES, images_per_size=256)
    best = min(per_batch, key=per_batch.__getitem__)
    return {
        "decode_core_ms": decode * 1000, "inference_core_ms": {k: v * 1000 for k, v in per_batch.items()},
        "best_batch": best, "ceiling_images_per_s": cores / (decode + per_batch[best]),
    }


def run_job(repo: Path, model: str, source: Path, out: Path, *extra: str) -> dict[str, float]:
    """`imgclf batch` as a user runs it; wall time and the peak summed RSS of the process tree."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "imgclf.cli", "batch", str(source), "--model", model, "--out", str(out),
           "--repo", str(repo), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"imgclf batch failed: {stderr[-2000:]}")
    with open(out) as fh:
        rows = sum(1 for _ in fh) - (1 if out.suffix == ".csv" else 0)
    return {"wall_s": wall, "rows": rows, "images_per_s": rows / wall, "peak_rss_mb": peak / 2**20,
            "summary": stdout.strip().splitlines()[-1]}


def digits_model(repo_root: Path) -> str:
    """A LeNet-5 on digits, exported: inference costs next to nothing, so memory and overhead show."""
    from service.repository import ModelRepository
    from training.config import resolve_config
    from training.export import export, from_run
    from training.train import train

    run = repo_root.parent / "lenet_run"
    train(resolve_config(None, {"model": {"arch": "lenet5"}, "epochs": 1, "seed": 0}), run)
    export(from_run(run), ModelRepository(repo_root), "digits-lenet5")
    return "digits-lenet5:1"


def write_small_pngs(root: Path, count: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits().images
    for i in range(count):
        folder = root / f"{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.uint8(digits[i % len(digits)] * 15)).resize((28, 28)).save(folder / f"{i:06d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="model repository holding imagenet-lite0 (default: bootstrap one)")
    parser.add_argument("--distinct", type=int, default=200, help="distinct ImageNet-sized files")
    parser.add_argument("--imagenet-inputs", type=int, default=3000)
    parser.add_argument("--distinct-photos", type=int, default=24, help="distinct 12-megapixel files")
    parser.add_argument("--photo-inputs", type=int, default=1200)
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--memory-inputs", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each job; the median is reported")
    parser.add_argument("--compare-threads", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the thread executor (the choice is made by this figure)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from service.batch.runner import usable_cores
    from service.repository import ModelRepository
    from training.sample_images import real_photos

    cores = usable_cores()
    results: dict[str, Any] = {"cores": cores, "throughput": {}, "memory": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        repo_root = imagenet_repository(args.repo, tmp)
        version = ModelRepository(repo_root).get("imagenet-lite0")
        photos = real_photos()
        sets = {
            "imagenet_jpeg_500x375": (write_jpegs(tmp / "imagenet", photos, args.distinct, (500, 375)),
                                      args.imagenet_inputs),
            f"photo_jpeg_{args.megapixels:g}mp": (write_jpegs(tmp / "photos", photos, args.distinct_photos, None,
                                                              args.megapixels), args.photo_inputs),
        }
        for name, (files, inputs) in sets.items():
            source = manifest(tmp / f"{name}.txt", files, inputs)
            variants = {"process": ()} | ({"thread": ("--executor", "thread")} if args.compare_threads else {})
            ceilings, runs = [], {v: [] for v in variants}
            for _ in range(args.rounds):  # interleaved, so drift of the shared machine hits all alike
                ceilings.append(ceiling(files, version.model_path, version.manifest.preprocessing, cores))
                for variant, extra in variants.items():
                    runs[variant].append(run_job(repo_root, "imagenet-lite0", source, tmp / "out.csv", *extra))
            median_ceiling = statistics.median(c["ceiling_images_per_s"] for c in ceilings)
            entry: dict[str, Any] = {"distinct_files": len(files), "inputs": inputs,
                                     "ceiling": min(ceilings, key=lambda c: abs(c["ceiling_images_per_s"] - median_ceiling)),
                                     "ceiling_rounds": [c["ceiling_images_per_s"] for c in ceilings]}
            for variant in variants:
                rate = statistics.median(r["images_per_s"] for r in runs[variant])
                entry[variant] = {"images_per_s_median": rate, "runs": runs[variant],
                                  "fraction_of_ceiling": rate / median_ceiling}
            results["throughput"][name] = entry
            print(f"{name}: ceiling {entry['ceiling']['ceiling_images_per_s']:.1f} img/s, "
                  + ", ".join(f"{v} {entry[v]['images_per_s_median']:.1f} ({entry[v]['fraction_of_ceiling']:.0%})"
                              for v in variants), flush=True)

        if args.memory_inputs:
            small_repo = tmp / "small_models"
            model = digits_model(small_repo)
            write_small_pngs(tmp / "small", max(args.memory_inputs))
            for n in args.memory_inputs:
                listing = tmp / f"small_{n}"
                if n == max(args.memory_inputs):
                    listing = tmp / "small"
                else:  # the first n files, as a tree of their own
                    for folder in sorted((tmp / "small").iterdir())[: -(-n // 1000)]:
                        (listing / folder.name).mkdir(parents=True, exist_ok=True)
                        for f in sorted(folder.iterdir())[: n - 1000 * int(folder.name)]:
                            os.link(f, listing / folder.name / f.name)
                results["memory"][str(n)] = run_job(small_repo, model, listing, tmp / "small.csv", "--top-k", "1")
                print(f"memory {n}: {results['memory'][str(n)]['peak_rss_mb']:.0f} MB peak, "
                      f"{results['memory'][str(n)]['images_per_s']:.0f} img/s", flush=True)

    results["machine"] = machine_info(("onnxruntime", "numpy", "pillow", "ray", "pyarrow"))
    write_results("batch_throughput", results, markdown(results), args.out)


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# `imgclf batch` throughput against the machine's ceiling",
        "",
        (f"{m['cpu']}, {r['cores']} usable cores, onnxruntime {m['versions']['onnxruntime']}, "
        f"pillow {m['versions']['pillow']}; {m['date']}. Model: imagenet-lite0 (EfficientNet-Lite0 fp32, 224x224)."),
        ("Ceiling = cores / (decode-and-preprocess core-ms + inference core-ms at the best batch size), measured "
        "in the same run. Job = `imgclf batch` with default settings, wall time of the whole command (start-up "
        "included), median of the runs."),
        "",
        ("| input | decode core-ms | inference core-ms (best batch) | ceiling img/s | imgclf batch img/s | "
        "of ceiling | threads instead img/s |"),
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in r["throughput"].items():
        c = e["ceiling"]
        thread = f"{e['thread']['images_per_s_median']:.1f} ({e['thread']['fraction_of_ceiling']:.0%})" \
            if "thread" in e else "-"
        lines.append(
            f"| {name} ({e['inputs']} inputs) | {c['decode_core_ms']:.2f} | "
            f"{c['inference_core_ms'][c['best_batch']]:.2f} (batch {c['best_batch']}) | "
            f"{c['ceiling_images_per_s']:.1f} | {e['process']['images_per_s_median']:.1f} | "
            f"{e['process']['fraction_of_ceiling']:.0%} | {thread} |")
    if r["memory"]:
        lines += ["", "Peak resident memory (job + workers), LeNet-5 on 28x28 PNGs in directories of 1,000:", "",
                  "| inputs | peak RSS MB | img/s |", "|---|---|---|"]
        lines += [f"| {n} | {v['peak_rss_mb']:.0f} | {v['images_per_s']:.0f} |" for n, v in r["memory"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
