"""The threads ``Engine.agenerate`` and ``arun`` submit and wait on, off the event loop."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

MAX_THREADS = 64


class DaemonPool:
    """Up to ``MAX_THREADS`` daemon threads, started as jobs need them. Daemon threads, not
    a ``ThreadPoolExecutor``'s: Python joins those at exit before any exit handler runs, so
    a request still awaited then (its event loop in a daemon thread) held the exit up until
    it finished; lfm's exit handler cancels it instead."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._queued = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            self._queued += 1
            start = self._queued > self._idle and self._threads < MAX_THREADS
            if start:
                self._threads += 1
        self._jobs.put((future, fn, args))
        if start:
            threading.Thread(target=self._work, name=f"lfm-async-{self._threads}", daemon=True).start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            future, fn, args = self._jobs.get()
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # the awaiting task gets it, whatever it is
                future.set_exception(e)


_lock = threading.Lock()
_pool: tuple[int, DaemonPool] | None = None


def pool() -> DaemonPool:
    """This process's pool: made on first use, and again in a forked child (a copied pool
    has no threads)."""
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), DaemonPool())
        return _pool[1]
