"""Step 1 of the pipeline (validate): what the training and held-out images are, and whether to use them.

Counts per class, unreadable files (decoded by the serving side's decoder, as training does),
images present in both the training data and the held-out set (by sha256 of the bytes), the
same bytes under two training classes, and the label set against production's. The validated
training images are written as a CSV manifest, which is what training then reads.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.atomic import atomic_path
from training.data import Sample, class_folders, digit_image, drop_unreadable, scan_image_folder
from training.pipeline.config import ValidationPolicy

SHOWN = 20  # file names listed in the record per finding; the counts are always complete


@dataclass(frozen=True)
class ImageFile:
    path: Path
    label: str
    split: str  # "train", "val" (given by the tree) or "" (training decides the split), "holdout"
    sha256: str


@dataclass
class ValidatedData:
    classes: list[str]
    train: list[ImageFile]  # what training will use
    holdout: list[ImageFile]
    report: dict[str, Any]
    problems: list[str] = field(default_factory=list)  # any problem stops the run

    def holdout_samples(self, labels: list[str]) -> list[Sample]:
        """The held-out images labelled by index into ``labels`` (a model's own label order)."""
        index = {name: i for i, name in enumerate(labels)}
        return [Sample(f.path, index[f.label]) for f in self.holdout]

    def summary(self) -> str:
        """One line for the run record: what was found, and what was done about it."""
        r = self.report
        label_set = ("new model" if r["labels"]["production"] is None else
                     "unchanged" if r["labels"]["same_as_production"] else "CHANGED")
        return (
            f"{r['train_images']} training images in {len(self.classes)} classes, {r['holdout_images']} held out; "
            f"{r['unreadable']['train'] + r['unreadable']['holdout']} unreadable, "
            f"{r['duplicates_with_holdout']['files']} also in the held-out set "
            f"({r['duplicates_with_holdout']['policy']}), {r['conflicting_labels']['files']} with conflicting "
            f"labels; label set {label_set}"
        ) + "".join(f"; {m['images']} of them from {m['root']}" + (
            f" ({', '.join(f'{n} in {k}/' for k, n in m['left_out'].items())} left out)" if m["left_out"] else "")
            for m in r.get("more_data", []))

    def fingerprint(self, which: str) -> str:
        files = self.train if which == "train" else self.holdout
        digest = hashlib.sha256()
        for line in sorted(f"{f.split}\t{f.label}\t{f.sha256}" for f in files):
            digest.update(line.encode() + b"\n")
        return digest.hexdigest()

    def write_manifest(self, path: Path) -> Path:
        """The training images as a CSV manifest (path,label,split) for ``training.data``."""
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label", "split"])
            for f in self.train:
                writer.writerow([str(f.path.resolve()), f.label, f.split])
        return path


def _scan(root: Path, classes: list[str], split: str) -> list[tuple[Path, str, str]]:
    return [(path, label, split) for path, label in scan_image_folder(root, classes)]


def _readable(files: list[tuple[Path, str, str]], classes: list[str]) -> tuple[list[ImageFile], list[str]]:
    """Decode each file once with the serving decoder; hash the readable ones."""
    index = {name: i for i, name in enumerate(classes)}
    samples = [Sample(path, index[label]) for path, label, _ in files]
    good, bad = drop_unreadable(samples)
    kept = {s.name for s in good}
    out = [ImageFile(path, label, split, hashlib.sha256(path.read_bytes()).hexdigest())
           for path, label, split in files if str(path) in kept]
    return out, bad


def _counts(files: list[ImageFile], classes: list[str]) -> dict[str, int]:
    counts = Counter(f.label for f in files)
    return {name: counts.get(name, 0) for name in classes}


def _more_files(more: Sequence[Path], classes: list[str], split: str,
                problems: list[str]) -> tuple[list[tuple[Path, str, str]], list[dict[str, Any]]]:
    """Further ImageFolder trees merged into the training data (a corrected review tree of
    ``imgclf samples export``): their class folders join the training split; folders whose name starts
    with ``_`` (``_not_confident/``: not reviewed) are left out and counted."""
    files: list[tuple[Path, str, str]] = []
    summary: list[dict[str, Any]] = []
    for root in map(Path, more):
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root} is not a directory (an ImageFolder tree: one folder per class)")
        folders = class_folders(root)
        unknown = sorted(c for c in folders if not c.startswith("_") and c not in classes)
        if unknown:
            problems.append(f"{root} has classes the first --data tree lacks: {unknown} (a new class needs its "
                            "training and held-out images there first)")
        left_out = {c: len(scan_image_folder(root, [c])) for c in folders if c.startswith("_")}
        found = _scan(root, [c for c in folders if c in classes], split)
        files += found
        summary.append({"root": str(root), "images": len(found), "left_out": {k: v for k, v in left_out.items() if v}})
    return files, summary


