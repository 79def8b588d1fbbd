"""Configs in Git for users: a run's and a form's config exported (checked like a submit), the
repository's configs imported into the form, `llamaboard-portal git-export`, and the Train tab's
Git section in headless Chromium — against a real bare repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ARTIFACTS, _ServerThread, free_port, install_assets, launch_chromium
from test_git_export import refs, show

from portal.git_configs import GitConfigs
from portal.git_export import EXPORT_MARK, GitExporter, GitExportError
from portal.runs import ConfigRejected, NotFound


def bare_repo(root: Path) -> Path:
    """A bare repository with a first commit on main (the export needs a base branch)."""
    bare, seed = root / "configs.git", root / "seed"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    subprocess.run(["git", "clone", "-q", str(bare), str(seed)], check=True, capture_output=True)
    (seed / "experiments").mkdir()
    (seed / "experiments" / "README.md").write_text("configs reviewed here\n")
    env = dict(os.environ, GIT_AUTHOR_NAME="seed", GIT_AUTHOR_EMAIL="s@x", GIT_COMMITTER_NAME="seed",
               GIT_COMMITTER_EMAIL="s@x")
    for args in (["add", "-A"], ["commit", "-q", "-m", "seed"], ["push", "-q", "origin", "main"]):
        subprocess.run(["git", "-C", str(seed), *args], check=True, env=env, capture_output=True)
    return bare


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return bare_repo(tmp_path_factory.mktemp("git"))


@pytest.fixture(scope="module")
def git_of_trained(trained, repo, tmp_path_factory) -> GitConfigs:
    """GitConfigs over the shared trained run's services, with an exporter for the test repository."""
    settings = trained["services"].settings.model_copy(update={"git_url": str(repo)})
    return GitConfigs(trained["services"].runs, GitExporter(settings, tmp_path_factory.mktemp("git-cache")))


def test_a_run_exports_as_a_config_to_run_again(git_of_trained, trained, repo):
    run, alice = trained["run"], trained["user"]
    result = git_of_trained.export_run(alice, run.id)
    assert result.branch == "portal/alice" and refs(repo)["refs/heads/portal/alice"] == result.sha
    assert result.path == f"experiments/demo_alpaca/tiny-llama/{run.name}.yaml"
    text = show(repo, f"{result.sha}:{result.path}", "")  # the file as committed
    assert text.startswith(EXPORT_MARK) and f"# Portal run: {run.id}\n# User: alice" in text.split("\n\n")[0]
    config = yaml.safe_load(text)
    assert config["output_dir"] == run.name  # a name, not this machine's run folder
    assert not {"dataset_dir", "media_dir", "report_to", "use_cpu"} & set(config)
    assert config["dataset"] == "demo_alpaca" and config["learning_rate"] == yaml.safe_load(run.config_yaml)[
        "learning_rate"]
    assert show(repo, result.sha, "%an|%cn") == "alice|LLaMA Board Portal"
    # the exported file passes the portal's checks as a config to submit (under a new name)
    prepared = trained["services"].runs.validate_yaml(alice, text, name="again")
    assert prepared.name == "again"


def test_another_user_cannot_export_a_run_and_a_bad_config_pushes_nothing(git_of_trained, trained, repo):
    runs = trained["services"].runs
    mallory = runs.ensure_user("mallory_git")
    with pytest.raises(NotFound):
        git_of_trained.export_run(mallory, trained["run"].id)
    before = refs(repo)
    bad = f"stage: sft\ndo_train: true\nmodel_name_or_path: {trained['model_dir']}\ndataset: demo_alpaca\n" \
          "learning_rate: fast\noutput_dir: broken\n"
    with pytest.raises(ConfigRejected) as rejected:
        git_of_trained.export_yaml(trained["user"], bad)
    assert "learning_rate" in rejected.value.problems
    with pytest.raises(ConfigRejected, match="anchors"):
        git_of_trained.export_yaml(trained["user"], "a: &x 1\nb: *x\n")
    assert refs(repo) == before


def test_import_lists_base_and_own_branch_and_loads(git_of_trained, trained):
    alice = trained["user"]
    git_of_trained.export_run(alice, trained["run"].id)
    choices = dict(git_of_trained.list_configs(alice))
    mine = [value for label, value in choices.items() if "your branch portal/alice" in label]
    assert mine and mine[0].startswith("portal/alice:experiments/")
    args = git_of_trained.read_args(alice, mine[0])
    assert args["dataset"] == "demo_alpaca" and args["output_dir"] == trained["run"].name
    with pytest.raises(Exception, match="outside|escape|not"):
        git_of_trained.read_args(alice, "../../etc/passwd")
    # another user's unmerged branch is theirs: bob cannot load from portal/alice
    bob = trained["services"].runs.ensure_user("bob_git")
    with pytest.raises(GitExportError, match="your own branch"):
        git_of_trained.read_args(bob, mine[0])
    assert not [v for label, v in git_of_trained.list_configs(bob) if v.startswith("portal/alice:")]


