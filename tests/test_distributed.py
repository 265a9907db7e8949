"""Training in several processes, for real: gloo, two processes on the CPU, LeNet-5 on scikit-learn's digits.

One 2-process run (``imgclf train --nproc 2``: torch's elastic launcher) serves every slow test: it
trains the 1-process model (same global batch, seed and data order); a 2-process run SIGKILLed mid-epoch
and resumed under torchrun ends bit for bit where it ends (resumed with one process: to float rounding);
its export serves what its report says; its run directory holds the 1-process run's files, no more. LeNet-5 has no batch norm and no dropout, so the only
difference between one and two processes is the order of float additions in the gradient.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler

from service.preprocessing import PreprocessSpec, image_to_tensor
from service.repository import ModelRepository
from service.runtime import OnnxModel
from tests.support import ROOT
from tests.support.cli import imgclf
from training.config import ConfigError, deep_merge, resolve_config
from training.data import load_splits
from training.distributed import DistContext, GlobalBatchSampler
from training.export import export, from_run
from training.models import create_model
from training.train import train

SETTINGS: dict[str, Any] = {"data": {"source": "digits"}, "model": {"arch": "lenet5"}, "epochs": 3, "batch_size": 64,
                            "seed": 5}
FLAGS = ("--data", "digits", "--arch", "lenet5", "--epochs", "3", "--batch-size", "64", "--seed", "5")
# One process takes the mean gradient of 64 images, two take two means of 32 and average them: equal
# up to float rounding, which 66 SGD steps (lr 0.05, Nesterov momentum) grew to 2.4e-7 in a weight.
PARAM_ATOL = 1e-5
HANG_S = 300  # deadlines that catch hangs only; nothing here is timed

# A 2-process run that stops dead inside its second epoch: after the epoch-1 checkpoint is written, rank 0
# hangs after 5 optimizer steps of epoch 2 (rank 1 then waits in step 6's gradient all-reduce), and says so
# in a marker file. A global optimizer hook: the training code has no test seam.
DRIVER = '''
import json, os, sys, threading
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from training.config import resolve_config
from training.launch import run_training


def pause_in_epoch_two(row):
    if row["epoch"] != 1 or torch.distributed.get_rank() != 0:
        return
    steps = []

    def hang_after_five(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 5:
            Path(os.environ["PAUSED_MARKER"]).write_text("paused")
            threading.Event().wait()  # until the test kills the process group

    register_optimizer_step_post_hook(hang_after_five)


if __name__ == "__main__":
    run_training(resolve_config(None, json.loads(sys.argv[2])), Path(sys.argv[1]), nproc=2,
                 callbacks=[pause_in_epoch_two])
'''


def checkpoint(run: Path, name: str = "last.pt") -> dict[str, Any]:
    return torch.load(run / "checkpoints" / name, weights_only=False)


def report(run: Path) -> dict[str, Any]:
    return json.loads((run / "report.json").read_text())


def without_seconds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def assert_same_model(a: Path, b: Path, atol: float) -> None:
    """Equal weights (within ``atol``; 0: bit for bit), equal validation predictions."""
    wa, wb = checkpoint(a)["model"], checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=atol, msg=key)
    ra, rb = report(a), report(b)
    assert (rb["top1"], rb["confusion_matrix"], rb["best_epoch"]) == (ra["top1"], ra["confusion_matrix"],
                                                                       ra["best_epoch"])


def files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def torchrun(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node=2 -m imgclf.cli ARGS``, as docs/training.md gives it; the
    launcher's own log folder goes under ``tmp``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "imgclf.cli",
           *args]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, text=True,
                          timeout=HANG_S, check=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("one") / "run"
    train(resolve_config(None, SETTINGS), run)
    return run


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("two") / "run"
    result = imgclf("train", *FLAGS, "--nproc", "2", "--out", str(run))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("val top-1") == 1, result.stdout  # rank 0 speaks for the run
    return run


# --- no processes needed ------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "world"), [(200, 2), (200, 4), (64, 2), (50, 4)])
def test_the_shards_of_each_global_batch_are_the_one_process_batch(n: int, world: int) -> None:
    """Global batch k, put together from every rank's k-th batch, is one process's k-th batch."""
    batch, drop_last = 64, n > 64

    def order(rank: int, size: int) -> list[int]:
        base = RandomSampler(range(n), generator=torch.Generator().manual_seed(3))
        sampler = GlobalBatchSampler(base, batch, rank, size, drop_last)
        out = list(sampler)
        assert len(out) == len(sampler)
        return out

    single = [set(b) for b in np.split(np.array(order(0, 1)), range(batch, n, batch)) if len(b)]
    shards = [order(rank, world) for rank in range(world)]
    if n > batch:  # full global batches; the partial last one is dropped, as one process drops it
        share = batch // world
        joined = [set().union(*(s[k * share:(k + 1) * share] for s in shards)) for k in range(n // batch)]
        assert joined == single and all(len(s) == n // batch * share for s in shards)
    else:  # the whole split is one batch: shared out, wrapped round so that every rank has as many
        assert set().union(*shards) == single[0] and all(len(s) == -(-n // world) for s in shards)


def test_the_global_batch_must_divide_among_the_processes() -> None:
    assert DistContext(world_size=4).per_process_batch(64) == 16
    with pytest.raises(ConfigError, match="batch_size 64 is the global batch .* 3 processes; .* 63 or 66"):
        DistContext(world_size=3).per_process_batch(64)


def test_linear_scaling_follows_the_global_batch_only() -> None:
    from training.optim import lr_rule, scaled_lr

    cfg = resolve_config(None, {"optim": {"lr": 0.1, "lr_scaling": "linear", "lr_reference_batch": 256},
                                "batch_size": 512}).optim
    assert scaled_lr(cfg, 512) == pytest.approx(0.2) and lr_rule(cfg, 512)["reference_batch"] == 256
    assert scaled_lr(cfg.model_copy(update={"lr_scaling": "none"}), 512) == 0.1


def test_the_pipeline_config_takes_train_nproc() -> None:
    from training.pipeline.config import load_pipeline_config

    base = {"name": "digits", "train": {"model": {"arch": "lenet5"}, "epochs": 1}}
    two = load_pipeline_config(None, deep_merge(base, {"train": {"nproc": 2}}))
    assert (two.nproc, load_pipeline_config(None, base).nproc) == (2, 1)
    assert two.train_config(Path("x.csv")).epochs == 1  # a launch setting, no training key
    assert two.fingerprint() == load_pipeline_config(None, base).fingerprint()  # the same model, to rounding
    with pytest.raises(ConfigError, match="train.nproc must be a whole number"):
        load_pipeline_config(None, deep_merge(base, {"train": {"nproc": 0}}))


# --- two real processes --------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_train_the_one_process_model(one_process: Path, two_processes: Path) -> None:
    assert_same_model(one_process, two_processes, PARAM_ATOL)
    one, two = report(one_process), report(two_processes)
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch_size": 64,
                                  "per_process_batch_size": 32, "sync_batchnorm": False}
    assert one["distributed"] | {"world_size": 2, "backend": "gloo", "per_process_batch_size": 32} == two["distributed"]
    assert one["lr_rule"] == two["lr_rule"] == {"scaling": "none", "base_lr": 0.05, "reference_batch": None, "lr": 0.05}
    a, b = checkpoint(one_process)["history"], checkpoint(two_processes)["history"]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]  # as many steps per epoch
    assert [r["train_loss"] for r in b] == pytest.approx([r["train_loss"] for r in a], rel=1e-6)  # global means
    assert [r["val_top1"] for r in b] == [r["val_top1"] for r in a]  # 360 images each, none twice


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_result(two_processes: Path, tmp_path: Path) -> None:
    cut, marker, driver = tmp_path / "cut", tmp_path / "paused", tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # TMPDIR: the killed launcher cannot remove its log folder, so it goes where pytest cleans up
    env = {**os.environ, "PAUSED_MARKER": str(marker), "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    with (tmp_path / "driver.log").open("w") as out:
        proc = subprocess.Popen([sys.executable, str(driver), str(cut), json.dumps(SETTINGS)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + HANG_S
            while not marker.exists():  # the kill point is the marker, not a time
                assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
                assert time.monotonic() < deadline, "the run never paused"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, mid-epoch 2
            proc.wait()
    assert not (cut / "report.json").exists() and checkpoint(cut)["epoch"] == 1
    shutil.copytree(cut, tmp_path / "cut_again")

    resumed = torchrun("train", "--resume", str(cut), tmp=tmp_path)  # two processes again, torchrun's way
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stdout.count("val top-1") == 1
    assert_same_model(two_processes, cut, atol=0)  # the same process count: bit for bit
    assert without_seconds(checkpoint(cut)["history"]) == without_seconds(checkpoint(two_processes)["history"])
    assert report(cut)["temperature"] == report(two_processes)["temperature"]

    train(resolve_config(cut / "config.yaml"), tmp_path / "cut_again", resume=True)  # one process this time
    assert_same_model(two_processes, tmp_path / "cut_again", PARAM_ATOL)
    assert report(tmp_path / "cut_again")["distributed"]["world_size"] == 1


@pytest.mark.slow
def test_a_two_process_export_serves_what_its_report_says(one_process: Path, two_processes: Path,
                                                         tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "models")
    version = export(from_run(two_processes), repo, "digits-ddp")
    repo.promote("digits-ddp", version.manifest.version)
    served = repo.get("digits-ddp")  # production, as a service resolves it
    assert served.manifest == version.manifest and served.manifest.labels == [str(i) for i in range(10)]
    spec = served.manifest.preprocessing
    assert spec == PreprocessSpec.model_validate(checkpoint(one_process, "best.pt")["spec"])
    cfg = resolve_config(None, SETTINGS)
    held_out = load_splits(cfg.data, cfg.seed).val
    batch = np.stack([image_to_tensor(s.read(), spec) for s in held_out])
    labels = np.array([s.label for s in held_out])
    onnx_pred = OnnxModel.load(served.model_path, served.manifest).logits(batch).argmax(1)
    assert (onnx_pred == labels).mean() == pytest.approx(report(two_processes)["top1"], abs=1e-9)
    assert served.manifest.metrics.top1 == pytest.approx(report(two_processes)["top1"], abs=1e-9)
    single = create_model(cfg.model, 10).model.eval()
    single.load_state_dict(checkpoint(one_process, "best.pt")["model"])
    with torch.no_grad():
        assert np.array_equal(single(torch.from_numpy(batch)).argmax(1).numpy(), onnx_pred)  # as 1 process serves


@pytest.mark.slow
def test_only_rank_zero_writes(one_process: Path, two_processes: Path) -> None:
    assert files(two_processes) == files(one_process)
    assert "checkpoints/last.pt" in files(two_processes) and "learning_curves.png" in files(two_processes)
    assert [p.name for p in two_processes.parent.iterdir()] == ["run"]  # nothing beside it either
    for name in ("config.yaml", "data.json"):
        assert (two_processes / name).read_text() == (one_process / name).read_text(), name
    assert len((two_processes / "metrics.jsonl").read_text().splitlines()) == 3  # one writer, one line an epoch
