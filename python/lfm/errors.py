"""The exception hierarchy of lfm. Every error lfm raises on purpose is an ``LfmError``;
errors about a value a caller passed are also ``ValueError`` (and inference failures
``RuntimeError``), so existing ``except`` clauses keep working.

Where they apply, exceptions carry ``field`` (what was wrong), ``value`` (the offending
value, as text) and ``limit`` (what was allowed).
"""

from __future__ import annotations


class LfmError(Exception):
    """Root of lfm's exceptions."""

    field: str | None = None
    value: str | None = None
    limit: str | None = None


class ModelLoadError(LfmError):
    """A model folder lacks or mangles a required file; the message names the file."""

    path: str | None = None


class InvalidOptionsError(LfmError, ValueError):
    """An option is out of range or unknown."""


class ImageError(LfmError, ValueError):
    """An image cannot be decoded, is too large or too small, or cannot be tiled."""


class RequestRejectedError(LfmError, ValueError):
    """A request breaks a limit or is malformed (roles, placeholders, special tokens)."""


class PromptTooLongError(RequestRejectedError):
    """The prompt plus ``max_new_tokens`` does not fit the context window."""


class GrammarError(LfmError, ValueError):
    """A JSON Schema, Lark grammar or regex was rejected."""


class ParseError(LfmError, ValueError):
    """The model's output does not parse as the task expects. ``kind`` names the rule that
    failed (``"json"``, ``"duplicate_field"``, ``"missing_fields"``, ...), ``fields`` the
    fields involved, and ``generation`` holds the ``lfm.Generation`` when the text came
    from ``engine.run``."""

    generation: object | None = None
    kind: str | None = None
    fields: tuple[str, ...] = ()


class InferenceError(LfmError, RuntimeError):
    """ONNX Runtime failed or a graph produced unusable output."""


class InternalError(LfmError):
    """A bug in lfm (a broken invariant or a caught panic); please report it."""


class LfmWarning(UserWarning):
    """Something worked, but not as well as it could (e.g. batching was turned off
    because it changed results on this model)."""


__all__ = [
    "LfmWarning",
    "GrammarError",
    "ImageError",
    "InferenceError",
    "InternalError",
    "InvalidOptionsError",
    "LfmError",
    "ModelLoadError",
    "ParseError",
    "PromptTooLongError",
    "RequestRejectedError",
]
