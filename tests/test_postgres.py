"""The same SQLModel code and Alembic migrations on a real PostgreSQL server."""

from __future__ import annotations

from conftest import demo_form, submit_form
from sqlalchemy import inspect

from portal.db import Database


def test_migrations_create_the_schema_and_are_idempotent(postgres_url):
    db = Database(postgres_url)
    db.migrate()
    db.migrate()  # a second start changes nothing
    tables = set(inspect(db.engine).get_table_names())
    assert {"users", "runs", "audit_events", "dataset_versions", "alembic_version"} <= tables
    # the migrations build exactly the tables the models describe (a model change without its
    # migration fails here)
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    import portal.models  # noqa: F401 (registers the tables)

    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata) == []
        # the search index (0009): pg_trgm and a trigram GIN index per searched column
        from sqlalchemy import text

        assert conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'")).scalar() == 1
        indexes = {r[0]: r[1] for r in conn.execute(text("SELECT indexname, indexdef FROM pg_indexes "
                                                         "WHERE tablename = 'runs'"))}
        for column in ("name", "note", "tags"):
            assert f"USING gin ({column} gin_trgm_ops)" in indexes[f"ix_runs_{column}_trgm"]
    assert "run_events" in tables


def test_a_run_end_to_end_on_postgres(make_services, postgres_url):
    services = make_services(database_url=postgres_url)
    runs = services.runs
    alice, bob = runs.ensure_user("pg_alice"), runs.ensure_user("pg_bob")
    model = services.settings.shared_models_root / "tiny-llama"
    run = submit_form(runs, alice, demo_form(model, "pg_run"))
    run = runs.wait(alice, run.id, timeout=300, interval=0.5)
    assert run.status.value == "succeeded" and run.final_loss is not None
    assert run.created_at.tzinfo is not None and run.finished_at >= run.created_at
    assert [r.id for r in runs.list_runs(alice)][0] == run.id
    assert run.id not in [r.id for r in runs.list_runs(bob)]
    # the conditional updates (claim a queued run exactly once) hold on PostgreSQL too
    assert runs._set(run.id, where=(run.status.__class__.queued,), status=run.status.__class__.running) is False
