"""Labelled images from an ImageFolder tree, a CSV manifest or scikit-learn's digits.

Every sample is kept as encoded image bytes (or a path to them), so training,
evaluation and serving all start from the same place: bytes, decoded by the
serving side's preprocessing.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from service.preprocessing import IMAGE_SUFFIXES, DecodeLimits, ImageInputError, decode_image
from training.config import DataConfig

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data cannot be trained on; the message says why and where."""


@dataclass(frozen=True)
class Sample:
    source: Path | bytes
    label: int

    def read(self) -> bytes:
        return self.source if isinstance(self.source, bytes) else Path(self.source).read_bytes()

    @property
    def name(self) -> str:
        return "<memory>" if isinstance(self.source, bytes) else str(self.source)


@dataclass
class Splits:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unreadable files, reported not fatal

    def class_counts(self, split: str = "train") -> dict[str, int]:
        counts = Counter(s.label for s in getattr(self, split))
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    def summary(self) -> dict[str, object]:
        return {
            "classes": self.classes,
            "counts": {split: self.class_counts(split) for split in ("train", "val", "test")},
            "skipped_unreadable": len(self.skipped),
        }


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Samples through a bytes -> tensor transform."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[bytes], torch.Tensor]) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return self.transform(sample.read()), sample.label


def digits_samples() -> tuple[list[str], list[Sample]]:
    """scikit-learn's 1,797 real 8x8 handwritten digits, as in-memory PNG bytes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    samples = []
    for image, target in zip(digits.images, digits.target, strict=True):
        buf = io.BytesIO()
        digit_image(image).save(buf, format="PNG")
        samples.append(Sample(buf.getvalue(), int(target)))
    return [str(n) for n in digits.target_names], samples


def digit_image(pixels: np.ndarray) -> Image.Image:
    """One of scikit-learn's digits (8x8, values 0-16) as an 8-bit greyscale image."""
    return Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")


def class_folders(root: Path) -> list[str]:
    """The classes of an ImageFolder tree: its visible sub-folders, sorted."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_image_folder(root: Path, classes: Sequence[str]) -> list[tuple[Path, str]]:
    """Every image file (by suffix, the serving side's list) under each class folder, as (path, class).

    The one ImageFolder scan: training (``load_splits``) and the pipeline's data check both use it,
    so they always see the same files. A class without a folder here contributes nothing.
    """
    out = []
    for name in classes:
        folder = Path(root) / name
        if folder.is_dir():
            out += [(p, name) for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return out


def _folder_samples(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[Sample]]:
    found = class_folders(root)
    classes = classes or found
    unknown = set(found) - set(classes)
    if unknown:
        raise DataError(f"{root} has classes not in the training set: {sorted(unknown)}")
    index = {name: i for i, name in enumerate(classes)}
    return classes, [Sample(path, index[name]) for path, name in scan_image_folder(root, classes)]


def _csv_samples(path: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path}: a CSV manifest needs 'path' and 'label' columns (optional 'split')")
        rows = list(reader)
    classes = sorted({row["label"] for row in rows})
    index = {name: i for i, name in enumerate(classes)}
    by_split: dict[str, list[Sample]] = {}
    for line, row in enumerate(rows, start=2):
        split = (row.get("split") or "").strip() or "all"
        if split not in ("all", "train", "val", "test"):
            raise DataError(f"{path}:{line}: split must be train, val or test, not {split!r}")
        file = Path(row["path"])
        by_split.setdefault(split, []).append(Sample(file if file.is_absolute() else path.parent / file, index[row["label"]]))
    return classes, by_split


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    from sklearn.model_selection import train_test_split

    labels = [s.label for s in samples]
    try:
        keep, held = train_test_split(samples, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as exc:
        raise DataError(f"cannot make a stratified {fraction:.0%} split: {exc}") from exc
    return list(keep), list(held)


def drop_unreadable(samples: list[Sample], limits: DecodeLimits | None = None) -> tuple[list[Sample], list[str]]:
    """Keep only samples the serving path can decode; the rest are counted, not fatal."""
    good, bad = [], []
    for sample in samples:
        try:
            decode_image(sample.read(), limits=limits, min_short_side=64)
        except (ImageInputError, OSError) as exc:
            log.warning("skipping unreadable image %s: %s", sample.name, exc)
            bad.append(sample.name)
        else:
            good.append(sample)
    return good, bad


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Resolve ``cfg.source`` into train/val(/test) samples, with clear errors for unusable data."""
    split_seed = cfg.split_seed if cfg.split_seed is not None else seed
    given: dict[str, list[Sample]]
    skipped: list[str] = []
    if cfg.source == "digits":
        classes, samples = digits_samples()
        given = {"all": samples}
    else:
        root = Path(cfg.source)
        if root.is_file() and root.suffix.lower() == ".csv":
            classes, given = _csv_samples(root)
        elif root.is_dir():
            if (root / "train").is_dir():
                classes, train = _folder_samples(root / "train")
                given = {"train": train}
                for split in ("val", "test"):
                    if (root / split).is_dir():
                        given[split] = _folder_samples(root / split, classes)[1]
            else:
                classes, samples = _folder_samples(root)
                given = {"all": samples}
        else:
            raise DataError(f"data source {cfg.source!r} is not 'digits', a directory or a .csv manifest")
        for split, samples in given.items():
            given[split], bad = drop_unreadable(samples)
            skipped += bad

    pool = given.get("train", []) + given.get("all", [])
    if not pool:
        raise DataError(f"no readable images found in {cfg.source}")
    if len(classes) < 2:
        raise DataError(f"need at least two classes to train a classifier, found {classes}")
    counts = Counter(s.label for s in pool)
    empty = [name for i, name in enumerate(classes) if counts[i] == 0]
    if empty:
        raise DataError(f"classes with no readable training images: {empty}")

    if "val" in given:
        train, val = pool, given["val"]
    else:
        train, val = stratified_split(pool, cfg.val_fraction, split_seed)
    splits = Splits(classes, train, val, given.get("test", []), skipped)
    log.info("data: %d classes, %d train, %d val, %d test, %d unreadable skipped",
             len(classes), len(train), len(val), len(splits.test), len(skipped))
    return splits
