"""``lfm.Engine``: load a model and generate."""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import json
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from . import _async, _lfm, _ort
from ._batch import Progress, collect, submit_all
from ._images import ImageLike
from ._messages import Images, Messages, is_one_image, prepare, rejected, snapshot, template_json
from .bundled import check_against_bundled
from .errors import LfmError, LfmWarning, ParseError
from .grammar import Grammar
from .options import EngineOptions, RequestOptions, coerce
from .results import Generation
from .tasks import Out, Task


class Engine:
    """A loaded LFM2-VL model. Thread-safe; every long call releases the GIL."""

    def __init__(self, core: Any, options: EngineOptions) -> None:
        self._core = core
        self._options = options
        self._pid = os.getpid()

    @classmethod
    def from_dir(
        cls,
        path: str | os.PathLike[str],
        options: EngineOptions | Mapping[str, Any] | None = None,
        *,
        strict: bool = True,
    ) -> Engine:
        """Loads a model folder: the Hugging Face layout (graphs under ``onnx/``) or a flat
        one. Needs the three graphs and ``tokenizer.json``. When the folder's config is
        LFM2.5-VL-450M's, ``strict`` checks its tokenizer and chat template against the
        copies bundled with lfm and explains any difference (``strict=False`` skips that)."""
        opts = coerce(EngineOptions, options)
        if strict:
            check_against_bundled(os.fspath(path))
        _ort.ensure_loaded()
        core = _lfm.Engine.from_dir(os.fspath(path), json.dumps(opts.to_dict()))
        return cls._loaded(core, opts)

    @classmethod
    def from_onnx_dir(
        cls, path: str | os.PathLike[str], options: EngineOptions | Mapping[str, Any] | None = None
    ) -> Engine:
        """Loads the three graphs alone (from ``path`` or ``path/onnx``); the tokenizer,
        chat template and configs are the LFM2.5-VL-450M files bundled with lfm."""
        opts = coerce(EngineOptions, options)
        _ort.ensure_loaded()
        core = _lfm.Engine.from_onnx_dir(os.fspath(path), json.dumps(opts.to_dict()))
        return cls._loaded(core, opts)

    @classmethod
    def _loaded(cls, core: Any, opts: EngineOptions) -> Engine:
        for message in core.load_warnings():
            warnings.warn(message, LfmWarning, stacklevel=3)
        return cls(core, opts)

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        variant: str | Mapping[str, str] | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        options: EngineOptions | Mapping[str, Any] | None = None,
    ) -> Engine:
        """Loads ``repo_id`` (e.g. ``"LiquidAI/LFM2.5-VL-450M-ONNX"``) through the Hugging
        Face Hub, downloading only the files ``variant`` needs (``variant`` wins over
        ``options.variant``). Honours ``HF_HUB_OFFLINE`` and the HF cache. Needs
        ``huggingface_hub``."""
        from .loaders import download

        opts = coerce(EngineOptions, options)
        if variant is not None:
            opts = dataclasses.replace(opts, variant=variant)
        path = download(repo_id, opts.variant, revision=revision, cache_dir=cache_dir)
        return cls.from_dir(path, opts)

    @property
    def options(self) -> EngineOptions:
        return self._options

    @property
    def spec(self) -> dict[str, Any]:
        """What the engine read from the graphs: widths (hidden size, vocab, layer kinds,
        cache shapes) and how it runs them: ``attention_rows`` (``"mask_lengths"``: rows of
        different lengths batch exactly; ``"cache_width"``: sequences decode one at a time),
        ``kv_cache`` (``"in_place"`` or ``"copied"`` per batched step), ``prefill``
        (how a prompt over 512 positions runs: ``"in_place"``, in chunks appended to one
        pre-sized cache, which a check at load found exact; ``"chunked"``, each chunk
        returning a new cache; ``"one_run"``, whole, for decoders that place positions by
        the cache width or quantize activations per call),
        ``vision_attention`` (``"fused"``: the float32 vision encoder's attention and GELU run
        as ONNX Runtime's fused kernels; ``"as_exported"``), ``last_position_ops`` (how
        many of the decoder's operators, from the last layer's feed-forward block to the LM
        head, run for a prompt's last position only; 0: the decoder runs as exported) and
        ``prefill_window_ops`` (how many, feeding only a last convolution layer, run for
        the few last positions that layer reads, which a check at load found exact; 0:
        none)."""
        spec: dict[str, Any] = self._check_process().spec()
        return spec

    @property
    def stats(self) -> dict[str, int]:
        """Scheduler counters: ``decoder_steps`` (a batched step counts once),
        ``sequence_steps`` and ``max_batch``."""
        stats: dict[str, int] = self._check_process().stats()
        return stats

    def _check_process(self) -> Any:
        _refuse_after_fork(self._pid, "Engine")
        return self._core

    def generate(
        self,
        messages: Messages,
        images: Images = (),
        options: RequestOptions | Mapping[str, Any] | None = None,
        grammar: Grammar | None = None,
    ) -> Generation:
        """Generates a reply. ``messages`` is a str (one user turn: images, then the text)
        or HF chat messages; ``images`` bind in order to image parts without an image.
        With ``grammar``, the output follows it (``finish_reason="grammar"`` once complete,
        ``"length"`` with the partial text when ``max_new_tokens`` cut it)."""
        opts = coerce(RequestOptions, options)
        text, imgs = prepare(messages, images)
        d = self._check_process().generate(text, imgs, json.dumps(opts.to_dict()), _grammar_spec(grammar))
        return Generation._from_core(d)

    def _submit(self, messages: Messages, images: Images, options: Any, grammar: Grammar | None, text: bool) -> Any:
        opts = coerce(RequestOptions, options)
        msg, imgs = prepare(messages, images)
        return self._check_process().stream(msg, imgs, json.dumps(opts.to_dict()), _grammar_spec(grammar), text)

    def generate_batch(
        self,
        messages: Sequence[Messages],
        images: Sequence[Images] | None = None,
        options: RequestOptions | Mapping[str, Any] | None = None,
        grammar: Grammar | None = None,
        progress: Progress = False,
    ) -> list[Generation | Exception]:
        """Generates for many conversations at once (their decoder steps run batched).
        ``images[i]`` goes with ``messages[i]``. Results are in input order; a failing item
        holds its exception and the rest complete. ``progress=True`` shows a progress bar
        (or pass a callable(done, total)). Ctrl-C cancels the whole batch."""
        if isinstance(messages, (str, bytes, bytearray, Mapping)):
            what = "one message dict" if isinstance(messages, Mapping) else f"a {type(messages).__name__}"
            raise rejected(
                f"messages must be a list of conversations (each a str or a list of message dicts), got {what}; "
                "for one conversation use generate(), or wrap it in a list: generate_batch([messages])",
                "messages",
                type(messages).__name__,
                "a list of conversations",
            )
        if images is not None and (is_one_image(images) or isinstance(images, Mapping)):
            raise rejected(
                f"images must be a list with one list of images per conversation, got a {type(images).__name__}; "
                "e.g. images=[[image_a], [image_b]]",
                "images",
                type(images).__name__,
                "a list of image lists",
            )
        if images is not None and len(images) != len(messages):
            raise rejected(
                f"images has {len(images)} entries for {len(messages)} conversations; give one (possibly empty) "
                "list of images per conversation",
                "images",
                len(images),
                len(messages),
            )
        handles = submit_all(
            range(len(messages)),
            lambda i: self._submit(messages[i], images[i] if images is not None else (), options, grammar, False),
        )
        return collect(handles, lambda i, g: g, progress, self._core)

    def run_batch(
        self,
        task: Task[Out],
        items: Sequence[ImageLike | Sequence[ImageLike]],
        options: RequestOptions | Mapping[str, Any] | None = None,
        progress: Progress = False,
    ) -> list[Out | Exception]:
        """Runs ``task`` on many items (each an image, or a sequence of images for a
        multi-image item). Results are in input order; a failing item holds its exception
        (``ParseError`` for cut output) and the rest complete."""
        if is_one_image(items) or isinstance(items, Mapping):
            raise rejected(
                f"items must be a list of items (each an image or a list of images), got a {type(items).__name__}; "
                "for one image use run(), or wrap it in a list: run_batch(task, [image])",
                "items",
                type(items).__name__,
                "a list of items",
            )
        prompt, grammar = task.prompt(), task.grammar()

        def submit(item: ImageLike | Sequence[ImageLike]) -> Any:
            imgs: list[ImageLike] = list(item) if isinstance(item, (list, tuple)) else [item]  # type: ignore[list-item]
            return self._submit(prompt, imgs, options, grammar, False)

        handles = submit_all(items, submit)
        return collect(handles, lambda i, g: _parse(task, g), progress, self._core)

    async def agenerate(
        self,
        messages: Messages,
        images: Images = (),
        options: RequestOptions | Mapping[str, Any] | None = None,
        grammar: Grammar | None = None,
    ) -> Generation:
        """``generate`` for asyncio: awaits without blocking the event loop; cancelling the
        task cancels the request. The waiting happens on lfm's own threads, leaving the
        loop's default executor (``asyncio.to_thread``) free."""
        threads = _async.pool()
        # Submitted off the loop too: converting the images (decoding a lazily opened PIL
        # image, copying a large array) can take a while. The arguments' containers are
        # copied here, so that changing them once this returns does not change the request.
        messages, images = snapshot(messages, images)
        submitting = threads.submit(self._submit, messages, images, options, grammar, False)
        try:
            handle = await asyncio.wrap_future(submitting)
        except BaseException:
            # Cancelled during the submission, which still runs: cancel what it starts.
            submitting.add_done_callback(_cancel_submitted)
            raise
        try:
            d = await asyncio.wrap_future(threads.submit(handle.wait))
        except BaseException:
            handle.cancel()
            raise
        return Generation._from_core(d)

    async def arun(
        self,
        task: Task[Out],
        images: Images = (),
        options: RequestOptions | Mapping[str, Any] | None = None,
    ) -> Out:
        """``run`` for asyncio."""
        gen = await self.agenerate(task.prompt(), images, options, grammar=task.grammar())
        return _parse(task, gen)

    def stream(
        self,
        messages: Messages,
        images: Images = (),
        options: RequestOptions | Mapping[str, Any] | None = None,
        grammar: Grammar | None = None,
    ) -> TextStream:
        """Like ``generate``, yielding text as it is produced (never splitting a character;
        the pieces join to ``generate(...).text``). After the last piece, the iterator's
        ``generation`` holds the whole ``Generation``. In a ``with`` block, leaving it early
        (``break``, an error, Ctrl-C) cancels the request::

            with engine.stream("Tell me a story.") as pieces:
                for piece in pieces:
                    print(piece, end="")
        """
        return TextStream(self._submit(messages, images, options, grammar, True))

    def run(
        self,
        task: Task[Out],
        images: Images = (),
        options: RequestOptions | Mapping[str, Any] | None = None,
    ) -> Out:
        """Runs a task: one user turn (the images, then ``task.prompt()``), decoded under
        ``task.grammar()``, parsed by the task. Output cut by ``max_new_tokens`` (or a
        timeout) raises ``ParseError`` with the partial ``Generation`` as ``.generation``."""
        gen = self.generate(task.prompt(), images, options, grammar=task.grammar())
        return _parse(task, gen)

    def encode_prompt(self, messages: Messages, images: Images = ()) -> list[int]:
        """The full prompt ids after image expansion."""
        text, imgs = prepare(messages, images)
        ids: list[int] = self._check_process().encode_prompt(text, imgs)
        return ids

    def next_token_logits(self, messages: Messages, images: Images = ()) -> np.ndarray:
        """The raw logits row (float32, full width) for the token after the prompt."""
        text, imgs = prepare(messages, images)
        row: np.ndarray = self._check_process().next_token_logits(text, imgs)
        return row

    def apply_chat_template(
        self, messages: Messages, tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True
    ) -> str:
        """The prompt this model's chat template renders (before image expansion)."""
        rendered: str = self._check_process().apply_chat_template(
            template_json(messages),
            None if tools is None else json.dumps(tools, ensure_ascii=False),
            add_generation_prompt,
        )
        return rendered


