"""Configs in Git, in the browser: export the form or a run, import a repository config into the form.

Shown only when an admin configured a repository (PORTAL_GIT_URL). Handlers call GitConfigs, which
checks the config like a submit and never shows the repository's credentials.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from llamaboard_ext import compile as lbc
from llamaboard_ext.form import FormError

from ..git_configs import GitConfigs
from ..git_export import ExportResult, GitExportError
from ..runs import ConfigRejected, NotFound
from .common import current_user


def result_text(result: ExportResult) -> str:
    where = f"`{result.path}` on branch `{result.branch}`"
    sha = f"[`{result.sha[:12]}`]({result.url})" if result.url else f"`{result.sha[:12]}`"
    if result.unchanged:
        text = f"Git already has this config: {where}, commit {sha}. Nothing new was committed."
    else:
        text = f"Exported to Git: {where}, commit {sha}."
    if result.merge_request_url:
        text += f" Review: [merge request]({result.merge_request_url})."
    if result.merge_request_error:
        text += f"\n\n**The merge request could not be opened:** {result.merge_request_error}"
    return text


def _problems_text(what: str, problems: dict[str, str]) -> str:
    lines = "\n".join(f"- **{key}**: {problem}" for key, problem in problems.items())
    return f"{what}: fix these fields first (your form is unchanged):\n\n{lines}"


def build_git_section(git: GitConfigs, form) -> None:
    """The Train tab's "Git" accordion: Export the form, Import a config from the repository."""
    runs, backend = git.runs, form.portal_backend
    output_box = form.component("train.output_box")
    with gr.Accordion("Git: export this config for review, or import one", open=False, visible=git.enabled,
                      elem_id="git-section"):
        with gr.Row():
            export_btn = gr.Button("Export to Git", scale=0, elem_id="git-export")
            export_result = gr.Markdown(elem_id="git-export-result")
        with gr.Row():
            picker = gr.Dropdown(label="Config in the repository", choices=[], value=None, scale=4,
                                 allow_custom_value=False, elem_id="git-pick")
            list_btn = gr.Button("List configs", scale=0, elem_id="git-list")
            import_btn = gr.Button("Load into the form", scale=0, elem_id="git-import")

    def export_form(data: dict, request: gr.Request):
        user = current_user(runs, request)
        try:
            args = backend.args(form.values_from(data))
            result = git.export_args(user, args)
        except FormError as err:
            return _problems_text("Not exported", err.problems)
        except ConfigRejected as err:
            return _problems_text("Not exported", err.problems)
        except GitExportError as err:
            return f"Not exported: {err}"
        return result_text(result)

    def list_configs(request: gr.Request):
        user = current_user(runs, request)
        try:
            choices = git.list_configs(user)
        except GitExportError as err:
            raise gr.Error(str(err)) from err
        if not choices:
            gr.Info("The repository has no configs under its import folder yet.")
        return gr.Dropdown(choices=choices, value=choices[0][1] if choices else None)

    def import_config(path: str | None, request: gr.Request):
        user = current_user(runs, request)
        if not path:
            return {output_box: "Pick a config first (List configs fills the list)."}
        try:
            loaded = lbc.args_to_form(git.read_args(user, path), runs.catalog.models())
        except (GitExportError, ConfigRejected) as err:
            return {output_box: f"Not loaded (your form is unchanged): {err}"}
        backend.remember_parent(user.username, None)  # the form now holds a config from Git
        updates: dict[Any, Any] = {form.elems[k]: v for k, v in loaded.values.items() if k in form.elems}
        note = "\n\n".join(f"**Warning:** {w}" for w in loaded.warnings)
        updates[output_box] = f"`{path}` from Git is loaded into the form.\n\n{note}".strip()
        return updates

    export_btn.click(export_form, set(form.inputs), [export_result], show_api=False)
    list_btn.click(list_configs, None, [picker], show_api=False)
    import_btn.click(import_config, [picker], form.inputs + [output_box], show_api=False)


def export_run_handler(git: GitConfigs, run_number):
    """The Runs tab's "Export to Git" for the selected run."""
    def export_run(run_id, request: gr.Request):
        user = current_user(git.runs, request)
        if run_id is None:
            raise gr.Error("Select a run to export.")
        try:
            result = git.export_run(user, run_number(run_id))
        except NotFound as err:
            raise gr.Error(str(err)) from err
        except ConfigRejected as err:
            raise gr.Error("; ".join(f"{k}: {v}" for k, v in err.problems.items())) from err
        except GitExportError as err:
            raise gr.Error(f"Not exported: {err}") from err
        gr.Info(result_text(result).replace("`", ""))
        return result_text(result)
    return export_run
