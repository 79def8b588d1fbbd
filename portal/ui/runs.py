"""Runs tab: the run history, one run's status, live loss curve, log tail and Cancel."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import gradio as gr
import pandas as pd

from ..models import Run, RunStatus
from ..reproducibility import record_markdown
from ..run_query import RunQuery, total_text
from ..run_view import human_size
from ..runs import ConfigRejected, NotFound, PortalError, RunService
from .common import current_user

TABLE_HEADERS = ["ID", "Name", "Owner", "Status", "Created", "Finished", "Final loss", "Parent", "Tags", "Reason"]
DIFF_HEADERS_FIRST = "Config key"
HISTORY_HEADERS = ["Time", "Status", "Reason"]
FILES_HEADERS = ["Path", "Size", "Modified"]
NO_HISTORY = "no history recorded (the run is older than the status history)"
PAGE_SIZE = 50
REFRESH_SECONDS = 2.0


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def runs_table(runs: list[Run]) -> pd.DataFrame:
    rows = [[r.id, r.name, r.owner, r.status.value, _when(r.created_at), _when(r.finished_at),
             "" if r.final_loss is None else f"{r.final_loss:.4f}", f"#{r.parent_id}" if r.parent_id else "",
             r.tags.replace(",", ", "), r.status_reason or ""] for r in runs]
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
    if run.kind == "eval":
        lines.append(f"**Evaluates:** run #{run.parent_id} (its metrics are shown on that run's page too)")
    elif run.kind == "export":
        registered = (f"registered as `{run.registered_model}` version **{run.registered_version}**"
                      if run.registered_version else f"to be registered as `{run.registered_model}`")
        lines.append(f"**Merged model of:** run #{run.parent_id} · {registered} · files `{run.output_dir}`")
    elif run.parent_id:
        resumed = resumed_checkpoint(run)
        lines.append(f"**Resumed from:** run #{run.parent_id} (`{resumed}`)" if resumed else
                     f"**Cloned from:** run #{run.parent_id}")
    prints = json.loads(run.dataset_fingerprints or "[]")
    if prints:
        lines.append("**Data:** " + "; ".join(_fingerprint_text(fp) for fp in prints))
    if run.note or run.tags:
        lines.append(f"**Note:** {run.note or '—'} · **Tags:** {run.tags.replace(',', ', ') or '—'}")
    if run.git_commit:
        commit = f"[`{run.git_commit[:12]}`]({run.git_commit_url})" if run.git_commit_url else f"`{run.git_commit[:12]}`"
        lines.append(f"**Config in Git:** {commit} · `{run.git_path}` on `{run.git_branch}`")
    if mlflow_url:
        lines.append(f"[Open in MLflow]({mlflow_url})")
    return "  \n".join(lines)


def resumed_checkpoint(run: Run) -> str | None:
    """The checkpoint a resumed run started from (its config's resume_from_checkpoint), shortened."""
    for line in (run.config_yaml or "").splitlines():
        if line.startswith("resume_from_checkpoint:"):
            path = line.split(":", 1)[1].strip().strip("'\"")
            parts = path.rstrip("/").split("/")
            return "/".join(parts[-3:]) if len(parts) > 3 else path
    return None


def _fingerprint_text(fp: dict) -> str:
    parts = [f"`{fp['name']}`"]
    if fp.get("version"):
        parts.append(f"v{fp['version']}")
    elif fp.get("shared"):
        parts.append("shared")
    if fp.get("rows") is not None:
        parts.append(f"{fp['rows']} rows")
    if fp.get("sha256"):
        parts.append(f"sha256 `{fp['sha256'][:12]}`")
    elif fp.get("source"):
        parts.append(f"hub `{fp['source']}`")
    return " · ".join(parts)


def evaluations_text(items) -> str:
    """The eval runs of a run and what they measured (the Runs tab's "Evaluate and ship")."""
    if not items:
        return "_No evaluation yet._"
    lines = []
    for e in items:
        head = f"**Eval run #{e.run.id}** on `{e.run.datasets}` · {e.run.status.value}"
        numbers = " · ".join(f"{k} **{v:.4f}**" for k, v in sorted(e.metrics.items())
                             if not k.endswith(("_runtime", "_per_second", "_preparation_time")))
        where = f" · predictions: run #{e.run.id}'s file `{e.predictions}`" if e.predictions else ""
        lines.append(head + (f" — {numbers}" if numbers else "") + where)
    return "  \n".join(lines)


def curve_frame(points) -> pd.DataFrame | None:
    """The loss curve's data; None (not an empty frame) while there is none: Gradio 5.50's
    LinePlot stops redrawing after it was given an empty frame."""
    rows = [{"step": int(p.step), "loss": float(p.value), "metric": p.key} for p in points if p.key in ("loss", "eval_loss")]
    if not rows:
        return None
    frame = pd.DataFrame(rows, columns=["step", "loss", "metric"])
    return frame.astype({"step": "int64", "loss": "float64", "metric": "str"})


def run_number(value) -> int:
    try:
        return int(str(value).strip().lstrip("#").split()[0])
    except (ValueError, IndexError):
        raise ValueError(f"'{value}' is not a run id: type a run number like 12") from None


def history_table(events) -> pd.DataFrame:
    rows = [[_when(e.at), e.status.value, e.reason or ""] for e in events] or [["", "", NO_HISTORY]]
    return pd.DataFrame(rows, columns=HISTORY_HEADERS)


def files_table(artifacts, cut: bool = False) -> pd.DataFrame:
    rows = [[a.path + (f" ({a.files} files)" if a.path.endswith("/") else ""), human_size(a.size), _when(a.modified)]
            for a in artifacts]
    if cut:
        rows.append(["… (more files: the list is cut here)", "", ""])
    if not rows:
        rows = [["(no files in the output folder yet)", "", ""]]
    return pd.DataFrame(rows, columns=FILES_HEADERS)


def private_copy(name: str, write) -> tuple[str, str]:
    """A file for one download: written by ``write(file)`` into a new folder (0700) of the system
    temp folder, which Gradio copies into its own cache (tracked there, deleted by delete_cache);
    the caller deletes the folder right after (``drop_copy``). Returns (path, folder). Never a
    file of the data root: Gradio's allowed_paths stay as they are."""
    folder = tempfile.mkdtemp(prefix="lbp-download-")
    path = os.path.join(folder, name)
    with open(path, "wb") as fh:
        write(fh)
    return path, folder


def drop_copy(folder):
    if folder and os.path.basename(str(folder)).startswith("lbp-download-"):
        shutil.rmtree(folder, ignore_errors=True)
    return None


X_TITLES = {"step": "step", "tokens": "input tokens seen"}


def compare_curves(comparison) -> pd.DataFrame | None:
    """The compared runs' loss and eval_loss; column "x" is the step or the tokens seen
    (comparison.x_axis)."""
    rows = [{"x": float(x), "loss": float(value), "series": f"#{run.id} {run.name} {key}"}
            for run in comparison.runs for key, x, value in comparison.points(run.id)]
    if not rows:
        return None
    return pd.DataFrame(rows, columns=["x", "loss", "series"]).astype({"x": "float64", "loss": "float64"})


def compare_table(comparison) -> pd.DataFrame:
    headers = [DIFF_HEADERS_FIRST] + [f"#{r.id} {r.name}" for r in comparison.runs]
    rows = [[key, *("" if v is None else str(v) for v in values)] for key, values in comparison.differences.items()]
    if not rows:
        rows = [["(no difference in the configs)", *["" for _ in comparison.runs]]]
    return pd.DataFrame(rows, columns=headers)


def build_runs_tab(runs: RunService) -> dict[str, Any]:
    with gr.Row():
        search = gr.Textbox(label="Search name, note, tags", scale=3, elem_id="runs-search")
        statuses = gr.CheckboxGroup([s.value for s in RunStatus], label="Status", scale=4, elem_id="runs-status")
        model_filter = gr.Textbox(label="Base model contains", scale=2, elem_id="runs-model")
        dataset_filter = gr.Textbox(label="Dataset contains", scale=2, elem_id="runs-dataset")
    with gr.Row():
        refresh_btn = gr.Button("Refresh", scale=0, elem_id="runs-refresh")
        # custom values: a run id can be typed (the service decides whether it is yours)
        selected = gr.Dropdown(label="Run", choices=[], value=None, scale=3, elem_id="run-select",
                               allow_custom_value=True)
        clone_btn = gr.Button("Clone into the form", scale=0, elem_id="run-clone")
        # shown only while the selected run can still be cancelled (queued, starting, running)
        cancel_btn = gr.Button("Cancel run", variant="stop", scale=0, visible=False, elem_id="run-cancel")
    table = gr.Dataframe(headers=TABLE_HEADERS, value=runs_table([]), interactive=False, wrap=True, elem_id="runs-table")
    with gr.Row():
        with gr.Column(scale=2):
            details = gr.Markdown("Select a run.", elem_id="run-details")
        with gr.Column(scale=3):
            curve = gr.LinePlot(value=None, x="step", y="loss", color="metric", title="Loss (from MLflow)",
                                elem_id="loss-curve", height=280)
    with gr.Row():
        resume_btn = gr.Button("Resume from checkpoint", scale=0, visible=False, elem_id="run-resume")
        history_box = gr.Dataframe(headers=HISTORY_HEADERS, value=history_table([]), interactive=False, wrap=True,
                               label="Status history", elem_id="run-history", scale=4)
    logs = gr.Textbox(label="Log (tail)", lines=14, max_lines=14, autoscroll=True, interactive=False, elem_id="run-log")
    with gr.Row():
        log_btn = gr.Button("Download the whole log", scale=0, elem_id="run-log-download")
        log_file = gr.File(label="Log file", visible=False, interactive=False, elem_id="run-log-file")
    with gr.Accordion("Output files", open=False):
        files = gr.Dataframe(headers=FILES_HEADERS, value=files_table([]), interactive=False, wrap=True,
                             elem_id="run-files")
        with gr.Row():
            file_pick = gr.Dropdown(label="File to download (up to 10 MB)", choices=[], value=None, scale=3,
                                    elem_id="run-file-select")
            file_btn = gr.Button("Download file", scale=0, elem_id="run-file-download")
        artifact_file = gr.File(label="File", visible=False, interactive=False, elem_id="run-artifact-file")
    copy_folder = gr.State(None)  # this page's last download copy, deleted once Gradio has cached it
    with gr.Accordion("Evaluate and ship (succeeded training runs)", open=False):
        with gr.Row():
            eval_datasets = gr.Dropdown(label="Evaluate on", choices=[], multiselect=True, allow_custom_value=True,
                                        scale=3, elem_id="eval-datasets")
            eval_samples = gr.Number(label="Max samples", value=100, precision=0, minimum=1, scale=1,
                                     elem_id="eval-max-samples")
            eval_tokens = gr.Number(label="Max new tokens", value=128, precision=0, minimum=1, scale=1,
                                    elem_id="eval-max-new-tokens")
            eval_btn = gr.Button("Evaluate", scale=0, elem_id="run-evaluate")
        with gr.Row():
            merge_name = gr.Textbox(label="Registered model name (default: <you>-<run name>)", scale=3,
                                    elem_id="merge-name")
            merge_btn = gr.Button("Merge & register", scale=0, elem_id="run-merge")
        eval_results = gr.Markdown("_Select a run._", elem_id="run-evaluations")
    with gr.Accordion("Config (YAML that ran)", open=False):
        config = gr.Code(language="yaml", interactive=False, elem_id="run-config")
    with gr.Accordion("Note and tags", open=False):
        with gr.Row():
            note = gr.Textbox(label="Note", scale=3, elem_id="run-note")
            tags = gr.Textbox(label="Tags (comma separated)", scale=2, elem_id="run-tags")
            save_note_btn = gr.Button("Save note", scale=0, elem_id="run-save-note")
    with gr.Accordion("Compare runs (2 to 5)", open=False):
        with gr.Row():
            compare_pick = gr.Dropdown(label="Runs", choices=[], multiselect=True, max_choices=5, scale=4,
                                       elem_id="compare-select")
            compare_axis = gr.Radio(["step", "tokens"], value="step", label="X axis", scale=1,
                                    elem_id="compare-axis")
            compare_btn = gr.Button("Compare", scale=0, elem_id="compare-run")
        compare_plot = gr.LinePlot(value=None, x="x", y="loss", color="series", title="Loss by step", x_title="step",
                                   elem_id="compare-curve", height=300)
        compare_note = gr.Markdown("", elem_id="compare-note")
        compare_diff = gr.Dataframe(value=pd.DataFrame(columns=[DIFF_HEADERS_FIRST]), interactive=False, wrap=True,
                                    elem_id="compare-diff")
    timer = gr.Timer(REFRESH_SECONDS)

    def refresh(run_id, text, wanted, model, dataset, request: gr.Request):
        user = current_user(runs, request)
        query = RunQuery(search=text or None, status=list(wanted or []) or None, model=model or None,
                         dataset=dataset or None, limit=PAGE_SIZE)
        history, total = runs.search_runs(user, query)
        if run_id is None and history:
            run_id = history[0].id  # newest first: follow the run just submitted
            dropdown = gr.Dropdown(choices=run_choices(history), value=run_id)
        else:  # the value stays as it is: a refresh that started before a pick must not undo it
            dropdown = gr.Dropdown(choices=run_choices(history))
        picks = gr.Dropdown(choices=run_choices(history))
        table_value = runs_table(history)
        hidden = gr.Button(visible=False)
        if run_id is None:
            empty = "No runs match these filters." if any((text, wanted, model, dataset)) else \
                "No runs yet: submit one from the Train tab."
            return dropdown, table_value, empty, curve_frame([]), "", "", history_table([]), hidden, hidden, picks
        try:
            run = runs.get_run(user, run_number(run_id))
        except (NotFound, ValueError) as err:
            return dropdown, table_value, str(err), curve_frame([]), "", "", history_table([]), hidden, hidden, picks
        try:
            points = runs.metrics(user, run.id)
            url = runs.mlflow_url(run)
        except Exception as err:  # MLflow down: say so, keep the rest of the page
            points, url = [], None
            run.status_reason = f"{run.status_reason or ''} (metrics unavailable: {err})".strip()
        text_details = run_details(run, url)
        if total > len(history):
            text_details += f"  \n_(the table shows the newest {len(history)} of {total_text(total)} matching runs)_"
        text_details += "\n\n" + record_markdown(runs.reproducibility(user, run.id))  # a table: last
        resume = gr.Button(visible=runs.resumable_checkpoint(user, run) is not None)
        cancellable = gr.Button(visible=not run.status.is_final)
        return (dropdown, table_value, text_details, curve_frame(points),
                runs.logs(user, run.id, tail_bytes=20_000), run.config_yaml,
                history_table(runs.status_events(user, run.id)), resume, cancellable, picks)

    def cancel(run_id, request: gr.Request):
        user = current_user(runs, request)
        if run_id is None:
            raise gr.Error("Select a run to cancel.")
        try:
            run = runs.cancel(user, run_number(run_id))
        except (NotFound, PortalError, ValueError) as err:
            raise gr.Error(str(err)) from err
        gr.Info(f"Run #{run.id} is {run.status.value}.")

    def load_note(run_id, request: gr.Request):
        user = current_user(runs, request)
        try:
            run = runs.get_run(user, run_number(run_id))
        except (NotFound, ValueError):
            return "", ""
        return run.note, run.tags.replace(",", ", ")

    def save_note(run_id, text, tag_text, request: gr.Request):
        user = current_user(runs, request)
        try:
            run = runs.annotate(user, run_number(run_id), note=text or "", tags=str(tag_text or "").split(","))
        except (NotFound, PortalError, ValueError) as err:
            raise gr.Error(str(err)) from err
        gr.Info(f"Note of run #{run.id} saved.")

    def load_files(run_id, request: gr.Request):
        user = current_user(runs, request)
        try:
            found, cut = runs.artifacts(user, run_number(run_id))
        except (NotFound, ValueError):
            return files_table([]), gr.Dropdown(choices=[], value=None)
        choices = [a.path for a in found if a.downloadable]
        return files_table(found, cut), gr.Dropdown(choices=choices, value=None)

    def download_log(run_id, request: gr.Request):
        user = current_user(runs, request)
        if run_id is None:
            raise gr.Error("Select a run first.")
        try:
            run, handle, size = runs.open_log(user, run_number(run_id))
        except (NotFound, ValueError) as err:
            raise gr.Error(str(err)) from err

        def write(out):
            with handle:
                left = size
                while left > 0 and (data := handle.read(min(left, 1 << 20))):
                    out.write(data)
                    left -= len(data)

        path, folder = private_copy(f"run-{run.id}-{run.name}.log", write)
        return gr.File(value=path, visible=True), folder

    def download_artifact(run_id, path, request: gr.Request):
        user = current_user(runs, request)
        if run_id is None or not path:
            raise gr.Error("Pick a file of the run first.")
        try:
            name, data = runs.artifact_bytes(user, run_number(run_id), str(path))
        except (NotFound, PortalError, ValueError) as err:
            raise gr.Error(str(err)) from err
        local, folder = private_copy(name, lambda out: out.write(data))
        return gr.File(value=local, visible=True), folder

    def resume(run_id, request: gr.Request):
        user = current_user(runs, request)
        if run_id is None:
            raise gr.Error("Select a run to resume.")
        try:
            child = runs.resume(user, run_number(run_id))
        except ConfigRejected as err:
            raise gr.Error(f"The resumed run was refused: {err}") from err
        except (NotFound, PortalError, ValueError) as err:
            raise gr.Error(str(err)) from err
        gr.Info(f"Run #{child.id} ({child.name}) resumes run #{child.parent_id} from its last checkpoint.")
        return gr.Dropdown(choices=run_choices([child]), value=child.id)

    def load_evaluations(run_id, request: gr.Request):
        user = current_user(runs, request)
        try:
            run = runs.get_run(user, run_number(run_id))
            items = runs.evaluations(user, run.id)
        except (NotFound, ValueError):
            return gr.Dropdown(choices=[], value=[]), "_Select a run._"
        names = runs.catalog.dataset_names(runs.space(user)) if run.owner_id == user.id else []
        return gr.Dropdown(choices=names), evaluations_text(items)

    def evaluate(run_id, picked, samples, tokens, request: gr.Request):
        user = current_user(runs, request)
        if run_id is None:
            raise gr.Error("Select a succeeded run to evaluate.")
        try:
            child = runs.evaluate(user, run_number(run_id), list(picked or []) or None,
                                  int(samples) if samples else None, max_new_tokens=int(tokens or 128))
        except ConfigRejected as err:
            raise gr.Error(f"The eval job was refused: {err}") from err
        except (NotFound, PortalError, ValueError) as err:
            raise gr.Error(str(err)) from err
        gr.Info(f"Eval run #{child.id} ({child.name}) evaluates run #{child.parent_id} on {child.datasets}.")

    def merge(run_id, name, request: gr.Request):
        user = current_user(runs, request)
        if run_id is None:
            raise gr.Error("Select a succeeded run to merge.")
        try:
            child = runs.merge(user, run_number(run_id), (name or "").strip() or None)
        except ConfigRejected as err:
            raise gr.Error(f"The export job was refused: {err}") from err
        except (NotFound, PortalError, ValueError) as err:
            raise gr.Error(str(err)) from err
        gr.Info(f"Export run #{child.id} merges run #{child.parent_id}; it is registered as "
                f"{child.registered_model} when it succeeds.")

    def compare(picked, axis, request: gr.Request):
        user = current_user(runs, request)
        try:
            comparison = runs.compare(user, [run_number(p) for p in picked or []], x_axis=axis or "step")
        except (NotFound, PortalError, ValueError) as err:
            raise gr.Error(str(err)) from err
        except Exception as err:  # MLflow unreachable: say so instead of Gradio's generic error
            raise gr.Error(f"the curves could not be read from MLflow: {err.__class__.__name__}") from err
        title = X_TITLES[comparison.x_axis]
        plot = gr.LinePlot(value=compare_curves(comparison), x_title=title, title=f"Loss by {title}")
        note = "  \n".join(f"_Note: {n}_" for n in comparison.notes)
        return plot, compare_table(comparison), note

    def tick(run_id, text, wanted, model, dataset, request: gr.Request):
        """The timer's refresh: everything but the compare picker (it would fight the user's picking)."""
        return refresh(run_id, text, wanted, model, dataset, request)[:-1]

    filters = [search, statuses, model_filter, dataset_filter]
    outputs = [selected, table, details, curve, logs, config, history_box, resume_btn, cancel_btn, compare_pick]
    timer.tick(tick, [selected, *filters], outputs[:-1], show_progress="hidden", concurrency_limit=None)
    refresh_btn.click(refresh, [selected, *filters], outputs, concurrency_limit=None).then(
        load_files, [selected], [files, file_pick]).then(load_evaluations, [selected], [eval_datasets, eval_results])
    for box in (search, model_filter, dataset_filter):
        box.submit(refresh, [selected, *filters], outputs, concurrency_limit=None)
    statuses.input(refresh, [selected, *filters], outputs, concurrency_limit=None)
    selected.input(refresh, [selected, *filters], outputs, concurrency_limit=None)
    selected.change(load_note, [selected], [note, tags])  # also when the tab follows the newest run
    selected.change(load_files, [selected], [files, file_pick])
    selected.change(load_evaluations, [selected], [eval_datasets, eval_results])
    # another run: the last run's downloads must not stay on its page
    selected.change(lambda: (gr.File(value=None, visible=False),) * 2, None, [log_file, artifact_file],
                    show_progress="hidden")
    eval_btn.click(evaluate, [selected, eval_datasets, eval_samples, eval_tokens], None).then(
        load_evaluations, [selected], [eval_datasets, eval_results])
    merge_btn.click(merge, [selected, merge_name], None).then(refresh, [selected, *filters], outputs)
    log_btn.click(download_log, [selected], [log_file, copy_folder]).then(drop_copy, [copy_folder], [copy_folder])
    file_btn.click(download_artifact, [selected, file_pick], [artifact_file, copy_folder]).then(
        drop_copy, [copy_folder], [copy_folder])
    resume_btn.click(resume, [selected], [selected]).then(refresh, [selected, *filters], outputs)
    cancel_btn.click(cancel, [selected], None).then(refresh, [selected, *filters], outputs)
    save_note_btn.click(save_note, [selected, note, tags], None).then(refresh, [selected, *filters], outputs)
    compare_btn.click(compare, [compare_pick, compare_axis], [compare_plot, compare_diff, compare_note])
    return {"selected": selected, "table": table, "details": details, "curve": curve, "logs": logs,
            "config": config, "timer": timer, "refresh": refresh, "clone": clone_btn, "filters": filters,
            "outputs": outputs}
