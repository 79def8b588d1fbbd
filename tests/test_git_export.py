"""Git export and import (portal/git_export.py) against real git: bare repositories on disk,
reached by path, over HTTP through git-http-backend, and over the ssh transport."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import threading
from importlib.metadata import version
from pathlib import Path

import pytest
from git_http import FakeForge, GitHttpServer
from pydantic import ValidationError

from portal.config import Settings
from portal.git_export import EXPORT_MARK, GitExporter, GitExportError, path_values

YAML = "model_name_or_path: /models/Qwen/Qwen2-0.5B\nstage: sft\nfinetuning_type: lora\nlearning_rate: 0.0001\n"
EXPORT = {"name": "my-run", "dataset": "alpaca_en, identity", "model": "/models/Qwen/Qwen2-0.5B", "stage": "sft",
          "finetuning_type": "lora", "username": "alice", "author_name": "Alice Analyst",
          "author_email": "alice@bank.example"}
EXPORT_PATH = "experiments/alpaca_en+identity/Qwen2-0.5B/my-run.yaml"
TOKEN = "glpat-s3cret-Token-1234"


def git(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """git as a person at another desk would run it (own identity, no user config)."""
    full_env = {"PATH": os.environ["PATH"], "HOME": str(cwd or "/nonexistent"), "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_NAME": "Bob Other", "GIT_AUTHOR_EMAIL": "bob@bank.example",
                "GIT_COMMITTER_NAME": "Bob Other", "GIT_COMMITTER_EMAIL": "bob@bank.example", **(env or {})}
    result = subprocess.run(["git", *args], cwd=cwd, env=full_env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def refs(bare: Path) -> dict[str, str]:
    lines = git("--git-dir", str(bare), "for-each-ref", "--format=%(refname) %(objectname)").splitlines()
    return dict(line.split() for line in lines)


def show(bare: Path, rev: str, fmt: str) -> str:
    return git("--git-dir", str(bare), "show", "-s", f"--format={fmt}", rev)


def commit_files(clone: Path, files: dict[str, bytes | str], message: str) -> None:
    for name, content in files.items():
        target = clone / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
    git("add", "--all", cwd=clone)
    git("commit", "-q", "-m", message, cwd=clone)


@pytest.fixture
def remote(tmp_path) -> Path:
    """A bare repository with one commit on main, as the portal's Git server holds it."""
    seed = tmp_path / "seed"
    git("init", "-q", "-b", "main", str(seed))
    commit_files(seed, {"README.md": "configs\n"}, "init")
    git("clone", "-q", "--bare", str(seed), str(tmp_path / "remote.git"))
    return tmp_path / "remote.git"


@pytest.fixture
def other_clone(tmp_path, remote) -> Path:
    """Someone else's clone of the remote."""
    git("clone", "-q", str(remote), str(tmp_path / "other"))
    return tmp_path / "other"


def exporter(tmp_path: Path, url, **settings) -> GitExporter:
    values = {"data_root": tmp_path / "data", "git_url": str(url),
              "git_commit_url_template": "https://git.example/c/{sha}"}
    return GitExporter(Settings(**{**values, **settings}), tmp_path / "data" / "git")


# ---- export ------------------------------------------------------------------------------------

