"""What the chat backends share to let go of idle models: a reaper thread and a busy counter."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


class Reaper:
    """A daemon thread that calls ``tick`` every quarter of ``idle_seconds`` (so something idle is
    let go at most 25 % later than due) until ``closed`` is set. ``start`` is idempotent."""

    def __init__(self, name: str, idle_seconds: Callable[[], float], tick: Callable[[], Any], closed: threading.Event):
        self.name, self._idle_seconds, self._tick, self._closed = name, idle_seconds, tick, closed
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def join(self, timeout: float = 10.0) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=timeout)

    def _loop(self) -> None:
        while not self._closed.is_set():
            self._closed.wait(max(0.2, min(30.0, self._idle_seconds() / 4)))
            try:
                self._tick()
            except Exception:  # keep reaping; the next tick retries
                log.exception("%s tick failed", self.name)


@contextmanager
def busy(lock: threading.Lock, find: Callable[[], Any]):
    """Count the entry ``find`` returns under ``lock`` (anything with ``busy`` and ``last_used``;
    None: nothing) as answering while the block runs: it is neither let go when idle nor evicted
    for another. Found and counted in one hold of the lock, so a reaper cannot take it between."""
    with lock:
        entry = find()
        if entry is not None:
            entry.busy += 1
    try:
        yield entry
    finally:
        if entry is not None:
            with lock:
                entry.busy -= 1
                entry.last_used = time.time()
