"""Data tab: upload a dataset file, choose its format and columns, see the checks and the first
rows as the model will see them, save it into the user's space; rename and delete."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from llamaboard_ext.preview import render, template_names
from llamaboard_ext.stages import uses_pair_data

from ..dataset_checks import ACCEPTED_EXTENSIONS, REQUIRED, CheckReport, DatasetSpec, guess_spec_for_file, sniff_columns
from ..datasets import DatasetRejected, DatasetService
from ..runs import RunService
from .common import current_user

NONE = "(none)"
ALPACA_KEYS = ("prompt", "query", "response", "system", "history")
SHAREGPT_KEYS = ("messages", "system", "tools")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag")
LIST_HEADERS = ["Name", "Version", "Rows", "sha256", "Format", "Where", "Uploaded"]
PREVIEW_HEADERS = ["#", "Prompt (as the model sees it)", "Response (trained on)"]


def _path(file: Any) -> str | None:
    if file is None:
        return None
    return str(getattr(file, "name", None) or getattr(file, "path", None) or file)


def _suggested_name(path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._-")
    return (stem or "dataset")[:60]


def listing_frame(items) -> pd.DataFrame:
    rows = [[d.name, d.version or "", d.rows if d.rows is not None else "", (d.sha256 or "")[:12], d.formatting,
             "shared (read-only)" if d.shared else "mine",
             d.created_at.strftime("%Y-%m-%d %H:%M") if d.created_at else ""] for d in items]
    return pd.DataFrame(rows, columns=LIST_HEADERS)


def report_markdown(report: CheckReport, val_size: float | None) -> str:
    size = (f"{report.size_bytes / 2**20:.1f} MB" if report.size_bytes >= 2**20
            else f"{report.size_bytes / 1024:.1f} KB")
    parts = [f"**{report.rows} rows** read ({report.file_type}, {size}), {report.usable_rows} usable · "
             f"sha256 `{report.sha256[:16]}…`"]
    if report.ok:
        parts.append("**No blocking problem**: the dataset can be saved.")
    problems = [f"- **Error — {p.kind}**: {p.message}" for p in report.blocking]
    problems += [f"- **Warning — {p.kind}**: {p.message}" for p in report.warnings]
    if problems:
        parts.append("\n".join(problems))
    if val_size:
        try:
            train, evaluation = report.split_counts(float(val_size))
            parts.append(f"With val_size {val_size}: **{train}** training rows, **{evaluation}** evaluation rows.")
        except ValueError as err:
            parts.append(f"**val_size**: {err}")
    return "\n\n".join(parts)


def preview_frame(report: CheckReport, template: str) -> pd.DataFrame:
    rows = []
    for i, row in enumerate(report.preview, start=1):
        try:
            prompt, response = render(template or "default", row)
        except ValueError as err:
            prompt, response = str(err), ""
        rows.append([i, prompt, response])
    return pd.DataFrame(rows, columns=PREVIEW_HEADERS)


def spec_from_inputs(formatting: str, values: list[Any], tags: list[Any]) -> DatasetSpec:
    """The column pickers (a '(none)' choice drops a default column) and the sharegpt tags."""
    keys = ALPACA_KEYS if formatting == "alpaca" else SHAREGPT_KEYS
    picked = dict(zip(ALPACA_KEYS + SHAREGPT_KEYS, values))
    columns = {k: (None if picked.get(k) in (None, "", NONE) else str(picked[k])) for k in keys}
    for key in REQUIRED[formatting]:
        if columns[key] is None:
            del columns[key]  # not picked: LLaMA-Factory's default name, which the check reports if absent
    tag_values = {k: (str(v).strip() or None) for k, v in zip(TAG_KEYS, tags) if v is not None}
    return DatasetSpec(formatting, columns=columns, tags=tag_values if formatting == "sharegpt" else {})


def build_data_tab(runs: RunService, datasets: DatasetService, train_dataset, train_stage) -> dict[str, Any]:
    """``train_dataset`` / ``train_stage``: the Train tab's dataset list (refreshed after a change) and stage."""
    gr.Markdown("Upload a dataset file into **your** space: choose its format and columns, check it, "
                "see the first rows as the model will see them, then save it. Saved datasets appear in "
                "the Train tab's dataset list. Uploading under a taken name makes a new version; runs keep "
                "the version they trained on.")
    with gr.Row():
        upload = gr.File(label=f"Dataset file ({', '.join('.' + e for e in ACCEPTED_EXTENSIONS)})",
                         file_types=[f".{e}" for e in ACCEPTED_EXTENSIONS], elem_id="data-file", scale=2)
        with gr.Column(scale=2):
            name = gr.Textbox(label="Dataset name", placeholder="e.g. support_faq", elem_id="data-name")
            formatting = gr.Radio(["alpaca", "sharegpt"], value="alpaca", label="Format", elem_id="data-format")
    with gr.Accordion("Columns and tags", open=True):
        with gr.Row():
            column_boxes = [gr.Dropdown(label=f"{k} column", choices=[NONE], value=NONE, allow_custom_value=True,
                                        elem_id=f"data-col-{k}", visible=True)
                            for k in ALPACA_KEYS]
        with gr.Row():
            sharegpt_boxes = [gr.Dropdown(label=f"{k} column", choices=[NONE], value=NONE, allow_custom_value=True,
                                          elem_id=f"data-sgcol-{k}", visible=False)
                              for k in SHAREGPT_KEYS]
        with gr.Row():
            tag_boxes = [gr.Textbox(label=k, value=v, elem_id=f"data-tag-{k}", visible=False)
                         for k, v in zip(TAG_KEYS, ("from", "value", "human", "gpt", "system"))]
    with gr.Row():
        template = gr.Dropdown(label="Template for the preview", choices=template_names(), value="default",
                               elem_id="data-template")
        cutoff = gr.Number(label="Cutoff length (tokens, estimated)", value=2048, precision=0, elem_id="data-cutoff")
        val_size = gr.Number(label="val_size (fraction or rows)", value=0.1, elem_id="data-val-size")
    with gr.Row():
        check_btn = gr.Button("Check", elem_id="data-check")
        save_btn = gr.Button("Save dataset", variant="primary", elem_id="data-save")
    report_box = gr.Markdown(elem_id="data-report")
    preview = gr.Dataframe(headers=PREVIEW_HEADERS, value=pd.DataFrame(columns=PREVIEW_HEADERS), wrap=True,
                           interactive=False, elem_id="data-preview")
    gr.Markdown("### My datasets")
    listing = gr.Dataframe(headers=LIST_HEADERS, value=pd.DataFrame(columns=LIST_HEADERS), interactive=False,
                           elem_id="data-list")
    with gr.Row():
        chosen = gr.Dropdown(label="Dataset", choices=[], allow_custom_value=True, elem_id="data-chosen")
        new_name = gr.Textbox(label="New name", elem_id="data-new-name")
        rename_btn = gr.Button("Rename", elem_id="data-rename")
        delete_btn = gr.Button("Delete", variant="stop", elem_id="data-delete")
    status = gr.Markdown(elem_id="data-status")

    all_columns = column_boxes + sharegpt_boxes

    def _spec(fmt, *values) -> DatasetSpec:
        cols, tags = list(values[: len(all_columns)]), list(values[len(all_columns):])
        try:
            return spec_from_inputs(fmt, cols, tags)
        except ValueError as err:
            raise gr.Error(f"Columns: {err}") from err

    def on_upload(request: gr.Request, file):
        current_user(runs, request)
        path = _path(file)
        if path is None:
            return {report_box: ""}
        columns = sniff_columns(path)
        guessed = guess_spec_for_file(path) or DatasetSpec("alpaca")
        choices = [NONE] + columns
        cols = guessed.resolved_columns()
        updates: dict[Any, Any] = {name: _suggested_name(path), formatting: guessed.formatting}
        for key, box in zip(ALPACA_KEYS, column_boxes):
            value = cols.get(key) if guessed.formatting == "alpaca" else None
            updates[box] = gr.Dropdown(choices=choices, value=value if value in columns else NONE,
                                       visible=guessed.formatting == "alpaca")
        for key, box in zip(SHAREGPT_KEYS, sharegpt_boxes):
            value = cols.get(key) if guessed.formatting == "sharegpt" else None
            updates[box] = gr.Dropdown(choices=choices, value=value if value in columns else NONE,
                                       visible=guessed.formatting == "sharegpt")
        tags = guessed.resolved_tags()
        for key, box in zip(TAG_KEYS, tag_boxes):
            updates[box] = gr.Textbox(value=tags.get(key, box.value), visible=guessed.formatting == "sharegpt")
        found = ", ".join(columns) or "none (the check will say why)"
        updates[report_box] = f"Columns found: {found}. Format guessed: **{guessed.formatting}**. Press **Check**."
        return updates

    def on_format(fmt):
        return ([gr.Dropdown(visible=fmt == "alpaca") for _ in column_boxes]
                + [gr.Dropdown(visible=fmt == "sharegpt") for _ in sharegpt_boxes]
                + [gr.Textbox(visible=fmt == "sharegpt") for _ in tag_boxes])

    def on_check(request: gr.Request, file, fmt, tmpl, cutoff_len, val, *values):
        current_user(runs, request)
        path = _path(file)
        if path is None:
            raise gr.Error("Choose a file to upload first.")
        try:
            report = datasets.check(path, _spec(fmt, *values), cutoff_len=int(cutoff_len) if cutoff_len else None)
        except DatasetRejected as err:
            return str(err), pd.DataFrame(columns=PREVIEW_HEADERS)
        return report_markdown(report, val), preview_frame(report, tmpl)

    def refresh_list(request: gr.Request, stage: str | None):
        user = current_user(runs, request)
        items = datasets.list(user)
        own = [d.name for d in items if not d.shared]
        names = runs.catalog.dataset_names(runs.space(user), uses_pair_data(stage))
        return [listing_frame(items), gr.Dropdown(choices=own), gr.Dropdown(choices=names)]

    def on_save(request: gr.Request, file, ds_name, fmt, tmpl, cutoff_len, val, stage, *values):
        user = current_user(runs, request)
        path = _path(file)
        if path is None:
            raise gr.Error("Choose a file to upload first.")
        try:
            version, report = datasets.add(user, path, ds_name, _spec(fmt, *values), source_name=Path(path).name,
                                           cutoff_len=int(cutoff_len) if cutoff_len else None)
        except DatasetRejected as err:  # the form keeps everything: fix the columns and save again
            gr.Warning("Not saved: see the checks below.")
            text = (report_markdown(err.report, val) if err.report else str(err))
            return [f"**Not saved.** {text}", gr.update(), *refresh_list(request, stage)]
        except ValueError as err:
            gr.Warning(str(err))
            return [f"**Not saved:** {err}", gr.update(), *refresh_list(request, stage)]
        try:
            os.unlink(path)  # the upload now lives in the user's space only
        except OSError:
            pass
        gr.Info(f"Saved {version.name} v{version.version}.")
        message = (f"Saved **{version.name}** version {version.version}: {version.rows} rows, "
                   f"sha256 `{version.sha256[:16]}…`.\n\n" + report_markdown(report, val))
        return [message, None, *refresh_list(request, stage)]

    def on_rename(request: gr.Request, old, new, stage):
        user = current_user(runs, request)
        try:
            datasets.rename(user, str(old or ""), str(new or ""))
        except ValueError as err:
            return [f"**Not renamed:** {err}", *refresh_list(request, stage)]
        return [f"Renamed **{old}** to **{new}**.", *refresh_list(request, stage)]

    def on_delete(request: gr.Request, target, stage):
        user = current_user(runs, request)
        try:
            removed = datasets.delete(user, str(target or ""))
        except ValueError as err:
            return [f"**Not deleted:** {err}", *refresh_list(request, stage)]
        return [f"Deleted **{target}** ({len(removed)} file(s) removed; files that runs used are kept).",
                *refresh_list(request, stage)]

    list_outputs = [listing, chosen, train_dataset]
    extra = all_columns + tag_boxes
    upload.upload(on_upload, [upload], [name, formatting, report_box, *all_columns, *tag_boxes])
    formatting.input(on_format, [formatting], [*all_columns, *tag_boxes])
    check_btn.click(on_check, [upload, formatting, template, cutoff, val_size, *extra], [report_box, preview])
    save_btn.click(on_save, [upload, name, formatting, template, cutoff, val_size, train_stage, *extra],
                   [report_box, upload, *list_outputs])
    rename_btn.click(on_rename, [chosen, new_name, train_stage], [status, *list_outputs])
    delete_btn.click(on_delete, [chosen, train_stage], [status, *list_outputs])
    return {"refresh": refresh_list, "outputs": list_outputs, "stage": train_stage}
