"""ImageAnalysisTask: schema, prompt rules and every rule of the strict parser
(reference: seed crate behaviour §2.3-2.4), plus a run on the tiny model."""

from __future__ import annotations

import json

import lfm
import numpy as np
import pytest
from conftest import MODELS
from lfm.image_analysis import EXTENSIONS, ROSTER, _has_lone_surrogate

ALL = lfm.ImageAnalysisTask(extensions=EXTENSIONS)
DEFAULT = lfm.ImageAnalysisTask()


def kind_of(task: lfm.ImageAnalysisTask, text: str) -> str | None:
    with pytest.raises(lfm.ParseError) as info:
        task.parse(text)
    return info.value.kind


def test_default_schema_exactly() -> None:
    assert DEFAULT.schema() == {
        "type": "object",
        "properties": {
            "description": {"type": "string", "maxLength": 120},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        },
        "required": ["description", "tags"],
        "additionalProperties": False,
    }


def test_all_extensions_schema_in_roster_order() -> None:
    s = ALL.schema()
    assert list(s["properties"]) == list(ROSTER) == s["required"]
    assert s["properties"]["scene"] == {"type": "string"}
    assert s["properties"]["emotion"]["maxItems"] == 3 and s["properties"]["subjects"]["maxItems"] == 8
    used = set()
    for p in s["properties"].values():
        used |= set(p)
    assert used <= {"type", "maxLength", "items", "maxItems"}


def test_caps_and_options() -> None:
    t = lfm.ImageAnalysisTask(
        extensions=["objects"], description_max_chars=40, tags_max_items=3, max_items={"objects": 2}
    )
    s = t.schema()["properties"]
    assert s["description"]["maxLength"] == 40 and s["tags"]["maxItems"] == 3 and s["objects"]["maxItems"] == 2
    with pytest.raises(lfm.InvalidOptionsError, match='unknown image-analysis extension "Scene"'):
        lfm.ImageAnalysisTask(extensions=["Scene"])
    with pytest.raises(lfm.InvalidOptionsError):
        lfm.ImageAnalysisTask(extensions=["description"])
    with pytest.raises(lfm.InvalidOptionsError):
        lfm.ImageAnalysisTask(description_max_chars=0)


def test_prompt_rules() -> None:
    p = DEFAULT.prompt()
    assert "ONLY a valid JSON object" in p and "at most 120 characters" in p and "at most 8" in p
    assert p.splitlines()[-7] == "Rules:" and p.count("\n- ") == 6 and not p.endswith("\n")
    assert "scene:" not in p
    pa = ALL.prompt()
    for f in ROSTER:
        assert f"\n{f}: " in pa
    assert "at most 3" not in pa  # list-extension caps are not printed


def test_parse_settles_fields() -> None:
    text = json.dumps(
        {
            "scene": " kitchen ",
            "description": " A cat sleeps. ",
            "subjects": ["cat", " cat", ""],
            "objects": ["a", "b", "c", "d", "e", "f", "g", "h", "i"],
            "actions": [],
            "emotion": ["calm"],
            "shot_type": " close-up",
            "lighting": [],
            "tags": ["cat", "Cat", "cat"],
            "categories": ["animals"],
        }
    )
    out = ALL.parse(text)
    assert out.scene == "kitchen" and out.description == "A cat sleeps." and out.shot_type == "close-up"
    assert out.subjects == ("cat",) and out.subjects_end == "whole"
    assert out.objects == tuple("abcdefgh") and out.objects_end == "capped"
    assert out.tags == ("cat", "Cat") and out.description_end == "unknown"
    assert out.to_dict()["objects"] == list("abcdefgh")


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        # max_items that was neither an int nor a dict used to be ignored (defaults kept)
        ({"max_items": 2.5}, "max_items", 2.5),
        ({"max_items": "3"}, "max_items", "3"),
        ({"max_items": [1, 2]}, "max_items", [1, 2]),
        ({"max_items": True}, "max_items", True),
        ({"max_items": 0}, "max_items", 0),
        ({"max_items": {"objects": 2.0}}, "max_items.objects", 2.0),
        ({"extensions": 5}, "extensions", 5),  # was a bare TypeError
        ({"accept_empty": "no"}, "accept_empty", "no"),  # was truthy, so accepted
        ({"tags_max_items": 2.5}, "tags_max_items", 2.5),
    ],
)
def test_wrong_option_types_are_refused(kwargs: dict[str, object], field: str, value: object) -> None:
    with pytest.raises(lfm.InvalidOptionsError) as info:
        lfm.ImageAnalysisTask(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field and info.value.value == repr(value)


def test_extensions_none_is_no_extensions() -> None:
    t = lfm.ImageAnalysisTask(extensions=None)
    assert t.extensions == frozenset() and t.schema() == DEFAULT.schema()


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("not json", "json"),
        ('{"description": "x", "tags": ["a"]} trailing', "json"),
        ('\u00a0{"description": "x", "tags": ["a"]}', "json"),
        ('{"description": "\\ud800", "tags": ["a"]}', "json"),
        ('{"description": "x", "tags": ["a"], "description": "y"}', "duplicate_field"),
        ('{"description": "x", "tags": ["a"], "scene": "s"}', "unknown_fields"),
        ('{"description": "x"}', "missing_fields"),
        ('{"description": null, "tags": ["a"]}', "missing_fields"),
        ('{"description": "x", "tags": "a, b"}', "missing_fields"),
        ('{"description": "x", "tags": ["a", 1]}', "missing_fields"),
        ('["description", "tags"]', "missing_fields"),
        ('{"description": "' + "x" * 121 + '", "tags": ["a"]}', "missing_fields"),
        ('{"description": "", "tags": []}', "no_usable_fields"),
        ('{"description": "x", "tags": []}', "no_usable_fields"),
        ('{"description": "x", "tags": ["a"', "json"),  # tags is not a list extension cut
        ('{"description": ' + "9" * 5000 + ', "tags": ["a"]}', "json"),  # over Python's int digit limit
        ("[" * 5000 + "]" * 5000, "json"),  # deeper than json's stack
    ],
)
def test_parse_rules(text: str, kind: str) -> None:
    if kind == "json" and text.endswith('["a"'):
        # Tags read to the cap like the other lists, so a cut tags list is repaired.
        out = DEFAULT.parse(text)
        assert out.tags == ("a",) and out.tags_end == "capped"
        return
    assert kind_of(DEFAULT, text) == kind