def _refuse_after_fork(pid: int, what: str) -> None:
    """Refuses an engine or stream made before a fork(): the child has none of the threads
    that would answer it (a stream read there waited forever)."""
    if os.getpid() != pid:
        raise LfmError(
            f"this {what} was created in another process: ONNX Runtime does not survive fork(); "
            "create the Engine in the child, or use the 'spawn' start method (a forked child of a "
            "process with an Engine should end with os._exit(): ONNX Runtime can hang its normal exit)"
        )


# At exit, daemon threads may still be generating: every request is cancelled and the
# schedulers get a few seconds to go idle, so that none runs ONNX Runtime while the
# interpreter and ONNX Runtime tear down (it printed kernel errors then).
atexit.register(_lfm.shutdown, 5.0)


def _cancel_submitted(submitting: Future[Any]) -> None:
    if not submitting.cancelled() and submitting.exception() is None:
        submitting.result().cancel()


def _parse(task: Task[Out], gen: Generation) -> Out:
    """The task's output for a finished generation; cut output raises ParseError."""
    if gen.finish_reason in ("length", "cancelled"):
        err = ParseError(
            f"the output was cut ({gen.finish_reason}) after {gen.usage.completion_tokens} tokens "
            "before the grammar completed; raise max_new_tokens"
        )
        err.kind, err.generation = "incomplete", gen
        raise err
    try:
        return task.parse_ended(gen.text, gen.field_ends)
    except ParseError as e:
        e.generation = gen
        raise


