"""Download a catalog model from the Hugging Face Hub (or the proxy in HF_ENDPOINT) to the shared volume.

``download_model`` fetches a snapshot into a partial folder, writes ``checksums.sha256`` (the
``sha256sum`` format) and ``download.json`` (repo, commit, files, sizes), then renames the folder
to its target in one step: a failed download never leaves a half model under the target name.
``start_download_job`` runs it as a detached job for the Admin tab, its output in
``<shared models root>/.downloads/<name>.log`` and its exit code in ``<name>.exit``.

Layout under the shared models root::

    <name>/                     the model, once complete (what a ``path: <name>`` entry uses)
    .downloads/<name>.partial/  the download under way (not a model folder the catalog lists)
    .downloads/<name>.log       the job's output;  <name>.exit: its exit code;  <name>.job.json: its pid
    .downloads/<name>.lock      held (flock) by the process downloading <name>

This module imports neither Gradio nor LLaMA-Factory.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .config import CatalogModel, Settings

CHECKSUMS = "checksums.sha256"
MANIFEST = "download.json"
DOWNLOADS_DIR = ".downloads"
LOG_TAIL_CHARS = 6000
_CHUNK = 1 << 20

# The download job gets the portal's environment minus anything that looks like a credential,
# except what the Hugging Face client needs. PORTAL_* settings are left out too: the job gets
# all it needs on its command line (and PORTAL_DATABASE_URL may hold a password).
_SECRET_LOOKING = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|KEY|AUTH|COOKIE|SESSION|PRIVATE"
                             r"|DATABASE_URL|DSN|CONNECTION_STRING", re.IGNORECASE)
_HF_KEPT = frozenset({"HF_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT"})


class DownloadError(ValueError):
    """A download refused (unknown entry, target exists, ...) or failed (the hub's error)."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, '/'-separated
    size: int
    sha256: str


@dataclass
class Manifest:
    repo: str
    revision: str | None  # what was asked for (None: the repository's default branch)
    commit: str | None  # the commit the files are from
    endpoint: str | None
    files: list[FileEntry] = field(default_factory=list)
    total_bytes: int = 0
    started_at: str = ""
    finished_at: str = ""
    target: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DownloadJob:
    name: str
    repo: str
    target: Path
    pid: int
    log_path: Path
    exit_path: Path


# ---- small helpers -------------------------------------------------------------------------

def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _public_endpoint(endpoint: str | None) -> str | None:
    """The endpoint without user:password@ (a proxy URL may carry them)."""
    if not endpoint:
        return None
    parts = urlsplit(endpoint)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=host)
    return urlunsplit(parts)


def _redactor(*secrets: str | None) -> Callable[[str], str]:
    values = [s for s in secrets if s]

    def redact(text: str) -> str:
        for value in values:
            text = text.replace(value, "***")
        return text
    return redact


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _model_files(root: Path) -> list[str]:
    """Files under root, relative and sorted, leaving out huggingface_hub's .cache folder."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d != ".cache"]
        found.extend((rel_dir / name).as_posix() for name in filenames)
    return sorted(found)


def downloads_dir(parent: Path) -> Path:
    return Path(parent) / DOWNLOADS_DIR


def _check_folder_name(name: str) -> str:
    if (not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0")
            or len(name) > 200):
        raise DownloadError(f"models entry '{name}': the name is not usable as a folder name under the shared "
                            "models root (no '/', no leading '.'); rename the entry")
    return name


# ---- catalog entries -------------------------------------------------------------------------

def catalog_entry(settings: Settings, name: str) -> CatalogModel:
    for entry in settings.models:
        if entry.name == name:
            return entry
    names = ", ".join(e.name for e in settings.models) or "none configured"
    raise DownloadError(f"no catalog entry named '{name}' (entries: {names}); add it to the models setting first")


def hub_entry(settings: Settings, name: str) -> CatalogModel:
    """The catalog entry to download: it must exist and have a hub_id."""
    entry = catalog_entry(settings, name)
    if entry.path is not None:
        raise DownloadError(f"models entry '{name}' has a path ({entry.path}): it is already a local folder, "
                            "there is nothing to download")
    _check_folder_name(entry.name)
    return entry


def target_for(settings: Settings, entry: CatalogModel) -> Path:
    """Where a hub entry is downloaded to: <shared models root>/<entry name>."""
    return settings.shared_models_root / _check_folder_name(entry.name)


def model_rows(settings: Settings) -> list[dict[str, Any]]:
    """The catalog entries with where their files are and whether they are there."""
    rows = []
    for entry in settings.models:
        if entry.path is not None:
            folder: Path | None = Path(entry.path)
            job = "none"
        else:
            try:
                folder = target_for(settings, entry)
                job = download_status(settings, entry.name)["state"]
            except DownloadError:
                folder, job = None, "none"
        rows.append({
            "name": entry.name, "hub_id": entry.hub_id, "path": str(entry.path) if entry.path else None,
            "template": entry.template, "license": entry.license, "folder": str(folder) if folder else None,
            "downloaded": bool(folder and folder.is_dir()),
            "checksums": bool(folder and (folder / CHECKSUMS).is_file()), "job": job,
        })
    return rows


# ---- the download ----------------------------------------------------------------------------

class _FolderLock:
    """An exclusive flock on <parent>/.downloads/<name>.lock: one download of a name at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            raise DownloadError(f"{self.path.stem} is being downloaded by another process already; wait for it "
                                "to finish") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _quiet_tqdm():
    from tqdm.auto import tqdm

    class Quiet(tqdm):  # huggingface_hub's bars would fill the job log with carriage returns
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
    return Quiet


