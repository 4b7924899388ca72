"""lfm.preproc.decode against transformers.image_utils.load_image (golden/decode.json)."""

from __future__ import annotations

import hashlib
import io
import pathlib
from collections.abc import Callable
from typing import Any

import lfm
import lfm.preproc
import numpy as np
import pytest
from conftest import IMAGES, MODELS, golden, grad

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


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("f", FILES, ids=lambda f: f["file"])
def test_decode_matches_pil_exactly(f: dict[str, Any], source: str) -> None:
    # Every file is exactly PIL's pixels: PNG/WebP trivially, JPEG because lfm decodes it
    # with libjpeg-turbo's decoder as PIL does (islow IDCT, fancy chroma upsampling; an
    # earlier pure-Rust decoder was off by up to 13 levels on the right edge of 4:2:0 files
    # whose width is not a multiple of 16).
    out, got, want = _decode_case(f, source)
    assert hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest() == f["sha256"]
    mean = out.reshape(-1, 3).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(mean, f["mean"], atol=5e-6)
    assert (got == want).all()


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


def test_decode_truncated_jpeg(tmp_path: pathlib.Path) -> None:
    _check_truncated("grad_120x80.jpg", tmp_path)


def test_decode_truncated_jpeg_with_an_exif_thumbnail(tmp_path: pathlib.Path) -> None:
    """A camera JPEG carries a whole JPEG (its thumbnail) in its EXIF segment; cut short,
    the file's own scan has no end marker although the thumbnail's has: PIL refuses it
    ("image file is truncated"), and so does lfm (it used to fill the rest with gray)."""
    thumb = (IMAGES / "grad_120x80.jpg").read_bytes()
    exif = b"Exif\x00\x00" + thumb
    app1 = b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif
    main = (IMAGES / "grad_120x80.jpg").read_bytes()
    camera = main[:2] + app1 + main[2:]
    assert lfm.preproc.decode(camera).shape == (80, 120, 3)  # whole, it decodes
    with pytest.raises(lfm.ImageError, match="truncated"):
        lfm.preproc.decode(camera[: len(camera) - len(main) // 3])


def test_decode_corrupt_jpeg_is_an_image_error() -> None:
    """libjpeg's fatal errors on corrupt data (here a Huffman table never defined) are the
    file's fault: ImageError, not InternalError."""
    with pytest.raises(lfm.ImageError, match="Huffman table"):
        lfm.preproc.decode(IMAGES / "corrupt_huffman.jpg")


def test_decode_16bit_gray_png_clips_as_pil() -> None:
    """PIL opens a 16-bit gray PNG as mode I;16 and ``convert("RGB")`` clips it to 255
    (it does not take the high byte, as for 16-bit color)."""
    Image = pytest.importorskip("PIL.Image")
    values = np.array([[0, 100, 255, 256, 300, 4000, 65535]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        ref = np.asarray(im.convert("RGB"))
    got = lfm.preproc.decode(buf.getvalue())
    assert np.array_equal(got, ref), (got[0, :, 0], ref[0, :, 0])


def test_decode_refuses_files_that_are_not_regular(tmp_path: pathlib.Path) -> None:
    """A FIFO is refused before it is opened (opening one blocks until a writer comes, and
    the engine reads files on its scheduler thread); a directory is IsADirectoryError."""
    import os

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(lfm.ImageError, match="not a regular file"):
        lfm.preproc.decode(fifo)
    with pytest.raises(IsADirectoryError):
        lfm.preproc.decode(tmp_path)


def test_decode_bytes_equals_pil_for_png() -> None:
    Image = pytest.importorskip("PIL.Image")
    data = (IMAGES / "palette_32x24.png").read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        ref = np.asarray(im.convert("RGB"))
    assert np.array_equal(lfm.preproc.decode(data), ref)


def test_a_16bit_file_over_four_bytes_per_pixel_is_read(tmp_path: pathlib.Path) -> None:
    """``max_decoded_image_bytes`` counts 4 bytes per pixel; a 16-bit RGBA file may hold 8
    (noise does not compress): read from a path as from bytes, not refused by its size."""
    import struct
    import zlib

    noise = np.random.default_rng(0).integers(0, 65535, (128, 128, 4), dtype=np.uint16)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in noise)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 128, 128, 16, 6, 0, 0, 0)  # 16-bit RGBA
    path = tmp_path / "noise16.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    assert path.stat().st_size > 128 * 128 * 4
    engine = lfm.Engine.from_dir(
        MODELS / "tiny16", lfm.EngineOptions(limits=lfm.Limits(max_decoded_image_bytes=128 * 128 * 4))
    )
    assert engine.encode_prompt("x", [path]) == engine.encode_prompt("x", [path.read_bytes()])
