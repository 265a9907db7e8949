"""Shared fixtures (isolated caches, real image folders, the artifacts built once per run) and how the
run is laid out over pytest-xdist's workers.

Helpers that tests import live in tests/support/ (a test module never imports conftest).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import in_process
from tests.support.images import digit_images, write_image
from tests.support.once import built_once
from tests.support.seaweed import SeaweedFS

# Under pytest-xdist each worker (and every subprocess it starts) gets its share of the cores: torch's
# OpenMP threads wait by spinning, and two workers with one thread per core each made the training tests
# four times slower than one worker on the 2-core machine (docs/testing.md).
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))

# Modules that take longest run first, so that with xdist's --dist loadfile no long module starts last
# while the other worker has nothing left (longest first is the classic fix; measured in docs/testing.md).
LONGEST_FIRST = ("test_container", "test_fleet", "test_benchmarks", "test_objectstore", "test_batch_objectstore",
                 "test_export", "test_batch", "test_pipeline", "test_distributed", "test_faults", "test_readme", "test_reliability", "test_explain_cli", "test_training", "test_hostile",
                 "test_cli")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: order within a module kept


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's caches; torch hub downloads find an empty cache."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))  # object-store repositories' caches, batch state
    monkeypatch.setenv("BENTOML_HOME", str(home / "bentoml"))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")
    monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.fixture
def digit_folder(tmp_path: Path) -> Path:
    """An ImageFolder tree (no train/val split) of 3 digit classes in mixed file formats."""
    root = tmp_path / "digits_folder"
    suffixes = [".png", ".jpg", ".webp", ".bmp", ".tiff"]
    for label, images in digit_images(12, (0, 1, 7)).items():
        for i, image in enumerate(images):
            write_image(root / f"class_{label}" / f"{i:03d}{suffixes[i % len(suffixes)]}", image)
    return root


@pytest.fixture(scope="session")
def imagenet_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding imagenet-lite0 as `imgclf bootstrap` registers it (run in process, once per
    test run; tests/test_export.py checks what it made). Copy it before changing it."""

    def bootstrap(root: Path) -> None:
        result = in_process("bootstrap", "--repo", str(root))
        assert result.returncode == 0 and "registered imagenet-lite0:1" in result.stdout, result.stderr

    return built_once(tmp_path_factory, "imagenet_models", bootstrap)


@pytest.fixture(scope="session")
def lite0_digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training run: ImageNet-pretrained EfficientNet-Lite0 fine-tuned on digits at 32 px for one epoch
    (export's int8 test and the int8 benchmark share it). Read-only."""
    from training.config import resolve_config
    from training.train import train

    cfg = {"model": {"arch": "efficientnet_lite0", "pretrained": True, "image_size": 32}, "epochs": 1, "seed": 0}
    return built_once(tmp_path_factory, "lite0_digits_run", lambda run: train(resolve_config(None, cfg), run))


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A running SeaweedFS (S3 at ``.endpoint``), one per xdist worker; it sets no variable: pass ``.env()``
    to subprocesses, ``monkeypatch.setenv`` it in process. Tests make their own buckets; one that stops or
    kills it must ``start()`` it again."""
    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
