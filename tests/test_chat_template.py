"""Chat template rendering against transformers' apply_chat_template
(golden/chat_template.json; SPEC §3: byte-identical)."""

from __future__ import annotations

import copy
import datetime
import pathlib
import re
from collections.abc import Callable
from typing import Any

import lfm
import lfm.chat
import pytest
from conftest import MODELS, golden

CT = golden("chat_template.json")
CASES = CT["cases"]
CASE_IDS = [c["name"] for c in CASES]
ROOT = pathlib.Path(__file__).resolve().parent.parent
GEN_TEMPLATE = ROOT / "rust" / "lfm-core" / "assets" / "chat_template.jinja"
ENGINE_CASES = {"user_image_then_text", "multi_turn", "tools", "assistant_tool_calls", "unicode_emoji"}


def _today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime(CT["date_format"])


def _render_and_check(case: dict[str, Any], render: Callable[[], str]) -> str:
    """Renders (on a deep copy of the inputs, so nothing can leak between cases) and
    compares with the golden, accepting the UTC date from just before or just after."""
    before = _today()
    text = render()
    after = _today()
    candidates = {case["expected"].replace(CT["date_placeholder"], d) for d in (before, after)}
    assert text in candidates, f"{case['name']}: got {text!r}, expected {sorted(candidates)[0]!r}"
    return text


def _undated(text: str) -> str:
    """``text`` with the UTC date (of either side of a possible midnight) blanked."""
    for d in {_today(), (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)).strftime(CT["date_format"])}:
        text = text.replace(d, CT["date_placeholder"])
    return text


def test_golden_shape() -> None:
    assert CT["date_placeholder"] == "__DATE__"
    assert len(CASES) >= 19
    assert any(CT["date_placeholder"] in c["expected"] for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_apply_chat_template_matches_golden(case: dict[str, Any]) -> None:
    messages, tools = copy.deepcopy(case["messages"]), copy.deepcopy(case["tools"])
    _render_and_check(
        case,
        lambda: lfm.chat.apply_chat_template(
            messages, add_generation_prompt=case["add_generation_prompt"], tools=tools
        ),
    )
    # The inputs are not mutated.
    assert messages == case["messages"] and tools == case["tools"]


def test_generation_tag_template_exists() -> None:
    text = GEN_TEMPLATE.read_text(encoding="utf-8")
    assert re.search(r"\{%-?\s*generation\s*-?%\}", text)
    assert re.search(r"\{%-?\s*endgeneration\s*-?%\}", text)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_generation_tag_template_renders_same(case: dict[str, Any]) -> None:
    template = GEN_TEMPLATE.read_text(encoding="utf-8")
    kwargs = dict(add_generation_prompt=case["add_generation_prompt"], tools=copy.deepcopy(case["tools"]))
    default = _render_and_check(case, lambda: lfm.chat.apply_chat_template(copy.deepcopy(case["messages"]), **kwargs))
    tagged = _render_and_check(
        case,
        lambda: lfm.chat.apply_chat_template(copy.deepcopy(case["messages"]), chat_template=template, **kwargs),
    )
    assert _undated(tagged) == _undated(default)


@pytest.fixture(scope="module")
def engine16() -> Any:
    pytest.importorskip("onnxruntime")
    return lfm.Engine.from_dir(MODELS / "tiny16", lfm.EngineOptions(intra_threads=1))


@pytest.mark.parametrize("case", [c for c in CASES if c["name"] in ENGINE_CASES], ids=lambda c: c["name"])
def test_engine_apply_chat_template(engine16: Any, case: dict[str, Any]) -> None:
    text = _render_and_check(
        case,
        lambda: engine16.apply_chat_template(
            copy.deepcopy(case["messages"]),
            tools=copy.deepcopy(case["tools"]),
            add_generation_prompt=case["add_generation_prompt"],
        ),
    )
    module_level = lfm.chat.apply_chat_template(
        copy.deepcopy(case["messages"]), add_generation_prompt=case["add_generation_prompt"], tools=case["tools"]
    )
    assert _undated(text) == _undated(module_level)


def test_engine_cases_present() -> None:
    assert ENGINE_CASES <= set(CASE_IDS)


def test_chat_template_argument_is_used() -> None:
    # Guards the tagged-template comparison above: a custom template really replaces the
    # bundled one.
    out = lfm.chat.apply_chat_template(
        [{"role": "user", "content": "Hello!"}],
        chat_template="X{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}",
    )
    assert out == "X[user:Hello!]"


_NEST = "{% set ns = namespace(v=1) %}{% for i in range(20000) %}{% set ns.v = [ns.v] %}{% endfor %}"


def test_deeply_nested_value_tojson_is_an_error() -> None:
    # Segfaulted: tojson recursed once per level with no limit.
    with pytest.raises(lfm.RequestRejectedError, match="nested more than"):
        lfm.chat.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=_NEST + "{{ ns.v | tojson }}")


def test_deeply_nested_value_prints() -> None:
    # Printing such a value overflowed the stack too (minijinja's Display recurses).
    out = lfm.chat.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=_NEST + "{{ ns.v }}")
    assert out == "[" * 20000 + "1" + "]" * 20000


def test_runaway_template_stops() -> None:
    spin = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(lfm.RequestRejectedError, match="fuel"):
        lfm.chat.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=spin)
