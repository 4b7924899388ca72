"""Runs against the real LFM2.5-VL-450M-ONNX when LFM_MODEL_PATH points at a downloaded
copy (HF layout); skipped otherwise. Run: LFM_MODEL_PATH=... pytest -m integration"""

from __future__ import annotations

import os
import pathlib

import lfm
import pytest
from conftest import IMAGES, golden, grad

pytestmark = pytest.mark.integration

MODEL = os.environ.get("LFM_MODEL_PATH")


@pytest.fixture(scope="module")
def engine() -> lfm.Engine:
    if not MODEL:
        pytest.skip("LFM_MODEL_PATH is not set")
    return lfm.Engine.from_dir(pathlib.Path(MODEL))


def test_real_widths(engine: lfm.Engine) -> None:
    s = engine.spec
    assert (s["hidden"], s["vocab"], s["num_layers"], s["kv_heads"], s["head_dim"]) == (1024, 65536, 16, 8, 64)
    assert s["eos_token_id"] == 7


@pytest.mark.parametrize("image", ["grad_120x80.jpg", "grad_64x48.png", "exif_6.jpg"])
def test_captions_are_non_empty(engine: lfm.Engine, image: str) -> None:
    gen = engine.generate("Describe this image briefly.", [IMAGES / image], lfm.RequestOptions(max_new_tokens=48))
    assert gen.text.strip()
    assert gen.usage.image_tokens > 0


def test_text_only(engine: lfm.Engine) -> None:
    gen = engine.generate("What is 2+2? Answer with just the number.", options=lfm.RequestOptions(max_new_tokens=8))
    assert "4" in gen.text


def test_plans_match_the_processor(engine: lfm.Engine) -> None:
    # The real model's prompt for an image has exactly the planned number of image tokens.
    for case in golden("preprocess.json")["cases"][:12]:
        if case.get("budget") != "default" or "error" in case:
            continue
        ids = engine.encode_prompt("Describe.", [grad(case["width"], case["height"])])
        assert ids.count(396) == case["num_image_tokens"]
