"""``lfm.Engine``: load a model and generate."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from . import _lfm, _ort
from ._images import ImageLike
from ._messages import Messages, prepare, template_json
from .errors import LfmError
from .options import EngineOptions, RequestOptions, coerce
from .results import Generation


class Engine:
    """A loaded LFM2-VL model. Thread-safe; every long call releases the GIL."""

    def __init__(self, core: Any, options: EngineOptions) -> None:
        self._core = core
        self._options = options
        self._pid = os.getpid()

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], options: EngineOptions | Mapping[str, Any] | None = None) -> Engine:
        """Loads a model folder: the Hugging Face layout (graphs under ``onnx/``) or a flat
        one. Needs the three graphs and ``tokenizer.json``."""
        opts = coerce(EngineOptions, options)
        _ort.ensure_loaded()
        core = _lfm.Engine.from_dir(os.fspath(path), json.dumps(opts.to_dict()))
        return cls(core, opts)

    @property
    def options(self) -> EngineOptions:
        return self._options

    @property
    def spec(self) -> dict[str, Any]:
        """Widths read from the graphs (hidden size, vocab, layer kinds, cache shapes)."""
        spec: dict[str, Any] = self._check_process().spec()
        return spec

    def _check_process(self) -> Any:
        if os.getpid() != self._pid:
            raise LfmError(
                "this Engine was created in another process: ONNX Runtime does not survive fork(); "
                "create the Engine in the child, or use the 'spawn' start method"
            )
        return self._core

    def generate(
        self,
        messages: Messages,
        images: Iterable[ImageLike] = (),
        options: RequestOptions | Mapping[str, Any] | None = None,
    ) -> Generation:
        """Generates a reply. ``messages`` is a str (one user turn: images, then the text)
        or HF chat messages; ``images`` bind in order to image parts without an image."""
        opts = coerce(RequestOptions, options)
        text, imgs = prepare(messages, images)
        d = self._check_process().generate(text, imgs, json.dumps(opts.to_dict()))
        return Generation._from_core(d)

    def encode_prompt(self, messages: Messages, images: Iterable[ImageLike] = ()) -> list[int]:
        """The full prompt ids after image expansion."""
        text, imgs = prepare(messages, images)
        ids: list[int] = self._check_process().encode_prompt(text, imgs)
        return ids

    def next_token_logits(self, messages: Messages, images: Iterable[ImageLike] = ()) -> np.ndarray:
        """The raw logits row (float32, full width) for the token after the prompt."""
        text, imgs = prepare(messages, images)
        row: np.ndarray = self._check_process().next_token_logits(text, imgs)
        return row

    def apply_chat_template(
        self, messages: Messages, tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True
    ) -> str:
        """The prompt this model's chat template renders (before image expansion)."""
        rendered: str = self._check_process().apply_chat_template(
            template_json(messages), None if tools is None else json.dumps(tools, ensure_ascii=False), add_generation_prompt
        )
        return rendered


__all__ = ["Engine"]
