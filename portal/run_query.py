"""The run history's filters, sort and paging, turned into one SQL query (SQLite and PostgreSQL)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, func, or_
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import visitors
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.sqltypes import NULLTYPE
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


# trigrams: a search word shorter than this has none, and is matched by LIKE alone
MIN_INDEXED_SEARCH = 3


class SearchCandidates(ColumnElement):
    """The runs whose name, note or tags may contain ``phrase``, from the search index: on
    SQLite the FTS5 table ``runs_fts`` (trigram tokenizer, migration 0009), on PostgreSQL nothing
    (true: the trigram GIN indexes serve the ILIKE itself). Always ANDed with the LIKE search,
    which decides: the index only narrows, so results are the LIKE search's exactly."""

    inherit_cache = True
    type = NULLTYPE  # a Boolean type would be rendered "... = 1" on SQLite, which no index serves
    _traverse_internals = [("phrase", visitors.InternalTraversal.dp_clauseelement),
                           ("ordered", visitors.InternalTraversal.dp_boolean)]

    def __init__(self, text: str, ordered: bool = False):
        # an FTS5 string: one phrase, matched as a substring by the trigram tokenizer (any case)
        self.phrase = bindparam("search_phrase", '"' + text.replace('"', '""') + '"', unique=True)
        self.ordered = ordered  # for a sorted page (see _candidates_sqlite)


@compiles(SearchCandidates)
def _candidates_anywhere(element, compiler, **kw):
    return "1 = 1"


@compiles(SearchCandidates, "sqlite")
def _candidates_sqlite(element, compiler, **kw):
    # A count (up to COUNT_CAP) reads the matches' rows straight from the index's rowids. A sorted
    # page gets "+runs.id": the matches become a set SQLite builds once and probes while it walks
    # the index of the page's order (or the owner's runs) up to the page's end; fetching and
    # sorting every match instead costs ~75 ms for a word in a quarter of 100,000 runs
    # (bench/bench_history.py; decision 0018).
    plus = "+" if element.ordered else ""
    phrase = compiler.process(element.phrase, **kw)
    return f"{plus}runs.id IN (SELECT rowid FROM runs_fts WHERE runs_fts MATCH {phrase})"


def search_clause(text: str, ordered: bool = False, indexed: bool = True):
    """Name, note or tags contain ``text`` (any case, literally): the LIKE search, narrowed
    through the search index when ``indexed`` and the text has a trigram."""
    like = or_(_contains(Run.name, text), _contains(Run.note, text), _contains(Run.tags, text))
    if not indexed or len(text.strip()) < MIN_INDEXED_SEARCH:
        return like
    return and_(SearchCandidates(text.strip(), ordered), like)


def where_clauses(query: RunQuery, user: User, ordered: bool = False) -> list[Any]:
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
        # One owner's runs (a user's own, or an admin's `owner`) are walked through the owner's
        # index, a few thousand rows at most: the LIKE alone is cheapest there, whatever the word
        # (the index would first gather the word's matches among everyone's runs). Everyone's runs
        # (an admin's search) go through the search index (decision 0018).
        scoped = not user.is_admin or bool(query.owner)
        clauses.append(search_clause(query.search, ordered, indexed=not scoped))
    if query.created_from:
        clauses.append(col(Run.created_at) >= query.created_from)
    if query.created_to:
        clauses.append(col(Run.created_at) <= query.created_to)
    return clauses


def page_statement(query: RunQuery, user: User):
    return (select(Run).where(*where_clauses(query, user, ordered=True)).order_by(*SORTS[query.sort])
            .limit(query.limit).offset(query.offset))


def count_statement(query: RunQuery, user: User):
    """How many runs match, counted up to COUNT_CAP + 1."""
    capped = select(Run.id).where(*where_clauses(query, user)).limit(COUNT_CAP + 1).subquery()
    return select(func.count()).select_from(capped)


def total_text(total: int) -> str:
    """A total from count_statement, for people: "1,000+" once the cap is reached."""
    return f"{COUNT_CAP:,}+" if total > COUNT_CAP else f"{total:,}"
