"""The Runs page's first paint with 100,000 runs: headless Chromium, the real portal app.

usage: .venv/bin/python bench/bench_runs_page.py [--runs 100000] [--repeats 5]

A SQLite database migrated by Alembic gets the same generated runs as bench_history.py; the web
app (`create_app`, `auth_mode: none`: the local admin sees every run) is served by uvicorn in a
thread. Each repeat opens a new page, waits for the Gradio UI, clicks the Runs tab and waits for
the first row of the table: timed from navigation to the UI (`page ready`), and from the click to
the first row (`first rows`). Medians are printed; no budget is enforced (the issue asks for the
figure).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_history import populate  # noqa: E402  (the same generated history)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=5)
    opts = p.parse_args()

    from playwright.sync_api import sync_playwright

    from portal.config import Settings
    from portal.services import build_services
    from portal.web import create_app

    tmp = Path(tempfile.mkdtemp(prefix="lbp-bench-runs-page-"))
    ready, first = [], []
    try:
        settings = Settings(data_root=tmp, gpus=[], mlflow_tracking_uri="http://127.0.0.1:9")
        services = build_services(settings, start_tracking=False)
        populate(services.runs, opts.runs)
        app = create_app(services, supervise=False)
        with C.Served(app) as served, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu"])
            try:
                for i in range(opts.repeats):
                    page = browser.new_page(viewport={"width": 1400, "height": 1400})
                    t0 = time.perf_counter()
                    page.goto(served.url + "/ui/")
                    page.get_by_role("tab", name="Runs").wait_for(timeout=120_000)
                    t1 = time.perf_counter()
                    page.get_by_role("tab", name="Runs").click()
                    page.locator("#runs-table").get_by_text("run_", exact=False).first.wait_for(timeout=120_000)
                    t2 = time.perf_counter()
                    ready.append((t1 - t0) * 1000)
                    first.append((t2 - t1) * 1000)
                    C.log(f"repeat {i + 1}/{opts.repeats}: page ready {ready[-1]:.0f} ms, first rows {first[-1]:.0f} ms")
                    page.close()
            finally:
                browser.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"== runs_page: the Runs tab over {opts.runs:,} runs (SQLite, admin view), {opts.repeats} page loads ==")
    print(f"  page ready (navigation -> tabs shown): median {statistics.median(ready):.0f} ms, max {max(ready):.0f} ms")
    print(f"  first rows (Runs tab click -> first row): median {statistics.median(first):.0f} ms, max {max(first):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