def test_export_commits_the_config_as_the_user_to_the_user_branch(tmp_path, remote):
    main_before = refs(remote)["refs/heads/main"]

    result = exporter(tmp_path, remote).export(YAML, run_id=42, **EXPORT)

    assert (result.branch, result.path, result.unchanged) == ("portal/alice", EXPORT_PATH, False)
    assert refs(remote)["refs/heads/portal/alice"] == result.sha
    assert result.url == f"https://git.example/c/{result.sha}"
    assert refs(remote)["refs/heads/main"] == main_before  # the base branch is untouched
    assert show(remote, result.sha, "%P") == main_before
    assert show(remote, result.sha, "%an <%ae>|%cn <%ce>") == (
        "Alice Analyst <alice@bank.example>|LLaMA Board Portal <portal@localhost>")
    assert "Portal-Run-Id: 42" in show(remote, result.sha, "%B")
    assert git("--git-dir", str(remote), "diff-tree", "--no-commit-id", "--name-only", "-r", result.sha) == EXPORT_PATH

    text = git("--git-dir", str(remote), "show", f"{result.sha}:{EXPORT_PATH}") + "\n"
    header, body = text.split("\n\n", 1)
    assert body == YAML  # the config itself, unchanged
    lines = header.splitlines()
    assert lines[0].startswith(EXPORT_MARK)
    assert lines[1:3] == ["# Portal run: 42", "# User: alice"]
    assert re.fullmatch(r"# Date: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", lines[3])
    assert lines[4] == f"# LLaMA-Factory: {version('llamafactory')}"


@pytest.mark.parametrize("mode", ["per_export", "base"])
def test_branch_modes(tmp_path, remote, mode):
    result = exporter(tmp_path, remote, git_branch_mode=mode).export(YAML, **EXPORT)

    if mode == "per_export":
        assert re.fullmatch(r"portal/alice/my-run-\d{8}-\d{6}", result.branch)
    else:
        assert result.branch == "main"
    assert refs(remote)[f"refs/heads/{result.branch}"] == result.sha
    assert set(refs(remote)) == {"refs/heads/main", f"refs/heads/{result.branch}"}


def test_values_become_single_safe_path_segments(tmp_path, remote):
    values = path_values(dataset="a,b", model="/x/y/Qwen2/", name="../../etc/passwd", user="Ann Lee@bank",
                         stage="sft", finetuning_type="lora")
    assert values == {"dataset": "a+b", "model": "Qwen2", "name": "etc_passwd", "user": "Ann_Lee_bank",
                      "stage": "sft", "finetuning_type": "lora"}

    result = exporter(tmp_path, remote, git_path_template="{user}/{name}.yml").export(
        YAML, **{**EXPORT, "name": "../../x", "username": "Ann Lee@bank"})
    assert (result.path, result.branch) == ("Ann_Lee_bank/x.yml", "portal/Ann_Lee_bank")


def test_unchanged_reexport_makes_no_commit(tmp_path, remote):
    portal = exporter(tmp_path, remote)
    first = portal.export(YAML, run_id=1, **EXPORT)

    again = portal.export(YAML, run_id=2, **EXPORT)  # another run of the same config: same file body

    assert again.unchanged and again.sha == first.sha and again.branch == "portal/alice"
    assert refs(remote)["refs/heads/portal/alice"] == first.sha
    changed = portal.export(YAML.replace("0.0001", "0.0002"), run_id=3, **EXPORT)
    assert not changed.unchanged and show(remote, changed.sha, "%P") == first.sha


def test_config_already_on_the_base_branch_is_not_committed_again(tmp_path, remote):
    on_main = exporter(tmp_path, remote, git_branch_mode="base").export(YAML, **EXPORT)

    again = exporter(tmp_path, remote).export(YAML, **EXPORT)  # user mode: portal/alice does not exist yet

    assert again.unchanged and (again.sha, again.branch) == (on_main.sha, "main")
    assert "refs/heads/portal/alice" not in refs(remote)


def test_export_builds_on_a_push_made_since_the_last_export(tmp_path, remote, other_clone):
    portal = exporter(tmp_path, remote)
    first = portal.export(YAML, **EXPORT)  # the portal's clone now knows portal/alice at `first`
    git("fetch", "-q", "origin", cwd=other_clone)
    git("checkout", "-q", "-b", "portal/alice", "origin/portal/alice", cwd=other_clone)
    commit_files(other_clone, {"experiments/bob.yaml": "stage: sft\n"}, "bob's config")
    git("push", "-q", "origin", "portal/alice", cwd=other_clone)
    theirs = refs(remote)["refs/heads/portal/alice"]

    ours = portal.export(YAML.replace("lora", "full"), **EXPORT)

    assert show(remote, ours.sha, "%P") == theirs and show(remote, theirs, "%P") == first.sha
    assert git("--git-dir", str(remote), "show", f"{ours.sha}:experiments/bob.yaml") == "stage: sft"


