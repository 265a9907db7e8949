"""Where a default imgclf server spends its CPU under load: py-spy samples, grouped by layer.

Starts ``imgclf serve`` with no ``IMGCLF_*`` settings on the bootstrapped imagenet-lite0, drives it
with the peers' load generator (ImageNet-sized JPEGs at c=32, 12-megapixel JPEGs at c=8, the
phases of ``python -m benchmarks.peers``) and samples every worker with py-spy while it does
(on-CPU samples only, without pausing the processes). Each sample is given to the first layer,
looking from the innermost frame outwards, whose code it is in: what remains beside decoding,
resizing and inference is what the serving layer costs, the part a server can improve.

    python -m benchmarks.profile_serving [--seconds 20] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.loadgen import closed_loop, multipart_request
from benchmarks.machine import NO_CACHE, RESULTS, imagenet_repository, machine_info, write_results

# (layer, substrings of "function (file:line)" frames), tried from the innermost frame outwards.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("inference (ONNX Runtime)", ("onnxruntime/", "service/runtime.py")),
    # Pillow's generic Image.py is left out: resizing calls it too, and its caller's frame decides.
    ("JPEG decode (libjpeg via Pillow)", ("service/preprocessing/decode.py", "PIL/ImageFile.py",
                                          "PIL/JpegImagePlugin.py")),
    ("resize, crop, normalise", ("service/preprocessing/tensor.py",)),
    ("format sniffing and header checks", ("service/preprocessing/sniff.py", "service/preprocessing/bmff.py")),
    ("multipart parsing", ("python_multipart/", "starlette/formparsers.py", "service/http/guard.py")),
    ("body reading and pacing", ("service/http/body.py",)),
    ("batching queue and answer", ("service/http/served.py", "service/http/classify.py", "service/http/monitor.py",
                                   "service/selective.py")),
    ("JSON and pydantic", ("json/", "pydantic", "orjson")),
    ("HTTP server and ASGI (uvicorn, httptools, Starlette, BentoML)", ("uvicorn/", "httptools", "starlette/",
                                                                       "bentoml", "_bentoml")),
    ("event loop and threads", ("asyncio/", "uvloop", "concurrent/futures", "threading.py")),
)
IN_PROCESS = {"inference (ONNX Runtime)", "JPEG decode (libjpeg via Pillow)", "resize, crop, normalise",
              "format sniffing and header checks"}


def layer_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for layer, needles in LAYERS:
            if any(n in frame for n in needles):
                return layer
    return "other"


def read_raw(path: Path) -> collections.Counter[str]:
    """py-spy's ``--format raw``: one collapsed stack per line, ``frame;frame;... count``."""
    counts: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[layer_of(stack.split(";"))] += int(n)
    return counts


def _py_spy() -> str:
    """The py-spy beside this interpreter (the venv's, when not activated), else the one on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else shutil.which("py-spy") or "py-spy"


def profile_phase(url: str, pid: int, payloads: list[bytes], concurrency: int, seconds: float, rate: int,
                  out: Path) -> dict[str, Any]:
    asyncio.run(closed_loop(url, payloads, concurrency, 3.0, warmup_s=0))  # warm-up, not sampled
    spy = subprocess.Popen([_py_spy(), "record", "--pid", str(pid), "--subprocesses",
                            "--nonblocking", "--format", "raw", "--rate", str(rate), "--duration", str(int(seconds)),
                            "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # py-spy attaches to every worker before the measured load starts
    load = asyncio.run(closed_loop(url, payloads, concurrency, seconds - 1.0, warmup_s=0))
    _, err = spy.communicate(timeout=120)
    if not out.is_file():
        raise SystemExit(f"py-spy wrote no profile (it needs ptrace rights on the server): {err.strip()[-500:]}")
    counts = read_raw(out)
    total = sum(counts.values()) or 1
    return {"concurrency": concurrency, "images_per_s": load["ok"] / (seconds - 1.0), "samples": total,
            "share": {k: v / total for k, v in counts.most_common()},
            "serving_share": sum(v for k, v in counts.items() if k not in IN_PROCESS) / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="model repository with imagenet-lite0 (default: bootstrap one)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second per process")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", type=Path, help="keep py-spy's collapsed stacks here (flamegraph.pl reads them)")
    args = parser.parse_args()

    from benchmarks.peers.__main__ import make_images
    from imgclf.devserver import running_server

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        images = make_images(tmp / "images", 24, 12.0)
        repo = imagenet_repository(args.repo, tmp)
        phases = {}
        with running_server(repo, tmp / "server", dict(NO_CACHE), timeout_s=180) as srv:
            host = srv.url.split("://", 1)[1]
            for kind, concurrency in (("small", 32), ("large", 8)):
                payloads = [multipart_request(host, "/classify", "image", "image.jpg", d) for d in images[kind]]
                phases[kind] = profile_phase(srv.url, srv.proc.pid, payloads, concurrency, args.seconds, args.rate,
                                             tmp / f"{kind}.txt")
                if args.keep:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(tmp / f"{kind}.txt", args.keep / f"profile-{kind}.txt")

    info = machine_info(("onnxruntime", "bentoml", "pillow", "numpy", "py-spy"))
    layers = [name for name, _ in LAYERS] + ["other"]
    lines = [
        "# Where a default imgclf server spends its CPU (py-spy, on-CPU samples of every worker)", "",
        (f"{info['cpu']}, {info['cores']} cores; {info['date']}; onnxruntime {info['versions']['onnxruntime']}, "
        f"bentoml {info['versions']['bentoml']}, Pillow {info['versions']['pillow']}. {args.seconds:.0f} s per phase."),
        "",
        "| layer | small JPEG, c=32 | 12 MP JPEG, c=8 |", "|---|---|---|",
        *[f"| {name} | {phases['small']['share'].get(name, 0):.1%} | {phases['large']['share'].get(name, 0):.1%} |"
          for name in layers],
        (f"| **serving layer (all but decode, resize, sniffing, inference)** | {phases['small']['serving_share']:.1%} | "
        f"{phases['large']['serving_share']:.1%} |"),
        f"| (img/s while sampled) | {phases['small']['images_per_s']:.1f} | {phases['large']['images_per_s']:.1f} |",
        "",
    ]
    write_results("profile_serving", {"machine": info, "phases": phases}, "\n".join(lines), args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
