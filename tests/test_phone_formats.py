"""Phone formats: HEIC/HEIF (what iPhones save) and AVIF, through the one decode path and a batch job.

Every file is encoded here: HEIF with pillow-heif (libheif, x265), AVIF with Pillow's own encoder
(libavif) and, for 10-bit AVIF, which Pillow cannot write, imagecodecs. Headers are then patched
by box to build bombs and malformed files, so the tests control exactly which bytes are decoded.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image, features
from skimage import data as skdata

from service.batch.job import BatchOptions
from service.batch.runner import run_batch
from service.preprocessing import (
    IMAGE_SUFFIXES,
    SUPPORTED_FORMATS,
    DecodeLimits,
    ImageInputError,
    ImageTooLargeError,
    PreprocessSpec,
    UnsupportedFormatError,
    decode_image,
    detect_format,
    image_to_tensor,
    resize_and_crop,
    to_array,
)
from service.preprocessing.sniff import probe_header
from service.settings import Settings
from tests.support.bmff import (
    after_ftyp,
    box,
    boxes,
    find,
    full_box,
    patched,
    renamed,
    with_alpha_size,
)
from tests.support.budget import cpu_seconds
from tests.support.images import encode, icc_profile, photo, stored_for_orientation

PHONE = ("HEIF", "AVIF")
GREEN = (0, 255, 0)
PLAIN = PreprocessSpec(input_size=(224, 224), resize_size=256, mean=(0.0,) * 3, std=(1.0,) * 3)
# High quality and no chroma subsampling, so that a wrong turn (error > 20) stands far from codec noise.
HQ = {"HEIF": {"quality": 95, "chroma": 444}, "AVIF": {"quality": 95, "subsampling": "4:4:4"}}


def rocket(size: tuple[int, int] = (320, 214)) -> Image.Image:
    return Image.fromarray(skdata.rocket()).resize(size, Image.Resampling.BICUBIC)


def pixels(data: bytes, **kwargs: object) -> np.ndarray:
    return np.asarray(decode_image(data, **kwargs), dtype=np.int32)  # type: ignore[arg-type]


def with_exif_orientation(img: Image.Image, orientation: int, fmt: str) -> bytes:
    """What a phone writes: the sensor's pixels, and the turn to show them upright.

    Both encoders move the EXIF orientation into HEIF's irot/imir boxes; pillow-heif also keeps
    it in the EXIF block, as iPhones do, so the file carries the turn twice.
    """
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif.tobytes(), **HQ[fmt])


# --------------------------------------------------------------------------- formats


def test_both_codecs_are_there_and_listed() -> None:
    assert features.check("avif"), "this Pillow has no AVIF codec"
    assert "HEIF" in Image.OPEN  # pillow-heif's plugin, registered by service.preprocessing
    assert {"AVIF", "HEIF"} <= set(SUPPORTED_FORMATS)
    assert {".heic", ".heif", ".avif"} <= IMAGE_SUFFIXES


@pytest.mark.parametrize("fmt", PHONE)
def test_a_phone_photo_gives_the_right_tensor(fmt: str) -> None:
    img = rocket()
    data = encode(img, fmt, quality=90)
    assert detect_format(data) == fmt
    out = image_to_tensor(data, PLAIN)
    expected = to_array(resize_and_crop(img, PLAIN), PLAIN)
    assert out.shape == expected.shape and out.dtype == np.float32
    assert float(np.abs(out - expected).mean()) < 0.02


@pytest.mark.parametrize("brand", [b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"])
def test_heif_brands_are_heif(brand: bytes) -> None:
    data = encode(rocket((64, 48)), "HEIF")
    assert detect_format(data[:8] + brand + data[12:]) == "HEIF"


def test_avif_brands_are_avif_and_a_generic_brand_looks_at_the_compatible_ones() -> None:
    data = encode(rocket((64, 48)), "AVIF")
    assert data[8:12] == b"avif" and b"mif1" in data[16:32]
    assert detect_format(data) == "AVIF"
    assert detect_format(data[:8] + b"avis" + data[12:]) == "AVIF"
    generic = bytearray(data)  # major brand mif1, avif only among the compatible brands
    generic[8:12], generic[16:20] = b"mif1", b"avif"
    assert detect_format(bytes(generic)) == "AVIF"
    assert pixels(bytes(generic)).shape == (48, 64, 3)


@pytest.mark.parametrize("brand", [b"isom", b"mp42", b"qt  ", b"crx ", b"jp2 ", b"avc1"])
def test_other_iso_media_files_are_415_listing_every_format(brand: bytes) -> None:
    data = struct.pack(">I", 24) + b"ftyp" + brand + bytes(4) + brand + b"mp41" + bytes(64)
    with pytest.raises(UnsupportedFormatError) as err:
        image_to_tensor(data, PLAIN)
    assert err.value.status_code == 415
    for fmt in SUPPORTED_FORMATS:
        assert fmt in str(err.value)


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("fmt", PHONE)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_turned_phone_photo_decodes_upright(fmt: str, orientation: int) -> None:
    upright = np.asarray(rocket())
    stored = Image.fromarray(stored_for_orientation(upright, orientation))
    data = with_exif_orientation(stored, orientation, fmt)
    transforms = {k for k, _, _ in boxes(data)} & {b"irot", b"imir"}
    assert bool(transforms) == (orientation != 1)  # the turn is in HEIF's own boxes
    got = pixels(data)
    reference = pixels(encode(Image.fromarray(upright), fmt, **HQ[fmt]))
    assert got.shape == upright.shape
    assert float(np.abs(got - reference).mean()) < 3.0
    if orientation != 1:  # not turned twice, nor left as stored
        as_stored = pixels(encode(stored, fmt, **HQ[fmt]))
        assert as_stored.shape != got.shape or float(np.abs(as_stored - got).mean()) > 20


def test_heic_turn_is_applied_once_although_exif_says_it_too() -> None:
    upright = np.asarray(rocket())
    data = with_exif_orientation(Image.fromarray(stored_for_orientation(upright, 6)), 6, "HEIF")
    assert find(data, b"irot")
    exif_at = data.index(b"MM\x00*") if b"MM\x00*" in data else data.index(b"II*\x00")
    exif = Image.Exif()
    exif.load(data[exif_at:])
    assert exif[0x0112] == 6  # the EXIF block in the file still asks for the same turn
    assert pixels(data).shape == upright.shape  # one turn: 214x320 stored, 320x214 shown


def test_heif_ignores_an_exif_orientation_without_irot() -> None:
    # HEIF readers take the turn from irot/imir only (MIAF); EXIF orientation is informative.
    stored = stored_for_orientation(np.asarray(rocket()), 6)
    data = with_exif_orientation(Image.fromarray(stored), 6, "HEIF")
    no_turn = patched(data, b"irot", 8, b"\x00")
    got = pixels(no_turn)
    assert got.shape == stored.shape
    assert float(np.abs(got - stored).mean()) < 3.0


# --------------------------------------------------------------------------- depth, alpha, colour


def _pixi_bits(data: bytes) -> set[int]:
    return {data[pos + 13] for pos, _ in find(data, b"pixi")}


def test_10bit_heic_becomes_8bit() -> None:
    img = rocket()
    wide = (np.asarray(img, dtype=np.uint16) * 257).tobytes()  # 16-bit samples, stored as 10-bit
    buf = io.BytesIO()
    pillow_heif.from_bytes(mode="RGB;16", size=img.size, data=wide).save(buf, quality=95, chroma=444)
    data = buf.getvalue()
    assert _pixi_bits(data) == {10}
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    assert float(np.abs(np.asarray(decoded, dtype=int) - np.asarray(img, dtype=int)).mean()) < 3.0


def test_10bit_avif_becomes_8bit() -> None:
    imagecodecs = pytest.importorskip("imagecodecs")  # Pillow writes 8-bit AVIF only
    img = rocket()
    data = imagecodecs.avif_encode(np.asarray(img, dtype=np.uint16) * 4, level=95, bitspersample=10)
    assert _pixi_bits(data) == {10}
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    assert float(np.abs(np.asarray(decoded, dtype=int) - np.asarray(img, dtype=int)).mean()) < 3.0


@pytest.mark.parametrize("fmt", PHONE)
@pytest.mark.parametrize(("alpha", "expected"), [(0, GREEN), (255, (255, 0, 0)), (128, (128, 127, 0))])
def test_alpha_composites_on_the_background(fmt: str, alpha: int, expected: tuple) -> None:
    data = encode(Image.new("RGBA", (32, 32), (255, 0, 0, alpha)), fmt, **HQ[fmt])
    if alpha < 255:  # (Pillow's AVIF encoder drops an opaque alpha plane)
        assert find(data, b"auxl")  # the alpha plane is an auxiliary image of the primary one
    got = pixels(data, background=GREEN)
    assert np.abs(got - np.array(expected)).max() <= 4


@pytest.mark.parametrize("fmt", PHONE)
def test_an_alpha_plane_far_larger_than_the_image_is_refused(fmt: str) -> None:
    data = encode(Image.new("RGBA", (32, 32), (255, 0, 0, 128)), fmt, **HQ[fmt])
    claimed = probe_header(with_alpha_size(data, 100, 90), fmt)  # the edit is read as meant
    assert claimed is not None and claimed.largest_plane == 100 * 90
    with cpu_seconds() as cpu, pytest.raises(ImageTooLargeError, match="plane"):
        image_to_tensor(with_alpha_size(data, 20_000, 20_000), PLAIN)
    assert cpu.seconds < 0.25


@pytest.mark.parametrize("fmt", PHONE)
def test_icc_profile_is_converted_to_srgb(fmt: str) -> None:
    img = Image.new("RGB", (32, 32), (128, 128, 128))
    got = pixels(encode(img, fmt, icc_profile=icc_profile(1.0), **HQ[fmt]))
    assert np.abs(got - 188).max() <= 4  # linear-light 0.5 is sRGB 188
    assert np.abs(pixels(encode(img, fmt, **HQ[fmt])) - 128).max() <= 4


@pytest.mark.parametrize("fmt", PHONE)
def test_grey_phone_image(fmt: str) -> None:
    grey = rocket().convert("L")
    got = pixels(encode(grey, fmt, quality=95), color_mode="L")
    assert float(np.abs(got - np.asarray(grey, dtype=int)).mean()) < 3.0


def test_grid_heic_like_an_iphone_decodes_whole() -> None:
    img = photo((200, 150))
    data = encode(img, "HEIF", tile_size=64, quality=95)
    assert len(find(data, b"dimg")) == 1  # a grid: the primary item is made of tiles
    assert float(np.abs(pixels(data) - np.asarray(img, dtype=int)).mean()) < 3.0


# --------------------------------------------------------------------------- bombs and damage


@pytest.mark.parametrize("fmt", PHONE)
@pytest.mark.parametrize("size", [(60_000, 60_000), (8_000, 8_000), (4_000_000_000, 2)])
def test_huge_ispe_is_refused_from_the_header(fmt: str, size: tuple[int, int]) -> None:
    data = patched(encode(rocket((64, 48)), fmt), b"ispe", 12, struct.pack(">II", *size))
    with cpu_seconds() as cpu, pytest.raises(ImageTooLargeError) as err:
        image_to_tensor(data, PLAIN)
    assert err.value.status_code == 413
    assert cpu.seconds < 0.25  # refused from the header: nothing was decoded


def test_grid_tiles_far_larger_than_the_image_are_refused() -> None:
    data = encode(photo((200, 150)), "HEIF", tile_size=64)
    sizes = {struct.unpack_from(">II", data, pos + 12) for pos, _ in find(data, b"ispe")}
    assert sizes == {(200, 150), (64, 64)}  # the image, and the one property all its tiles share
    ispes = find(data, b"ispe")
    tile = next(i for i, (pos, _) in enumerate(ispes) if struct.unpack_from(">I", data, pos + 12)[0] == 64)
    bomb = patched(data, b"ispe", 12, struct.pack(">II", 12_000, 12_000), which=tile)
    with cpu_seconds() as cpu, pytest.raises(ImageTooLargeError, match="plane"):
        image_to_tensor(bomb, PLAIN)
    assert cpu.seconds < 0.25


def test_pixel_limit_counts_the_header_size() -> None:
    data = encode(rocket((64, 48)), "AVIF")
    assert image_to_tensor(data, PLAIN, DecodeLimits(max_pixels=64 * 48)).shape == (3, 224, 224)
    with pytest.raises(ImageTooLargeError):
        image_to_tensor(data, PLAIN, DecodeLimits(max_pixels=64 * 48 - 1))


MALFORMED = {
    "meta-overruns-the-file": lambda d: patched(d, b"meta", 0, struct.pack(">I", len(d) * 4)),
    "meta-cut-short": lambda d: d[: find(d, b"meta")[0][0] + 40],
    "no-meta": lambda d: renamed(d, b"meta", b"free"),
    "no-primary-item": lambda d: renamed(d, b"pitm", b"free"),
    "primary-without-ispe": lambda d: renamed(d, b"ispe", b"free"),
    "ipco-child-overruns": lambda d: patched(d, b"ispe", 0, struct.pack(">I", 100_000)),
    "ipma-claims-millions": lambda d: patched(d, b"ipma", 12, struct.pack(">I", 5_000_000)),
    "box-of-size-3": lambda d: patched(d, b"pitm", 0, struct.pack(">I", 3)),
    "million-empty-boxes": lambda d: after_ftyp(d, b"\x00\x00\x00\x08free" * 1_000_000),
}


@pytest.mark.parametrize("fmt", PHONE)
@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_boxes_are_400(fmt: str, name: str) -> None:
    original = encode(rocket((64, 48)), fmt)
    data = MALFORMED[name](original)
    assert detect_format(data) == fmt
    with cpu_seconds() as cpu, pytest.raises(ImageInputError) as err:
        image_to_tensor(data, PLAIN)
    assert type(err.value) is ImageInputError and err.value.status_code == 400
    assert "malformed" in str(err.value) or "failed" in str(err.value)
    assert cpu.seconds < 0.5


def test_a_grid_naming_one_tile_thousands_of_times_costs_little() -> None:
    # By hand: tile item 2 has 51,000 property associations and the grid lists it 14,000 times; a
    # walk that looked the tile's size up again for every listing would take minutes.
    ipma = struct.pack(">IHBB", 201, 1, 1, 0x81) + (struct.pack(">HB", 2, 255) + b"\x01" * 255) * 200
    dimg = box(b"dimg", struct.pack(">HH", 1, 14_000) + struct.pack(">H", 2) * 14_000)
    meta = full_box(b"meta", full_box(b"pitm", struct.pack(">H", 1))
                    + box(b"iprp", box(b"ipco", full_box(b"ispe", struct.pack(">II", 64, 64)))
                          + full_box(b"ipma", ipma))
                    + full_box(b"iref", dimg))
    data = box(b"ftyp", b"heic" + bytes(4) + b"mif1heic") + meta
    with cpu_seconds() as cpu:
        claimed = probe_header(data, "HEIF")
        with pytest.raises(ImageInputError):
            image_to_tensor(data, PLAIN)
    assert claimed is not None and claimed.largest_plane == 14_000 * 64 * 64
    assert cpu.seconds < 0.5


@pytest.mark.parametrize("fmt", PHONE)
@pytest.mark.parametrize("keep", [0.05, 0.2, 0.5, 0.9, 0.99])
def test_truncated_phone_files_are_400(fmt: str, keep: float) -> None:
    data = encode(rocket(), fmt, quality=80)
    with pytest.raises(ImageInputError) as err:
        image_to_tensor(data[: int(len(data) * keep)], PLAIN)
    assert err.value.status_code == 400


# --------------------------------------------------------------------------- batch job


def test_batch_job_scores_heic_and_avif_files(imagenet_repo: Path, tmp_path: Path) -> None:
    """`imgclf batch` over a phone's folder: every HEIC and AVIF is an ok row, turned ones upright."""
    cat = photo((320, 214))
    folder = tmp_path / "camera roll"
    folder.mkdir()
    turned = Image.fromarray(stored_for_orientation(np.asarray(cat), 6))
    files = {
        "IMG_0001.HEIC": encode(cat, "HEIF", quality=90),
        "IMG_0002.heic": with_exif_orientation(turned, 6, "HEIF"),
        "IMG_0003.avif": encode(cat, "AVIF", quality=90),
        "IMG_0004.avif": with_exif_orientation(turned, 6, "AVIF"),
        "IMG_0005.heif": encode(cat, "HEIF", tile_size=64, quality=90),
        "IMG_0006.jpg": encode(cat, "JPEG", quality=90),
        "IMG_0007.heic": encode(cat, "JPEG", quality=90),  # a JPEG with the wrong name: bytes decide
        "IMG_0008.heic": encode(cat, "HEIF")[:500],  # truncated on the way from the phone
        "sideways.heic": encode(turned, "HEIF", quality=90),  # control: the sensor's pixels, no turn asked
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "scores.jsonl"
    options = BatchOptions(source=str(folder), model="imagenet-lite0", out=out,
                           top_k=3, batch_size=4, workers=2)
    summary = run_batch(options, Settings.from_env({}, model_repo=imagenet_repo))
    rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == set(files) and summary.total == len(files)
    truncated = rows["IMG_0008.heic"]
    assert truncated["status"] == "error" and truncated["error_kind"] == "invalid_image"
    ok = {name: r for name, r in rows.items() if name != "IMG_0008.heic"}
    assert all(r["status"] == "ok" for r in ok.values()), ok
    assert summary.ok == len(files) - 1 and summary.error == 1
    assert all(r["labels"][0] in {"tabby", "tiger cat", "Egyptian cat"} for r in ok.values())

    def distance(a: dict, b: dict) -> float:  # largest score difference over a's top labels
        scores_b = dict(zip(b["labels"], b["scores"], strict=True))
        pairs = zip(a["labels"], a["scores"], strict=True)
        return max(abs(s - scores_b.get(label, 0.0)) for label, s in pairs)

    reference = ok["IMG_0006.jpg"]
    assert distance(ok["sideways.heic"], reference) > 0.15  # a missing turn shows in the scores
    for name, row in ok.items():  # the same answer whatever the format, turned or not
        if name != "sideways.heic":
            assert distance(row, reference) < 0.08, (name, row["labels"], row["scores"], reference["scores"])