def test_push_that_races_another_push_is_reapplied_and_retried(tmp_path, remote, other_clone, caplog):
    caplog.set_level(logging.INFO, logger="portal.git_export")
    portal = exporter(tmp_path, remote)
    first = portal.export(YAML, **EXPORT)
    git("fetch", "-q", "origin", cwd=other_clone)
    git("checkout", "-q", "-b", "portal/alice", "origin/portal/alice", cwd=other_clone)
    commit_files(other_clone, {"experiments/bob.yaml": "stage: sft\n"}, "bob's config")
    theirs = git("rev-parse", "HEAD", cwd=other_clone)
    # The other push lands between the portal's fetch and its push: git runs pre-push after it
    # has read the remote's refs and before it sends the commit.
    hook = portal.repo / "hooks" / "pre-push"
    hook.write_text(f"#!/bin/sh\nunset GIT_DIR\n[ -e {tmp_path}/raced ] && exit 0\ntouch {tmp_path}/raced\n"
                    f"git -C {other_clone} push -q origin portal/alice\n")
    hook.chmod(0o755)

    ours = portal.export(YAML.replace("lora", "full"), **EXPORT)

    assert (tmp_path / "raced").exists() and "raced another push (try 1)" in caplog.text
    assert refs(remote)["refs/heads/portal/alice"] == ours.sha
    assert show(remote, ours.sha, "%P") == theirs and show(remote, theirs, "%P") == first.sha


def test_push_the_server_refuses_says_why_without_retrying(tmp_path, remote, caplog):
    caplog.set_level(logging.INFO, logger="portal.git_export")
    exporter(tmp_path, remote).export(YAML, **EXPORT)  # portal/alice exists: portal/alice/... cannot
    with pytest.raises(GitExportError, match="branch portal/alice exists.*delete portal/alice"):
        exporter(tmp_path, remote, git_branch_mode="per_export").export(YAML, **EXPORT)

    hook = remote / "hooks" / "pre-receive"  # what a protected branch looks like to git
    hook.write_text("#!/bin/sh\necho 'GitLab: You are not allowed to push code to protected branches.' >&2\n"
                    "exit 1\n")
    hook.chmod(0o755)
    with pytest.raises(GitExportError, match="refused the push to branch main: GitLab: You are not allowed"):
        exporter(tmp_path, remote, git_branch_mode="base").export(YAML, **EXPORT)
    assert "raced" not in caplog.text


def test_concurrent_exports_from_two_processes_all_land(tmp_path, remote):
    # two exporters on one cache folder: what two portal processes sharing the data root do
    portals = [exporter(tmp_path, remote), exporter(tmp_path, remote)]
    results, errors = [], []

    def export(index: int) -> None:
        try:
            results.append(portals[index % 2].export(YAML, **{**EXPORT, "name": f"run-{index}"}))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=export, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    head = refs(remote)["refs/heads/portal/alice"]
    assert git("--git-dir", str(remote), "rev-list", "--count", f"main..{head}") == "4"
    files = git("--git-dir", str(remote), "ls-tree", "-r", "--name-only", head).splitlines()
    assert sorted(f for f in files if f.startswith("experiments/")) == sorted(r.path for r in results)


def test_the_portal_users_git_config_and_environment_are_ignored(tmp_path, remote, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    # a personal config that would send every fetch elsewhere, and variables that would redirect git
    (home / ".gitconfig").write_text(f'[url "/nonexistent/"]\n\tinsteadOf = {remote}\n')
    redirecting = {"HOME": str(home), "XDG_CONFIG_HOME": str(home), "GIT_DIR": "/nonexistent",
                   "GIT_INDEX_FILE": "/nonexistent",
                   "GIT_CONFIG_PARAMETERS": f"'url./nonexistent/.insteadof'='{remote}'"}
    for name, value in redirecting.items():
        monkeypatch.setenv(name, value)

    result = exporter(tmp_path, remote).export(YAML, **EXPORT)

    assert refs(remote)["refs/heads/portal/alice"] == result.sha


# ---- refused input -----------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["../{name}.yaml", "/etc/{name}.yaml", "a/../../{name}.yaml", ".git/{name}.yaml",
                                      "x/.GIT/hooks/{name}.yaml", "{name}.txt", "{name}", "{name.__class__}.yaml",
                                      "{secret}.yaml", "{name!r}.yaml", "{name:>10}.yaml", "{name.yaml"])
