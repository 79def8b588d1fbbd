"""The Runs tab in headless Chromium: filters, compare two runs, clone one into the form."""

from __future__ import annotations

import re

import pytest
from conftest import ARTIFACTS, demo_form, launch_chromium, submit_form

from portal.run_query import RunQuery


def _pick(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(value)
    page.get_by_role("option", name=value).first.click()


# Gradio 5's LinePlot draws with Vega on a canvas: its title, axis titles and legend are no DOM text.
# This records every string drawn on a canvas, by the id of the nearest element that has one.
RECORD_CANVAS_TEXT = """
const fillText = CanvasRenderingContext2D.prototype.fillText;
CanvasRenderingContext2D.prototype.fillText = function (text, ...rest) {
  const box = this.canvas.closest && this.canvas.closest("[id]");
  if (box) ((window.__drawn ??= {})[box.id] ??= []).push(String(text));
  return fillText.call(this, text, ...rest);
};
"""


def _drawn_count(page, elem_id: str) -> int:
    return page.evaluate("id => (window.__drawn?.[id] || []).length", elem_id)


def _wait_drawn(page, elem_id: str, texts: list[str], since: int = 0) -> None:
    """Wait until all ``texts`` were drawn on the canvas in #elem_id (after its first ``since`` strings)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function("([id, texts, since]) => { const drawn = (window.__drawn?.[id] || []).slice(since);"
                               " return texts.every(t => drawn.includes(t)); }", arg=[elem_id, texts, since],
                               timeout=30_000)
    except PlaywrightTimeout:
        drawn = page.evaluate("id => window.__drawn?.[id] || []", elem_id)[since:]
        raise AssertionError(f"#{elem_id} never drew {texts}; it drew {sorted(set(drawn))}") from None


@pytest.mark.browser
def test_filter_compare_and_clone(portal):
    from playwright.sync_api import expect, sync_playwright

    services = portal["services"]
    runs = services.runs
    user = runs.user("local")
    model = services.settings.shared_models_root / "tiny-llama"
    first = submit_form(runs, user, demo_form(model, "cmp_lr_high", **{"train.learning_rate": "1e-3"}))
    second = submit_form(runs, user, demo_form(model, "cmp_lr_low", **{"train.learning_rate": "1e-4"}))
    for run in (first, second):
        done = runs.wait(user, run.id, timeout=300, interval=0.5)
        assert done.status.value == "succeeded", runs.logs(user, run.id)[-2000:]
    runs.annotate(user, first.id, note="higher learning rate", tags=["sweep"])

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        page.add_init_script(RECORD_CANVAS_TEXT)
        try:
            page.goto(portal["url"] + "/ui/")
            page.get_by_role("tab", name="Runs").click()
            table = page.locator("#runs-table")
            expect(table).to_contain_text("cmp_lr_low", timeout=30_000)

            # search over name, note and tags
            page.locator("#runs-search textarea, #runs-search input").first.fill("sweep")
            page.locator("#runs-search textarea, #runs-search input").first.press("Enter")
            expect(table).not_to_contain_text("cmp_lr_low", timeout=30_000)
            expect(table).to_contain_text("cmp_lr_high")

            # compare: only what differs, both curves
            page.get_by_text("Compare runs (2 to 5)").click()
            page.locator("#runs-search textarea, #runs-search input").first.fill("")
            page.locator("#runs-refresh").click()
            expect(table).to_contain_text("cmp_lr_low", timeout=30_000)
            _pick(page, "compare-select", f"#{first.id} cmp_lr_high (succeeded)")
            _pick(page, "compare-select", f"#{second.id} cmp_lr_low (succeeded)")
            page.locator("#compare-run").click()
            diff = page.locator("#compare-diff")
            expect(diff).to_contain_text("learning_rate", timeout=30_000)
            expect(diff).to_contain_text("0.001")
            expect(diff).to_contain_text("0.0001")
            expect(diff).not_to_contain_text("lora_rank")  # the same in both: not shown
            expect(page.locator("#compare-curve canvas, #compare-curve svg").first).to_be_visible(timeout=30_000)
            series = [f"#{first.id} cmp_lr_high loss", f"#{second.id} cmp_lr_low loss"]  # the legend: both curves
            _wait_drawn(page, "compare-curve", ["Loss by step", "step", *series])
            page.screenshot(path=str(ARTIFACTS / "runs-compare.png"), full_page=True)

            # by input tokens seen: form runs log them (include_num_input_tokens_seen), so no fallback to steps
            since = _drawn_count(page, "compare-curve")
            page.locator("#compare-axis").get_by_text("tokens", exact=True).click()
            page.locator("#compare-run").click()
            _wait_drawn(page, "compare-curve", ["Loss by input tokens seen", "input tokens seen", *series], since)
            expect(page.locator("#compare-curve canvas, #compare-curve svg").first).to_be_visible()
            expect(page.locator("#compare-note")).not_to_contain_text("logged no token counts")  # same update as the plot
            page.screenshot(path=str(ARTIFACTS / "runs-compare-tokens.png"), full_page=True)

            # evaluate the first run from its page: an eval child run, its metrics on the parent's page
            select = page.locator("#run-select input")
            select.fill(str(first.id))
            select.press("Enter")
            expect(page.locator("#run-details")).to_contain_text("cmp_lr_high", timeout=30_000)
            page.get_by_text("Evaluate and ship (succeeded training runs)").click()
            expect(page.locator("#run-evaluations")).to_contain_text("No evaluation yet", timeout=30_000)
            _pick(page, "eval-datasets", "demo_alpaca")
            page.keyboard.press("Escape")
            for elem_id in ("eval-max-samples", "eval-max-new-tokens"):  # a few samples, a few tokens: seconds
                page.locator(f"#{elem_id} input").fill("4")
                page.locator(f"#{elem_id} input").press("Tab")
            page.locator("#run-evaluate").click()
            expect(page.get_by_text(re.compile(rf"Eval run #\d+ .*evaluates run #{first.id} on demo_alpaca"))
                   ).to_be_visible(timeout=30_000)
            (evaluation,) = [r for r in runs.list_runs(user) if r.parent_id == first.id and r.kind == "eval"]
            config = runs.parse_config(evaluation.config_yaml)
            assert config["max_samples"] == 4 and config["max_new_tokens"] == 4, config  # the form's numbers
            done = runs.wait(user, evaluation.id, timeout=300, interval=0.5)
            assert done.status.value == "succeeded", runs.logs(user, evaluation.id)[-3000:]
            page.locator("#runs-refresh").click()
            results = page.locator("#run-evaluations")
            expect(results).to_contain_text(f"Eval run #{evaluation.id}", timeout=30_000)
            expect(results).to_contain_text("succeeded")
            expect(results).to_contain_text("predict_bleu-4")
            expect(results).to_contain_text("predict_rouge-l")
            expect(results).to_contain_text("generated_predictions.jsonl")

            # merge & register under a typed name: an export child run (cancelled here: test_evaluate merges for real)
            page.locator("#merge-name textarea, #merge-name input").first.fill("cmp-tab-merged")
            page.locator("#run-merge").click()
            expect(page.get_by_text(re.compile(rf"Export run #\d+ merges run #{first.id}; it is registered as "
                                               r"cmp-tab-merged"))).to_be_visible(timeout=30_000)
            (export,) = [r for r in runs.list_runs(user) if r.parent_id == first.id and r.kind == "export"]
            assert export.registered_model == "cmp-tab-merged" and export.registered_version is None
            if not runs.get_run(user, export.id).status.is_final:
                runs.cancel(user, export.id)
            page.screenshot(path=str(ARTIFACTS / "runs-evaluate-ship.png"), full_page=True)

            # clone the first run into the form, change nothing, submit: the child records its parent
            expect(page.locator("#run-details")).to_contain_text("cmp_lr_high", timeout=30_000)
            page.locator("#run-clone").click()
            output = page.locator("#lb-train-output-box")
            expect(output).to_contain_text(f"Run #{first.id} is loaded into the form", timeout=30_000)
            expect(page.locator("#lb-train-output-dir input")).to_have_value("cmp_lr_high_clone")
            page.get_by_role("button", name="Submit run").click()
            expect(output).to_contain_text(f"cloned from run #{first.id}", timeout=90_000)
        finally:
            browser.close()
    child = runs.search_runs(user, RunQuery(search="cmp_lr_high_clone"))[0][0]
    assert child.parent_id == first.id and "learning_rate: 0.001" in child.config_yaml
    runs.cancel(user, child.id)


@pytest.mark.browser
def test_run_page_history_whole_log_files_and_resume(portal):
    import glob
    import tempfile
    from pathlib import Path

    from playwright.sync_api import expect, sync_playwright
    from test_resume import cancelled_with_checkpoint

    services = portal["services"]
    runs = services.runs
    user = runs.user("local")
    parent = cancelled_with_checkpoint(runs, user, services.settings.shared_models_root / "tiny-llama", "tab_long")
    job_log = (Path(parent.run_dir) / "job.log").read_bytes()

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        try:
            page.goto(portal["url"] + "/ui/")
            page.get_by_role("tab", name="Runs").click()
            select = page.locator("#run-select input")
            select.fill(str(parent.id))
            select.press("Enter")
            expect(page.locator("#run-details")).to_contain_text("tab_long", timeout=30_000)
            history = page.locator("#run-history")
            expect(history).to_contain_text("cancelled", timeout=30_000)
            expect(history).to_contain_text("running on the CPU")
            expect(page.locator("#run-cancel")).to_be_hidden()  # an ended run: nothing to cancel

            # the whole log: a file link, the same bytes as job.log; the portal's own copy is gone at once
            page.locator("#run-log-download").click()
            link = page.locator("#run-log-file a[href*='file=']").first
            expect(link).to_be_visible(timeout=30_000)
            href = link.get_attribute("href")
            assert href.endswith(f"/run-{parent.id}-tab_long.log"), href
            served = page.request.get(portal["url"] + href if href.startswith("/") else href)
            assert served.ok and served.body() == job_log
            assert not glob.glob(str(Path(tempfile.gettempdir()) / "lbp-download-*" / f"run-{parent.id}-*"))

            # the output files: checkpoints as folders; one small file downloaded
            page.get_by_text("Output files").click()
            files = page.locator("#run-files")
            expect(files).to_contain_text("checkpoint-2/", timeout=30_000)
            expect(files).to_contain_text("trainer_log.jsonl")
            _pick(page, "run-file-select", "trainer_log.jsonl")
            page.locator("#run-file-download").click()
            file_link = page.locator("#run-artifact-file a[href*='file=']").first
            expect(file_link).to_be_visible(timeout=30_000)
            href = file_link.get_attribute("href")
            got = page.request.get(portal["url"] + href if href.startswith("/") else href)
            assert got.ok and b'"current_steps"' in got.body()
            page.screenshot(path=str(ARTIFACTS / "runs-run-page-files.png"), full_page=True)

            # resume: a new run, the old one its parent, started from the checkpoint
            resume = page.locator("#run-resume")
            expect(resume).to_be_visible(timeout=30_000)
            resume.click()
            details = page.locator("#run-details")
            expect(details).to_contain_text(f"Resumed from: run #{parent.id}", timeout=90_000)

            # the child trains (30 epochs to go): Cancel shows, and cancels it from its page
            (resumed,) = [r for r in runs.search_runs(user, RunQuery(search="tab_long_resume"))[0]
                          if r.parent_id == parent.id]
            expect(details).to_contain_text(f"Run #{resumed.id}")
            expect(history).not_to_contain_text("cancelled")  # the child's history now, not the parent's
            # the parent's downloads are not offered on the child's page
            expect(page.locator("#run-log-file")).to_be_hidden(timeout=30_000)
            expect(page.locator("#run-artifact-file")).to_be_hidden()
            cancel = page.locator("#run-cancel")
            expect(cancel).to_be_visible(timeout=30_000)
            cancel.click()
            expect(page.get_by_text(f"Run #{resumed.id} is cancelled.")).to_be_visible(timeout=60_000)
            expect(details).to_contain_text("Status: cancelled", timeout=60_000)
            expect(history).to_contain_text("cancelled", timeout=30_000)
            expect(cancel).to_be_hidden(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "runs-resumed-cancelled.png"), full_page=True)
        finally:
            browser.close()
            children = [r for r in runs.search_runs(user, RunQuery(search="tab_long_resume"))[0]
                        if r.parent_id == parent.id]
            for child in children:
                if not child.status.is_final:
                    runs.cancel(user, child.id)
    assert len(children) == 1 and "resume_from_checkpoint:" in children[0].config_yaml
    child = runs.get_run(user, children[0].id)
    assert child.status.value == "cancelled" and "cancel" in (child.status_reason or ""), child.status_reason


def test_opening_the_runs_tab_fills_the_table(portal):
    """The Runs tab's select event runs the tab's refresh into the table (no wait for the timer's tick)."""
    import gradio as gr

    blocks = portal["app"].state.blocks
    parts = blocks.portal_runs_tab
    (tab,) = [b for b in blocks.blocks.values() if isinstance(b, gr.Tab) and b.id == "runs"]
    (table,) = [b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "runs-table"]
    on_select = [fn for fn in blocks.fns.values() if (tab._id, "select") in fn.targets]
    assert len(on_select) == 1, on_select
    (fn,) = on_select
    assert fn.fn is parts["refresh"]
    assert table in fn.outputs and fn.outputs == parts["outputs"]
    assert fn.inputs == [parts["selected"], *parts["filters"]]
