"""The LFM2.5-VL-450M files bundled with lfm (tokenizer, chat template, configs; LFM Open
License v1.0, see rust/lfm-core/assets/NOTICE.md) and the check of a model folder against
them, which catches prompt-envelope drift."""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from . import _lfm
from .errors import ModelLoadError


def bundled_file(name: str) -> bytes:
    """One bundled file: tokenizer.json, tokenizer_config.json, chat_template.jinja,
    config.json, preprocessor_config.json or processor_config.json."""
    data: bytes = _lfm.bundled_file(name)
    return data


def _normalise_template(text: str) -> str:
    # transformers' {% generation %} markers render nothing; a leading comment header
    # (some re-exports add one) is not part of the template either.
    text = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", text)
    text = re.sub(r"^\s*(\{#.*?#\}\s*)+", "", text, flags=re.S)
    return re.sub(r"\s+", "", text)


def _is_bundled_model(config: dict[str, Any]) -> bool:
    real = json.loads(bundled_file("config.json"))["text_config"]
    mine = config.get("text_config", config)
    keys = ("hidden_size", "vocab_size", "num_hidden_layers", "num_key_value_heads")
    return all(mine.get(k) == real.get(k) for k in keys)


def _special_token_diff(mine: dict[str, Any]) -> str:
    real = {t["content"]: t["id"] for t in json.loads(bundled_file("tokenizer.json"))["added_tokens"]}
    theirs = {t["content"]: t["id"] for t in mine.get("added_tokens", [])}
    for content, id_ in real.items():
        if theirs.get(content) != id_:
            return f"special token {content!r} is id {theirs.get(content)} here, {id_} in LFM2.5-VL-450M's tokenizer"
    return "the vocabulary or merges differ"


def check_against_bundled(path: str) -> None:
    """Raises ModelLoadError when a folder whose config is LFM2.5-VL-450M's carries a
    different tokenizer or chat template than the real model (other models pass)."""
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return
    if not isinstance(config, dict) or not _is_bundled_model(config):
        return
    tok_path = os.path.join(path, "tokenizer.json")
    if os.path.exists(tok_path):
        with open(tok_path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).digest() != hashlib.sha256(bundled_file("tokenizer.json")).digest():
            try:
                why = _special_token_diff(json.loads(data))
            except ValueError:
                why = "it is not valid JSON"
            err = ModelLoadError(
                f"cannot load model file {tok_path}: it differs from the LFM2.5-VL-450M tokenizer bundled with lfm "
                f"({why}); prompts would not match the model. Pass strict=False to load it anyway."
            )
            err.path = tok_path
            raise err
    template_path = os.path.join(path, "chat_template.jinja")
    template = None
    if os.path.exists(template_path):
        try:
            with open(template_path, encoding="utf-8") as f:
                template = f.read()
        except UnicodeDecodeError:
            err = ModelLoadError(f"cannot load model file {template_path}: not UTF-8 text")
            err.path = template_path
            raise err from None
    else:
        try:
            with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
            template_path = os.path.join(path, "tokenizer_config.json")
        except (OSError, ValueError):
            template = None
    if isinstance(template, str):
        want = _normalise_template(bundled_file("chat_template.jinja").decode())
        if _normalise_template(template) != want:
            err = ModelLoadError(
                f"cannot load model file {template_path}: its chat template differs from LFM2.5-VL-450M's "
                "(bundled with lfm); prompts would not match the model. Pass strict=False to load it anyway."
            )
            err.path = template_path
            raise err
