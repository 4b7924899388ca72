"""Chat prompts rendered with the model's chat template, exactly as transformers'
``apply_chat_template`` renders them."""

from __future__ import annotations

import json
from typing import Any

from . import _lfm
from ._messages import Messages, template_json


def apply_chat_template(
    messages: Messages,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    *,
    chat_template: str | None = None,
) -> str:
    """Renders ``messages`` (HF chat format; image parts become ``<image>``) with the
    bundled LFM2.5-VL chat template, or with ``chat_template`` when given."""
    tools_json = None if tools is None else json.dumps(tools, ensure_ascii=False)
    rendered: str = _lfm.apply_chat_template(template_json(messages), tools_json, add_generation_prompt, chat_template)
    return rendered


__all__ = ["apply_chat_template"]
