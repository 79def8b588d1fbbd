"""What was read a moment ago, kept for a few seconds: the rows a chat message or a request
would otherwise read again (decision 0024), the refusals already audited.

One thread-safe wrapper around ``cachetools.TTLCache``: bounded (the least recently used entry
goes first when full) and timed by ``time.monotonic`` (a clock change never keeps an entry).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from cachetools import TTLCache

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """At most ``size`` entries, each for ``seconds`` after it was put (by ``timer``'s clock)."""

    def __init__(self, seconds: float, size: int, *, timer: Callable[[], float] = time.monotonic):
        if seconds <= 0 or size < 1:
            raise ValueError("a Recent cache needs seconds > 0 and size >= 1")
        self.seconds = seconds
        self._cache: TTLCache = TTLCache(maxsize=size, ttl=seconds, timer=timer)
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value put less than ``seconds`` ago; None when there is none."""
        with self._lock:
            return self._cache.get(key)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._cache[key] = value

    def pop(self, key: K) -> None:
        with self._lock:
            self._cache.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def __len__(self) -> int:
        with self._lock:
            self._cache.expire()
            return len(self._cache)
