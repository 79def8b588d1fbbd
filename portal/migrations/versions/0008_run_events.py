"""run_events: each status change of a run (its status history)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

STATUSES = ("queued", "starting", "running", "succeeded", "failed", "cancelled")


def upgrade() -> None:
    # the runs table's enum type: reused on PostgreSQL (it exists since 0001), a CHECK-less
    # VARCHAR on SQLite, as for runs.status
    status = sa.Enum(*STATUSES, name="runstatus").with_variant(
        postgresql.ENUM(*STATUSES, name="runstatus", create_type=False), "postgresql")
    op.create_table(
        "run_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("status", status, nullable=False),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("run_events", schema=None) as batch_op:
        batch_op.create_index("ix_run_events_run_at", ["run_id", "at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("run_events", schema=None) as batch_op:
        batch_op.drop_index("ix_run_events_run_at")
    op.drop_table("run_events")
