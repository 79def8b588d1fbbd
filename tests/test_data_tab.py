"""The Data tab in headless Chromium: upload, checks, template preview, save, the Train tab's list."""

from __future__ import annotations

import json

import pytest
from conftest import ARTIFACTS, launch_chromium


def _pick(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(value)
    box.press("Enter")


@pytest.mark.browser
def test_upload_check_fix_columns_and_save(portal, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    services = portal["services"]
    csv_file = tmp_path / "support qa.csv"
    csv_file.write_text("q,a\n" + "".join(f"How do I reset PIN {i}?,Open the app and choose Reset ({i}).\n"
                                           for i in range(30)) + "How do I reset PIN 0?,Open the app and choose Reset (0).\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{\"instruction\": \"c\" \"output\": 1}\n")

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        try:
            page.goto(portal["url"] + "/ui/")
            page.get_by_role("tab", name="Data").click()
            report = page.locator("#data-report")

            # a broken file: the check names the line and column, nothing is saved, the form stays
            page.locator("#data-file input[type=file]").set_input_files(str(broken))
            expect(report).to_contain_text("Columns found", timeout=60_000)
            page.locator("#data-check").click()
            expect(report).to_contain_text("line 2, column", timeout=60_000)
            page.locator("#data-save").click()
            expect(report).to_contain_text("Not saved", timeout=60_000)
            expect(page.locator("#data-name textarea, #data-name input").first).to_have_value("broken")

            # a CSV with its own column names: the missing mapping is named, then fixed in the pickers
            page.locator("#data-file button[aria-label='Clear']").click()
            page.locator("#data-file input[type=file]").set_input_files(str(csv_file))
            expect(report).to_contain_text("Columns found: q, a", timeout=60_000)
            page.locator("#data-check").click()
            expect(report).to_contain_text("missing_columns", timeout=60_000)
            _pick(page, "data-col-prompt", "q")
            _pick(page, "data-col-response", "a")
            page.locator("#data-check").click()
            expect(report).to_contain_text("No blocking problem", timeout=60_000)
            expect(report).to_contain_text("duplicates")  # the repeated last row, a warning
            expect(report).to_contain_text("27 training rows, 4 evaluation rows")  # val_size 0.1 of 31, rounded up
            preview = page.locator("#data-preview")
            expect(preview).to_contain_text("Human: How do I reset PIN 0?")  # the default template
            expect(preview).to_contain_text("Open the app and choose Reset (0).")
            name = page.locator("#data-name textarea, #data-name input").first
            name.fill("support_qa")
            page.locator("#data-save").click()
            expect(report).to_contain_text("Saved support_qa version 1", timeout=60_000)
            expect(page.locator("#data-list")).to_contain_text("support_qa")
            page.screenshot(path=str(ARTIFACTS / "data-tab.png"), full_page=True)

            # the Train tab's dataset list offers it now
            page.get_by_role("tab", name="Train").click()
            page.locator("#lb-train-dataset input").click()
            expect(page.get_by_role("option", name="support_qa")).to_be_visible(timeout=30_000)
        finally:
            browser.close()

    user = services.runs.user("local")
    saved = {d.name: d for d in services.datasets.list(user)}["support_qa"]
    assert saved.version == 1 and saved.rows == 31
    entry = json.loads((services.runs.space(user).datasets_dir / "dataset_info.json").read_text())["support_qa"]
    assert entry["columns"]["prompt"] == "q" and entry["columns"]["response"] == "a"
    assert "query" not in entry["columns"]  # '(none)': no input column
    import os
    import tempfile
    from pathlib import Path

    temp_dir = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    assert list(temp_dir.rglob("broken.jsonl"))  # the rejected upload is still there to fix and retry
    assert not list(temp_dir.rglob("support qa.csv"))  # the saved one lives only in the user's space
