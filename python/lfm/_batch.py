"""Many requests at once: submitted together so the scheduler batches their decoder
steps; results come back in input order, a failing item holding its exception."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO, TypeVar

from .results import Generation

Progress = bool | Callable[[int, int], None] | None
_Item = TypeVar("_Item")


class ProgressBar:
    """A one-line progress bar with items/s and ETA, on stderr."""

    def __init__(self, total: int, unit: str = "images", stream: TextIO | None = None) -> None:
        self.total, self.unit, self.stream = total, unit, stream or sys.stderr
        self.start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * done / max(total, 1))
        eta_s = f"{eta:5.0f}s" if eta != float("inf") else "    ?"
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:6.2f} {self.unit}/s ETA {eta_s}"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def progress_callback(progress: Progress, total: int) -> Callable[[int, int], None] | None:
    if progress is True:
        return ProgressBar(total)
    if progress is False or progress is None:
        return None
    if callable(progress):
        return progress
    raise TypeError("progress must be a bool or a callable(done, total)")


def submit_all(items: Iterable[_Item], submit: Callable[[_Item], Any]) -> list[Any]:
    """``submit(item)`` for each item: a core stream, or the exception it raised. Ctrl-C
    (any BaseException) while submitting cancels the items submitted so far, then
    propagates; before ``collect`` takes over, nothing else would stop them."""
    handles: list[Any] = []
    try:
        for item in items:
            try:
                handles.append(submit(item))
            except Exception as e:
                handles.append(e)
    except BaseException:
        cancel_all(handles)
        raise
    return handles


def cancel_all(handles: Iterable[Any]) -> None:
    for h in handles:
        if not isinstance(h, BaseException):
            h.cancel()


def collect(
    handles: Sequence[Any],
    finish: Callable[[int, Generation], Any],
    progress: Progress,
    engine_core: Any,
) -> list[Any]:
    """Waits for every handle in order. ``handles[i]`` is a core stream or an exception;
    ``finish(i, generation)`` turns a generation into the slot's value (or raises).
    Ctrl-C (KeyboardInterrupt) cancels everything still running, then propagates."""
    from .results import Generation as Gen

    out: list[Any] = []
    try:
        # Inside the try: a bad ``progress`` cancels what was submitted, as Ctrl-C does.
        report = progress_callback(progress, len(handles))
        for i, h in enumerate(handles):
            if isinstance(h, BaseException):
                out.append(h)
            else:
                try:
                    out.append(finish(i, Gen._from_core(h.wait())))
                except Exception as e:
                    out.append(e)
            if report:
                report(i + 1, len(handles))
    except BaseException:
        cancel_all(handles)
        raise
    engine_core.check_warnings()
    return out
