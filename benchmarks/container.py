"""The serving image: its size (per layer), build time cold and cached, and container start to ready.

    python -m benchmarks.container [--repo DIR] [--runs 3] [--base-cold]

Builds exactly as tests/test_container.py does (BentoML's `bentoml build` + `bentoml containerize
--backend podman` on the local Debian base, tests/support/container.py). ``--base-cold`` also times making
the base image from scratch (debootstrap; about a minute) under a throwaway name.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import RESULTS, imagenet_repository, machine_info, write_results
from tests.support.container import (
    BASE_IMAGE,
    BASE_SCRIPT,
    IMAGE_REPO,
    build_image,
    image_size,
    layers,
    podman,
    running,
    wait_ready,
)

log = logging.getLogger(__name__)
MB = 1000 * 1000
# Published sizes of what a user would run instead (sources in the table).
PEERS = [
    ("Triton 24.06-py3 (all backends, CUDA)", "15.5 GB", "https://github.com/triton-inference-server/server/issues/7474"),
    ("Triton 23.01-py3-min (base of a composed image)", "8.27 GB",
     "https://github.com/triton-inference-server/server/issues/5383"),
    ("TorchServe 0.8.0-cpu (compressed, Docker Hub)", "2.37 GB", "https://github.com/pytorch/serve/issues/2361"),
    ("TorchServe 0.6.0-cpu / nightly latest-cpu (unpacked)", "1.49 GB / 2 GB", "https://github.com/pytorch/serve/pull/2385"),
]


def base_cold_seconds() -> float:
    """debootstrap + import of a fresh base image under a throwaway name, removed afterwards."""
    import subprocess

    name = "localhost/imgclf-base:benchmark"
    podman("rmi", "-f", name, check=False)
    started = time.monotonic()
    subprocess.run([str(BASE_SCRIPT), name], check=True, capture_output=True, timeout=900)
    seconds = time.monotonic() - started
    podman("rmi", "-f", name, check=False)
    return seconds


def start_to_ready(image: str, models: Path, runs: int) -> list[float]:
    """Seconds from `podman run` to /readyz 200, each in a fresh container."""
    times = []
    for i in range(runs):
        started = time.monotonic()
        with running(image, models, f"imgclf-benchmark-{i}") as box:
            wait_ready(box)
            times.append(time.monotonic() - started)
    return times


def layer_rows(image: str) -> list[dict[str, Any]]:
    """The layers that hold bytes, oldest first, with a short name of what made each."""
    rows = []
    for layer in layers(image):
        if int(layer["size"]) < 1000:
            continue
        made_by = str(layer["created_by"]).rsplit("/bin/sh -c ", 1)[-1].replace("#(nop) ", "")
        rows.append({"mb": int(layer["size"]) / MB, "made_by": " ".join(made_by.split())[:110]})
    return rows


def markdown(payload: dict[str, Any]) -> str:
    info, build = payload["machine"], payload["build"]
    lines = [
        "# The serving image (BentoML + podman)", "",
        (f"{info['cpu']}, {info['cores']} cores; podman {payload['podman']}; {info['date']}. Built by "
        "`python -m benchmarks.container` the way tests/test_container.py builds it: `bentoml build` + "
        f"`bentoml containerize --backend podman`, on the local Debian 12 base `{BASE_IMAGE}` "
        "(deploy/container/make_base_image.sh; no registry is reachable here), with "
        "deploy/container/Dockerfile.j2."), "",
        (f"**Image: {payload['image_mb']:.0f} MB.** Before (issue 25, BentoML's stock template on a 378 MB "
        "Debian + Python base): 1,430 MB, of which 639 MB was the build toolchain its apt step installs. "
        "Here the base is 150 MB (apt's caches, docs and locales removed) and the toolchain is gone."), "",
        "| step | seconds |", "|---|---|",
        *([f"| base image from scratch (debootstrap + import) | {build['base_cold_s']:.0f} |"]
          if build.get("base_cold_s") else []),
        f"| `bentoml build` | {build['bento_s']:.1f} |",
        f"| `bentoml containerize`, cold (`--opt no-cache`) | {build['cold_s']:.1f} |",
        f"| `bentoml containerize`, cached (same bento again) | {build['cached_s']:.1f} |",
        (f"| `podman run` to /readyz 200 (median of {len(payload['ready_s'])}) | "
        f"{statistics.median(payload['ready_s']):.1f} |"), "",
        "## Layers (`podman history`, those over 1 kB)", "",
        "| MB | made by |", "|---|---|",
        *[f"| {r['mb']:.1f} | `{r['made_by']}` |" for r in payload["layers"]], "",
        "## Beside what a user would run instead (published sizes)", "",
        "| image | size | source |", "|---|---|---|",
        f"| imgclf (this image, CPU, unpacked) | {payload['image_mb']:.0f} MB | measured above |",
        *[f"| {name} | {size} | {url} |" for name, size, url in PEERS], "",
        ("Sizes on a registry are compressed, `podman images` shows unpacked ones: compare like with like. Triton's "
        "and TorchServe's images hold CUDA, several framework backends or PyTorch and a JDK; imgclf's holds "
        "ONNX Runtime's CPU build and no PyTorch."), "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="model repository with imagenet-lite0 (default: bootstrap one)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--base-cold", action="store_true", help="also time making the base image from scratch")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    tag = "benchmark"
    image = f"{IMAGE_REPO}:{tag}"
    with tempfile.TemporaryDirectory() as tmp:
        build: dict[str, float] = {"base_cold_s": base_cold_seconds()} if args.base_cold else {}
        cold = build_image(Path(tmp) / "cold", tag, no_cache=True)
        cached = build_image(Path(tmp) / "cached", tag)
        build |= {"bento_s": cold["bento_s"], "cold_s": cold["containerize_s"], "cached_s": cached["containerize_s"]}
        models = imagenet_repository(args.repo, Path(tmp))
        for path in [models, *models.rglob("*")]:  # the image's user reads it
            path.chmod(0o755 if path.is_dir() else 0o644)
        ready = start_to_ready(image, models, args.runs)
    payload = {"machine": machine_info(("bentoml", "onnxruntime")), "podman": podman("--version").stdout.split()[-1],
               "image_mb": image_size(image) / MB, "build": build, "ready_s": ready, "layers": layer_rows(image),
               "peers": [{"image": n, "size": s, "source": u} for n, s, u in PEERS]}
    text = markdown(payload)
    write_results("container", payload, text, args.out)
    print(text)


if __name__ == "__main__":
    main()
