"""Train tab: LLaMA Board's own form, wired to the portal, plus Download/Load YAML."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
import tempfile
from typing import Any

import gradio as gr

from llamaboard_ext import compile as lbc
from llamaboard_ext.form import FormError, TrainForm, build_train_form, form_defaults

from ..request_context import page_session
from ..runs import ConfigRejected, PortalError, RunService
from ..storage import check_name
from .common import current_user

FORM_SUFFIX = ".yaml"
MAX_PENDING_CLONES = 10_000


class TrainBackend:
    """The form's view of the portal: every call is made as the signed-in user."""

    def __init__(self, runs: RunService, defaults: dict[str, Any]):
        self.runs = runs
        self.defaults = defaults  # the form's initial values: what an unset field means
        # (user, page) -> the run cloned into that page's form; bounded: closed pages leave entries behind
        self._parents: OrderedDict[tuple[str, str | None], int] = OrderedDict()

    def remember_parent(self, user: str, run_id: int | None) -> None:
        """The run whose config this page's form now holds (None: a config from elsewhere)."""
        key = (user, page_session.get())
        if run_id is None:
            self._parents.pop(key, None)
        else:
            self._parents[key] = run_id
            self._parents.move_to_end(key)
            while len(self._parents) > MAX_PENDING_CLONES:
                self._parents.popitem(last=False)

    def clone_values(self, user: str, run_id: int) -> tuple[dict[str, Any], list[str]]:
        """A run's config as form values (a new run name), remembered as this page's parent."""
        run = self.runs.get_run(self._user(user), run_id, purpose="clone")
        loaded = lbc.args_to_form(lbc.yaml_to_args(run.config_yaml), self.runs.catalog.models())
        values = dict(loaded.values)
        values["train.output_dir"] = f"{run.name}_clone"[:100]
        self.remember_parent(user, run.id)
        return values, loaded.warnings

    def args(self, values: dict[str, Any]) -> dict[str, Any]:
        """Form values -> LLaMA-Factory args (raises FormError naming the fields)."""
        return lbc.form_to_args(values, self.defaults)

    def user_of(self, request: gr.Request) -> str:
        return current_user(self.runs, request).username

    def _user(self, username: str):
        return self.runs.user(username)

    def model_choices(self, user: str) -> dict[str, str]:
        return self.runs.catalog.models()

    def model_info(self, user: str, model_name: str) -> dict[str, Any] | None:
        """What the form shows for a catalog model: its template, and its license and GPU memory
        hints as one line. None for a name without a catalog entry (a discovered folder, LLaMA Board's list)."""
        entry = self.runs.catalog.model_entry(model_name)
        if entry is None or entry.name != model_name:
            return None
        note = entry.note()
        if entry.trust_remote_code:
            note = " · ".join(p for p in (note, "runs its own code (approved by an admin)") if p)
        return {"template": entry.template, "note": note, "license": entry.license,
                "gpu_memory_gb": dict(entry.gpu_memory_gb), "trust_remote_code": entry.trust_remote_code}

    def dataset_choices(self, user: str, ranking: bool) -> list[str]:
        return self.runs.catalog.dataset_names(self.runs.space(self._user(user)), ranking)

    def dataset_preview(self, user: str, dataset: str) -> list[Any]:
        path = self.runs.catalog.dataset_file(self.runs.space(self._user(user)), dataset)
        with open(path, encoding="utf-8") as fh:
            if path.suffix == ".jsonl":
                return [json.loads(line) for _, line in zip(range(1000), fh) if line.strip()]
            if path.suffix == ".json":
                data = json.load(fh)
                return data[:1000] if isinstance(data, list) else [data]
            return [line.rstrip("\n") for _, line in zip(range(1000), fh)]

    def checkpoint_choices(self, user: str, model_name: str, finetuning_type: str) -> list[str]:
        runs = self.runs.list_runs(self._user(user))
        return [r.output_dir for r in runs if r.status.value == "succeeded" and r.finetuning_type == finetuning_type
                and r.owner == user]

    def _form_path(self, user: str, name: str):
        name = check_name(name[: -len(FORM_SUFFIX)] if name.endswith(FORM_SUFFIX) else name, "form name")
        return self.runs.space(self._user(user)).forms_dir / f"{name}{FORM_SUFFIX}"

    def saved_forms(self, user: str) -> list[str]:
        forms_dir = self.runs.space(self._user(user)).forms_dir
        return sorted(p.name for p in forms_dir.glob(f"*{FORM_SUFFIX}"))

    def save_form(self, user: str, name: str, values: dict[str, Any]) -> str:
        path = self._form_path(user, name)
        args = self.args(values)
        path.write_text(lbc.args_to_yaml(args), encoding="utf-8")
        self.runs.audit(user, "save_form", path.name)
        return path.name

    def load_form(self, user: str, name: str) -> dict[str, Any]:
        path = self._form_path(user, name)
        if not path.is_file():
            raise FileNotFoundError(f"no saved form named '{path.name}' in your space")
        loaded = lbc.args_to_form(lbc.yaml_to_args(path.read_bytes()), self.runs.catalog.models())
        self.remember_parent(user, None)
        return loaded.values

    def preview(self, user: str, values: dict[str, Any]) -> str:
        try:
            return self.runs.prepare(self._user(user), self.args(values), for_submit=False).yaml
        except ConfigRejected as err:
            raise FormError(err.problems) from err

    def submit(self, user: str, values: dict[str, Any]) -> str:
        try:
            account = self._user(user)
            parent_id = self._parents.get((user, page_session.get()))  # kept until a submit succeeds
            parent = self.runs.get_run(account, parent_id) if parent_id is not None else None
            run = self.runs.submit_args(account, self.args(values), source="clone" if parent else "form", parent=parent)
        except ConfigRejected as err:
            raise FormError(err.problems) from err
        except PortalError as err:
            raise ValueError(str(err)) from err
        self._parents.pop((user, page_session.get()), None)
        origin = f", cloned from run #{run.parent_id}" if run.parent_id else ""
        return f"Run #{run.id} **{run.name}** submitted ({run.status.value}{origin}). Follow it in the **Runs** tab."