def test_cli_git_export_prints_the_commit(tmp_path, mlflow_server, demo_assets):
    repo = bare_repo(tmp_path)  # its own: per-export branches and a user branch cannot share a name prefix
    data_root = tmp_path / "root"
    env = dict(os.environ, PORTAL_DATA_ROOT=str(data_root), PORTAL_MLFLOW_TRACKING_URI=mlflow_server, PORTAL_GPUS="[]",
               PORTAL_GIT_URL=str(repo), PORTAL_GIT_BRANCH_MODE="per_export")
    from portal.config import Settings

    model_dir = install_assets(Settings(data_root=data_root), demo_assets)
    config = tmp_path / "sweep-a.yaml"
    config.write_text(yaml.safe_dump({"stage": "sft", "do_train": True, "model_name_or_path": str(model_dir),
                                      "finetuning_type": "lora", "template": "default", "dataset": "demo_alpaca",
                                      "learning_rate": 1e-4}))
    out = subprocess.run([sys.executable, "-m", "portal.cli", "git-export", str(config)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    sha = out.stdout.strip()
    branches = [ref for ref, value in refs(repo).items() if value == sha]
    assert branches and branches[0].startswith("refs/heads/portal/local/sweep-a-"), refs(repo)
    assert "experiments/demo_alpaca/tiny-llama/sweep-a.yaml" in out.stderr

    before = refs(repo)
    config.write_text(config.read_text().replace("learning_rate: 0.0001", "learning_rate: fast"))
    bad = subprocess.run([sys.executable, "-m", "portal.cli", "git-export", str(config)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 3 and f"{config}: learning_rate:" in bad.stderr
    assert refs(repo) == before


@pytest.mark.browser
def test_train_tab_exports_the_form_and_imports_it_back(tmp_path_factory, mlflow_server, demo_assets, repo):
    from playwright.sync_api import expect, sync_playwright
    from test_web import _fill, _pick, _wait

    from portal.config import Settings
    from portal.services import build_services
    from portal.web import create_app

    settings = Settings(data_root=tmp_path_factory.mktemp("git-ui"), mlflow_tracking_uri=mlflow_server, gpus=[],
                        git_url=str(repo), git_commit_url_template="https://git.example/configs/-/commit/{sha}")
    install_assets(settings, demo_assets)
    services = build_services(settings)
    app = create_app(services, supervise=False)
    with _ServerThread(app, free_port()) as server, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        try:
            page.goto(server.url + "/ui/")
            page.get_by_text("Signed in as").wait_for(timeout=60_000)
            page.get_by_text("Git: export this config").click()
            result = page.locator("#git-export-result")

            # a form without a model: refused, naming the field, nothing pushed
            before = refs(repo)
            page.locator("#git-export").click()
            expect(result).to_contain_text("Not exported", timeout=60_000)
            assert "top.model_path" in result.inner_text() and refs(repo) == before

            _pick(page, "lb-top-model-name", "tiny-llama")
            assert _wait(lambda: page.locator("#lb-top-model-path textarea").input_value().endswith("tiny-llama"), 20)
            _pick(page, "lb-train-dataset", "demo_alpaca")
            _fill(page, "lb-train-max-samples", "77")
            page.locator("#git-export").click()
            expect(result).to_contain_text("Exported to Git", timeout=60_000)
            link = result.locator("a").first.get_attribute("href")
            sha = refs(repo)["refs/heads/portal/local"]
            assert link == f"https://git.example/configs/-/commit/{sha}"
            page.screenshot(path=str(ARTIFACTS / "git-export.png"), full_page=True)

            # change the form, then load the exported config back from Git
            _fill(page, "lb-train-max-samples", "5")
            page.locator("#git-list").click()
            picker = page.locator("#git-pick input")
            expect(picker).to_have_value(re.compile("your branch portal/local"), timeout=30_000)
            page.locator("#git-import").click()
            expect(page.locator("#lb-train-output-box")).to_contain_text("from Git is loaded", timeout=30_000)
            assert page.locator("#lb-train-max-samples textarea").input_value() == "77"
        finally:
            browser.close()
