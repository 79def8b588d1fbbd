"""Run history at 100,000 runs: p50/p95 of RunService.search_runs (one page + the total) for the
queries the Runs tab and the CLI make, on SQLite and on PostgreSQL.

usage: .venv/bin/python bench/bench_history.py [--runs 100000] [--repeats 40] [--no-postgres] [--no-index] [--keep]

The runs are generated rows (50 users, 4 base models, 6 datasets, every status, notes on a tenth),
inserted in bulk into a fresh database migrated by Alembic, exactly the schema the portal uses.
PostgreSQL is Debian's, started in a temp folder the way tests/conftest.py does. Budget: p95 <= 50 ms
at the service layer for every query. The search over name, note and tags goes through the search
index of migration 0009 (FTS5 trigram table on SQLite, pg_trgm GIN indexes on PostgreSQL) for words
of 3 characters or more. `--no-index` drops that index after the migration (and searches with LIKE
alone), to measure the search as it was before it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (bench/ is not a package)

NAME = "history"
BUDGET_P95_MS = 50.0
MODELS = ["/shared/models/qwen2.5-7b", "/shared/models/llama3-8b", "Qwen/Qwen2.5-1.5B", "/shared/models/mistral-7b"]
DATASETS = ["faq_2025", "support_chat", "claims_notes", "kyc_docs", "alpaca_en", "faq_2025,support_chat"]
STAGES = ["sft", "sft", "sft", "dpo", "pt"]
METHODS = ["lora", "lora", "lora", "full", "freeze"]
STATUSES = ["succeeded"] * 6 + ["failed", "cancelled", "running", "queued"]


def build_services(database_url: str, data_root: Path):
    from portal.catalog import Catalog
    from portal.config import Settings
    from portal.datasets import DatasetService
    from portal.db import Database
    from portal.launchers import make_launcher
    from portal.runs import RunService
    from portal.tracking import Tracker

    settings = Settings(data_root=data_root, database_url=database_url, gpus=[], mlflow_tracking_uri="http://127.0.0.1:9")
    settings.ensure_dirs()
    db = Database(settings.db_url)
    db.migrate()
    catalog = Catalog(settings)
    tracker = Tracker(settings.tracking_uri, settings.mlflow_experiment, None)  # never called by search_runs
    runs = RunService(settings, db, catalog, make_launcher("local", settings), tracker,
                      DatasetService(settings, db, catalog))
    return runs


def populate(runs, count: int) -> dict:
    from sqlalchemy import insert

    from portal.models import Run, RunStatus, User, utcnow

    rng = random.Random(7)
    users = [runs.ensure_user(f"user{i:02d}") for i in range(50)]
    admin = runs.ensure_user("bench_admin", is_admin=True)
    start = utcnow() - timedelta(days=365)
    t0 = time.monotonic()
    batch: list[dict] = []
    with runs.db.engine.begin() as conn:
        for i in range(count):
            owner = users[rng.randrange(len(users))]
            status = rng.choice(STATUSES)
            batch.append({
                "name": f"run_{i:06d}_{rng.choice(['lora', 'sweep', 'baseline', 'ablation'])}", "owner_id": owner.id,
                "owner": owner.username, "status": RunStatus(status).name,
                "created_at": start + timedelta(seconds=i * 300), "stage": rng.choice(STAGES),
                "finetuning_type": rng.choice(METHODS), "model_name_or_path": rng.choice(MODELS),
                "datasets": rng.choice(DATASETS), "config_yaml": "", "config_sha256": "", "run_dir": "", "output_dir": "",
                "launcher": "local", "launcher_state": "{}", "gpus": 1, "cancel_requested": False,
                "final_loss": rng.uniform(0.5, 2.5) if status == "succeeded" else None,
                "dataset_fingerprints": "[]", "note": "reviewed for the Q3 model risk report" if i % 10 == 0 else "",
                "tags": "q3,review" if i % 10 == 0 else "",
            })
            if len(batch) == 5000:
                conn.execute(insert(Run), batch)
                batch.clear()
        if batch:
            conn.execute(insert(Run), batch)
    C.log(f"inserted {count:,} runs in {time.monotonic() - t0:.1f} s")
    return {"user": users[0], "admin": admin, "User": User}


def queries(seed: dict):
    from portal.run_query import RunQuery

    user, admin = seed["user"], seed["admin"]
    return [
        ("my runs, newest page", user, RunQuery()),
        ("my runs, page 10", user, RunQuery(offset=450)),
        ("my runs, status succeeded", user, RunQuery(status=["succeeded"])),
        ("my runs, search 'sweep'", user, RunQuery(search="sweep")),
        ("my runs, model + dataset", user, RunQuery(model="qwen", dataset="faq")),
        ("my runs, sort by loss", user, RunQuery(sort="loss", status=["succeeded"])),
        ("admin, all runs newest", admin, RunQuery()),
        ("admin, search note 'risk report'", admin, RunQuery(search="risk report")),
        ("admin, one owner + failed", admin, RunQuery(owner="user07", status=["failed"])),
        ("admin, search a rare name", admin, RunQuery(search="run_099999")),
        ("my runs, search a rare name", user, RunQuery(search="run_09999")),
        ("admin, search 2 letters 'q3' (LIKE)", admin, RunQuery(search="q3")),
        ("admin, sort by loss", admin, RunQuery(sort="loss")),
    ]


def measure(runs, seed: dict, repeats: int) -> list[dict]:
    out = []
    for label, who, query in queries(seed):
        runs.search_runs(who, query)  # warm the caches and the plan
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            page, total = runs.search_runs(who, query)
            times.append((time.perf_counter() - t0) * 1000)
        out.append({"query": label, "rows": len(page), "total": total, "p50_ms": C.percentile(times, 50),
                    "p95_ms": C.percentile(times, 95)})
    return out


def start_postgres(root: Path) -> tuple[str, list[str], Path]:
    import glob
    import pwd

    bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
    data, sockets = root / "data", root / "sock"
    sockets.mkdir(parents=True)
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        entry = pwd.getpwnam("postgres")
        for path in (root, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = C.free_port()
    subprocess.run([*prefix, f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*prefix, f"{bindir}/pg_ctl", "-D", str(data), "-w", "-l", str(root / "server.log"), "-o",
                    f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    subprocess.run([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "portal"],
                   check=True, capture_output=True)
    stop = [*prefix, f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "stop"]
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/portal", stop, data


def drop_search_index(runs, backend: str) -> None:
    from sqlalchemy import text

    import portal.run_query as run_query

    run_query.MIN_INDEXED_SEARCH = 10**9  # every word through LIKE alone
    with runs.db.engine.begin() as conn:
        if backend == "postgresql":
            for column in ("name", "note", "tags"):
                conn.execute(text(f"DROP INDEX IF EXISTS ix_runs_{column}_trgm"))
        else:
            for trigger in ("runs_fts_insert", "runs_fts_delete", "runs_fts_update"):
                conn.execute(text(f"DROP TRIGGER IF EXISTS {trigger}"))
            conn.execute(text("DROP TABLE IF EXISTS runs_fts"))
    C.log(f"{backend}: search index dropped (--no-index)")


def total_text(total: int) -> str:
    from portal.run_query import total_text as text

    return text(total)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--no-postgres", action="store_true")
    p.add_argument("--no-index", action="store_true", help="drop the search index of migration 0009 (the "
                                                              "search as it was before it), for comparison")
    p.add_argument("--keep", action="store_true")
    opts = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lbp-bench-history-"))
    results: dict[str, list[dict]] = {}
    stop: list[str] | None = None
    pg_root: Path | None = None
    try:
        backends = [("sqlite", f"sqlite:///{tmp / 'history.db'}")]
        if not opts.no_postgres:
            pg_root = Path(tempfile.mkdtemp(prefix="lbp-bench-pg-"))
            url, stop, _ = start_postgres(pg_root)
            backends.append(("postgresql", url))
        for backend, url in backends:
            C.log(f"{backend}: migrating and inserting {opts.runs:,} runs")
            runs = build_services(url, tmp / backend)
            seed = populate(runs, opts.runs)
            if opts.no_index:
                drop_search_index(runs, backend)
            if backend == "postgresql":
                with runs.db.engine.begin() as conn:
                    from sqlalchemy import text

                    conn.execute(text("ANALYZE runs"))
            results[backend] = measure(runs, seed, opts.repeats)
            runs.db.engine.dispose()
    finally:
        if stop:
            subprocess.run(stop, capture_output=True)
        if opts.keep:
            C.log(f"kept {tmp}" + (f" and {pg_root}" if pg_root else ""))
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            if pg_root:  # PostgreSQL's data folder (~250 MB at 100,000 runs)
                shutil.rmtree(pg_root, ignore_errors=True)

    print()
    print(f"== {NAME}: RunService.search_runs over {opts.runs:,} runs (page of 50 + total; {opts.repeats} calls each) ==")
    ok_all = True
    for backend, rows in results.items():
        print(f"  {backend}")
        for r in rows:
            ok = r["p95_ms"] <= BUDGET_P95_MS
            ok_all = ok_all and ok
            print(C.budget_line(f"{r['query']} ({total_text(r['total'])} match)", f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f} ms",
                                f"p95 <= {BUDGET_P95_MS:.0f} ms", ok))
    path = C.write_result(NAME, {"params": {"runs": opts.runs, "repeats": opts.repeats, "no_index": opts.no_index},
                                 "budget_p95_ms": BUDGET_P95_MS, "ok": ok_all, "results": results})
    print(f"  results: {os.path.relpath(path, C.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