class _Reporter:
    """One progress line per file as it lands in the partial folder (files appear there complete)."""

    def __init__(self, folder: Path, total: int | None, progress: Callable[[str], Any]):
        self.folder, self.total, self.progress = folder, total, progress
        self.seen: set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sweep(self) -> None:
        for rel in _model_files(self.folder):
            if rel not in self.seen:
                self.seen.add(rel)
                try:
                    size = (self.folder / rel).stat().st_size
                except OSError:
                    continue
                total = max(self.total or 0, len(self.seen))
                self.progress(f"[{len(self.seen)}/{total}] {rel} {human_size(size)}")

    def _loop(self) -> None:
        while not self._done.wait(0.5):
            self.sweep()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        if exc[0] is None:
            self.sweep()


def download_model(entry_or_repo: CatalogModel | str, target_dir: str | os.PathLike, *, revision: str | None = None,
                   endpoint: str | None = None, token: str | None = None,
                   progress: Callable[[str], Any] = print) -> Manifest:
    """Download a hub repository to target_dir, with checksums and a manifest; all or nothing.

    endpoint: default HF_ENDPOINT (else the public Hub); token: default HF_TOKEN. The token is
    sent to the endpoint only: it is never written to the folder, the manifest or ``progress``.
    """
    if isinstance(entry_or_repo, CatalogModel):
        if entry_or_repo.hub_id is None:
            raise DownloadError(f"models entry '{entry_or_repo.name}' has a path ({entry_or_repo.path}): it is "
                                "already a local folder, there is nothing to download")
        repo = entry_or_repo.hub_id
    else:
        repo = str(entry_or_repo)
    target = Path(target_dir).absolute()
    if target.exists():
        raise DownloadError(f"{target} already exists: delete it first to download the model again")
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    token = token or os.environ.get("HF_TOKEN") or None
    redact = _redactor(token)

    def say(line: str) -> None:
        progress(redact(line))
    work = downloads_dir(target.parent)
    partial = work / f"{target.name}.partial"
    with _FolderLock(work / f"{target.name}.lock"):
        if target.exists():  # made while this process waited for nothing: checked again under the lock
            raise DownloadError(f"{target} already exists: delete it first to download the model again")
        if partial.exists():  # left by a download that was killed (the lock proves none is running)
            shutil.rmtree(partial)
        manifest = Manifest(repo=repo, revision=revision, commit=None, endpoint=_public_endpoint(endpoint),
                            started_at=_now(), target=str(target))
        try:
            from huggingface_hub import HfApi, snapshot_download

            say(f"{repo}{'@' + revision if revision else ''}: asking {manifest.endpoint or 'the Hugging Face Hub'}")
            info = HfApi(endpoint=endpoint, token=token).model_info(repo, revision=revision)
            manifest.commit = info.sha
            total = len(info.siblings) if info.siblings is not None else None
            say(f"{repo}: commit {info.sha}, {total if total is not None else '?'} files")
            partial.mkdir(parents=True)
            with _Reporter(partial, total, say):
                snapshot_download(repo, revision=info.sha or revision, local_dir=partial, endpoint=endpoint,
                                  token=token, tqdm_class=_quiet_tqdm())
            shutil.rmtree(partial / ".cache" / "huggingface", ignore_errors=True)
            if (partial / ".cache").is_dir() and not any((partial / ".cache").iterdir()):
                (partial / ".cache").rmdir()
            for own in (CHECKSUMS, MANIFEST):
                if (partial / own).exists():
                    raise DownloadError(f"{repo} has its own {own}; the portal cannot add its checksums next to it")
            say("computing checksums")
            for rel in _model_files(partial):
                path = partial / rel
                manifest.files.append(FileEntry(path=rel, size=path.stat().st_size, sha256=sha256_file(path)))
            manifest.total_bytes = sum(f.size for f in manifest.files)
            (partial / CHECKSUMS).write_text("".join(f"{f.sha256}  {f.path}\n" for f in manifest.files),
                                             encoding="utf-8")
            manifest.finished_at = _now()
            (partial / MANIFEST).write_text(json.dumps(manifest.as_dict(), indent=2) + "\n", encoding="utf-8")
            os.rename(partial, target)  # same file system: the model appears complete or not at all
        except BaseException as err:
            shutil.rmtree(partial, ignore_errors=True)
            if isinstance(err, DownloadError):
                raise
            if isinstance(err, Exception):
                message = " ".join(str(err).split()) or type(err).__name__
                raise DownloadError(redact(f"download of {repo} failed: {type(err).__name__}: {message}")) from None
            raise
    say(f"done: {len(manifest.files)} files, {human_size(manifest.total_bytes)} in {target}")
    return manifest


