"""What an explanation costs: ``POST /explain`` against ``POST /classify`` in the same run, on the same photos.

One ``imgclf serve`` (the bootstrapped imagenet-lite0, whose manifest says CAM: exact), and in each round,
in an order that rotates from round to round so that drift on a shared machine hits every endpoint alike:
- latency: one client (closed loop, concurrency 1), p50 per round;
- throughput: ``--concurrency`` clients (closed loop), requests per second per round;
- CPU cost: CPU seconds the server's processes spent per answered request in the throughput phase
  (user + system, from /proc via psutil). Other processes on a shared machine lengthen latencies but not
  this, so it is the figure the goal is judged by;
for ``/classify``, ``/explain`` (JSON: a 224x224 map, about 350 kB) and ``/explain`` with ``format=png``.
The figures are medians over the rounds. In process, without HTTP, the same split: classification
(decode, preprocess, ONNX Runtime) against explanation (the same, with the feature map as a second output,
the head's gradient, the map, its encoding), alternating, medians of the process's CPU time per image. The forward-only fallback (occlusion,
for manifests without a head) is measured once on a copy of the model whose manifest has no ``explain``.

Goal (issue 15): an exact explanation costs at most about 1.5x a classification.

    python -m benchmarks.explain_cost [--repo DIR] [--rounds 5] [--seconds 5] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.batch_throughput import write_jpegs
from benchmarks.loadgen import BOUNDARY, closed_loop
from benchmarks.machine import RESULTS, imagenet_repository, machine_info, write_results
from imgclf.devserver import running_server, tree_cpu_seconds

NAME = "imagenet-lite0"
LEGACY = "legacy-lite0"  # the same model, its manifest written as before explanations: occlusion
ENDPOINTS = {"classify": ("/classify", {}), "explain_json": ("/explain", {}),
             "explain_png": ("/explain", {"format": "png"})}


def request(host: str, path: str, image: bytes, fields: dict[str, str]) -> bytes:
    """A keep-alive multipart request: the image in ``image``, then the text fields."""
    parts = [(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"photo.jpg\"\r\n"
              f"Content-Type: image/jpeg\r\n\r\n").encode() + image + b"\r\n"]
    parts += [f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
              for k, v in fields.items()]
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode()
    return head + body


def legacy_copy(repo: Path) -> None:
    """``LEGACY``: imagenet-lite0's files without the head, its manifest without ``explain`` (schema 1)."""
    from service.repository import MANIFEST, ModelRepository

    models = ModelRepository(repo)
    src = models.get(NAME)
    head = src.manifest.explain.head_file if src.manifest.explain else None

    def write(staging: Path, version: int) -> Any:
        for file in src.path.iterdir():
            if file.is_file() and file.name not in (MANIFEST, head):
                shutil.copyfile(file, staging / file.name)
        return src.manifest.model_copy(update={"name": LEGACY, "version": version, "files": {}, "explain": None,
                                               "schema_version": 1})

    models.promote(LEGACY, models.add_version(LEGACY, write).manifest.version)


