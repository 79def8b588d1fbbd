"""the history's search over name, note and tags without a full scan: trigram GIN indexes
(pg_trgm) on PostgreSQL, an FTS5 table with the trigram tokenizer (kept in sync by triggers) on
SQLite

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23

On SQLite, `runs_fts` is an external-content FTS5 table over runs(name, note, tags): it stores
only the trigram index, and the triggers below keep it in step with every insert, delete and
change of those three columns. A later migration that rebuilds `runs` (Alembic's batch mode on
SQLite copies the table, which drops its triggers) must call `create_sqlite_search()` again;
tests/test_history.py checks that the triggers exist at head.
"""
import sqlite3

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

COLUMNS = ("name", "note", "tags")
TRIGGERS = ("runs_fts_insert", "runs_fts_delete", "runs_fts_update")


def create_sqlite_search() -> None:
    new = ", ".join(f"new.{c}" for c in COLUMNS)
    old = ", ".join(f"old.{c}" for c in COLUMNS)
    cols = ", ".join(COLUMNS)
    op.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS runs_fts USING fts5({cols}, content='runs', content_rowid='id', "
               "tokenize='trigram')")
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.execute(f"CREATE TRIGGER runs_fts_insert AFTER INSERT ON runs BEGIN "
               f"INSERT INTO runs_fts(rowid, {cols}) VALUES (new.id, {new}); END")
    op.execute(f"CREATE TRIGGER runs_fts_delete AFTER DELETE ON runs BEGIN "
               f"INSERT INTO runs_fts(runs_fts, rowid, {cols}) VALUES ('delete', old.id, {old}); END")
    op.execute(f"CREATE TRIGGER runs_fts_update AFTER UPDATE OF {cols} ON runs BEGIN "
               f"INSERT INTO runs_fts(runs_fts, rowid, {cols}) VALUES ('delete', old.id, {old}); "
               f"INSERT INTO runs_fts(rowid, {cols}) VALUES (new.id, {new}); END")
    op.execute("INSERT INTO runs_fts(runs_fts) VALUES ('rebuild')")  # the runs already there


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        # needs the contrib package (Debian: postgresql-contrib, part of postgresql-15) and, once per
        # database, a role allowed to CREATE EXTENSION (pg_trgm is "trusted": a database owner may)
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        for column in COLUMNS:
            op.execute(f"CREATE INDEX IF NOT EXISTS ix_runs_{column}_trgm ON runs USING gin ({column} gin_trgm_ops)")
    elif dialect == "sqlite":
        try:
            probe = sqlite3.connect(":memory:")
            probe.execute("CREATE VIRTUAL TABLE t USING fts5(a, tokenize='trigram')")
            probe.close()
        except sqlite3.OperationalError as err:
            raise RuntimeError(f"the portal's search index needs SQLite 3.34 or newer with FTS5 (this Python has "
                               f"SQLite {sqlite3.sqlite_version}: {err}); use a newer Python or PostgreSQL") from err
        create_sqlite_search()


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        for column in COLUMNS:
            op.execute(f"DROP INDEX IF EXISTS ix_runs_{column}_trgm")
    elif dialect == "sqlite":
        for name in TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS runs_fts")