def test_path_templates_that_escape_or_are_odd_are_refused_at_start(tmp_path, template):
    with pytest.raises(ValidationError, match="PORTAL_GIT_PATH_TEMPLATE"):
        Settings(data_root=tmp_path, git_path_template=template)


@pytest.mark.parametrize("branch", ["main..x", "-x", "a b", "x.lock", "a/.b", "x@{1}", "HEAD", "a//b", "a/", "ü"])
def test_odd_branch_names_are_refused_at_start(tmp_path, branch):
    with pytest.raises(ValidationError, match="PORTAL_GIT_BRANCH"):
        Settings(data_root=tmp_path, git_branch=branch)


@pytest.mark.parametrize(("change", "message"), [
    ({"git_path_template": "../{name}.yaml"}, "outside the repository"),
    ({"git_path_template": "experiments/.git/{name}.yaml"}, "into .git"),
    ({"git_branch": "main;rm -rf"}, "PORTAL_GIT_BRANCH"),
    ({"git_branch": "ma\x7fin"}, "PORTAL_GIT_BRANCH"),
])
def test_bad_settings_that_skip_validation_are_refused_by_the_exporter(tmp_path, remote, change, message):
    # settings changed without validation (model_copy): the exporter checks again itself
    portal = exporter(tmp_path, remote)
    portal.settings = portal.settings.model_copy(update=change)
    before = refs(remote)

    with pytest.raises(GitExportError, match=re.escape(message)):
        portal.export(YAML, **EXPORT)

    assert refs(remote) == before


def test_user_name_without_usable_characters_is_refused(tmp_path, remote):
    before = refs(remote)
    with pytest.raises(GitExportError, match="user name"):
        exporter(tmp_path, remote).export(YAML, **{**EXPORT, "username": "@@@"})
    assert refs(remote) == before


