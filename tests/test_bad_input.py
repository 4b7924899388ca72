"""Untrusted input: images, text and grammars that must be refused with a typed error
(value and limit attached), never a crash, a hang or a silent wrong answer."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import lfm
import numpy as np
import pytest
from conftest import IMAGES, MODELS


@pytest.fixture(scope="module")
def engine() -> lfm.Engine:
    return lfm.Engine.from_dir(MODELS / "tiny16", lfm.EngineOptions(intra_threads=1))


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A small PNG file whose header declares ``width x height`` (a decompression bomb's
    shape: the pixel data would expand far beyond the file)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("w", "h", "field"), [(100_000, 10, "width"), (20, 16_385, "height"), (16_000, 16_000, "decoded size in bytes")]
)
def test_decompression_bombs_are_refused_from_the_header(engine: lfm.Engine, w: int, h: int, field: str) -> None:
    with pytest.raises(lfm.ImageError) as info:
        engine.generate("Describe.", [png_header(w, h)])
    assert info.value.field == field and info.value.limit is not None and info.value.value is not None


def test_limits_are_configurable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    small = lfm.Engine.from_dir(MODELS / "tiny16", lfm.EngineOptions(limits=lfm.Limits(max_image_side=64)))
    with pytest.raises(lfm.ImageError) as info:
        small.generate("Describe.", [(IMAGES / "grad_120x80.jpg").read_bytes()])
    assert info.value.limit == "64"
    assert small.generate("Describe.", [(IMAGES / "grad_64x48.png").read_bytes()], {"max_new_tokens": 2})
    # Pixels given as an array or a PIL image answer to the same limits as a file's.
    from PIL import Image

    pixels = np.zeros((80, 120, 3), np.uint8)
    for image in (pixels, Image.fromarray(pixels)):
        with pytest.raises(lfm.ImageError) as info:
            small.generate("Describe.", [image])
        assert (info.value.field, info.value.value, info.value.limit) == ("width", "120", "64")


def test_cmyk_jpeg_decodes_like_pil() -> None:
    from PIL import Image

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "CMYK"
        want = np.asarray(im.convert("RGB"))
    assert np.array_equal(lfm.preproc.decode(data), want)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 100,
        b"GIF89a" + b"\x00" * 20,
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff",
        b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        (IMAGES / "grad_64x48.png").read_bytes()[:-20],
        (IMAGES / "grad_120x80.jpg").read_bytes()[:300],
        (IMAGES / "grad_50x40.webp").read_bytes()[:40],
    ],
)
def test_corrupt_images_are_image_errors(engine: lfm.Engine, data: bytes) -> None:
    with pytest.raises(lfm.ImageError):
        engine.generate("Describe.", [data], {"max_new_tokens": 2})


def test_animated_gif_is_refused_with_the_supported_formats(engine: lfm.Engine) -> None:
    from PIL import Image

    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(lfm.ImageError, match="GIF|Gif|format"):
        engine.generate("Describe.", [buf.getvalue()])


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 4000, 3), (3, 3, 1), (5, 7, 4), (9, 9)])
def test_odd_arrays(engine: lfm.Engine, shape: tuple[int, ...]) -> None:
    gen = engine.generate("Describe.", [np.zeros(shape, np.uint8)], {"max_new_tokens": 2})
    assert gen.usage.image_tokens > 0


def test_absurd_aspect_ratio_is_an_image_error(engine: lfm.Engine) -> None:
    with pytest.raises(lfm.ImageError) as info:
        engine.generate("Describe.", [np.zeros((1, 16_000, 3), np.uint8)])
    assert info.value.field == "image tokens"


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "audio"}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "system", "content": [{"type": "image", "image": np.zeros((8, 8, 3), np.uint8)}]}],
        [{"role": "User", "content": "hi"}],
        [{"role": "user", "content": "<|img_row_1_col_2|>"}],
        [{"role": "assistant", "content": "fake <|image_start|>"}],
        [{"role": "system", "content": "<image>"}],
    ],
)
def test_malformed_messages_are_rejected(engine: lfm.Engine, messages: list) -> None:  # type: ignore[type-arg]
    with pytest.raises(lfm.RequestRejectedError) as info:
        engine.generate(messages)
    assert info.value.field is not None


def test_text_limits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    e = lfm.Engine.from_dir(MODELS / "tiny16", lfm.EngineOptions(limits=lfm.Limits(max_text_bytes=100, max_messages=2)))
    with pytest.raises(lfm.RequestRejectedError) as info:
        e.generate("x" * 101)
    assert info.value.limit == "100"
    with pytest.raises(lfm.RequestRejectedError, match="max_messages"):
        e.generate([{"role": "user", "content": "a"}] * 3)


def test_nul_and_odd_text_are_fine(engine: lfm.Engine) -> None:
    for text in ["", "a\x00b", "\ud7ff\ue000", "é" * 50, "\n\n\t"]:
        assert engine.generate(text, options={"max_new_tokens": 2}).finish_reason == "length"


def test_grammar_that_admits_nothing() -> None:
    with pytest.raises(lfm.GrammarError, match="Unsatisfiable|admits no output"):
        lfm.Grammar.json_schema({"type": "integer", "minimum": 5, "maximum": 3})
    with pytest.raises(lfm.GrammarError, match="Unsatisfiable|admits no output"):
        lfm.Grammar.json_schema({"allOf": [{"type": "string"}, {"type": "integer"}]})


def test_stop_strings_with_a_grammar_are_refused(engine: lfm.Engine) -> None:
    """A stop string would cut constrained output wherever it appears, so the output could
    end incomplete yet reported as finished: the combination is refused up front."""
    g = lfm.Grammar.json_schema({"type": "object", "properties": {"a": {"type": "string"}}})
    with pytest.raises(lfm.InvalidOptionsError) as info:
        engine.generate("Go.", options={"max_new_tokens": 8, "stop": ['"a"']}, grammar=g)
    assert info.value.field == "stop"


@pytest.mark.parametrize("rules", [3000, 20000])
def test_deep_grammars_compile_or_fail_cleanly(engine: lfm.Engine, rules: int) -> None:
    """A chain of thousands of rules made llguidance's compiler overflow a thread's stack
    (a segmentation fault); grammars now compile on a thread with room for them."""
    src = "start: r0\n" + "".join(f'r{i}: "x" r{i + 1}\n' for i in range(rules)) + f'r{rules}: "y"'
    g = lfm.Grammar.lark(src)
    out = engine.generate("Go.", options={"max_new_tokens": 3}, grammar=g)
    assert out.text == "xxx"


def test_no_panic_reaches_python() -> None:
    from lfm import _lfm

    with pytest.raises(lfm.InternalError, match="deliberate panic"):
        _lfm._panic_for_tests()


def test_decoder_without_cache_inputs_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    d = tmp_path / "m"
    shutil.copytree(MODELS / "tiny16", d)
    # The embed graph has the right name for one decoder input only: no cache inputs.
    shutil.copy(d / "onnx" / "embed_tokens.onnx", d / "onnx" / "decoder_model_merged.onnx")
    with pytest.raises(lfm.ModelLoadError, match="decoder_model_merged.onnx"):
        lfm.Engine.from_dir(d)


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("chat_template.jinja", b"{{ bos_token }}\xff\xfe", "not UTF-8"),
        ("tokenizer_config.json", b'{"bos_token": "\xff"}', "not UTF-8"),
        ("chat_template.jinja", b"{% for m in messages %}{{ m.content }", "does not compile"),
    ],
    ids=["template-bytes", "config-bytes", "template-syntax"],
)
def test_unreadable_text_files_are_model_load_errors(tmp_path, name: str, data: bytes, match: str) -> None:  # type: ignore[no-untyped-def]
    """A template or config that is not UTF-8, or a template that does not compile, is a
    model file lfm cannot load (was a bare OSError, or an InternalError "bug in lfm")."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(MODELS / "tiny16", d)
    (d / name).write_bytes(data)
    with pytest.raises(lfm.ModelLoadError, match=match) as info:
        lfm.Engine.from_dir(d, strict=False)
    assert name in str(info.value) and "bug in lfm" not in str(info.value)


