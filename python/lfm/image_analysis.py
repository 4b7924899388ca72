"""The image-analysis preset: a capped one-sentence description and search tags, plus
optional fields (scene, subjects, objects, actions, emotion, shot type, lighting,
categories), under a fixed JSON Schema, with a strict parser."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from .errors import InvalidOptionsError
from .grammar import Grammar
from .tasks import FieldEnd, Task, parse_error

EXTENSIONS = ("scene", "subjects", "objects", "actions", "emotion", "shot_type", "lighting", "categories")
ROSTER = (
    "scene",
    "description",
    "subjects",
    "objects",
    "actions",
    "emotion",
    "shot_type",
    "lighting",
    "tags",
    "categories",
)
STRING_FIELDS = ("scene", "description", "shot_type")
LIST_FIELDS = ("subjects", "objects", "actions", "emotion", "lighting", "tags", "categories")
DEFAULT_MAX_ITEMS = {"subjects": 8, "objects": 8, "actions": 8, "emotion": 3, "lighting": 3, "categories": 3}

DescriptionEnd = Literal["unknown", "whole", "ragged"]
ListEnd = Literal["unknown", "whole", "capped"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageAnalysis:
    """What the image-analysis task returns. Absent fields are empty. ``description_end``
    says whether the model ended the description (``"whole"``) or the length cap cut it
    (``"ragged"``); each list's ``*_end`` whether it stopped short of its cap (``"whole"``)
    or reached it (``"capped"``)."""

    scene: str = ""
    description: str = ""
    subjects: tuple[str, ...] = ()
    objects: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    emotion: tuple[str, ...] = ()
    shot_type: str = ""
    lighting: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    description_end: DescriptionEnd = "unknown"
    subjects_end: ListEnd = "unknown"
    objects_end: ListEnd = "unknown"
    actions_end: ListEnd = "unknown"
    emotion_end: ListEnd = "unknown"
    lighting_end: ListEnd = "unknown"
    tags_end: ListEnd = "unknown"
    categories_end: ListEnd = "unknown"

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)
        }


_PARAGRAPHS = {
    "scene": "scene: the kind of place, as one short lowercase English label of one to three words, not a sentence.",
    "description": (
        "description: one concise English sentence of at most {n} characters on what stays visible across the "
        "frames: who is there, what they do, the setting, the overall mood or visual style. If readable text "
        "appears in the image, quote it first."
    ),
    "subjects": "subjects: an array of the distinct people or animals, each with what visibly sets it apart.",
    "objects": "objects: an array of the notable objects someone might search for.",
    "actions": "actions: an array of the actions that can be seen.",
    "emotion": "emotion: an array of words for the overall emotional tone.",
    "shot_type": "shot_type: the camera shot as one short lowercase English term of one or two words.",
    "lighting": "lighting: an array of words describing the light.",
    "tags": (
        "tags: an array of at most {t} short English search tags; prefer terms you are sure of, add useful "
        "synonyms and style words, and culture-specific terms only when the image supports them."
    ),
    "categories": "categories: an array of broad content categories, coarser than the tags.",
}

_RULES = """
Rules:
- Use only what the frames show.
- Prefer concrete visual facts to guesses.
- Write every array element as a lowercase, singular phrase of one to three words, without trailing punctuation.
- Do not repeat an element within an array.
- Leave a field empty (an empty string or array) when it does not apply.
- Output the JSON object alone: no markdown, no text around it."""


_COUNT = "an integer of at least 1"


def _invalid(field: str, value: object, expected: str, limit: str) -> InvalidOptionsError:
    err = InvalidOptionsError(f"invalid option `{field}`: got {value!r}, expected {expected}")
    err.field, err.value, err.limit = field, repr(value), limit
    return err


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class ImageAnalysisTask(Task[ImageAnalysis]):
    """Describes and tags images. ``extensions`` switches on optional fields (names from
    ``EXTENSIONS``; None is none); ``max_items`` caps a list extension (an int for all, or
    a dict per name); ``accept_empty`` accepts answers with nothing indexable."""

    def __init__(
        self,
        extensions: Iterable[str] | None = (),
        description_max_chars: int = 120,
        tags_max_items: int = 8,
        max_items: int | Mapping[str, int] | None = None,
        accept_empty: bool = False,
    ) -> None:
        if extensions is None:
            extensions = ()
        elif isinstance(extensions, str):
            extensions = (extensions,)
        elif not isinstance(extensions, Iterable):
            raise _invalid("extensions", extensions, "a list of extension names", ", ".join(EXTENSIONS))
        exts = set()
        for name in extensions:
            if name not in EXTENSIONS:
                err = InvalidOptionsError(
                    f'unknown image-analysis extension "{name}": expected one of {", ".join(EXTENSIONS)}'
                )
                err.field, err.value, err.limit = "extensions", str(name), ", ".join(EXTENSIONS)
                raise err
            exts.add(name)
        for field, value in (("description_max_chars", description_max_chars), ("tags_max_items", tags_max_items)):
            if not _is_count(value):
                raise _invalid(field, value, _COUNT, "at least 1")
        caps = dict(DEFAULT_MAX_ITEMS)
        if isinstance(max_items, Mapping):
            for k, v in max_items.items():
                if k not in caps:
                    err = InvalidOptionsError(f"max_items: {k!r} is not a list extension ({', '.join(caps)})")
                    err.field, err.value, err.limit = "max_items", str(k), ", ".join(caps)
                    raise err
                if not _is_count(v):
                    raise _invalid(f"max_items.{k}", v, _COUNT, "at least 1")
                caps[k] = v
        elif max_items is not None:  # anything else (a float, a str, a list) was once ignored
            if not _is_count(max_items):
                raise _invalid("max_items", max_items, f"{_COUNT}, or a dict of them by list extension", "at least 1")
            caps = dict.fromkeys(caps, max_items)
        if not isinstance(accept_empty, bool):  # a truthy string such as "no" would accept
            raise _invalid("accept_empty", accept_empty, "True or False", "True or False")
        caps["tags"] = tags_max_items
        self.extensions = frozenset(exts)
        self.description_max_chars = description_max_chars
        self.tags_max_items = tags_max_items
        self.max_items = caps
        self.accept_empty = accept_empty
        self.fields = tuple(f for f in ROSTER if f in ("description", "tags") or f in exts)
        self._schema = self._build_schema()
        self._grammar = Grammar.json_schema(self._schema)

    def _build_schema(self) -> dict[str, Any]:
        props: dict[str, Any] = {}
        for f in self.fields:
            if f in ("scene", "shot_type"):
                props[f] = {"type": "string"}
            elif f == "description":
                props[f] = {"type": "string", "maxLength": self.description_max_chars}
            else:
                props[f] = {"type": "array", "items": {"type": "string"}, "maxItems": self.max_items[f]}
        return {"type": "object", "properties": props, "required": list(self.fields), "additionalProperties": False}

    def schema(self) -> dict[str, Any]:
        """The JSON Schema the answer follows."""
        copy: dict[str, Any] = json.loads(json.dumps(self._schema))
        return copy

    def prompt(self) -> str:
        head = (
            "Analyze the following video keyframes, shown in order; they belong to one scene.\n\n"
            "Answer with ONLY a valid JSON object that has exactly the following fields:\n"
        )
        body = "".join(
            _PARAGRAPHS[f].format(n=self.description_max_chars, t=self.tags_max_items) + "\n" for f in self.fields
        )
        return head + body + _RULES

    def grammar(self) -> Grammar:
        return self._grammar

    def parse(self, text: str) -> ImageAnalysis:
        return self._parse(text, None)

    def parse_ended(self, text: str, ends: Mapping[str, FieldEnd]) -> ImageAnalysis:
        return self._parse(text, ends.get("description"))

    # -- parsing ---------------------------------------------------------------------------

    def _parse(self, text: str, description_end: FieldEnd | None) -> ImageAnalysis:
        cut_list: str | None = None
        try:
            pairs = _load_top_level(text)
        except _Truncated as t:
            repaired = self._repair_cut_list(text)
            if repaired is None:
                raise parse_error(f"cannot parse model output: not JSON ({t})", "json") from None
            text, cut_list = repaired
            try:
                pairs = _load_top_level(text)
            except (_Truncated, _NotJson) as e:
                raise parse_error(f"cannot parse model output: not JSON ({e})", "json") from None
        except _NotJson as e:
            raise parse_error(f"cannot parse model output: not JSON ({e})", "json") from None
        if not isinstance(pairs, _Pairs):
            raise parse_error(
                f"cannot parse model output: missing fields {', '.join(self.fields)}", "missing_fields", self.fields
            )
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise parse_error(f"cannot parse model output: duplicate field {k!r}", "duplicate_field", (k,))
            seen.add(k)
        values = dict(pairs)
        unknown = tuple(k for k, _ in pairs if k not in self.fields)
        if unknown:
            raise parse_error(
                f"cannot parse model output: unknown fields {', '.join(unknown)}", "unknown_fields", unknown
            )
        missing = []
        for f in self.fields:
            v = values.get(f)
            if f in STRING_FIELDS:
                ok = isinstance(v, str) and not (f == "description" and len(v) > self.description_max_chars)
            else:
                ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
            if not ok:
                missing.append(f)
        if missing:
            raise parse_error(
                f"cannot parse model output: missing or unusable fields {', '.join(missing)}",
                "missing_fields",
                tuple(missing),
            )
        out: dict[str, Any] = {}
        for f in self.fields:
            v = values[f]
            if f == "description":
                out[f], out["description_end"] = self._settle_description(v, description_end)
            elif f in STRING_FIELDS:
                out[f] = v.strip()
            else:
                cap = self.max_items[f]
                capped = len(v) >= cap or f == cut_list
                kept: list[str] = []
                for item in v[:cap]:
                    item = item.strip()
                    if item and item not in kept:
                        kept.append(item)
                out[f] = tuple(kept)
                out[f"{f}_end"] = "capped" if capped else "whole"
        result = ImageAnalysis(**out)
        if not self.accept_empty:
            indexable = (result.description and result.tags) or result.subjects or result.objects or result.actions
            if not indexable:
                raise parse_error(
                    "cannot parse model output: nothing usable (no description and tags, no subjects, objects or actions)",
                    "no_usable_fields",
                )
        return result

    def _settle_description(self, raw: str, end: FieldEnd | None) -> tuple[str, DescriptionEnd]:
        if end is None or end.text != raw:
            return raw.strip(), "unknown"
        if len(raw) == self.description_max_chars:
            return raw.strip(), "ragged"
        if end.closed_by == "model":
            return raw.strip(), "whole"
        return raw.strip(), "unknown"

    def _repair_cut_list(self, text: str) -> tuple[str, str] | None:
        """A text cut inside an asked list: keep its whole items, close the list and the
        object. Returns (repaired text, list name) or None when the cut is elsewhere."""
        state = _scan(text)
        if state is None:
            return None
        key, end = state
        lists = [f for f in self.fields if f in LIST_FIELDS]
        if key not in lists:
            return None
        return text[:end] + "]}", key


class _NotJson(ValueError):
    pass


class _Pairs(list):  # type: ignore[type-arg]
    """A top-level object as its (key, value) pairs, in order."""


class _Truncated(ValueError):
    pass


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _has_lone_surrogate(value: Any) -> bool:
    # A work list, not recursion: json.loads accepts nesting a recursive walk, starting
    # deeper in the stack, could not follow.
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return True
        elif isinstance(v, list):
            todo.extend(v)
        elif isinstance(v, dict):
            todo.extend(v)
            todo.extend(v.values())
    return False


def _load_top_level(text: str) -> Any:
    """The top-level value; an object comes back as its (key, value) pairs, in order, so
    duplicates stay visible. Raises _Truncated when the text ends early, _NotJson otherwise."""
    top: list[Any] = []

    def hook(pairs: list[tuple[str, Any]]) -> Any:
        top.append(pairs)
        return dict(pairs)

    try:
        value = json.loads(text, object_pairs_hook=hook)
    except json.JSONDecodeError as e:
        if e.msg.startswith("Unterminated string") or e.pos >= len(text.rstrip(" \t\n\r")):
            raise _Truncated(str(e)) from None
        raise _NotJson(str(e)) from None
    except (ValueError, RecursionError) as e:  # an integer over Python's digit limit; too deep
        raise _NotJson(str(e)) from None
    if _has_lone_surrogate(value):
        raise _NotJson("a lone UTF-16 surrogate escape")
    if isinstance(value, dict):
        return _Pairs(top[-1])
    return value


def _scan(text: str) -> tuple[str, int] | None:
    """If ``text`` is valid JSON up to its end and stops inside a top-level member's array
    of strings, returns (member key, offset just after its last whole item)."""
    stack: list[str] = []
    i, n = 0, len(text)
    key: str | None = None
    expect_key = False
    array_key: str | None = None
    last_end = 0
    while i < n:
        c = text[i]
        if c in " \t\n\r":
            i += 1
            continue
        depth = len(stack)
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if j >= n:  # cut inside a string
                return (array_key, last_end) if depth == 2 and stack[-1] == "[" and array_key else None
            s = text[i : j + 1]
            i = j + 1
            if depth == 1 and expect_key:
                try:
                    key = json.loads(s)
                except ValueError:
                    return None
            elif depth == 2 and stack[-1] == "[" and array_key:
                last_end = i
            continue
        if c in "{[":
            if depth == 1 and c == "[" and not expect_key:
                array_key, last_end = key, i + 1
            elif depth >= 2 and array_key and stack[-1] == "[":
                array_key = None  # a non-string item: no repair
            stack.append(c)
            expect_key = c == "{" and len(stack) == 1
            i += 1
            continue
        if c in "}]":
            if not stack:
                return None
            stack.pop()
            if len(stack) == 1:
                array_key = None
            i += 1
            continue
        if c == ":" and depth == 1:
            expect_key = False
        elif c == "," and depth == 1:
            expect_key = True
        elif c == ",":
            pass
        elif depth == 2 and stack[-1] == "[" and array_key:
            array_key = None  # a number, literal or other non-string item
        i += 1
    if len(stack) == 2 and stack[-1] == "[" and array_key:
        return array_key, last_end
    return None


__all__ = ["EXTENSIONS", "ImageAnalysis", "ImageAnalysisTask"]
