"""The Runs tab in headless Chromium: filters, compare two runs, clone one into the form."""

from __future__ import annotations

import pytest
from conftest import ARTIFACTS, demo_form, launch_chromium, submit_form

from portal.run_query import RunQuery


def _pick(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(value)
    page.get_by_role("option", name=value).first.click()


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
            page.screenshot(path=str(ARTIFACTS / "runs-compare.png"), full_page=True)

            # clone the first run into the form, change nothing, submit: the child records its parent
            select = page.locator("#run-select input")
            select.fill(str(first.id))
            select.press("Enter")
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
            expect(page.locator("#run-details")).to_contain_text(f"Resumed from: run #{parent.id}", timeout=90_000)
        finally:
            browser.close()
            children = [r for r in runs.search_runs(user, RunQuery(search="tab_long_resume"))[0]
                        if r.parent_id == parent.id]
            for child in children:
                if not child.status.is_final:
                    runs.cancel(user, child.id)
    assert len(children) == 1 and "resume_from_checkpoint:" in children[0].config_yaml
