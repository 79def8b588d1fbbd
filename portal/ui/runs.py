"""Runs tab: the run history, one run's status, live loss curve, log tail and Cancel."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from ..models import Run
from ..runs import NotFound, PortalError, RunService
from .common import current_user

TABLE_HEADERS = ["ID", "Name", "Owner", "Status", "Created", "Finished", "Final loss", "Reason"]
REFRESH_SECONDS = 2.0


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def runs_table(runs: list[Run]) -> pd.DataFrame:
    rows = [[r.id, r.name, r.owner, r.status.value, _when(r.created_at), _when(r.finished_at),
             "" if r.final_loss is None else f"{r.final_loss:.4f}", r.status_reason or ""] for r in runs]
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


def run_choices(runs: list[Run]) -> list[tuple[str, int]]:
    return [(f"#{r.id} {r.name} ({r.status.value})", r.id) for r in runs]


def run_details(run: Run, mlflow_url: str | None) -> str:
    lines = [f"### Run #{run.id} · {run.name}", "",
             f"**Status:** `{run.status.value}`" + (f" — {run.status_reason}" if run.status_reason else ""),
             f"**Owner:** {run.owner} · **Model:** `{run.model_name_or_path}` · **Datasets:** `{run.datasets}`",
             f"**Stage / method:** {run.stage} / {run.finetuning_type} · **GPUs:** {run.gpus or 'CPU'}",
             f"**Created:** {_when(run.created_at)} · **Started:** {_when(run.started_at) or '—'} · "
             f"**Finished:** {_when(run.finished_at) or '—'}"]
    if run.exit_code is not None:
        lines.append(f"**Exit code:** {run.exit_code}")
    if run.final_loss is not None:
        lines.append(f"**Final loss:** {run.final_loss:.4f}")
    lines.append(f"**Output:** `{run.output_dir}` · **Config sha256:** `{run.config_sha256[:16]}…`")
    if mlflow_url:
        lines.append(f"[Open in MLflow]({mlflow_url})")
    return "  \n".join(lines)


def curve_frame(points) -> pd.DataFrame | None:
    """The loss curve's data; None (not an empty frame) while there is none: Gradio 5.50's
    LinePlot stops redrawing after it was given an empty frame."""
    rows = [{"step": int(p.step), "loss": float(p.value), "metric": p.key} for p in points if p.key in ("loss", "eval_loss")]
    if not rows:
        return None
    frame = pd.DataFrame(rows, columns=["step", "loss", "metric"])
    return frame.astype({"step": "int64", "loss": "float64", "metric": "str"})


def _run_number(value) -> int:
    try:
        return int(str(value).strip().lstrip("#").split()[0])
    except (ValueError, IndexError):
        raise ValueError(f"'{value}' is not a run id: type a run number like 12") from None


def build_runs_tab(runs: RunService) -> dict[str, Any]:
    with gr.Row():
        refresh_btn = gr.Button("Refresh", scale=0, elem_id="runs-refresh")
        # custom values: a run id can be typed (the service decides whether it is yours)
        selected = gr.Dropdown(label="Run", choices=[], value=None, scale=3, elem_id="run-select",
                               allow_custom_value=True)
        cancel_btn = gr.Button("Cancel run", variant="stop", scale=0, elem_id="run-cancel")
    table = gr.Dataframe(headers=TABLE_HEADERS, value=runs_table([]), interactive=False, wrap=True, elem_id="runs-table")
    with gr.Row():
        with gr.Column(scale=2):
            details = gr.Markdown("Select a run.", elem_id="run-details")
        with gr.Column(scale=3):
            curve = gr.LinePlot(value=None, x="step", y="loss", color="metric", title="Loss (from MLflow)",
                                elem_id="loss-curve", height=280)
    logs = gr.Textbox(label="Log (tail)", lines=14, max_lines=14, autoscroll=True, interactive=False, elem_id="run-log")
    with gr.Accordion("Config (YAML that ran)", open=False):
        config = gr.Code(language="yaml", interactive=False, elem_id="run-config")
    timer = gr.Timer(REFRESH_SECONDS)

    def refresh(run_id, request: gr.Request):
        user = current_user(runs, request)
        history = runs.list_runs(user)
        if run_id is None and history:
            run_id = history[0].id  # newest first: follow the run just submitted
        dropdown = gr.Dropdown(choices=run_choices(history), value=run_id)
        if run_id is None:
            return dropdown, runs_table(history), "No runs yet: submit one from the Train tab.", curve_frame([]), "", ""
        try:
            run = runs.get_run(user, _run_number(run_id))
        except (NotFound, ValueError) as err:
            return dropdown, runs_table(history), str(err), curve_frame([]), "", ""
        try:
            points = runs.metrics(user, run.id)
            url = runs.mlflow_url(run)
        except Exception as err:  # MLflow down: say so, keep the rest of the page
            points, url = [], None
            run.status_reason = f"{run.status_reason or ''} (metrics unavailable: {err})".strip()
        return (dropdown, runs_table(history), run_details(run, url), curve_frame(points),
                runs.logs(user, run.id, tail_bytes=20_000), run.config_yaml)

    def cancel(run_id, request: gr.Request):
        user = current_user(runs, request)
        if run_id is None:
            raise gr.Error("Select a run to cancel.")
        try:
            run = runs.cancel(user, _run_number(run_id))
        except (NotFound, PortalError, ValueError) as err:
            raise gr.Error(str(err)) from err
        gr.Info(f"Run #{run.id} is {run.status.value}.")

    outputs = [selected, table, details, curve, logs, config]
    timer.tick(refresh, [selected], outputs, show_progress="hidden", concurrency_limit=None)
    refresh_btn.click(refresh, [selected], outputs, concurrency_limit=None)
    selected.input(refresh, [selected], outputs, concurrency_limit=None)
    cancel_btn.click(cancel, [selected], None).then(refresh, [selected], outputs)
    return {"selected": selected, "table": table, "details": details, "curve": curve, "logs": logs,
            "config": config, "timer": timer, "refresh": refresh}
