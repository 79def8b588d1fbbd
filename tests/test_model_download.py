"""Downloading catalog models to the shared volume, against a fake Hugging Face hub served over HTTP.

The fake hub implements what huggingface_hub.snapshot_download (the installed version) calls:
GET /api/models/{repo}[/revision/{rev}] (sha, siblings), GET /api/models/{repo}/tree/{rev}
(recursive listing) and HEAD/GET /{repo}/resolve/{rev}/{file} (X-Repo-Commit, ETag, Content-Length).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from portal.config import CatalogModel, Settings
from portal.model_download import (
    CHECKSUMS,
    MANIFEST,
    DownloadError,
    ModelDownloads,
    download_environment,
    download_model,
    download_status,
    hub_entry,
    start_download_job,
    verify_model,
)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_secret_test_token"
REPO = "fakeorg/tiny-llama"
OTHER_REPO = "fakeorg/other"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """repos: repo id -> ref name -> {path: bytes}. Each ref's files get a commit sha of their own."""

    def __init__(self, repos: dict[str, dict[str, dict[str, bytes]]]):
        self.refs: dict[str, dict[str, str]] = {}
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}
        for repo, refs in repos.items():
            self.refs[repo], self.commits[repo] = {}, {}
            for ref, files in refs.items():
                sha = hashlib.sha1(repr((repo, ref, sorted(files.items()))).encode()).hexdigest()
                self.refs[repo][ref] = sha
                self.commits[repo][sha] = files
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self.fail_get: set[str] = set()  # files answered with 500 on GET
        self.delay = 0.0  # seconds before each file body
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, head=True)

            def do_GET(self):
                hub._answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def commit(self, repo: str, ref: str = "main") -> str:
        return self.refs[repo][ref]

    def _resolve(self, repo: str, rev: str) -> str | None:
        if rev in self.refs.get(repo, {}):
            return self.refs[repo][rev]
        return rev if rev in self.commits.get(repo, {}) else None

    @staticmethod
    def _send(h, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _json(self, h, data, head=False):
        self._send(h, 200, json.dumps(data).encode(), {"Content-Type": "application/json"}, head)

    def _answer(self, h, head: bool):
        path = unquote(urlsplit(h.path).path)
        with self._lock:
            self.requests.append((h.command, path, h.headers.get("Authorization")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            if repo not in self.refs:
                return self._send(h, 404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                sha = self._resolve(repo, rest[1] if len(rest) > 1 else "main")
                if sha is None:
                    return self._send(h, 404, b"{}", {"X-Error-Code": "RevisionNotFound"}, head)
                files = self.commits[repo][sha]
                return self._json(h, {"id": repo, "sha": sha, "private": False,
                                      "siblings": [{"rfilename": f} for f in sorted(files)]}, head)
            if rest[0] == "tree" and len(rest) >= 2:
                sha = self._resolve(repo, rest[1])
                if sha is None:
                    return self._send(h, 404, b"{}", {"X-Error-Code": "RevisionNotFound"}, head)
                entries, folders = [], set()
                for name, data in sorted(self.commits[repo][sha].items()):
                    if "/" in name:
                        folders.add(name.rsplit("/", 1)[0])
                    entry = {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
                    if name.endswith(".safetensors"):
                        entry["lfs"] = {"oid": _sha(data), "size": len(data), "pointerSize": 134}
                    entries.append(entry)
                entries += [{"type": "directory", "path": d, "oid": _git_oid(d.encode())} for d in sorted(folders)]
                return self._json(h, entries, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            sha = self._resolve(repo, rev) if repo in self.refs else None
            files = self.commits[repo][sha] if sha else {}
            if name not in files:
                return self._send(h, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, head)
            data = files[name]
            etag = _sha(data) if name.endswith(".safetensors") else _git_oid(data)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
            if not head and name in self.fail_get:
                return self._send(h, 500, b"internal error", {"X-Repo-Commit": sha})
            if not head and self.delay:
                time.sleep(self.delay)
            return self._send(h, 200, data, headers, head)
        return self._send(h, 404, b"{}", head=head)

    def saw_token(self, token: str) -> bool:
        return any(auth == f"Bearer {token}" for _, _, auth in self.requests)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, bytes]:
    """A real tiny LLaMA (config, safetensors, tokenizer) plus a nested file, as the hub serves them."""
    from portal.demo import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("hubmodel") / "tiny")
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    files["extra/notes.txt"] = b"a file in a sub folder\n"
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    return files


@pytest.fixture
def hub(model_files):
    fake = FakeHub({
        REPO: {"main": model_files},
        OTHER_REPO: {"main": {"config.json": b'{"version": "main"}', "README.md": b"main\n"},
                     "v1": {"config.json": b'{"version": "v1"}', "README.md": b"old one\n"}},
    })
    yield fake
    fake.close()


def _settings(tmp_path: Path, **extra) -> Settings:
    models = [{"name": "tiny", "hub_id": REPO, "template": "llama3", "license": "Apache-2.0"},
              {"name": "other", "hub_id": OTHER_REPO},
              {"name": "local", "path": "already-here"}]
    settings = Settings(data_root=tmp_path / "data", models=models, gpus=[], **extra)
    settings.ensure_dirs()
    return settings


def _no_partials(parent: Path) -> list[Path]:
    return list((parent / ".downloads").glob("*.partial")) if (parent / ".downloads").is_dir() else []


# ---- the download function -------------------------------------------------------------------

def test_download_writes_files_checksums_and_manifest(tmp_path, hub, model_files):
    target = tmp_path / "models" / "tiny"
    lines: list[str] = []
    manifest = download_model(REPO, target, endpoint=hub.url, token=TOKEN, progress=lines.append)

    got = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert {k: v for k, v in got.items() if k not in (CHECKSUMS, MANIFEST)} == model_files
    assert not (target / ".cache").exists()
    assert not _no_partials(target.parent) and not (target.parent / "tiny.partial").exists()

    # checksums.sha256 is what sha256sum writes, and sha256sum -c accepts it
    listing = (target / CHECKSUMS).read_text()
    assert listing == "".join(f"{_sha(model_files[p])}  {p}\n" for p in sorted(model_files))
    check = subprocess.run(["sha256sum", "-c", CHECKSUMS], cwd=target, capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    data = json.loads((target / MANIFEST).read_text())
    assert data["repo"] == REPO and data["commit"] == hub.commit(REPO) and data["revision"] is None
    assert data["endpoint"] == hub.url and data["target"] == str(target)
    assert {f["path"]: (f["size"], f["sha256"]) for f in data["files"]} == \
        {p: (len(b), _sha(b)) for p, b in model_files.items()}
    assert data["total_bytes"] == sum(len(b) for b in model_files.values()) == manifest.total_bytes
    assert data["finished_at"] and data["started_at"]
    assert manifest.commit == hub.commit(REPO)

    # one progress line per file, [k/N] name size
    n = len(model_files)
    per_file = [line for line in lines if line.startswith("[")]
    assert len(per_file) == n
    for name in model_files:
        assert any(line.split(" ", 2)[1] == name and line.startswith("[") and f"/{n}]" in line for line in per_file)
    assert sorted(int(line[1:line.index("/")]) for line in per_file) == list(range(1, n + 1))
    safetensors = next(f for f in model_files if f.endswith(".safetensors"))
    size_text = next(line for line in per_file if f" {safetensors} " in line).rsplit(" ", 2)[1:]
    assert size_text[1] in ("B", "kB", "MB")

    # the files came from the pinned commit, with the token; the token is nowhere on disk or in progress
    resolves = [p for m, p, _ in hub.requests if "/resolve/" in p]
    assert resolves and all(f"/resolve/{hub.commit(REPO)}/" in p for p in resolves)
    assert hub.saw_token(TOKEN)
    assert not any(TOKEN in line for line in lines)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_revision_is_honoured(tmp_path, hub):
    target = tmp_path / "other"
    manifest = download_model(OTHER_REPO, target, revision="v1", endpoint=hub.url, token=TOKEN, progress=lambda s: None)
    assert (target / "config.json").read_bytes() == b'{"version": "v1"}'
    assert manifest.commit == hub.commit(OTHER_REPO, "v1") != hub.commit(OTHER_REPO, "main")
    assert json.loads((target / MANIFEST).read_text())["revision"] == "v1"


def test_verify_detects_changed_and_missing_files(tmp_path, hub, model_files):
    target = tmp_path / "tiny"
    download_model(REPO, target, endpoint=hub.url, token=TOKEN, progress=lambda s: None)
    assert verify_model(target) == []
    (target / "config.json").write_bytes((target / "config.json").read_bytes() + b" ")
    assert verify_model(target) == ["config.json"]
    (target / "extra" / "notes.txt").unlink()
    assert sorted(verify_model(target)) == ["config.json", "extra/notes.txt"]
    with pytest.raises(DownloadError, match="no checksums.sha256"):
        verify_model(tmp_path)


def test_failing_hub_leaves_no_target_and_no_partial(tmp_path, hub, model_files):
    target = tmp_path / "tiny"
    safetensors = next(f for f in model_files if f.endswith(".safetensors"))
    hub.fail_get.add(safetensors)
    with pytest.raises(DownloadError, match="download of fakeorg/tiny-llama failed") as info:
        download_model(REPO, target, endpoint=hub.url, token=TOKEN, progress=lambda s: None)
    assert TOKEN not in str(info.value)
    assert any(m == "GET" and p.endswith(safetensors) for m, p, _ in hub.requests)  # it really tried
    assert not target.exists()
    assert not _no_partials(tmp_path)
    # an unknown repository fails cleanly too
    with pytest.raises(DownloadError, match="failed"):
        download_model("fakeorg/missing", tmp_path / "missing", endpoint=hub.url, token=TOKEN, progress=lambda s: None)
    assert not (tmp_path / "missing").exists() and not _no_partials(tmp_path)
    # nothing is left locked: once the hub is fixed the same download succeeds
    hub.fail_get.clear()
    download_model(REPO, target, endpoint=hub.url, token=TOKEN, progress=lambda s: None)
    assert verify_model(target) == []


def test_refusals(tmp_path, hub):
    settings = _settings(tmp_path)
    target = settings.shared_models_root / "tiny"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(DownloadError, match="already exists: delete it first"):
        download_model(hub_entry(settings, "tiny"), target, endpoint=hub.url, progress=lambda s: None)
    with pytest.raises(DownloadError, match="already exists: delete it first"):
        start_download_job(settings, "tiny")
    assert (target / "keep.txt").read_text() == "mine" and sorted(os.listdir(target)) == ["keep.txt"]
    assert not [r for r in hub.requests if "/resolve/" in r[1]]

    with pytest.raises(DownloadError, match="has a path .*already a local folder"):
        hub_entry(settings, "local")
    with pytest.raises(DownloadError, match="already a local folder"):
        start_download_job(settings, "local")
    local = next(e for e in settings.models if e.name == "local")
    with pytest.raises(DownloadError, match="already a local folder"):
        download_model(local, tmp_path / "x", endpoint=hub.url, progress=lambda s: None)
    with pytest.raises(DownloadError, match=r"no catalog entry named 'nope' \(entries: tiny, other, local\)"):
        start_download_job(settings, "nope")
    odd = Settings(data_root=tmp_path / "odd", models=[CatalogModel(name="a/b", hub_id=REPO)])
    with pytest.raises(DownloadError, match="not usable as a folder name"):
        start_download_job(odd, "a/b")


def test_download_environment_drops_secrets_keeps_hf():
    env = download_environment({
        "PATH": "/usr/bin", "HOME": "/home/p", "HF_TOKEN": TOKEN, "HF_ENDPOINT": "http://proxy", "HF_HUB_OFFLINE": "0",
        "HF_HOME": "/cache", "HTTPS_PROXY": "http://proxy:3128", "SSL_CERT_FILE": "/etc/ca.pem",
        "PORTAL_SESSION_SECRET": "s" * 40, "PORTAL_DATABASE_URL": "postgresql://u:pw@db/portal", "PORTAL_GPUS": "[]",
        "AWS_SECRET_ACCESS_KEY": "x", "GITHUB_TOKEN": "x", "DB_PASSWORD": "x", "MLFLOW_TRACKING_PASSWORD": "x",
        "SOME_API_KEY": "x", "HUGGING_FACE_HUB_TOKEN": "x", "OIDC_CLIENT_SECRET": "x",
    })
    assert env == {"PATH": "/usr/bin", "HOME": "/home/p", "HF_TOKEN": TOKEN, "HF_ENDPOINT": "http://proxy",
                   "HF_HUB_OFFLINE": "0", "HF_HOME": "/cache", "HTTPS_PROXY": "http://proxy:3128",
                   "SSL_CERT_FILE": "/etc/ca.pem"}


# ---- the CLI ---------------------------------------------------------------------------------

def test_cli_models_download_list_verify(tmp_path, hub, model_files):
    data_root = tmp_path / "data"
    models = [{"name": "tiny", "hub_id": REPO, "template": "llama3", "license": "Apache-2.0"},
              {"name": "other", "hub_id": OTHER_REPO}, {"name": "local", "path": "already-here"}]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTAL_", "HF_"))}
    env.update(PORTAL_DATA_ROOT=str(data_root), PORTAL_MODELS=json.dumps(models), HF_ENDPOINT=hub.url,
               HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf-home"))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "portal.cli", "models", *args], capture_output=True, text=True,
                              env=env, timeout=300, cwd=ROOT, check=False)

    before = cli("list", "--json")
    assert before.returncode == 0, before.stderr
    rows = {r["name"]: r for r in json.loads(before.stdout)}
    assert rows["tiny"]["downloaded"] is False and rows["tiny"]["hub_id"] == REPO
    assert rows["tiny"]["template"] == "llama3" and rows["tiny"]["license"] == "Apache-2.0"
    assert rows["local"]["path"] == str(data_root / "shared" / "models" / "already-here")

    done = cli("download", "tiny")
    assert done.returncode == 0, done.stdout + done.stderr
    folder = data_root / "shared" / "models" / "tiny"
    n = len(model_files)
    for name in model_files:
        assert any(line.startswith("[") and f"/{n}] {name} " in line for line in done.stdout.splitlines()), name
    assert hub.commit(REPO) in done.stdout
    assert TOKEN not in done.stdout + done.stderr
    assert hub.saw_token(TOKEN)  # HF_TOKEN from the environment was sent
    assert json.loads((folder / MANIFEST).read_text())["commit"] == hub.commit(REPO)
    assert not _no_partials(folder.parent)

    after = {r["name"]: r for r in json.loads(cli("list", "--json").stdout)}
    assert after["tiny"]["downloaded"] is True and after["tiny"]["checksums"] is True
    assert after["tiny"]["folder"] == str(folder) and after["other"]["downloaded"] is False
    text = cli("list").stdout
    assert any(line.startswith("tiny ") and " yes " in line for line in text.splitlines())

    # the portal's catalog offers the folder: found under the shared root, and as a path entry
    from portal.catalog import Catalog

    assert Catalog(Settings(data_root=data_root, models=[])).models()["tiny"] == str(folder)
    switched = Catalog(Settings(data_root=data_root, models=[{"name": "tiny", "path": "tiny", "template": "llama3"}]))
    assert switched.models()["tiny"] == str(folder)
    assert switched.model_entry(str(folder)).name == "tiny"

    ok = cli("verify", "tiny")
    assert ok.returncode == 0 and "all files match" in ok.stdout, ok.stdout + ok.stderr
    (folder / "config.json").write_text("{}")
    bad = cli("verify", "tiny")
    assert bad.returncode == 1 and bad.stdout.strip() == "config.json: FAILED", bad.stdout
    assert "1 file(s) differ" in bad.stderr

    again = cli("download", "tiny")
    assert again.returncode == 1 and "already exists: delete it first" in again.stderr
    local = cli("download", "local")
    assert local.returncode == 1 and "already a local folder" in local.stderr
    unknown = cli("download", "nope")
    assert unknown.returncode == 1 and "no catalog entry named 'nope'" in unknown.stderr

    v1 = cli("download", "other", "--revision", "v1")
    assert v1.returncode == 0, v1.stdout + v1.stderr
    assert (data_root / "shared" / "models" / "other" / "config.json").read_bytes() == b'{"version": "v1"}'

    hub.fail_get.add("README.md")
    shutil.rmtree(data_root / "shared" / "models" / "other")
    failed = cli("download", "other")
    assert failed.returncode == 1 and "error: download of fakeorg/other failed" in failed.stderr
    assert TOKEN not in failed.stdout + failed.stderr
    assert not (data_root / "shared" / "models" / "other").exists() and not _no_partials(folder.parent)


# ---- the background job (Admin tab) -----------------------------------------------------------

def _db_and_users(settings):
    from portal.db import Database
    from portal.models import User

    db = Database(settings.db_url)
    db.migrate()
    with db.session() as s:
        admin, bob = User(username="root", is_admin=True), User(username="bob")
        s.add(admin)
        s.add(bob)
        s.commit()
        s.refresh(admin)
        s.refresh(bob)
    return db, admin, bob


def _wait_done(settings, name, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = download_status(settings, name)
        if status["state"] not in ("running",):
            return status
        time.sleep(0.2)
    raise AssertionError(f"download of {name} still running: {download_status(settings, name)}")


@pytest.fixture
def job_env(monkeypatch, hub, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("PORTAL_SESSION_SECRET", "not-for-the-job-" * 3)
    return hub


def test_background_job_progress_checksums_and_no_token_in_log(tmp_path, job_env, model_files):
    hub = job_env
    settings = _settings(tmp_path)
    db, admin, _ = _db_and_users(settings)
    downloads = ModelDownloads(settings, db)
    assert download_status(settings, "tiny") == {"state": "none", "log_tail": "", "exit_code": None}
    hub.delay = 0.3  # slow enough to see the job running
    job = downloads.start(admin, "tiny")
    assert job.target == settings.shared_models_root / "tiny" and job.repo == REPO
    assert downloads.status(admin, "tiny")["state"] == "running"
    with pytest.raises(DownloadError, match="already running"):
        downloads.start(admin, "tiny")
    status = _wait_done(settings, "tiny")
    assert status["state"] == "succeeded", status["log_tail"]
    assert status["exit_code"] == 0 and job.exit_path.read_text().strip() == "0"

    n = len(model_files)
    log = job.log_path.read_text()
    for name in model_files:
        assert f"/{n}] {name} " in log, log
    assert "done:" in status["log_tail"]
    assert verify_model(job.target) == []
    assert json.loads((job.target / MANIFEST).read_text())["commit"] == hub.commit(REPO)
    assert hub.saw_token(TOKEN)  # the job got HF_TOKEN from the portal's environment and sent it
    for path in [*settings.shared_models_root.rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert not _no_partials(settings.shared_models_root)
    rows = {r["name"]: r for r in downloads.entries(admin)}
    assert rows["tiny"]["downloaded"] and rows["tiny"]["job"] == "succeeded"

    from sqlmodel import select

    from portal.models import AuditEvent

    with db.session() as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.action == "model_download")).all()
    assert [(e.username, e.target) for e in events] == [("root", "model:tiny")]
    assert TOKEN not in (events[0].detail or "")


def test_background_job_failure_is_reported(tmp_path, job_env):
    hub = job_env
    settings = _settings(tmp_path)
    hub.fail_get.add("README.md")
    job = start_download_job(settings, "other")
    status = _wait_done(settings, "other")
    assert status["state"] == "failed" and status["exit_code"] == 1, status
    assert "error: download of fakeorg/other failed" in status["log_tail"]
    assert TOKEN not in job.log_path.read_text()
    assert not job.target.exists() and not _no_partials(settings.shared_models_root)
    # a second try after the hub recovers succeeds (the failed job's files are replaced)
    hub.fail_get.clear()
    start_download_job(settings, "other")
    assert _wait_done(settings, "other")["state"] == "succeeded"
    assert "error:" not in job.log_path.read_text()


def test_non_admin_is_refused(tmp_path, job_env):
    hub = job_env
    settings = _settings(tmp_path)
    db, _admin, bob = _db_and_users(settings)
    downloads = ModelDownloads(settings, db)
    with pytest.raises(PermissionError, match="only admins"):
        downloads.start(bob, "tiny")
    with pytest.raises(PermissionError):
        downloads.status(bob, "tiny")
    with pytest.raises(PermissionError):
        downloads.entries(bob)
    assert not (settings.shared_models_root / ".downloads").exists()
    assert download_status(settings, "tiny")["state"] == "none"
    assert hub.requests == []


def test_admin_tab_handlers(tmp_path, job_env, model_files):
    """The Base models section's handlers: refused for a non-admin, a real download for an admin."""
    import gradio as gr

    from portal.services import build_services
    from portal.ui.admin import build_admin_tab
    from portal.users import UserAdmin

    settings = _settings(tmp_path, mlflow_tracking_uri="http://127.0.0.1:9")
    services = build_services(settings, start_tracking=False)
    services.runs.ensure_user("root", is_admin=True)
    services.runs.ensure_user("bob")
    with gr.Blocks():
        parts = build_admin_tab(services.runs, UserAdmin(services.db))
    assert parts["model_pick"].choices == [("tiny", "tiny"), ("other", "other")]

    class Request:
        def __init__(self, username):
            self.username, self.client = username, None

    with pytest.raises(gr.Error, match="only admins"):
        parts["start_download"]("tiny", Request("bob"))
    with pytest.raises(gr.Error, match="only admins"):
        parts["refresh_models"]("tiny", Request("bob"))
    assert not (settings.shared_models_root / ".downloads").exists()

    table, text = parts["refresh_models"]("tiny", Request("root"))
    assert list(table["Model"]) == ["tiny", "other", "local"] and list(table["Downloaded"]) == ["no", "no", "no"]
    assert text.startswith("no download started")
    parts["start_download"]("tiny", Request("root"))
    assert _wait_done(settings, "tiny")["state"] == "succeeded"
    table, text = parts["refresh_models"]("tiny", Request("root"))
    assert list(table["Downloaded"]) == ["yes", "no", "no"] and table["Download job"][0] == "succeeded"
    assert text.startswith("download finished") and f"/{len(model_files)}] config.json " in text
    with pytest.raises(gr.Error, match="already exists: delete it first"):
        parts["start_download"]("tiny", Request("root"))
