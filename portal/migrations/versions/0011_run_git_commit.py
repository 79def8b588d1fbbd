"""runs: the Git commit a run's config was exported to (git_commit, git_branch, git_path,
git_commit_url) and the software the run was submitted with (environment, JSON)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-25

Plain ADD COLUMNs (no batch copy of the table): on SQLite a copy would drop the triggers that
keep runs_fts in step (migration 0009).
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

COLUMNS = ("git_commit", "git_branch", "git_path", "git_commit_url", "environment")


def upgrade() -> None:
    op.add_column("runs", sa.Column("git_commit", sa.String(length=64), nullable=True))
    op.add_column("runs", sa.Column("git_branch", sa.String(length=255), nullable=True))
    op.add_column("runs", sa.Column("git_path", sa.String(), nullable=True))
    op.add_column("runs", sa.Column("git_commit_url", sa.String(), nullable=True))
    op.add_column("runs", sa.Column("environment", sa.String(), nullable=False, server_default="{}"))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35+, PostgreSQL): no table copy, the triggers stay
    for column in reversed(COLUMNS):
        op.drop_column("runs", column)
