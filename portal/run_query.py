"""The run history's filters, sort and paging, turned into one SQL query (SQLite and PostgreSQL)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_
from sqlmodel import col, select

from .models import Run, RunStatus, User

SORTS = {
    "newest": (col(Run.created_at).desc(), col(Run.id).desc()),
    "oldest": (col(Run.created_at).asc(), col(Run.id).asc()),
    "loss": (col(Run.final_loss).asc().nulls_last(), col(Run.id).desc()),  # best first, runs without a loss last
    "name": (col(Run.name).asc(), col(Run.id).desc()),
}
MAX_LIMIT = 500
# Totals are counted up to this many, then shown as "1,000+": an exact count of a broad search
# would read every row of a large history (the page itself stops after `limit` matches).
COUNT_CAP = 1000


@dataclass
class RunQuery:
    """What a user asks of the history. Text filters match anywhere, ignoring case."""

    status: list[str] | None = None
    model: str | None = None  # part of the base model's path or hub id
    dataset: str | None = None  # part of a dataset name
    stage: str | None = None
    method: str | None = None  # finetuning_type: lora, full, freeze, ...
    owner: str | None = None  # admins only; a user always sees their own
    search: str | None = None  # part of the run's name, note or tags
    created_from: datetime | None = None
    created_to: datetime | None = None
    sort: str = "newest"
    limit: int = 50
    offset: int = 0

    def check(self) -> "RunQuery":
        problems = []
        for value in self.status or []:
            if value not in RunStatus.__members__:
                problems.append(f"status '{value}' is not one of {', '.join(RunStatus.__members__)}")
        if self.sort not in SORTS:
            problems.append(f"sort '{self.sort}' is not one of {', '.join(SORTS)}")
        if not 1 <= self.limit <= MAX_LIMIT:
            problems.append(f"limit must be between 1 and {MAX_LIMIT}")
        if self.offset < 0:
            problems.append("offset must not be negative")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _like(value: str) -> str:
    escaped = value.strip().lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _contains(column: Any, value: str):
    # ILIKE on PostgreSQL; on SQLite, LIKE (case-insensitive for ASCII) on lower(): no per-row lower() on PostgreSQL
    return column.ilike(_like(value), escape="\\")


def where_clauses(query: RunQuery, user: User) -> list[Any]:
    clauses: list[Any] = []
    if not user.is_admin:
        clauses.append(Run.owner_id == user.id)
    elif query.owner:
        clauses.append(Run.owner == query.owner.strip())
    if query.status:
        clauses.append(col(Run.status).in_([RunStatus(s) for s in query.status]))
    if query.model:
        clauses.append(_contains(Run.model_name_or_path, query.model))
    if query.dataset:
        clauses.append(_contains(Run.datasets, query.dataset))
    if query.stage:
        clauses.append(Run.stage == query.stage.strip())
    if query.method:
        clauses.append(Run.finetuning_type == query.method.strip())
    if query.search:
        clauses.append(or_(_contains(Run.name, query.search), _contains(Run.note, query.search),
                           _contains(Run.tags, query.search)))
    if query.created_from:
        clauses.append(col(Run.created_at) >= query.created_from)
    if query.created_to:
        clauses.append(col(Run.created_at) <= query.created_to)
    return clauses


def page_statement(query: RunQuery, user: User):
    return (select(Run).where(*where_clauses(query, user)).order_by(*SORTS[query.sort])
            .limit(query.limit).offset(query.offset))


def count_statement(query: RunQuery, user: User):
    """How many runs match, counted up to COUNT_CAP + 1."""
    capped = select(Run.id).where(*where_clauses(query, user)).limit(COUNT_CAP + 1).subquery()
    return select(func.count()).select_from(capped)


def total_text(total: int) -> str:
    """A total from count_statement, for people: "1,000+" once the cap is reached."""
    return f"{COUNT_CAP:,}+" if total > COUNT_CAP else f"{total:,}"
