"""Shared fixtures only: isolated caches, real image folders, the bootstrapped repository.

Helpers that tests import live in tests/support/ (a test module never imports conftest).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.cli import in_process
from tests.support.images import digit_images, write_image
from tests.support.once import built_once


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's caches; torch hub downloads find an empty cache."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
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


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
