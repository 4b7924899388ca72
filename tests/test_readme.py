"""The README's Python examples run, against the tiny test model instead of the real one."""

from __future__ import annotations

import pathlib
import re

import pytest
from conftest import IMAGES, MODELS

README = pathlib.Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)

# The examples name a real model folder and photo; the test points them at fixtures.
SUBSTITUTIONS = {
    '"LFM2.5-VL-450M-ONNX"': repr(str(MODELS / "tiny16")),
    '"photo.jpg"': repr(str(IMAGES / "grad_120x80.jpg")),
}


def test_readme_has_a_quickstart() -> None:
    assert BLOCKS, "README.md has no python examples"
    text = README.read_text()
    assert text.index("## Quickstart") < text.index("## Development")
    assert "pip install" in text


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(block: str, capsys: pytest.CaptureFixture[str]) -> None:
    for old, new in SUBSTITUTIONS.items():
        block = block.replace(old, new)
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})