def build_train_tab(runs: RunService) -> TrainForm:
    backend = TrainBackend(runs, form_defaults())
    form = build_train_form(backend)
    output_box = form.component("train.output_box")
    with gr.Row():
        download_btn = gr.Button("Download YAML", elem_id="download-yaml")
        upload_btn = gr.UploadButton("Load YAML", file_types=[".yaml", ".yml"], elem_id="load-yaml")
        download_file = gr.File(label="YAML to download", visible=False, interactive=False, elem_id="yaml-file")

    def download_yaml(data: dict, request: gr.Request):
        user = current_user(runs, request)
        values = form.values_from(data)
        try:
            text = backend.preview(user.username, values)
        except FormError as err:
            problems = err.problems
            lines = "\n".join(f"- **{k}**: {v}" for k, v in problems.items())
            return {output_box: f"Cannot download: fix these fields (your form is unchanged):\n\n{lines}",
                    download_file: gr.File(visible=False)}
        name = check_name(str(values.get("train.output_dir") or "config"), "run name")
        folder = tempfile.mkdtemp(prefix="yaml-", dir=os.environ.get("GRADIO_TEMP_DIR"))
        path = os.path.join(folder, f"{name}.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        return {output_box: f"`{name}.yaml` is ready below.", download_file: gr.File(value=path, visible=True)}

    def load_yaml(file, request: gr.Request):
        user = current_user(runs, request)
        path = getattr(file, "name", file)
        try:
            with open(path, "rb") as fh:
                raw = fh.read(1_000_001)
            if len(raw) > 1_000_000:
                raise lbc.YamlError("the file is over 1 MB; a training config is a few KB")
            loaded = lbc.args_to_form(lbc.yaml_to_args(raw), runs.catalog.models())
        except (lbc.YamlError, OSError) as err:
            return {output_box: f"Not loaded (your form is unchanged): {err}"}
        finally:
            try:
                os.unlink(path)  # uploads never stay in Gradio's shared temp folder
            except OSError:
                pass
        backend.remember_parent(user.username, None)  # the form now holds a config from a file
        updates: dict[Any, Any] = {}
        for elem_id, value in loaded.values.items():
            if elem_id in form.elems:
                updates[form.elems[elem_id]] = value
        note = "\n\n".join(f"**Warning:** {w}" for w in loaded.warnings)
        updates[output_box] = f"Config `{os.path.basename(str(path))}` loaded into the form.\n\n{note}".strip()
        return updates

    download_btn.click(download_yaml, set(form.inputs), [output_box, download_file], concurrency_limit=None)
    upload_btn.upload(load_yaml, [upload_btn], form.inputs + [output_box], concurrency_limit=None)
    form.portal_backend = backend  # type: ignore[attr-defined]  (the Runs tab's Clone fills this form)
    return form
