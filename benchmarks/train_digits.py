"""Reproduce the training figures docs/training.md quotes, on this machine.

1. LeNet-5 on scikit-learn digits, 15 epochs, seed 0 (target: val top-1 >= 0.975).
2. EfficientNet-Lite0 at 64x64 with its default recipe, ImageNet-pretrained (target >= 0.99),
   and the same recipe from scratch at the same epoch budget: what transfer learning buys.

    python benchmarks/train_digits.py [--epochs N] [--only lenet5 ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from benchmarks.machine import RESULTS, machine_info, write_results

RUNS = {
    "lenet5": {"model": {"arch": "lenet5"}, "epochs": 15},
    "lite0_pretrained": {"model": {"arch": "efficientnet_lite0", "pretrained": True, "image_size": 64}},
    "lite0_scratch": {"model": {"arch": "efficientnet_lite0", "pretrained": False, "image_size": 64}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), default=list(RUNS))
    parser.add_argument("--epochs", type=int, default=None, help="override every run's epochs (smoke tests)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from training.config import deep_merge, resolve_config
    from training.train import train

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            overrides = deep_merge(RUNS[name], {"seed": 0} | ({"epochs": args.epochs} if args.epochs else {}))
            cfg = resolve_config(None, overrides)
            report = train(cfg, Path(tmp) / name)
            results[name] = {
                "command": command_line(cfg.model.arch, cfg.model.pretrained, cfg.model.image_size, args.epochs
                                        or RUNS[name].get("epochs")),
                "epochs": cfg.epochs,
                "top1": report["top1"],
                "top5": report["top5"],
                "best_epoch": report["best_epoch"],
                "ece_before_temperature": report["ece_before_temperature"],
                "ece_after_temperature": report["ece_after_temperature"],
                "wall_seconds": report["wall_seconds"],
            }
    payload = {"benchmark": "train_digits", "machine": machine_info(), "results": results}
    json_path, md_path = write_results("train_digits", payload, markdown(payload), args.out)
    print(markdown(payload))
    print(f"written: {json_path}, {md_path}")


def command_line(arch: str, pretrained: bool, image_size: int | None, epochs: int | None) -> str:
    parts = ["imgclf train --data digits", f"--arch {arch}"]
    if arch != "lenet5":
        parts.append("--pretrained" if pretrained else "--no-pretrained")
    if image_size:
        parts.append(f"--image-size {image_size}")
    if epochs:
        parts.append(f"--epochs {epochs}")
    return " ".join(parts + ["--seed 0"])


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        "# Training on scikit-learn digits (seeded stratified 80/20 split)",
        "",
        (
            f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['versions']['torch']}, "
            f"timm {m['versions']['timm']}; {m['date']}."
        ),
        "",
        "| run | command | epochs | val top-1 | val top-5 | best epoch | ECE before -> after T | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in payload["results"].items():
        lines.append(
            f"| {name} | `{r['command']}` | {r['epochs']} | {r['top1']:.4f} | {r['top5']:.4f} | {r['best_epoch']} | "
            f"{r['ece_before_temperature']:.4f} -> {r['ece_after_temperature']:.4f} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
