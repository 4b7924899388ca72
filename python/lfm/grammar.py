"""Grammars that constrain generation: JSON Schema, Lark, or a regex (always a full
match). Each one is compiled by llguidance when constructed, so a bad grammar raises
``lfm.GrammarError`` before any model work."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from . import _lfm
from .errors import GrammarError

GrammarKind = Literal["json_schema", "lark", "regex"]


def _invalid(reason: str) -> GrammarError:
    return GrammarError(f"invalid grammar: {reason}")


def _schema_json(schema: object) -> str:
    try:
        return json.dumps(schema, allow_nan=False)
    except ValueError as e:  # NaN or infinity: not JSON
        raise _invalid(f"the JSON Schema holds a number JSON cannot: {e}") from None
    except RecursionError:
        raise _invalid("the JSON Schema nests deeper than Python can write") from None


class Grammar:
    """A compiled grammar. Build one with ``Grammar.json_schema``, ``Grammar.lark`` or
    ``Grammar.regex``."""

    __slots__ = ("_kind", "_source")

    def __init__(self, kind: GrammarKind, source: str) -> None:
        if kind not in ("json_schema", "lark", "regex"):
            raise ValueError(f"unknown grammar kind {kind!r}; expected json_schema, lark or regex")
        if not isinstance(source, str):
            raise TypeError(f"grammar source must be a str, got {type(source).__name__}")
        try:
            source.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _invalid(f"it contains {source[e.start : e.end]!r}, a lone surrogate, which is not text") from None
        _lfm.check_grammar(kind, source)
        self._kind: GrammarKind = kind
        self._source = source

    @property
    def kind(self) -> GrammarKind:
        return self._kind

    @property
    def source(self) -> str:
        """The schema (as JSON text), Lark source or regex."""
        return self._source

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str | type) -> Grammar:
        """From a JSON Schema given as a dict, a JSON string or a pydantic model class.
        Standard keywords llguidance cannot enforce (e.g. ``uniqueItems``) are refused."""
        if isinstance(schema, type):
            to_schema = getattr(schema, "model_json_schema", None)
            if to_schema is None:
                raise TypeError(f"{schema.__name__} is not a pydantic model class")
            schema = to_schema()
        if isinstance(schema, str):
            try:
                parsed = json.loads(schema)
            except (ValueError, RecursionError) as e:  # not JSON, or past Python's int/depth limits
                raise _invalid(f"the JSON Schema is not JSON lfm can read: {e}") from None
            source = _schema_json(parsed)
        elif isinstance(schema, Mapping):
            source = _schema_json(schema)
        else:
            raise TypeError(
                f"a JSON Schema must be a dict, a JSON string or a pydantic model class, got {type(schema).__name__}"
            )
        return cls("json_schema", source)

    @classmethod
    def lark(cls, source: str) -> Grammar:
        """From a Lark grammar (llguidance's dialect; the start rule is ``start``)."""
        return cls("lark", source)

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """From a regular expression; the whole output must match it."""
        return cls("regex", pattern)

    def _spec(self) -> tuple[str, str]:
        return (self._kind, self._source)

    def __repr__(self) -> str:
        src = self._source if len(self._source) <= 60 else self._source[:57] + "..."
        return f"Grammar.{self._kind}({src!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grammar) and self._spec() == other._spec()

    def __hash__(self) -> int:
        return hash(self._spec())


__all__ = ["Grammar", "GrammarKind"]
