"""A user's datasets: upload with checks, versions stored by content, fingerprints for runs.

Files live in ``users/<user>/datasets/files/<sha256>.<ext>`` (content-addressed, never changed),
each upload is a ``DatasetVersion`` row, and the user's ``dataset_info.json`` points every name at
its newest version. A run pins the versions it uses (its own ``dataset_info.json``) and records
their fingerprints, so a later upload under the same name never changes what it trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sqlmodel import col, select

from .catalog import DATASET_INFO, SHARED_MARK, Catalog
from .config import Settings
from .dataset_checks import CheckReport, DatasetSpec, check_dataset
from .db import Database
from .models import AuditEvent, DatasetVersion, Run, User, utcnow
from .request_context import client_address
from .storage import PathNotAllowed, UserSpace, check_name, resolve_inside

MANAGED_MARK = "portal_version"  # entries the portal wrote from an upload carry their version
ACCEPTED_TYPES = ("json", "jsonl", "csv", "parquet")
COPY_CHUNK = 1 << 20


class DatasetRejected(ValueError):
    """An upload the portal will not save; ``report`` says why (problems with rows and counts)."""

    def __init__(self, message: str, report: CheckReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class DatasetListing:
    name: str
    version: int | None  # None: not uploaded through the portal (shared, or placed by file access)
    rows: int | None
    sha256: str | None
    size_bytes: int | None
    formatting: str
    shared: bool
    created_at: Any = None

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["created_at"] = self.created_at.isoformat() if self.created_at else None
        return data


def _info_path(space: UserSpace) -> Path:
    return space.datasets_dir / DATASET_INFO


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


class DatasetService:
    def __init__(self, settings: Settings, db: Database, catalog: Catalog):
        self.settings = settings
        self.db = db
        self.catalog = catalog
        self._lock = threading.Lock()  # one writer of a dataset_info.json at a time in this process
        self._sha_cache: dict[tuple[str, int, int], str] = {}

    # ---- checks and upload ---------------------------------------------------------------
    def check(self, path: str | os.PathLike, spec: DatasetSpec, *, cutoff_len: int | None = None,
              count_tokens: Callable[[str], int] | None = None) -> CheckReport:
        """The checks of an upload, before anything is saved (size limit first: a huge file is
        refused before it is read)."""
        size = os.path.getsize(path)
        limit = self.settings.max_upload_mb * 1024 * 1024
        if size > limit:
            raise DatasetRejected(f"the file is {size / 2**20:.1f} MB; uploads are limited to "
                                  f"{self.settings.max_upload_mb} MB (setting max_upload_mb): split it or ask an admin")
        return check_dataset(path, spec, cutoff_len=cutoff_len, count_tokens=count_tokens,
                             max_rows=self.settings.max_dataset_rows)

    def add(self, user: User, path: str | os.PathLike, name: str, spec: DatasetSpec, *, source_name: str | None = None,
            cutoff_len: int | None = None, count_tokens: Callable[[str], int] | None = None
            ) -> tuple[DatasetVersion, CheckReport]:
        """Check the file, store it by content and make it the newest version of ``name``; the
        report's warnings (duplicates, long rows, ...) are for the person to read."""
        name = check_name(name, "dataset name")
        report = self.check(path, spec, cutoff_len=cutoff_len, count_tokens=count_tokens)
        if not report.ok:
            reasons = "; ".join(p.message for p in report.blocking)
            raise DatasetRejected(f"dataset '{name}' not saved: {reasons}", report)
        space = UserSpace.for_user(self.settings.users_root, user.username).ensure()
        file_name = f"files/{report.sha256[:32]}.{report.file_type}"
        self._store(Path(path), space.datasets_dir / file_name, report.sha256)
        entry = spec.info_entry(file_name)
        with self._lock, self.db.session() as s:
            last = s.exec(select(DatasetVersion).where(DatasetVersion.owner_id == user.id, DatasetVersion.name == name)
                          .order_by(col(DatasetVersion.version).desc())).first()
            version = DatasetVersion(owner_id=user.id, owner=user.username, name=name,
                                     version=(last.version + 1) if last else 1, sha256=report.sha256,
                                     rows=report.rows, size_bytes=report.size_bytes, file_type=report.file_type,
                                     file_name=file_name, source_name=source_name, info_entry=json.dumps(entry))
            s.add(version)
            s.add(AuditEvent(username=user.username, action="dataset_add", target=f"dataset:{name}",
                             detail=f"v{version.version} {report.rows} rows sha256 {report.sha256[:12]}",
                             client=client_address.get()))
            s.commit()
            s.refresh(version)
            self._set_entry(space, name, dict(entry, **{MANAGED_MARK: version.version, "portal_sha256": report.sha256}))
        return version, report

    def _store(self, source: Path, target: Path, sha256: str) -> None:
        """Copy into the user's space while hashing; nothing is left behind when it fails."""
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            return  # the same content is already there
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.part")
        digest = hashlib.sha256()
        try:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(COPY_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
            if digest.hexdigest() != sha256:
                raise DatasetRejected("the file changed while it was being saved: upload it again")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def _set_entry(self, space: UserSpace, name: str, entry: dict[str, Any] | None) -> None:
        info_path = _info_path(space)
        try:
            info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            info = {}
        if entry is None:
            info.pop(name, None)
        else:
            info[name] = entry
        _write_json_atomic(info_path, info)
        self.catalog.sync_user_datasets(space)

    # ---- reading ---------------------------------------------------------------------------
    def versions(self, user: User, name: str) -> list[DatasetVersion]:
        with self.db.session() as s:
            return list(s.exec(select(DatasetVersion).where(DatasetVersion.owner_id == user.id,
                                                            DatasetVersion.name == name)
                               .order_by(col(DatasetVersion.version).desc())).all())

    def _latest(self, user: User) -> dict[str, DatasetVersion]:
        with self.db.session() as s:
            rows = s.exec(select(DatasetVersion).where(DatasetVersion.owner_id == user.id,
                                                       col(DatasetVersion.deleted_at).is_(None))
                          .order_by(col(DatasetVersion.version))).all()
        return {row.name: row for row in rows}  # the highest version of each name wins

    def list(self, user: User) -> list[DatasetListing]:
        """The user's datasets (uploaded ones with their newest version) and the shared ones."""
        space = UserSpace.for_user(self.settings.users_root, user.username).ensure()
        info = self.catalog.sync_user_datasets(space)
        latest = self._latest(user)
        out = []
        for name, entry in sorted(info.items()):
            if not isinstance(entry, dict):
                continue
            row = latest.get(name) if entry.get(MANAGED_MARK) else None
            out.append(DatasetListing(
                name=name, version=row.version if row else None, rows=row.rows if row else None,
                sha256=row.sha256 if row else None, size_bytes=row.size_bytes if row else None,
                formatting=str(entry.get("formatting", "alpaca")), shared=bool(entry.get(SHARED_MARK)),
                created_at=row.created_at if row else None))
        return out

    # ---- rename and delete -------------------------------------------------------------------
    def _own_entry(self, space: UserSpace, name: str) -> dict[str, Any]:
        entry = self.catalog.own_datasets(space).get(name)
        if entry is None:
            shared = name in self.catalog.shared_datasets()
            raise ValueError(f"'{name}' is a shared dataset: it is read-only" if shared
                             else f"you have no dataset named '{name}'")
        return entry

    def rename(self, user: User, old: str, new: str) -> None:
        space = UserSpace.for_user(self.settings.users_root, user.username).ensure()
        new = check_name(new, "dataset name")
        with self._lock:
            entry = self._own_entry(space, old)
            if new in self.catalog.own_datasets(space):
                raise ValueError(f"you already have a dataset named '{new}': delete it or choose another name")
            with self.db.session() as s:
                for row in s.exec(select(DatasetVersion).where(DatasetVersion.owner_id == user.id,
                                                               DatasetVersion.name == old)).all():
                    row.name = new
                    s.add(row)
                s.add(AuditEvent(username=user.username, action="dataset_rename", target=f"dataset:{old}",
                                 detail=f"renamed to {new}", client=client_address.get()))
                s.commit()
            self._set_entry(space, old, None)
            self._set_entry(space, new, entry)

    def delete(self, user: User, name: str) -> list[str]:
        """Remove the name; files no run used are deleted, files a run used stay (its record
        must keep pointing at real data). Returns the files removed."""
        space = UserSpace.for_user(self.settings.users_root, user.username).ensure()
        removed: list[str] = []
        with self._lock:
            self._own_entry(space, name)
            with self.db.session() as s:
                rows = s.exec(select(DatasetVersion).where(DatasetVersion.owner_id == user.id,
                                                           DatasetVersion.name == name,
                                                           col(DatasetVersion.deleted_at).is_(None))).all()
                for row in rows:
                    row.deleted_at = utcnow()
                    s.add(row)
                s.add(AuditEvent(username=user.username, action="dataset_delete", target=f"dataset:{name}",
                                 detail=f"{len(rows)} version(s)", client=client_address.get()))
                s.commit()
                for row in rows:
                    if not self._file_in_use(s, user, row):
                        path = space.datasets_dir / row.file_name
                        if path.is_file():
                            path.unlink()
                            removed.append(row.file_name)
            self._set_entry(space, name, None)
        return removed

    @staticmethod
    def _file_in_use(s, user: User, row: DatasetVersion) -> bool:
        live = s.exec(select(DatasetVersion).where(DatasetVersion.owner_id == user.id,
                                                   DatasetVersion.sha256 == row.sha256,
                                                   col(DatasetVersion.deleted_at).is_(None))).first()
        if live is not None:
            return True
        used = s.exec(select(Run.id).where(Run.owner_id == user.id,
                                           col(Run.dataset_fingerprints).contains(row.sha256))).first()
        return used is not None

    # ---- pinning for a run -----------------------------------------------------------------
    def pin(self, space: UserSpace, names: list[str], info: dict[str, Any] | None = None
            ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The dataset_info entries a run uses, with absolute file paths, and their fingerprints
        (name, version, sha256, rows, file). ``info``: another run's pinned entries (a clone on the
        same data) instead of the user's newest. Unknown names are left to validation."""
        current = self.catalog.sync_user_datasets(space)
        info = current if info is None else {**current, **info}  # a name the parent did not use: the newest
        entries: dict[str, Any] = {}
        prints: list[dict[str, Any]] = []
        for name in dict.fromkeys(names):
            entry = info.get(name)
            if not isinstance(entry, dict):
                continue
            entry = {k: v for k, v in entry.items() if k != SHARED_MARK}
            print_ = {"name": name, "version": entry.get(MANAGED_MARK), "sha256": entry.get("portal_sha256"),
                      "rows": None, "file": None, "shared": name in self.catalog.shared_datasets()
                      and name not in self.catalog.own_datasets(space)}
            file_name = entry.get("file_name")
            if file_name:
                raw = file_name if os.path.isabs(file_name) else str(space.datasets_dir / file_name)
                try:
                    path = resolve_inside(raw, self.catalog.readable_roots(space), f"dataset '{name}' file")
                except PathNotAllowed:
                    continue  # refused by the policy with its own message
                entry["file_name"] = str(path)
                print_["file"] = str(path)
                if path.is_file():
                    print_["sha256"] = print_["sha256"] or self._sha256(path)
                    print_["size_bytes"] = path.stat().st_size
            else:  # a hub dataset: its id is its fingerprint
                print_["source"] = entry.get("hf_hub_url") or entry.get("ms_hub_url") or entry.get("om_hub_url")
            entries[name] = entry
            prints.append(print_)
        self._add_rows(space, prints)
        return entries, prints

    def _add_rows(self, space: UserSpace, prints: list[dict[str, Any]]) -> None:
        shas = [p["sha256"] for p in prints if p.get("sha256")]
        if not shas:
            return
        with self.db.session() as s:
            rows = s.exec(select(DatasetVersion).where(DatasetVersion.owner == space.root.name,
                                                       col(DatasetVersion.sha256).in_(shas))).all()
        by_sha = {row.sha256: row.rows for row in rows}
        for p in prints:
            p["rows"] = by_sha.get(p.get("sha256"))

    def _sha256(self, path: Path) -> str:
        """sha256 of a file the portal did not store itself (shared or placed by hand), cached by
        path, size and modification time."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._sha_cache:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(COPY_CHUNK):
                    digest.update(chunk)
            self._sha_cache[key] = digest.hexdigest()
        return self._sha_cache[key]


def write_pinned_info(folder: Path, entries: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(folder / DATASET_INFO, entries)
