"""runs: kind (train | eval | export) and, for export runs, the MLflow registered model and version

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24

Plain ADD COLUMNs (no batch copy of the table): on SQLite a copy would drop the triggers that
keep runs_fts in step (migration 0009).
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("kind", sa.String(length=16), nullable=False, server_default="train"))
    op.add_column("runs", sa.Column("registered_model", sa.String(length=255), nullable=True))
    op.add_column("runs", sa.Column("registered_version", sa.String(length=32), nullable=True))
    op.create_index("ix_runs_kind", "runs", ["kind"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_runs_kind", table_name="runs")
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35+, PostgreSQL): no table copy, the triggers stay
    for column in ("registered_version", "registered_model", "kind"):
        op.drop_column("runs", column)
