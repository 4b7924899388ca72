"""Property-based: whatever a caller passes, the public API returns a result or raises an
lfm.LfmError subclass (or TypeError/ValueError for wrong Python types), never anything
else, and never hangs."""

from __future__ import annotations

from typing import Any

import lfm
import numpy as np
import pytest
from conftest import MODELS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ENGINE = lfm.Engine.from_dir(MODELS / "tiny6", lfm.EngineOptions(intra_threads=1))
ALLOWED = (lfm.LfmError, TypeError, ValueError, FileNotFoundError)

texts = st.text(max_size=40) | st.sampled_from(["<image>", "<|im_end|>", "", "x" * 200])
images = st.one_of(
    st.binary(max_size=64),
    st.tuples(st.integers(0, 40), st.integers(0, 40), st.sampled_from([1, 3, 4])).map(
        lambda t: np.zeros((t[0], t[1], t[2]), np.uint8)
    ),
    st.just("/no/such/file.png"),
    st.integers(),
)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.just({"type": "image"}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "video", "text"])}),
)
messages = st.one_of(
    texts,
    st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "tool", "bot", ""]),
                "content": st.one_of(texts, st.lists(parts, max_size=4), st.integers(), st.none()),
            }
        ),
        max_size=4,
    ),
)
options = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": st.integers(-2, 6),
        "temperature": st.floats(-1, 3) | st.just(float("nan")),
        "top_k": st.integers(-1, 50),
        "top_p": st.floats(-0.5, 1.5),
        "min_p": st.floats(-0.5, 1.5),
        "repetition_penalty": st.floats(-1, 3),
        "seed": st.integers(0, 2**64 - 1),
        "stop": st.lists(st.text(max_size=3), max_size=2),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=messages, imgs=st.lists(images, max_size=3), opts=options)
def test_generate_never_escapes(messages: Any, imgs: list[Any], opts: dict[str, Any]) -> None:
    try:
        gen = ENGINE.generate(messages, imgs, opts)
    except ALLOWED:
        return
    assert gen.finish_reason in ("stop", "length", "cancelled")
    assert len(gen.token_ids) <= opts.get("max_new_tokens", 512)


@settings(max_examples=150, deadline=None)
@given(w=st.integers(-5, 70_000), h=st.integers(-5, 70_000), tokens=st.integers(0, 2000), tiles=st.integers(0, 12))
def test_plan_never_escapes(w: int, h: int, tokens: int, tiles: int) -> None:
    try:
        budget = lfm.ImageBudget(max_image_tokens=tokens, max_tiles=tiles)
        grid = lfm.preproc.plan(w, h, budget)
    except ALLOWED:
        return
    assert grid.num_image_tokens > 0 and grid.num_entries >= 1


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=300))
def test_decode_never_escapes(data: bytes) -> None:
    try:
        out = lfm.preproc.decode(data)
    except ALLOWED:
        return
    assert out.dtype == np.uint8 and out.ndim == 3


@settings(max_examples=100, deadline=None)
@given(pattern=st.text(max_size=12))
def test_regex_grammars_never_escape(pattern: str) -> None:
    try:
        lfm.Grammar.regex(pattern)
    except ALLOWED:
        pass


@pytest.mark.parametrize("bad", [None, 3, [1], {"role": "user"}])
def test_wrong_message_types(bad: Any) -> None:
    with pytest.raises(ALLOWED):
        ENGINE.generate(bad)
