"""lfm.preproc.decode against transformers.image_utils.load_image (golden/decode.json)."""

from __future__ import annotations

import hashlib
import io
import pathlib
from typing import Any, Callable

import numpy as np
import pytest

import lfm
import lfm.preproc
from conftest import IMAGES, grad, golden

DEC = golden("decode.json")
FILES = DEC["files"]
FILE_IDS = [f["file"] for f in FILES]

SOURCES: dict[str, Callable[[pathlib.Path], Any]] = {
    "str": lambda p: str(p),
    "path": lambda p: p,
    "bytes": lambda p: p.read_bytes(),
}


def _positions(w: int, h: int) -> list[tuple[int, int]]:
    return [(((k % 8) * (w - 1)) // 7, ((k // 8) * (h - 1)) // 7) for k in range(64)]


def _is_jpeg(f: dict[str, Any]) -> bool:
    return pathlib.Path(f["file"]).suffix.lower() in (".jpg", ".jpeg")


def _decode_case(f: dict[str, Any], source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decodes one golden file; returns (image, got samples, golden samples) as int64."""
    out = lfm.preproc.decode(SOURCES[source](IMAGES / f["file"]))
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.uint8
    assert out.shape == (f["height"], f["width"], 3)
    got = np.array([[x, y, *out[y, x].tolist()] for x, y in _positions(f["width"], f["height"])], dtype=np.int64)
    want = np.array(f["samples"], dtype=np.int64)
    assert (got[:, :2] == want[:, :2]).all()
    return out, got, want


LOSSLESS = [f for f in FILES if not _is_jpeg(f)]
JPEGS = [f for f in FILES if _is_jpeg(f)]


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("f", LOSSLESS, ids=lambda f: f["file"])
def test_decode_lossless_matches_golden(f: dict[str, Any], source: str) -> None:
    # PNG / WebP (lossless): exactly PIL's pixels.
    out, got, want = _decode_case(f, source)
    assert hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest() == f["sha256"]
    mean = out.reshape(-1, 3).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(mean, f["mean"], atol=5e-6)
    assert (got == want).all()


# JPEG decoders may legitimately differ from PIL's libjpeg-turbo (IDCT, chroma upsampling).
# Observed with the current build (image 0.25 / zune-jpeg) on grad_120x80.jpg and every
# exif_N.jpg: no sha256 match; channel means within 0.46 of PIL's; away from the right
# edge every pixel within 3 levels (mostly 0-2); but the last column (x = 119 in the stored
# orientation, width 120 is not a multiple of the 16-px 4:2:0 MCU) differs by up to 13
# levels (blue) -- see the xfail below.


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("f", JPEGS, ids=lambda f: f["file"])
def test_decode_jpeg_mean(f: dict[str, Any], source: str) -> None:
    out, _, _ = _decode_case(f, source)
    mean = out.reshape(-1, 3).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(mean, f["mean"], atol=1.0)


def _stored_last_column(f: dict[str, Any], got: np.ndarray) -> np.ndarray:
    """Mask of samples that lie on the last column of the image as stored in the file
    (before the EXIF transpose)."""
    w, h = f["width"], f["height"]
    x, y = got[:, 0], got[:, 1]
    n = f["exif_orientation"] or 1
    # Decoded (x, y) -> stored x coordinate, for each EXIF orientation.
    sx = {
        1: x, 2: w - 1 - x, 3: w - 1 - x, 4: x,
        5: y, 6: y, 7: h - 1 - y, 8: h - 1 - y,
    }[n]
    stored_w = f["source_size"][0]
    return np.asarray(sx == stored_w - 1)


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("f", JPEGS, ids=lambda f: f["file"])
def test_decode_jpeg_samples_interior(f: dict[str, Any], source: str) -> None:
    # Every sample except those on the stored image's last column (covered by the strict
    # xfail below) is within 3 levels of PIL.
    _, got, want = _decode_case(f, source)
    keep = ~_stored_last_column(f, got)
    assert keep.sum() >= 56
    diff = np.abs(got[keep, 2:] - want[keep, 2:])
    assert diff.max() <= 3, f"max sampled pixel difference {diff.max()}"


@pytest.mark.xfail(
    strict=True,
    reason=(
        "JPEG right-edge chroma upsampling differs from PIL/libjpeg-turbo: grad_120x80.jpg "
        "(120x80, 4:2:0, width not a multiple of the 16-px MCU) decodes with the last stored column "
        "(x=119, before any EXIF transpose; also in exif_2..8.jpg) off by up to 13 levels (blue "
        "channel; R/G up to 3) vs PIL; every other pixel is within 3"
    ),
)
@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("f", JPEGS, ids=lambda f: f["file"])
def test_decode_jpeg_samples(f: dict[str, Any], source: str) -> None:
    _, got, want = _decode_case(f, source)
    diff = np.abs(got[:, 2:] - want[:, 2:])
    assert diff.max() <= 3, f"max sampled pixel difference {diff.max()}"


@pytest.mark.parametrize("f", [f for f in FILES if f["exif_orientation"]], ids=lambda f: f["file"])
def test_exif_orientation_sizes(f: dict[str, Any]) -> None:
    n = f["exif_orientation"]
    assert 2 <= n <= 8
    out = lfm.preproc.decode(IMAGES / f["file"])
    sw, sh = f["source_size"]
    expected = (sw, sh) if n <= 4 else (sh, sw)
    assert (f["width"], f["height"]) == expected
    assert out.shape[:2] == (f["height"], f["width"])


def test_all_exif_orientations_present() -> None:
    assert sorted(f["exif_orientation"] for f in FILES if f["exif_orientation"]) == list(range(2, 9))


def test_exif_orientations_are_distinct_transforms() -> None:
    # Each orientation maps the same stored JPEG differently; compare with numpy transforms
    # of the untagged decode (JPEG bytes are identical apart from the EXIF tag).
    base = lfm.preproc.decode(IMAGES / "grad_120x80.jpg")
    expected = {
        2: base[:, ::-1],
        3: base[::-1, ::-1],
        4: base[::-1, :],
        5: base.transpose(1, 0, 2),
        6: np.rot90(base, k=-1),
        7: base[::-1, ::-1].transpose(1, 0, 2),
        8: np.rot90(base, k=1),
    }
    for n, want in expected.items():
        got = lfm.preproc.decode(IMAGES / f"exif_{n}.jpg")
        assert got.shape == want.shape, n
        assert np.array_equal(got, want), f"orientation {n}"


# --- in-memory images ----------------------------------------------------------------


def test_decode_ndarray_unchanged() -> None:
    a = grad(37, 23)
    out = lfm.preproc.decode(a)
    assert out.dtype == np.uint8 and out.shape == (23, 37, 3)
    assert np.array_equal(out, a)


def test_decode_non_contiguous_ndarray() -> None:
    a = grad(40, 30)[::-1, ::2]
    out = lfm.preproc.decode(a)
    assert np.array_equal(out, a)


def test_decode_ndarray_gray_and_rgba() -> None:
    g = grad(17, 11)
    rgba = np.concatenate([g, np.full((11, 17, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(lfm.preproc.decode(rgba), g)
    gray = g[:, :, 1].copy()
    assert np.array_equal(lfm.preproc.decode(gray), np.repeat(gray[:, :, None], 3, axis=2))


def test_decode_pil_rgb_unchanged() -> None:
    Image = pytest.importorskip("PIL.Image")
    a = grad(31, 19)
    out = lfm.preproc.decode(Image.fromarray(a, "RGB"))
    assert out.dtype == np.uint8 and np.array_equal(out, a)


def test_decode_pil_rgba_drops_alpha() -> None:
    Image = pytest.importorskip("PIL.Image")
    a = grad(31, 19)
    alpha = (np.arange(31 * 19, dtype=np.int64).reshape(19, 31) % 256).astype(np.uint8)
    im = Image.fromarray(np.dstack([a, alpha]), "RGBA")
    out = lfm.preproc.decode(im)
    assert out.shape == (19, 31, 3)
    assert np.array_equal(out, a)  # no compositing over a background


def test_decode_pil_gray_replicated() -> None:
    Image = pytest.importorskip("PIL.Image")
    g = grad(29, 13)[:, :, 0].copy()
    out = lfm.preproc.decode(Image.fromarray(g, "L"))
    assert out.shape == (13, 29, 3)
    for c in range(3):
        assert np.array_equal(out[:, :, c], g)


def test_decode_pil_image_ignores_exif() -> None:
    # SPEC §8: PIL inputs are the caller's pixels (no EXIF transpose).
    Image = pytest.importorskip("PIL.Image")
    with Image.open(IMAGES / "exif_6.jpg") as im:
        im.load()
        raw = np.asarray(im.convert("RGB"))
        out = lfm.preproc.decode(im)
    assert out.shape == (80, 120, 3)
    assert np.array_equal(out, raw)


# --- errors --------------------------------------------------------------------------


def test_decode_missing_file(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError):
        lfm.preproc.decode(str(missing))
    with pytest.raises(FileNotFoundError):
        lfm.preproc.decode(missing)


@pytest.mark.parametrize("data", [b"", b"not an image"], ids=["empty", "garbage"])
def test_decode_bad_bytes(data: bytes) -> None:
    with pytest.raises(lfm.ImageError) as ei:
        lfm.preproc.decode(data)
    assert isinstance(ei.value, ValueError)


def _check_truncated(name: str, tmp_path: pathlib.Path) -> None:
    data = (IMAGES / name).read_bytes()
    half = data[: len(data) // 2]
    with pytest.raises(lfm.ImageError):
        lfm.preproc.decode(half)
    p = tmp_path / name
    p.write_bytes(half)
    with pytest.raises(lfm.ImageError):
        lfm.preproc.decode(p)


@pytest.mark.parametrize("name", ["grad_64x48.png", "rgba_40x30.png", "gray_33x21.png"])
def test_decode_truncated_png(name: str, tmp_path: pathlib.Path) -> None:
    _check_truncated(name, tmp_path)


@pytest.mark.xfail(
    strict=True,
    reason=(
        "a truncated JPEG (first half of grad_120x80.jpg's bytes) decodes without error to a "
        "120x80 image whose missing lower part is filled with gray 128; PIL (and so "
        "transformers' load_image) raises OSError 'image file is truncated' -- expected "
        "lfm.ImageError"
    ),
)
def test_decode_truncated_jpeg(tmp_path: pathlib.Path) -> None:
    _check_truncated("grad_120x80.jpg", tmp_path)


def test_decode_bytes_equals_pil_for_png() -> None:
    Image = pytest.importorskip("PIL.Image")
    data = (IMAGES / "palette_32x24.png").read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        ref = np.asarray(im.convert("RGB"))
    assert np.array_equal(lfm.preproc.decode(data), ref)
