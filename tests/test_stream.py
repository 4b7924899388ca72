"""Streaming: text pieces arrive as tokens are produced, never split a character, join
to generate(...).text, and work with grammars and stop strings."""

from __future__ import annotations

import os
import signal
import time

import lfm
import pytest
from conftest import MODELS


@pytest.fixture(scope="module")
def engine() -> lfm.Engine:
    return lfm.Engine.from_dir(MODELS / "tiny16", lfm.EngineOptions(intra_threads=1))


@pytest.mark.parametrize("seed", range(5))
def test_pieces_join_to_the_generated_text(engine: lfm.Engine, seed: int) -> None:
    opts = lfm.RequestOptions(max_new_tokens=40, temperature=1.0, seed=seed)
    whole = engine.generate("Tell me something.", options=opts)
    stream = engine.stream("Tell me something.", options=opts)
    pieces = list(stream)
    assert "".join(pieces) == whole.text
    assert all(p and "\ufffd" not in p for p in pieces) or "\ufffd" in whole.text
    assert stream.generation is not None and stream.generation.token_ids == whole.token_ids
    assert stream.generation.finish_reason == whole.finish_reason


def test_stream_with_grammar(engine: lfm.Engine) -> None:
    g = lfm.Grammar.json_schema(
        {
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["n"],
            "additionalProperties": False,
        }
    )
    stream = engine.stream("n?", options={"max_new_tokens": 30}, grammar=g)
    text = "".join(stream)
    assert stream.generation is not None and stream.generation.finish_reason == "grammar"
    assert text == stream.generation.text and text.startswith('{"n":')


def test_stream_with_stop_string(engine: lfm.Engine) -> None:
    full = engine.generate("Go.", options=lfm.RequestOptions(max_new_tokens=30, repetition_penalty=1.0))
    letters = [
        i for i in range(1, len(full.text)) if full.text[i - 1 : i + 1].isascii() and full.text[i - 1 : i + 1].isalpha()
    ]
    if not letters:
        pytest.skip("no ASCII letter pair in the output")
    stop = full.text[letters[0] - 1 : letters[0] + 1]
    stream = engine.stream("Go.", options=lfm.RequestOptions(max_new_tokens=30, repetition_penalty=1.0, stop=(stop,)))
    text = "".join(stream)
    assert stream.generation is not None and stream.generation.finish_reason == "stop"
    assert text == stream.generation.text == full.text[: full.text.find(stop)]


def test_abandoned_stream_stops(engine: lfm.Engine) -> None:
    stream = engine.stream("Go on.", options={"max_new_tokens": 2000})
    next(stream)
    stream.cancel()
    rest = list(stream)
    assert stream.generation is not None and stream.generation.finish_reason == "cancelled"
    assert len(stream.generation.token_ids) < 2000 and isinstance(rest, list)


def test_stream_errors_surface(engine: lfm.Engine) -> None:
    with pytest.raises(lfm.RequestRejectedError):
        list(engine.stream("bad <|im_end|> text"))


def test_one_stream_read_from_two_threads_does_not_hang(engine: lfm.Engine) -> None:
    """A stream is read from one thread; a second reader at the same moment gets a
    ValueError instead of waiting for a lock whose holder waits for the GIL."""
    import threading

    stream = engine.stream("Hello", options=lfm.RequestOptions(max_new_tokens=64, min_new_tokens=64))
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in stream:
                pass
        except ValueError as e:
            errors.append(e)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in readers)
    assert all("two threads" in str(e) for e in errors)
    # The refused reader's error does not cancel the request the other one reads.
    assert stream.generation is not None and stream.generation.finish_reason == "length"


LONG = {"max_new_tokens": 2000, "min_new_tokens": 2000}


def test_leaving_a_with_block_cancels_the_request(engine: lfm.Engine) -> None:
    with engine.stream("Go on.", options=LONG) as stream:
        for _ in stream:
            break
    assert list(stream) is not None and stream.generation is not None
    assert stream.generation.finish_reason == "cancelled"

    # Ctrl-C in the loop's body, between pieces, where the stream cannot see it.
    with pytest.raises(KeyboardInterrupt), engine.stream("Go on.", options=LONG) as stream:
        next(stream)
        raise KeyboardInterrupt
    list(stream)
    assert stream.generation is not None and stream.generation.finish_reason == "cancelled"

    # A stream read to its end is unaffected.
    with engine.stream("Hi", options={"max_new_tokens": 5, "min_new_tokens": 5}) as stream:
        text = "".join(stream)
    assert stream.generation is not None and stream.generation.finish_reason == "length"
    assert text == stream.generation.text


def test_an_exception_while_waiting_for_a_piece_cancels_the_request(engine: lfm.Engine) -> None:
    """Ctrl-C mostly arrives as a piece is handed over (the core cancels by itself only when
    it comes while waiting); the stream must not run on while the traceback keeps it."""
    stream = engine.stream("Go on.", options=LONG)
    core = stream._core

    class Interrupted:
        def __next__(self) -> str:
            raise KeyboardInterrupt

        def cancel(self) -> None:
            core.cancel()

    stream._core = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        next(stream)
    assert core.wait()["finish_reason"] == "cancelled"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_stream_read_in_a_forked_child_raises(engine: lfm.Engine) -> None:
    """The child has none of the threads that feed the parent's stream: reading it there
    raises, as the engine does, instead of waiting forever."""
    stream = engine.stream("Go on.", options=LONG)
    next(stream)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            next(stream)
        except lfm.LfmError as e:
            code = 0 if "fork" in str(e) and "os._exit" in str(e) else 2
        finally:
            # Never a normal exit (pytest would go on in the child; ONNX Runtime can hang it).
            os._exit(code)
    deadline = time.monotonic() + 60
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if ended[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    stream.cancel()
    list(stream)
    assert ended[0] == pid, "the child hung reading the stream"
    assert os.waitstatus_to_exitcode(ended[1]) == 0
