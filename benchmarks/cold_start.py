"""Cold start: from `imgclf serve` process start to `/readyz` answering 200, then the first request.

    python -m benchmarks.cold_start [--repo DIR] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import RESULTS, imagenet_repository, machine_info, write_results
from imgclf.devserver import running_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="model repository with imagenet-lite0 (default: bootstrap one)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from training.sample_images import real_photos

    photo = real_photos()["chelsea"]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = imagenet_repository(args.repo, Path(tmp))
        for i in range(args.runs):
            with running_server(repo, Path(tmp) / f"home{i}") as srv:
                client, ready_s = srv.client, srv.ready_s
                start = time.perf_counter()
                response = client.post("/classify", files={"image": ("chelsea.jpg", photo)})
                first_ms = (time.perf_counter() - start) * 1000
                response.raise_for_status()
                start = time.perf_counter()
                client.post("/classify", files={"image": ("chelsea.jpg", photo)}).raise_for_status()
                second_ms = (time.perf_counter() - start) * 1000
            runs.append({"ready_s": ready_s, "first_request_ms": first_ms, "second_request_ms": second_ms})
            print(runs[-1], flush=True)
    summary = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    payload = {"machine": machine_info(("onnxruntime", "bentoml")), "runs": runs, "median": summary,
               "target_ready_s": 5.0}
    m = payload["machine"]
    md = "\n".join([
        "# Cold start of `imgclf serve` (imagenet-lite0)", "",
        (f"{m['cpu']}, {m['cores']} cores; onnxruntime {m['versions']['onnxruntime']}, bentoml "
        f"{m['versions']['bentoml']}; {m['date']}; median of {len(runs)} runs."), "",
        "| process start to /readyz 200 | first request | second request |", "|---|---|---|",
        f"| {summary['ready_s']:.2f} s | {summary['first_request_ms']:.0f} ms | {summary['second_request_ms']:.0f} ms |",
        "", "Target: ready in under 5 s.",
    ]) + "\n"
    write_results("cold_start", payload, md, args.out)


if __name__ == "__main__":
    main()
