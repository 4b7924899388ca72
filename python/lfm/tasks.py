"""The task contract: a prompt, a grammar, and a parser for what the grammar produces."""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Generic, Literal, TypeVar

from .errors import ParseError
from .grammar import Grammar

Out = TypeVar("Out")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FieldEnd:
    """How a top-level string of a JSON answer ended: ``closed_by="model"`` when the model
    ended it although the grammar allowed more, ``"grammar"`` when only the closing quote
    was allowed (a ``maxLength`` cap reached)."""

    text: str
    closed_by: Literal["model", "grammar"]


class Task(abc.ABC, Generic[Out]):
    """A constrained task. ``engine.run(task, images)`` sends one user turn (the images,
    then ``prompt()``), decodes under ``grammar()`` and returns ``parse(text)``."""

    @abc.abstractmethod
    def prompt(self) -> str: ...

    @abc.abstractmethod
    def grammar(self) -> Grammar: ...

    @abc.abstractmethod
    def parse(self, text: str) -> Out: ...

    def parse_ended(self, text: str, ends: Mapping[str, FieldEnd]) -> Out:
        """Like ``parse``, also told how each top-level string field ended (JSON Schema
        grammars only). The default ignores ``ends``."""
        return self.parse(text)


def parse_error(message: str, kind: str, fields: tuple[str, ...] = ()) -> ParseError:
    err = ParseError(message)
    err.kind = kind
    err.fields = fields
    return err


class JsonTask(Task[Any]):
    """Extracts JSON: the answer follows ``schema`` (a dict, JSON string or pydantic model
    class) and comes back as a dict, or as a validated model instance for a model class."""

    def __init__(self, schema: Mapping[str, Any] | str | type, prompt: str) -> None:
        self._model = schema if isinstance(schema, type) else None
        self._grammar = Grammar.json_schema(schema)
        self._prompt = prompt

    def prompt(self) -> str:
        return self._prompt

    def grammar(self) -> Grammar:
        return self._grammar

    def parse(self, text: str) -> Any:
        if self._model is not None:
            try:
                return self._model.model_validate_json(text)  # type: ignore[attr-defined]
            except ValueError as e:  # pydantic's ValidationError is a ValueError
                raise parse_error(f"cannot parse model output: {e}", "validation") from None
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:
            # Besides JSONDecodeError: an integer over Python's digit limit is a ValueError,
            # nesting deeper than the json module's stack a RecursionError.
            raise parse_error(f"cannot parse model output: not JSON: {e}", "json") from None


__all__ = ["FieldEnd", "JsonTask", "Task"]
