"""Fuzzes lfm.ImageAnalysisTask's parser (the task output parser) with atheris: any text
must give an ImageAnalysis or an lfm.ParseError, never another exception.

usage: python fuzz/image_analysis_parser.py fuzz/corpus/image_analysis_parser -max_total_time=600
(the pytest suite replays the committed corpus: tests/test_fuzz_corpus.py)"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
with atheris.instrument_imports():
    import lfm  # noqa: F401
    from parser_check import check

if __name__ == "__main__":
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
