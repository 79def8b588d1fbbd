"""Database tables. Schema changes go through Alembic (portal/migrations)."""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import BigInteger, Index, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class RunStatus(str, enum.Enum):
    queued = "queued"
    starting = "starting"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES

    @property
    def is_active(self) -> bool:
        return self in (RunStatus.starting, RunStatus.running)


FINAL_STATUSES = frozenset({RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled})


class User(SQLModel, table=True):
    __tablename__ = "users"

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(index=True, unique=True, max_length=64)
    subject: str | None = Field(default=None, index=True, unique=True, max_length=255)  # OIDC "sub"
    groups: str = ""  # comma separated, from the IdP's groups claim at the last login
    email: str | None = None
    display_name: str | None = None
    is_admin: bool = False
    is_active: bool = True
    created_at: datetime = Field(default_factory=utcnow)
    last_login_at: datetime | None = None


class Run(SQLModel, table=True):
    __tablename__ = "runs"
    # "my runs, newest first" is the history's main query: one index serves it at 100,000 runs.
    # The search over name, note and tags: trigram GIN indexes on PostgreSQL (pg_trgm, migration
    # 0009); SQLite has the FTS5 table runs_fts instead (made by the migration, not a model).
    __table_args__ = (
        Index("ix_runs_owner_created", "owner_id", "created_at"),
        *(Index(f"ix_runs_{column}_trgm", column, postgresql_using="gin",
                postgresql_ops={column: "gin_trgm_ops"}).ddl_if(dialect="postgresql")
          for column in ("name", "note", "tags")),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128)
    owner_id: int = Field(foreign_key="users.id", index=True)
    owner: str = Field(index=True, max_length=64)  # username, denormalised for listings
    status: RunStatus = Field(default=RunStatus.queued, index=True)
    status_reason: str | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)
    started_at: datetime | None = None
    finished_at: datetime | None = None

    stage: str = ""
    finetuning_type: str = ""
    model_name_or_path: str = ""
    datasets: str = ""  # comma separated, as in the YAML
    config_yaml: str = ""
    config_sha256: str = Field(default="", max_length=64)
    run_dir: str = ""
    output_dir: str = ""

    mlflow_run_id: str | None = Field(default=None, max_length=64)
    launcher: str = "local"
    launcher_state: str = "{}"  # JSON dict owned by the launcher (pid + start time locally)
    gpus: int = 0  # all the run's GPUs: per node x nodes
    nodes: int = 1  # more than one on a cluster only (Kubernetes)
    exit_code: int | None = None
    final_loss: float | None = Field(default=None, index=True)  # the history's "best first" sort
    cancel_requested: bool = False
    # JSON list: for each dataset the run used, its name, version, sha256, rows and file
    dataset_fingerprints: str = "[]"
    parent_id: int | None = Field(default=None, index=True)  # the run this one was cloned from
    # "train" (any LLaMA-Factory stage), "eval" (a predict job of its parent's model) or "export"
    # (its parent merged into a model folder and registered in MLflow): migration 0010
    kind: str = Field(default="train", max_length=16, index=True)
    registered_model: str | None = Field(default=None, max_length=255)  # export runs: MLflow registry name
    registered_version: str | None = Field(default=None, max_length=32)  # ... and the version made
    # the config's last export to Git (GitConfigs.export_run): commit, branch, file and link (migration 0011)
    git_commit: str | None = Field(default=None, max_length=64)
    git_branch: str | None = Field(default=None, max_length=255)
    git_path: str | None = None
    git_commit_url: str | None = None  # from git_commit_url_template when it was exported
    # JSON: the software the job ran with (env.python, env.llamafactory, ... as logged to MLflow at
    # submit) and "job.environment" (the Python environment, or the trainer image on Kubernetes)
    environment: str = "{}"
    note: str = ""  # free text by the owner, searched with the name
    tags: str = ""  # comma separated, by the owner


class RunEvent(SQLModel, table=True):
    """One status change of a run (written by RunService._set, migration 0008): the run's status
    history. Runs older than the migration have none."""

    __tablename__ = "run_events"
    __table_args__ = (Index("ix_run_events_run_at", "run_id", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id")
    at: datetime = Field(default_factory=utcnow)
    status: RunStatus
    reason: str | None = None


class DatasetVersion(SQLModel, table=True):
    """One uploaded version of a user's dataset. Files are stored by content (sha256), so a new
    upload under the same name never changes what an earlier run trained on."""

    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("owner_id", "name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    owner_id: int = Field(foreign_key="users.id", index=True)
    owner: str = Field(max_length=64)
    name: str = Field(index=True, max_length=100)
    version: int
    sha256: str = Field(index=True, max_length=64)
    rows: int
    size_bytes: int = Field(sa_type=BigInteger)
    file_type: str = Field(max_length=16)
    file_name: str  # relative to the owner's datasets folder
    source_name: str | None = None  # the uploaded file's own name
    info_entry: str = "{}"  # JSON: the dataset_info.json entry (formatting, columns, tags)
    created_at: datetime = Field(default_factory=utcnow)
    deleted_at: datetime | None = None


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    username: str = Field(index=True, max_length=64)
    action: str = Field(index=True, max_length=64)
    target: str | None = None
    detail: str | None = None
    client: str | None = None  # address the request came from, when known


class ApiToken(SQLModel, table=True):
    """A personal access token: it acts as its user on /api and /v1. Only its SHA-256 is kept
    (tokens are 256 random bits, so a fast hash is enough); ``prefix`` identifies it in lists."""

    __tablename__ = "api_tokens"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    name: str = Field(max_length=100)
    token_sha256: str = Field(index=True, unique=True, max_length=64)
    prefix: str = Field(max_length=16)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    last_used_from: str | None = Field(default=None, max_length=255)
    revoked_at: datetime | None = None
