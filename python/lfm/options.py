"""Option objects: keyword-only, frozen, validated by the Rust core, and round-tripping
through plain dicts (``to_dict`` / ``from_dict``)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import numpy as np

from . import _lfm
from .errors import InvalidOptionsError

_T = TypeVar("_T", bound="_Options")

# Sections whose fields the core names with the section's prefix (`limits.context_tokens`),
# also when the section is validated alone; Rust's options::NESTED_SECTIONS.
_NESTED_SECTIONS = ("image_budget", "limits")
_DEFAULT_PROVIDERS = ("cpu",)


def _invalid(field: str, value: object, limit: str) -> InvalidOptionsError:
    err = InvalidOptionsError(f"invalid option `{field}`: got {value}, expected {limit}")
    err.field, err.value, err.limit = field, str(value), limit
    return err


def _python_number(value: Any) -> Any:
    """A numpy number (``np.int64(8)``, an array's element) as the Python number it holds;
    anything else unchanged."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _json_ready(value: Any, field: str) -> Any:
    """``value`` as data JSON (the way options reach Rust) can carry: numpy numbers become
    Python numbers; NaN, infinity and other types (Decimal, complex, objects) are refused,
    naming ``field``."""
    value = _python_number(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid(field, value, "a finite number")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _invalid(field, repr(value), "text (a lone surrogate is not)") from None
        return value
    if value is None or isinstance(value, (int, float)):
        return value
    if isinstance(value, Mapping):
        return {k: _json_ready(v, f"{field}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v, field) for v in value]
    raise _invalid(field, repr(value), "an int, float, bool, str, list or dict")


def _validated(kind: str, data: Mapping[str, Any]) -> dict[str, Any]:
    prefix = f"{kind}." if kind in _NESTED_SECTIONS else ""
    ready = {k: _json_ready(v, f"{prefix}{k}") for k, v in data.items()}
    normalised: dict[str, Any] = json.loads(_lfm.validate_options(kind, json.dumps(ready)))
    return normalised


def _str_tuple(value: Any, field: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A str or an iterable of str as a tuple (the core checks the items); None is the default."""
    if value is None:
        return default
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (Mapping, bytes, bytearray)) or not isinstance(value, Iterable):
        raise _invalid(field, type(value).__name__, "a str or a list of str")
    return tuple(value)


class _Options:
    """Shared dict round-trip; subclasses are frozen keyword-only dataclasses."""

    _kind: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, _Options):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls: type[_T], data: Mapping[str, Any]) -> _T:
        """Builds the options from a dict; unknown keys are refused, naming the allowed ones."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = [k for k in data if k not in known]
        if unknown:
            # The core refuses them, naming the allowed keys (the values do not matter).
            _validated(cls._kind, dict.fromkeys(unknown))
        # The constructor normalises the values as it does for keywords (None for a default,
        # numpy numbers) before the core validates them.
        return cls(**dict(data))

    def _check(self) -> None:
        # The object keeps the Python number a numpy one stands for, as the core reads it.
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, _python_number(getattr(self, f.name)))
        _validated(self._kind, self.to_dict())


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageBudget(_Options):
    """How many tokens an image may become and how it is tiled (the model's defaults)."""

    _kind = "image_budget"
    min_image_tokens: int = 64
    max_image_tokens: int = 256
    min_tiles: int = 2
    max_tiles: int = 10
    use_thumbnail: bool = True
    max_pixels_tolerance: float = 2.0

    def __post_init__(self) -> None:
        self._check()

    @classmethod
    def quality(cls) -> ImageBudget:
        """The model's own preprocessing (same as the default)."""
        return cls()

    @classmethod
    def fast(cls) -> ImageBudget:
        """Fewer tokens: up to 4 tiles, no thumbnail, single tiles of at most 64 tokens.
        Medium images (640x480 and up) still become four full 512x512 tiles."""
        return cls(min_image_tokens=32, max_image_tokens=64, min_tiles=2, max_tiles=4, use_thumbnail=False)

    @classmethod
    def single_tile(cls, max_image_tokens: int = 64) -> ImageBudget:
        """Never tiles: one smart-resized image of about ``max_image_tokens`` tokens (as in
        transformers, small images upscaled to the minimum may get a few more: 100x75 gets 70
        of 64)."""
        return cls(
            min_image_tokens=max(1, min(64, max_image_tokens)),
            max_image_tokens=max_image_tokens,
            min_tiles=1,
            max_tiles=1,
            use_thumbnail=False,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits(_Options):
    """Admission limits, checked before any image is decoded or template rendered."""

    _kind = "limits"
    max_messages: int = 1024
    max_content_parts: int = 8192
    max_text_bytes: int = 2_048_000
    max_image_side: int = 16384
    max_decoded_image_bytes: int = 256 * 1024 * 1024
    context_tokens: int = 128_000

    def __post_init__(self) -> None:
        self._check()


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestOptions(_Options):
    """Decoding options of one request. ``temperature=0`` is greedy decoding. ``stop``
    strings end the output where one first appears (it is left out of the text); a request
    with a grammar takes none, since the grammar decides where constrained output ends.
    ``timeout_s`` (at most a year) ends the request with ``finish_reason="cancelled"``,
    also while it waits for its turn. Numbers may be numpy numbers; ``stop=None`` is none."""

    _kind = "request"
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.05
    seed: int | None = None
    stop: tuple[str, ...] = ()
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _str_tuple(self.stop, "stop", ()))
        self._check()

    @classmethod
    def model_card(cls, **overrides: Any) -> RequestOptions:
        """The model card's sampling preset: temperature 0.1, min_p 0.15, penalty 1.05."""
        base: dict[str, Any] = {"temperature": 0.1, "min_p": 0.15, "repetition_penalty": 1.05}
        base.update(overrides)
        return cls(**base)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineOptions(_Options):
    """Options fixed when an engine is loaded."""

    _kind = "engine"
    variant: str | Mapping[str, str] = "fp32"
    providers: tuple[str, ...] = _DEFAULT_PROVIDERS
    intra_threads: int | None = None
    inter_threads: int | None = None
    image_budget: ImageBudget = dataclasses.field(default_factory=ImageBudget)
    limits: Limits = dataclasses.field(default_factory=Limits)
    max_batch_size: int = 8
    #: "auto": batch decoder steps when the model's attention takes row lengths from the
    #: mask (checked on first use); "on": always try (still checked); "off": never.
    batching: str = "auto"

    def __post_init__(self) -> None:
        section: type[_Options]
        for name, section in (("image_budget", ImageBudget), ("limits", Limits)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, section.from_dict(value))
            elif not isinstance(value, section):
                # Refused here: the core would read a list's items into the fields by position.
                raise _invalid(name, type(value).__name__, f"an lfm.{section.__name__} or a dict")
        object.__setattr__(self, "providers", _str_tuple(self.providers, "providers", _DEFAULT_PROVIDERS))
        self._check()


def coerce(cls: type[_T], value: _T | Mapping[str, Any] | None) -> _T:
    """``options=`` takes the options object, a plain dict, or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls.from_dict(value)
    raise TypeError(f"expected {cls.__name__}, a dict or None, got {type(value).__name__}")


__all__ = ["EngineOptions", "ImageBudget", "Limits", "RequestOptions"]
