"""The Open Inference Protocol endpoint under Triton's perf_analyzer, beside the project's own load generator.

One `imgclf serve` (REST and gRPC, IMGCLF_GRPC_PORT), real JPEGs at mixed ImageNet-like sizes, one image
per request, closed loop at each concurrency (default 1, 8, 32), in this order per concurrency:
- benchmarks/loadgen.py on POST /classify (multipart) and on POST /v2/models/{m}/infer (binary BYTES);
- perf_analyzer (the `perf-analyzer` wheel from PyPI) over HTTP and over gRPC, with the same JPEGs as
  input data (base64 of a little-endian uint32 length + the file, as its docs say for BYTES).

perf_analyzer's real releases ship only manylinux_2_38 wheels (`pip install perf-analyzer` on an older
glibc installs a 0.1.0 placeholder without the binary). So the wheel is fetched with `pip download
--platform manylinux_2_38_x86_64` into a cache; if its binary cannot run here (missing GLIBC_2.38 /
GLIBCXX_3.4.31), Debian trixie's libc6, libstdc++6 and libgcc-s1 are fetched with `apt-get download`
(a private sources list and state dir: the system's apt and libraries are untouched), unpacked with
`dpkg-deb -x`, and perf_analyzer is started through that loader. If any step fails, the results say
which and why, and tritonclient's own clients (threads, one client each) measure instead.

    python -m benchmarks.v2_perf [--repo DIR] [--seconds 10] [--concurrency 1 8 32]
                                 [--perf-analyzer auto|off] [--cache DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import hashlib
import json
import logging
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from benchmarks.loadgen import closed_loop, multipart_request
from benchmarks.machine import NO_CACHE, RESULTS, imagenet_repository, machine_info, write_results
from imgclf.devserver import free_port, running_server

NAME = "imagenet-lite0"
PA_VERSION = "2.60.0"
PA_PLATFORM = "manylinux_2_38_x86_64"
TRIXIE = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main"
RUNTIME_DEBS = ("libc6", "libstdc++6", "libgcc-s1")
MIXED_SIZES = [(500, 375), (640, 480), (400, 300), (375, 500), (800, 600), (300, 400)]
LIB = Path("usr/lib/x86_64-linux-gnu")
log = logging.getLogger("v2_perf")


def _run(command: list[str], timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stderr or result.stdout).strip().splitlines()[-1][:300] if (result.stderr or result.stdout) else ""


def perf_analyzer(cache: Path) -> tuple[list[str] | None, dict[str, Any]]:
    """The command that starts perf_analyzer here (None if it cannot), and how it was obtained."""
    info: dict[str, Any] = {"version": PA_VERSION}
    wheels = cache / "wheel"
    wheel = next(iter(sorted(wheels.glob(f"perf_analyzer-{PA_VERSION}-*.whl"))), None)
    if wheel is None:
        got = _run([sys.executable, "-m", "pip", "download", f"perf-analyzer=={PA_VERSION}", "--no-deps",
                    "--only-binary=:all:", "--platform", PA_PLATFORM, "-d", str(wheels), "-q"])
        wheel = next(iter(sorted(wheels.glob(f"perf_analyzer-{PA_VERSION}-*.whl"))), None)
        if wheel is None:
            return None, info | {"unavailable": f"pip download perf-analyzer=={PA_VERSION} failed: {_tail(got)}"}
    info |= {"wheel": wheel.name, "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}
    binary = cache / "pa" / "perf_analyzer" / "bin" / "perf_analyzer"
    if not binary.exists():
        with zipfile.ZipFile(wheel) as zf:
            zf.extract("perf_analyzer/bin/perf_analyzer", cache / "pa")
        binary.chmod(0o755)
    direct = _run([str(binary), "--version"], 60)
    if direct.returncode == 0:
        return [str(binary)], info | {"runs": "directly", "reports": (direct.stdout or direct.stderr).strip()}
    missing = re.findall(r"([\w.+-]+\.so[.\d]*): (version `[^']+' not found)", direct.stderr)
    info["direct_failure"] = "; ".join(f"{lib}: {what}" for lib, what in missing) or _tail(direct)
    root = cache / "runtime"
    loader = root / LIB / "ld-linux-x86-64.so.2"
    if not loader.exists():
        problem = _fetch_runtime(root)
        if problem:
            return None, info | {"unavailable": f"{info['direct_failure']}; and the trixie runtime: {problem}"}
    command = [str(loader), "--library-path", str(root / LIB), str(binary)]
    check = _run([*command, "--version"], 60)
    if check.returncode != 0:
        return None, info | {"unavailable": f"{info['direct_failure']}; through trixie's loader: {_tail(check)}"}
    debs = sorted(p.name for p in (root / "debs").glob("*.deb"))
    return command, info | {"runs": "through Debian trixie's loader (ld-linux-x86-64.so.2 --library-path)",
                            "runtime_debs": debs, "reports": (check.stdout or check.stderr).strip()}


def _fetch_runtime(root: Path) -> str | None:
    """Debian trixie's C and C++ runtime unpacked under ``root``; None, or what went wrong."""
    (root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (root / "apt-cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (root / "debs").mkdir(exist_ok=True)
    sources = root / "sources.list"
    sources.write_text(TRIXIE + "\n")
    apt = ["apt-get", "-q", "-o", f"Dir::Etc::sourcelist={sources}", "-o", "Dir::Etc::sourceparts=/dev/null",
           "-o", f"Dir::State::Lists={root / 'lists'}", "-o", f"Dir::Cache={root / 'apt-cache'}"]
    for step in (["update"], ["download", *RUNTIME_DEBS]):
        try:
            result = _run([*apt, *step], 900, cwd=root / "debs")
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"apt-get {step[0]}: {exc}"
        if result.returncode != 0:
            return f"apt-get {step[0]} failed: {_tail(result)}"
    for deb in (root / "debs").glob("*.deb"):
        unpacked = _run(["dpkg-deb", "-x", str(deb), str(root)])
        if unpacked.returncode != 0:
            return f"dpkg-deb -x {deb.name}: {_tail(unpacked)}"
    return None


def pa_input(jpegs: list[bytes], path: Path) -> Path:
    """perf_analyzer's input data: one request per JPEG, BYTES elements length-prefixed then base64."""
    data = [{"image": {"content": {"b64": base64.b64encode(struct.pack("<I", len(j)) + j).decode()}, "shape": [1]}}
            for j in jpegs]
    path.write_text(json.dumps({"data": data}))
    return path


def run_perf_analyzer(command: list[str], url: str, protocol: str, data: Path, concurrency: int,
                      seconds: float, out: Path) -> dict[str, Any]:
    """perf_analyzer's figures at one concurrency. Its default stability test (3 windows within 10 %) rarely
    passes on a shared 2-core machine: 50 % first; if even that fails, 3 windows as they come, flagged."""
    report = out / f"pa_{protocol}_c{concurrency}.csv"
    for stability, flag in (("50", {}), ("1000", {"unstable": True})):
        report.unlink(missing_ok=True)
        args = [*command, "-m", NAME, "-u", url, "-i", protocol, "--input-data", str(data),
                "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval",
                str(int(seconds * 1000)), "--stability-percentage", stability, "--max-trials", "8", "-f", str(report)]
        result = _run(args, 60 + 12 * seconds)
        if result.returncode == 0 and report.exists():
            break
    else:
        return {"error": _tail(result), "command": " ".join(args[len(command):])}
    row = next(csv.DictReader(report.open()))
    us = lambda key: float(row[key]) / 1000 if row.get(key) not in (None, "") else None
    return {"throughput_rps": float(row["Inferences/Second"]), "p50_ms": us("p50 latency"), "p90_ms": us("p90 latency"),
            "p95_ms": us("p95 latency"), "p99_ms": us("p99 latency"), "mean_ms": us("Avg latency"),
            "server_queue_ms": us("Server Queue"), "server_compute_ms": us("Server Compute Infer"),
            "stability_percentage": float(stability), **flag, "stdout_tail": result.stdout.strip().splitlines()[-6:]}


def run_tritonclient(url: str, protocol: str, jpegs: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    """Closed loop with tritonclient's own clients: ``concurrency`` threads, one client each."""
    import numpy as np

    module = __import__(f"tritonclient.{protocol}", fromlist=["InferInput"])
    latencies: list[float] = []
    errors = [0]
    stop_at = time.perf_counter() + seconds

    def worker(offset: int) -> None:
        client = module.InferenceServerClient(url)
        i = offset
        while time.perf_counter() < stop_at:
            tensor = module.InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([jpegs[i % len(jpegs)]], dtype=np.object_))
            start = time.perf_counter()
            try:
                client.infer(NAME, [tensor], outputs=[module.InferRequestedOutput("probabilities")])
                latencies.append((time.perf_counter() - start) * 1000)
            except Exception:  # noqa: BLE001 - counted, the loop goes on
                errors[0] += 1
            i += concurrency

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = sorted(latencies)
    pct = lambda p: lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))] if lat else None
    return {"throughput_rps": len(lat) / seconds, "p50_ms": pct(50), "p90_ms": pct(90), "p95_ms": pct(95),
            "p99_ms": pct(99), "errors": errors[0]}


