"""The run history: filters, search, sort and paging (SQLite and PostgreSQL), notes and tags,
and clones that record their parent and train on the same dataset versions."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from portal.models import AuditEvent, Run, RunStatus, utcnow
from portal.run_query import RunQuery
from portal.runs import NotFound, PortalError


def _seed(services) -> dict:
    """Runs of two users with known fields (rows only: the history is a query over them)."""
    runs = services.runs
    ann, ben = runs.ensure_user("ann"), runs.ensure_user("ben")
    admin = runs.ensure_user("root_admin", is_admin=True)
    start = utcnow() - timedelta(days=10)
    specs = [  # owner, name, status, model, datasets, stage, method, loss
        (ann, "lora_faq_v1", RunStatus.succeeded, "/m/qwen2.5-7b", "faq_2025", "sft", "lora", 1.20),
        (ann, "lora_faq_v2", RunStatus.succeeded, "/m/qwen2.5-7b", "faq_2025,chitchat", "sft", "lora", 0.95),
        (ann, "full_faq", RunStatus.failed, "/m/llama3-8b", "faq_2025", "sft", "full", None),
        (ann, "dpo_pairs", RunStatus.running, "/m/llama3-8b", "prefs_100%_clean", "dpo", "lora", None),
        (ben, "ben_lora", RunStatus.succeeded, "/m/qwen2.5-7b", "faq_2025", "sft", "lora", 0.80),
        (ben, "ben_cancelled", RunStatus.cancelled, "/m/qwen2.5-7b", "other", "sft", "freeze", None),
    ]
    ids = {}
    with services.db.session() as s:
        for i, (owner, name, status, model, data, stage, method, loss) in enumerate(specs):
            run = Run(name=name, owner_id=owner.id, owner=owner.username, status=status, model_name_or_path=model,
                      datasets=data, stage=stage, finetuning_type=method, final_loss=loss,
                      created_at=start + timedelta(days=i), run_dir="/nonexistent", output_dir="/nonexistent")
            s.add(run)
            s.commit()
            s.refresh(run)
            ids[name] = run.id
    return {"ann": ann, "ben": ben, "admin": admin, "ids": ids, "start": start}


def _names(runs, user, **query) -> list[str]:
    page, _ = runs.search_runs(user, RunQuery(**query))
    return [r.name for r in page]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_filters_search_sort_and_paging(make_services, postgres_url, database):
    services = make_services(**({"database_url": postgres_url} if database == "postgresql" else {}))
    seeded = _seed(services)
    runs, ann, ben, admin = services.runs, seeded["ann"], seeded["ben"], seeded["admin"]
    if database == "postgresql":  # the shared server may hold runs of other tests: look at these users only
        assert set(_names(runs, admin, owner="ann", limit=500)) == {"lora_faq_v1", "lora_faq_v2", "full_faq",
                                                                  "dpo_pairs"}
    assert _names(runs, ann) == ["dpo_pairs", "full_faq", "lora_faq_v2", "lora_faq_v1"]  # own, newest first
    assert _names(runs, ann, owner="ben") == _names(runs, ann)  # a user cannot ask for another's runs
    assert _names(runs, admin, owner="ben") == ["ben_cancelled", "ben_lora"]
    assert _names(runs, ann, status=["succeeded"]) == ["lora_faq_v2", "lora_faq_v1"]
    assert _names(runs, ann, status=["failed", "running"]) == ["dpo_pairs", "full_faq"]
    assert _names(runs, ann, model="LLAMA3") == ["dpo_pairs", "full_faq"]  # any case
    assert _names(runs, ann, dataset="chitchat") == ["lora_faq_v2"]
    assert _names(runs, ann, dataset="100%") == ["dpo_pairs"]  # % is a character, not a wildcard
    assert _names(runs, ann, dataset="_2025") == ["full_faq", "lora_faq_v2", "lora_faq_v1"]
    assert _names(runs, ann, stage="dpo") == ["dpo_pairs"]
    assert _names(runs, ann, method="full") == ["full_faq"]
    assert _names(runs, ann, search="faq_v") == ["lora_faq_v2", "lora_faq_v1"]
    assert _names(runs, ann, sort="loss", status=["succeeded"]) == ["lora_faq_v2", "lora_faq_v1"]
    assert _names(runs, ann, sort="loss")[-1] in ("full_faq", "dpo_pairs")  # runs without a loss come last
    assert _names(runs, ann, created_from=seeded["start"] + timedelta(days=1, hours=1),
                  created_to=seeded["start"] + timedelta(days=2, hours=1)) == ["full_faq"]
    page, total = runs.search_runs(ann, RunQuery(limit=3, offset=3))
    assert total == 4 and [r.name for r in page] == ["lora_faq_v1"]
    import portal.run_query as run_query

    cap = run_query.COUNT_CAP
    run_query.COUNT_CAP = 2  # a large history: the total is counted up to the cap, then shown as "2+"
    try:
        page, total = runs.search_runs(ann, RunQuery(limit=1))
        assert total == 3 and run_query.total_text(total) == "2+" and len(page) == 1
    finally:
        run_query.COUNT_CAP = cap
    for bad, words in [({"status": ["done"]}, "status 'done'"), ({"sort": "best"}, "sort 'best'"),
                       ({"limit": 0}, "limit"), ({"offset": -1}, "offset")]:
        with pytest.raises(ValueError, match=words):
            runs.search_runs(ann, RunQuery(**bad))

    # notes and tags: the owner's, searchable; another user's attempt is refused and audited
    run_id = seeded["ids"]["lora_faq_v1"]
    runs.annotate(ann, run_id, note="Baseline for the Q4 review", tags=["baseline", "q4", "baseline"])
    assert _names(runs, ann, search="q4 review") == ["lora_faq_v1"]
    assert _names(runs, ann, search="BASELINE") == ["lora_faq_v1"]
    assert runs.get_run(ann, run_id).tags == "baseline,q4"
    with pytest.raises(NotFound):
        runs.annotate(ben, run_id, note="mine now")
    with pytest.raises(PortalError, match="commas"):
        runs.annotate(ann, run_id, tags=["a,b"])
    with services.db.session() as s:
        denied = s.exec(select(AuditEvent).where(AuditEvent.username == "ben", AuditEvent.action == "denied",
                                                 AuditEvent.target == f"run:{run_id}")).all()
    assert denied and runs.get_run(ann, run_id).note == "Baseline for the Q4 review"


def test_a_denied_view_is_audited_once_per_user_run_and_minute(make_services):
    """A page left open on another user's run refreshes every 2 s: its refusals are audited once a
    minute, not each time; changes are audited every time."""
    from portal.recent import Recent
    from portal.runs import DENIED_VIEW_SECONDS

    services = make_services()
    seeded = _seed(services)
    runs, ann, ben = services.runs, seeded["ann"], seeded["ben"]
    clock = [0.0]
    runs._denied_seen = Recent(DENIED_VIEW_SECONDS, 4096, timer=lambda: clock[0])
    theirs, other = seeded["ids"]["ben_lora"], seeded["ids"]["ben_cancelled"]

    def denied() -> list[tuple[str, str]]:
        with services.db.session() as s:
            return [(e.target, e.detail) for e in s.exec(select(AuditEvent).where(
                AuditEvent.username == "ann", AuditEvent.action == "denied")).all()]

    for _ in range(3):
        with pytest.raises(NotFound):
            runs.get_run(ann, theirs)
    with pytest.raises(NotFound):
        runs.get_run(ann, other)  # another run: audited on its own
    assert [t for t, _ in denied()] == [f"run:{theirs}", f"run:{other}"]
    clock[0] += DENIED_VIEW_SECONDS  # a minute on: audited again
    with pytest.raises(NotFound):
        runs.get_run(ann, theirs)
    for _ in range(2):  # a change is audited every time
        with pytest.raises(NotFound):
            runs.annotate(ann, theirs, note="mine")
    assert [t for t, _ in denied()].count(f"run:{theirs}") == 4
    assert runs.get_run(ben, theirs).owner == "ben"


def test_clone_records_its_parent_and_keeps_the_data_versions(make_services, tmp_path):
    from conftest import demo_form, submit_form

    from portal.dataset_checks import DatasetSpec
    from portal.demo import alpaca_rows

    services = make_services()
    runs = services.runs
    cara = runs.ensure_user("cara")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(40)))
    version, _ = services.datasets.add(cara, data, "cara_data", DatasetSpec("alpaca"))
    model = services.settings.shared_models_root / "tiny-llama"
    parent = submit_form(runs, cara, demo_form(model, "parent_run", **{"train.dataset": ["cara_data"]}))
    parent = runs.wait(cara, parent.id, timeout=300, interval=0.5)
    assert parent.status.value == "succeeded", runs.logs(cara, parent.id)[-2000:]

    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(44, seed=3)))
    services.datasets.add(cara, data, "cara_data", DatasetSpec("alpaca"))  # version 2 of the same name
    child = runs.clone(cara, parent.id, "child_run", {"learning_rate": 5e-4})
    try:
        assert child.parent_id == parent.id
        assert json.loads(child.dataset_fingerprints)[0]["sha256"] == version.sha256  # the parent's version 1
        pinned = json.loads((Path(child.run_dir) / "datasets" / "dataset_info.json").read_text())
        assert pinned == json.loads((Path(parent.run_dir) / "datasets" / "dataset_info.json").read_text())
        assert "learning_rate: 0.0005" in child.config_yaml and "parent_run" not in child.config_yaml
        tags = services.tracker.client.get_run(child.mlflow_run_id).data.tags
        assert tags["portal.parent_run_id"] == str(parent.id) and tags["portal.source"] == "clone"
        params = services.tracker.client.get_run(child.mlflow_run_id).data.params  # the reproducibility record
        assert params["env.llamafactory"] == "0.9.5" and params["env.torch"].startswith("2.11")
        assert params["portal.seed"] == "42" and params["env.python"].startswith("3.")
        comparison = runs.compare(cara, [parent.id, child.id])
        assert comparison.differences["learning_rate"] == [0.001, 0.0005]
        assert "output_dir" not in comparison.differences and "dataset_dir" not in comparison.differences
        assert {p.key for p in comparison.curves[parent.id]} >= {"loss"}
        with pytest.raises(PortalError, match="2 to 5"):
            runs.compare(cara, [parent.id])
        other = runs.ensure_user("dan")
        with pytest.raises(NotFound):
            runs.clone(other, parent.id, "stolen", {})
        # a clone that adds a dataset the parent did not use: the parent's version of the old one, the newest
        # of the new one
        services.datasets.add(cara, data, "extra_data", DatasetSpec("alpaca"))
        wider = runs.clone(cara, parent.id, "wider_run", {"dataset": "cara_data,extra_data"})
        runs.cancel(cara, wider.id)
        pinned_wider = json.loads((Path(wider.run_dir) / "datasets" / "dataset_info.json").read_text())
        assert pinned_wider["cara_data"] == pinned["cara_data"] and "extra_data" in pinned_wider
        fresh = submit_form(runs, cara, demo_form(model, "fresh_run", **{"train.dataset": ["cara_data"]}))
        assert json.loads(fresh.dataset_fingerprints)[0]["version"] == 2 and fresh.parent_id is None
        runs.cancel(cara, fresh.id)
    finally:
        runs.cancel(cara, child.id)


# ---- status history ---------------------------------------------------------------------------

def test_status_changes_are_recorded_once_each(trained, make_services):
    services, alice, run = trained["services"], trained["user"], trained["run"]
    events = services.runs.status_events(alice, run.id)  # a real training, through the supervisor
    assert [e.status.value for e in events] == ["starting", "running", "succeeded"]
    assert events[1].reason == "running on the CPU" and events[2].reason is None
    assert events[0].at <= events[1].at <= events[2].at and events[2].at >= run.started_at
    with pytest.raises(NotFound):
        services.runs.status_events(services.runs.ensure_user("evan"), run.id)

    fresh = make_services()
    runs = fresh.runs
    ann = runs.ensure_user("ann")
    with fresh.db.session() as s:  # a row made without RunService._set, as before migration 0008
        row = Run(name="old_run", owner_id=ann.id, owner="ann", status=RunStatus.queued, run_dir="/nonexistent")
        s.add(row)
        s.commit()
        s.refresh(row)
    assert runs.status_events(ann, row.id) == []
    assert runs._set(row.id, where=(RunStatus.running,), status=RunStatus.failed) is False  # did not match
    assert runs._set(row.id, status=RunStatus.queued, status_reason="still waiting") is True  # no change
    assert runs._set(row.id, note="a note") is True  # no status at all
    assert runs.status_events(ann, row.id) == []
    assert runs._set(row.id, where=(RunStatus.queued,), status=RunStatus.starting, status_reason=None) is True
    assert runs._set(row.id, where=(RunStatus.queued,), status=RunStatus.running) is False  # no longer queued
    runs._set(row.id, where=(RunStatus.starting,), status=RunStatus.cancelled, status_reason="cancelled by ann")
    assert [(e.status.value, e.reason) for e in runs.status_events(ann, row.id)] == [
        ("starting", None), ("cancelled", "cancelled by ann")]


# ---- the run's files: log, artifacts, confinement ----------------------------------------------

def test_a_trained_run_lists_and_serves_its_files(trained):
    services, alice, run = trained["services"], trained["user"], trained["run"]
    runs = services.runs
    found, cut = runs.artifacts(alice, run.id)
    paths = {a.path: a for a in found}
    assert not cut and {"adapter_config.json", "adapter_model.safetensors", "trainer_log.jsonl",
                        "all_results.json"} <= set(paths), sorted(paths)
    assert paths["adapter_config.json"].downloadable and paths["adapter_config.json"].size > 0
    name, data = runs.artifact_bytes(alice, run.id, "adapter_config.json")
    assert name == "adapter_config.json" and json.loads(data)["peft_type"] == "LORA"
    checkpoints = [a for a in found if a.path.startswith("checkpoint-")]
    assert all(a.path.endswith("/") and a.files > 1 and not a.downloadable for a in checkpoints)
    got, handle, size = runs.open_log(alice, run.id)
    with handle:
        whole = handle.read()
    assert got.id == run.id and size > 0 and whole == (Path(run.run_dir) / "job.log").read_bytes()
    assert "***** Running training *****" in whole.decode("utf-8", "replace")  # the start, not only the tail
    bob = runs.ensure_user("bob_files")  # another user: none of it exists for him
    for call in (lambda: runs.artifacts(bob, run.id), lambda: runs.open_log(bob, run.id),
                 lambda: runs.artifact_bytes(bob, run.id, "adapter_config.json")):
        with pytest.raises(NotFound):
            call()


def test_run_files_never_leave_the_run_folder(make_services, tmp_path):
    from portal.run_files import ARTIFACT_DOWNLOAD_MAX_BYTES

    services = make_services()
    runs = services.runs
    ann, ben = runs.ensure_user("ann"), runs.ensure_user("ben")
    run_dir = runs.space(ann).run_dir("files_run")
    out = run_dir / "output"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (out / "checkpoint-12").mkdir()
    (out / "checkpoint-12" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-20").mkdir()  # being written: no trainer state yet
    (out / "adapter_config.json").write_text('{"r": 8}')
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    with open(out / "big.bin", "wb") as fh:
        fh.truncate(ARTIFACT_DOWNLOAD_MAX_BYTES + 1)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    bens_file = runs.space(ben).root / "private.json"
    bens_file.write_text('{"ben": 1}')
    (out / "leak.json").symlink_to(secret)  # links a job could leave: never listed, never served
    (out / "bens.json").symlink_to(bens_file)
    (out / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    (out / "checkpoint-99").symlink_to(out / "checkpoint-4", target_is_directory=True)
    os.mkfifo(out / "pipe.json")
    (run_dir / "job.log").write_text("step 1\nstep 2\n")
    with services.db.session() as s:
        row = Run(name="files_run", owner_id=ann.id, owner="ann", status=RunStatus.failed, run_dir=str(run_dir),
                  output_dir=str(out))
        s.add(row)
        s.commit()
        s.refresh(row)

    found, cut = runs.artifacts(ann, row.id)
    assert [a.path for a in found] == ["adapter_config.json", "big.bin", "eval/results.json", "checkpoint-4/",
                                       "checkpoint-12/", "checkpoint-20/"]
    assert found[3].files == 2 and found[3].size == 102 and not found[1].downloadable
    assert runs.artifact_bytes(ann, row.id, "checkpoint-4/trainer_state.json") == ("trainer_state.json", b"{}")
    assert runs.artifact_bytes(ann, row.id, "./eval//results.json")[1] == b"{}"
    for bad in ("leak.json", "bens.json", "linked_dir/secret.txt", "checkpoint-99/trainer_state.json", "pipe.json",
                "../job.log", "eval/../../job.log", str(secret), "/etc/passwd", "", ".", "checkpoint-4",
                "missing.json", "eval\\..\\..\\job.log"):
        with pytest.raises(NotFound):
            runs.artifact_bytes(ann, row.id, bad)
    with pytest.raises(PortalError, match="10 MB"):
        runs.artifact_bytes(ann, row.id, "big.bin")
    with pytest.raises(NotFound):
        runs.artifact_bytes(ben, row.id, "adapter_config.json")
    assert runs.resumable_checkpoint(ann, runs.get_run(ann, row.id)) == out / "checkpoint-12"
    assert runs.resumable_checkpoint(ben, runs.get_run(ann, row.id)) is None  # not his run

    # the log: served while it is the run's own file, refused once a link replaces it
    _, handle, size = runs.open_log(ann, row.id)
    with handle:
        assert handle.read() == b"step 1\nstep 2\n" and size == 14
    (run_dir / "job.log").unlink()
    (run_dir / "job.log").symlink_to(secret)
    with pytest.raises(NotFound, match="no log file"):
        runs.open_log(ann, row.id)
    # the output folder itself replaced by a link: nothing listed or served
    out.rename(run_dir / "real_output")
    out.symlink_to(run_dir / "real_output", target_is_directory=True)
    assert runs.artifacts(ann, row.id) == ([], False)
    with pytest.raises(NotFound):
        runs.artifact_bytes(ann, row.id, "adapter_config.json")
    assert runs.resumable_checkpoint(ann, runs.get_run(ann, row.id)) is None


# ---- the search index ---------------------------------------------------------------------------

SEARCH_ROWS = [  # name, note, tags
    ("lora_sweep_01", "", ""), ("LoRA_Sweep_02", "Sweep of ranks", "sweep"), ("baseline", "the BASELINE run", "q3"),
    ("full_ft", "100% of the data, 5_000 rows", "risk,q3"), ("dpo_prefs", 'a "quoted" word', ""),
    ("été_run", "Été: accents stay as they are", "été"), ("x" * 100, "NEAR(x y) OR run*", "a-b"),
    ("naïve", "", "long-tag-name"), ("r_1", "", ""),
]
SEARCH_WORDS = ["sweep", "SWEEP", "swe", "sw", "q3", "q", "100%", "5_0", "_0", '"quoted"', 'a "q', "été", "ÉTÉ",
                "Été", "near(x", "or run*", "xxxx", "aïv", "a-b", "ng-tag", "r_1", "nothing here", "  sweep  ", "%",
                "_", "\\", "rank"]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_search_index_finds_what_like_finds(make_services, postgres_url, database):
    import portal.run_query as run_query

    services = make_services(**({"database_url": postgres_url} if database == "postgresql" else {}))
    runs = services.runs
    who = runs.ensure_user(f"searcher_{database}")
    admin = runs.ensure_user(f"search_admin_{database}", is_admin=True)  # searches everyone's runs: the index
    with services.db.session() as s:
        for name, note, tags in SEARCH_ROWS:
            s.add(Run(name=name, owner_id=who.id, owner=who.username, note=note, tags=tags, run_dir="/nonexistent"))
        s.commit()

    def found(word: str) -> list[str]:
        page, _ = runs.search_runs(admin, RunQuery(search=word, limit=500))
        mine = [r.name for r in page if r.owner == who.username]  # (the PostgreSQL server is shared)
        assert mine == _names(runs, who, search=word, limit=500)  # a user's own search: LIKE on their runs
        return mine

    indexed = {word: found(word) for word in SEARCH_WORDS}
    saved = run_query.MIN_INDEXED_SEARCH
    run_query.MIN_INDEXED_SEARCH = 10**6  # every word through LIKE alone: the search before the index
    try:
        plain = {word: found(word) for word in SEARCH_WORDS}
    finally:
        run_query.MIN_INDEXED_SEARCH = saved
    assert indexed == plain
    assert set(indexed["sweep"]) == {"lora_sweep_01", "LoRA_Sweep_02"} and indexed["100%"] == ["full_ft"]
    assert indexed["été"] == ["été_run"] and indexed["near(x"] == ["x" * 100]

    # the index follows inserts, changes and deletes (SQLite: the triggers of migration 0009)
    target = runs.search_runs(who, RunQuery(search="baseline"))[0][0]
    runs.annotate(who, target.id, note="now about calibration", tags=["calib"])
    page, _ = runs.search_runs(admin, RunQuery(search="the BASELINE", limit=500))
    assert target.id not in [r.id for r in page]
    assert found("calibration") == ["baseline"] and found("the BASELINE run") == []
    with services.db.session() as s:
        s.add(Run(name="late_arrival", owner_id=who.id, owner=who.username, run_dir="/nonexistent"))
        s.commit()
        assert found("arrival") == ["late_arrival"]
        s.delete(s.exec(select(Run).where(Run.name == "late_arrival")).one())
        s.commit()
    assert found("arrival") == []

    # and the index is what answers an admin's search over everyone's runs (not a scan of every row)
    from sqlalchemy import text
    from sqlalchemy.dialects import sqlite

    from portal.run_query import count_statement, page_statement

    for statement in (page_statement, count_statement):
        assert "runs_fts MATCH" in str(statement(RunQuery(search="sweep"), admin).compile(dialect=sqlite.dialect()))
        assert "runs_fts" not in str(statement(RunQuery(search="sweep"), who).compile(dialect=sqlite.dialect()))
        assert "runs_fts" not in str(statement(RunQuery(search="sw"), admin).compile(dialect=sqlite.dialect()))

    with services.db.engine.connect() as conn:
        if database == "sqlite":
            triggers = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'"))}
            assert {"runs_fts_insert", "runs_fts_delete", "runs_fts_update"} <= triggers
            plan = " ".join(str(r[-1]) for r in conn.execute(text(
                "EXPLAIN QUERY PLAN SELECT rowid FROM runs_fts WHERE runs_fts MATCH '\"sweep\"'")))
            assert "VIRTUAL TABLE INDEX" in plan, plan
        else:
            conn.execute(text("SET enable_seqscan = off"))  # a tiny table: make the planner show the index
            plan = " ".join(r[0] for r in conn.execute(text(
                "EXPLAIN SELECT id FROM runs WHERE name ILIKE '%sweep%' OR note ILIKE '%sweep%'")))
            assert "ix_runs_name_trgm" in plan and "ix_runs_note_trgm" in plan, plan
