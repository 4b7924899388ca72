"""Chat messages as the Rust core takes them: JSON text with image parts reduced to
``{"type": "image"}``, plus the images in prompt order."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ._images import ImageLike, to_core
from .errors import RequestRejectedError

Messages = str | Sequence[Mapping[str, Any]]
# A request's images; None is none.
Images = Iterable[ImageLike] | None


def rejected(message: str, field: str, value: object, limit: object) -> RequestRejectedError:
    err = RequestRejectedError(message)
    err.field, err.value, err.limit = field, str(value), str(limit)
    return err


def is_one_image(value: object) -> bool:
    """Whether ``value`` is a single ImageLike (which iterating would take apart: a path
    into characters, bytes into ints, an array into rows). A 4-D array is a stack of images."""
    if isinstance(value, (str, bytes, bytearray, memoryview, os.PathLike)):
        return True
    if isinstance(value, np.ndarray):
        return value.ndim != 4
    return type(value).__module__.startswith("PIL.")


def check_image_list(images: object, argument: str = "images") -> None:
    """Refuses a single image (or a mapping) where a list of images is expected."""
    if is_one_image(images) or isinstance(images, Mapping):
        what = "a dict" if isinstance(images, Mapping) else f"a single image ({type(images).__name__})"
        raise rejected(
            f"{argument} must be a list of images, got {what}; wrap one image in a list: {argument}=[image]",
            argument,
            type(images).__name__,
            "a list of images",
        )


def prepare(messages: Messages, images: Images = ()) -> tuple[str, list[Any]]:
    """Binds images to image parts and returns ``(messages_json, core_images)``.

    A ``str`` is one user turn: the images, in order, then the text. Otherwise each image
    part takes its own ``"image"`` when it has one, else the next of ``images``.
    ``images=None`` is no images.
    """
    if images is None:
        images = ()
    check_image_list(images)
    pool = list(images)
    if isinstance(messages, str):
        parts: list[dict[str, Any]] = [{"type": "image"} for _ in pool]
        parts.append({"type": "text", "text": messages})
        messages = [{"role": "user", "content": parts}]
    if isinstance(messages, Mapping) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a str or a list of {'role', 'content'} dicts")
    ordered: list[Any] = []
    pending = iter(pool)
    used = 0
    out: list[Any] = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise TypeError(f"each message must be a dict, got {type(m).__name__}")
        msg = dict(m)
        content = msg.get("content")
        if isinstance(content, Sequence) and not isinstance(content, str):
            new_parts = []
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "image":
                    if part.get("image") is not None:
                        ordered.append(to_core(part["image"]))
                    else:
                        try:
                            ordered.append(to_core(next(pending)))
                        except StopIteration:
                            raise rejected(
                                f"the messages have more image parts than the {len(pool)} images given",
                                "images",
                                len(pool),
                                "one image per image part",
                            ) from None
                        used += 1
                    new_parts.append({"type": "image"})
                else:
                    new_parts.append(dict(part) if isinstance(part, Mapping) else part)
            msg["content"] = new_parts
        out.append(msg)
    if used != len(pool):
        raise rejected(
            f"{len(pool)} images were given but only {used} image parts without an image take them",
            "images",
            len(pool),
            used,
        )
    return messages_json(out), ordered


def messages_json(messages: list[Any]) -> str:
    """Messages as the JSON text the core reads. Objects JSON cannot hold are a
    ``TypeError``; values it holds only by extension (NaN, infinity) and strings that are
    not text (lone surrogates: UTF-8 cannot carry them) are refused as request errors."""
    try:
        text = json.dumps(messages, ensure_ascii=False, allow_nan=False)
    except TypeError as e:
        raise TypeError(f"messages must be JSON-serialisable apart from images: {e}") from None
    except ValueError as e:  # NaN or infinity
        raise rejected(
            f"messages must hold finite numbers only: {e}", "messages", "NaN or infinity", "finite numbers"
        ) from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end]
        raise rejected(
            f"messages contain {bad!r}, a lone surrogate, which is not text (UTF-8 cannot carry it)",
            "messages",
            repr(bad),
            "valid Unicode text",
        ) from None
    return text


def template_json(messages: Messages) -> str:
    """Messages for rendering only: image payloads dropped, nothing bound or checked."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    out = []
    for m in messages:
        msg = dict(m)
        content = msg.get("content")
        if isinstance(content, Sequence) and not isinstance(content, str):
            msg["content"] = [
                {"type": "image"} if isinstance(p, Mapping) and p.get("type") == "image" else p for p in content
            ]
        out.append(msg)
    return messages_json(out)
