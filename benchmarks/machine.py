"""What every benchmark records beside its figures: the machine and the versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# What a benchmark of the image work serves with: the response cache off. The benchmarks cycle through a
# few dozen images, which the cache would answer without decoding or inferring (Triton's and
# TorchServe's response caches are off by default too); benchmarks/response_cache.py measures the cache.
NO_CACHE = {"IMGCLF_CACHE_ENTRIES": "0"}


def cpu_model() -> str:
    """The CPU's name and the instruction sets that change the figures: these hosts are all "AMD EPYC",
    some with AVX-512 VNNI (int8 about 2x fp32) and some with AVX2 only (int8 1.4-1.6x)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa}, {'with' if vnni else 'no'} VNNI)"


def machine_info(packages: tuple[str, ...] = ("torch", "torchvision", "timm", "onnxruntime", "numpy", "pillow")) -> dict[str, Any]:
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def write_results(name: str, payload: dict[str, Any], markdown: str, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """``<name>.json`` and ``<name>.md``, each written atomically."""
    import json

    from service.atomic import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(md_path, markdown)
    return json_path, md_path


def imagenet_repository(given: Path | None, tmp: Path) -> Path:
    """``given``, or a new repository under ``tmp`` holding the bootstrapped imagenet-lite0."""
    if given is not None:
        return given
    from service.repository import ModelRepository
    from training.bootstrap import bootstrap

    root = tmp / "models"
    bootstrap(ModelRepository(root))
    return root
