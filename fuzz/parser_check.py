"""The property the image-analysis parser fuzzer checks, shared with the corpus replay
test: any text gives an ImageAnalysis that respects the caps, or an lfm.ParseError."""

from __future__ import annotations

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