def v2_request(host: str, jpeg: bytes) -> bytes:
    """A raw HTTP/1.1 V2 infer request as tritonclient.http sends it (binary BYTES input)."""
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(jpeg) + 4}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    body = header + struct.pack("<I", len(jpeg)) + jpeg
    return (f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: {host}\r\nInference-Header-Content-Length: "
            f"{len(header)}\r\nContent-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode() + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="model repository with imagenet-lite0 (default: bootstrap one)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--distinct", type=int, default=24, help="distinct JPEGs")
    parser.add_argument("--perf-analyzer", choices=("auto", "off"), default="auto",
                        help="off: measure with tritonclient's own clients only")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "imgclf-v2-perf",
                        help="where the perf_analyzer wheel and the trixie runtime are kept")
    parser.add_argument("--settle", type=float, default=2.0, help="idle seconds before each measurement")
    parser.add_argument("--latency-budget-ms", type=float, default=0.0,
                        help="the server's IMGCLF_LATENCY_BUDGET_MS (default off: perf_analyzer stops at the first "
                             "503, where loadgen waits Retry-After and goes on)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from benchmarks.batch_throughput import write_jpegs
    from service.settings import Settings
    from training.sample_images import real_photos

    if args.perf_analyzer == "auto":
        args.cache.mkdir(parents=True, exist_ok=True)
        command, pa_info = perf_analyzer(args.cache)
    else:
        command, pa_info = None, {"unavailable": "not tried (--perf-analyzer off)"}
    print(f"perf_analyzer: {pa_info.get('runs') or pa_info['unavailable']}", flush=True)
    results: dict[str, Any] = {"perf_analyzer": pa_info, "runs": {}, "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        repo = imagenet_repository(args.repo, tmp)
        photos = real_photos()
        per_size = max(1, args.distinct // len(MIXED_SIZES))
        jpegs = [p.read_bytes() for i, size in enumerate(MIXED_SIZES)
                 for p in write_jpegs(tmp / f"in{i}", photos, per_size, size)]
        results["jpegs"] = {"count": len(jpegs), "sizes": MIXED_SIZES, "mean_bytes": sum(map(len, jpegs)) / len(jpegs)}
        data = pa_input(jpegs, tmp / "pa_input.json")
        grpc_port = free_port()
        env = {"IMGCLF_GRPC_PORT": str(grpc_port), "IMGCLF_GRPC_HOST": "127.0.0.1",
               "IMGCLF_LATENCY_BUDGET_MS": f"{args.latency_budget_ms:g}"}
        results["workers"] = Settings.from_env(env).worker_count  # the default: one per usable core
        with running_server(repo, tmp / "home", {**env, **NO_CACHE}) as srv:
            host = srv.url.removeprefix("http://")
            urls = {"http": host, "grpc": f"127.0.0.1:{grpc_port}"}
            classify = [multipart_request(host, "/classify", "image", "x.jpg", j) for j in jpegs]
            v2_rest = [v2_request(host, j) for j in jpegs]
            for c in args.concurrency:
                run: dict[str, Any] = {}
                for label, payloads in (("loadgen /classify (multipart)", classify), ("loadgen V2 REST", v2_rest)):
                    time.sleep(args.settle)
                    run[label] = asyncio.run(closed_loop(srv.url, payloads, c, args.seconds))
                for protocol in ("http", "grpc"):
                    time.sleep(args.settle)
                    if command is not None:
                        run[f"perf_analyzer V2 {protocol}"] = run_perf_analyzer(
                            command, urls[protocol], protocol, data, c, args.seconds, tmp)
                    else:
                        run[f"tritonclient V2 {protocol}"] = run_tritonclient(urls[protocol], protocol, jpegs, c,
                                                                              args.seconds)
                results["runs"][str(c)] = run
                for label, r in run.items():
                    print(f"c={c} {label}: {fmt(r)}", flush=True)
    results["load_average_after"] = os.getloadavg()  # other work on the machine skews every figure alike
    results["machine"] = machine_info(("onnxruntime", "bentoml", "tritonclient", "grpcio", "numpy", "pillow"))
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_results("v2_perf", results, markdown(results), args.out)


def fmt(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"failed: {r['error']}"
    p = lambda v: f"{v:.1f}" if v is not None else "-"
    return (f"{r['throughput_rps']:.1f} req/s, p50 {p(r.get('p50_ms'))} p90 {p(r.get('p90_ms'))} "
            f"p95 {p(r.get('p95_ms'))} p99 {p(r.get('p99_ms'))} ms")


def markdown(r: dict[str, Any]) -> str:
    m, pa = r["machine"], r["perf_analyzer"]
    v = m["versions"]
    how = (f"perf_analyzer {pa['version']} ({pa.get('wheel')}, sha256 {pa.get('wheel_sha256', '?')[:16]}...) ran "
           f"{pa['runs']}" + (f": {', '.join(pa['runtime_debs'])}" if pa.get("runtime_debs") else "") + "."
           if pa.get("runs") else f"perf_analyzer could not run: {pa['unavailable']}. tritonclient's own clients "
           "measured instead (threads, one client each).")
    if pa.get("direct_failure"):
        how += f" Run directly it fails: {pa['direct_failure']}."
    lines = [
        "# Open Inference Protocol (V2): perf_analyzer and the project's load generator on one server",
        "",
        (f"{m['cpu']}, {m['cores']} cores, {m['platform']}; Python {m['python']}, onnxruntime {v['onnxruntime']}, "
         f"bentoml {v['bentoml']}, tritonclient {v['tritonclient']}, grpcio {v['grpcio']}; {m['date']}. "
         f"Model imagenet-lite0 fp32, default settings ({r['workers']} workers: one per usable core) but "
         f"IMGCLF_LATENCY_BUDGET_MS={r['settings']['latency_budget_ms']:g} (perf_analyzer stops at the first 503, "
         "which admission answers at c=32 on a busy 2-core machine with the default 1000 ms budget); "
         f"{r['jpegs']['count']} real JPEGs at ImageNet-like "
         f"sizes, one image per request, closed loop, {r['settings']['seconds']:g} s per measurement. Every "
         "client runs on the same machine as the server and takes some of its CPU. Load average (1 min) "
         f"before {r['load_average_before'][0]:.1f}, after {r['load_average_after'][0]:.1f}."),
        "",
        how,
        ("Server-side breakdown (perf_analyzer's rows): from imgclf's statistics extension (`GET "
         "/v2/models/{m}/stats`, summed over the workers): the wait in the batching queue and the ONNX Runtime "
         "run per request; decoding the JPEG is in neither (perf_analyzer's \"overhead\")."),
        "",
        ("| concurrency | client | req/s | p50 ms | p90 ms | p95 ms | p99 ms | errors / refused | server queue ms "
        "| server compute infer ms |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    p = lambda x: f"{x:.1f}" if x is not None else "-"
    for c, run in r["runs"].items():
        for label, x in run.items():
            if "error" in x:
                lines.append(f"| {c} | {label} | failed: {x['error']} | | | | | | | |")
                continue
            bad = f"{x.get('errors', 0)} / {x.get('refused', 0)}" if "refused" in x else str(x.get("errors", "-"))
            label += " (unstable)" if x.get("unstable") else ""
            lines.append(f"| {c} | {label} | {x['throughput_rps']:.1f} | {p(x.get('p50_ms'))} | {p(x.get('p90_ms'))} | "
                         f"{p(x.get('p95_ms'))} | {p(x.get('p99_ms'))} | {bad} | {p(x.get('server_queue_ms'))} | "
                         f"{p(x.get('server_compute_ms'))} |")
    lines += ["", ("loadgen reports p50/p95/p99 only. perf_analyzer sends the input data file's requests in turn "
                   "and asks for every output; its stability test was relaxed to 50 % (unstable: 3 windows as they "
                   "came).")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
