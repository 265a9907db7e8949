"""TorchServe 0.12 with a traced EfficientNet-Lite0 and its stock ``image_classifier`` handler, tuned.

What a user of TorchServe would run: the same ImageNet weights as ``imagenet-lite0``, traced to
TorchScript in the project's venv (same torch version as the peer's venv), archived with
``torch-model-archiver``, registered with ``batch_size=8, max_batch_delay=50, initial_workers=1``
(the tuned configuration of ``shared/notes/peers.md``). Its handler decodes with Pillow at full size,
uses its own resize and normalisation and does not convert modes: its image work is not imgclf's.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks.peers.envs import PeerEnv, PeerUnavailable, pinned, venv_env

MODEL = "lite0"
TUNED = {"initial_workers": "1", "batch_size": "8", "max_batch_delay": "50", "synchronous": "true"}
JAVA_HINT = "apt-get install -y openjdk-17-jre-headless"


def torchserve_env() -> PeerEnv:
    """torch and torchvision as the project has them, TorchServe 0.12, captum (its handlers import it) and
    pyyaml (its worker imports it without declaring it)."""
    return PeerEnv("torchserve", steps=[[*pinned("torch", "torchvision", "pillow"), "torchserve==0.12.0",
                                         "torch-model-archiver==0.12.0", "captum", "pyyaml"]])


def check_java(minimum: int = 17) -> str:
    """``java -version``'s first line, or PeerUnavailable saying how to install it."""
    java = shutil.which("java")
    if java is None:
        raise PeerUnavailable(f"TorchServe needs Java {minimum}, and there is no `java` on PATH: {JAVA_HINT}")
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60, check=False)
    first = (out.stderr or out.stdout).splitlines()[0] if (out.stderr or out.stdout) else ""
    match = re.search(r'version "(\d+)', first)
    if not match or int(match.group(1)) < minimum:
        raise PeerUnavailable(f"TorchServe needs Java {minimum}; found {first!r}: {JAVA_HINT}")
    return first


def trace_lite0(out: Path) -> Path:
    """The bootstrap model's weights (the offline ImageNet Lite0 package), traced at batch 1 on the CPU."""
    import warnings

    import torch

    from training.config import ModelConfig
    from training.models import create_model

    model = create_model(ModelConfig(arch="efficientnet_lite0", pretrained=True), 1000).model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated, and still what TorchServe loads
        traced = torch.jit.trace(model, torch.zeros(1, 3, 224, 224))
    traced.save(str(out))
    return out


def build_model_store(env_dir: Path, work: Path, labels: list[str]) -> Path:
    """``work/store/lite0.mar``: the traced model, the stock handler and ``index_to_name.json``."""
    store = work / "store"
    store.mkdir(parents=True, exist_ok=True)
    if (store / f"{MODEL}.mar").exists():
        return store
    serialized = trace_lite0(work / "lite0.pt")
    index = work / "index_to_name.json"
    index.write_text(json.dumps({str(i): name for i, name in enumerate(labels)}))
    out = subprocess.run(
        [str(env_dir / "bin" / "torch-model-archiver"), "--model-name", MODEL, "--version", "1.0",
         "--serialized-file", str(serialized), "--handler", "image_classifier", "--extra-files", str(index),
         "--export-path", str(store)], capture_output=True, text=True, timeout=300, check=False,
        env=venv_env(env_dir))
    if out.returncode != 0:
        raise PeerUnavailable(f"torch-model-archiver failed: {out.stderr[-800:]}")
    return store


def write_config(work: Path, store: Path, port: int) -> Path:
    """Loopback addresses (inference ``port``, management +1, metrics +2), no token, model API on."""
    config = work / "config.properties"
    config.write_text("\n".join([
        f"inference_address=http://127.0.0.1:{port}", f"management_address=http://127.0.0.1:{port + 1}",
        f"metrics_address=http://127.0.0.1:{port + 2}", f"model_store={store}", "disable_token_authorization=true",
        "enable_model_api=true", "install_py_dep_per_model=false", "",
    ]))
    return config


def server_command(env_dir: Path, config: Path, store: Path) -> list[str]:
    return [str(env_dir / "bin" / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(config),
            "--model-store", str(store), "--disable-token-auth"]


def server_env(env_dir: Path, work: Path) -> dict[str, str]:
    """Its logs go to ``work/logs``, not to the current directory."""
    env = venv_env(env_dir)
    env["LOG_LOCATION"] = env["METRICS_LOCATION"] = str(work / "logs")
    return env


def register(port: int, timeout_s: float = 300) -> float:
    """Register the archive with the tuned settings on the management port; seconds it took."""
    query = "&".join([f"url={MODEL}.mar", f"model_name={MODEL}", *(f"{k}={v}" for k, v in TUNED.items())])
    started = time.perf_counter()
    request = urllib.request.Request(f"http://127.0.0.1:{port + 1}/models?{query}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise PeerUnavailable(f"TorchServe refused to register the model: {exc.code} {exc.read()[:500]!r}") from exc
    return time.perf_counter() - started


def raw_request(host: str, data: bytes, model: str = MODEL) -> bytes:
    """A prepared ``POST /predictions/NAME`` with the image as the whole body (TorchServe's own examples)."""
    head = (f"POST /predictions/{model} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(data)}\r\nConnection: keep-alive\r\n\r\n").encode()
    return head + data
