"""Export training configs to a Git repository, and import them back.

The portal keeps one bare clone of the configured repository under ``cache_dir`` and builds
commits with git's plumbing (hash-object, a throw-away index, write-tree, commit-tree): there is
no working tree to leave dirty after a crash, and a push that lost a race is redone by
re-applying the one-file change onto the new remote head. Threads and processes sharing the
clone take a file lock. Credentials travel in the environment of each git process only: never
in the remote URL, in ``.git/config`` or in argv (see docs/decisions/0014-git-export.md).

This module imports neither LLaMA-Factory nor Gradio.
"""

from __future__ import annotations

import base64
import fcntl
import logging
import os
import posixpath
import re
import shlex
import string
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import httpx

from . import __version__

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger(__name__)

PATH_FIELDS = ("dataset", "model", "name", "user", "stage", "finetuning_type")
COMMIT_URL_FIELDS = ("sha", "branch", "path")
CONFIG_SUFFIXES = (".yaml", ".yml")
EXPORT_MARK = "# Exported by LLaMA Board Portal"  # first line of the header; a blank line ends it
MAX_CONFIG_BYTES = 1_000_000
GIT_TIMEOUT_SECONDS = 120
API_TIMEOUT_SECONDS = 30
PUSH_ATTEMPTS = 4
DEFAULT_HTTPS_USER = "oauth2"  # GitLab's name for token logins; GitHub accepts any name
GITHUB_API = "https://api.github.com"
REMOTE = "origin"
# Conservative on top of `git check-ref-format`: segments of letters, digits, '.', '_', '-'.
BRANCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*")
GITHUB_PROJECT = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f<>]")  # not allowed in a git identity or a header line
# Variables a git process keeps from the portal's environment: the command path and the
# proxy and CA settings a corporate network needs. Nothing else, so no GIT_DIR, no askpass.
INHERITED_ENV = {"PATH", "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "NO_PROXY", "ALL_PROXY", "GIT_SSL_CAINFO", "GIT_SSL_CAPATH", "SSL_CERT_FILE", "SSL_CERT_DIR"}
# Another push landed first: before ours connected (git refuses), or while ours was sent (the
# server's ref moved under it). Then fetch, re-apply, retry.
RACE_REJECTED = re.compile(r"\[rejected\] \((?:fetch first|non-fast-forward)\)")
RACE_MOVED = re.compile(r"is at [0-9a-f]+ but expected [0-9a-f]+")
REF_IN_THE_WAY = re.compile(r"'refs/heads/([^']+)' exists; cannot create")
AUTH_FAILURE = re.compile(r"Authentication failed|could not read (?:Username|Password)|returned error: 40[13]"
                          r"|Permission denied \(|HTTP Basic: Access denied|Invalid username or password")
SSH_KEY_UNUSABLE = re.compile(r"UNPROTECTED PRIVATE KEY FILE|Load key|no such identity|invalid format")
UNREACHABLE = re.compile(r"Could not resolve host|Connection refused|Connection timed out|Failed to connect"
                         r"|does not appear to be a git repository|[Rr]epository .*not found|returned error: 404")


class GitExportError(ValueError):
    """Export or import failed, or a Git setting is wrong; the message says what to fix."""


@dataclass(frozen=True)
class ExportResult:
    sha: str  # the commit holding the config (the earlier one when unchanged)
    branch: str  # where that commit is
    path: str  # the file in the repository
    url: str | None  # from git_commit_url_template
    merge_request_url: str | None = None
    merge_request_error: str | None = None  # the push worked but opening the merge request did not
    unchanged: bool = False  # the branch already had this config: nothing was committed or pushed


# ---- names and paths ---------------------------------------------------------------------------

def path_segment(value: str) -> str:
    """A free value (dataset, run name, user) as one safe path or branch-name segment."""
    return UNSAFE_CHARS.sub("_", value.strip()).strip("._-")[:100]


def path_values(*, dataset: str, model: str, name: str, user: str, stage: str, finetuning_type: str) -> dict[str, str]:
    """The placeholders of git_path_template, each one safe path segment.

    A model folder or hub id gives its last component (/models/Qwen/Qwen2 -> Qwen2); several
    datasets ("a, b") are joined with '+'.
    """
    datasets = "+".join(filter(None, (path_segment(part) for part in dataset.split(","))))
    model_name = path_segment(model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1])
    values = {"dataset": datasets, "model": model_name, "name": path_segment(name), "user": path_segment(user),
              "stage": path_segment(stage), "finetuning_type": path_segment(finetuning_type)}
    if not values["name"]:
        raise GitExportError(f"the run name {name!r} has no letters or digits to name a file with; choose another name")
    return {key: value or "unknown" for key, value in values.items()}