def verify_model(target_dir: str | os.PathLike) -> list[str]:
    """Files of checksums.sha256 that are missing or whose sha256 differs (empty: all good)."""
    folder = Path(target_dir)
    listing = folder / CHECKSUMS
    if not listing.is_file():
        raise DownloadError(f"{folder} has no {CHECKSUMS} (it was not downloaded by the portal, or is not there)")
    bad = []
    for line in listing.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep:
            raise DownloadError(f"{listing}: '{line}' is not '<sha256>  <file>'")
        path = folder / rel
        if not path.is_file() or sha256_file(path) != digest.strip().lower():
            bad.append(rel)
    return bad


# ---- the background job (Admin tab) ------------------------------------------------------------

_CHILDREN: dict[int, subprocess.Popen] = {}
_CHILDREN_LOCK = threading.Lock()


def download_environment(environ) -> dict[str, str]:
    """The job's environment: the portal's, minus PORTAL_* and secret-looking names, keeping
    HF_TOKEN, HF_TOKEN_PATH, HF_ENDPOINT and HF_HUB_*."""
    env = {}
    for key, value in environ.items():
        if key in _HF_KEPT or key.startswith("HF_HUB_"):
            env[key] = value
        elif key.startswith("PORTAL_") or _SECRET_LOOKING.search(key):
            continue
        else:
            env[key] = value
    return env


def _job_paths(settings: Settings, name: str) -> dict[str, Path]:
    work = downloads_dir(settings.shared_models_root)
    _check_folder_name(name)
    return {"log": work / f"{name}.log", "exit": work / f"{name}.exit", "job": work / f"{name}.job.json"}


def _alive(state: dict[str, Any]) -> bool:
    import psutil

    pid = int(state.get("pid", 0))
    with _CHILDREN_LOCK:
        proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:  # reap our own child
        with _CHILDREN_LOCK:
            _CHILDREN.pop(pid, None)
        return False
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - float(state.get("create_time", 0))) > 0.5:
            return False  # the pid was reused
        return p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - chars * 2))
            return fh.read().decode("utf-8", "replace")[-chars:]
    except OSError:
        return ""


