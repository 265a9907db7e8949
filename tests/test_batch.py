"""`imgclf batch` for real: image files written here (mixed formats, some corrupt), the bootstrapped
ImageNet model, worker processes, a SIGKILL at every point of the durable writes, a killed parent
whose workers must die with it, a local Ray."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.batch.job import BatchOptions
from service.batch.job_state import KillPoint, state_dir
from service.batch.runner import run_batch
from service.settings import Settings
from tests.support import ROOT, images
from tests.support.cli import in_process

pytestmark = pytest.mark.slow  # servers, training or subprocesses: not in `make test-quick`

MODEL = "imagenet-lite0"
# the installed console script, as a user runs it (python -m imgclf.cli where there is none)
_SCRIPT = Path(sys.executable).with_name("imgclf")
IMGCLF = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "imgclf.cli"]
CORRUPT = {"broken.jpg": b"\xff\xd8\xff\xe0 this is no jpeg", "empty.png": b"", "html.webp": b"<html>hi</html>"}


def write_photos(root: Path, count: int, size: tuple[int, int] = (160, 120)) -> list[Path]:
    """``count`` real photos in JPEG/PNG/WebP/GIF/TIFF across sub-directories, plus the corrupt files."""
    sources = [images.photo(size, which) for which in ("chelsea", "coffee", "rocket", "astronaut")]
    formats = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"), ("TIFF", "tif")]
    paths = []
    for i in range(count):
        fmt, suffix = formats[i % len(formats)]
        path = root / f"part{i % 3}" / f"img{i:04d}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        img = sources[i % len(sources)]
        (img.convert("P") if fmt == "GIF" else img).save(path, format=fmt)
        paths.append(path)
    for name, data in CORRUPT.items():
        (root / "part0" / name).write_bytes(data)
        paths.append(root / "part0" / name)
    (root / "part1" / "notes.txt").write_text("not an image, not listed")
    return paths


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    write_photos(root, 30)
    return root


def settings_for(repo: Path) -> Settings:
    return Settings.from_env({}, model_repo=repo)


def run(repo: Path, source: Path | str, out: Path, **options: object):
    return run_batch(BatchOptions(source=str(source), model=MODEL, out=out, **options), settings_for(repo))


def cli(*args: str, repo: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IMGCLF, "batch", *args, "--repo", str(repo)],
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=300, check=False)


def cli_here(*args: str, repo: Path) -> subprocess.CompletedProcess[str]:
    """`imgclf batch` in this process, its workers threads (a forked pytest would carry torch's threads)."""
    return in_process("batch", *args, "--repo", str(repo), "--executor", "thread")


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- rows --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_one_row_per_input_and_corrupt_files_are_errors(
    imagenet_repo: Path, photos: Path, tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / f"scores.{fmt}"
    summary = run(imagenet_repo, photos, out, top_k=3, batch_size=4, chunk_size=8, ordered=True)
    rows = read_rows(out)
    listed = sorted(str(p) for p in photos.rglob("*") if p.is_file() and p.suffix != ".txt")
    assert len(rows) == len(listed) == summary.total == 33
    assert sorted(r["path"] for r in rows) == listed  # no duplicates, no gaps
    assert [int(r["index"]) for r in rows] == list(range(33))  # --ordered: input order
    errors = {Path(r["path"]).name: r for r in rows if r["status"] == "error"}
    assert set(errors) == set(CORRUPT)
    assert all(r["error_kind"] and r["error_message"] for r in errors.values())
    assert summary.error == 3 and summary.ok == 30 and sum(summary.errors_by_kind.values()) == 3
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(str(r["version"]) == "1" and r["model"] == MODEL for r in rows)
    cats = [r for r in ok if int(Path(r["path"]).stem[3:]) % 4 == 0]  # the chelsea photos
    first = (lambda r: r["label_1"]) if fmt == "csv" else (lambda r: r["labels"][0])
    assert sum(first(r) in {"tabby", "tiger cat", "Egyptian cat"} for r in cats) >= len(cats) - 1
    assert not state_dir(out).exists()


def test_manifests_globs_and_file_urls(imagenet_repo: Path, photos: Path, tmp_path: Path) -> None:
    chosen = sorted(photos.rglob("img*.jpg"))[:4]
    (tmp_path / "list.txt").write_text("# a comment\n\n" + "\n".join(
        [str(chosen[0]), os.path.relpath(chosen[1], tmp_path), str(tmp_path / "missing.jpg")]) + "\n")
    (tmp_path / "list.csv").write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in enumerate(chosen)))
    text = read_rows(run(imagenet_repo, tmp_path / "list.txt", tmp_path / "a.jsonl").out)
    assert [r["status"] for r in sorted(text, key=lambda r: r["index"])] == ["ok", "ok", "error"]
    assert sorted(text, key=lambda r: r["index"])[2]["error_kind"] == "read_error"
    assert Path(sorted(text, key=lambda r: r["index"])[1]["path"]) == chosen[1]  # relative to the manifest
    assert len(read_rows(run(imagenet_repo, tmp_path / "list.csv", tmp_path / "b.jsonl").out)) == 4
    assert len(read_rows(run(imagenet_repo, f"{photos}/**/*.gif", tmp_path / "c.jsonl").out)) == 6
    assert len(read_rows(run(imagenet_repo, f"file://{photos}/part1", tmp_path / "d.jsonl").out)) == 10


