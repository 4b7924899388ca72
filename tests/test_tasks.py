"""Grammar construction, the Task contract, JsonTask (dict and pydantic), and engine.run's
handling of cut output."""

from __future__ import annotations

import json
from typing import Any

import lfm
import pydantic
import pytest
from conftest import MODELS


@pytest.fixture(scope="module")
def engine() -> lfm.Engine:
    return lfm.Engine.from_dir(MODELS / "tiny16", lfm.EngineOptions(intra_threads=1))


@pytest.mark.parametrize(
    "make",
    [
        lambda: lfm.Grammar.regex("("),
        lambda: lfm.Grammar.regex("[z-a]"),
        lambda: lfm.Grammar.lark("start: missing_rule"),
        lambda: lfm.Grammar.lark("start: /unterminated"),
        lambda: lfm.Grammar.json_schema("{not json"),
        lambda: lfm.Grammar.json_schema({"type": "array", "uniqueItems": True}),
        lambda: lfm.Grammar.json_schema({"type": "string", "format": "no-such-format"}),
        lambda: lfm.Grammar.json_schema({"type": "wat"}),
        lambda: lfm.Grammar.json_schema({"oneOf": [{"type": "integer"}, {"type": "number"}]}),
        lambda: lfm.Grammar.json_schema({"$ref": "#/$defs/missing"}),
        # Not text, not JSON, or past what Python's json reads: GrammarError, not a bare
        # UnicodeEncodeError / ValueError / RecursionError.
        lambda: lfm.Grammar.regex("a\ud800"),
        lambda: lfm.Grammar.lark('start: "\ud800"'),
        lambda: lfm.Grammar.json_schema({"type": "number", "maximum": float("nan")}),
        lambda: lfm.Grammar.json_schema('{"const": ' + "1" * 5000 + "}"),
        lambda: lfm.Grammar.json_schema("[" * 5000 + "]" * 5000),
    ],
)
def test_bad_grammars_raise_at_construction(make: Any) -> None:
    with pytest.raises(lfm.GrammarError) as info:
        make()
    assert isinstance(info.value, ValueError) and str(info.value)


def test_unsupported_keyword_is_named() -> None:
    with pytest.raises(lfm.GrammarError, match="uniqueItems"):
        lfm.Grammar.json_schema({"type": "array", "uniqueItems": True})


def test_grammar_forms_are_equal() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert lfm.Grammar.json_schema(schema) == lfm.Grammar.json_schema(json.dumps(schema))
    assert lfm.Grammar.regex("[0-9]+").kind == "regex"
    with pytest.raises(TypeError):
        lfm.Grammar.json_schema(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        lfm.Grammar.json_schema(int)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "9" * 5000,  # over Python's int digit limit: was a bare ValueError
        "[" * 5000 + "]" * 5000,  # deeper than json's stack: was a RecursionError
    ],
)
def test_json_task_unreadable_json_is_a_parse_error(text: str) -> None:
    with pytest.raises(lfm.ParseError) as info:
        lfm.JsonTask({"type": "array"}, "p").parse(text)
    assert info.value.kind == "json"


class Point(pydantic.BaseModel):
    x: int
    y: int
    label: str = pydantic.Field(max_length=6)


def test_json_task_returns_a_validated_model(engine: lfm.Engine) -> None:
    task = lfm.JsonTask(Point, "Give a point.")
    results = []
    for seed in range(4):
        try:
            results.append(engine.run(task, options=lfm.RequestOptions(max_new_tokens=120, temperature=1.0, seed=seed)))
        except lfm.ParseError as e:
            assert e.kind == "incomplete" and e.generation.finish_reason == "length"  # type: ignore[union-attr]
    assert results and all(isinstance(p, Point) and len(p.label) <= 6 for p in results)


def test_json_task_with_dict_schema(engine: lfm.Engine) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    out = engine.run(lfm.JsonTask(schema, "ok?"), options={"max_new_tokens": 40})
    assert isinstance(out, dict) and set(out) == {"ok"}


def test_run_cut_raises_parse_error_with_generation(engine: lfm.Engine) -> None:
    task = lfm.JsonTask({"type": "array", "items": {"type": "integer"}, "minItems": 40}, "numbers")
    with pytest.raises(lfm.ParseError) as info:
        engine.run(task, options={"max_new_tokens": 5})
    gen = info.value.generation
    assert isinstance(gen, lfm.Generation) and gen.finish_reason == "length" and len(gen.token_ids) == 5


class Echo(lfm.Task[str]):
    """A user-written task: a regex grammar and a trivial parser."""

    def prompt(self) -> str:
        return "Say a colour."

    def grammar(self) -> lfm.Grammar:
        return lfm.Grammar.regex("(red|green|blue)")

    def parse(self, text: str) -> str:
        return text.upper()


def test_custom_task(engine: lfm.Engine) -> None:
    assert engine.run(Echo(), options={"max_new_tokens": 8}) in {"RED", "GREEN", "BLUE"}


def test_run_builds_images_then_prompt(engine: lfm.Engine) -> None:
    import numpy as np

    img = np.zeros((32, 32, 3), np.uint8)
    ids = engine.encode_prompt(Echo().prompt(), [img])
    want = engine.encode_prompt(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Say a colour."}]}], [img]
    )
    assert ids == want


def test_field_ends_reported(engine: lfm.Engine) -> None:
    schema = {
        "type": "object",
        "properties": {"s": {"type": "string", "maxLength": 3}},
        "required": ["s"],
        "additionalProperties": False,
    }
    seen = set()
    for seed in range(8):
        gen = engine.generate(
            "x",
            options=lfm.RequestOptions(max_new_tokens=30, temperature=1.0, seed=seed),
            grammar=lfm.Grammar.json_schema(schema),
        )
        if gen.finish_reason != "grammar":
            continue
        end = gen.field_ends["s"]
        assert end.text == json.loads(gen.text)["s"]
        if len(end.text) == 3:
            assert end.closed_by == "grammar"  # only the quote was allowed at the cap
        else:
            assert end.closed_by == "model"
        seen.add(end.closed_by)
    assert seen


def test_seed_reproduces_across_engine_instances() -> None:
    a = lfm.Engine.from_dir(MODELS / "tiny16")
    b = lfm.Engine.from_dir(MODELS / "tiny16")
    opts = lfm.RequestOptions(max_new_tokens=20, temperature=1.0, top_p=0.9, min_p=0.05, seed=1234)
    assert a.generate("hi", options=opts).token_ids == b.generate("hi", options=opts).token_ids
    other = a.generate(
        "hi", options=lfm.RequestOptions(max_new_tokens=20, temperature=1.0, top_p=0.9, min_p=0.05, seed=99)
    )
    assert other.token_ids != a.generate("hi", options=opts).token_ids
    # Without a seed, sampled requests differ from one call to the next.
    free = lfm.RequestOptions(max_new_tokens=20, temperature=1.0)
    assert len({a.generate("hi", options=free).token_ids for _ in range(3)}) > 1


def test_a_grammar_past_llguidances_limits_mid_generation_is_a_grammar_error(engine: lfm.Engine) -> None:
    """llguidance builds its lexer lazily: `a{1000000}` compiles, then fails after the
    first token ("too many expressions"). That is the grammar's fault: GrammarError."""
    with pytest.raises(lfm.GrammarError, match="too many expressions"):
        engine.generate("x", options={"max_new_tokens": 4}, grammar=lfm.Grammar.regex("a{1000000}"))
