"""Who is asking, from where: set once per handler call, read by the audit log.

Gradio runs each handler in a worker thread with a copy of the context, so a value set by the
handler's user check stays with that call and never leaks into another user's.
"""

from __future__ import annotations

from contextvars import ContextVar

client_address: ContextVar[str | None] = ContextVar("client_address", default=None)
