"""imgclf against Triton and TorchServe on this machine, one server at a time, in alternating rounds.

Servers: imgclf with default settings (no ``IMGCLF_*`` at all), imgclf with ``IMGCLF_WORKERS=2
IMGCLF_INTRA_OP_THREADS=1``, Triton 2.51 from the ``nvidia-pytriton`` wheel with a Python-backend model
that calls imgclf's own ``image_to_tensor`` and ONNX Runtime on the same ONNX file (so the difference
is the serving layer), and TorchServe 0.12 tuned (batch 8) with a traced Lite0. The peers' venvs are
made on first use in ``.peers/`` (git-ignored; pip from the package registries only).

Each round, for each server in turn (order reversed every other round): the in-process ceiling, a
fresh server, ImageNet-sized JPEGs at c=32 and 12-megapixel JPEGs at c=8 with server CPU per request
from its process tree, then what good and bad images sent at once are answered. One more
ceiling closes the round. Results: ``benchmarks/results/peers.{md,json}``; ratios are taken within a
round, then the median over rounds.

    python -m benchmarks.peers [--rounds 3] [--seconds 15] [--quick] [--servers imgclf-default triton ...]
    python -m benchmarks.peers --servers imgclf-default triton --baseline ../before   # this tree against another
    python -m benchmarks.peers --render benchmarks/results/peers.json   # the report again, not measured again
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import RESULTS, imagenet_repository, machine_info, write_results
from benchmarks.peers import measure, report
from benchmarks.peers.envs import ROOT, PeerUnavailable
from benchmarks.peers.servers import (
    TUNED_ENV,
    Server,
    imgclf_server,
    torchserve_server,
    triton_server,
)

log = logging.getLogger("benchmarks.peers")
SMALL_SIZES = [(500, 375), (375, 500)]
ALL = ["imgclf-default", "imgclf-baseline", "imgclf-tuned", "triton", "torchserve"]


def make_images(tmp: Path, distinct: int, megapixels: float) -> dict[str, list[bytes]]:
    from benchmarks.batch_throughput import write_jpegs
    from training.sample_images import real_photos

    photos = real_photos()
    small = [p for i, size in enumerate(SMALL_SIZES)
             for p in write_jpegs(tmp / f"small{i}", photos, max(1, distinct // len(SMALL_SIZES)), size)]
    large = write_jpegs(tmp / "large", photos, max(2, distinct // 3), None, megapixels)
    good = small[0].read_bytes()
    return {"small": [p.read_bytes() for p in small], "large": [p.read_bytes() for p in large],
            "bad": [b"this is not an image", good[: len(good) // 3], b"\x89PNG\r\n\x1a\n broken", good[:200]]}


# phase, images, concurrent clients: throughput with a full queue, large photos, one client's latency
PHASES = (("small", "small", 32), ("large", "large", 8), ("single", "small", 1))


def measure_ceiling(images: dict[str, list[bytes]], version: Any, n_cores: int) -> dict[str, Any]:
    spec = version.manifest.preprocessing
    return {kind: measure.ceiling(images[kind], version.model_path, spec, n_cores) for kind in ("small", "large")}


def run_server(server: Server, work: Path, images: dict[str, list[bytes]], args: argparse.Namespace) -> dict[str, Any]:
    """One fresh server: the load phases, then good and bad images at once."""
    out: dict[str, Any] = {"ok": False}
    try:
        with server.start(work) as srv:
            out["ready_s"] = srv.ready_s
            out["details"] = srv.details()
            for kind, source, concurrency in PHASES:
                time.sleep(args.settle)
                out[kind] = measure.phase(srv.url, [srv.build(d) for d in images[source]], concurrency, args.seconds,
                                          args.warmup, srv.pid)
                r = out[kind]
                print(f"  {server.key:15s} {kind:5s} c={concurrency:<3d} {r['images_per_s']:6.1f} img/s  "
                      f"p50 {r['p50_ms'] or 0:5.0f} p99 {r['p99_ms'] or 0:5.0f} ms  server "
                      f"{r['server_core_ms_per_image']:5.1f} core-ms/img  client {r['client_core_ms_per_request']:.2f}  "
                      f"errors {r['errors']}  refused {r['refused']}  others {r['other_cores']:.2f} cores", flush=True)
            # last: TorchServe fails a whole batch on one bad image, which must not touch the phases
            out["sanity"] = measure.sanity(srv.url, [srv.build(d) for d in images["small"][:4]],
                                           [srv.build(d) for d in images["bad"]])
        out["ok"] = True
    except (PeerUnavailable, RuntimeError, OSError) as exc:
        out["error"] = str(exc)[-1500:]
        log.error("%s failed: %s", server.key, out["error"])
    return out


def code_state() -> dict[str, Any]:
    """The commit measured and how many paths differed from it (read-only git; None outside a checkout)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    head, status = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain")
    return {"commit": head.strip() if head else None,
            "uncommitted_paths": None if status is None else len(status.splitlines())}


