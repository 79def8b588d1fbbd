"""Train tab: LLaMA Board's own form, wired to the portal, plus Download/Load YAML."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import gradio as gr

from llamaboard_ext import compile as lbc
from llamaboard_ext.form import FormError, TrainForm, build_train_form, form_defaults

from ..runs import ConfigRejected, PortalError, RunService
from ..storage import check_name
from .common import current_user

FORM_SUFFIX = ".yaml"


class TrainBackend:
    """The form's view of the portal: every call is made as the signed-in user."""

    def __init__(self, runs: RunService, defaults: dict[str, Any]):
        self.runs = runs
        self.defaults = defaults  # the form's initial values: what an unset field means

    def args(self, values: dict[str, Any]) -> dict[str, Any]:
        """Form values -> LLaMA-Factory args (raises FormError naming the fields)."""
        return lbc.form_to_args(values, self.defaults)

    def user_of(self, request: gr.Request) -> str:
        return current_user(self.runs, request).username

    def _user(self, username: str):
        return self.runs.user(username)

    def model_choices(self, user: str) -> dict[str, str]:
        return self.runs.catalog.models()

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
        return loaded.values

    def preview(self, user: str, values: dict[str, Any]) -> str:
        try:
            return self.runs.prepare(self._user(user), self.args(values), for_submit=False).yaml
        except ConfigRejected as err:
            raise FormError(err.problems) from err

    def submit(self, user: str, values: dict[str, Any]) -> str:
        try:
            run = self.runs.submit_args(self._user(user), self.args(values), source="form")
        except ConfigRejected as err:
            raise FormError(err.problems) from err
        except PortalError as err:
            raise ValueError(str(err)) from err
        return f"Run #{run.id} **{run.name}** submitted ({run.status.value}). Follow it in the **Runs** tab."


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
        current_user(runs, request)
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
        updates: dict[Any, Any] = {}
        for elem_id, value in loaded.values.items():
            if elem_id in form.elems:
                updates[form.elems[elem_id]] = value
        note = "\n\n".join(f"**Warning:** {w}" for w in loaded.warnings)
        updates[output_box] = f"Config `{os.path.basename(str(path))}` loaded into the form.\n\n{note}".strip()
        return updates

    download_btn.click(download_yaml, set(form.inputs), [output_box, download_file], concurrency_limit=None)
    upload_btn.upload(load_yaml, [upload_btn], form.inputs + [output_box], concurrency_limit=None)
    return form