def download_status(settings: Settings, name: str) -> dict[str, Any]:
    """The last download job of an entry: state running | succeeded | failed | none, and its log's end."""
    paths = _job_paths(settings, name)
    result: dict[str, Any] = {"state": "none", "log_tail": "", "exit_code": None}
    try:
        state = json.loads(paths["job"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = None
    try:
        code: int | None = int(paths["exit"].read_text().strip())
    except (OSError, ValueError):
        code = None
    if state is None and code is None:
        return result
    result["log_tail"] = _tail(paths["log"])
    if code is not None:
        result.update(state="succeeded" if code == 0 else "failed", exit_code=code)
    elif state is not None and _alive(state):
        result["state"] = "running"
    else:
        result["state"] = "failed"
        result["log_tail"] += "\n[the download job ended without recording an exit code: killed, or the machine " \
                              "restarted]\n"
    return result


def status_text(status: dict[str, Any]) -> str:
    """A download_status as text for the Admin tab's log box."""
    head = {"none": "no download started", "running": "downloading...", "succeeded": "download finished",
            "failed": "download failed"}[status["state"]]
    if status.get("exit_code") not in (None, 0):
        head += f" (exit code {status['exit_code']})"
    return f"{head}\n{status['log_tail']}".rstrip() + "\n"


def start_download_job(settings: Settings, entry_name: str, revision: str | None = None) -> DownloadJob:
    """Start the download of a hub entry as a detached job; poll it with download_status."""
    entry = hub_entry(settings, entry_name)
    target = target_for(settings, entry)
    if target.exists():
        raise DownloadError(f"{target} already exists: delete it first to download the model again")
    if download_status(settings, entry.name)["state"] == "running":
        raise DownloadError(f"a download of '{entry.name}' is already running")
    paths = _job_paths(settings, entry.name)
    paths["log"].parent.mkdir(parents=True, exist_ok=True)
    paths["exit"].unlink(missing_ok=True)
    argv = [sys.executable, "-m", "portal.model_download", "--exit-file", str(paths["exit"]), entry.hub_id,
            str(target)]
    if revision:
        argv += ["--revision", revision]
    env = download_environment(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        with open(paths["log"], "wb") as logf:
            proc = subprocess.Popen(argv, cwd=paths["log"].parent, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as err:
        raise DownloadError(f"could not start the download job: {err}") from err
    with _CHILDREN_LOCK:
        _CHILDREN[proc.pid] = proc
    import psutil

    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        create_time = 0.0
    state = {"pid": proc.pid, "create_time": create_time, "repo": entry.hub_id, "revision": revision,
             "target": str(target), "started_at": _now()}
    tmp = paths["job"].with_suffix(".tmp")
    tmp.write_text(json.dumps(state), encoding="utf-8")
    os.replace(tmp, paths["job"])
    return DownloadJob(name=entry.name, repo=entry.hub_id, target=target, pid=proc.pid, log_path=paths["log"],
                       exit_path=paths["exit"])


class ModelDownloads:
    """What the Admin tab calls: every method refuses non-admins; starting a download is audited."""

    def __init__(self, settings: Settings, db=None):
        self.settings = settings
        self.db = db

    def entries(self, actor) -> list[dict[str, Any]]:
        from .users import _require_admin

        _require_admin(actor)
        return model_rows(self.settings)

    def hub_names(self) -> list[str]:
        return [e.name for e in self.settings.models if e.hub_id is not None]

    def status(self, actor, name: str) -> dict[str, Any]:
        from .users import _require_admin

        _require_admin(actor)
        hub_entry(self.settings, name)
        return download_status(self.settings, name)

    def start(self, actor, name: str, revision: str | None = None) -> DownloadJob:
        from .users import _require_admin

        _require_admin(actor)
        job = start_download_job(self.settings, name, revision)
        if self.db is not None:
            from .models import AuditEvent
            from .request_context import client_address

            with self.db.session() as s:
                s.add(AuditEvent(username=actor.username, action="model_download", target=f"model:{name}",
                                 detail=f"{job.repo} -> {job.target}", client=client_address.get()))
                s.commit()
        return job


# ---- python -m portal.model_download: the job itself -------------------------------------------

def _write_exit(path: Path, code: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{code}\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portal.model_download",
                                     description="download a hub model to a folder, with checksums")
    parser.add_argument("repo")
    parser.add_argument("target")
    parser.add_argument("--revision")
    parser.add_argument("--exit-file", help="write the exit code here when done")
    args = parser.parse_args(argv)
    code = 1
    try:
        download_model(args.repo, args.target, revision=args.revision, progress=lambda s: print(s, flush=True))
        code = 0
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        code = 130
    except Exception as err:  # noqa: BLE001 - the job's log must say why, without the token
        token = os.environ.get("HF_TOKEN")
        print(_redactor(token)(f"error: {type(err).__name__}: {err}"), file=sys.stderr, flush=True)
    finally:
        if args.exit_file:
            _write_exit(Path(args.exit_file), code)
    return code


if __name__ == "__main__":
    sys.exit(main())