def in_process(version: Any, images: list[bytes], rounds: int) -> dict[str, Any]:
    """ms per image, one at a time, without HTTP: classification against explanation (JSON body included)."""
    from service.answer import answer
    from service.explainer import Explainer
    from service.preprocessing import image_to_tensor
    from service.runtime import OnnxModel

    model = OnnxModel.load(version.model_path, version.manifest, threads=1)
    model.warm_up(1)
    explainer = Explainer(model)
    spec = version.manifest.preprocessing

    def classify(data: bytes) -> None:
        answer(model.logits(image_to_tensor(data, spec)[None])[0], version.manifest, 5)

    def explain(data: bytes) -> None:
        explainer.explain(data).json_bytes()

    figures: dict[str, list[float]] = {"classify": [], "explain_json": []}
    for r in range(rounds):
        for name, fn in sorted([("classify", classify), ("explain_json", explain)], reverse=bool(r % 2)):
            start = time.process_time()  # CPU time: what other processes on the machine do not inflate
            for data in images:
                fn(data)
            figures[name].append((time.process_time() - start) * 1000 / len(images))
    median = {k: statistics.median(v) for k, v in figures.items()}
    return {"threads": 1, "ms_per_image": median, "rounds_ms": figures,
            "ratio": median["explain_json"] / median["classify"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="model repository with imagenet-lite0 (default: bootstrap one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measured phase")
    parser.add_argument("--concurrency", type=int, default=8, help="clients of the throughput phases")
    parser.add_argument("--distinct", type=int, default=12, help="distinct 640x480 JPEGs")
    parser.add_argument("--occlusion", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from service.repository import ModelRepository
    from training.sample_images import real_photos

    results: dict[str, Any] = {"latency_p50_ms": {}, "throughput_rps": {}, "cpu_ms_per_request": {}, "rounds": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        repo = tmp / "models"
        shutil.copytree(imagenet_repository(args.repo, tmp / "fresh"), repo)
        if args.occlusion:
            legacy_copy(repo)
        images = [p.read_bytes() for p in write_jpegs(tmp / "jpegs", real_photos(), args.distinct, (640, 480))]
        version = ModelRepository(repo).get(NAME)
        results["method"] = version.manifest.explain.method if version.manifest.explain else "occlusion"
        results["in_process"] = in_process(version, images, args.rounds)
        print(f"in process: {results['in_process']['ms_per_image']}", flush=True)
        with running_server(repo, tmp / "home", {"IMGCLF_WORKERS": "1"}) as srv:
            host = srv.url.split("://", 1)[1]
            payloads = {k: [request(host, path, d, {**fields, "model": NAME}) for d in images]
                        for k, (path, fields) in ENDPOINTS.items()}
            rounds: dict[str, dict[str, list[float]]] = {k: {"p50_ms": [], "rps": [], "cpu_ms": []}
                                                         for k in ENDPOINTS}
            order = list(ENDPOINTS)
            for r in range(args.rounds):
                turn = order[r % len(order):] + order[:r % len(order)]
                for name in turn:
                    one = asyncio.run(closed_loop(srv.url, payloads[name], 1, args.seconds))
                    before = tree_cpu_seconds(srv.proc.pid)
                    many = asyncio.run(closed_loop(srv.url, payloads[name], args.concurrency, args.seconds,
                                                   warmup_s=0.0))
                    spent = tree_cpu_seconds(srv.proc.pid) - before
                    assert one["errors"] == many["errors"] == 0, (name, one["statuses"], many["statuses"])
                    rounds[name]["cpu_ms"].append(spent * 1000 / max(1, many["ok"]))
                    rounds[name]["p50_ms"].append(one["p50_ms"])
                    rounds[name]["rps"].append(many["throughput_rps"])
                print(f"round {r + 1}: " + ", ".join(f"{k} {v['p50_ms'][-1]:.1f} ms / {v['rps'][-1]:.1f} rps / "
                                                    f"{v['cpu_ms'][-1]:.1f} CPU ms" for k, v in rounds.items()),
                      flush=True)
            if args.occlusion:
                occ = [request(host, "/explain", d, {"model": LEGACY}) for d in images[:4]]
                one = asyncio.run(closed_loop(srv.url, occ, 1, max(args.seconds, 5.0)))
                results["occlusion_p50_ms"] = one["p50_ms"]
        results["rounds"] = rounds
        for name, v in rounds.items():
            results["latency_p50_ms"][name] = statistics.median(v["p50_ms"])
            results["throughput_rps"][name] = statistics.median(v["rps"])
            results["cpu_ms_per_request"][name] = statistics.median(v["cpu_ms"])
    base_ms, base_rps = results["latency_p50_ms"]["classify"], results["throughput_rps"]["classify"]
    results["latency_ratio"] = {k: v / base_ms for k, v in results["latency_p50_ms"].items()}
    results["throughput_ratio"] = {k: base_rps / v for k, v in results["throughput_rps"].items()}  # cost per request
    base_cpu = results["cpu_ms_per_request"]["classify"]
    results["cpu_ratio"] = {k: v / base_cpu for k, v in results["cpu_ms_per_request"].items()}
    results["goal"] = {"max_ratio": 1.5, "judged_by": "CPU ms per request, server and in process",
                       "met": max(results["cpu_ratio"]["explain_json"], results["in_process"]["ratio"]) <= 1.5}
    results["machine"] = machine_info(("onnxruntime", "bentoml", "pillow", "numpy", "torch"))
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_results("explain_cost", results, markdown(results), args.out)


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    s = r["settings"]
    lines = [
        "# /explain against /classify (benchmarks/explain_cost.py)", "",
        (f"{m['date']}, {m['cpu']}, {m['cores']} cores, onnxruntime {m['versions']['onnxruntime']}, "
        f"bentoml {m['versions']['bentoml']}, pillow {m['versions']['pillow']}, numpy {m['versions']['numpy']}. "
        f"imagenet-lite0 (method: {r['method']}), one worker, {s['distinct']} distinct 640x480 JPEGs; "
        f"{s['rounds']} rounds of {s['seconds']:g} s phases in rotating order; medians over the rounds."), "",
        (f"| endpoint | server CPU per request (ms) | x /classify | p50 latency, 1 client (ms) | x /classify "
         f"| throughput, {s['concurrency']} clients (req/s) | x /classify (time per request) |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ENDPOINTS:
        lines.append(f"| {name} | {r['cpu_ms_per_request'][name]:.1f} | {r['cpu_ratio'][name]:.2f} | "
                     f"{r['latency_p50_ms'][name]:.1f} | {r['latency_ratio'][name]:.2f} | "
                     f"{r['throughput_rps'][name]:.1f} | {r['throughput_ratio'][name]:.2f} |")
    p = r["in_process"]
    lines += ["", (f"In process (one thread, no HTTP, CPU time): classification {p['ms_per_image']['classify']:.2f} "
                   f"ms, explanation with its JSON body {p['ms_per_image']['explain_json']:.2f} ms per image "
                   f"({p['ratio']:.2f}x).")]
    if "occlusion_p50_ms" in r:
        lines += ["", (f"Forward-only fallback (occlusion, 50 forward passes in batches through the queue), one "
                      f"client: p50 {r['occlusion_p50_ms']:.0f} ms ({r['occlusion_p50_ms'] / r['latency_p50_ms']['classify']:.0f}x "
                      "/classify).")]
    goal = r["goal"]
    lines += ["", (f"Goal: an exact explanation (JSON) costs at most {goal['max_ratio']}x a /classify (judged by CPU "
                   f"time per request, in the server and in process): {'met' if goal['met'] else 'NOT met'}. "
                   "Latency and throughput are wall-clock figures: on a shared machine they carry its noise."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
