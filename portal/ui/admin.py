"""Admin tab: users (activate/deactivate), the audit log and the base models (download to the shared
volume). Shown to admins only; every handler goes through UserAdmin or ModelDownloads, which refuse
non-admins whatever the page shows."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from ..model_download import ModelDownloads, status_text
from ..runs import RunService
from ..users import UserAdmin
from .common import current_user

USER_HEADERS = ["User", "Name", "Email", "Admin", "Active", "Groups", "Last login"]
AUDIT_HEADERS = ["When", "User", "Action", "Target", "Detail", "From"]
MODEL_HEADERS = ["Model", "Hub id / path", "Template", "License", "Downloaded", "Download job"]


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def users_frame(users) -> pd.DataFrame:
    return pd.DataFrame([[u.username, u.display_name or "", u.email or "", "yes" if u.is_admin else "",
                          "yes" if u.is_active else "no", u.groups, _when(u.last_login_at)] for u in users],
                        columns=USER_HEADERS)


def audit_frame(events) -> pd.DataFrame:
    return pd.DataFrame([[_when(e.at), e.username, e.action, e.target or "", e.detail or "", e.client or ""]
                         for e in events], columns=AUDIT_HEADERS)


def models_frame(rows) -> pd.DataFrame:
    return pd.DataFrame([[r["name"], r["hub_id"] or r["path"], r["template"] or "", r["license"] or "",
                          "yes" if r["downloaded"] else "no", "" if r["job"] == "none" else r["job"]] for r in rows],
                        columns=MODEL_HEADERS)


def build_admin_tab(runs: RunService, admin: UserAdmin) -> dict[str, Any]:
    with gr.Row():
        refresh_btn = gr.Button("Refresh", scale=0, elem_id="admin-refresh")
        who = gr.Textbox(label="User", placeholder="user name", scale=2, elem_id="admin-user")
        deactivate_btn = gr.Button("Deactivate", variant="stop", scale=0, elem_id="admin-deactivate")
        activate_btn = gr.Button("Activate", scale=0, elem_id="admin-activate")
    users_table = gr.Dataframe(headers=USER_HEADERS, value=users_frame([]), interactive=False, elem_id="admin-users")
    with gr.Row():
        audit_user = gr.Textbox(label="Audit: user", scale=1, elem_id="audit-user")
        audit_action = gr.Textbox(label="Audit: action (login, submit, cancel, denied, ...)", scale=1,
                                  elem_id="audit-action")
    audit_table = gr.Dataframe(headers=AUDIT_HEADERS, value=audit_frame([]), interactive=False, wrap=True,
                               elem_id="admin-audit")

    def refresh(user_filter: str, action_filter: str, request: gr.Request):
        actor = current_user(runs, request)
        try:
            return (users_frame(admin.list_users(actor)),
                    audit_frame(admin.audit_events(actor, (user_filter or "").strip() or None,
                                                   (action_filter or "").strip() or None)))
        except PermissionError as err:
            raise gr.Error(str(err)) from err

    def set_active(active: bool):
        def handler(username: str, request: gr.Request):
            actor = current_user(runs, request)
            try:
                user = admin.set_active(actor, (username or "").strip(), active)
            except (PermissionError, ValueError) as err:
                raise gr.Error(str(err)) from err
            gr.Info(f"{user.username} is now {'active' if user.is_active else 'deactivated'}.")
        return handler

    filters = [audit_user, audit_action]
    outputs = [users_table, audit_table]
    refresh_btn.click(refresh, filters, outputs)
    audit_user.submit(refresh, filters, outputs)
    audit_action.submit(refresh, filters, outputs)
    deactivate_btn.click(set_active(False), [who], None).then(refresh, filters, outputs)
    activate_btn.click(set_active(True), [who], None).then(refresh, filters, outputs)

    downloads = ModelDownloads(runs.settings, runs.db)
    hub_names = downloads.hub_names()
    with gr.Accordion("Base models", open=False, elem_id="admin-models-section"):
        models_table = gr.Dataframe(headers=MODEL_HEADERS, value=models_frame([]), interactive=False,
                                    elem_id="admin-models")
        with gr.Row():
            model_pick = gr.Dropdown(choices=hub_names, value=hub_names[0] if hub_names else None, scale=2,
                                     label="Catalog model from the Hub", elem_id="admin-model-pick")
            download_btn = gr.Button("Download to the shared volume", variant="primary", scale=0,
                                     elem_id="admin-model-download")
            models_refresh_btn = gr.Button("Refresh", scale=0, elem_id="admin-models-refresh")
        download_log = gr.Textbox(label="Download log", lines=10, max_lines=20, interactive=False, autoscroll=True,
                                  elem_id="admin-model-log")

    def refresh_models(name: str | None, request: gr.Request):
        actor = current_user(runs, request)
        try:
            return (models_frame(downloads.entries(actor)),
                    status_text(downloads.status(actor, name)) if name else "")
        except (PermissionError, ValueError) as err:
            raise gr.Error(str(err)) from err

    def start_download(name: str | None, request: gr.Request):
        actor = current_user(runs, request)
        if not name:
            raise gr.Error("Pick a catalog model first.")
        try:
            job = downloads.start(actor, name)
        except (PermissionError, ValueError) as err:
            raise gr.Error(str(err)) from err
        gr.Info(f"Downloading {job.repo} to {job.target}. Press Refresh to follow it.")

    models_outputs = [models_table, download_log]
    models_refresh_btn.click(refresh_models, [model_pick], models_outputs)
    refresh_btn.click(refresh_models, [model_pick], models_outputs)
    model_pick.change(refresh_models, [model_pick], models_outputs)
    download_btn.click(start_download, [model_pick], None).then(refresh_models, [model_pick], models_outputs)
    return {"refresh": refresh, "users": users_table, "audit": audit_table, "filters": filters, "outputs": outputs,
            "refresh_models": refresh_models, "start_download": start_download, "models_outputs": models_outputs,
            "model_pick": model_pick}
