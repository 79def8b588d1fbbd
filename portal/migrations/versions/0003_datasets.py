"""datasets: uploaded versions, and the fingerprints of the datasets each run used

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dataset_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("owner", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("file_type", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("file_name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("source_name", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("info_entry", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("deleted_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("owner_id", "name", "version"),
    )
    op.create_index(op.f("ix_dataset_versions_owner_id"), "dataset_versions", ["owner_id"], unique=False)
    op.create_index(op.f("ix_dataset_versions_name"), "dataset_versions", ["name"], unique=False)
    op.create_index(op.f("ix_dataset_versions_sha256"), "dataset_versions", ["sha256"], unique=False)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dataset_fingerprints", sqlmodel.sql.sqltypes.AutoString(), nullable=False,
                                      server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("dataset_fingerprints")
    op.drop_index(op.f("ix_dataset_versions_sha256"), table_name="dataset_versions")
    op.drop_index(op.f("ix_dataset_versions_name"), table_name="dataset_versions")
    op.drop_index(op.f("ix_dataset_versions_owner_id"), table_name="dataset_versions")
    op.drop_table("dataset_versions")
