"""Data-parallel training on one machine: N processes (DDP, gloo on the CPU) against 1, in training images/s.

Each run is ``imgclf train --data digits --arch A --epochs E --batch-size B --seed 0 [--nproc N]``
through ``training.launch.run_training`` (torch's elastic launcher for N > 1). Images/s is training
images per epoch over the epoch's seconds (training plus the sharded validation pass): the median of
epochs 2 on (epoch 1 pays for warm-up; a shared 2-core VM has slow epochs now and then), with the
slowest and fastest epoch beside it. The wall time is the whole call, process start-up included. One process
runs twice: with torch's default threads (all cores) and with one thread, the per-process share that
N processes get, so the table separates what DDP buys from what fewer threads per process buy.

    python -m benchmarks.ddp_throughput [--archs lenet5 simple_cnn] [--nproc 1 2] [--epochs 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import RESULTS, machine_info

MODELS: dict[str, dict[str, Any]] = {
    "lenet5": {"model": {"arch": "lenet5"}},
    "simple_cnn": {"model": {"arch": "simple_cnn", "channels": [32, 64], "color_mode": "L", "image_size": 32}},
}


def measure(arch: str, nproc: int, epochs: int, batch_size: int, tmp: Path, threads: int | None = None,
            ) -> dict[str, Any]:
    """One run; its images/s from the epoch rows of its last checkpoint. ``threads``: one process only."""
    import torch

    from training.config import deep_merge, resolve_config
    from training.launch import run_training, threads_per_process
    from training.loop import resolve_device

    cfg = resolve_config(None, deep_merge(MODELS[arch], {"data": {"source": "digits"}, "epochs": epochs,
                                                         "batch_size": batch_size, "seed": 0}))
    run_dir = tmp / f"{arch}-{nproc}-{threads}"
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    try:
        start = time.perf_counter()
        report = run_training(cfg, run_dir, nproc=nproc)
        wall = time.perf_counter() - start
        threads_used = torch.get_num_threads()
    finally:
        torch.set_num_threads(default_threads)
    history = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["history"]
    train_images = sum(report["data"]["counts"]["train"].values()) // batch_size * batch_size  # full batches
    rates = [train_images / row["seconds"] for row in history[1:] or history]
    if nproc > 1:
        threads_used = threads_per_process(nproc, resolve_device(cfg.device)) or "OMP_NUM_THREADS"
    return {"arch": arch, "nproc": nproc, "threads_per_process": threads_used, "epochs": epochs,
            "images_per_epoch": train_images,
            "images_per_s": statistics.median(rates), "images_per_s_range": [min(rates), max(rates)],
            "wall_seconds": wall, "top1": report["top1"], "distributed": report["distributed"]}


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        "# Data-parallel training throughput: N processes against 1 (DDP, gloo, CPU)",
        "",
        (f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['versions']['torch']}, Python {m['python']}; "
         f"{m['date']}."),
        "",
        (f"`imgclf train --data digits --arch A --epochs {payload['epochs']} --batch-size {payload['batch_size']} "
         "--seed 0 [--nproc N]`. Images/s: training images per epoch / epoch seconds (training and the sharded "
         "validation pass), median of epochs 2 on, slowest and fastest epoch in brackets. Wall: the whole call, "
         "process start-up and the final report included."),
        "",
        ("| model | processes | threads each | training images/s | vs 1 process, default threads | wall (s) | "
         "val top-1 |"),
        "|---|---|---|---|---|---|---|",
    ]
    for arch in payload["archs"]:
        rows = [r for r in payload["results"] if r["arch"] == arch]
        base = next((r["images_per_s"] for r in rows if r["nproc"] == 1), None)  # the default-threads run
        for r in rows:
            ratio = f"{r['images_per_s'] / base:.2f}x" if base else "-"
            low, high = r["images_per_s_range"]
            lines.append(f"| {arch} | {r['nproc']} | {r['threads_per_process']} | {r['images_per_s']:.0f} "
                         f"({low:.0f}-{high:.0f}) | {ratio} | {r['wall_seconds']:.1f} | {r['top1']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    from service.atomic import atomic_write_text

    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for arch in args.archs:
            for n in args.nproc:
                results.append(measure(arch, n, args.epochs, args.batch_size, Path(tmp)))
                if n == 1:
                    results.append(measure(arch, 1, args.epochs, args.batch_size, Path(tmp), threads=1))
    payload = {"benchmark": "ddp_throughput", "machine": machine_info(), "archs": args.archs, "epochs": args.epochs,
               "batch_size": args.batch_size, "results": results}
    text = markdown(payload)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "ddp_throughput.md", text)
    print(text)
    print(f"written: {args.out / 'ddp_throughput.md'}")


if __name__ == "__main__":
    main()
