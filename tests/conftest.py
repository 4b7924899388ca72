"""Shared fixtures: paths to the committed tiny models and goldens, and the "grad" test
image formula of tests/fixtures/README.md."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MODELS = FIXTURES / "models"
GOLDEN = FIXTURES / "golden"
IMAGES = FIXTURES / "images"
MODEL_NAMES = ["tiny16", "tiny6"]
# Execution providers for the decoding-parity tests (e.g. `LFM_TEST_PROVIDERS=cuda` on a
# machine with onnxruntime-gpu); the CPU by default.
PROVIDERS = tuple(os.environ.get("LFM_TEST_PROVIDERS", "cpu").split(","))


def golden(name: str) -> Any:
    return json.loads((GOLDEN / name).read_text())


def grad(width: int, height: int) -> np.ndarray:
    """R ramps left to right, G top to bottom, B carries high-frequency detail."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    r = (x * 255) // max(width - 1, 1)
    g = (y * 255) // max(height - 1, 1)
    b = ((x * 7 + y * 13) ^ (x * y)) & 255
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


@pytest.fixture(scope="session", params=MODEL_NAMES)
def model_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def tiny16() -> Any:
    import lfm

    return lfm.Engine.from_dir(MODELS / "tiny16", lfm.EngineOptions(intra_threads=1))
