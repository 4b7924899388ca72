"""Replays the committed fuzz corpus of the task output parser (fuzz/image_analysis_parser.py)
and every crash input as ordinary tests."""

from __future__ import annotations

import pathlib

import lfm
import pytest
from lfm.image_analysis import EXTENSIONS

FUZZ = pathlib.Path(__file__).resolve().parents[1] / "fuzz"
FILES = sorted(
    p for d in ("corpus", "artifacts") for p in (FUZZ / d / "image_analysis_parser").glob("*") if p.is_file()
)
TASKS = [
    lfm.ImageAnalysisTask(),
    lfm.ImageAnalysisTask(extensions=EXTENSIONS, description_max_chars=20, max_items=2),
    lfm.ImageAnalysisTask(extensions=["objects", "scene"], accept_empty=True),
]


def test_corpus_is_committed() -> None:
    assert len(FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_parser_input(path: pathlib.Path) -> None:
    text = path.read_bytes().decode("utf-8", errors="replace")
    for task in TASKS:
        try:
            out = task.parse(text)
        except lfm.ParseError:
            continue
        assert isinstance(out, lfm.ImageAnalysis)
        assert len(out.description) <= task.description_max_chars
