"""Shared fixtures: real image files written by the tests, isolated caches, no network."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's caches; torch hub downloads find an empty cache."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setenv("BENTOML_HOME", str(home / "bentoml"))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")
    monkeypatch.setenv("MPLBACKEND", "Agg")


def digit_images(per_class: int, classes: tuple[int, ...] = tuple(range(10))) -> dict[int, list[np.ndarray]]:
    """Real handwritten digits from scikit-learn, as 8-bit 8x8 grey arrays, per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out: dict[int, list[np.ndarray]] = {c: [] for c in classes}
    for image, target in zip(digits.images, digits.target, strict=True):
        if target in out and len(out[target]) < per_class:
            out[target].append(np.round(image * 255 / 16).astype(np.uint8))
    return out


def write_image(path: Path, array: np.ndarray, fmt: str | None = None, size: int = 32) -> Path:
    """Save a digit upscaled to ``size`` so every format (JPEG included) keeps it legible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array).resize((size, size), Image.Resampling.NEAREST)
    if (fmt or path.suffix.lstrip(".").upper()) in ("JPG", "JPEG", "WEBP"):
        img = img.convert("RGB")
    img.save(path, format=fmt)
    return path


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


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
    """A model repository holding the bootstrapped imagenet-lite0 (built once per test session)."""
    from service.repository import ModelRepository
    from training.bootstrap import bootstrap

    root = tmp_path_factory.mktemp("imagenet_models")
    bootstrap(ModelRepository(root))
    return root


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