def checked_repo_path(path: str, what: str) -> str:
    """``path`` normalised, refused if it leaves the repository, enters .git or is not a YAML file."""
    normal = posixpath.normpath(path)
    if "\\" in path or "\0" in path or path.startswith("/") or normal == ".." or normal.startswith("../"):
        raise GitExportError(f"{what} {path!r} is outside the repository; use a relative path such as "
                             "experiments/{name}.yaml")
    if any(part.lower() == ".git" for part in normal.split("/")):
        raise GitExportError(f"{what} {path!r} points into .git; choose another folder")
    if not normal.lower().endswith(CONFIG_SUFFIXES) or normal.rsplit("/", 1)[-1].startswith("."):
        raise GitExportError(f"{what} {path!r} must name a .yaml or .yml file")
    return normal


def render_path(template: str, values: dict[str, str]) -> str:
    return checked_repo_path(template.format(**values), "the export path")


def _check_template(template: str, fields: tuple[str, ...], setting: str) -> None:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise GitExportError(f"{setting} {template!r} is not a valid template ({exc}); write placeholders as "
                             "{name}") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in fields or spec or conversion:
            raise GitExportError(f"{setting} {template!r}: unknown placeholder {{{field}}}; use only "
                                 + ", ".join("{" + f + "}" for f in fields))


def check_path_template(template: str) -> None:
    _check_template(template, PATH_FIELDS, "PORTAL_GIT_PATH_TEMPLATE")
    sample = {field: f"sample-{field}" for field in PATH_FIELDS}
    try:
        render_path(template, sample)
    except GitExportError as exc:
        raise GitExportError(f"PORTAL_GIT_PATH_TEMPLATE: {exc}") from None


def check_branch_name(name: str, setting: str) -> None:
    """The conservative rules; the exporter also asks `git check-ref-format --branch`."""
    parts = name.split("/")
    if (len(name) > 200 or not BRANCH_NAME.fullmatch(name) or ".." in name or name == "HEAD"
            or any(part.endswith((".lock", ".")) for part in parts)):
        raise GitExportError(f"{setting}: {name!r} is not an allowed branch name; use letters, digits, '.', '_', '-' "
                             "and '/' between parts (e.g. main or portal/configs)")


def check_remote_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and (parts.username or parts.password):
        raise GitExportError("PORTAL_GIT_URL must not carry credentials; remove the user:token@ part and set "
                             "PORTAL_GIT_TOKEN (or PORTAL_GIT_TOKEN_FILE) instead")
    if parts.scheme not in ("", "file", "http", "https", "ssh") and not _is_scp_like(url):
        raise GitExportError(f"PORTAL_GIT_URL: unsupported scheme {parts.scheme!r}; use a folder, file://, "
                             "https:// or ssh://")


def _is_scp_like(url: str) -> bool:
    """git@host:group/repo.git, git's short form of an SSH URL."""
    return re.match(r"^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+:", url) is not None


def _is_ssh(url: str) -> bool:
    return urlsplit(url).scheme == "ssh" or _is_scp_like(url)


