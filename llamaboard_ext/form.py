"""LLaMA Board's own top bar and train form, built into the portal's Blocks, wired to the portal.

LLaMA Board binds its event handlers while it builds the components, straight to process-wide
objects (one Runner, folders under the working directory, ``os.environ``). Here the components
are built by LLaMA Board's own ``create_top``/``create_train_tab`` while the module-level helpers
they bind are swapped for portal ones, and with an engine whose runner is the portal's — so every
button reaches a :class:`FormBackend` with the user taken from ``gr.Request``. Pure helpers
(``can_quantize``, ``check_template``, ...) stay LLaMA Board's. ``ALLOWED_LLAMABOARD_HANDLERS``
lists them; a test fails on any other LLaMA Board function bound in the portal's Blocks.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Protocol
from unittest import mock

import gradio as gr
from llamafactory.extras.constants import PEFT_METHODS
from llamafactory.webui import common as lf_common
from llamafactory.webui.components import data as lf_data
from llamafactory.webui.components import top as lf_top
from llamafactory.webui.components import train as lf_train
from llamafactory.webui.components.top import create_top
from llamafactory.webui.components.train import create_train_tab
from llamafactory.webui.locales import LOCALES
from llamafactory.webui.manager import Manager

from .compile import FormError
from .stages import uses_pair_data

# LLaMA Board functions that only compute from their inputs: safe to keep bound.
ALLOWED_LLAMABOARD_HANDLERS = frozenset({
    "llamafactory.webui.control.can_quantize",
    "llamafactory.webui.control.can_quantize_to",
    "llamafactory.webui.control.check_template",
    "llamafactory.webui.components.data.prev_page",
    "llamafactory.webui.components.data.next_page",
    "llamafactory.webui.components.data.create_preview_box.<locals>.<lambda>",
})

# Labels the portal changes: the buttons do something else than in LLaMA Board.
PORTAL_LABELS = {
    "start_btn": {"value": "Submit run"},
    "cmd_preview_btn": {"value": "Preview YAML"},
    "arg_save_btn": {"value": "Save form"},
    "arg_load_btn": {"value": "Load form"},
    "output_dir": {"label": "Run name", "info": "Names the run and its output folder in your space."},
    "config_path": {"label": "Saved form", "info": "A form saved in your space (Save form / Load form)."},
    "output_box": {"value": "Ready. Fill the form, then Preview YAML or Submit run."},
    "dataset_dir": {"label": "Data folder", "info": "Your datasets and the shared ones (set by the portal)."},
}

MODEL_PATH_INFO = LOCALES["model_path"]["en"]["info"]  # the model path's info text when no catalog note applies

# Defaults a careful team uses, over LLaMA Board's own (decision 0023): 10% of the data held out,
# so every run logs eval_loss (LLaMA Board then sets eval_strategy "steps", eval_steps = save_steps,
# and LLaMA-Factory evaluates once more at the end); the seed written down in the config.
# LLaMA Board's _parse_train_args always sets include_num_input_tokens_seen (tokens on the x axis).
PORTAL_FORM_DEFAULTS = {
    "train.val_size": 0.1,
    "train.extra_args": '{"optim": "adamw_torch", "seed": 42}',
}
_BUILD_LOCK = threading.Lock()  # the swaps below are module-wide while the components are built


class FormBackend(Protocol):
    """What the form needs from the portal. ``user`` is the name ``user_of`` returned for the request."""

    def user_of(self, request: gr.Request) -> str: ...  # the signed-in user's name; raises gr.Error when none
    def model_choices(self, user: str) -> dict[str, str]: ...  # name -> path
    # optional: a catalog model's {"template": ..., "note": ...} (None when the name has no entry)
    def model_info(self, user: str, model_name: str) -> dict[str, Any] | None: ...
    def dataset_choices(self, user: str, ranking: bool) -> list[str]: ...
    def dataset_preview(self, user: str, dataset: str) -> list[Any]: ...
    def checkpoint_choices(self, user: str, model_name: str, finetuning_type: str) -> list[str]: ...
    def saved_forms(self, user: str) -> list[str]: ...
    def save_form(self, user: str, name: str, values: dict[str, Any]) -> str: ...
    def load_form(self, user: str, name: str) -> dict[str, Any]: ...
    def preview(self, user: str, values: dict[str, Any]) -> str: ...
    def submit(self, user: str, values: dict[str, Any]) -> str: ...


@dataclass
class TrainForm:
    """The built form: element id -> component, plus the portal's extra controls."""

    elems: dict[str, Any]
    manager: Manager
    input_ids: list[str] = field(default_factory=list)

    def component(self, elem_id: str):
        return self.elems[elem_id]

    @property
    def inputs(self) -> list[Any]:
        return [self.elems[i] for i in self.input_ids]

    def values_from(self, data: dict[Any, Any]) -> dict[str, Any]:
        return {self.manager.get_id_by_elem(c): v for c, v in data.items() if c in self.manager._elem_to_id}


