"""`imgclf batch` from ``s3://`` inputs to an ``s3://`` output, on a real S3 server (SeaweedFS): a job
SIGKILLed at any moment leaves at the URL nothing or a complete output, never half a file, and
``--resume`` finishes it with every row exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from service.batch.job_state import state_dir
from service.batch.outputs import OutputError, open_output, staging_dir
from tests.support import ROOT, images
from tests.support.cli import imgclf, in_process
from tests.support.seaweed import SeaweedFS

pytestmark = pytest.mark.slow  # an S3 server and subprocesses: not in `make test-quick`

MODEL = "imagenet-lite0"
FORMATS = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")]
CORRUPT = b"\xff\xd8\xff\xe0 no jpeg at all"


@pytest.fixture
def store(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A fresh bucket; this process (and the subprocesses it starts) see the server and a private cache.
    Returns the bucket's URL and the variables a subprocess needs."""
    env = {**seaweedfs.env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return seaweedfs.make_bucket(f"batch-{uuid.uuid4().hex[:12]}"), env


def s3() -> Any:  # s3fs is untyped
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


def upload_photos(prefix: str, count: int, size: tuple[int, int] = (64, 48)) -> int:
    """``count`` real photos (JPEG, PNG, WebP) and one corrupt file under ``prefix``; returns the inputs."""
    sources = [images.photo(size, which) for which in ("chelsea", "coffee", "rocket")]
    fs = s3()
    for i in range(count):
        fmt, suffix = FORMATS[i % len(FORMATS)]
        fs.pipe_file(f"{prefix}/part{i % 2}/img{i:04d}.{suffix}", images.encode(sources[i % 3].convert("RGB"), fmt))
    fs.pipe_file(f"{prefix}/part0/broken.jpg", CORRUPT)
    return count + 1


def journal(url: str) -> Path:
    """The journal of the job writing ``url``, in its local staging folder."""
    return state_dir(open_output(url).local) / "journal.jsonl"


def batch(*args: str, repo: Path) -> Any:
    """`imgclf batch` in this process, its workers threads (a forked pytest would carry torch's threads)."""
    return in_process("batch", *args, "--repo", str(repo), "--executor", "thread")


def kill_mid_run(args: list[str], repo: Path, env: dict[str, str], watch: Path, chunks: int) -> None:
    """Start `imgclf batch` and SIGKILL its process group once ``chunks`` chunks are journalled."""
    proc = subprocess.Popen([sys.executable, "-m", "imgclf.cli", "batch", *args, "--repo", str(repo)], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180  # only catches a hang
        while time.monotonic() < deadline and proc.poll() is None:
            if watch.exists() and watch.read_text().count("\n") >= chunks:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the job and its workers, mid-write
        proc.wait()
        proc.stderr.close()


def test_s3_to_s3_killed_midway_resumes_with_every_row_once(imagenet_repo: Path,
                                                             store: tuple[str, dict[str, str]]) -> None:
    bucket, env = store
    inputs = upload_photos(f"{bucket}/in", 40)
    out = f"{bucket}/results/scores.jsonl"
    job = [f"{bucket}/in", "--model", MODEL, "--out", out, "--top-k", "1", "--batch-size", "2", "--chunk-size", "4",
           "--workers", "1"]
    kill_mid_run(job, imagenet_repo, env, journal(out), chunks=2)
    assert not s3().exists(out)  # killed: nothing at the URL, not half a file
    assert journal(out).exists()  # the state is local, where --resume finds it
    resumed = batch(*job, "--resume", repo=imagenet_repo)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{inputs} rows -> {out}" in resumed.stdout and "from the interrupted run" in resumed.stdout
    rows = [json.loads(line) for line in s3().cat_file(out).decode().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(inputs))  # every row exactly once
    assert sorted(r["path"] for r in rows) == sorted(s3().unstrip_protocol(p) for p in s3().find(f"{bucket}/in"))
    assert [r["path"].rsplit("/", 1)[1] for r in rows if r["status"] == "error"] == ["broken.jpg"]
    assert not staging_dir(out).exists()  # nothing left in the cache
    again = batch(*job, repo=imagenet_repo)  # the "exists" check is the URL's
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.fixture
def csv_job(imagenet_repo: Path, store: tuple[str, dict[str, str]]) -> tuple[list[str], str, bytes]:
    """An ordered csv job writing an s3:// URL, already run once to completion: (arguments, URL, output)."""
    bucket, _ = store
    upload_photos(f"{bucket}/in", 14)
    out = f"{bucket}/scores.csv"
    job = [f"{bucket}/in", "--model", MODEL, "--out", out, "--top-k", "2", "--batch-size", "2", "--chunk-size", "4",
           "--workers", "1", "--ordered"]
    done = batch(*job, repo=imagenet_repo)
    assert done.returncode == 0, done.stderr
    return job, out, s3().cat_file(out)


@pytest.mark.parametrize("point", ["mid_chunk", "before_rename", "after_rename"])
def test_csv_overwrite_killed_keeps_the_previous_output_until_the_put(
    imagenet_repo: Path, csv_job: tuple[list[str], str, bytes], point: str
) -> None:
    """--overwrite of an existing output, SIGKILLed (the test-only --kill-at): readers still find the
    previous complete output; --resume puts the new one, byte for byte a clean run's."""
    job, out, clean = csv_job
    assert clean.startswith(b"index,path,") and clean.count(b"\n") == 16  # header + 15 rows
    killed = imgclf("batch", *job, "--overwrite", "--kill-at", point, "--repo", str(imagenet_repo))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert s3().cat_file(out) == clean  # the previous output (or, after the put, the same bytes): never half
    resumed = batch(*job, "--resume", repo=imagenet_repo)
    assert resumed.returncode == 0, resumed.stderr
    assert s3().cat_file(out) == clean
    assert not staging_dir(out).exists()


def test_a_missing_store_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from fsspec.registry import _registry  # the filesystem classes fsspec has loaded

    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed...
    monkeypatch.delitem(_registry, "s3", raising=False)  # ...and fsspec had not loaded it yet
    with pytest.raises(OutputError, match=r"pip install 'imgclf\[s3\]'"):
        open_output("s3://bucket/out.jsonl")
    with pytest.raises(OutputError, match="must name a file"):
        open_output("s3://bucket/results/")
