"""Lock-outs for repeated sign-in attempts and bad API tokens, per client address.

In this process's memory: a restart forgets them, and several portal replicas each count their
own (an address may try `replicas x limit` times). Good enough against one client hammering the
login or guessing tokens; a shared limit belongs in the reverse proxy or a shared store.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from starlette.responses import Response


class Limiter:
    """At most `limit` events per key in `window_s`; the event that reaches it locks the key out
    for `window_s` (and `hit` says so once, for the audit log)."""

    def __init__(self, name: str, limit: int | None, window_s: float, max_keys: int = 100_000):
        self.name, self.limit, self.window_s, self.max_keys = name, limit, window_s, max_keys
        self._events: OrderedDict[str, deque[float]] = OrderedDict()
        self._locked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def retry_after(self, key: str | None) -> int | None:
        """Seconds until the key may try again; None when it is not locked out."""
        if self.limit is None:
            return None
        with self._lock:
            until = self._locked_until.get(key or "-")
            if until is None:
                return None
            left = until - time.monotonic()
            if left <= 0:
                del self._locked_until[key or "-"]
                return None
            return max(1, math.ceil(left))

    def hit(self, key: str | None) -> bool:
        """Count one event; True when it starts a lock-out."""
        if self.limit is None:
            return False
        key, now = key or "-", time.monotonic()
        with self._lock:
            events = self._events.pop(key, None) or deque()
            while events and events[0] <= now - self.window_s:
                events.popleft()
            events.append(now)
            if len(events) < self.limit:
                self._events[key] = events  # most recent last
                while len(self._events) > self.max_keys:  # many addresses: forget the quietest
                    self._events.popitem(last=False)
                return False
            self._locked_until[key] = now + self.window_s
            if len(self._locked_until) > self.max_keys:
                for old in [k for k, t in self._locked_until.items() if t <= now]:
                    del self._locked_until[old]
            return True


@dataclass
class RateLimits:
    login_starts: Limiter
    failed_logins: Limiter
    bad_tokens: Limiter

    @classmethod
    def from_settings(cls, settings) -> "RateLimits":  # noqa: ANN001 (portal.config.Settings)
        window = settings.rate_limit_window_seconds
        return cls(Limiter("login_starts", settings.rate_limit_login_starts, window),
                   Limiter("failed_logins", settings.rate_limit_failed_logins, window),
                   Limiter("bad_tokens", settings.rate_limit_bad_tokens, window))


def too_many(retry_after: int, what: str, response: Response | None = None) -> Response:
    """HTTP 429 naming what was limited and when to come back."""
    from fastapi.responses import JSONResponse

    response = response or JSONResponse({"detail": f"too many {what} from your address: try again in "
                                                   f"{retry_after} s"})
    response.status_code = 429
    response.headers["Retry-After"] = str(retry_after)
    return response