@pytest.mark.parametrize(("settings", "message"), [
    ({"git_url": "https://alice:tok@git.example/ml/configs.git"}, "must not carry credentials"),
    ({"git_url": "ftp://git.example/configs.git"}, "unsupported scheme"),
    ({"git_import_prefix": "../elsewhere"}, "PORTAL_GIT_IMPORT_PREFIX"),
    ({"git_commit_url_template": "https://git.example/{commit}"}, "PORTAL_GIT_COMMIT_URL_TEMPLATE"),
    ({"git_merge_request": "gitlab", "git_token": "t"}, "PORTAL_GIT_PROJECT"),
    ({"git_merge_request": "gitlab", "git_project": "ml/configs"}, "PORTAL_GIT_TOKEN"),
    ({"git_merge_request": "github", "git_project": "just-a-name", "git_token": "t"}, "owner/repo"),
])
def test_incomplete_or_unsafe_git_settings_are_refused_at_start(tmp_path, settings, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings(data_root=tmp_path, **settings)


def test_token_may_not_be_in_the_config_file(tmp_path, monkeypatch):
    config = tmp_path / "portal.yaml"
    config.write_text("git_url: https://git.example/ml/configs.git\ngit_token: abc\n")
    monkeypatch.setenv("PORTAL_CONFIG_FILE", str(config))
    with pytest.raises(ValueError, match="git_token must not be in the config file"):
        Settings(data_root=tmp_path)


# ---- import ------------------------------------------------------------------------------------

@pytest.fixture
def remote_with_configs(remote, other_clone) -> Path:
    commit_files(other_clone, {
        "experiments/team/base.yaml": "stage: sft\nfinetuning_type: lora\n",
        "experiments/notes.md": "not a config\n",
        "experiments/big.yaml": "# filler\n" * 120_000,
        "experiments/latin1.yml": "name: caf\xe9\n".encode("latin-1"),
        "other/outside.yaml": "stage: sft\n",
    }, "configs")
    os.symlink("team/base.yaml", other_clone / "experiments" / "link.yaml")
    git("add", "--all", cwd=other_clone)
    git("commit", "-q", "-m", "a link", cwd=other_clone)
    git("push", "-q", "origin", "main", cwd=other_clone)
    return remote


def test_import_lists_and_reads_configs(tmp_path, remote_with_configs):
    portal = exporter(tmp_path, remote_with_configs)

    assert portal.list_configs() == ["experiments/big.yaml", "experiments/latin1.yml", "experiments/team/base.yaml"]
    assert portal.read_config("experiments/team/base.yaml") == "stage: sft\nfinetuning_type: lora\n"
    assert portal.read_config("experiments/./team/../team/base.yaml") == "stage: sft\nfinetuning_type: lora\n"

    exported = portal.export(YAML, **EXPORT)
    assert EXPORT_PATH not in portal.list_configs()  # on the user's branch, not on main
    assert EXPORT_PATH in portal.list_configs("portal/alice")
    text = portal.read_config(EXPORT_PATH, branch="portal/alice")
    assert text.startswith(EXPORT_MARK) and text.endswith("\n\n" + YAML)
    assert exported.branch == "portal/alice"


@pytest.mark.parametrize(("path", "branch", "message"), [
    ("../remote.git/config.yaml", None, "outside the repository"),
    ("/etc/passwd.yaml", None, "outside the repository"),
    ("other/outside.yaml", None, "outside experiments/"),
    ("experiments/.git/config.yaml", None, "into .git"),
    ("experiments/notes.md", None, ".yaml or .yml"),
    ("experiments/missing.yaml", None, "there is no experiments/missing.yaml"),
    ("experiments/link.yaml", None, "not a regular file"),
    ("experiments/big.yaml", None, "are not imported"),
    ("experiments/latin1.yml", None, "not UTF-8"),
    ("experiments/team/base.yaml", "no-such-branch", "there is no branch no-such-branch"),
    ("experiments/team/base.yaml", "main..x", "not an allowed branch name"),
])
def test_import_refuses_what_it_must_not_read(tmp_path, remote_with_configs, path, branch, message):
    with pytest.raises(GitExportError, match=re.escape(message)):
        exporter(tmp_path, remote_with_configs).read_config(path, branch=branch)


# ---- credentials -------------------------------------------------------------------------------

@pytest.fixture
def git_http(tmp_path, remote):
    with GitHttpServer(tmp_path, username="oauth2", token=TOKEN) as server:
        yield server


def everything_under(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in folder.rglob("*") if path.is_file())


def test_https_token_pushes_and_stays_out_of_the_clone_and_argv(tmp_path, remote, git_http, monkeypatch):
    portal = exporter(tmp_path, f"{git_http.base_url}/remote.git", git_token=TOKEN)
    argvs = []
    real_run = subprocess.run

    def recording_run(argv, *args, **kwargs):  # records what `ps` would show, runs the real git
        argvs.append(argv)
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr("portal.git_export.subprocess.run", recording_run)

    result = portal.export(YAML, **EXPORT)

    assert refs(remote)["refs/heads/portal/alice"] == result.sha
    assert any("push" in argv for argv in argvs) and TOKEN not in repr(argvs)
    stored = everything_under(tmp_path / "data")
    assert TOKEN.encode() not in stored and base64.b64encode(f"oauth2:{TOKEN}".encode()) not in stored
    assert f"url = {git_http.base_url}/remote.git" in (portal.repo / "config").read_text()


@pytest.mark.parametrize(("settings", "names"), [
    ({"git_token": "glpat-wrong-token-999"}, ["PORTAL_GIT_TOKEN", "PORTAL_GIT_USERNAME ('oauth2')"]),
    ({"git_token": TOKEN, "git_username": "alice"}, ["PORTAL_GIT_TOKEN", "PORTAL_GIT_USERNAME ('alice')"]),
    ({}, ["asks for credentials", "PORTAL_GIT_TOKEN"]),
])
def test_wrong_https_credentials_are_named_and_not_shown(tmp_path, remote, git_http, caplog, settings, names):
    before = refs(remote)
    url = f"{git_http.base_url}/remote.git"
    caplog.set_level(logging.DEBUG)

    with pytest.raises(GitExportError) as error:
        exporter(tmp_path, url, **settings).export(YAML, **EXPORT)

    message = str(error.value)
    assert url in message and all(name in message for name in names)
    secret = settings.get("git_token")
    if secret:
        assert secret not in message and secret not in caplog.text
        assert base64.b64encode(f"{settings.get('git_username', 'oauth2')}:{secret}".encode()).decode() not in message
    assert refs(remote) == before


def test_token_file_is_named_when_it_is_wrong(tmp_path, remote, git_http):
    token_file = tmp_path / "token"
    token_file.write_text("wrong-from-file\n")
    with pytest.raises(GitExportError, match=f"PORTAL_GIT_TOKEN_FILE \\({token_file}\\)"):
        exporter(tmp_path, f"{git_http.base_url}/remote.git", git_token_file=token_file).export(YAML, **EXPORT)
    token_file.write_text(TOKEN + "\n")  # read on each use: a rotated token works without a restart
    assert exporter(tmp_path, f"{git_http.base_url}/remote.git", git_token_file=token_file).export(YAML, **EXPORT).sha


def test_token_echoed_by_git_is_scrubbed_from_errors_and_logs(tmp_path, caplog):
    # git prints the URL it failed to reach; here the token is in it, so git's own message carries it
    caplog.set_level(logging.DEBUG)
    portal = exporter(tmp_path, f"http://127.0.0.1:9/{TOKEN}/configs.git", git_token=TOKEN)
    with pytest.raises(GitExportError, match="cannot reach the repository") as error:
        portal.export(YAML, **EXPORT)
    assert TOKEN not in str(error.value) and TOKEN not in caplog.text
    assert "git fetch failed" in caplog.text  # the failure was logged, scrubbed


def test_push_race_over_http_is_retried(tmp_path, remote, other_clone, git_http, caplog):
    caplog.set_level(logging.INFO, logger="portal.git_export")
    portal = exporter(tmp_path, f"{git_http.base_url}/remote.git", git_token=TOKEN, git_branch_mode="base")
    commit_files(other_clone, {"experiments/bob.yaml": "stage: sft\n"}, "bob's config")
    theirs = git("rev-parse", "HEAD", cwd=other_clone)
    # the other push lands after the portal fetched, as its push connects: git sees "fetch first"
    git_http.race_next_push(lambda: git("push", "-q", "origin", "main", cwd=other_clone))

    result = portal.export(YAML, **EXPORT)

    assert refs(remote)["refs/heads/main"] == result.sha and show(remote, result.sha, "%P") == theirs
    assert "raced another push (try 1)" in caplog.text


FAKE_SSH = """#!{python}
# Stands in for ssh (no sshd runs here): checks the key the portal passes, then runs the git
# command on this machine, as sshd would on the server.
import json, subprocess, sys
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(json.dumps(args) + "\\n")
known_hosts = [arg.split("=", 1)[1] for arg in args if arg.startswith("UserKnownHostsFile=")]
if known_hosts and "gitserver.invalid" not in open(known_hosts[0]).read():
    sys.stderr.write("Host key verification failed.\\n")
    sys.exit(255)
key = args[args.index("-i") + 1] if "-i" in args else None
if key is None or open(key).read() != {authorized!r}:
    sys.stderr.write("git@gitserver.invalid: Permission denied (publickey).\\n")
    sys.exit(255)
sys.exit(subprocess.call(["sh", "-c", args[-1]]))
"""


def test_ssh_key_and_known_hosts_are_passed_to_ssh_and_named_when_refused(tmp_path, remote, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "ssh.log"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH.format(python=sys.executable, log=str(log), authorized="deploy key\n"))
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    key = tmp_path / "id_ed25519"
    key.write_text("deploy key\n")
    url = f"ssh://git@gitserver.invalid{remote}"

    result = exporter(tmp_path, url, git_ssh_key_file=key).export(YAML, **EXPORT)

    assert refs(remote)["refs/heads/portal/alice"] == result.sha
    args = json.loads(log.read_text().splitlines()[0])
    assert {"BatchMode=yes", "IdentitiesOnly=yes"} <= set(args) and args[args.index("-i") + 1] == str(key)

    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("otherhost ssh-ed25519 AAAA\n")
    with pytest.raises(GitExportError, match="set PORTAL_GIT_SSH_KNOWN_HOSTS_FILE"):
        exporter(tmp_path, url, git_ssh_key_file=key, git_ssh_known_hosts_file=known_hosts).export(YAML, **EXPORT)
    known_hosts.write_text("gitserver.invalid ssh-ed25519 AAAA\n")
    with_hosts = exporter(tmp_path, url, git_ssh_key_file=key, git_ssh_known_hosts_file=known_hosts)
    assert with_hosts.export(YAML.replace("lora", "full"), **EXPORT).sha == refs(remote)["refs/heads/portal/alice"]
    assert "StrictHostKeyChecking=yes" in json.loads(log.read_text().splitlines()[-1])

    key.write_text("another key\n")
    with pytest.raises(GitExportError, match=re.escape(f"refused the SSH key PORTAL_GIT_SSH_KEY_FILE ({key})")):
        exporter(tmp_path, url, git_ssh_key_file=key).export(YAML.replace("lora", "oft"), **EXPORT)


# ---- merge requests ------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "project"), [("gitlab", "ml/configs"), ("github", "ml/configs")])
def test_merge_request_is_opened_once_per_branch(tmp_path, remote, kind, project):
    with FakeForge(kind, project, token="api-token") as forge:
        portal = exporter(tmp_path, remote, git_merge_request=kind, git_api_url=forge.api_url,
                          git_project=project, git_token="api-token")
        first = portal.export(YAML, run_id=7, **EXPORT)
        second = portal.export(YAML.replace("lora", "full"), **EXPORT)  # the request is already open

    assert first.merge_request_url and first.merge_request_error is None
    assert second.merge_request_url == first.merge_request_url and not second.unchanged
    method, _, body = forge.requests[0]
    source, target = ("source_branch", "target_branch") if kind == "gitlab" else ("head", "base")
    assert method == "POST" and (body[source], body[target]) == ("portal/alice", "main")
    assert "my-run" in body["title"]
    assert [request[0] for request in forge.requests] == ["POST", "POST", "GET"]


def test_refused_merge_request_keeps_the_push_and_names_the_token(tmp_path, remote, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeForge("gitlab", "ml/configs", token="api-token") as forge:
        portal = exporter(tmp_path, remote, git_merge_request="gitlab", git_api_url=forge.api_url,
                          git_project="ml/configs", git_token="not-the-api-token")
        result = portal.export(YAML, **EXPORT)

    assert refs(remote)["refs/heads/portal/alice"] == result.sha
    assert result.merge_request_url is None and "PORTAL_GIT_TOKEN" in result.merge_request_error
    assert "not-the-api-token" not in result.merge_request_error + caplog.text


def test_no_merge_request_when_pushing_to_the_base_branch(tmp_path, remote):
    with FakeForge("github", "ml/configs", token="api-token") as forge:
        exporter(tmp_path, remote, git_branch_mode="base", git_merge_request="github", git_api_url=forge.api_url,
                 git_project="ml/configs", git_token="api-token").export(YAML, **EXPORT)
    assert forge.requests == []