def _apply_labels(elems: dict[str, Any], lang: str = "en") -> None:
    for elem_id, elem in elems.items():
        name = elem_id.split(".")[-1]
        props = dict(LOCALES.get(name, {}).get(lang, {}))
        props.update(PORTAL_LABELS.get(name, {}))
        for key, value in props.items():
            if hasattr(elem, key):
                setattr(elem, key, value)


class _PortalRunner:
    """Sits at ``engine.runner`` while LLaMA Board builds the train tab: its buttons call this."""

    def __init__(self, form: "_FormBinder"):
        self._form = form

    # LLaMA Board calls these with the form as {component: value}.
    def preview_train(self, data: dict, request: gr.Request):
        return self._form.on_preview(data, request)

    def run_train(self, data: dict, request: gr.Request):
        return self._form.on_submit(data, request)

    def save_args(self, data: dict, request: gr.Request):
        return self._form.on_save(data, request)

    def load_args(self, lang: str, config_path: str, request: gr.Request):
        return self._form.on_load(config_path, request)

    def set_abort(self, request: gr.Request):
        gr.Info("Cancel a run from the Runs tab.")

    def monitor(self, request: gr.Request):
        return {}

    def check_output_dir(self, lang: str, model_name: str, finetuning_type: str, output_dir: str, request: gr.Request):
        return {}


class _Engine:
    def __init__(self, binder: "_FormBinder"):
        self.manager = binder.manager
        self.runner = _PortalRunner(binder)
        self.demo_mode = False


