"""Batched decoding equals one-at-a-time decoding, on every tiny model: tiny16-gqa's
attention takes row lengths from the mask (as the official export), so its steps run
batched; tiny16 and tiny6 derive positions from the cache width, so they are decoded one
sequence at a time. Mixed prompt lengths, images, grammars and seeds."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import lfm
import numpy as np
import onnx
import pytest
from conftest import MODELS, PROVIDERS, grad
from onnx import helper, numpy_helper

MODELS_UNDER_TEST = ["tiny16-gqa", "tiny16", "tiny6"]


def requests() -> list[tuple[Any, list[Any], lfm.RequestOptions, lfm.Grammar | None]]:
    greedy = lfm.RequestOptions(max_new_tokens=24, repetition_penalty=1.0)
    sampled = lfm.RequestOptions(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=11)
    json_g = lfm.Grammar.json_schema(
        {
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
            "required": ["n"],
            "additionalProperties": False,
        }
    )
    return [
        ("Hi", [], greedy, None),
        ("Describe this image.", [grad(300, 400)], greedy, None),
        ("A much longer text prompt, so that the rows have quite different lengths in the batch.", [], sampled, None),
        ("Describe both.", [grad(256, 256), grad(640, 480)], greedy, None),
        ("Count.", [], lfm.RequestOptions(max_new_tokens=30, repetition_penalty=1.05), json_g),
        (
            "Pick.",
            [grad(64, 1000)],
            lfm.RequestOptions(max_new_tokens=12, temperature=1.0, seed=3),
            lfm.Grammar.regex("(yes|no)[0-9]{1,3}"),
        ),
        ("Go", [], lfm.RequestOptions(max_new_tokens=5, repetition_penalty=1.0), None),
    ]


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
def test_batched_equals_one_at_a_time(model: str) -> None:
    batched = lfm.Engine.from_dir(
        MODELS / model, lfm.EngineOptions(intra_threads=1, providers=PROVIDERS, max_batch_size=8)
    )
    alone = lfm.Engine.from_dir(MODELS / model, lfm.EngineOptions(intra_threads=1, providers=PROVIDERS, batching="off"))
    reqs = requests()
    got: list[Any] = []
    for m, imgs, o, g in reqs:  # same options for the whole batch call: submit one by one
        got.append(batched._submit(m, imgs, o, g, False))
    results = [lfm.Generation._from_core(h.wait()) for h in got]
    for (m, imgs, o, g), r in zip(reqs, results):
        want = alone.generate(m, imgs, o, grammar=g)
        assert r.token_ids == want.token_ids, m
        assert r.finish_reason == want.finish_reason and r.text == want.text
    stats = batched.stats
    if batched.spec["attention_rows"] == "mask_lengths":
        assert stats["max_batch"] >= 3, stats
        assert stats["decoder_steps"] < stats["sequence_steps"], stats
    else:
        assert stats["max_batch"] == 1


def test_graph_semantics_are_detected() -> None:
    assert lfm.Engine.from_dir(MODELS / "tiny16-gqa").spec["attention_rows"] == "mask_lengths"
    assert lfm.Engine.from_dir(MODELS / "tiny16").spec["attention_rows"] == "cache_width"


def test_gqa_decoder_updates_its_cache_in_place() -> None:
    gqa, plain = lfm.Engine.from_dir(MODELS / "tiny16-gqa").spec, lfm.Engine.from_dir(MODELS / "tiny16").spec
    assert (gqa["kv_cache"], gqa["prefill"]) == ("in_place", "in_place")
    assert (plain["kv_cache"], plain["prefill"]) == ("copied", "one_run")


def with_call_dependent_decoder(dst: Path) -> None:
    """tiny16-gqa whose decoder adds half the mean of the call's input embeddings to each
    position: its output depends on which positions share a call (as a decoder that
    quantizes activations with per-call scales does), so chunks are not one run."""
    shutil.copytree(MODELS / "tiny16-gqa", dst)
    path = dst / "onnx" / "decoder_model_merged.onnx"
    m = onnx.load(path)
    g = m.graph
    cast = next(n for n in g.node if n.op_type == "Cast" and "inputs_embeds" in n.input)
    g.initializer.extend(
        [numpy_helper.from_array(np.array([1], np.int64), "t_axes"), numpy_helper.from_array(np.float32(0.5), "t_half")]
    )
    new = [
        helper.make_node("ReduceMean", ["inputs_embeds", "t_axes"], ["t_mean"], keepdims=1),
        helper.make_node("Mul", ["t_mean", "t_half"], ["t_shift"]),
        helper.make_node("Add", ["inputs_embeds", "t_shift"], ["t_embeds"]),
    ]
    cast.input[list(cast.input).index("inputs_embeds")] = "t_embeds"
    at = list(g.node).index(cast)
    for i, n in enumerate(new):
        g.node.insert(at + i, n)
    onnx.save(m, path)


def test_prefill_check_keeps_chunks_apart_when_calls_differ(tmp_path: Path) -> None:
    # The load check prefills a short prompt in place in chunks and in one run; where they
    # differ, long prompts are chunked as before (each chunk a new cache) and a warning
    # says why (the prefill window's check objects too: the prompt whole and in pieces
    # differ on such a decoder whatever the window does).
    with_call_dependent_decoder(tmp_path / "m")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e = lfm.Engine.from_dir(tmp_path / "m")
    said = [str(w.message) for w in caught if issubclass(w.category, lfm.LfmWarning)]
    assert any("prefilled without the in-place cache" in m for m in said), said
    assert (e.spec["kv_cache"], e.spec["prefill"]) == ("in_place", "chunked")
    plain = lfm.Engine.from_dir(MODELS / "tiny16-gqa")
    prompt = "Tell me a story about a cat. " * 40
    assert len(e.encode_prompt(prompt)) > 512
    assert np.abs(e.next_token_logits(prompt) - plain.next_token_logits(prompt)).max() > 1e-3


def test_in_place_cache_grows_past_its_headroom() -> None:
    # 300 steps: the pre-sized cache (longest row + 128 positions) is regrown twice
    # while rows of different lengths keep decoding.
    opts = lfm.RequestOptions(max_new_tokens=300, min_new_tokens=300, repetition_penalty=1.0)
    msgs = ["Hi", "A much longer prompt " * 6, "Medium prompt here " * 2]
    e = lfm.Engine.from_dir(
        MODELS / "tiny16-gqa", lfm.EngineOptions(intra_threads=1, providers=PROVIDERS, max_batch_size=4)
    )
    out = e.generate_batch(msgs, options=opts)
    ref = lfm.Engine.from_dir(
        MODELS / "tiny16-gqa", lfm.EngineOptions(intra_threads=1, providers=PROVIDERS, batching="off")
    )
    assert [g.token_ids for g in out] == [ref.generate(m, options=opts).token_ids for m in msgs]
    assert e.stats["max_batch"] == 3


def test_generate_batch_batches_on_gqa() -> None:
    e = lfm.Engine.from_dir(
        MODELS / "tiny16-gqa", lfm.EngineOptions(intra_threads=1, providers=PROVIDERS, max_batch_size=4)
    )
    msgs = [f"Prompt number {i} " + "x " * i for i in range(10)]
    out = e.generate_batch(msgs, options=lfm.RequestOptions(max_new_tokens=16, repetition_penalty=1.0))
    ref = lfm.Engine.from_dir(
        MODELS / "tiny16-gqa", lfm.EngineOptions(intra_threads=1, providers=PROVIDERS, batching="off")
    )
    assert [g.token_ids for g in out] == [
        ref.generate(m, options=lfm.RequestOptions(max_new_tokens=16, repetition_penalty=1.0)).token_ids for m in msgs
    ]  # type: ignore[union-attr]
    assert e.stats["max_batch"] == 4


@pytest.mark.parametrize("model", ["tiny16", "tiny6"])
def test_forced_batching_on_a_cache_width_decoder_stays_exact(model: str) -> None:
    """`batching="on"` batches a decoder that places positions by the cache width; its
    check must run on a step whose rows differ in length. Two prompts one token apart are
    equal in length at their first shared step (the shorter one took a step alone), so the
    check passed there and later padded steps decoded at wrong positions."""
    on = lfm.Engine.from_dir(MODELS / model, lfm.EngineOptions(intra_threads=1, batching="on", max_batch_size=8))
    off = lfm.Engine.from_dir(MODELS / model, lfm.EngineOptions(intra_threads=1, batching="off"))
    first = "Hi"
    n = len(off.encode_prompt(first))
    second = next(
        p for p in (first + c for c in "abcdefghijklmnopqrstuvwxyz .!?") if len(off.encode_prompt(p)) == n + 1
    )
    prompts = [first, second, "Tell me a story about a cat please now", "Hi there you all"]
    opts = lfm.RequestOptions(max_new_tokens=20, repetition_penalty=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lfm.LfmWarning)  # the fallback, once it is found out
        got = on.generate_batch(prompts, options=opts)
    for prompt, g in zip(prompts, got):
        assert isinstance(g, lfm.Generation), g
        assert g.token_ids == off.generate(prompt, options=opts).token_ids, prompt