def _grammar_spec(grammar: Grammar | None) -> tuple[str, str] | None:
    if grammar is None:
        return None
    if not isinstance(grammar, Grammar):
        raise TypeError(f"grammar must be an lfm.Grammar, got {type(grammar).__name__}")
    return grammar._spec()


class TextStream:
    """Iterator of text pieces; ``generation`` is set once it is exhausted. As a context
    manager, it cancels the request when the ``with`` block is left, however it is left
    (a finished request is unaffected). An exception raised while it waits for a piece
    (Ctrl-C included) cancels the request too."""

    def __init__(self, core: Any) -> None:
        self._core = core
        self._pid = os.getpid()
        self.generation: Generation | None = None
        # One reader at a time. A second one is refused before __next__'s try, so that its
        # error does not cancel the request the first one reads.
        self._reading = threading.Lock()

    def __iter__(self) -> TextStream:
        return self

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Ctrl-C can land in the loop's body, between pieces, where __next__ cannot see it;
        # without this the request runs on while anything (a saved traceback) holds the
        # stream.
        self.cancel()

    def __next__(self) -> str:
        _refuse_after_fork(self._pid, "stream")
        if not self._reading.acquire(blocking=False):
            raise ValueError("stream used from two threads at once")
        try:
            piece: str = next(self._core)
            return piece
        except StopIteration:
            if self.generation is None:
                result = self._core.result()
                if result is not None:
                    self.generation = Generation._from_core(result)
            raise
        except BaseException:
            # Most often Ctrl-C, raised as the piece arrives (the core cancels on its own
            # only when the signal comes while it waits). After an error the request has
            # ended already and this changes nothing.
            self._core.cancel()
            raise
        finally:
            self._reading.release()

    def cancel(self) -> None:
        """Stops the generation at the next decode step; the pieces already made can still
        be read, and then ``generation`` holds the result (``finish_reason="cancelled"``)."""
        self._core.cancel()


__all__ = ["Engine", "TextStream"]