class _FormBinder:
    """Holds the backend and turns Gradio events into backend calls."""

    def __init__(self, backend: FormBackend):
        self.backend = backend
        self.manager = Manager()
        self.form: TrainForm | None = None

    # ---- helpers swapped into LLaMA Board's modules while it builds ------------------------
    def _catalog_info(self, user: str, model_name: str) -> dict[str, Any]:
        lookup = getattr(self.backend, "model_info", None)
        return (lookup(user, model_name) if lookup else None) or {}

    def get_model_info(self, model_name: str, request: gr.Request):
        """Model path for the chosen model (on every change, a loaded form's too). A catalog model
        keeps the template here, so a loaded form keeps its own; :meth:`catalog_template` sets the
        entry's template when the user picks the model. The entry's license and GPU memory hints
        go in the model path's info text."""
        user = self.backend.user_of(request)
        models = self.backend.model_choices(user)
        if model_name in models:
            note = self._catalog_info(user, model_name).get("note")
            return gr.update(value=models[model_name], info=note or MODEL_PATH_INFO), gr.update()
        path = lf_common.get_model_path(model_name) if model_name and model_name != "Custom" else ""
        return gr.update(value=path, info=MODEL_PATH_INFO), lf_common.get_template(model_name)

    def catalog_template(self, model_name: str, request: gr.Request):
        """The catalog entry's template when the user picks its model (an ``input`` event, never
        fired by loading a form); the template chosen stays when the entry names none."""
        template = self._catalog_info(self.backend.user_of(request), model_name).get("template")
        return gr.update(value=template) if template else gr.update()

    def list_checkpoints(self, model_name: str, finetuning_type: str, request: gr.Request):
        choices = self.backend.checkpoint_choices(self.backend.user_of(request), model_name or "", finetuning_type)
        # no value: a loaded config's checkpoint is kept (LLaMA Board would clear it)
        return gr.Dropdown(choices=choices, multiselect=finetuning_type in PEFT_METHODS)

    def list_datasets(self, dataset_dir: str, training_stage: str, request: gr.Request):
        ranking = bool(uses_pair_data(training_stage))
        return gr.Dropdown(choices=self.backend.dataset_choices(self.backend.user_of(request), ranking))

    def change_stage(self, training_stage: str, request: gr.Request):
        """LLaMA Board clears the datasets on a stage change, which also wipes a loaded config's
        datasets; here the choices follow the stage and the chosen datasets stay."""
        ranking = bool(uses_pair_data(training_stage))
        return gr.Dropdown(choices=self.backend.dataset_choices(self.backend.user_of(request), ranking)), gr.update()

    def list_output_dirs(self, model_name: str, finetuning_type: str, current_time: str):
        return gr.Dropdown(choices=[f"train_{current_time}"] if current_time else [])

    def list_config_paths(self, current_time: str, request: gr.Request):
        saved = self.backend.saved_forms(self.backend.user_of(request))
        default = [f"{current_time}.yaml"] if current_time else []
        return gr.Dropdown(choices=default + [s for s in saved if s not in default])

    def can_preview(self, dataset_dir: str, dataset: list, request: gr.Request):
        return gr.Button(interactive=bool(dataset))

    def get_preview(self, dataset_dir: str, dataset: list, page_index: int, request: gr.Request):
        if not dataset:
            return 0, [], gr.Column(visible=False)
        try:
            rows = self.backend.dataset_preview(self.backend.user_of(request), dataset[0])
        except (ValueError, PermissionError) as err:
            raise gr.Error(str(err)) from err
        size = lf_data.PAGE_SIZE
        return len(rows), rows[size * page_index: size * (page_index + 1)], gr.Column(visible=True)

    @staticmethod
    def ignore(*_args, **_kwargs) -> None:
        """Replaces LLaMA Board's save_config/switch_hub: no process-wide file or env is written."""
        return None

    # ---- button handlers ------------------------------------------------------------------
    def _values(self, data: dict) -> dict[str, Any]:
        assert self.form is not None
        return self.form.values_from(data)

    def _output_box(self):
        return self.manager.get_elem_by_id("train.output_box")

    def _error_text(self, err: Exception) -> str:
        if isinstance(err, FormError):
            lines = [f"- **{key}**: {msg}" for key, msg in err.problems.items()]
            return "Not submitted: fix these fields (your form is unchanged):\n\n" + "\n".join(lines)
        return f"Not submitted: {err}"

    def on_preview(self, data: dict, request: gr.Request):
        try:
            text = self.backend.preview(self.backend.user_of(request), self._values(data))
        except (FormError, ValueError, PermissionError) as err:
            gr.Warning("The form has problems: see the message below the buttons.")
            return {self._output_box(): self._error_text(err).replace("Not submitted", "Cannot preview")}
        return {self._output_box(): f"```yaml\n{text}```"}

    def on_submit(self, data: dict, request: gr.Request):
        try:
            message = self.backend.submit(self.backend.user_of(request), self._values(data))
        except (FormError, ValueError, PermissionError) as err:
            gr.Warning("Not submitted: see the message below the buttons.")
            return {self._output_box(): self._error_text(err)}
        gr.Info(message.replace("**", ""))  # toasts show plain text
        return {self._output_box(): message}

    def on_save(self, data: dict, request: gr.Request):
        values = self._values(data)
        try:
            path = self.backend.save_form(self.backend.user_of(request), str(values.get("train.config_path") or ""), values)
        except (ValueError, PermissionError) as err:
            return {self._output_box(): f"Not saved: {err}"}
        return {self._output_box(): f"Form saved as `{path}` in your space."}

    def on_load(self, name: str, request: gr.Request):
        try:
            values = self.backend.load_form(self.backend.user_of(request), name or "")
        except (ValueError, PermissionError, FileNotFoundError) as err:
            return {self._output_box(): f"Not loaded: {err}"}
        out: dict[Any, Any] = {self._output_box(): f"Form `{name}` loaded."}
        for elem_id, value in values.items():
            if elem_id in self.form.elems and elem_id != "train.output_box":
                out[self.form.elems[elem_id]] = value
        return out

    # ---- building -------------------------------------------------------------------------
    def build(self) -> TrainForm:
        swaps = [
            (lf_top, "get_model_info", self.get_model_info),
            (lf_top, "list_checkpoints", self.list_checkpoints),
            (lf_top, "save_config", self.ignore),
            (lf_top, "switch_hub", self.ignore),
            (lf_train, "list_checkpoints", self.list_checkpoints),
            (lf_train, "list_datasets", self.list_datasets),
            (lf_train, "list_output_dirs", self.list_output_dirs),
            (lf_train, "change_stage", self.change_stage),
            (lf_train, "list_config_paths", self.list_config_paths),
            (lf_train, "get_device_count", lambda: 1),
            (lf_data, "can_preview", self.can_preview),
            (lf_data, "get_preview", self.get_preview),
        ]
        engine = _Engine(self)
        with _BUILD_LOCK, ExitStack() as stack:
            for module, name, replacement in swaps:
                stack.enter_context(mock.patch.object(module, name, replacement))
            top = create_top()
            top["model_name"].input(self.catalog_template, [top["model_name"]], [top["template"]], queue=False)
            self.manager.add_elems("top", top)
            self.manager.add_elems("train", create_train_tab(engine))
        elems = dict(self.manager._id_to_elem)
        _apply_labels(elems)
        for elem_id, elem in elems.items():  # stable DOM ids: "train.dataset" -> #lb-train-dataset
            if getattr(elem, "elem_id", None) is None:
                elem.elem_id = "lb-" + elem_id.replace(".", "-").replace("_", "-")
        # The portal decides these: hub and data folder are settings, Abort lives in the Runs tab.
        for hidden in ("top.hub_name", "train.dataset_dir", "train.stop_btn", "train.device_count", "train.loss_viewer",
                       "train.progress_bar"):
            elems[hidden].visible = False
        for elem_id, value in PORTAL_FORM_DEFAULTS.items():
            elems[elem_id].value = value
        elems["top.lang"].visible = False  # labels are applied once, in English
        elems["top.lang"].value = "en"
        self.form = TrainForm(elems=elems, manager=self.manager, input_ids=sorted(form_input_ids(elems)))
        return self.form


