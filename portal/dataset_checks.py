"""Checks of an uploaded dataset file before the portal saves it and writes its
LLaMA-Factory ``dataset_info.json`` entry.

Pure Python (the standard library, numpy for the duplicate search at the end and pyarrow for
Parquet only); no Gradio, no LLaMA-Factory import. Every file is read as a stream: a 100 MB
JSON array is decoded element by element, and what is kept per row is one 8-byte digest (for
the duplicate search), so memory does not grow with the size of the rows.

What LLaMA-Factory 0.9.5 (``llamafactory/data/parser.py``, ``converter.py``) and ``datasets``
do with a file, and therefore what is checked here:

* ``.json`` and ``.jsonl`` both go to ``datasets``' JSON builder, which reads JSON Lines and, as
  a fallback, one JSON array of objects: either layout is accepted under either extension (the
  first non-blank character decides). A JSON array that starts with a byte-order mark fails to
  load there, so it is refused.
* Every row of a file ends up in one Arrow table: a row of another shape (a list instead of an
  object, a number where the other rows have text, an alpaca row in a sharegpt file) makes the
  load fail or the row vanish, so such rows are blocking ("mixed_formats").
* A column named in the entry but absent from the file makes the converter fail with a
  ``KeyError`` (``example["input"]``), optional columns included.
* ``dataset_info.json`` ``columns`` / ``tags``: when the key is there, every name it does not
  list becomes ``None`` (not the default), so :meth:`DatasetSpec.info_entry` writes them all.
* Sharegpt rows with a broken turn order are dropped ("Skipping this abnormal example").
* The train/eval split is ``datasets.Dataset.train_test_split`` (``data_utils.split_dataset``).

Row numbers in problems are what a person finds in the file: the line for ``.jsonl`` and
``.csv`` (the line a record starts on; with a header it equals the spreadsheet row number), the
record (1-based position in the array) for a JSON array, the row for Parquet
(:attr:`CheckReport.row_unit`).
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import json
import math
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ACCEPTED_EXTENSIONS", "MAX_ROWS_SETTING", "CheckReport", "DatasetSpec", "Problem", "check_dataset",
    "guess_spec", "guess_spec_for_file", "sniff_columns",
]

ACCEPTED_EXTENSIONS = ("json", "jsonl", "csv", "parquet")
MAX_ROWS_SETTING = "PORTAL_MAX_DATASET_ROWS"
EXAMPLES = 5  # example row numbers kept per problem
COLUMNS_SAMPLE = 20  # rows whose keys make columns_seen
CSV_FIELD_LIMIT = 16 * 2**20  # the csv module's default (128 KiB) is below a long answer; pandas has none
CHUNK_CHARS = 1 << 18  # characters read at a time from a JSON array

ALPACA_COLUMNS: dict[str, str | None] = {"prompt": "instruction", "query": "input", "response": "output",
                                         "system": None, "history": None, "tools": None}
SHAREGPT_COLUMNS: dict[str, str | None] = {"messages": "conversations", "system": None, "tools": None}
SHAREGPT_TAGS: dict[str, str | None] = {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                                        "assistant_tag": "gpt", "observation_tag": "observation",
                                        "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS: dict[str, str] = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant", "system_tag": "system"}
COLUMN_KEYS = ("prompt", "query", "response", "system", "history", "messages", "tools")
REQUIRED = {"alpaca": ("prompt", "response"), "sharegpt": ("messages",)}


# ---- the spec: what LLaMA-Factory's dataset_info.json entry says -----------------------------

@dataclass(frozen=True)
class DatasetSpec:
    """How LLaMA-Factory reads the file: its ``formatting``, column names and (sharegpt) tags.

    ``columns`` / ``tags`` hold overrides of LLaMA-Factory's defaults; a ``None`` value removes a
    default (e.g. ``columns={"query": None}`` for an alpaca file without an ``input`` column).
    """

    formatting: Literal["alpaca", "sharegpt"] = "alpaca"
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.formatting not in ("alpaca", "sharegpt"):
            raise ValueError(f"formatting must be 'alpaca' or 'sharegpt', not {self.formatting!r}")
        unknown = sorted(set(self.columns) - set(COLUMN_KEYS))
        if unknown:
            raise ValueError(f"unknown column key(s) {', '.join(unknown)}; the keys are {', '.join(COLUMN_KEYS)}")
        unknown = sorted(set(self.tags) - set(SHAREGPT_TAGS))
        if unknown:
            raise ValueError(f"unknown tag key(s) {', '.join(unknown)}; the keys are {', '.join(SHAREGPT_TAGS)}")
        for key in REQUIRED[self.formatting]:
            if key in self.columns and self.columns[key] is None:
                raise ValueError(f"the {key} column is required for {self.formatting} datasets")
        for key in ("role_tag", "content_tag", "user_tag", "assistant_tag"):
            if key in self.tags and self.tags[key] is None:
                raise ValueError(f"the {key} is required for sharegpt datasets")
        for key, value in [*self.columns.items(), *self.tags.items()]:
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{key} must be a non-empty name or None, not {value!r}")

    def resolved_columns(self) -> dict[str, str]:
        """LLaMA-Factory's default columns of this formatting merged with the overrides, the
        ``None`` ones dropped (keys of the other formatting are ignored)."""
        defaults = ALPACA_COLUMNS if self.formatting == "alpaca" else SHAREGPT_COLUMNS
        merged = {key: self.columns.get(key, default) for key, default in defaults.items()}
        return {key: value for key, value in merged.items() if value is not None}

    def resolved_tags(self) -> dict[str, str]:
        """Sharegpt tags (defaults merged with the overrides, ``None`` dropped); {} for alpaca."""
        if self.formatting != "sharegpt":
            return {}
        merged = {key: self.tags.get(key, default) for key, default in SHAREGPT_TAGS.items()}
        return {key: value for key, value in merged.items() if value is not None}

    def info_entry(self, file_name: str) -> dict[str, Any]:
        """The ``dataset_info.json`` entry. Columns and tags are written out in full: LLaMA-Factory
        sets every column/tag missing from a present ``columns``/``tags`` dict to None."""
        entry: dict[str, Any] = {"file_name": file_name, "formatting": self.formatting,
                                 "columns": self.resolved_columns()}
        if self.formatting == "sharegpt":
            entry["tags"] = self.resolved_tags()
        return entry


# ---- the report ------------------------------------------------------------------------------

@dataclass
class Problem:
    # unreadable|parse|missing_columns|empty_rows|over_cutoff|duplicates|mixed_formats|turn_order|too_many_rows|no_rows
    kind: str
    message: str
    rows: list[int] = field(default_factory=list)  # up to 5 example row numbers (see CheckReport.row_unit)
    count: int = 0
    blocking: bool = True


@dataclass
class CheckReport:
    file_type: str  # json|jsonl|csv|parquet (by extension; "" when not accepted)
    size_bytes: int
    sha256: str
    rows: int  # data rows read
    problems: list[Problem] = field(default_factory=list)
    preview: list[dict] = field(default_factory=list)
    columns_seen: list[str] = field(default_factory=list)
    row_unit: str = "row"  # what the numbers in Problem.rows count: line (jsonl, csv), record (json array), row
    usable_rows: int = 0  # rows LLaMA-Factory keeps (right shape and turn order), what it splits

    @property
    def ok(self) -> bool:
        return not any(p.blocking for p in self.problems)

    @property
    def blocking(self) -> list[Problem]:
        return [p for p in self.problems if p.blocking]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.blocking]

    def problem(self, kind: str) -> Problem | None:
        """The first problem of that kind, or None."""
        return next((p for p in self.problems if p.kind == kind), None)

    def split_counts(self, val_size: float) -> tuple[int, int]:
        """(train, eval) rows as LLaMA-Factory splits them (``split_dataset`` ->
        ``datasets.Dataset.train_test_split``), out of the rows it keeps (:attr:`usable_rows`):
        ``0`` means no eval set; a value in (0, 1) is a fraction, eval = ceil(rows * val_size);
        a value above 1 is a row count (``int(val_size)``). ValueError where the trainer would fail."""
        n = self.usable_rows
        if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or math.isnan(val_size):
            raise ValueError(f"val_size must be a number, not {val_size!r}")
        if val_size < 0:
            raise ValueError(f"val_size must not be negative (got {val_size}): use a fraction such as 0.1, "
                             "a number of rows such as 200, or 0 for no evaluation set")
        if val_size <= 1e-6:  # LLaMA-Factory: no split
            return n, 0
        if val_size == 1:
            raise ValueError("val_size 1 is neither a fraction below 1 nor a row count above 1: use e.g. 0.1 "
                             "(10% of the rows) or 2 (two rows)")
        if val_size < 1:
            n_eval = math.ceil(val_size * n)
            if n - n_eval <= 0:
                raise ValueError(f"val_size {val_size} of {n} usable rows leaves no training rows: use a smaller "
                                 "fraction or add rows")
            return n - n_eval, n_eval
        n_eval = int(val_size)
        if n_eval >= n:
            raise ValueError(f"val_size {val_size} asks for {n_eval} evaluation rows but the dataset has only "
                             f"{n} usable rows: use a number below {n} or a fraction such as 0.1")
        return n - n_eval, n_eval


# ---- reading: streams, row sources, errors ----------------------------------------------------

class _Stop(Exception):
    """Reading stopped on a blocking problem."""

    def __init__(self, problem: Problem):
        super().__init__(problem.message)
        self.problem = problem


class _HashingReader(io.RawIOBase):
    """A raw binary stream that feeds every byte read through SHA-256."""

    def __init__(self, f):
        super().__init__()
        self._f = f
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
        return n or 0

    def drain(self) -> None:
        """Hash the rest of the file (after reading stopped early)."""
        while chunk := self._f.read(1 << 20):
            self.sha.update(chunk)


def _text(raw: _HashingReader, newline: str | None) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BufferedReader(raw, buffer_size=1 << 18), encoding="utf-8-sig", newline=newline)


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _first_char(path: Path) -> str:
    """The first non-blank character of a text file ("" for none; the BOM skipped)."""
    with path.open("rb") as f:
        head = f.read(3)
        if head != b"\xef\xbb\xbf":
            f.seek(0)
        while chunk := f.read(1 << 16):
            stripped = chunk.lstrip()
            if stripped:
                return chr(stripped[0]) if stripped[0] < 128 else "?"
    return ""


def _has_bom(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(3) == b"\xef\xbb\xbf"


def _locate_bad_utf8(path: Path) -> tuple[int, int, int, int] | None:
    """(line, column, byte offset, byte value) of the first byte that is not UTF-8, or None."""
    line, col, offset, pending = 1, 0, 0, b""
    with path.open("rb") as f:
        while True:
            piece = f.readline(1 << 20)
            if not piece:
                return (line, col + 1, offset, pending[0]) if pending else None
            data = pending + piece
            try:
                text = data.decode("utf-8")
                pending = b""
            except UnicodeDecodeError as err:
                good = data[:err.start].decode("utf-8")
                if err.end == len(data) and not data.endswith(b"\n") and "end of data" in err.reason:
                    text, pending = good, data[err.start:]  # a character cut at the piece's end
                else:
                    return line, col + len(good) + 1, offset + err.start, data[err.start]
            offset += len(data) - len(pending)
            if text.endswith("\n"):
                line, col = line + 1, 0
            else:
                col += len(text)


def _unit_word(unit: str, n: int) -> str:
    return unit if n == 1 else unit + "s"


def _n(count: int, unit: str, verb: str = "") -> str:
    """'1 line has' / '3 lines have' (verb given in its plural form: have, are, repeat, do)."""
    singular = {"have": "has", "are": "is", "do": "does"}.get(verb, verb + "s")
    return f"{count:,} {_unit_word(unit, count)}" + (f" {verb if count != 1 else singular}" if verb else "")


def _examples(unit: str, rows: list[int]) -> str:
    return f"{_unit_word(unit, len(rows))} {', '.join(str(r) for r in rows)}"


class _RowMap:
    """Data-row ordinal (0-based) -> the number shown to people (line, record, row), kept compact:
    only the points where the offset between the two changes (blank lines, multi-line CSV records)."""

    def __init__(self, base: int):
        self.at = array("Q")
        self.delta = array("q")
        self.base = base
        self.current = base

    def note(self, ordinal: int, number: int) -> None:
        delta = number - ordinal
        if delta != self.current:
            self.at.append(ordinal)
            self.delta.append(delta)
            self.current = delta

    def number(self, ordinal: int) -> int:
        i = bisect.bisect_right(self.at, ordinal) - 1
        return ordinal + (self.delta[i] if i >= 0 else self.base)


def _iter_jsonl(text: io.TextIOWrapper, state: dict) -> Iterator[tuple[int, Any]]:
    loads = json.loads
    for lineno, line in enumerate(text, 1):
        if line.isspace():
            continue
        try:
            obj = loads(line)
        except json.JSONDecodeError as first:
            col, msg = first.colno, first.msg
            stripped = line.rstrip("\r\n")
            try:
                loads(stripped)
            except json.JSONDecodeError as err:  # the column without the line's end (not "line 2, column 1")
                col, msg = err.colno, err.msg
            hint = "Fix that line: each line must be one complete JSON object."
            stripped = stripped.strip()
            if stripped.startswith(("{", "[")) and not stripped.endswith(("}", "]")):
                hint = ("The object seems to go on over the next lines: each line must hold one complete JSON "
                        "object (a pretty-printed file must be a JSON array [{...}, {...}] instead).")
            raise _Stop(Problem("parse", f"line {lineno}, column {col}: {msg}. {hint}", [lineno], 1)) \
                from None
        yield lineno, obj


def _iter_json_array(text: io.TextIOWrapper, state: dict) -> Iterator[tuple[int, Any]]:
    """One JSON array, decoded element by element with ``raw_decode`` over a sliding buffer."""
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False
    lines_before, col_carry = 0, 0  # newlines in the text already dropped from buf; chars after the last one
    record = 0

    def more(need: int = CHUNK_CHARS) -> bool:
        nonlocal buf, pos, eof, lines_before, col_carry
        if eof:
            return False
        if pos:  # drop what has been decoded, keeping line/column bookkeeping
            dropped = buf[:pos]
            nl = dropped.count("\n")
            if nl:
                lines_before += nl
                col_carry = len(dropped) - dropped.rfind("\n") - 1
            else:
                col_carry += len(dropped)
            buf, pos = buf[pos:], 0
        chunk = text.read(max(need, CHUNK_CHARS))
        if not chunk:
            eof = True
            return False
        buf += chunk
        return True

    def fail(at: int, msg: str, in_record: bool = True) -> _Stop:
        line = lines_before + buf.count("\n", 0, at) + 1
        last_nl = buf.rfind("\n", 0, at)
        col = at - last_nl if last_nl >= 0 else col_carry + at + 1
        where = f" (record {record + 1})" if in_record else ""
        return _Stop(Problem("parse", f"line {line}, column {col}{where}: {msg}. Fix the JSON there: the file must "
                             "be one JSON array of objects, [{...}, {...}].", [record + 1] if in_record else [], 1))

    def skip_ws() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not more():
                return ""

    skip_ws()  # the caller saw '[' first
    pos += 1
    if skip_ws() == "]":
        pos += 1
    else:
        while True:
            if not skip_ws():
                raise fail(pos, "Expecting value (the array is not closed with ']')")
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as err:
                    incomplete = err.msg.startswith("Unterminated string") or err.pos >= len(buf) - 16
                    if incomplete and more(2 * (len(buf) - pos)):
                        continue
                    raise fail(err.pos, err.msg) from None
                cut = len(buf) - end < 32 and not eof and not isinstance(obj, (dict, list, str))
                if cut and more(2 * (len(buf) - pos)):  # a number cut at the buffer's end ("3" of "3.25")
                    continue
                break
            pos = end
            record += 1
            yield record, obj
            c = skip_ws()
            if c == ",":
                pos += 1
                if skip_ws() == "]":
                    raise fail(pos, "Expecting value (a comma before ']')")
                continue
            if c == "]":
                pos += 1
                break
            raise fail(pos, "Expecting ',' delimiter" if c else "Expecting ',' or ']' (the file ends inside "
                       "the array)")
    if skip_ws():
        raise fail(pos, "Extra data after the end of the array", in_record=False)


def _iter_csv(text: io.TextIOWrapper, state: dict) -> Iterator[tuple[int, dict]]:
    """Rows of a comma-separated file with a header, as ``datasets`` (pandas) reads them: empty
    values are None, duplicate header names get ``.1``, ``.2`` suffixes, blank lines are skipped."""
    tail: list[str] = []
    window: list[str] = []  # the lines of the record being read

    def lines() -> Iterator[str]:
        for line in text:
            window.append(line)
            yield line

    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(lines())
    prev_line = 0
    header: list[str] | None = None
    start = 1
    try:
        for record in reader:
            start, prev_line = prev_line + 1, reader.line_num
            tail, window[:] = window[:], []
            if not record:
                continue  # a blank line (pandas skips them)
            if header is None:
                header, seen = [], Counter()
                for i, name in enumerate(record):
                    name = name if name else f"Unnamed: {i}"  # pandas keeps spaces in names
                    header.append(name if not seen[name] else f"{name}.{seen[name]}")
                    seen[name] += 1
                state["header"] = header
                continue
            if len(record) > len(header):
                raise _Stop(Problem(
                    "parse", f"line {start}: {len(record)} values but the header has {len(header)} columns. Put "
                    "double quotes around values that contain a comma, or remove the extra values.", [start], 1))
            yield start, {name: (record[i] if i < len(record) and record[i] != "" else None)
                          for i, name in enumerate(header)}
    except csv.Error as err:
        line = reader.line_num or start
        msg, hint = str(err), "Fix that line: check its double quotes."
        if "field larger than field limit" in msg:
            line, msg = prev_line + 1, f"a value longer than {CSV_FIELD_LIMIT // 2**20} MiB starts here"
            hint = "A double quote opened on this line is probably never closed: add the closing quote."
        raise _Stop(Problem("parse", f"line {line}: {msg}. {hint}", [line], 1)) from None
    # the csv module ends a quoted value that is never closed at the end of the file; pandas refuses it
    if len(tail) > 1:
        try:
            list(csv.reader(tail, strict=True))
        except csv.Error as err:
            if "unexpected end of data" in str(err):
                raise _Stop(Problem(
                    "parse", f"line {start}: a double-quoted value starts on this line and is never closed. Add "
                    "the closing double quote.", [start], 1)) from None



# ---- the per-row checks ----------------------------------------------------------------------

class _Bucket:
    __slots__ = ("count", "notes", "rows")

    def __init__(self):
        self.count = 0
        self.rows: list[int] = []
        self.notes: Counter = Counter()

    def add(self, number: int, note: str | None = None) -> None:
        self.count += 1
        if len(self.rows) < EXAMPLES:
            self.rows.append(number)
        if note is not None and (note in self.notes or len(self.notes) < 50):
            self.notes[note] += 1


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


class _Checker:
    """Checks rows one by one; keeps counts, a few example rows and an 8-byte digest per row."""

    def __init__(self, spec: DatasetSpec, unit: str, cutoff_len: int | None,
                 count_tokens: Callable[[str], int] | None, preview_rows: int):
        self.spec = spec
        self.formatting = spec.formatting
        self.cols = spec.resolved_columns()
        self.tags = spec.resolved_tags()
        self.unit = unit
        self.cutoff_len = cutoff_len
        self.count_tokens = count_tokens
        self.preview_rows = preview_rows
        self.preview: list[dict] = []
        self.columns_seen: dict[str, None] = {}
        self.present: set[str] = set()  # spec column names seen in at least one row
        self.wanted = set(self.cols.values())
        self.digests = array("Q")
        self.rows = 0
        self.usable = 0
        self.b = {k: _Bucket() for k in ("missing", "mixed", "empty", "over", "turn")}
        self.missing_by_col: Counter = Counter()
        self.unknown_roles: Counter = Counter()
        self.message_keys: Counter = Counter()
        self.longest = (0, 0)  # (tokens, row number)
        if self.tags:
            t = self.tags
            self.role_map = {t[k]: role for k, role in (("user_tag", "user"), ("assistant_tag", "assistant"),
                                                        ("observation_tag", "observation"),
                                                        ("function_tag", "function"), ("system_tag", "system"))
                             if k in t}
            self.odd = {t[k] for k in ("user_tag", "observation_tag") if k in t}
            self.even = {t[k] for k in ("assistant_tag", "function_tag") if k in t}

    # --- one row -------------------------------------------------------------------------
    def add(self, number: int, row: Any) -> None:
        self.rows += 1
        if isinstance(row, dict):
            if self.rows <= COLUMNS_SAMPLE:
                for key in row:
                    self.columns_seen.setdefault(str(key), None)
            if len(self.present) < len(self.wanted):
                self.present.update(k for k in self.wanted if k in row)
            conv = self._alpaca(number, row) if self.formatting == "alpaca" else self._sharegpt(number, row)
        else:
            self.b["mixed"].add(number, f"is {_type_name(row)}, not an object")
            conv = None
        if conv is None:
            self.digests.append(0)
            return
        self.usable += 1
        system, messages, empty = conv
        if empty:
            self.b["empty"].add(number)
            self.digests.append(0)
            return
        parts = [m["content"] for m in messages]
        if system:
            parts.insert(0, system)
        if self.cutoff_len is not None:
            if self.count_tokens is not None:
                tokens = self.count_tokens("\n".join(parts))
            else:
                tokens = math.ceil((sum(map(len, parts)) + len(parts) - 1) / 4)
            if tokens > self.cutoff_len:
                self.b["over"].add(number)
                if tokens > self.longest[0]:
                    self.longest = (tokens, number)
        canon = (system or "").strip() + "\x1e" + "\x1e".join(m["role"] + "\x1f" + m["content"].strip()
                                                              for m in messages)
        digest = int.from_bytes(hashlib.blake2b(canon.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                "little")
        self.digests.append(digest or 1)
        if len(self.preview) < self.preview_rows:
            self.preview.append({"system": system or None, "messages": messages})

    def _text_field(self, number: int, row: dict, key: str, column: str) -> tuple[bool, str | None]:
        value = row.get(column)
        if value is None or isinstance(value, str):
            return True, value
        self.b["mixed"].add(number, f"'{column}' ({key}) is {_type_name(value)}, not text")
        return False, None

    def _alpaca(self, number: int, row: dict):
        cols = self.cols
        missing = [k for k in REQUIRED["alpaca"] if cols[k] not in row]
        if missing:
            lists = [k for k, v in row.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
            if lists and len(missing) == 2:
                self.b["mixed"].add(number, f"looks like a conversation (sharegpt) row ('{lists[0]}')")
            else:
                self.b["missing"].add(number)
                for k in missing:
                    self.missing_by_col[k] += 1
            return None
        values = {}
        for key in ("prompt", "query", "response", "system"):
            if key in cols:
                ok, values[key] = self._text_field(number, row, key, cols[key])
                if not ok:
                    return None
        messages = []
        if "history" in cols and row.get(cols["history"]) is not None:
            history = row[cols["history"]]
            if not isinstance(history, list) or not all(
                    isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p)
                    for p in history):
                self.b["mixed"].add(number, f"'{cols['history']}' (history) is not a list of [prompt, response] "
                                            "text pairs")
                return None
            for old_prompt, old_response in history:
                messages.append({"role": "user", "content": old_prompt})
                messages.append({"role": "assistant", "content": old_response})
        user = "\n".join(v for v in (values.get("prompt"), values.get("query")) if v)
        response = values.get("response") or ""
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": response})
        empty = not user.strip() or not response.strip()
        return values.get("system"), messages, empty

    def _sharegpt(self, number: int, row: dict):
        cols, tags = self.cols, self.tags
        mcol = cols["messages"]
        if mcol not in row:
            if any(k in row for k in ("instruction", "output")):
                self.b["mixed"].add(number, "looks like an instruction/output (alpaca) row")
            else:
                self.b["missing"].add(number)
                self.missing_by_col["messages"] += 1
            return None
        messages = row[mcol]
        if not isinstance(messages, list):
            self.b["mixed"].add(number, f"'{mcol}' is {_type_name(messages)}, not a list of messages")
            return None
        role_tag, content_tag = tags.get("role_tag"), tags.get("content_tag")
        for i, m in enumerate(messages, 1):
            if not isinstance(m, dict):
                self.b["mixed"].add(number, f"message {i} is {_type_name(m)}, not an object")
                return None
            if role_tag not in m or content_tag not in m:
                self.message_keys[", ".join(sorted(map(str, m)))] += 1
                lacking = [f"'{t}'" for t in (role_tag, content_tag) if t not in m]
                self.b["mixed"].add(number, f"messages lack the {' and '.join(lacking)} "
                                            f"{'key' if len(lacking) == 1 else 'keys'}")
                return None
            if not isinstance(m[role_tag], str) or not (m[content_tag] is None or isinstance(m[content_tag], str)):
                self.b["mixed"].add(number, f"a message's '{role_tag}' or '{content_tag}' is not text")
                return None
        system = None
        if "system" in cols:
            ok, system = self._text_field(number, row, "system", cols["system"])
            if not ok:
                return None
        body = messages
        if messages and "system_tag" in tags and messages[0][role_tag] == tags["system_tag"]:
            system, body = messages[0][content_tag], messages[1:]
        # LLaMA-Factory's SharegptDatasetConverter: user/observation at odd turns, assistant/function at even
        reason = None
        for i, m in enumerate(body):
            role = m[role_tag]
            if role not in (self.odd if i % 2 == 0 else self.even):
                if role not in self.role_map:
                    self.unknown_roles[role] += 1
                    reason = f"message {i + 1} has the role '{role}', which is not one of the tags"
                else:
                    want = "/".join(sorted(self.odd if i % 2 == 0 else self.even))
                    reason = f"message {i + 1} has the role '{role}' where {want} was expected"
                break
        if reason is None and len(body) % 2:
            after = " after the system message" if body is not messages else ""
            reason = (f"an odd number of messages ({len(body)}{after}): it must end with an assistant "
                      f"('{tags.get('assistant_tag')}') message")
        if reason is not None:
            self.b["turn"].add(number, reason)
            return None
        norm = [{"role": self.role_map[m[role_tag]], "content": m[content_tag] or ""} for m in body]
        empty = not norm or all(not m["content"].strip() for m in norm)
        return system, norm, empty

    # --- the end -------------------------------------------------------------------------
    def duplicates(self, number: Callable[[int], int]) -> Problem | None:
        import numpy as np

        if len(self.digests) < 2:
            return None
        # one sorted copy (8 bytes a row, briefly), compared a slice at a time: equal neighbours are repeats;
        # every other temporary is a slice's worth (numpy's isin would sort copies of the whole array)
        a = np.frombuffer(self.digests, dtype=np.uint64)
        s = np.sort(a)
        step = 1 << 16
        count, repeated = 0, []
        for lo in range(0, len(s) - 1, step):
            x = s[lo:lo + step + 1]
            same = (x[1:] == x[:-1]) & (x[1:] != 0)
            n = int(np.count_nonzero(same))
            if n:
                count += n
                repeated.append(np.unique(x[1:][same]))
        del s
        if not count:
            return None
        values = np.unique(np.concatenate(repeated))  # sorted
        del repeated
        seen: set[int] = set()
        examples: list[tuple[int, int]] = []  # (ordinal of the repeat, ordinal of the first occurrence)
        for lo in range(0, len(a), step):
            chunk = a[lo:lo + step]
            at = np.searchsorted(values, chunk)
            at[at == len(values)] = 0
            for i in np.flatnonzero(values[at] == chunk):
                v = int(chunk[i])
                if v in seen:
                    examples.append((lo + int(i), int(np.argmax(a == chunk[i]))))
                    if len(examples) >= EXAMPLES:
                        break
                else:
                    seen.add(v)
            if len(examples) >= EXAMPLES:
                break
        u = self.unit
        first_rep, first_orig = examples[0]
        rows = [number(o) for o, _ in examples]
        return Problem(
            "duplicates",
            f"{_n(count, u, 'repeat')} an earlier row ({u} {number(first_rep)} repeats {u} "
            f"{number(first_orig)}; e.g. {_examples(u, rows)}). Repeated rows weigh more in training: remove "
            "them unless that is intended.", rows, count, False)

    def problems(self, number: Callable[[int], int], stopped: bool) -> list[Problem]:
        u, out = self.unit, []
        fmt = self.formatting
        # columns named in the spec that no row has: LLaMA-Factory fails with a KeyError
        absent: list[tuple[str, str]] = []
        if self.rows and not stopped or self.rows >= COLUMNS_SAMPLE:
            absent = [(k, c) for k, c in self.cols.items() if c not in self.present]
            if absent:
                found = ", ".join(f"'{c}'" for c in self.columns_seen) or "none"
                names = ", ".join(f"'{c}' ({k})" for k, c in absent)
                optional = [f"'{c}'" for k, c in absent if k not in REQUIRED[fmt]]
                msg = (f"{'Column' if len(absent) == 1 else 'Columns'} {names} {'is' if len(absent) == 1 else 'are'}"
                       f" not in the file. Columns found: {found}. Choose the matching columns in the dataset "
                       "settings")
                if optional:
                    msg += f" ({', '.join(optional)} {'is' if len(optional) == 1 else 'are'} optional: set it to "\
                           "none if the file has no such column)"
                msg += "."
                if len(self.columns_seen) == 1:
                    only = next(iter(self.columns_seen))
                    sep = next((s for s in (";", "\t", "|") if s in only), None)
                    if sep:
                        msg += (f" The header looks separated by {sep!r}: the trainer reads comma-separated files "
                                "only (Excel: Save As > CSV UTF-8 (Comma delimited)).")
                rows = [number(i) for i in range(min(self.rows, EXAMPLES))]
                out.append(Problem("missing_columns", msg, rows, self.rows, True))
        b = self.b["missing"]
        absent_required = any(k in REQUIRED[fmt] for k, _ in absent)
        if b.count and not absent_required:
            req = [(k, self.cols[k]) for k in REQUIRED[fmt]]
            names = " or ".join(f"'{c}' ({k})" for k, c in req if self.missing_by_col[k])
            out.append(Problem(
                "missing_columns",
                f"{_n(b.count, u, 'have')} no {names} field (e.g. {_examples(u, b.rows)}). Add it "
                "to those rows or delete them.", b.rows, b.count, True))
        b = self.b["mixed"]
        if b.count:
            if fmt == "alpaca":
                shape = "an object with the text fields " + ", ".join(
                    f"'{self.cols[k]}'" for k in ("prompt", "query", "response") if k in self.cols)
            else:
                shape = (f"an object whose '{self.cols['messages']}' is a list of messages, each with "
                         f"'{self.tags.get('role_tag')}' and '{self.tags.get('content_tag')}' text")
            notes = "; ".join(f"{note} ({_n(n, u)})" for note, n in b.notes.most_common(3))
            msg = (f"{_n(b.count, u, 'do')} not have the {fmt} shape, {shape} (e.g. "
                   f"{_examples(u, b.rows)}): {notes}. Fix or delete those rows: LLaMA-Factory cannot load a file "
                   "whose rows differ in shape.")
            keys = [k for k, _ in self.message_keys.most_common(1)]
            if keys and "role" in keys[0] and "content" in keys[0] and self.tags.get("role_tag") != "role":
                msg += (" The messages use the keys 'role' and 'content' (OpenAI style): set the role tag to 'role',"
                        " the content tag to 'content', and the user/assistant tags to 'user'/'assistant'.")
            elif keys and "from" in keys[0] and "value" in keys[0] and self.tags.get("role_tag") != "from":
                msg += (" The messages use the keys 'from' and 'value' (ShareGPT style): set the role tag to 'from'"
                        " and the content tag to 'value'.")
            out.append(Problem("mixed_formats", msg, b.rows, b.count, True))
        b = self.b["turn"]
        if b.count:
            t = self.tags
            notes = "; ".join(f"{note} ({_n(n, u)})" for note, n in b.notes.most_common(2))
            all_dropped = b.count >= self.rows - self.b["mixed"].count - self.b["missing"].count
            msg = (f"{_n(b.count, u, 'have')} an invalid turn order (e.g. {_examples(u, b.rows)}): "
                   f"{notes}. LLaMA-Factory skips these rows{' - here every row' if all_dropped else ''}. Messages "
                   f"must alternate user ('{t.get('user_tag')}' or '{t.get('observation_tag')}') and assistant "
                   f"('{t.get('assistant_tag')}' or '{t.get('function_tag')}'), after an optional first "
                   f"'{t.get('system_tag')}' message, and end with the assistant.")
            if self.unknown_roles:
                roles = ", ".join(f"'{r}'" for r, _ in self.unknown_roles.most_common(4))
                msg += f" Roles that are none of the tags: {roles}; set the tags to the roles the file uses"
                if {"user", "assistant"} & set(self.unknown_roles):
                    msg += " (user tag 'user', assistant tag 'assistant')"
                msg += "."
            out.append(Problem("turn_order", msg, b.rows, b.count, all_dropped))
        b = self.b["empty"]
        if b.count:
            what = "an empty instruction/input or an empty output" if fmt == "alpaca" else "only empty messages"
            out.append(Problem(
                "empty_rows",
                f"{_n(b.count, u, 'have')} {what} (e.g. {_examples(u, b.rows)}). They teach the "
                "model nothing: fill them in or delete them.", b.rows, b.count, False))
        b = self.b["over"]
        if b.count:
            how = ("tokens counted with the chosen model's tokenizer" if self.count_tokens is not None else
                   "estimated as characters / 4; choose a model to get exact counts")
            tokens, row = self.longest
            out.append(Problem(
                "over_cutoff",
                f"{_n(b.count, u, 'are')} longer than the cutoff length of {self.cutoff_len} tokens "
                f"({how}; e.g. {_examples(u, b.rows)}; the longest, {u} {row}, has {tokens}). LLaMA-Factory cuts "
                "them off there, so their ends are not learned: raise cutoff_len or shorten those rows.",
                b.rows, b.count, False))
        return out


# ---- the entry points ------------------------------------------------------------------------

def _sources(path: Path, ext: str):
    """(row iterator factory, newline mode, unit) for a text file, by its first character."""
    if ext == "csv":
        return _iter_csv, "", "line"
    first = _first_char(path)
    if first == "[":
        return _iter_json_array, None, "record"
    return _iter_jsonl, None, "line"


def check_dataset(path: str | Path, spec: DatasetSpec, *, cutoff_len: int | None = None,
                  count_tokens: Callable[[str], int] | None = None, max_rows: int | None = None,
                  preview_rows: int = 5) -> CheckReport:
    """Read the whole file once (streamed) and report what would stop or hurt a training on it."""
    path = Path(path)
    ext = path.suffix.lower().lstrip(".")
    size = path.stat().st_size
    if ext not in ACCEPTED_EXTENSIONS:
        return CheckReport("", size, _sha256_file(path), 0, [Problem(
            "unreadable", f"'{path.name}' is not an accepted file type ({path.suffix or 'no extension'}). Upload a "
            ".json, .jsonl, .csv or .parquet file (from Excel: Save As > CSV UTF-8).", [], 0, True)])
    if ext == "parquet":
        return _check_parquet(path, spec, size, cutoff_len, count_tokens, max_rows, preview_rows)

    factory, newline, unit = _sources(path, ext)
    checker = _Checker(spec, unit, cutoff_len, count_tokens, preview_rows)
    rowmap = _RowMap(base={"line": 1, "record": 1}[unit])
    problems: list[Problem] = []
    state: dict = {}
    stopped = False
    if unit == "record" and _has_bom(path):
        stopped = True
        problems.append(Problem(
            "unreadable", "The file starts with a UTF-8 byte-order mark (BOM), which LLaMA-Factory's reader of JSON "
            "arrays rejects. Save it as UTF-8 without BOM (or as JSON Lines, .jsonl).", [1], 1, True))
    with path.open("rb") as f:
        raw = _HashingReader(f)
        if not stopped:
            text = _text(raw, newline)
            ordinal = 0
            try:
                for number, row in factory(text, state):
                    if max_rows is not None and ordinal >= max_rows:
                        problems.append(Problem(
                            "too_many_rows", f"The file has more than {max_rows:,} rows, the limit of this portal "
                            f"({MAX_ROWS_SETTING}); only the first {max_rows:,} were checked. Split the file or ask an "
                            "administrator to raise the limit.", [number], 1, True))
                        stopped = True
                        break
                    rowmap.note(ordinal, number)
                    checker.add(number, row)
                    ordinal += 1
            except _Stop as stop:
                problems.append(stop.problem)
                stopped = True
            except UnicodeDecodeError:
                stopped = True
                where = _locate_bad_utf8(path)
                if where:
                    line, col, _, byte = where
                    msg = (f"The file is not UTF-8 text: line {line}, column {col} has the byte 0x{byte:02X}. Save "
                           "the file as UTF-8 (from Excel: Save As > CSV UTF-8) and upload it again.")
                    problems.append(Problem("unreadable", msg, [line], 1, True))
                else:
                    problems.append(Problem("unreadable", "The file is not UTF-8 text. Save the file as UTF-8 and "
                                            "upload it again.", [], 1, True))
            finally:
                text.detach()
        raw.drain()
        sha = raw.sha.hexdigest()

    if not stopped and checker.rows == 0:
        only_header = "header" in state
        problems.append(Problem(
            "no_rows", "The file has no data rows" + (" (only a header line)" if only_header else "") +
            ". Add at least one row.", [], 0, True))
    if checker.rows:
        problems.extend(checker.problems(rowmap.number, stopped))
    dup = checker.duplicates(rowmap.number)
    if dup is not None:
        problems.append(dup)
    columns = list(state.get("header") or checker.columns_seen)
    return CheckReport(ext, size, sha, checker.rows, _ordered(problems), checker.preview, columns, unit,
                       checker.usable)


def _ordered(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: not p.blocking)  # blocking first; stable otherwise


def _check_parquet(path: Path, spec: DatasetSpec, size: int, cutoff_len, count_tokens, max_rows,
                   preview_rows) -> CheckReport:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sha = _sha256_file(path)
    checker = _Checker(spec, "row", cutoff_len, count_tokens, preview_rows)
    problems: list[Problem] = []
    try:
        pf = pq.ParquetFile(path)
        names = list(pf.schema_arrow.names)
    except (pa.ArrowException, OSError) as err:
        return CheckReport("parquet", size, sha, 0, [Problem(
            "unreadable", f"The file is not a readable Parquet file ({err}). Export it again, e.g. with "
            "pandas.DataFrame.to_parquet.", [], 0, True)], row_unit="row")
    wanted = [c for c in names if c in set(spec.resolved_columns().values())]
    checker.columns_seen = dict.fromkeys(names)
    stopped = False
    ordinal = 0
    try:
        for batch in pf.iter_batches(batch_size=2048, columns=wanted or names[:1]):
            rows = batch.to_pylist()
            if not wanted:
                rows = [{} for _ in rows]
            for row in rows:
                if max_rows is not None and ordinal >= max_rows:
                    problems.append(Problem(
                        "too_many_rows", f"The file has more than {max_rows:,} rows, the limit of this portal "
                        f"({MAX_ROWS_SETTING}); only the first {max_rows:,} were checked. Split the file or ask an "
                        "administrator to raise the limit.", [ordinal + 1], 1, True))
                    stopped = True
                    break
                ordinal += 1
                checker.add(ordinal, row)
            if stopped:
                break
    except (pa.ArrowException, OSError) as err:
        problems.append(Problem("unreadable", f"row {ordinal + 1} and on cannot be read ({err}). Export the file "
                                "again, e.g. with pandas.DataFrame.to_parquet.", [ordinal + 1], 1, True))
        stopped = True
    checker.columns_seen = dict.fromkeys(names)
    checker.present = {c for c in names}
    if not stopped and checker.rows == 0:
        problems.append(Problem("no_rows", "The file has no data rows. Add at least one row.", [], 0, True))
    if checker.rows:
        problems.extend(checker.problems(lambda o: o + 1, stopped))
    dup = checker.duplicates(lambda o: o + 1)
    if dup is not None:
        problems.append(dup)
    return CheckReport("parquet", size, sha, checker.rows, _ordered(problems), checker.preview, names, "row",
                       checker.usable)


def _first_rows(path: Path, limit: int) -> tuple[list[str], list[Any]]:
    """(column names, first rows) without raising: what can be read of the file's beginning."""
    ext = path.suffix.lower().lstrip(".")
    rows: list[Any] = []
    try:
        if ext == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=max(limit, 1)):
                rows = batch.to_pylist()[:limit]
                break
            return list(pf.schema_arrow.names), rows
        if ext not in ACCEPTED_EXTENSIONS:
            return [], []
        factory, newline, _ = _sources(path, ext)
        state: dict = {}
        with path.open("rb") as f:
            text = _text(_HashingReader(f), newline)
            try:
                for _, row in factory(text, state):
                    rows.append(row)
                    if len(rows) >= limit:
                        break
            finally:
                text.detach()
        if "header" in state:
            return list(state["header"]), rows
    except Exception:  # noqa: BLE001, S110  (parse, decoding, pyarrow errors: check_dataset reports them)
        pass
    seen: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            for key in row:
                seen.setdefault(str(key), None)
    return list(seen), rows


