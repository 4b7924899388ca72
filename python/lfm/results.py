"""Result types of a generation."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from .tasks import FieldEnd

FinishReason = Literal["stop", "length", "grammar", "cancelled"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Usage:
    """Token counts: the prompt (image tokens included), its image tokens, the completion."""

    prompt_tokens: int
    image_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timings:
    """Wall-clock seconds per stage."""

    preprocess_s: float
    vision_s: float
    prefill_s: float
    decode_s: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Generation:
    """One generation: the text (special tokens skipped), the new token ids (EOS
    excluded), why it ended, token counts and timings."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    #: With a JSON Schema grammar: how each top-level string field ended.
    field_ends: Mapping[str, FieldEnd] = dataclasses.field(default_factory=dict)

    @classmethod
    def _from_core(cls, d: dict[str, Any]) -> Generation:
        return cls(
            text=d["text"],
            token_ids=tuple(d["token_ids"]),
            finish_reason=d["finish_reason"],
            usage=Usage(
                prompt_tokens=d["prompt_tokens"],
                image_tokens=d["image_tokens"],
                completion_tokens=d["completion_tokens"],
            ),
            timings=Timings(
                preprocess_s=d["preprocess_s"],
                vision_s=d["vision_s"],
                prefill_s=d["prefill_s"],
                decode_s=d["decode_s"],
            ),
            field_ends={k: FieldEnd(text=t, closed_by=c) for k, t, c in d.get("field_ends", ())},
        )


__all__ = ["FinishReason", "Generation", "Timings", "Usage"]
