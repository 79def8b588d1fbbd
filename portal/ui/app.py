"""The portal's Blocks: Train, Data, Runs, Chat, Account and (for admins) Admin tabs."""

from __future__ import annotations

from datetime import datetime

import gradio as gr

from llamaboard_ext.form import form_defaults, llamaboard_css

from ..chat import ChatService
from ..git_configs import GitConfigs
from ..runs import NotFound, RunService
from ..tokens import TokenService
from ..users import UserAdmin
from .account import build_account_tab
from .admin import build_admin_tab
from .chat import build_chat_tab
from .common import current_user
from .data import build_data_tab
from .git import build_git_section, export_run_handler
from .runs import build_runs_tab, run_number
from .train import build_train_tab


def build_ui(runs: RunService, chat: ChatService, sign_out: bool = False) -> gr.Blocks:
    git = GitConfigs(runs)
    form_defaults()  # built here, outside any Blocks context: handlers must never build components
    # System fonts: the page must not fetch anything from outside (Gradio's default loads Google Fonts).
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "Consolas", "monospace"])
    # delete_cache: Gradio's temp files (uploads not saved, YAML downloads) go after two hours
    with gr.Blocks(title="LLaMA Board Portal", css=llamaboard_css(), theme=theme, analytics_enabled=False,
                   delete_cache=(3600, 7200)) as blocks:
        with gr.Row():
            header = gr.Markdown("## LLaMA Board Portal", elem_id="portal-header")
            # signing out changes state: a POST form (the security layer checks its Origin), not a link
            gr.HTML("<form method='post' action='../logout' style='text-align:right'><button type='submit' "
                    "id='sign-out' style='border:1px solid #d1d5db;border-radius:6px;padding:4px 14px;background:#f9fafb;"
                    "cursor:pointer'>Sign out</button></form>", visible=sign_out,
                    elem_id="sign-out-form")
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id="train"):
                form = build_train_tab(runs)
                build_git_section(git, form)
            with gr.Tab("Data", id="data") as data_tab:
                data_parts = build_data_tab(runs, runs.datasets, form.component("train.dataset"),
                                            form.component("train.training_stage"))
            data_tab.select(data_parts["refresh"], [data_parts["stage"]], data_parts["outputs"])
            with gr.Tab("Runs", id="runs") as runs_tab_item:
                runs_tab = build_runs_tab(runs)
                with gr.Row(visible=git.enabled):
                    git_export_btn = gr.Button("Export to Git", scale=0, elem_id="run-git-export")
                    git_export_result = gr.Markdown(elem_id="run-git-result")
                git_export_btn.click(export_run_handler(git, run_number), [runs_tab["selected"]], [git_export_result],
                                     show_api=False)
            # the table at once when the tab opens, not at the timer's next tick (up to 2 s later)
            runs_tab_item.select(runs_tab["refresh"], [runs_tab["selected"], *runs_tab["filters"]], runs_tab["outputs"],
                                 concurrency_limit=None, show_progress="hidden")
            with gr.Tab("Chat", id="chat") as chat_tab:
                chat_parts = build_chat_tab(chat)
            chat_tab.select(chat_parts["reload"], None, chat_parts["target"])
            with gr.Tab("Account", id="account") as account_tab:
                account_parts = build_account_tab(runs, TokenService(runs.db))
            account_tab.select(account_parts["refresh"], None, account_parts["outputs"])
            with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                admin_parts = build_admin_tab(runs, UserAdmin(runs.db))
            admin_tab.select(admin_parts["refresh"], admin_parts["filters"], admin_parts["outputs"])

        lf_names = [c[0] if isinstance(c, tuple) else c for c in form.component("top.model_name").choices]

        def clone_into_form(run_id, request: gr.Request):
            """The Runs tab's Clone: the run's config into the Train form (a new name), then the Train tab."""
            user = current_user(runs, request)
            if run_id is None:
                raise gr.Error("Select a run to clone.")
            try:
                values, warnings = form.portal_backend.clone_values(user.username, run_number(run_id))
            except (NotFound, ValueError) as err:
                raise gr.Error(str(err)) from err
            run_label = str(run_id).split()[0].lstrip("#")
            updates: dict = {form.elems[k]: v for k, v in values.items() if k in form.elems and k != "train.output_box"}
            note = "\n\n".join(f"**Warning:** {w}" for w in warnings)
            updates[form.component("train.output_box")] = (
                f"Run #{run_label} is loaded into the form under a new name. Change what you want and press "
                f"**Submit run**: the new run records #{run_label} as its parent.\n\n{note}").strip()
            updates[tabs] = gr.Tabs(selected="train")
            return updates

        runs_tab["clone"].click(clone_into_form, [runs_tab["selected"]],
                                form.inputs + [form.component("train.output_box"), tabs])

        def on_load(request: gr.Request):
            user = current_user(runs, request)
            now = datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
            models = runs.catalog.models()  # the admin's catalog first, then shared model folders
            # LLaMA Board's own list names hub models: offered only where hub models are allowed
            extra = lf_names if runs.settings.allow_hub_models else [n for n in lf_names if n == "Custom"]
            return {
                header: f"## LLaMA Board Portal\nSigned in as **{user.username}**"
                        + (" (admin)" if user.is_admin else ""),
                form.component("train.current_time"): now,
                form.component("train.output_dir"): gr.Dropdown(value=f"train_{now}", choices=[f"train_{now}"]),
                form.component("train.config_path"): gr.Dropdown(value=f"{now}.yaml", choices=[f"{now}.yaml"]),
                form.component("top.model_name"): gr.Dropdown(choices=list(models) + [n for n in extra if n not in models]),
                admin_tab: gr.Tab(visible=user.is_admin),
            }

        blocks.load(on_load, None, [header, form.component("train.current_time"), form.component("train.output_dir"),
                                    form.component("train.config_path"), form.component("top.model_name"), admin_tab])
    blocks.portal_form = form  # type: ignore[attr-defined]
    blocks.portal_tabs = tabs  # type: ignore[attr-defined]
    blocks.portal_runs_tab = runs_tab  # type: ignore[attr-defined]
    return blocks