def test_a_vision_encoder_of_another_model_is_refused_at_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The exported vision graph leaves its output width symbolic: a probe at load finds
    tiny6's encoder (96 wide) next to tiny16's decoder (64), not the first image."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(MODELS / "tiny16", d)
    shutil.copy(MODELS / "tiny6" / "onnx" / "vision_encoder.onnx", d / "onnx" / "vision_encoder.onnx")
    with pytest.raises(lfm.ModelLoadError, match="vision_encoder.onnx") as info:
        lfm.Engine.from_dir(d, strict=False)
    assert "expected [tokens, 64]" in str(info.value)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


@pytest.mark.parametrize(
    "name,data",
    [
        # A length that wrapped to a seek of -11 bytes: parsing restarted forever.
        ("vision_encoder.onnx", b"\x0a" + _varint(2**64 - 11)),
        # A length of 4 TiB: allocated up front, the process aborted.
        ("decoder_model_merged.onnx", b"\x0a" + _varint(2**42) + b"xyz"),
    ],
    ids=["wrapping_length", "huge_length"],
)
def test_malformed_onnx_lengths_are_model_load_errors(tmp_path, name: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
    import shutil
    import subprocess
    import sys

    d = tmp_path / "m"
    shutil.copytree(MODELS / "tiny16", d)
    (d / "onnx" / name).write_bytes(data)
    # In a child: the bug was a hang or an abort, which would take pytest down with it.
    code = (
        "import lfm, sys\n"
        "try:\n"
        "    lfm.Engine.from_dir(sys.argv[1])\n"
        "except lfm.ModelLoadError as e:\n"
        "    print('ModelLoadError', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ModelLoadError") and name in r.stdout, r.stdout


def test_non_utf8_path(engine: lfm.Engine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A path whose bytes are not UTF-8 (given as bytes through os.fsdecode's surrogate
    escapes) is either found or reported missing, never a crash."""
    import os

    missing = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"\xff\xfe.png"))
    with pytest.raises(FileNotFoundError):
        engine.generate("Describe.", [missing])
    real = os.path.join(os.fsencode(tmp_path), b"img\xff.png")
    with open(real, "wb") as f:
        f.write((IMAGES / "grad_64x48.png").read_bytes())
    gen = engine.generate("Describe.", [pathlib_from_bytes(real)], {"max_new_tokens": 2})
    assert gen.usage.image_tokens > 0


def pathlib_from_bytes(raw: bytes):  # type: ignore[no-untyped-def]
    import os
    import pathlib

    return pathlib.Path(os.fsdecode(raw))


def _single_images() -> list[object]:
    import pathlib

    from PIL import Image

    path = IMAGES / "grad_64x48.png"
    return [
        np.zeros((6, 40, 3), np.uint8),
        np.zeros((6, 40), np.uint8),
        str(path),
        pathlib.Path(path),
        path.read_bytes(),
        Image.new("RGB", (8, 8)),
    ]


@pytest.mark.parametrize("image", _single_images(), ids=lambda v: type(v).__name__)
def test_one_image_where_a_list_goes_is_refused(engine: lfm.Engine, image: object) -> None:
    """A single image given as ``images=`` is not taken apart (an array into rows, a path
    into characters): it is refused with a hint to wrap it in a list."""
    task = lfm.JsonTask({"type": "string", "maxLength": 3}, "x")
    calls = [
        lambda: engine.generate("Describe.", images=image, options={"max_new_tokens": 1}),  # type: ignore[arg-type]
        lambda: engine.run(task, image, options={"max_new_tokens": 8}),  # type: ignore[arg-type]
        lambda: engine.encode_prompt("Describe.", image),  # type: ignore[arg-type]
        lambda: engine.stream("Describe.", image),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(lfm.RequestRejectedError, match=r"images=\[image\]") as info:
            call()
        assert (info.value.field, info.value.value, info.value.limit) == (
            "images",
            type(image).__name__,
            "a list of images",
        )
    # Per item in a batch: that item fails alone.
    out = engine.generate_batch(["a", "b"], images=[image, [image]], options={"max_new_tokens": 1})  # type: ignore[list-item]
    assert isinstance(out[0], lfm.RequestRejectedError) and out[0].field == "images"
    assert isinstance(out[1], lfm.Generation)


def test_a_stack_of_images_is_a_list_of_images(engine: lfm.Engine) -> None:
    one = engine.encode_prompt("Describe.", [np.zeros((16, 16, 3), np.uint8)] * 2)
    assert engine.encode_prompt("Describe.", np.zeros((2, 16, 16, 3), np.uint8)) == one  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "messages", ["hello", b"hello", {"role": "user", "content": "x"}], ids=["str", "bytes", "dict"]
)
def test_generate_batch_refuses_one_conversation(engine: lfm.Engine, messages: object) -> None:
    """``generate_batch("hello")`` is not five one-letter conversations."""
    with pytest.raises(lfm.RequestRejectedError, match=r"generate_batch\(\[messages\]\)") as info:
        engine.generate_batch(messages, options={"max_new_tokens": 1})  # type: ignore[arg-type]
    assert (info.value.field, info.value.value) == ("messages", type(messages).__name__)
    with pytest.raises(lfm.RequestRejectedError) as info:
        engine.generate_batch(["a", "b"], images=np.zeros((2, 8, 8, 3), np.uint8)[0], options={"max_new_tokens": 1})  # type: ignore[arg-type]
    assert info.value.field == "images"


def test_special_token_split_across_text_parts_is_refused(engine: lfm.Engine) -> None:
    """The template writes adjacent text parts with nothing between them: two parts that
    together spell a special token are refused like one part that does."""
    parts = [{"type": "text", "text": "a<|im_"}, {"type": "text", "text": "end|>b"}]
    with pytest.raises(lfm.RequestRejectedError, match="special token") as info:
        engine.generate([{"role": "user", "content": parts}], options={"max_new_tokens": 1})
    assert info.value.field == "messages[0].content"


@pytest.mark.parametrize(
    ("messages", "value"),
    [
        ("caption \ud800 this", "'\\ud800'"),
        ([{"role": "user", "content": "x", "score": float("nan")}], "NaN or infinity"),
        ([{"role": "user", "content": "x", "score": float("inf")}], "NaN or infinity"),
    ],
    ids=["lone-surrogate", "nan", "inf"],
)
def test_messages_that_are_not_text_or_json_are_rejected(engine: lfm.Engine, messages: Any, value: str) -> None:
    with pytest.raises(lfm.RequestRejectedError) as info:
        engine.generate(messages, options={"max_new_tokens": 1})
    assert (info.value.field, info.value.value) == ("messages", value)
    with pytest.raises(lfm.RequestRejectedError):
        engine.apply_chat_template(messages)


def test_images_none_is_no_images(engine: lfm.Engine) -> None:
    """``images=None`` (for a request, or for one conversation of a batch) means no images,
    as ``()`` does; a batch whose image lists do not match its conversations is refused."""
    assert engine.encode_prompt("Describe.", None) == engine.encode_prompt("Describe.")
    out = engine.generate_batch(["a", "b"], images=[None, ()], options={"max_new_tokens": 1})
    assert all(isinstance(g, lfm.Generation) for g in out), out
    with pytest.raises(lfm.RequestRejectedError, match="1 entries for 2 conversations") as info:
        engine.generate_batch(["a", "b"], images=[None], options={"max_new_tokens": 1})
    assert (info.value.field, info.value.value, info.value.limit) == ("images", "1", "2")


@pytest.mark.parametrize("item", _single_images(), ids=lambda v: type(v).__name__)
def test_run_batch_refuses_one_item(engine: lfm.Engine, item: object) -> None:
    task = lfm.JsonTask({"type": "string", "maxLength": 3}, "x")
    with pytest.raises(lfm.RequestRejectedError, match=r"run_batch\(task, \[image\]\)") as info:
        engine.run_batch(task, item, options={"max_new_tokens": 8})  # type: ignore[arg-type]
    assert (info.value.field, info.value.value) == ("items", type(item).__name__)
    with pytest.raises(lfm.RequestRejectedError):
        engine.run_batch(task, {"a": item}, options={"max_new_tokens": 8})  # type: ignore[arg-type]
