"""Triton 2.51 from the ``nvidia-pytriton`` wheel, serving imgclf's preprocessing + ONNX Runtime.

The wheel bundles the server binary and the Python backend, not an ONNX Runtime backend, so the model
is a Python-backend model (``triton_model.py``) that calls ``service.preprocessing.image_to_tensor``
and one ONNX Runtime session per instance: both servers then do identical image work and what differs
is the serving layer. Set-up traps (``shared/notes/peers.md``): the stub for this Python must be
copied next to the backend, the stub ignores PYTHONPATH (the model adds its site directories itself),
and ``LD_LIBRARY_PATH`` must name this Python's ``libpython``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.peers.envs import ROOT, PeerEnv, PeerUnavailable, pinned, venv_env

MODEL = "lite0"
TRITON_VERSION = "nvidia-pytriton==0.7.0"  # Triton server 2.51
PATHS_CODE = ("import json, sys, sysconfig; print(json.dumps([sysconfig.get_paths()['purelib'], "
              "sysconfig.get_config_var('LIBDIR'), f'{sys.version_info[0]}.{sys.version_info[1]}']))")


def triton_env() -> PeerEnv:
    """The wheel without its Python API's dependencies, plus imgclf's decode stack pinned to the versions
    the project runs (same Pillow, same ONNX Runtime), except numpy: the backend's stub is built for
    numpy 1.x (under numpy 2 it reads BYTES tensors as garbage and aborts), and imgclf supports 1.26."""
    return PeerEnv("triton", steps=[["--no-deps", TRITON_VERSION],
                                    ["numpy==1.26.4", *pinned("pillow", "pillow-heif", "onnxruntime", "pydantic")]])


@dataclass(frozen=True)
class TritonInstall:
    """Paths inside the Triton venv, with the stub for its Python put in place."""

    server: Path
    backends: Path
    caches: Path
    site_packages: Path
    libdir: str

    @classmethod
    def prepare(cls, env_dir: Path) -> TritonInstall:
        python = env_dir / "bin" / "python"
        out = subprocess.run(
            [str(python), "-c", PATHS_CODE],
            capture_output=True, text=True, timeout=120, check=False)
        if out.returncode != 0:
            raise PeerUnavailable(f"the Triton venv's Python does not run: {out.stderr[-500:]}")
        purelib, libdir, pyver = json.loads(out.stdout)
        home = Path(purelib) / "pytriton" / "tritonserver"  # not imported: PyTriton's own API is not installed
        if not (home / "bin" / "tritonserver").exists():
            raise PeerUnavailable(f"no tritonserver binary in {home}")
        stub = home / "python_backend_stubs" / pyver / "triton_python_backend_stub"
        if not stub.exists():
            raise PeerUnavailable(f"nvidia-pytriton has no Python-backend stub for Python {pyver}")
        target = home / "backends" / "python" / stub.name
        if not target.exists():
            shutil.copy2(stub, target)  # trap 1: the backend looks for the stub next to itself
        for exe in (home / "bin" / "tritonserver", target):
            exe.chmod(exe.stat().st_mode | 0o111)
        if not (Path(libdir) / f"libpython{pyver}.so").exists() and not list(Path(libdir).glob("libpython3*.so*")):
            raise PeerUnavailable(f"this Python has no shared libpython in {libdir}: the Triton stub needs one")
        return cls(home / "bin" / "tritonserver", home / "backends", home / "caches", Path(purelib), libdir)


def write_model_repository(root: Path, model_path: Path, spec_json: str, labels: list[str], site_dirs: list[Path],
                           instances: int = 2, intra_op_threads: int = 1, max_batch: int = 32,
                           queue_delay_us: int = 2000) -> Path:
    """``root/lite0/{config.pbtxt, labels.txt, 1/model.py}``: dynamic batching, ``instances`` x 1 thread."""
    model_dir = root / MODEL
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(__file__).with_name("triton_model.py"), model_dir / "1" / "model.py")
    (model_dir / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    params = {"site_dirs": os.pathsep.join(str(d) for d in site_dirs), "model_path": str(model_path.resolve()),
              "spec": spec_json, "intra_op_threads": str(intra_op_threads)}
    parameters = "\n".join(f"parameters {{ key: {json.dumps(k)} value {{ string_value: {json.dumps(v)} }} }}"
                           for k, v in params.items())
    (model_dir / "config.pbtxt").write_text(f"""name: "{MODEL}"
backend: "python"
max_batch_size: {max_batch}
input [{{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] }}]
output [{{ name: "PROBS" data_type: TYPE_FP32 dims: [ {len(labels)} ] label_filename: "labels.txt" }}]
dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}
instance_group [{{ count: {instances} kind: KIND_CPU }}]
{parameters}
""")
    return root


def server_command(install: TritonInstall, repository: Path, port: int) -> list[str]:
    """HTTP on ``port``, gRPC and metrics on the next two, all on loopback."""
    return [str(install.server), f"--model-repository={repository}", f"--backend-directory={install.backends}",
            f"--cache-directory={install.caches}", "--http-address=127.0.0.1", f"--http-port={port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={port + 1}", "--metrics-address=127.0.0.1",
            f"--metrics-port={port + 2}", "--allow-gpu-metrics=false", "--exit-timeout-secs=5"]


def server_env(install: TritonInstall, env_dir: Path) -> dict[str, str]:
    """Trap 3: the stub must load the libpython of the Python whose standard library the venv uses."""
    env = venv_env(env_dir)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (install.libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
    return env


def site_dirs(install: TritonInstall) -> list[Path]:
    """What the model puts first in the stub's sys.path: the Triton venv, then the project (``service``)."""
    return [install.site_packages, ROOT]


def v2_request(host: str, data: bytes, top_k: int = 5, model: str = MODEL) -> bytes:
    """A prepared KServe V2 infer request with the binary tensor extension: one BYTES element.

    The body is the JSON header, then the element as a little-endian uint32 length and the bytes;
    ``Inference-Header-Content-Length`` says where the JSON ends. ``PROBS`` is asked for through the
    classification extension (top ``top_k`` as "score:index:label"), the answer imgclf gives too.
    """
    header = json.dumps({
        "inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": 4 + len(data)}}],
        "outputs": [{"name": "PROBS", "parameters": {"classification": top_k}}],
    }, separators=(",", ":")).encode()
    body = header + len(data).to_bytes(4, "little") + data
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode()
    return head + body


def ready_path(model: str = MODEL) -> str:
    return f"/v2/models/{model}/ready"


def stack_from_log(log: Path) -> dict[str, Any]:
    """The versions the model's stub really imported (its ``peer-stack`` log line), and the server's version."""
    out: dict[str, Any] = {}
    for line in log.read_text(errors="replace").splitlines():
        if "peer-stack " in line and "stack" not in out:
            text = line.split("peer-stack ", 1)[1].rstrip('"')
            try:
                out["stack"] = json.loads(text.replace('\\"', '"'))
            except ValueError:
                out["stack"] = text
        elif "server_version" in line:
            out["server_version"] = line.split("|")[2].strip() if line.count("|") >= 3 else line
    return out
