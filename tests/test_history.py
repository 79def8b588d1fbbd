"""The run history: filters, search, sort and paging (SQLite and PostgreSQL), notes and tags,
and clones that record their parent and train on the same dataset versions."""

from __future__ import annotations

import json
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