def validate_data(
    data: Path, holdout: Path, policy: ValidationPolicy, production_labels: list[str] | None,
    allow_label_change: bool, more: Sequence[Path] = (),
) -> ValidatedData:
    """Scan, check and filter; every finding is in ``report``, every blocking one in ``problems``.

    ``more``: further trees merged into the training data (see :func:`_more_files`); the checks below
    (unreadable files, the same bytes under two classes, images also held out) apply to the merge.
    """
    problems: list[str] = []
    for what, root in (("--data", data), ("--holdout", holdout)):
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{what} {root} is not a directory (an ImageFolder tree: one folder per class)")
    layout = "train/val" if (data / "train").is_dir() else "flat"
    if layout == "train/val":
        classes = class_folders(data / "train")
        files = _scan(data / "train", classes, "train")
        if (data / "val").is_dir():
            extra = sorted(set(class_folders(data / "val")) - set(classes))
            if extra:
                problems.append(f"{data / 'val'} has classes that train/ lacks: {extra}")
            files += _scan(data / "val", classes, "val")
    else:
        classes = class_folders(data)
        files = _scan(data, classes, "")
    holdout_classes = class_folders(holdout)
    if len(classes) < 2:
        raise ValueError(f"{data}: need at least two class folders, found {classes}")
    extra, merged = _more_files(more, classes, "train" if layout == "train/val" else "", problems)
    files += extra

    train, unreadable = _readable(files, classes)
    held, held_unreadable = _readable(_scan(holdout, [c for c in holdout_classes if c in classes], "holdout"),
                                      classes)
    report: dict[str, Any] = {"layout": layout, "classes": classes, "holdout_classes": holdout_classes,
                              "files_found": {"train": len(files), "holdout": len(held) + len(held_unreadable)}}
    if merged:
        report["more_data"] = merged

    if set(holdout_classes) != set(classes):
        problems.append(
            f"the held-out set's classes differ from the training data's: only in held-out "
            f"{sorted(set(holdout_classes) - set(classes))}, only in training {sorted(set(classes) - set(holdout_classes))}"
        )
    share = len(unreadable) / max(len(files), 1)
    report["unreadable"] = {"train": len(unreadable), "holdout": len(held_unreadable), "fraction": share,
                            "files": (unreadable + held_unreadable)[:SHOWN]}
    if share > policy.max_unreadable_fraction:
        problems.append(f"{len(unreadable)} of {len(files)} training images are unreadable ({share:.1%}; "
                        f"the limit is {policy.max_unreadable_fraction:.1%})")

    # The same bytes under two training classes: no label can be right for both.
    labels_of: dict[str, set[str]] = defaultdict(set)
    for f in train:
        labels_of[f.sha256].add(f.label)
    conflicting = {h for h, labels in labels_of.items() if len(labels) > 1}
    conflicted = [f for f in train if f.sha256 in conflicting]
    report["conflicting_labels"] = {"images": len(conflicting), "files": len(conflicted), "policy":
                                    policy.conflicting_labels, "examples": [str(f.path) for f in conflicted][:SHOWN]}
    if conflicting and policy.conflicting_labels == "fail":
        problems.append(f"{len(conflicting)} images appear under more than one training class "
                        "(validation.conflicting_labels: fail)")

    # Training on held-out images would inflate the very numbers the gate decides on.
    held_hashes = {f.sha256 for f in held}
    leaked = [f for f in train if f.sha256 in held_hashes]
    report["duplicates_with_holdout"] = {"files": len(leaked), "policy": policy.duplicates,
                                         "examples": [str(f.path) for f in leaked][:SHOWN]}
    if leaked and policy.duplicates == "fail":
        problems.append(f"{len(leaked)} training images are also in the held-out set (validation.duplicates: fail)")
    report["duplicates_within_training"] = len(train) - len({f.sha256 for f in train})
    dropped = {id(f) for f in conflicted + leaked}
    train = [f for f in train if id(f) not in dropped]

    splits = sorted({f.split for f in train})
    report["counts"] = {(s or "train"): _counts([f for f in train if f.split == s], classes) for s in splits}
    report["counts"]["holdout"] = _counts(held, classes)
    report["train_images"], report["holdout_images"] = len(train), len(held)
    trainable = _counts([f for f in train if f.split != "val"], classes)
    few = {c: n for c, n in trainable.items() if n < policy.min_train_per_class}
    if few:
        problems.append(f"classes with fewer than {policy.min_train_per_class} usable training images: {few}")
    few_held = {c: n for c, n in report["counts"]["holdout"].items() if n < policy.min_holdout_per_class}
    if few_held:
        problems.append(f"classes with fewer than {policy.min_holdout_per_class} held-out images: {few_held}")

    labels: dict[str, Any] = {"production": production_labels}
    if production_labels is not None:
        added, removed = sorted(set(classes) - set(production_labels)), sorted(set(production_labels) - set(classes))
        labels |= {"same_as_production": not added and not removed, "added": added, "removed": removed}
        if (added or removed) and not allow_label_change:
            problems.append(
                f"the label set differs from production's (added {added}, removed {removed}); a changed label set "
                "is a new model: pass --allow-label-change to train it as such, or use a new --name"
            )
    report["labels"] = labels
    return ValidatedData(classes, train, held, report, problems)


def write_digits(root: str | Path, holdout_per_class: int = 30, train_per_class: int | None = None,
                 size: int = 32) -> tuple[Path, Path]:
    """scikit-learn's handwritten digits as PNG files in ``root/train`` and ``root/holdout`` (to try the pipeline).

    The first ``holdout_per_class`` images of each digit are held out; ``train_per_class`` limits the
    rest (to simulate new data arriving: write fewer first, then all).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    seen: Counter[int] = Counter()
    digits = load_digits()
    for image, target in zip(digits.images, digits.target, strict=True):
        i = seen[int(target)]
        seen[int(target)] += 1
        if i >= holdout_per_class and train_per_class is not None and i - holdout_per_class >= train_per_class:
            continue
        split = "holdout" if i < holdout_per_class else "train"
        path = root / split / str(target) / f"{target}-{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        digit_image(image).resize((size, size), Image.Resampling.NEAREST).save(path)
    return root / "train", root / "holdout"
