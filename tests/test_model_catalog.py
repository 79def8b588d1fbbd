"""The admin's model catalog: settings (file and env), the list in the form, the template it picks,
the hub rule and ``trust_remote_code`` only for approved catalog models. Real parts, no mocks."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import yaml
from pydantic import ValidationError

from portal.catalog import Catalog, CatalogError
from portal.config import Settings
from portal.runs import ConfigRejected

HUB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
REFUSED = "only catalog models an admin approved may run their own code"


def _tiny(**extra) -> dict:
    return {"name": "Tiny chat", "path": "tiny-llama", "template": "llama3", "license": "Apache-2.0, internal use",
            "gpu_memory_gb": {"lora": 18, "qlora": 10, "full": 80}, **extra}


def _hub(**extra) -> dict:
    return {"name": "Qwen 0.5B", "hub_id": HUB_MODEL, "template": "qwen", **extra}


def _base(services) -> dict:
    return {"stage": "sft", "do_train": True, "finetuning_type": "lora", "template": "default",
            "dataset": "demo_alpaca", "output_dir": "cat1", "learning_rate": 1e-3,
            "model_name_or_path": str(services.settings.shared_models_root / "tiny-llama")}


def _problems(runs, user, args) -> dict[str, str]:
    with pytest.raises(ConfigRejected) as info:
        runs.prepare(user, args, for_submit=False)
    return info.value.problems


# ---- settings ---------------------------------------------------------------------------------
def test_the_catalog_is_read_from_the_config_file(tmp_path, monkeypatch):
    config = tmp_path / "portal.yaml"
    config.write_text(yaml.safe_dump({"allow_hub_models": False, "models": [
        _tiny(), _hub(trust_remote_code=True)]}, sort_keys=False), encoding="utf-8")
    monkeypatch.setenv("PORTAL_CONFIG_FILE", str(config))
    monkeypatch.delenv("PORTAL_MODELS", raising=False)
    settings = Settings(data_root=tmp_path / "data")
    tiny, hub = settings.models
    assert tiny.name == "Tiny chat" and tiny.hub_id is None
    assert tiny.path == settings.shared_models_root / "tiny-llama"  # relative: under the shared models root
    assert tiny.gpu_memory_gb == {"lora": 18, "qlora": 10, "full": 80} and tiny.trust_remote_code is False
    assert hub.hub_id == HUB_MODEL and hub.path is None and hub.template == "qwen" and hub.trust_remote_code is True
    assert tiny.note() == "License: Apache-2.0, internal use · GPU memory: lora ~18 GB, qlora ~10 GB, full ~80 GB"


def test_the_catalog_is_read_from_PORTAL_MODELS_over_the_file(tmp_path, monkeypatch):
    config = tmp_path / "portal.yaml"
    config.write_text(yaml.safe_dump({"models": [_tiny()]}), encoding="utf-8")
    monkeypatch.setenv("PORTAL_CONFIG_FILE", str(config))
    monkeypatch.setenv("PORTAL_MODELS", json.dumps([_hub(), {"name": "Abs", "path": "/opt/models/abs"}]))
    settings = Settings(data_root=tmp_path / "data")
    assert [m.name for m in settings.models] == ["Qwen 0.5B", "Abs"]  # the env wins, as for every setting
    assert str(settings.models[1].path) == "/opt/models/abs"


@pytest.mark.parametrize("entries, words", [
    ([_tiny(hub_id=HUB_MODEL)], ["'Tiny chat'", "exactly one of path or hub_id", "both"]),
    ([{"name": "Nothing", "template": "llama3"}], ["'Nothing'", "exactly one of path or hub_id", "neither"]),
    ([_hub(), _hub(hub_id="Qwen/Other")], ["'Qwen 0.5B'", "name", "unique"]),
    ([_hub(hub_id="not-a-hub-id")], ["'Qwen 0.5B'", "hub_id", "org/name"]),
    ([_hub(hub_id="../../etc/passwd")], ["'Qwen 0.5B'", "hub_id"]),
    ([_hub(), {"name": "Again", "hub_id": HUB_MODEL}], ["'Again'", "hub_id", "'Qwen 0.5B'"]),
    ([_tiny(gpu_memory_gb={"lorra": 18})], ["'Tiny chat'", "gpu_memory_gb", "lorra"]),
])
def test_bad_entries_are_refused_naming_the_entry_and_field(tmp_path, monkeypatch, entries, words):
    monkeypatch.setenv("PORTAL_MODELS", json.dumps(entries))
    monkeypatch.delenv("PORTAL_CONFIG_FILE", raising=False)
    with pytest.raises(ValidationError) as info:
        Settings(data_root=tmp_path)
    for word in words:
        assert word in str(info.value)


def test_an_unknown_template_stops_the_portal_at_startup(tmp_path, mlflow_server):
    from portal.services import build_services

    settings = Settings(data_root=tmp_path, mlflow_tracking_uri=mlflow_server, gpus=[],
                        models=[_tiny(), _hub(template="qwen-not-a-template")])
    with pytest.raises(CatalogError) as info:
        build_services(settings, start_tracking=False)
    assert "models entry 'Qwen 0.5B': template 'qwen-not-a-template' is not a LLaMA-Factory template" in str(info.value)
    Catalog(Settings(data_root=tmp_path, models=[_tiny(), _hub()]))  # known templates pass


# ---- the catalog ------------------------------------------------------------------------------
def test_the_catalog_lists_configured_models_then_discovered_folders(make_services):
    services = make_services(models=[_hub(), _tiny()])
    shared = services.settings.shared_models_root
    shutil.copytree(shared / "tiny-llama", shared / "other-llama")  # a folder no entry names
    catalog = services.catalog
    assert catalog.models() == {"Qwen 0.5B": HUB_MODEL, "Tiny chat": str(shared / "tiny-llama"),
                                "other-llama": str(shared / "other-llama")}
    assert list(catalog.models()) == ["Qwen 0.5B", "Tiny chat", "other-llama"]  # configured first, in order
    tiny = catalog.model_entry("Tiny chat")
    assert tiny is not None and tiny.template == "llama3"
    assert catalog.model_entry(f"{shared}/../models/./tiny-llama/") == tiny  # by folder, resolved
    assert catalog.model_entry(HUB_MODEL).name == "Qwen 0.5B"  # by hub id
    assert catalog.model_entry(str(shared / "other-llama")) is None  # discovered: no entry
    assert catalog.model_entry("Qwen/Other") is None and catalog.model_entry("") is None


def test_without_a_catalog_the_shared_folders_are_the_list(make_services):
    services = make_services()
    assert services.catalog.models() == {"tiny-llama": str(services.settings.shared_models_root / "tiny-llama")}
    assert services.catalog.model_entry("tiny-llama") is None


# ---- trust_remote_code ------------------------------------------------------------------------
def test_trust_remote_code_is_refused_for_a_model_not_in_the_catalog(make_services):
    services = make_services()  # tiny-llama is only a discovered folder
    user = services.runs.ensure_user("dave")
    problems = _problems(services.runs, user, dict(_base(services), trust_remote_code=True))
    assert "trust_remote_code" in problems and REFUSED in problems["trust_remote_code"]
    assert "is not a catalog model" in problems["trust_remote_code"]
    prepared = services.runs.prepare(user, _base(services), for_submit=False)
    assert prepared.args["trust_remote_code"] is False
    assert yaml.safe_load(prepared.yaml).get("trust_remote_code", False) is False


def test_trust_remote_code_is_refused_for_a_catalog_model_without_approval(make_services):
    services = make_services(models=[_tiny()])
    user = services.runs.ensure_user("dave")
    problems = _problems(services.runs, user, dict(_base(services), trust_remote_code=True))
    assert REFUSED in problems["trust_remote_code"] and "'Tiny chat' is not approved" in problems["trust_remote_code"]
    assert services.runs.prepare(user, _base(services), for_submit=False).args["trust_remote_code"] is False


def test_an_approved_catalog_model_runs_with_trust_remote_code(make_services):
    from llamaboard_ext.form import form_defaults
    from portal.ui.train import TrainBackend

    services = make_services(models=[_tiny(trust_remote_code=True)])
    user = services.runs.ensure_user("dave")
    for asked in (True, False):  # approved: on, whether or not the config asks
        prepared = services.runs.prepare(user, dict(_base(services), trust_remote_code=asked), for_submit=False)
        assert prepared.args["trust_remote_code"] is True
        assert yaml.safe_load(prepared.yaml)["trust_remote_code"] is True
    # the form writes trust_remote_code: false (llamaboard_ext/compile.py); the approval survives it
    backend = TrainBackend(services.runs, form_defaults())
    text = backend.preview("dave", {"top.model_name": "Tiny chat", "train.dataset": ["demo_alpaca"],
                                    "top.model_path": str(services.settings.shared_models_root / "tiny-llama"),
                                    "train.output_dir": "cat_form"})
    assert yaml.safe_load(text)["trust_remote_code"] is True
    # by name, or through a link the user could re-point later: the job gets the entry's own folder
    link = services.runs.space(user).root / "my-link"
    link.symlink_to(services.settings.shared_models_root / "tiny-llama")
    for named in ("Tiny chat", str(link)):
        prepared = services.runs.prepare(user, dict(_base(services), model_name_or_path=named), for_submit=False)
        assert prepared.args["model_name_or_path"] == str(services.settings.shared_models_root / "tiny-llama")
        assert prepared.args["trust_remote_code"] is True


def test_an_approved_model_does_not_lend_its_approval(make_services):
    """A reference model or another revision would run its own code under the approval: refused."""
    services = make_services(models=[_tiny(trust_remote_code=True)])
    user = services.runs.ensure_user("dave")
    shared = services.settings.shared_models_root
    shutil.copytree(shared / "tiny-llama", shared / "other-llama")
    dpo = dict(_base(services), stage="dpo", finetuning_type="full", ref_model=str(shared / "other-llama"))
    problems = _problems(services.runs, user, dpo)
    assert "ref_model" in problems and "approved" in problems["ref_model"]
    problems = _problems(services.runs, user, dict(_base(services), model_revision="refs/pr/1"))
    assert "model_revision" in problems


# ---- hub models -------------------------------------------------------------------------------
def test_hub_models_off_still_allows_the_catalogs_hub_models(make_services):
    services = make_services(allow_hub_models=False, models=[_hub()])
    user = services.runs.ensure_user("dave")
    problems = _problems(services.runs, user, dict(_base(services), model_name_or_path="Qwen/Other-Model"))
    assert "hub models are not allowed" in problems["model_name_or_path"]
    prepared = services.runs.prepare(user, dict(_base(services), model_name_or_path=HUB_MODEL), for_submit=False)
    assert prepared.args["model_name_or_path"] == HUB_MODEL  # approved by the admin: the job fetches it
    prepared = services.runs.prepare(user, dict(_base(services), model_name_or_path="Qwen 0.5B"), for_submit=False)
    assert prepared.args["model_name_or_path"] == HUB_MODEL  # by name too


def test_catalog_paths_outside_the_shared_root_are_allowed(make_services, tmp_path):
    elsewhere = tmp_path / "models" / "elsewhere"
    services = make_services(models=[{"name": "Elsewhere", "path": str(elsewhere), "template": "llama3"}])
    shutil.copytree(services.settings.shared_models_root / "tiny-llama", elsewhere)
    user = services.runs.ensure_user("dave")
    prepared = services.runs.prepare(user, dict(_base(services), model_name_or_path=str(elsewhere)), for_submit=False)
    assert prepared.args["model_name_or_path"] == str(elsewhere)
    other = tmp_path / "models" / "not-in-catalog"
    shutil.copytree(elsewhere, other)
    problems = _problems(services.runs, user, dict(_base(services), model_name_or_path=str(other)))
    assert "outside the folders you may use" in problems["model_name_or_path"]


# ---- the form ---------------------------------------------------------------------------------
def _model_handlers(backend):
    """The handlers the built form runs for the model list: on every change (LLaMA Board's
    get_model_info, swapped) and when the user picks a model (the catalog's template)."""
    import gradio as gr

    from llamaboard_ext.form import build_train_form

    with gr.Blocks() as blocks:
        form = build_train_form(backend)
    name_id, path_id, template_id = (form.component(i)._id for i in ("top.model_name", "top.model_path", "top.template"))
    found = {}
    for fn in blocks.fns.values():
        outputs = [c._id for c in fn.outputs]
        for target, event in fn.targets:
            if target == name_id and event == "change" and outputs == [path_id, template_id]:
                found["change"] = fn.fn
            if target == name_id and event == "input" and outputs == [template_id]:
                found["input"] = fn.fn
    assert set(found) == {"change", "input"}, found
    return found["change"], found["input"]


def test_choosing_a_catalog_model_sets_its_template_and_shows_its_notes(make_services):
    from llamaboard_ext.form import MODEL_PATH_INFO, form_defaults
    from portal.ui.train import TrainBackend

    services = make_services(models=[_tiny(), _hub(trust_remote_code=True)])
    services.runs.ensure_user("dave")
    shared = services.settings.shared_models_root
    shutil.copytree(shared / "tiny-llama", shared / "other-llama")
    backend = TrainBackend(services.runs, form_defaults())
    info = backend.model_info("dave", "Tiny chat")
    assert info["template"] == "llama3" and info["license"] == "Apache-2.0, internal use"
    assert info["gpu_memory_gb"] == {"lora": 18, "qlora": 10, "full": 80}
    assert backend.model_info("dave", "other-llama") is None

    on_change, on_pick = _model_handlers(backend)
    request = SimpleNamespace(username="dave", client=None)
    path, template = on_change("Tiny chat", request)
    assert path["value"] == str(shared / "tiny-llama") and "value" not in template  # a loaded form keeps its template
    assert "License: Apache-2.0, internal use" in path["info"] and "lora ~18 GB" in path["info"]
    assert on_pick("Tiny chat", request)["value"] == "llama3"  # picked by the user: the entry's template
    path, template = on_change("Qwen 0.5B", request)
    assert path["value"] == HUB_MODEL and "runs its own code" in path["info"]
    assert on_pick("Qwen 0.5B", request)["value"] == "qwen"
    path, template = on_change("other-llama", request)  # a folder without an entry: no template, no notes
    assert path["value"] == str(shared / "other-llama") and "value" not in template
    assert path["info"] == MODEL_PATH_INFO and "value" not in on_pick("other-llama", request)


def test_the_model_list_offers_only_the_catalog_when_hub_models_are_off(make_services):
    from portal.ui.app import build_ui

    services = make_services(allow_hub_models=False, models=[_hub(), _tiny()])
    services.runs.ensure_user("dave")
    blocks = build_ui(services.runs, services.chat)
    on_load = next(fn.fn for fn in blocks.fns.values() if getattr(fn.fn, "__qualname__", "") == "build_ui.<locals>.on_load")
    updates = on_load(SimpleNamespace(username="dave", client=None))
    dropdown = updates[blocks.portal_form.component("top.model_name")]
    names = [c[0] if isinstance(c, (tuple, list)) else c for c in dropdown.choices]
    assert names == ["Qwen 0.5B", "Tiny chat", "Custom"]


@pytest.mark.browser
def test_browser_choosing_a_catalog_model_fills_path_template_and_notes(make_services):
    """In the real page: the catalog model fills the model path and template; its notes show under the path."""
    from conftest import _ServerThread, free_port, launch_chromium
    from playwright.sync_api import sync_playwright

    from llamaboard_ext.form import form_defaults
    from portal.ui.train import TrainBackend
    from portal.web import create_app

    services = make_services(models=[_tiny()])
    services.runs.ensure_user("local")
    TrainBackend(services.runs, form_defaults()).save_form("local", "mine.yaml", {
        "top.model_name": "Tiny chat", "top.template": "alpaca", "train.dataset": ["demo_alpaca"],
        "top.model_path": str(services.settings.shared_models_root / "tiny-llama"), "train.output_dir": "saved"})
    with _ServerThread(create_app(services), free_port()) as server, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{server.url}/ui/")
            page.get_by_text("Signed in as").wait_for(timeout=60_000)
            box = page.locator("#lb-top-model-name input").first
            box.click()
            box.fill("Tiny chat")
            page.wait_for_timeout(300)
            box.press("Enter")
            page.keyboard.press("Escape")
            path = page.locator("#lb-top-model-path textarea")
            page.wait_for_function("() => document.querySelector('#lb-top-model-path textarea').value.endsWith('tiny-llama')",
                                   timeout=20_000)
            assert path.input_value() == str(services.settings.shared_models_root / "tiny-llama")
            template = page.locator("#lb-top-template input").first
            page.wait_for_function("() => document.querySelector('#lb-top-template input').value === 'llama3'",
                                   timeout=20_000)
            assert "License: Apache-2.0, internal use" in page.locator("#lb-top-model-path").inner_text()
            # a saved form of the catalog model keeps its own template when loaded
            box = page.locator("#lb-train-config-path input").first
            box.click()
            box.fill("mine.yaml")
            page.wait_for_timeout(300)
            box.press("Enter")
            page.keyboard.press("Escape")
            page.get_by_role("button", name="Load form").click()
            page.get_by_text("Form `mine.yaml` loaded.").or_(page.get_by_text("Form mine.yaml loaded.")).wait_for()
            page.wait_for_timeout(2000)  # any change handler of the model list has run by now
            assert template.input_value() == "alpaca"
        finally:
            browser.close()
