"""The `lfm` console script on the tiny models: caption folders into JSON lines, resume,
constrained tasks, info, and a valid file after Ctrl-C."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import IMAGES, MODELS

LFM = str(pathlib.Path(sys.executable).parent / "lfm")
MODEL = str(MODELS / "tiny16")


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LFM, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def folder(tmp_path: pathlib.Path) -> pathlib.Path:
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for name in ("grad_64x48.png", "grad_120x80.jpg", "exif_6.jpg"):
        shutil.copy(IMAGES / name, d / name)
    shutil.copy(IMAGES / "grad_50x40.webp", d / "sub" / "z.webp")
    (d / "notes.txt").write_text("not an image")
    (d / "broken.png").write_bytes(b"\x89PNG broken")
    return d


def lines(path: pathlib.Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_caption_folder_to_jsonl(folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out.jsonl"
    r = run("caption", str(folder), "--model", MODEL, "--out", str(out), "--max-new-tokens", "4", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    recs = lines(out)
    assert [pathlib.Path(x["path"]).name for x in recs] == [
        "broken.png",
        "exif_6.jpg",
        "grad_120x80.jpg",
        "grad_64x48.png",
        "z.webp",
    ]
    assert "error" in recs[0] and recs[0]["error"]["type"] == "ImageError"
    assert all(isinstance(x["output"], str) and x["finish_reason"] == "length" for x in recs[1:])
    assert "images/s" in r.stderr  # the progress bar


def test_resume_skips_done_images(folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out.jsonl"
    first = folder / "grad_64x48.png"
    assert run("caption", str(first), "--model", MODEL, "--out", str(out), "--max-new-tokens", "2").returncode == 0
    r = run(
        "caption",
        str(folder),
        "--model",
        MODEL,
        "--out",
        str(out),
        "--max-new-tokens",
        "2",
        "--resume",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    paths = [x["path"] for x in lines(out)]
    assert len(paths) == 5 and len(set(paths)) == 5 and paths[0] == str(first)


def test_constrained_tasks(folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    img = str(folder / "grad_64x48.png")
    r = run("caption", img, "--model", MODEL, "--regex", "(cat|dog)", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["output"] in ("cat", "dog")
    schema = tmp_path / "s.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["n"],
                "additionalProperties": False,
            }
        )
    )
    r = run("caption", img, "--model", MODEL, "--schema", str(schema), "--no-progress")
    assert json.loads(r.stdout)["output"]["n"] in range(10)
    r = run("caption", img, "--model", MODEL, "--task", "image-analysis", "--no-progress", "--max-new-tokens", "400")
    rec = json.loads(r.stdout)
    assert "output" in rec or rec["error"]["type"] == "ParseError"


def test_info(tmp_path: pathlib.Path) -> None:
    r = run("info", MODEL)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["variants"]["decoder_model_merged"] == ["fp32"] and rep["widths"]["hidden"] == 64
    assert rep["providers"][0] == "cpu"


def test_errors_exit_with_a_message(tmp_path: pathlib.Path) -> None:
    r = run("caption", str(IMAGES / "grad_64x48.png"), "--model", str(tmp_path))
    assert r.returncode == 2 and "lfm: error" in r.stderr


@pytest.mark.parametrize("size", ["0", "-1", "two"])
def test_batch_size_below_one_is_refused(size: str) -> None:
    # -1 used to caption nothing and exit 0, 0 to end in a traceback
    r = run("caption", str(IMAGES / "grad_64x48.png"), "--model", MODEL, "--batch-size", size, "--no-progress")
    assert r.returncode == 2 and "argument --batch-size: expected an integer of at least 1" in r.stderr
    assert r.stdout == ""


def test_bad_option_files_exit_with_a_message(tmp_path: pathlib.Path) -> None:
    img = str(IMAGES / "grad_64x48.png")
    schema = tmp_path / "s.json"
    schema.write_text("{not json")
    lark = tmp_path / "g.lark"
    lark.write_bytes(b'start: "\xff"\n')
    for flag, path, problem in (("--schema", schema, "not JSON"), ("--lark", lark, "not UTF-8 text")):
        r = run("caption", img, "--model", MODEL, flag, str(path), "--no-progress")
        assert r.returncode == 2 and f"lfm: error: {flag} {path}: {problem}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_resume_of_a_file_that_is_not_utf8(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"\xff\n")
    r = run("caption", str(IMAGES / "grad_64x48.png"), "--model", MODEL, "--out", str(out), "--resume", "--no-progress")
    assert r.returncode == 2 and f"lfm: error: --out {out}: not UTF-8 text" in r.stderr, r.stderr
    assert out.read_bytes() == b"\xff\n"  # left as it was


def test_missing_model_folder(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "no" / "such"
    r = run("info", str(missing))
    assert r.returncode == 2 and f"lfm: error: model folder {missing} does not exist" in r.stderr
    img = str(IMAGES / "grad_64x48.png")
    # absolute or explicitly relative: a folder, never a Hub repo id
    for model in (str(missing), "./no/such/dir", "../no-such-dir"):
        r = run("caption", img, "--model", model, "--no-progress")
        assert r.returncode == 2 and f"lfm: error: model folder {model} does not exist" in r.stderr, r.stderr


@pytest.mark.skipif(os.name != "posix", reason="needs SIGINT")
def test_ctrl_c_leaves_a_valid_file(tmp_path: pathlib.Path) -> None:
    d = tmp_path / "many"
    d.mkdir()
    for i in range(60):
        shutil.copy(IMAGES / "grad_120x80.jpg", d / f"{i:03d}.jpg")
    out = tmp_path / "out.jsonl"
    p = subprocess.Popen(
        [
            LFM,
            "caption",
            str(d),
            "--model",
            MODEL,
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--max-new-tokens",
            "200",
            "--no-progress",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size == 0):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    recs = lines(out)  # every line is complete JSON
    assert 0 < len(recs) < 60
    assert (
        run(
            "caption", str(d), "--model", MODEL, "--out", str(out), "--max-new-tokens", "2", "--resume", "--no-progress"
        ).returncode
        == 0
    )
    assert len(lines(out)) == 60
