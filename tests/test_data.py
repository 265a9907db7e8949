"""Data sources: ImageFolder (split or not), CSV manifests, digits; bad data handled clearly."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.support.images import digit_images, write_image
from training.config import DataConfig
from training.data import DataError, load_splits


def test_digits_seeded_stratified_80_20() -> None:
    a = load_splits(DataConfig(source="digits"), seed=0)
    b = load_splits(DataConfig(source="digits"), seed=0)
    assert (len(a.train), len(a.val)) == (1437, 360)
    assert [s.source for s in a.val] == [s.source for s in b.val]
    counts = a.class_counts("val")
    assert a.classes == [str(i) for i in range(10)]
    assert max(counts.values()) - min(counts.values()) <= 2  # stratified


def test_image_folder_without_split_is_split_stratified(digit_folder: Path) -> None:
    splits = load_splits(DataConfig(source=str(digit_folder), val_fraction=0.25), seed=0)
    assert splits.classes == ["class_0", "class_1", "class_7"]
    assert len(splits.train) + len(splits.val) == 36
    assert set(splits.class_counts("val").values()) == {3}
    assert splits.skipped == []


def test_image_folder_with_train_val_test(tmp_path: Path) -> None:
    for split, n in (("train", 6), ("val", 3), ("test", 2)):
        for label, images in digit_images(n, (3, 8)).items():
            for i, image in enumerate(images):
                write_image(tmp_path / split / f"d{label}" / f"{i}.png", image)
    splits = load_splits(DataConfig(source=str(tmp_path)), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 4)
    assert splits.classes == ["d3", "d8"]


def test_corrupt_files_are_skipped_and_counted(digit_folder: Path) -> None:
    (digit_folder / "class_0" / "truncated.jpg").write_bytes((digit_folder / "class_0" / "001.jpg").read_bytes()[:60])
    (digit_folder / "class_1" / "notes.png").write_text("this is not an image")
    (digit_folder / "class_7" / "empty.webp").write_bytes(b"")
    splits = load_splits(DataConfig(source=str(digit_folder)), seed=0)
    assert len(splits.skipped) == 3
    assert len(splits.train) + len(splits.val) == 36
    assert splits.summary()["skipped_unreadable"] == 3


def test_csv_manifest(tmp_path: Path) -> None:
    rows = []
    for label, images in digit_images(8, (2, 5)).items():
        for i, image in enumerate(images):
            path = write_image(tmp_path / "img" / f"{label}_{i}.png", image)
            rows.append({"path": str(path.relative_to(tmp_path)), "label": f"digit{label}"})
    with (tmp_path / "data.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    splits = load_splits(DataConfig(source=str(tmp_path / "data.csv"), val_fraction=0.25), seed=1)
    assert splits.classes == ["digit2", "digit5"]
    assert (len(splits.train), len(splits.val)) == (12, 4)


def test_csv_without_required_columns(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match="'path' and 'label'"):
        load_splits(DataConfig(source=str(tmp_path / "bad.csv")), seed=0)


def test_empty_class_is_an_error(digit_folder: Path) -> None:
    (digit_folder / "class_empty").mkdir()
    with pytest.raises(DataError, match="class_empty"):
        load_splits(DataConfig(source=str(digit_folder)), seed=0)


def test_class_with_only_unreadable_files_is_an_error(digit_folder: Path) -> None:
    (digit_folder / "class_broken").mkdir()
    (digit_folder / "class_broken" / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="class_broken"):
        load_splits(DataConfig(source=str(digit_folder)), seed=0)


def test_one_class_is_an_error(tmp_path: Path) -> None:
    for i, image in enumerate(digit_images(5, (4,))[4]):
        write_image(tmp_path / "only" / f"{i}.png", image)
    with pytest.raises(DataError, match="at least two classes"):
        load_splits(DataConfig(source=str(tmp_path)), seed=0)


def test_no_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="no readable images"):
        load_splits(DataConfig(source=str(tmp_path)), seed=0)


def test_missing_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not 'digits'"):
        load_splits(DataConfig(source=str(tmp_path / "nowhere")), seed=0)