def _commit(checkout: Path | None) -> str:
    if checkout is None:
        return "-"
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False)
    return head.stdout.strip() or str(checkout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="model repository with imagenet-lite0 (default: bootstrap one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each measured phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="load before each phase, not counted")
    parser.add_argument("--settle", type=float, default=2.0, help="idle seconds before each phase")
    parser.add_argument("--distinct", type=int, default=24, help="distinct JPEGs of each kind")
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--servers", nargs="+", choices=ALL, default=ALL)
    parser.add_argument("--setup-timeout", type=float, default=2400, help="seconds to make a peer's venv")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, 3 s phases, 1 s warm-up")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT", help="another commit's tree (git worktree "
                        "add DIR COMMIT) served as imgclf-baseline, default settings, in the same rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the report from a results JSON")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.render.read_text())
        results["summary"] = report.summarise(results)
        print(f"wrote {write_results(args.render.stem, results, report.markdown(results), args.out)[1]}")
        return
    if args.quick:
        args.rounds, args.seconds, args.warmup, args.settle, args.distinct = 1, 3.0, 1.0, 1.0, 8
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    scrubbed = sorted(k for k in os.environ if k.startswith("IMGCLF_"))
    for k in scrubbed:  # "default settings" means none at all, whatever this shell has
        del os.environ[k]

    from service.repository import ModelRepository

    n_cores = measure.cores()
    results: dict[str, Any] = {"cores": n_cores, "scrubbed_env": scrubbed, "rounds": [],
                               "load": {"start": list(os.getloadavg())}}
    with tempfile.TemporaryDirectory(prefix="imgclf-peers-") as tmp_name:
        tmp = Path(tmp_name)
        repo = imagenet_repository(args.repo, tmp)
        version = ModelRepository(repo).get("imagenet-lite0")
        images = make_images(tmp / "images", args.distinct, args.megapixels)
        candidates = {
            "imgclf-default": imgclf_server("imgclf-default", "imgclf, default settings (no `IMGCLF_*`) but the "
                                            "response cache off", repo, {}),
            "imgclf-baseline": imgclf_server("imgclf-baseline", f"imgclf at {_commit(args.baseline)}, default "
                                             "settings", repo, {}, args.baseline),
            "imgclf-tuned": imgclf_server("imgclf-tuned", "imgclf, `IMGCLF_WORKERS=2 IMGCLF_INTRA_OP_THREADS=1`",
                                          repo, dict(TUNED_ENV)),
            "triton": triton_server(version, args.setup_timeout),
            "torchserve": torchserve_server(version, args.setup_timeout),
        }
        wanted = {*args.servers, "imgclf-baseline"} if args.baseline else set(args.servers) - {"imgclf-baseline"}
        servers = [candidates[k] for k in ALL if k in wanted]
        for server in servers:
            try:
                server.info = server.prepare(tmp / "setup")
            except (PeerUnavailable, RuntimeError, OSError) as exc:
                server.unavailable = str(exc)[-1000:]
                log.error("%s cannot run here: %s", server.key, server.unavailable)
        results["servers"] = {s.key: {"label": s.label, "info": s.info, "unavailable": s.unavailable}
                              for s in servers}
        runnable = [s for s in servers if s.unavailable is None]
        for index in range(args.rounds):
            order = runnable if index % 2 == 0 else runnable[::-1]
            print(f"round {index + 1}/{args.rounds}: {', '.join(s.key for s in order)}", flush=True)
            rnd: dict[str, Any] = {"index": index, "order": [s.key for s in order], "ceilings": [], "servers": {},
                                   "cores": n_cores}
            for server in order:
                rnd["ceilings"].append(measure_ceiling(images, version, n_cores))
                rnd["servers"][server.key] = run_server(server, tmp / f"r{index}" / server.key, images, args)
            rnd["ceilings"].append(measure_ceiling(images, version, n_cores))
            rnd["ceiling_median"] = {kind: {k: statistics.median(c[kind][k] for c in rnd["ceilings"])
                                            for k in ("ceiling_images_per_s", "decode_core_ms", "inference_core_ms",
                                                      "work_core_ms")} for kind in ("small", "large")}
            print(f"  ceiling: small {rnd['ceiling_median']['small']['ceiling_images_per_s']:.1f}, 12 MP "
                  f"{rnd['ceiling_median']['large']['ceiling_images_per_s']:.1f} img/s", flush=True)
            results["rounds"].append(rnd)
    others = [r["servers"][k][kind]["other_cores"] for r in results["rounds"] for k in r["servers"]
              for kind in ("small", "large") if r["servers"][k].get(kind)]
    results["load"].update(end=list(os.getloadavg()), other_cores_median=statistics.median(others) if others else 0.0,
                           other_cores_max=max(others, default=0.0))
    results["machine"] = machine_info(("onnxruntime", "bentoml", "pillow", "numpy", "torch"))
    results["code"] = code_state()
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results["summary"] = report.summarise(results)
    name = "peers.quick" if args.quick else "peers"
    paths = write_results(name, results, report.markdown(results), args.out)
    print(f"wrote {paths[1]}", flush=True)


if __name__ == "__main__":
    main()
