"""Fuzzes lfm.ImageAnalysisTask's parser (the task output parser) with atheris: any text
must give an ImageAnalysis or an lfm.ParseError, never another exception.

usage: python fuzz/image_analysis_parser.py fuzz/corpus/image_analysis_parser -max_total_time=600
(the pytest suite replays the committed corpus: tests/test_fuzz_corpus.py)"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import lfm
    from lfm.image_analysis import EXTENSIONS

TASKS = [
    lfm.ImageAnalysisTask(),
    lfm.ImageAnalysisTask(extensions=EXTENSIONS, description_max_chars=20, max_items=2),
    lfm.ImageAnalysisTask(extensions=["objects", "scene"], accept_empty=True),
]


def check(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    for task in TASKS:
        try:
            out = task.parse(text)
        except lfm.ParseError:
            continue
        assert isinstance(out, lfm.ImageAnalysis)
        assert len(out.description) <= task.description_max_chars
        ends = {"description": lfm.FieldEnd(text=out.description, closed_by="model")}
        try:
            task.parse_ended(text, ends)
        except lfm.ParseError:
            pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
