"""Account tab: the user's API tokens (make one, shown once; revoke) and how to use them."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from ..runs import RunService
from ..tokens import TokenError, TokenService
from .common import current_user

TOKEN_HEADERS = ["ID", "Name", "Token starts", "Created", "Expires", "Last used", "Last used from", "State"]

USAGE = """\
**API tokens** sign in scripts, CI pipelines and OpenAI clients as you. A token is shown once, when
you make it: keep it in your CI's secret variables, never in a repository.

```bash
export PORTAL_TOKEN=lbp_...            # the token
llamaboard-portal submit config.yaml --server {url} --wait   # exit 0 when the run succeeded
curl -H "Authorization: Bearer $PORTAL_TOKEN" {url}/api/runs
```
OpenAI clients: base URL `{url}/v1`, API key = the token, model = `run-<id>`. The API is described
at [{url}/api/docs]({url}/api/docs).
"""


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else ""


def tokens_frame(rows) -> pd.DataFrame:
    return pd.DataFrame([[t.id, t.name, f"{t.prefix}…", _when(t.created_at), _when(t.expires_at) or "never",
                          _when(t.last_used_at) or "never", t.last_used_from or "",
                          "revoked" if t.revoked_at else "active"] for t in rows], columns=TOKEN_HEADERS)


def build_account_tab(runs: RunService, tokens: TokenService) -> dict[str, Any]:
    # filled with this portal's address when the tab opens (a placeholder URL would break the page's links)
    usage = gr.Markdown("**API tokens** sign in scripts, CI pipelines and OpenAI clients as you.", elem_id="token-usage")
    with gr.Row():
        name = gr.Textbox(label="Token name (what uses it)", placeholder="gitlab-ci", scale=3, elem_id="token-name")
        expires = gr.Number(label="Expires in days (empty: never)", value=90, precision=0, minimum=1, maximum=3650,
                            scale=1, elem_id="token-expires")
        create_btn = gr.Button("Make token", variant="primary", scale=0, elem_id="token-create")
    new_token = gr.Textbox(label="Your new token: copy it now, it is not shown again", interactive=False,
                           show_copy_button=True, visible=False, elem_id="new-token")
    table = gr.Dataframe(headers=TOKEN_HEADERS, value=tokens_frame([]), interactive=False, elem_id="token-list")
    with gr.Row():
        # no minimum: an empty field would show as an invalid 0 (the handler checks it)
        revoke_id = gr.Number(label="Token ID", value=None, precision=0, scale=1, elem_id="token-revoke-id")
        revoke_btn = gr.Button("Revoke", variant="stop", scale=0, elem_id="token-revoke")

    def refresh(request: gr.Request):
        user = current_user(runs, request)
        base = runs.settings.public_url or f"{request.url.scheme}://{request.headers.get('host', 'localhost')}"
        return USAGE.format(url=base.rstrip("/")), tokens_frame(tokens.list(user))

    def create(token_name: str, days, request: gr.Request):
        user = current_user(runs, request)
        try:
            token, _ = tokens.create(user, token_name, expires_days=int(days) if days else None)
        except TokenError as err:
            raise gr.Error(str(err)) from err
        return gr.Textbox(value=token, visible=True), tokens_frame(tokens.list(user)), ""

    def revoke(token_id, request: gr.Request):
        user = current_user(runs, request)
        if not token_id:
            raise gr.Error("Token ID: type the ID of the token to revoke (first column of the list).")
        try:
            row = tokens.revoke(user, int(token_id))
        except TokenError as err:
            raise gr.Error(str(err)) from err
        gr.Info(f"Token '{row.name}' is revoked: it no longer signs in.")
        return tokens_frame(tokens.list(user)), gr.Textbox(value="", visible=False)

    create_btn.click(create, [name, expires], [new_token, table, name], show_api=False)
    revoke_btn.click(revoke, [revoke_id], [table, new_token], show_api=False)
    return {"refresh": refresh, "outputs": [usage, table]}