def check_git_settings(settings: Settings) -> None:
    """What can be checked without the network; called when Settings are made."""
    check_path_template(settings.git_path_template)
    check_branch_name(settings.git_branch, "PORTAL_GIT_BRANCH")
    if settings.git_url is not None:
        check_remote_url(settings.git_url)
    prefix = posixpath.normpath(settings.git_import_prefix or ".")
    if prefix.startswith(("/", "..")) or any(part.lower() == ".git" for part in prefix.split("/")):
        raise GitExportError(f"PORTAL_GIT_IMPORT_PREFIX {settings.git_import_prefix!r} must be a folder inside the "
                             "repository, such as experiments")
    if settings.git_commit_url_template is not None:
        _check_template(settings.git_commit_url_template, COMMIT_URL_FIELDS, "PORTAL_GIT_COMMIT_URL_TEMPLATE")
    if settings.git_merge_request is not None:
        missing = [env for env, value in (("PORTAL_GIT_PROJECT", settings.git_project),
                                          ("PORTAL_GIT_TOKEN or PORTAL_GIT_TOKEN_FILE",
                                           settings.git_token or settings.git_token_file)) if not value]
        if settings.git_merge_request == "gitlab" and not settings.git_api_url:
            missing.append("PORTAL_GIT_API_URL (e.g. https://gitlab.example/api/v4)")
        if missing:
            raise GitExportError(f"PORTAL_GIT_MERGE_REQUEST {settings.git_merge_request} needs {', '.join(missing)}")
        if settings.git_merge_request == "github" and not GITHUB_PROJECT.fullmatch(settings.git_project or ""):
            raise GitExportError(f"PORTAL_GIT_PROJECT {settings.git_project!r} must be owner/repo for GitHub")


def config_body(text: str) -> str:
    """The config without the export header: what decides whether a re-export changes anything."""
    if text.startswith(EXPORT_MARK) and "\n\n" in text:
        return text.split("\n\n", 1)[1]
    return text


def _one_line(value: object) -> str:
    return CONTROL_CHARS.sub(" ", str(value)).strip()


def llamafactory_version() -> str:
    try:
        return version("llamafactory")
    except PackageNotFoundError:
        return "not installed"


# ---- the exporter ------------------------------------------------------------------------------

