"""What every tab needs: the signed-in user of a request."""

from __future__ import annotations

import gradio as gr

from ..models import User
from ..request_context import client_address, page_session
from ..runs import RunService


def current_user(runs: RunService, request: gr.Request | None) -> User:
    """The user the portal authenticated for this request (never a form field)."""
    name = getattr(request, "username", None) if request is not None else None
    if not name:
        raise gr.Error("Not signed in. Reload the page to sign in again.")
    client = getattr(request, "client", None)
    client_address.set(getattr(client, "host", None))  # the audit log records where actions came from
    page_session.set(getattr(request, "session_hash", None))
    try:
        return runs.user(name)
    except PermissionError as err:
        raise gr.Error(str(err)) from err
