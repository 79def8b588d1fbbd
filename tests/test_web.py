"""The web app over real HTTP, its Gradio wiring, and the whole flow in headless Chromium."""

from __future__ import annotations

import inspect
import time

import httpx
import pytest
from conftest import ARTIFACTS, launch_chromium

from llamaboard_ext.form import ALLOWED_LLAMABOARD_HANDLERS


def test_healthz_and_root(portal):
    r = httpx.get(f"{portal['url']}/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["database"] == "ok" and body["launcher"] == "local"
    r = httpx.get(f"{portal['url']}/", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/ui/"
    page = httpx.get(f"{portal['url']}/ui/")
    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "fonts.googleapis.com/css" not in page.text  # no stylesheet fetched from outside
    # without login only loopback names are answered: a DNS-rebinding page sends its own Host
    rebound = httpx.get(f"{portal['url']}/ui/config", headers={"host": "attacker.example:80"})
    assert rebound.status_code == 403 and "loopback" in rebound.json()["detail"]
    assert httpx.get(f"{portal['url']}/ui/config", headers={"host": "localhost:7860"}).status_code == 200


def _qualname(fn) -> tuple[str, str]:
    fn = inspect.unwrap(fn)
    target = getattr(fn, "__func__", fn)
    return getattr(target, "__module__", "") or "", getattr(target, "__qualname__", repr(target))


def test_no_llamaboard_handler_is_wired_as_is(portal):
    """Every event handler of the portal's Blocks: none may be LLaMA Board's own, except pure helpers."""
    blocks = portal["app"].state.blocks
    fns = list(blocks.fns.values())
    assert len(fns) > 40  # the whole train form is wired
    offenders = []
    for block_fn in fns:
        if block_fn.fn is None:
            continue
        module, qualname = _qualname(block_fn.fn)
        owner = getattr(block_fn.fn, "__self__", None)
        if owner is not None and type(owner).__module__.startswith("llamafactory"):
            offenders.append(f"{type(owner).__module__}.{type(owner).__qualname__}.{qualname}")
        elif module.startswith("llamafactory") and f"{module}.{qualname}" not in ALLOWED_LLAMABOARD_HANDLERS:
            offenders.append(f"{module}.{qualname}")
    assert offenders == []
    # and the buttons reach the portal
    names = {_qualname(f.fn)[1] for f in fns if f.fn is not None}
    assert {"_PortalRunner.run_train", "_PortalRunner.preview_train", "_FormBinder.list_datasets"} <= names


def _wait(predicate, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def _fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input[type=number], #{elem_id} input:not([type])").first
    box.fill(value)
    box.press("Tab")


def _pick(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    page.wait_for_timeout(300)
    box.press("Enter")
    page.keyboard.press("Escape")


@pytest.mark.browser
def test_browser_submit_follow_and_bad_input(portal, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    services = portal["services"]
    before = len(services.runs.list_runs(services.runs.user("local")))  # other tests share this portal
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{portal['url']}/ui/")
            page.get_by_text("Signed in as").wait_for(timeout=60_000)
            output = page.locator("#lb-train-output-box")

            # bad input first: no model -> a message naming the field; nothing is launched
            _pick(page, "lb-train-dataset", "demo_alpaca")
            page.get_by_role("button", name="Submit run").click()
            expect(output).to_contain_text("Not submitted", timeout=90_000)
            assert "top.model_path" in output.inner_text()
            # the form kept what the user chose
            assert "demo_alpaca" in page.locator("#lb-train-dataset").inner_text()
            assert len(services.runs.list_runs(services.runs.user("local"))) == before  # nothing launched

            # fill the form as a new user would
            _pick(page, "lb-top-model-name", "tiny-llama")
            assert _wait(lambda: page.locator("#lb-top-model-path textarea").input_value().endswith("tiny-llama"), 20)
            _fill(page, "lb-train-learning-rate", "abc")
            page.get_by_role("button", name="Preview YAML").click()
            expect(output).to_contain_text("Cannot preview", timeout=60_000)
            assert "train.learning_rate" in output.inner_text()
            assert page.locator("#lb-train-learning-rate textarea").input_value() == "abc"  # kept

            _fill(page, "lb-train-learning-rate", "1e-3")
            _fill(page, "lb-train-num-train-epochs", "1.0")
            _fill(page, "lb-train-max-samples", "80")
            _fill(page, "lb-train-cutoff-len", "96")
            _fill(page, "lb-train-batch-size", "8")
            _fill(page, "lb-train-gradient-accumulation-steps", "1")
            page.get_by_role("button", name="Preview YAML").click()
            expect(output).to_contain_text("report_to: mlflow", timeout=60_000)
            preview = output.inner_text()
            assert "max_samples: 80" in preview and "model_name_or_path:" in preview
            assert "per_device_train_batch_size: 8" in preview and "gradient_accumulation_steps: 1" in preview
            run_name = page.locator("#lb-train-output-dir input").input_value()
            assert run_name.startswith("train_")

            # Download YAML gives exactly the previewed config
            page.get_by_role("button", name="Download YAML").click()
            link = page.locator("#yaml-file a").first
            link.wait_for(timeout=30_000)
            with page.expect_download() as dl:
                link.click()
            downloaded = dl.value.path().read_text()
            assert f"output_dir: {services.settings.users_root}/local/runs/{run_name}/output" in downloaded
            assert "max_samples: 80" in downloaded

            page.get_by_role("button", name="Submit run").click()
            expect(output).to_contain_text("submitted", timeout=90_000)
            assert run_name in output.inner_text()

            # follow it in the Runs tab until it succeeds, curve drawn from MLflow
            page.get_by_role("tab", name="Runs").click()
            expect(page.locator("#run-details")).to_contain_text("succeeded", timeout=300_000)
            user = services.runs.user("local")
            run = services.runs.list_runs(user)[0]
            assert run.name == run_name and run.status.value == "succeeded"
            with services.db.session() as s:  # the audit log says where the submit came from
                from sqlmodel import select

                from portal.models import AuditEvent

                event = s.exec(select(AuditEvent).where(AuditEvent.action == "submit",
                                                        AuditEvent.target == f"run:{run.id}")).one()
            assert event.username == "local" and event.client == "127.0.0.1"
            points = [p for p in services.runs.metrics(user, run.id) if p.key == "loss"]
            assert len(points) >= 1
            page.wait_for_timeout(2500)  # one more refresh tick draws the final curve
            curve_png = tmp_path / "curve.png"
            page.locator("#loss-curve").screenshot(path=str(curve_png))
            from PIL import Image

            colours = len(set(Image.open(curve_png).convert("RGB").getdata()))
            assert colours > 100, "the loss curve is empty"  # an empty plot is a handful of colours
            assert "succeeded" in page.locator("#runs-table").inner_text()
            assert "train metrics" in page.locator("#run-log textarea").input_value()
            page.screenshot(path=str(ARTIFACTS / "runs-tab-succeeded.png"), full_page=True)

            # Load YAML fills the form back from a config file
            page.get_by_role("tab", name="Train").click()
            config = tmp_path / "mine.yaml"
            config.write_text(downloaded.replace("max_samples: 80", "max_samples: 77") + "learning_rat: 0.5\n")
            page.locator("#load-yaml input[type=file], input[type=file]").first.set_input_files(str(config))
            expect(output).to_contain_text("loaded into the form", timeout=60_000)
            assert page.locator("#lb-train-max-samples textarea").input_value() == "77"
            assert "learning_rat" in output.inner_text()  # unknown key named in a warning
            page.screenshot(path=str(ARTIFACTS / "train-tab-loaded.png"), full_page=True)
            # after all that clicking: none of LLaMA Board's process-wide folders or env switches
            import os

            for folder in ("saves", "llamaboard_config", "llamaboard_cache"):
                assert not os.path.exists(os.path.join(os.getcwd(), folder)), folder
            assert "USE_MODELSCOPE_HUB" not in os.environ and "USE_OPENMIND_HUB" not in os.environ
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "browser-failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def test_rejected_submit_through_the_ui_handler_keeps_nothing(portal):
    """The Submit handler with a bad form returns a message, not a run (the Gradio path)."""
    services = portal["services"]
    from portal.ui.train import TrainBackend
    from llamaboard_ext.form import FormError

    from llamaboard_ext.form import form_defaults

    backend = TrainBackend(services.runs, form_defaults())
    before = len(services.runs.list_runs(services.runs.user("local")))
    with pytest.raises(FormError) as info:
        backend.submit("local", {"train.dataset": ["demo_alpaca"], "train.output_dir": "ui_reject",
                                 "top.model_path": str(services.settings.shared_models_root / "tiny-llama"),
                                 "train.extra_args": "{not json"})
    assert "train.extra_args" in info.value.problems
    assert len(services.runs.list_runs(services.runs.user("local"))) == before


def test_saved_forms_stay_in_the_users_space(portal):
    services = portal["services"]
    from portal.ui.train import TrainBackend

    from llamaboard_ext.form import form_defaults

    backend = TrainBackend(services.runs, form_defaults())
    values = {"top.model_path": str(services.settings.shared_models_root / "tiny-llama"), "top.model_name": "tiny-llama",
              "train.dataset": ["demo_alpaca"], "train.output_dir": "saved_one", "train.max_samples": "42"}
    name = backend.save_form("local", "my_form.yaml", values)
    assert name == "my_form.yaml"
    assert (services.runs.space(services.runs.user("local")).forms_dir / "my_form.yaml").is_file()
    assert backend.load_form("local", "my_form.yaml")["train.max_samples"] == "42"
    for bad in ("../../etc/passwd", "/etc/passwd", "..", "a/b"):
        with pytest.raises(ValueError):
            backend.save_form("local", bad, values)
        with pytest.raises((ValueError, FileNotFoundError)):
            backend.load_form("local", bad)
