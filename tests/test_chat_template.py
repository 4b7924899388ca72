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


# --- messages as transformers' apply_chat_template normalises them -------------------


def test_keys_set_to_none_are_dropped_as_transformers_does() -> None:
    """APIs send ``tool_calls=None`` or ``content=None``; transformers drops such keys
    before rendering (the template would write an empty tool call list)."""
    render = lfm.chat.apply_chat_template
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    with_none = [
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": "ok", "tool_calls": None},
    ]
    assert render(with_none) == render(plain)
    assert "<|tool_call_start|>" not in render(with_none)


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_reasoning_under_other_names_renders_as_thinking(key: str) -> None:
    """transformers fills ``thinking`` (what the template reads) from ``reasoning_content``
    or ``reasoning``."""
    render = lfm.chat.apply_chat_template
    turn = [{"role": "user", "content": "hi"}]
    want = render([*turn, {"role": "assistant", "content": "A", "thinking": "R"}], add_generation_prompt=False)
    got = render([*turn, {"role": "assistant", "content": "A", key: "R"}], add_generation_prompt=False)
    assert got == want and "R" in got


def test_message_objects_with_model_dump_are_read_as_dicts() -> None:
    """The OpenAI SDK's messages are pydantic models; transformers reads their dicts."""
    pydantic = pytest.importorskip("pydantic")

    class Message(pydantic.BaseModel):  # type: ignore[misc]
        role: str
        content: str | None = None
        tool_calls: list[Any] | None = None

    render = lfm.chat.apply_chat_template
    assert render([Message(role="user", content="hi")]) == render([{"role": "user", "content": "hi"}])


def test_image_parts_may_carry_a_path_or_url(engine16: Any, tmp_path: pathlib.Path) -> None:
    """Image parts in the forms transformers' processors read: ``path``/``url`` on an
    image part, OpenAI's ``image_url`` (a path, file:// or base64 data: URL)."""
    import base64

    from conftest import IMAGES

    image = IMAGES / "grad_64x48.png"
    data = base64.b64encode(image.read_bytes()).decode()

    def prompt(part: dict[str, Any]) -> list[int]:
        ids: list[int] = engine16.encode_prompt([{"role": "user", "content": [part, {"type": "text", "text": "x"}]}])
        return ids

    want = engine16.encode_prompt(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}], [image]
    )
    for part in [
        {"type": "image", "path": str(image)},
        {"type": "image", "url": image.as_uri()},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        {"type": "image_url", "image_url": str(image)},
    ]:
        assert prompt(part) == want, part
    with pytest.raises(lfm.RequestRejectedError, match="does not download") as info:
        prompt({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}})
    assert info.value.field == "image_url"
    assert "<image>" in engine16.apply_chat_template(
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}]
    )


def test_reasoning_given_once_counts_once(engine16: Any) -> None:
    """Reasoning given as ``reasoning`` becomes ``thinking``, not a second and third copy
    counted against ``Limits.max_text_bytes``."""
    small = lfm.Engine.from_dir(MODELS / "tiny16", lfm.EngineOptions(limits=lfm.Limits(max_text_bytes=3000)))
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A", "reasoning": "r" * 1200}]
    assert small.encode_prompt(turns)