# --- the command -------------------------------------------------------------------------------------


def test_cli_summary_exit_codes_and_refusals(imagenet_repo: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    result = cli(str(photos), "--model", MODEL, "--out", str(out), repo=imagenet_repo)
    assert result.returncode == 0, result.stderr  # bad files do not fail the job
    assert "33 rows" in result.stdout and "error 3" in result.stdout and "img/s" in result.stdout
    assert "\x1b[" not in result.stderr  # no progress bar drawn when not a terminal
    again = cli(str(photos), "--model", MODEL, "--out", str(out), repo=imagenet_repo)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    strict = cli(str(photos), "--model", MODEL, "--out", str(out), "--overwrite", "--fail-on-error", repo=imagenet_repo)
    assert strict.returncode == 1
    for args, words in [
        (["--model", "nope"], "nope"),
        (["--model", "../x"], "invalid"),
        (["--model", MODEL, "--top-k", "5000"], "top-k"),
        (["--model", MODEL, "--engine", "spark"], "engine"),
    ]:
        bad = cli(str(photos), *args, "--out", str(tmp_path / "x.csv"), repo=imagenet_repo)
        assert bad.returncode == 2 and words in bad.stderr.lower(), bad.stderr
        assert not (tmp_path / "x.csv").exists()
    (tmp_path / "empty").mkdir()
    empty = cli(str(tmp_path / "empty"), "--model", MODEL, "--out", str(tmp_path / "e.csv"), repo=imagenet_repo)
    assert empty.returncode == 2 and "no images" in empty.stderr


def test_resume_refuses_a_different_job(imagenet_repo: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    state = state_dir(out)
    state.mkdir()
    (state / "job.json").write_text(json.dumps({
        "source": str(photos), "model": MODEL, "version": 1, "format": "jsonl", "top_k": 3, "chunk_size": 512,
        "ordered": False}))
    (state / "rows.jsonl").write_text("")
    with pytest.raises(Exception, match="top_k"):
        run(imagenet_repo, photos, out, top_k=5, resume=True)
    with pytest.raises(Exception, match="--resume"):
        run(imagenet_repo, photos, out, top_k=3)


# --- crash and resume ---------------------------------------------------------------------------------


def _kill_mid_run(args: list[str], repo: Path, journal: Path, chunks_before_kill: int) -> None:
    proc = subprocess.Popen([*IMGCLF, "batch", *args, "--repo", str(repo)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= chunks_before_kill:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the job finished before it could be killed; give it more inputs"
    os.killpg(proc.pid, signal.SIGKILL)  # the job and its workers, mid-write
    proc.wait()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_kill_9_then_resume_equals_a_clean_run(imagenet_repo: Path, tmp_path: Path, fmt: str) -> None:
    root = tmp_path / "many"
    write_photos(root, 90, size=(64, 48))
    common = [str(root), "--model", MODEL, "--top-k", "2", "--batch-size", "3", "--chunk-size", "6", "--ordered",
              "--workers", "1"]
    clean, resumed = tmp_path / f"clean.{fmt}", tmp_path / f"resumed.{fmt}"
    assert cli(*common, "--out", str(clean), repo=imagenet_repo).returncode == 0
    _kill_mid_run([*common, "--out", str(resumed)], imagenet_repo, state_dir(resumed) / "journal.jsonl", 3)
    assert not resumed.exists() and state_dir(resumed).exists()  # no half-written output
    finished = cli(*common, "--out", str(resumed), "--resume", repo=imagenet_repo)
    assert finished.returncode == 0, finished.stderr
    assert "from the interrupted run" in finished.stdout
    if fmt == "csv":
        assert resumed.read_bytes() == clean.read_bytes()
    else:
        assert read_rows(resumed) == read_rows(clean)
    assert not state_dir(resumed).exists()


def test_unordered_kill_9_then_resume_has_every_row_once(imagenet_repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "many"
    write_photos(root, 60, size=(64, 48))
    common = [str(root), "--model", MODEL, "--top-k", "1", "--batch-size", "2", "--chunk-size", "4"]
    out = tmp_path / "u.jsonl"
    _kill_mid_run([*common, "--out", str(out)], imagenet_repo, state_dir(out) / "journal.jsonl", 2)
    assert cli(*common, "--out", str(out), "--resume", repo=imagenet_repo).returncode == 0
    rows = read_rows(out)
    assert sorted(r["index"] for r in rows) == list(range(63))


KILL_POINTS: tuple[KillPoint, ...] = (
    "before_first_chunk", "mid_chunk", "after_chunk_before_journal", "before_rename", "after_rename")
# csv and parquet in input order (csv byte for byte); jsonl as chunks finish (the same set of rows)
KILL_JOBS = {"csv": ["--ordered"], "parquet": ["--ordered"], "jsonl": []}


@pytest.fixture(scope="module")
def killable(imagenet_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, Path]]:
    """A job of 23 inputs in 6 chunks, and its uninterrupted output in each format."""
    root = tmp_path_factory.mktemp("killable")
    write_photos(root, 20, size=(48, 36))
    common = [str(root), "--model", MODEL, "--top-k", "2", "--batch-size", "2", "--chunk-size", "4", "--workers", "1"]
    clean = {}
    for fmt, flags in KILL_JOBS.items():
        clean[fmt] = root.parent / f"{root.name}-clean.{fmt}"
        done = cli_here(*common, *flags, "--out", str(clean[fmt]), repo=imagenet_repo)
        assert done.returncode == 0, done.stderr
    return common, clean


@pytest.mark.parametrize("fmt", list(KILL_JOBS))
@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_at_each_point_resumes_to_the_clean_output(
    imagenet_repo: Path, killable: tuple[list[str], dict[str, Path]], tmp_path: Path, point: str, fmt: str
) -> None:
    """`imgclf batch` SIGKILLs itself at ``point`` (the test-only --kill-at); --resume finishes the job (in
    process: what is tested is what the killed process left on disk)."""
    common, clean = killable
    out = tmp_path / f"out.{fmt}"
    job = [*common, *KILL_JOBS[fmt], "--out", str(out)]
    killed = cli(*job, "--kill-at", point, repo=imagenet_repo)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert state_dir(out).exists() and out.exists() == (point == "after_rename")
    resumed = cli_here(*job, "--resume", repo=imagenet_repo)
    assert resumed.returncode == 0, resumed.stderr
    assert "23 rows" in resumed.stdout
    if fmt == "csv":
        assert out.read_bytes() == clean[fmt].read_bytes()
    elif fmt == "parquet":
        assert read_rows(out) == read_rows(clean[fmt])
    else:
        def by_index(path: Path) -> list[dict]:
            return sorted(read_rows(path), key=lambda r: r["index"])
        assert by_index(out) == by_index(clean[fmt])
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no state, no temporary debris left
    if point == "after_rename":  # the job is complete now: nothing is left to resume
        again = cli_here(*job, "--resume", repo=imagenet_repo)
        assert again.returncode == 2 and "--overwrite" in again.stderr


def test_resume_after_a_kill_before_the_first_rows_of_an_older_version(imagenet_repo: Path, photos: Path,
                                                                        tmp_path: Path) -> None:
    """Before the state directory was built whole, a kill could leave job.json and no rows file."""
    out = tmp_path / "old.jsonl"
    state_dir(out).mkdir()
    (state_dir(out) / "job.json").write_text(json.dumps({
        "source": str(photos), "model": MODEL, "version": 1, "format": "jsonl", "top_k": 3, "chunk_size": 512,
        "ordered": False}))
    assert run(imagenet_repo, photos, out, top_k=3, resume=True).total == 33
    assert len(read_rows(out)) == 33


# --- workers die with their parent ---------------------------------------------------------------------


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            if fields[0] != "Z":  # a zombie is dead; only its parent has not reaped it yet
                table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every live descendant of ``pid`` (the start time tells a reused pid apart)."""
    table, found, todo = _process_table(), {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, started) in table.items():
            if ppid == parent and child not in found:
                found[child] = started
                todo.append(child)
    return found


def _survivors(processes: dict[int, str], within_s: float) -> dict[int, str]:
    """Those of ``processes`` still alive ``within_s`` from now (returns early once none is)."""
    deadline = time.monotonic() + within_s
    while True:
        table = _process_table()
        alive = {pid: started for pid, started in processes.items() if table.get(pid, (0, ""))[1] == started}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_when_the_job_is_killed(imagenet_repo: Path, tmp_path: Path) -> None:
    """`kill -9` of `imgclf batch` (what the OOM killer does): no worker outlives it by 5 s."""
    root = tmp_path / "many"
    write_photos(root, 150, size=(64, 48))
    out = tmp_path / "o.jsonl"
    workers: dict[int, str] = {}
    proc = subprocess.Popen([*IMGCLF, "batch", str(root), "--model", MODEL, "--out", str(out), "--workers", "2",
                             "--batch-size", "1", "--chunk-size", "2", "--repo", str(imagenet_repo)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        journal = state_dir(out) / "journal.jsonl"
        deadline = time.monotonic() + 120  # only catches a hang
        while proc.poll() is None and time.monotonic() < deadline and not (journal.exists() and journal.stat().st_size):
            time.sleep(0.01)
        workers = _descendants(proc.pid)
        assert proc.poll() is None and len(workers) >= 2, "the job ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, not its process group
        proc.wait()
        assert _survivors(workers, within_s=5.0) == {}
    finally:  # never leave a process running, whatever failed
        if proc.poll() is None:
            proc.kill()
        for pid in _survivors(_descendants(proc.pid) | workers, within_s=0):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_without_prctl_a_worker_polls_for_its_parent(tmp_path: Path) -> None:
    """Where PR_SET_PDEATHSIG is missing, a worker notices that its parent is gone by polling."""
    code = (
        "import os, sys, time\n"
        "import service.batch.local as local\n"
        "local._set_pdeathsig = lambda sig: False\n"
        "local.PARENT_POLL_S = 0.05\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    local.die_with_parent(os.getppid())\n"
        "    time.sleep(120)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    started = _descendants(proc.pid)
    assert worker in started
    proc.kill()
    proc.wait()
    survivors = _survivors({worker: started[worker]}, within_s=5.0)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert survivors == {}


# --- Ray ----------------------------------------------------------------------------------------------


def test_ray_engine_gives_the_local_rows(imagenet_repo: Path, photos: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    local = run(imagenet_repo, photos, tmp_path / "local.csv", top_k=3, batch_size=4, chunk_size=8, ordered=True)
    result = cli(str(photos), "--model", MODEL, "--out", str(tmp_path / "ray.csv"), "--top-k", "3", "--batch-size", "4",
                 "--chunk-size", "8", "--ordered", "--engine", "ray", "--workers", "2", repo=imagenet_repo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(ray, 2 workers)" in result.stdout
    ray_rows, local_rows = read_rows(tmp_path / "ray.csv"), read_rows(local.out)
    assert [r["path"] for r in ray_rows] == [r["path"] for r in local_rows]
    for a, b in zip(ray_rows, local_rows, strict=True):
        assert (a["status"], a["label_1"], a["error_kind"]) == (b["status"], b["label_1"], b["error_kind"])
        if a["status"] == "ok":
            assert float(a["score_1"]) == pytest.approx(float(b["score_1"]), abs=1e-5)


def test_progress_bar_on_a_terminal(imagenet_repo: Path, photos: Path, tmp_path: Path) -> None:
    """Under a pseudo-terminal the bar shows images/s and an ETA."""
    import pty

    out = tmp_path / "p.jsonl"
    code = ("import sys; from imgclf.cli import app; sys.argv = ['imgclf', 'batch', *sys.argv[1:]]; app()")
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal on stdin/stdout/stderr
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-c", code, str(photos), "--model", MODEL, "--out", str(out),
                                  "--repo", str(imagenet_repo)])
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "img/s" in text and "eta" in text and "33/33" in text
