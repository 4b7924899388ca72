"""Chat messages as the Rust core takes them: JSON text with image parts reduced to
``{"type": "image"}``, plus the images in prompt order."""

from __future__ import annotations

import base64
import binascii
import json
import os
import urllib.parse
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
        msg = as_transformers_reads(m)
        content = msg.get("content")
        if isinstance(content, Sequence) and not isinstance(content, str):
            new_parts = []
            for part in content:
                if is_image_part(part):
                    source = image_part_source(part)
                    if source is not None:
                        ordered.append(to_core(source))
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


def snapshot(messages: Messages, images: Images) -> tuple[Messages, Images]:
    """The containers a request reads (the message list, each message and its content
    list, the image list) copied, not the images themselves: for a request read later, on
    another thread (``agenerate``)."""
    if not isinstance(messages, str) and isinstance(messages, Sequence):
        messages = [_copy_message(m) for m in messages]
    if images is not None and not is_one_image(images) and not isinstance(images, Mapping):
        images = list(images)
    return messages, images


def _copy_message(message: Any) -> Any:
    if not isinstance(message, Mapping):
        return message
    copied = dict(message)
    content = copied.get("content")
    if isinstance(content, list):
        copied["content"] = [dict(p) if isinstance(p, Mapping) else p for p in content]
    return copied


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
        msg = as_transformers_reads(m)
        content = msg.get("content")
        if isinstance(content, Sequence) and not isinstance(content, str):
            msg["content"] = [{"type": "image"} if is_image_part(p) else p for p in content]
        out.append(msg)
    return messages_json(out)


# Where a message may carry its reasoning, in transformers' order of preference.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def as_transformers_reads(message: object) -> dict[str, Any]:
    """A message as transformers' ``apply_chat_template`` hands it to the template: a
    pydantic model (the OpenAI SDK's messages) as its dict, keys whose value is None
    dropped (APIs send ``content=None`` or ``tool_calls=None``, which the template would
    render), and the reasoning under ``thinking`` (what the template reads) when it came
    as ``reasoning_content`` or ``reasoning``. (transformers also copies it back to
    ``reasoning_content``, which the template does not read; a copy would only count
    twice against ``Limits.max_text_bytes``.)"""
    if not isinstance(message, Mapping):
        dump = getattr(message, "model_dump", None)
        if not callable(dump):
            raise TypeError(f"each message must be a dict, got {type(message).__name__}")
        message = dump()
        if not isinstance(message, Mapping):
            raise TypeError(f"{type(message).__name__}.model_dump() did not give a dict")
    msg = {k: v for k, v in message.items() if v is not None}
    if "thinking" not in msg:
        given = next((k for k in _REASONING_KEYS if k in msg), None)
        if given is not None:
            msg["thinking"] = msg.pop(given)
    return msg


def is_image_part(part: object) -> bool:
    """An image content part: HF's ``{"type": "image", ...}`` or OpenAI's ``image_url``."""
    return isinstance(part, Mapping) and part.get("type") in ("image", "image_url")


def image_part_source(part: Mapping[str, Any]) -> Any:
    """The image a part carries, in the forms transformers' processors read: ``"image"``,
    ``"path"`` or ``"url"`` on an image part, ``{"image_url": {"url": ...}}`` on OpenAI's;
    None when it carries none (it takes the next of ``images=``)."""
    if part.get("type") == "image_url":
        ref = part.get("image_url")
        return _from_url(ref.get("url") if isinstance(ref, Mapping) else ref)
    for key in ("image", "path"):
        if part.get(key) is not None:
            return part[key]
    return _from_url(part["url"]) if part.get("url") is not None else None


def _from_url(url: object) -> str | bytes:
    """A local path, a ``file://`` URL or a base64 ``data:`` URL as an image source; lfm
    downloads nothing, so web URLs are refused."""

    def refuse(why: str) -> RequestRejectedError:
        return rejected(
            f"image URL {str(url)[:80]!r}: {why}", "image_url", str(url)[:200], "a path, file:// or data: URL"
        )

    if not isinstance(url, str):
        raise refuse("not a string")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise refuse("only base64 data URLs are read")
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise refuse(f"not base64 ({e})") from None
    if url.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(url).path)
    if "://" in url:
        raise refuse("lfm does not download images; fetch it and pass the bytes or a path")
    return url
