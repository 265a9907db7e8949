"""What the trust tests share (test_selective, test_drift, test_sampling): one digits model per session.

LeNet-5 trained for 3 epochs on scikit-learn's digits written as PNG files, the first 30 images of
each digit held out (never seen by training or export), exported with a confidence threshold for
precision ``TARGET``. Trained once per test session however many modules ask for it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.manifest import Manifest
from service.repository import MANIFEST, ModelRepository
from tests.support.once import built_once

NAME = "digits"
TARGET = 0.98  # the target precision the test model is exported with (0.99 needs more validation images)
HOLDOUT_PER_CLASS = 30


@dataclass(frozen=True)
class DigitsModel:
    repo: Path  # a repository whose production digits:1 is the model (copy it before changing it)
    train: Path  # ImageFolder tree it was trained on (its validation split is drawn from it)
    holdout: Path  # ImageFolder tree of held-out images
    run: Path  # the training run (its validation split: what export measured the threshold and reference on)

    def holdout_images(self) -> list[tuple[bytes, str]]:
        """(PNG bytes, true label) of every held-out image, in a fixed order."""
        return [(p.read_bytes(), p.parent.name) for p in sorted(self.holdout.rglob("*.png"))]

    def training_images(self) -> list[tuple[bytes, str]]:
        return [(p.read_bytes(), p.parent.name) for p in sorted(self.train.rglob("*.png"))]

    def validation_images(self) -> list[tuple[bytes, str]]:
        """The run's validation split, exactly as export read it."""
        from training.export import from_run

        source = from_run(self.run)
        return [(s.read(), source.labels[s.label]) for s in source.eval_samples]


def _train_and_export(root: Path) -> None:
    from training.config import resolve_config
    from training.export import export, from_run
    from training.pipeline.data import write_digits
    from training.train import train

    train_dir, _ = write_digits(root / "data", holdout_per_class=HOLDOUT_PER_CLASS)
    train(resolve_config(None, {"model": {"arch": "lenet5"}, "epochs": 3, "data": {"source": str(train_dir)}}),
          root / "run")
    repo = ModelRepository(root / "models")
    version = export(from_run(root / "run"), repo, NAME, target_precision=TARGET)
    repo.promote(NAME, version.manifest.version)


def digits_model(factory: pytest.TempPathFactory) -> DigitsModel:
    """The run's trained and exported digits model (built by the first module that asks)."""
    root = built_once(factory, "trust_digits", _train_and_export)
    return DigitsModel(root / "models", root / "data" / "train", root / "data" / "holdout", root / "run")


def copy_repo(model: DigitsModel, target: Path, extra_names: Iterable[str] = (),
              imagenet: Path | None = None, manifest_update: dict | None = None) -> ModelRepository:
    """A private copy of the digits repository; ``extra_names`` are more copies of digits:1 under other
    names (each gets its own drift window and metrics series), their manifests changed by
    ``manifest_update`` if given; ``imagenet`` adds that repository's models."""
    shutil.copytree(model.repo, target)
    repo = ModelRepository(target)
    source = repo.get(NAME, 1)
    for name in extra_names:
        def write(staging: Path, version: int, name: str = name) -> Manifest:
            for file in source.path.iterdir():
                if file.is_file() and file.name != MANIFEST:
                    shutil.copyfile(file, staging / file.name)
            update = {"name": name, "version": version, "files": {}, **(manifest_update or {}).get(name, {})}
            return source.manifest.model_copy(update=update)

        repo.promote(name, repo.add_version(name, write).manifest.version)
    if imagenet is not None:
        for folder in Path(imagenet).iterdir():
            if folder.is_dir() and not folder.name.startswith("."):
                shutil.copytree(folder, target / folder.name)
    return repo


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples whose labels include ``labels`` (0 when there are none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
