"""Configs in Git for users: export a form's or a run's config (checked like a submit), list and
read the repository's configs to load into the form. Git itself is portal.git_export's job."""

from __future__ import annotations

from typing import Any

from llamaboard_ext import compile as lbc

from .git_export import ExportResult, GitExporter, GitExportError
from .models import User
from .runs import RunService

# keys the portal sets for each run on its own machine: a config in Git leaves them to the portal
PORTAL_SET_KEYS = frozenset({"dataset_dir", "media_dir", "preprocessing_num_workers", "use_cpu", "report_to"})


class GitNotConfigured(GitExportError):
    pass


class GitConfigs:
    def __init__(self, runs: RunService, exporter: GitExporter | None = None):
        self.runs = runs
        settings = runs.settings
        if exporter is None and settings.git_url:
            exporter = GitExporter(settings, settings.data_root / "git")
        self.exporter = exporter

    @property
    def enabled(self) -> bool:
        return self.exporter is not None

    def _exporter(self) -> GitExporter:
        if self.exporter is None:
            raise GitNotConfigured("no Git repository is configured: an admin sets PORTAL_GIT_URL "
                                   "(see the admin guide, 'Git and CI')")
        return self.exporter

    def export_args(self, user: User, args: dict[str, Any], name: str | None = None,
                    run_id: int | None = None) -> ExportResult:
        """Checks the config as a submit would (ConfigRejected names the keys), then commits and
        pushes it. ``name``: the run name (default: the config's output_dir)."""
        exporter = self._exporter()
        prepared = self.runs.prepare(user, args, name, for_submit=False)
        portable = {k: v for k, v in args.items() if k not in PORTAL_SET_KEYS}
        portable["output_dir"] = prepared.name  # the run's name: the portal picks the folder
        result = exporter.export(
            lbc.args_to_yaml(lbc.clean_args(portable)), name=prepared.name, dataset=str(args.get("dataset") or "none"),
            model=str(args.get("model_name_or_path") or "model"), stage=str(args.get("stage") or "sft"),
            finetuning_type=str(args.get("finetuning_type") or "lora"), username=user.username,
            author_name=user.display_name or user.username, author_email=user.email, run_id=run_id)
        self.runs.audit(user.username, "git_export", f"run:{run_id}" if run_id else None,
                        f"{result.path} on {result.branch} at {result.sha[:12]}" + (" (unchanged)" if result.unchanged
                                                                                    else ""))
        return result

    def export_yaml(self, user: User, text: str | bytes, name: str | None = None) -> ExportResult:
        return self.export_args(user, self.runs.parse_config(text), name)

    def export_run(self, user: User, run_id: int) -> ExportResult:
        """The config a run trained with, as a config to run again (the same name; Git keeps history)."""
        run = self.runs.get_run(user, run_id, purpose="export")
        # the folders the portal set for the run's owner are set again for whoever exports (an admin
        # exporting another user's run is checked against the admin's space, not the owner's)
        args = {k: v for k, v in lbc.yaml_to_args(run.config_yaml).items() if k not in PORTAL_SET_KEYS}
        args["output_dir"] = run.name
        result = self.export_args(user, args, run.name, run_id=run.id)
        # the commit holding this run's config (also when unchanged: the earlier commit), on the run
        self.runs.record_git_commit(user, run.id, result.sha, result.branch, result.path, result.url)
        return result

    def list_configs(self, user: User) -> list[tuple[str, str]]:
        """(label, choice) of the configs on the base branch, then those on the user's own branch
        (not yet merged). A choice is ``path`` or ``branch:path`` (Git forbids ':' in branch names)."""
        exporter = self._exporter()
        choices = [(path, path) for path in exporter.list_configs()]
        if self.runs.settings.git_branch_mode == "user":
            branch = exporter.target_branch(user.username, "")
            try:
                mine = exporter.list_configs(branch)
            except GitExportError:  # no export of theirs yet: no branch
                mine = []
            choices += [(f"{path} (your branch {branch})", f"{branch}:{path}") for path in mine]
        return choices

    def read_args(self, user: User, choice: str) -> dict[str, Any]:
        """A config from the repository as args (for the form); the same checks as Load YAML.
        Only the base branch and the user's own branch are read: another user's unmerged work is theirs."""
        exporter = self._exporter()
        branch, _, path = choice.rpartition(":")
        own = exporter.target_branch(user.username, "") if self.runs.settings.git_branch_mode == "user" else None
        if branch and branch not in (self.runs.settings.git_branch, own):
            raise GitExportError(f"branch {branch}: load configs from {self.runs.settings.git_branch} or your own "
                                 "branch (the list shows them)")
        text = exporter.read_config(path, branch or None)
        self.runs.audit(user.username, "git_import", None, choice)
        return self.runs.parse_config(text)