def test_surrogate_check_follows_any_depth_json_accepts() -> None:
    # json.loads accepts nesting close to the recursion limit; a recursive walk of it,
    # starting deeper in the stack, raised RecursionError.
    deep: list[object] = ["\ud800"]
    for _ in range(5000):
        deep = [deep]
    assert _has_lone_surrogate(deep) and not _has_lone_surrogate({"a": [[["b"]]]})


def test_missing_fields_lists_all_in_roster_order() -> None:
    with pytest.raises(lfm.ParseError) as info:
        ALL.parse('{"description": 3}')
    assert info.value.fields == tuple(f for f in ROSTER if f != "")


def test_accept_empty() -> None:
    t = lfm.ImageAnalysisTask(accept_empty=True)
    assert t.parse('{"description": "", "tags": []}').description == ""
    t2 = lfm.ImageAnalysisTask(extensions=["objects"])
    assert t2.parse('{"description": "", "tags": [], "objects": ["cup"]}').objects == ("cup",)


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ('{"description": "d", "tags": ["t"], "objects": [', ()),
        ('{"description": "d", "tags": ["t"], "objects": ["cup"', ("cup",)),
        ('{"description": "d", "tags": ["t"], "objects": ["cup",', ("cup",)),
        ('{"description": "d", "tags": ["t"], "objects": ["cup", "pl', ("cup",)),
    ],
)
def test_cut_list_is_repaired_and_capped(text: str, items: tuple[str, ...]) -> None:
    t = lfm.ImageAnalysisTask(extensions=["objects"])
    out = t.parse(text)
    assert out.objects == items and out.objects_end == "capped"


@pytest.mark.parametrize(
    "text",
    [
        '{"description": "d", "ta',
        '{"description": "d',
        '{"description": "d", "tags": ["t"], "objects": ["cup"], ',
        '{"description": "d", "tags": ["t"], "objects": [1',
        '{"description": "d", "tags": ["t"], "scene": ["x"',
    ],
)
def test_cuts_elsewhere_are_json_errors(text: str) -> None:
    t = lfm.ImageAnalysisTask(extensions=["objects"])
    assert kind_of(t, text) == "json"


def test_description_accounts() -> None:
    t = lfm.ImageAnalysisTask(description_max_chars=10)
    text = '{"description": "abcdefghij", "tags": ["x"]}'
    assert (
        t.parse_ended(text, {"description": lfm.FieldEnd(text="abcdefghij", closed_by="grammar")}).description_end
        == "ragged"
    )
    assert (
        t.parse_ended(text, {"description": lfm.FieldEnd(text="abcdefghij", closed_by="model")}).description_end
        == "ragged"
    )
    short = '{"description": "abc ", "tags": ["x"]}'
    out = t.parse_ended(short, {"description": lfm.FieldEnd(text="abc ", closed_by="model")})
    assert out.description == "abc" and out.description_end == "whole"
    assert (
        t.parse_ended(short, {"description": lfm.FieldEnd(text="other", closed_by="model")}).description_end
        == "unknown"
    )
    assert t.parse_ended(short, {}).description_end == "unknown"


def test_run_on_tiny_model() -> None:
    engine = lfm.Engine.from_dir(MODELS / "tiny16", lfm.EngineOptions(intra_threads=1))
    task = lfm.ImageAnalysisTask(extensions=["objects"], description_max_chars=30, accept_empty=True)
    img = np.zeros((48, 64, 3), np.uint8)
    outcomes = []
    for seed in range(6):
        opts = lfm.RequestOptions(max_new_tokens=300, temperature=1.0, seed=seed)
        try:
            out = engine.run(task, [img], opts)
        except lfm.ParseError as e:
            assert e.generation is not None
            outcomes.append(e.kind)
            continue
        assert isinstance(out, lfm.ImageAnalysis)
        assert len(out.description) <= 30
        assert out.description_end in ("whole", "ragged")
        assert (out.description_end == "ragged") == (
            len(out.description) == 30 or out.description != out.description.strip()
        )
        outcomes.append("ok")
    assert "ok" in outcomes, outcomes