def sniff_columns(path: str | Path, limit: int = 20) -> list[str]:
    """Top-level keys (columns) of the first ``limit`` rows, for the column pickers before a spec is
    chosen; [] when nothing can be read (check_dataset says why)."""
    return _first_rows(Path(path), limit)[0]


ALPACA_PAIRS = (("instruction", "output"), ("prompt", "response"), ("prompt", "completion"),
                ("question", "answer"), ("query", "response"), ("input", "output"))


def guess_spec(columns: list[str], sample_row: dict | None = None) -> DatasetSpec | None:
    """A spec for these columns, or None. Alpaca when an instruction/output-like pair is there
    (instruction/output first), sharegpt when there is a ``conversations`` or ``messages`` column.
    Sharegpt tags come from ``sample_row``'s first message when given (from/value vs role/content,
    human/gpt vs user/assistant), else from the column's name (``messages`` is OpenAI style)."""
    cols = list(columns)
    have = set(cols)
    for name in ("conversations", "messages"):
        if name not in have:
            continue
        tags: dict[str, str | None] = dict(OPENAI_TAGS) if name == "messages" else {}
        msgs = sample_row.get(name) if isinstance(sample_row, dict) else None
        if isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs):
            keys = set().union(*(m.keys() for m in msgs))
            roles = {m.get("role", m.get("from")) for m in msgs}
            if {"role", "content"} <= keys:
                tags = dict(OPENAI_TAGS)
            elif {"from", "value"} <= keys:
                tags = {}
            if "user" in roles or "assistant" in roles:
                tags.update(user_tag="user", assistant_tag="assistant")
            elif "human" in roles or "gpt" in roles:
                tags.pop("user_tag", None)
                tags.pop("assistant_tag", None)
        columns_ = {"messages": name} if name != "conversations" else {}
        if "system" in have:
            columns_["system"] = "system"
        if "tools" in have:
            columns_["tools"] = "tools"
        return DatasetSpec("sharegpt", columns_, tags)
    for prompt, response in ALPACA_PAIRS:
        if prompt in have and response in have:
            overrides: dict[str, str | None] = {"prompt": prompt, "response": response}
            query = "input" if prompt != "input" and "input" in have else None
            overrides["query"] = query
            if "system" in have:
                overrides["system"] = "system"
            if "history" in have:
                overrides["history"] = "history"
            return DatasetSpec("alpaca", {k: v for k, v in overrides.items()
                                          if v != ALPACA_COLUMNS[k]})
    return None


def guess_spec_for_file(path: str | Path) -> DatasetSpec | None:
    """guess_spec from the file's first rows (its columns and its first row's messages)."""
    columns, rows = _first_rows(Path(path), COLUMNS_SAMPLE)
    first = next((r for r in rows if isinstance(r, dict)), None)
    return guess_spec(columns, first)

