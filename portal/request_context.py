"""Who is asking, from where: set once per handler call, read by the audit log.

Gradio runs each handler in a worker thread with a copy of the context, so a value set by the
handler's user check stays with that call and never leaks into another user's.
"""

from __future__ import annotations

from contextvars import ContextVar

client_address: ContextVar[str | None] = ContextVar("client_address", default=None)
# the browser page (Gradio's session_hash) a handler call comes from: a clone loaded into one
# page's form is recorded as the parent of what that page submits, not of another page's runs
page_session: ContextVar[str | None] = ContextVar("page_session", default=None)