class GitExporter:
    """Writes configs into the configured repository and reads them back (see the module doc)."""

    def __init__(self, settings: Settings, cache_dir: Path):
        if settings.git_url is None:
            raise GitExportError("Git export is not configured: set PORTAL_GIT_URL to the repository")
        self.settings = settings
        self.cache_dir = Path(cache_dir)
        self.repo = self.cache_dir / "repo.git"
        url = settings.git_url
        if urlsplit(url).scheme == "" and not _is_scp_like(url):
            url = str(Path(url).expanduser().resolve())  # a folder: independent of the working directory
        self.remote_url = url
        prefix = posixpath.normpath(settings.git_import_prefix or ".").strip("/")
        self.import_prefix = "" if prefix == "." else prefix  # "": the whole repository

    # ---- public API ----------------------------------------------------------------------------
    def export(self, yaml_text: str, *, name: str, dataset: str, model: str, stage: str, finetuning_type: str,
               username: str, author_name: str, author_email: str | None, run_id: int | str | None = None
               ) -> ExportResult:
        """Commit ``yaml_text`` (with a header comment) as the user and push it; see ExportResult."""
        with self._scrubbed_errors():
            return self._export(yaml_text, name=name, dataset=dataset, model=model, stage=stage,
                                finetuning_type=finetuning_type, username=username, author_name=author_name,
                                author_email=author_email, run_id=run_id)

    def list_configs(self, branch: str | None = None) -> list[str]:
        """The .yaml/.yml files under git_import_prefix on ``branch`` (default: the base branch), sorted."""
        with self._scrubbed_errors():
            return self._list_configs(branch)

    def read_config(self, path: str, branch: str | None = None) -> str:
        """The text of one config file from ``branch`` (default: the base branch), header included."""
        with self._scrubbed_errors():
            return self._read_config(path, branch)

    def target_branch(self, username: str, name: str) -> str:
        """The branch an export of ``name`` by ``username`` goes to, per git_branch_mode."""
        mode = self.settings.git_branch_mode
        if mode == "base":
            return self.settings.git_branch
        user = path_segment(username)
        if not user:
            raise GitExportError(f"the user name {username!r} gives no usable branch name; ask an admin to set "
                                 "PORTAL_GIT_BRANCH_MODE=base")
        if mode == "user":
            branch = f"portal/{user}"
        else:
            stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            branch = f"portal/{user}/{path_segment(name) or 'config'}-{stamp}"
        self._check_branch(branch, "the export branch")
        return branch

    # ---- export and import ---------------------------------------------------------------------
    @contextmanager
    def _scrubbed_errors(self) -> Iterator[None]:
        """No message leaves this class with the token in it, whatever git or a server echoed."""
        try:
            yield
        except GitExportError as exc:
            raise GitExportError(self._scrub(str(exc))) from None

    def _export(self, yaml_text: str, *, name: str, dataset: str, model: str, stage: str, finetuning_type: str,
                username: str, author_name: str, author_email: str | None, run_id: int | str | None) -> ExportResult:
        if len(yaml_text.encode("utf-8")) > MAX_CONFIG_BYTES:
            raise GitExportError(f"the config is larger than {MAX_CONFIG_BYTES // 1_000_000} MB; it cannot be exported")
        body = yaml_text if yaml_text.endswith("\n") else yaml_text + "\n"
        path = render_path(self.settings.git_path_template, path_values(
            dataset=dataset, model=model, name=name, user=username, stage=stage, finetuning_type=finetuning_type))
        branch = self.target_branch(username, name)
        base = self.settings.git_branch
        self._check_branch(base, "PORTAL_GIT_BRANCH")
        content = self._with_header(body, username=username, run_id=run_id)
        message = f"Export {_one_line(name)} from LLaMA Board Portal\n\nPath: {path}\nUser: {_one_line(username)}\n"
        if run_id is not None:
            message += f"Portal-Run-Id: {_one_line(run_id)}\n"
        author = {"GIT_AUTHOR_NAME": _one_line(author_name) or _one_line(username),
                  # a user without an email still needs one in git; .invalid never delivers mail
                  "GIT_AUTHOR_EMAIL": _one_line(author_email or "") or f"{path_segment(username)}@portal.invalid",
                  "GIT_COMMITTER_NAME": _one_line(self.settings.git_committer_name),
                  "GIT_COMMITTER_EMAIL": _one_line(self.settings.git_committer_email)}

        with self._locked():
            self._fetch()
            base_head = self._remote_head(base)
            if base_head is None:
                raise GitExportError(f"the base branch {base!r} does not exist in {self.remote_url}: push a first "
                                     "commit to it, or set PORTAL_GIT_BRANCH to an existing branch")
            for attempt in range(PUSH_ATTEMPTS):
                head = self._remote_head(branch)
                parent = head or base_head
                if self._file_body(parent, path) == body:
                    sha = self._git("rev-list", "-1", parent, "--", path).stdout.decode().strip()
                    return ExportResult(sha=sha, branch=branch if head else base, path=path,
                                        url=self._commit_url(sha, branch if head else base, path), unchanged=True)
                commit = self._commit(parent, path, content, message, author)
                if self._push(commit, branch):
                    break
                log.info("the push to %s raced another push (try %d); fetching and re-applying", branch, attempt + 1)
                self._fetch()
            else:
                raise GitExportError(f"could not push to branch {branch} of {self.remote_url}: other pushes kept "
                                     f"landing first ({PUSH_ATTEMPTS} tries); try again in a moment")
        log.info("exported %s to %s@%s as %s", path, branch, commit[:12], _one_line(username))

        result = ExportResult(sha=commit, branch=branch, path=path, url=self._commit_url(commit, branch, path))
        if self.settings.git_merge_request and branch != base:
            title = f"Portal export: {_one_line(name)}"
            try:
                mr_url = self._open_merge_request(branch, title, message.split("\n\n", 1)[1])
            except GitExportError as exc:
                log.warning("pushed %s but the merge request failed: %s", commit[:12], exc)
                return replace(result, merge_request_error=str(exc))
            return replace(result, merge_request_url=mr_url)
        return result

    def _list_configs(self, branch: str | None) -> list[str]:
        ref_branch = branch or self.settings.git_branch
        self._check_branch(ref_branch, "the branch")
        with self._locked():
            self._fetch()
            ref = self._existing_ref(ref_branch)
            listing = self._git("ls-tree", "-r", "-z", "--full-tree", ref, "--", self.import_prefix or ".").stdout
        paths = []
        for entry in filter(None, listing.decode("utf-8", "replace").split("\0")):
            meta, path = entry.split("\t", 1)
            mode = meta.split(" ", 1)[0]
            if mode in ("100644", "100755") and path.lower().endswith(CONFIG_SUFFIXES) and self._importable(path):
                paths.append(path)
        return sorted(paths)

    def _read_config(self, path: str, branch: str | None) -> str:
        path = checked_repo_path(path, "the config path")
        if not self._importable(path):
            raise GitExportError(f"{path} is outside {self.import_prefix}/, the folder configs are imported from")
        ref_branch = branch or self.settings.git_branch
        self._check_branch(ref_branch, "the branch")
        with self._locked():
            self._fetch()
            ref = self._existing_ref(ref_branch)
            entry = self._git("ls-tree", "-l", "-z", ref, "--", path).stdout.decode("utf-8", "replace").rstrip("\0")
            if not entry:
                raise GitExportError(f"there is no {path} on branch {ref_branch}; pick a file from the list")
            mode, kind, blob, size = entry.split("\t", 1)[0].split()
            if kind != "blob" or mode not in ("100644", "100755"):
                raise GitExportError(f"{path} on branch {ref_branch} is not a regular file (a link or a folder)")
            if int(size) > MAX_CONFIG_BYTES:
                raise GitExportError(f"{path} is {int(size) // 1000} kB; configs over "
                                     f"{MAX_CONFIG_BYTES // 1000} kB are not imported")
            data = self._git("cat-file", "blob", blob).stdout
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise GitExportError(f"{path} is not UTF-8 text; save it as UTF-8 and push it again") from None

    def _importable(self, path: str) -> bool:
        return not self.import_prefix or path.startswith(self.import_prefix + "/")

    # ---- git plumbing --------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One operation on the clone at a time. A new file handle per call, so flock excludes
        other threads of this process as well as other processes sharing the data root."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / "repo.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                self._ensure_repo()
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _ensure_repo(self) -> None:
        if not (self.repo / "HEAD").is_file():
            self._git("init", "--quiet", "--bare", str(self.repo), in_repo=False)
        # set every time, so a changed PORTAL_GIT_URL takes effect; the URL never holds credentials
        self._git("config", f"remote.{REMOTE}.url", self.remote_url)
        self._git("config", f"remote.{REMOTE}.fetch", f"+refs/heads/*:refs/remotes/{REMOTE}/*")

    def _fetch(self) -> None:
        self._git("fetch", "--quiet", "--prune", "--no-tags", REMOTE, network=True)

    def _remote_head(self, branch: str) -> str | None:
        result = self._git("rev-parse", "--verify", "--quiet", f"refs/remotes/{REMOTE}/{branch}^{{commit}}",
                           check=False)
        return result.stdout.decode().strip() if result.returncode == 0 else None

    def _existing_ref(self, branch: str) -> str:
        if self._remote_head(branch) is None:
            raise GitExportError(f"there is no branch {branch} in {self.remote_url}")
        return f"refs/remotes/{REMOTE}/{branch}"

    def _file_body(self, commit: str, path: str) -> str | None:
        result = self._git("cat-file", "blob", f"{commit}:{path}", check=False)
        if result.returncode != 0:
            return None
        return config_body(result.stdout.decode("utf-8", "replace"))

    def _with_header(self, body: str, *, username: str, run_id: int | str | None) -> str:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        run = _one_line(run_id) if run_id is not None else "none (exported from the train form)"
        header = [f"{EXPORT_MARK} {__version__}", f"# Portal run: {run}", f"# User: {_one_line(username)}",
                  f"# Date: {now}", f"# LLaMA-Factory: {llamafactory_version()}"]
        return "\n".join(header) + "\n\n" + body

    def _commit(self, parent: str, path: str, content: str, message: str, identity: dict[str, str]) -> str:
        blob = self._git("hash-object", "-w", "--stdin", input=content.encode("utf-8")).stdout.decode().strip()
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as scratch:
            index = {"GIT_INDEX_FILE": os.path.join(scratch, "index")}  # a throw-away index: no working tree
            self._git("read-tree", parent, env=index)
            added = self._git("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=index, check=False)
            if added.returncode != 0:
                raise GitExportError(f"cannot write {path}: a file or folder of that name is in the way in the "
                                     "repository; change PORTAL_GIT_PATH_TEMPLATE or the run name")
            tree = self._git("write-tree", env=index).stdout.decode().strip()
        return self._git("commit-tree", tree, "-p", parent, "-F", "-", input=message.encode("utf-8"),
                         env=identity).stdout.decode().strip()

    def _push(self, commit: str, branch: str) -> bool:
        """True when pushed; False when another push landed first (then fetch and retry)."""
        result = self._git("push", "--porcelain", REMOTE, f"{commit}:refs/heads/{branch}", network=True,
                           check=False)
        if result.returncode == 0:
            return True
        rejected = [line for line in result.stdout.decode("utf-8", "replace").splitlines() if line.startswith("!")]
        stderr = self._scrub(result.stderr.decode("utf-8", "replace"))
        if any(RACE_REJECTED.search(line) for line in rejected) or (rejected and RACE_MOVED.search(stderr)):
            return False
        if not rejected:
            raise self._failure("push", result)
        if in_the_way := REF_IN_THE_WAY.search(stderr):
            raise GitExportError(f"cannot create branch {branch} in {self.remote_url}: branch {in_the_way[1]} "
                                 "exists, and Git cannot hold a branch and branches below its name together; "
                                 f"delete {in_the_way[1]} or change PORTAL_GIT_BRANCH_MODE back")
        remote_says = [line.removeprefix("remote:").strip() for line in stderr.splitlines()
                       if line.startswith("remote:") and line.removeprefix("remote:").strip()]
        reason = remote_says[-1] if remote_says else rejected[0].split("\t")[-1]
        raise GitExportError(f"{self.remote_url} refused the push to branch {branch}: {reason}. If the branch is "
                             "protected, let the portal push there or set PORTAL_GIT_BRANCH_MODE to user or "
                             "per_export")

    def _check_branch(self, branch: str, setting: str) -> None:
        check_branch_name(branch, setting)
        if self._git("check-ref-format", "--branch", branch, in_repo=False, check=False).returncode != 0:
            raise GitExportError(f"{setting}: git does not accept {branch!r} as a branch name")

    def _commit_url(self, sha: str, branch: str, path: str) -> str | None:
        template = self.settings.git_commit_url_template
        return template.format(sha=sha, branch=branch, path=path) if template else None

    # ---- running git ---------------------------------------------------------------------------
    def _git(self, *args: str, input: bytes | None = None, env: dict[str, str] | None = None,
             in_repo: bool = True, network: bool = False, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        argv = ["git", f"--git-dir={self.repo}", *args] if in_repo else ["git", *args]
        full_env = {**self._environment(with_credentials=network), **(env or {})}
        try:
            result = subprocess.run(argv, input=input, capture_output=True, env=full_env, check=False,
                                    timeout=GIT_TIMEOUT_SECONDS, cwd=self.cache_dir if in_repo else None)
        except subprocess.TimeoutExpired:
            raise GitExportError(f"git {args[0]} with {self.remote_url} took over {GIT_TIMEOUT_SECONDS} s; check "
                                 "that the Git server is reachable from the portal") from None
        if check and result.returncode != 0:
            raise self._failure(args[0], result)
        return result

    def _environment(self, with_credentials: bool) -> dict[str, str]:
        """A clean environment: no user or system git config, no prompts, messages in English."""
        home = self.cache_dir / "home"  # git and ssh read nothing of the portal user's own
        home.mkdir(parents=True, exist_ok=True)
        env = {key: value for key, value in os.environ.items() if key in INHERITED_ENV}
        env.update(HOME=str(home), XDG_CONFIG_HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull,
                   GIT_TERMINAL_PROMPT="0", GIT_LITERAL_PATHSPECS="1", LC_ALL="C", LANG="C")
        if not with_credentials:
            return env
        token = self._token()
        if token is not None and urlsplit(self.remote_url).scheme in ("http", "https"):
            # An Authorization header scoped to the repository URL, given through git's
            # GIT_CONFIG_* variables: not in argv, not in a config file, no askpass helper.
            env.update(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0=f"http.{self.remote_url}.extraHeader",
                       GIT_CONFIG_VALUE_0=f"Authorization: Basic {self._basic_credentials(token)}")
        if _is_ssh(self.remote_url):
            ssh = ["ssh", "-o", "BatchMode=yes"]
            if self.settings.git_ssh_key_file is not None:
                ssh += ["-i", str(self.settings.git_ssh_key_file), "-o", "IdentitiesOnly=yes"]
            if self.settings.git_ssh_known_hosts_file is not None:
                ssh += ["-o", f"UserKnownHostsFile={self.settings.git_ssh_known_hosts_file}",
                        "-o", "StrictHostKeyChecking=yes"]
            env["GIT_SSH_COMMAND"] = shlex.join(ssh)
        return env

    def _https_user(self) -> str:
        return self.settings.git_username or DEFAULT_HTTPS_USER

    def _basic_credentials(self, token: str) -> str:
        return base64.b64encode(f"{self._https_user()}:{token}".encode()).decode()

    def _token(self) -> str | None:
        """Read on each use, so a rotated token file is picked up without a restart."""
        if self.settings.git_token is not None:
            return self.settings.git_token.get_secret_value()
        if self.settings.git_token_file is not None:
            try:
                return Path(self.settings.git_token_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise GitExportError(f"cannot read PORTAL_GIT_TOKEN_FILE {self.settings.git_token_file}: "
                                     f"{exc.strerror}") from None
        return None

    def _scrub(self, text: str) -> str:
        """``text`` without the token in any form git or a server might echo it."""
        try:
            token = self._token()
        except GitExportError:  # an unreadable token file: nothing of it can be in the text
            token = None
        if token:
            for secret in (self._basic_credentials(token), f"{self._https_user()}:{token}", token):
                text = text.replace(secret, "***")
        return re.sub(r"(https?://)[^/@\s]*@", r"\1", text)  # user:pass@ in any URL git prints

    def _token_setting(self) -> str:
        if self.settings.git_token is not None:
            return "PORTAL_GIT_TOKEN"
        return f"PORTAL_GIT_TOKEN_FILE ({self.settings.git_token_file})"

    def _failure(self, command: str, result: subprocess.CompletedProcess[bytes]) -> GitExportError:
        detail = self._scrub((result.stderr or b"").decode("utf-8", "replace")).strip()
        log.warning("git %s failed (exit %d): %s", command, result.returncode, detail)
        url = self.remote_url
        if _is_ssh(url) and SSH_KEY_UNUSABLE.search(detail):
            return GitExportError(f"ssh cannot use the key PORTAL_GIT_SSH_KEY_FILE ({self.settings.git_ssh_key_file}): "
                                  "it must be a private key readable only by the portal (mode 0600 or 0400)")
        if _is_ssh(url) and "Host key verification failed" in detail:
            return GitExportError(f"ssh does not know the host key of {url}: set PORTAL_GIT_SSH_KNOWN_HOSTS_FILE to a "
                                  "known_hosts file holding the Git server's key (ssh-keyscan, checked by hand)")
        if AUTH_FAILURE.search(detail):
            if _is_ssh(url):
                if self.settings.git_ssh_key_file is None:
                    return GitExportError(f"{url} refused the SSH login: set PORTAL_GIT_SSH_KEY_FILE to a deploy key "
                                          "with write access")
                return GitExportError(f"{url} refused the SSH key PORTAL_GIT_SSH_KEY_FILE "
                                      f"({self.settings.git_ssh_key_file}): add its public key to the repository "
                                      "as a deploy key with write access, or use the right key")
            if self.settings.git_token is None and self.settings.git_token_file is None:
                return GitExportError(f"{url} asks for credentials: set PORTAL_GIT_TOKEN (or PORTAL_GIT_TOKEN_FILE) "
                                      "to an access token with read and write access to the repository")
            return GitExportError(f"{url} refused the credentials: check {self._token_setting()} (a token with read "
                                  f"and write access to the repository) and the user name PORTAL_GIT_USERNAME "
                                  f"({self._https_user()!r})")
        if UNREACHABLE.search(detail):
            return GitExportError(f"cannot reach the repository {url}: check PORTAL_GIT_URL and that the portal can "
                                  f"connect to it ({detail.splitlines()[-1]})")
        last = detail.splitlines()[-1] if detail else f"exit code {result.returncode}"
        return GitExportError(f"git {command} failed for {url}: {last}")

    # ---- merge requests ------------------------------------------------------------------------
    def _open_merge_request(self, branch: str, title: str, description: str) -> str:
        """The web URL of a new, or the already open, merge request from ``branch`` to the base branch."""
        s = self.settings
        token = self._token() or ""
        base = s.git_branch
        if s.git_merge_request == "gitlab":
            forge = "GitLab"
            project = quote(s.git_project or "", safe="")  # a path such as ml/configs is one URL segment
            endpoint = f"{(s.git_api_url or '').rstrip('/')}/projects/{project}/merge_requests"
            headers = {"PRIVATE-TOKEN": token}
            payload = {"source_branch": branch, "target_branch": base, "title": title, "description": description}
            query = {"source_branch": branch, "target_branch": base, "state": "opened"}
            already_open, url_key = 409, "web_url"
        else:
            forge = "GitHub"
            endpoint = f"{(s.git_api_url or GITHUB_API).rstrip('/')}/repos/{s.git_project}/pulls"
            headers = {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
                       "X-GitHub-Api-Version": "2022-11-28"}
            payload = {"head": branch, "base": base, "title": title, "body": description}
            owner = (s.git_project or "").split("/", 1)[0]
            query = {"head": f"{owner}:{branch}", "base": base, "state": "open"}
            already_open, url_key = 422, "html_url"  # GitHub: 422 "A pull request already exists for ..."
        try:
            with httpx.Client(timeout=API_TIMEOUT_SECONDS, headers=headers) as client:
                response = client.post(endpoint, json=payload)
                if response.status_code == 201:
                    return response.json()[url_key]
                if response.status_code == already_open and (forge == "GitLab" or "already exists" in response.text):
                    response = client.get(endpoint, params=query)
                    if response.status_code == 200 and response.json():
                        return response.json()[0][url_key]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            raise GitExportError(f"could not open a merge request through {forge} at {endpoint}: "
                                 f"{self._scrub(str(exc))}") from None
        if response.status_code in (401, 403):
            raise GitExportError(f"{forge} refused {self._token_setting()} for the merge request API at {endpoint}: "
                                 "the token needs the api scope (GitLab) or pull request write access (GitHub)")
        raise GitExportError(f"{forge} answered {response.status_code} to the merge request at {endpoint}: "
                             f"{self._scrub(response.text[:300])}")
