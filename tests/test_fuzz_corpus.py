"""Replays the committed fuzz corpus of the task output parser (fuzz/image_analysis_parser.py)
and every crash input as ordinary tests."""

from __future__ import annotations

import pathlib
import sys

import pytest

FUZZ = pathlib.Path(__file__).resolve().parents[1] / "fuzz"
sys.path.insert(0, str(FUZZ))
from parser_check import check  # noqa: E402

FILES = sorted(
    p for d in ("corpus", "artifacts") for p in (FUZZ / d / "image_analysis_parser").glob("*") if p.is_file()
)


def test_corpus_is_committed() -> None:
    assert len(FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_parser_input(path: pathlib.Path) -> None:
    check(path.read_bytes())