def form_input_ids(elems: dict[str, Any]) -> set[str]:
    """Element ids whose values make up the form (what LLaMA Board's Runner reads)."""
    skip_types = (gr.Button, gr.Markdown, gr.Plot, gr.Accordion, gr.JSON, gr.Column, gr.Row)
    skip = {"train.current_time", "train.resume_btn", "train.progress_bar", "train.device_count",
            "train.preview_count", "train.page_index", "train.output_box"}
    return {i for i, e in elems.items() if not isinstance(e, skip_types) and i not in skip}


def build_train_form(backend: FormBackend) -> TrainForm:
    """Build LLaMA Board's top bar and train form inside the current ``gr.Blocks`` context."""
    return _FormBinder(backend).build()


class _NullBackend:
    def __getattr__(self, name: str) -> Callable[..., Any]:
        raise RuntimeError("the defaults form is never wired")


@lru_cache(maxsize=1)
def form_defaults() -> dict[str, Any]:
    """The form's initial values, read from LLaMA Board's components (built once, off screen)."""
    with gr.Blocks():
        form = build_train_form(_NullBackend())  # type: ignore[arg-type]
    return {elem_id: form.elems[elem_id].value for elem_id in form.input_ids}


def llamaboard_css() -> str:
    """LLaMA Board's own stylesheet (the modal preview box and spacing its form relies on)."""
    from llamafactory.webui.css import CSS

    return CSS

