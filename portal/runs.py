"""RunService: submit, list, get, cancel, logs, metrics — and who may do what.

Every way in (the UI, the CLI, later the HTTP API) goes through this class, so ownership is
checked in one place: a user reaches only their own runs; admins reach all. A run that is not
yours reads as "not found", so its existence does not leak either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import or_, update
from sqlmodel import select

from llamaboard_ext import compile as lbc
from llamaboard_ext.validate import validate_args

from . import __version__
from .catalog import Catalog
from .config import Settings
from .datasets import DatasetService, write_pinned_info
from .db import Database
from .launchers import JobSpec, Launcher, LaunchError, PollResult
from .models import AuditEvent, Run, RunEvent, RunStatus, User, utcnow
from .policy import EXPORT_DROPPED_KEYS, apply_policy
from .recent import Recent
from .request_context import client_address
from .run_query import RunQuery, count_statement, page_statement
from .storage import UserSpace, check_name
from .tracking import MetricPoint, MetricsCache, Tracker

log = logging.getLogger(__name__)

ACTIVE = (RunStatus.starting, RunStatus.running)
CONFIG_FILE = "config.yaml"
PINNED_DATASETS_DIR = "datasets"  # <run dir>/datasets/dataset_info.json: the dataset versions the run uses
LOG_FILE = "job.log"
DENIED_VIEW_SECONDS = 60.0  # a denied view of one run by one user is audited once per this
MAX_CONFIG_BYTES = 1_000_000  # a config is a few KB; anything near this is a mistake or an attack


class PortalError(Exception):
    """An error whose message is meant for the user."""


class NotFound(PortalError):
    pass


class ConfigRejected(PortalError):
    """The config breaks a rule; ``problems`` maps each key to what is wrong and how to fix it."""

    def __init__(self, problems: dict[str, str]):
        self.problems = problems
        super().__init__("; ".join(f"{k}: {v}" for k, v in problems.items()))


MAX_COMPARE = 5
# config keys that differ between any two runs by construction: not shown in a comparison
PER_RUN_KEYS = frozenset({"output_dir", "dataset_dir", "run_name"})


TOKENS_KEY = "num_input_tokens_seen"  # what LLaMA-Factory's trainer logs with include_num_input_tokens_seen
X_AXES = ("step", "tokens")


@dataclass
class Comparison:
    runs: list[Run]
    curves: dict[int, list[MetricPoint]]
    differences: dict[str, list[Any]]  # config key -> one value per run, only keys whose values differ
    x_axis: str = "step"  # what points() puts on x: "step", or "tokens" (input tokens seen)
    tokens: dict[int, dict[int, float]] = field(default_factory=dict)  # run id -> {step: tokens seen}
    notes: list[str] = field(default_factory=list)  # e.g. why "tokens" fell back to steps

    def points(self, run_id: int) -> list[tuple[str, float, float]]:
        """(metric, x, value) of a run's loss and eval_loss, x by ``x_axis``."""
        counts = self.tokens.get(run_id) or {}
        return [(p.key, tokens_at(counts, p.step) if self.x_axis == "tokens" else float(p.step), p.value)
                for p in self.curves.get(run_id, []) if p.key in ("loss", "eval_loss")]


def tokens_at(counts: dict[int, float], step: int) -> float:
    """Input tokens seen by ``step``: logged at that step (every log carries the count), else
    interpolated between the nearest logged steps, or scaled from the nearest one outside them."""
    if step in counts:
        return float(counts[step])
    steps = sorted(counts)
    below = [s for s in steps if s < step]
    above = [s for s in steps if s > step]
    if below and above:
        a, b = below[-1], above[0]
        return counts[a] + (counts[b] - counts[a]) * (step - a) / (b - a)
    near = below[-1] if below else above[0]
    return counts[near] * step / near if near else float(counts[near])


@dataclass
class Prepared:
    """A config ready to run: the args after the portal's policy, and the exact YAML."""

    name: str
    args: dict[str, Any]
    yaml: str
    run_dir: Path
    gpus: int  # all the run's GPUs: per node x nodes
    notes: list[str]
    datasets: dict[str, Any] = field(default_factory=dict)  # pinned dataset_info entries (absolute files)
    fingerprints: list[dict[str, Any]] = field(default_factory=list)
    nodes: int = 1


def llamafactory_cli() -> str:
    """The llamafactory-cli installed beside this Python (the portal's venv), else on PATH."""
    beside = Path(sys.executable).parent / "llamafactory-cli"
    return str(beside) if beside.is_file() else (shutil.which("llamafactory-cli") or "llamafactory-cli")


def environment_params() -> dict[str, str]:
    """The software a local job runs with (the portal's own environment): part of the run's
    reproducibility record in MLflow."""
    from importlib.metadata import PackageNotFoundError, version

    params = {"env.python": sys.version.split()[0], "env.portal": __version__}
    for package in ("llamafactory", "transformers", "torch", "peft", "accelerate", "datasets"):
        try:
            params[f"env.{package}"] = version(package)
        except PackageNotFoundError:
            params[f"env.{package}"] = "not installed"
    return params


def dataset_params(fingerprints: list[dict[str, Any]]) -> dict[str, Any]:
    """MLflow params naming the data of a run: which data trained this model, always answerable."""
    params: dict[str, Any] = {}
    for fp in fingerprints:
        prefix = f"dataset.{fp['name']}"
        for key in ("sha256", "version", "rows", "source"):
            if fp.get(key) is not None:
                params[f"{prefix}.{key}"] = fp[key]
    return params


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def last_loss(output_dir: str | os.PathLike) -> float | None:
    """The last training loss the trainer wrote (LLaMA-Factory's trainer_log.jsonl)."""
    path = Path(output_dir) / "trainer_log.jsonl"
    loss = None
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if entry.get("loss") is not None:
                    loss = float(entry["loss"])
    except OSError:
        return None
    return loss


def _whole_cpus(quantity: str) -> int:
    """A Kubernetes CPU quantity ("4", "500m", "2.5") as whole CPUs, at least 1."""
    text = str(quantity).strip()
    try:
        cpus = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return 1
    return max(1, int(cpus))


def _last_error_line(text: str) -> str | None:
    for line in reversed(text.strip().splitlines()):
        stripped = line.strip()
        if stripped and ("Error" in stripped or "error:" in stripped.lower()) and not stripped.startswith("File "):
            return stripped[:300]
    return None


class RunService:
    def __init__(self, settings: Settings, db: Database, catalog: Catalog, launcher: Launcher, tracker: Tracker,
                 datasets: DatasetService | None = None):
        self.settings = settings
        self.db = db
        self.catalog = catalog
        self.datasets = datasets or DatasetService(settings, db, catalog)
        self.launcher = launcher
        self.tracker = tracker
        self.metrics_cache = MetricsCache(tracker.history, ttl_seconds=settings.metrics_refresh_seconds)
        self._dispatch_lock = threading.Lock()
        self._starting: set[int] = set()  # runs this process is handing to its launcher right now
        # (user id, run id) of a denied view audited in the last minute: see _audit_denied
        self._denied_seen: Recent[tuple[int, int], bool] = Recent(DENIED_VIEW_SECONDS, 4096)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- users and audit -----------------------------------------------------------------
    def ensure_user(self, username: str, *, is_admin: bool = False, email: str | None = None) -> User:
        check_name(username, "user name")
        with self.db.session() as s:
            user = s.exec(select(User).where(User.username == username)).first()
            if user is None:
                user = User(username=username, is_admin=is_admin, email=email)
                s.add(user)
                s.commit()
                s.refresh(user)
            return user

    def user(self, username: str) -> User:
        with self.db.session() as s:
            user = s.exec(select(User).where(User.username == username)).first()
        if user is None or not user.is_active:
            raise PermissionError(f"unknown or inactive user '{username}'")
        return user

    def audit(self, username: str, action: str, target: str | None = None, detail: str | None = None,
              client: str | None = None) -> None:
        client = client or client_address.get()
        with self.db.session() as s:
            s.add(AuditEvent(username=username, action=action, target=target, detail=detail, client=client))
            s.commit()

    def space(self, user: User) -> UserSpace:
        return UserSpace.for_user(self.settings.users_root, user.username).ensure()

    # ---- preparing a config --------------------------------------------------------------
    @property
    def _on_cluster(self) -> bool:
        return self.launcher.on_cluster

    def _gpus_per_run(self) -> int:
        if self._on_cluster:  # what each run asks the cluster for; the portal's machine may have none
            return self.settings.gpus_per_run
        return min(self.settings.gpus_per_run, len(self.settings.gpu_ids)) if self.settings.gpu_ids else 0

    def _placement(self, gpus_per_node: int | None, nodes: int) -> tuple[int, int]:
        """The GPUs per node and the nodes a run gets: the portal's gpus_per_run on one node
        unless the user asks for more, which only a cluster can give. Raises ConfigRejected
        naming "gpus" or "nodes"."""
        problems: dict[str, str] = {}
        if not self._on_cluster:
            if gpus_per_node is not None:
                problems["gpus"] = (f"runs here get the portal's {self._gpus_per_run()} GPU(s) (gpus_per_run): "
                                    "choosing the GPUs of a run needs the Kubernetes launcher (launcher: kubernetes)")
            if nodes != 1:
                problems["nodes"] = (f"{nodes} nodes: several nodes need the Kubernetes launcher (launcher: "
                                     "kubernetes); this portal runs jobs on its own machine, so leave nodes at 1")
            if problems:
                raise ConfigRejected(problems)
            return self._gpus_per_run(), 1
        k8s = self.settings.kubernetes
        gpus = self.settings.gpus_per_run if gpus_per_node is None else gpus_per_node
        if gpus_per_node is not None and not 0 <= gpus_per_node <= k8s.max_gpus_per_node:
            problems["gpus"] = (f"{gpus_per_node} GPUs per node: choose 0 to {k8s.max_gpus_per_node} "
                                "(kubernetes.max_gpus_per_node; ask an admin for more)")
        if not 1 <= nodes <= k8s.max_nodes:
            problems["nodes"] = (f"{nodes} nodes: choose 1 to {k8s.max_nodes} "
                                 "(kubernetes.max_nodes; ask an admin for more)")
        elif nodes > 1 and gpus < 1:
            problems["nodes"] = (f"{nodes} nodes need 1 or more GPUs per node (gpus): training on several nodes "
                                 "uses GPUs; ask for GPUs or leave nodes at 1")
        if problems:
            raise ConfigRejected(problems)
        return gpus, nodes

    def _job_cpus(self) -> int:
        if self.settings.job_cpus:
            return self.settings.job_cpus
        if self._on_cluster:  # the pod's CPU request, not this machine's cores
            return _whole_cpus(self.settings.kubernetes.cpu_request)
        return max(1, (os.cpu_count() or 1) // self.settings.max_concurrent_runs)

    def prepare(self, user: User, args: dict[str, Any], name: str | None = None, *, for_submit: bool = True,
                datasets_of: Run | None = None, gpus_per_node: int | None = None, nodes: int = 1,
                kind: str = "train") -> Prepared:
        """Policy + validation; raises ConfigRejected naming every bad key. ``datasets_of``: pin
        the dataset versions that run used (a clone) instead of the newest ones. ``gpus_per_node``
        (default: gpus_per_run) and ``nodes``: chosen per run on a cluster only."""
        gpus_per_node, nodes = self._placement(gpus_per_node, nodes)
        gpus = gpus_per_node * nodes
        space = self.space(user)
        raw_output = str(args.get("output_dir") or "")
        if not name and ".." in Path(raw_output).parts:
            raise ConfigRejected({"output_dir": f"output_dir '{raw_output}' is not allowed: it names the run, "
                                                "write a plain name like my_run (the portal picks the folder)"})
        name = name or os.path.basename(os.path.normpath(raw_output)) or ""
        try:
            name = check_name(name, "run name")
        except ValueError as err:
            raise ConfigRejected({"output_dir": str(err)}) from err
        run_dir = space.run_dir(name)
        self.catalog.sync_user_datasets(space)
        result = apply_policy(args, settings=self.settings, catalog=self.catalog, space=space, run_dir=run_dir,
                              gpus=gpus_per_node, cpus=self._job_cpus(), kind=kind)
        if kind == "export":  # `llamafactory-cli export` parses no training arguments
            for key in EXPORT_DROPPED_KEYS:
                result.args.pop(key, None)
        problems = dict(result.problems)
        cap = self.settings.max_gpus_per_user
        if cap is not None and gpus > cap and not user.is_admin:
            problems["gpus"] = f"a run takes {gpus} GPU(s) but users may hold {cap}: ask an admin to raise the limit"
        if for_submit and run_dir.exists():
            problems["output_dir"] = f"a run named '{name}' already exists in your space: choose another run name"
        if not problems:
            checked = lbc.clean_args(result.args)
            if self._on_cluster and gpus and kind != "export":
                # the job's GPUs are the cluster's: this machine (often without any) cannot tell
                # whether they do bf16, so LLaMA-Factory's parser checks the rest as for a CPU
                checked["use_cpu"] = True
            problems.update(validate_args(checked, kind=kind))
        if problems:
            raise ConfigRejected(problems)
        args = dict(result.args)
        names = [d.strip() for key in ("dataset", "eval_dataset") for d in str(args.get(key) or "").split(",")
                 if d.strip()]
        info = None
        if datasets_of is not None:
            pinned_file = Path(datasets_of.run_dir) / PINNED_DATASETS_DIR / "dataset_info.json"
            info = json.loads(pinned_file.read_text(encoding="utf-8")) if pinned_file.is_file() else None
        pinned, fingerprints = self.datasets.pin(space, names, info=info)
        # the run reads its own dataset_info.json: the versions of now, whatever is uploaded later
        args["dataset_dir"] = str(run_dir / PINNED_DATASETS_DIR)
        args.setdefault("media_dir", str(space.datasets_dir))  # images/videos named relative to the user's data
        header = f"LLaMA Board Portal run '{name}' of {user.username}; portal {__version__}, llamafactory 0.9.5"
        return Prepared(name=name, args=args, yaml=lbc.args_to_yaml(args, header=header), run_dir=run_dir,
                        gpus=gpus, nodes=nodes, notes=result.notes, datasets=pinned, fingerprints=fingerprints)

    @staticmethod
    def parse_config(text: str | bytes) -> dict[str, Any]:
        """A config file's keys; a huge, non-UTF-8 or unsafe file is refused under the key "yaml"."""
        size = len(text.encode("utf-8") if isinstance(text, str) else text)
        if size > MAX_CONFIG_BYTES:
            raise ConfigRejected({"yaml": f"the config is {size:,} bytes; a LLaMA-Factory config is a few KB "
                                          f"(limit {MAX_CONFIG_BYTES:,}): put data in a dataset, not the config"})
        try:
            return lbc.yaml_to_args(text)
        except lbc.YamlError as err:
            raise ConfigRejected({"yaml": str(err)}) from err

    def validate_yaml(self, user: User, text: str | bytes, name: str | None = None, *,
                      gpus_per_node: int | None = None, nodes: int = 1) -> Prepared:
        """The checks of a submit, without submitting; raises ConfigRejected naming every bad key."""
        return self.prepare(user, self.parse_config(text), name, for_submit=False, gpus_per_node=gpus_per_node,
                            nodes=nodes)

    def submit_yaml(self, user: User, text: str | bytes, name: str | None = None, source: str = "yaml", *,
                    gpus_per_node: int | None = None, nodes: int = 1) -> Run:
        return self.submit_args(user, self.parse_config(text), name=name, source=source,
                                gpus_per_node=gpus_per_node, nodes=nodes)

    def submit_args(self, user: User, args: dict[str, Any], name: str | None = None, source: str = "api",
                    parent: Run | None = None, same_data: bool = False, *, gpus_per_node: int | None = None,
                    nodes: int = 1, kind: str = "train") -> Run:
        """``parent``: the run this one was cloned from (recorded); ``same_data``: train on the
        dataset versions the parent used; ``gpus_per_node``, ``nodes``: see ``prepare``; ``kind``:
        "train", or "eval"/"export" for the jobs portal/evaluation.py makes of a finished run."""
        prepared = self.prepare(user, args, name, datasets_of=parent if same_data else None,
                                gpus_per_node=gpus_per_node, nodes=nodes, kind=kind)
        run_dir = prepared.run_dir
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError as err:
            raise ConfigRejected({"output_dir": f"a run named '{prepared.name}' already exists: choose another run name"}) from err
        write_pinned_info(run_dir / PINNED_DATASETS_DIR, prepared.datasets)
        (run_dir / CONFIG_FILE).write_text(prepared.yaml, encoding="utf-8")
        body = lbc.args_to_yaml(prepared.args)
        sha = _sha256(body)
        software = environment_params()
        run = Run(
            name=prepared.name, owner_id=user.id, owner=user.username, status=RunStatus.queued,
            stage=str(prepared.args.get("stage", "")), finetuning_type=str(prepared.args.get("finetuning_type", "")),
            model_name_or_path=str(prepared.args.get("model_name_or_path", "")),
            datasets=str(prepared.args.get("dataset") or prepared.args.get("eval_dataset") or ""),
            config_yaml=prepared.yaml, config_sha256=sha, run_dir=str(run_dir),
            output_dir=str(prepared.args.get("export_dir") if kind == "export" else prepared.args["output_dir"]),
            launcher=self.launcher.name,
            gpus=prepared.gpus, nodes=prepared.nodes, dataset_fingerprints=json.dumps(prepared.fingerprints),
            parent_id=parent.id if parent is not None else None, kind=kind,
            environment=json.dumps({**software, "job.environment": self.job_environment()}),
        )
        with self.db.session() as s:
            s.add(run)
            s.commit()
            s.refresh(run)
        try:
            run.mlflow_run_id = self.tracker.create_run(prepared.name, {
                "portal.run_id": str(run.id), "portal.owner": user.username, "portal.run_name": prepared.name,
                "portal.config_sha256": sha, "portal.source": source, "mlflow.user": user.username,
                "portal.kind": kind,
                **({"portal.parent_run_id": str(parent.id)} if parent is not None else {}),
            })
            self.tracker.log_params(run.mlflow_run_id, {
                **dataset_params(prepared.fingerprints), **software,
                "portal.seed": prepared.args.get("seed", 42),  # LLaMA-Factory's default when unset
                "portal.gpus": prepared.gpus, "portal.nodes": prepared.nodes,
            })
            self.tracker.client.log_artifact(run.mlflow_run_id, str(run_dir / CONFIG_FILE))
        except Exception as err:  # tracking down: the run is kept and reported, never launched blind
            self._set(run.id, status=RunStatus.failed, status_reason=f"MLflow is not reachable: {err}", finished_at=utcnow())
            self.audit(user.username, "submit", f"run:{run.id}", f"failed: MLflow unreachable ({source})")
            raise PortalError(f"run {run.id} not started: the MLflow tracking server is not reachable ({err})") from err
        self._set(run.id, mlflow_run_id=run.mlflow_run_id)
        self.audit(user.username, "submit", f"run:{run.id}", f"{prepared.name} ({source}, sha256 {sha[:12]})")
        self.dispatch()
        return self.get_run(user, run.id)

    # ---- reading -------------------------------------------------------------------------
    def _owned(self, user: User, run: Run | None, run_id: int, purpose: str = "view") -> Run:
        if run is not None and run.owner_id != user.id and not user.is_admin:
            self._audit_denied(user, run, purpose)
        if run is None or (run.owner_id != user.id and not user.is_admin):
            raise NotFound(f"run {run_id} not found")
        return run

    def _audit_denied(self, user: User, run: Run, purpose: str) -> None:
        """Every denied change is audited; denied views once per user, run and minute (a page
        left open on a foreign run id refreshes every 2 s and must not flood the log)."""
        if purpose == "view":
            if self._denied_seen.get((user.id, run.id)):
                return
            self._denied_seen.put((user.id, run.id), True)
        self.audit(user.username, "denied", f"run:{run.id}", f"{purpose} of a run of {run.owner}")

    def get_run(self, user: User, run_id: int, purpose: str = "view") -> Run:
        with self.db.session() as s:
            return self._owned(user, s.get(Run, run_id), run_id, purpose)

    def search_runs(self, user: User, query: RunQuery) -> tuple[list[Run], int]:
        """One page of the history (the user's runs; admins all or one owner's) and the total."""
        query.check()
        with self.db.session() as s:
            total = s.exec(count_statement(query, user)).one()
            return list(s.exec(page_statement(query, user)).all()), int(total)

    def annotate(self, user: User, run_id: int, note: str | None = None, tags: list[str] | None = None) -> Run:
        """The owner's note and tags (admins may too)."""
        run = self.get_run(user, run_id, purpose="annotate")
        changes: dict[str, Any] = {}
        if note is not None:
            if len(note) > 4000:
                raise PortalError("the note is over 4000 characters: keep it short, link to a document instead")
            changes["note"] = note.strip()
        if tags is not None:
            clean = sorted({t.strip() for t in tags if t.strip()})
            bad = [t for t in clean if len(t) > 40 or "," in t]
            if bad:
                raise PortalError(f"tags must be short words without commas: {', '.join(bad)}")
            changes["tags"] = ",".join(clean)
        if changes:
            self._set(run.id, **changes)
            self.audit(user.username, "annotate", f"run:{run.id}", ", ".join(changes))
        return self.get_run(user, run.id)

    def clone(self, user: User, run_id: int, name: str, changes: dict[str, Any] | None = None) -> Run:
        """Submit a run's config again, with ``changes``, on the same dataset versions; the new run
        records its parent."""
        parent = self.get_run(user, run_id, purpose="clone")
        args = lbc.yaml_to_args(parent.config_yaml)
        for key in ("output_dir", "dataset_dir", "media_dir", "preprocessing_num_workers", "use_cpu"):
            args.pop(key, None)  # the portal sets these for the new run
        args.update(changes or {})
        return self.submit_args(user, args, name=name, source="clone", parent=parent, same_data=True)

    def compare(self, user: User, run_ids: list[int], x_axis: str = "step") -> Comparison:
        """2 to 5 of the user's runs side by side: their loss curves and the config keys that differ.
        ``x_axis`` "tokens": the curves by input tokens seen, when every run logged them (else by
        step, with a note naming the runs without)."""
        ids = list(dict.fromkeys(int(i) for i in run_ids))
        if not 2 <= len(ids) <= MAX_COMPARE:
            raise PortalError(f"choose 2 to {MAX_COMPARE} runs to compare (got {len(ids)})")
        if x_axis not in X_AXES:
            raise PortalError(f"x axis '{x_axis}': choose {' or '.join(X_AXES)}")
        chosen = [self.get_run(user, run_id) for run_id in ids]
        configs = []
        for run in chosen:
            try:
                configs.append(lbc.yaml_to_args(run.config_yaml) if run.config_yaml else {})
            except lbc.YamlError:
                configs.append({})
        differences: dict[str, list[Any]] = {}
        for key in sorted(set().union(*configs) - PER_RUN_KEYS):
            values = [config.get(key) for config in configs]
            if any(v != values[0] for v in values[1:]):
                differences[key] = values
        versions = [", ".join(f"{fp['name']} v{fp.get('version') or '-'} {(fp.get('sha256') or '')[:8]}"
                              for fp in json.loads(run.dataset_fingerprints or "[]")) for run in chosen]
        if any(v != versions[0] for v in versions[1:]):
            differences["(dataset versions)"] = versions
        curves = {run.id: (self.metrics(user, run.id) if run.mlflow_run_id else []) for run in chosen}
        comparison = Comparison(runs=chosen, curves=curves, differences=differences)
        if x_axis == "tokens":
            comparison.tokens = {run.id: self.token_counts(user, run.id) for run in chosen}
            missing = [f"#{run.id}" for run in chosen if not comparison.tokens[run.id]]
            if missing:
                comparison.notes.append(
                    f"run{'s' if len(missing) > 1 else ''} {', '.join(missing)} logged no token counts "
                    f"({TOKENS_KEY}: a config without include_num_input_tokens_seen, or a run that has not logged "
                    "yet): the chart is by step")
            else:
                comparison.x_axis = "tokens"
        return comparison

    def token_counts(self, user: User, run_id: int) -> dict[int, float]:
        """{step: input tokens seen} as the run logged them to MLflow ({} when it did not);
        read through a cache of its own (the Runs tab's curves do not pay for it)."""
        run = self.get_run(user, run_id)
        if not run.mlflow_run_id:
            return {}
        cache = self.__dict__.get("_tokens_cache")
        if cache is None:
            cache = self.__dict__.setdefault("_tokens_cache", MetricsCache(
                lambda mlflow_id: self.tracker.history(mlflow_id, keys=(TOKENS_KEY,)),
                ttl_seconds=self.settings.metrics_refresh_seconds))
        return {p.step: p.value for p in cache.get(run.mlflow_run_id, final=run.status.is_final)}

    def list_runs(self, user: User, limit: int = 500) -> list[Run]:
        with self.db.session() as s:
            query = select(Run).order_by(Run.id.desc()).limit(limit)
            if not user.is_admin:
                query = query.where(Run.owner_id == user.id)
            return list(s.exec(query).all())

    def logs(self, user: User, run_id: int, tail_bytes: int = 64_000) -> str:
        run = self.get_run(user, run_id)
        path = Path(run.run_dir) / LOG_FILE
        state = json.loads(run.launcher_state or "{}")
        if run.status.is_final and path.is_file() and path.stat().st_size:
            state = {}  # an ended run's saved log: the launcher (a cluster's API) need not be asked
        return self.launcher.logs(state, path, tail_bytes)

    def log_since(self, user: User, run_id: int, offset: int, limit: int = 1_000_000) -> tuple[str, int]:
        """The log from byte ``offset`` (at most ``limit`` bytes, cut at a line end) and the offset
        to ask for next: what `logs --follow` polls."""
        run = self.get_run(user, run_id)
        try:
            with open(Path(run.run_dir) / LOG_FILE, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                start = min(max(0, offset), size)  # past the end (a log saved anew): continue from its end
                fh.seek(start)
                data = fh.read(limit)
        except FileNotFoundError:
            return "", 0
        if len(data) == limit and b"\n" in data:
            data = data[: data.rindex(b"\n") + 1]  # never split a line (or a UTF-8 character) in two
        return data.decode("utf-8", errors="replace"), start + len(data)

    def metrics(self, user: User, run_id: int) -> list[MetricPoint]:
        run = self.get_run(user, run_id)
        if not run.mlflow_run_id:
            return []
        return self.metrics_cache.get(run.mlflow_run_id, final=run.status.is_final)

    def job_environment(self) -> str:
        """Where this portal's jobs run: the trainer image on a cluster, else the Python
        environment beside the portal (its llamafactory-cli)."""
        if self._on_cluster:
            return f"image {self.settings.kubernetes.image}"
        return f"Python environment {sys.prefix} (Python {sys.version.split()[0]})"

    def record_git_commit(self, user: User, run_id: int, sha: str, branch: str, path: str,
                          url: str | None) -> Run:
        """Note on the run the Git commit holding its config (after GitConfigs.export_run)."""
        run = self.get_run(user, run_id, purpose="export")
        self._set(run.id, git_commit=sha, git_branch=branch, git_path=path, git_commit_url=url)
        return self.get_run(user, run.id)

    def reproducibility(self, user: User, run_id: int) -> dict[str, Any]:
        """What it takes to run it again: seed, config and data digests, software, job
        environment, parent, Git commit (portal/reproducibility.py)."""
        from .reproducibility import record

        return record(self, self.get_run(user, run_id))

    def mlflow_url(self, run: Run) -> str | None:
        return self.tracker.run_url(run.mlflow_run_id) if run.mlflow_run_id else None

    # ---- status history, log file, artifacts, resume ---------------------------------------
    def status_events(self, user: User, run_id: int) -> list[RunEvent]:
        """The run's status changes, oldest first (none for runs made before migration 0008)."""
        run = self.get_run(user, run_id)
        with self.db.session() as s:
            return list(s.exec(select(RunEvent).where(RunEvent.run_id == run.id)
                               .order_by(RunEvent.at, RunEvent.id)).all())

    def _run_base(self, run: Run) -> Path:
        from .run_files import FileRefused, run_base

        try:
            return run_base(run.run_dir, UserSpace.for_user(self.settings.users_root, run.owner).root)
        except FileRefused as err:
            raise NotFound(f"run {run.id}: {err}") from err

    def open_log(self, user: User, run_id: int) -> tuple[Run, Any, int]:
        """The run's whole log file, opened for reading (the owner's or an admin's), and its size
        now (a running job's log grows: read that many bytes). NotFound when there is none."""
        from .run_files import FileRefused, open_inside

        run = self.get_run(user, run_id, purpose="download")
        try:
            handle, info = open_inside(self._run_base(run), LOG_FILE)
        except FileRefused as err:
            raise NotFound(f"run {run.id} has no log file yet") from err
        return run, handle, info.st_size

    def artifacts(self, user: User, run_id: int):
        """The files of the run's output folder (checkpoints as one entry each) and whether the
        list was cut; see portal/run_files.py."""
        from .run_files import list_artifacts

        run = self.get_run(user, run_id)
        try:
            return list_artifacts(self._run_base(run))
        except NotFound:
            return [], False

    def artifact_bytes(self, user: User, run_id: int, path: str) -> tuple[str, bytes]:
        """One small file of the run's output folder: its name and content. NotFound for anything
        that is not a regular file inside it (links, '..', absolute paths); PortalError over the cap."""
        from .run_files import ARTIFACT_DOWNLOAD_MAX_BYTES, OUTPUT_DIR, FileRefused, open_inside

        run = self.get_run(user, run_id, purpose="download")
        try:
            handle, info = open_inside(self._run_base(run), f"{OUTPUT_DIR}/{path}")
        except FileRefused as err:
            raise NotFound(f"run {run.id}: {err}") from err
        with handle:
            if info.st_size > ARTIFACT_DOWNLOAD_MAX_BYTES:
                raise PortalError(f"'{path}' is {info.st_size / 1e6:.1f} MB: files up to "
                                  f"{ARTIFACT_DOWNLOAD_MAX_BYTES // (1024 * 1024)} MB can be downloaded here "
                                  f"(the run's output folder is {run.output_dir})")
            data = handle.read(ARTIFACT_DOWNLOAD_MAX_BYTES + 1)
        if len(data) > ARTIFACT_DOWNLOAD_MAX_BYTES:
            raise PortalError(f"'{path}' grew over the download limit while it was read: try again later")
        return path.rsplit("/", 1)[-1], data

    def resumable_checkpoint(self, user: User, run: Run) -> Path | None:
        """The checkpoint ``user`` can resume ``run`` from: a failed or cancelled run of their own
        with an ``output/checkpoint-N`` folder (its newest). None otherwise."""
        from .run_files import last_checkpoint

        if run.status not in (RunStatus.failed, RunStatus.cancelled) or run.owner_id != user.id:
            return None
        try:
            return last_checkpoint(self._run_base(run))
        except NotFound:
            return None

    def resume(self, user: User, run_id: int, name: str | None = None) -> Run:
        """A new run of a failed or cancelled run's config, on its dataset versions, that starts
        from its last checkpoint (LLaMA-Factory's ``resume_from_checkpoint``, a path the portal
        resolves in the owner's space). The new run records the old one as its parent."""
        parent = self.get_run(user, run_id, purpose="resume")
        if parent.status not in (RunStatus.failed, RunStatus.cancelled):
            raise PortalError(f"run {parent.id} is {parent.status.value}: only a failed or cancelled run can be "
                              "resumed (clone a succeeded run to train it again)")
        if parent.owner_id != user.id:
            raise PortalError(f"run {parent.id} is {parent.owner}'s: only its owner can resume it (its checkpoint "
                              "lies in their space); clone it to train it again in yours")
        checkpoint = self.resumable_checkpoint(user, parent)
        if checkpoint is None:
            raise PortalError(f"run {parent.id} saved no checkpoint (no checkpoint-N folder in its output): "
                              "there is nothing to resume from; clone it to train it again from the start")
        args = lbc.yaml_to_args(parent.config_yaml)
        for key in ("output_dir", "dataset_dir", "media_dir", "preprocessing_num_workers", "use_cpu"):
            args.pop(key, None)  # the portal sets these for the new run
        args["resume_from_checkpoint"] = str(checkpoint)
        if not name:
            space, stem = self.space(user), parent.name[:90]
            name = f"{stem}_resume"
            number = 2
            while space.run_dir(name).exists():
                name, number = f"{stem}_resume{number}", number + 1
        return self.submit_args(user, args, name=name, source="resume", parent=parent, same_data=True)

    # ---- evaluate, merge, register (portal/evaluation.py, portal/registry.py) ---------------
    def evaluate(self, user: User, run_id: int, datasets: list[str] | None = None, max_samples: int | None = None,
                 predict_with_generate: bool = True, max_new_tokens: int = 128, batch_size: int = 4,
                 name: str | None = None) -> Run:
        """Submit an eval job (kind "eval") of a succeeded run of the user's; its metrics land on
        both MLflow runs when it succeeds."""
        from .evaluation import evaluate

        return evaluate(self, user, run_id, datasets, max_samples, predict_with_generate=predict_with_generate,
                        max_new_tokens=max_new_tokens, batch_size=batch_size, name=name)

    def evaluations(self, user: User, run_id: int):
        """The eval runs of a run, newest first, with their metrics (portal/evaluation.py)."""
        from .evaluation import evaluations

        return evaluations(self, user, run_id)

    def merge(self, user: User, run_id: int, name: str | None = None) -> Run:
        """Submit an export job (kind "export") of a succeeded run of the user's; its merged model
        is registered in MLflow as ``name`` when it succeeds."""
        from .evaluation import merge

        return merge(self, user, run_id, name)

    def set_alias(self, admin: User, name: str, version: str | int, alias: str) -> None:
        """Point a registry alias (candidate, production) at a model version: admins only."""
        from .registry import set_alias

        set_alias(self, admin, name, version, alias)

    # ---- cancelling ----------------------------------------------------------------------
    def cancel(self, user: User, run_id: int) -> Run:
        run = self.get_run(user, run_id, purpose="cancel")
        if run.status.is_final:
            raise PortalError(f"run {run_id} has already {run.status.value}")
        self.audit(user.username, "cancel", f"run:{run_id}")
        if self._set(run_id, where=(RunStatus.queued,), status=RunStatus.cancelled,
                     status_reason=f"cancelled by {user.username} before it started", finished_at=utcnow()):
            if run.mlflow_run_id:
                self._finish_tracking(run.mlflow_run_id, "KILLED")
            return self.get_run(user, run_id)
        if not self._set(run_id, where=ACTIVE, cancel_requested=True,
                         status_reason=f"cancelling (requested by {user.username})"):
            return self.get_run(user, run_id)  # it ended meanwhile
        run = self.get_run(user, run_id)
        state = json.loads(run.launcher_state or "{}")
        if state:
            try:
                self.launcher.stop(state, self.settings.cancel_grace_seconds)
            except LaunchError as err:
                # the cluster refused (403) or did not answer: the run stays, marked to be
                # cancelled (it ends `cancelled` whenever its job ends), and cancelling again retries
                log.warning("could not stop the job of run %s: %s", run_id, err)
                raise PortalError(f"run {run_id} is marked to be cancelled, but its job could not be stopped: {err}. "
                                  "It may keep running: cancel again later, or ask an admin") from err
        self.poll_active(only=run_id)
        return self.get_run(user, run_id)

    # ---- supervising jobs ----------------------------------------------------------------
    def _set(self, run_id: int, where: tuple[RunStatus, ...] | None = None, **values: Any) -> bool:
        """Update a run's row (only while its status is one of ``where``). A change of ``status``
        also writes a RunEvent, in the same transaction, when the update matched and the status
        really changed: the update is made conditional on the status just read, and read again
        if another process changed it meanwhile."""
        if "status" not in values:
            with self.db.session() as s:
                stmt = update(Run).where(Run.id == run_id)
                if where:
                    stmt = stmt.where(Run.status.in_(where))
                result = s.exec(stmt.values(**values))  # type: ignore[call-overload]
                s.commit()
                return result.rowcount == 1
        new = RunStatus(values["status"])
        with self.db.session() as s:
            for _ in range(20):
                old = s.exec(select(Run.status).where(Run.id == run_id)).first()
                if old is None or (where and old not in where):
                    s.rollback()
                    return False
                stmt = update(Run).where(Run.id == run_id, Run.status == old)
                result = s.exec(stmt.values(**values))  # type: ignore[call-overload]
                if result.rowcount == 1:
                    if old != new:
                        s.add(RunEvent(run_id=run_id, status=new, reason=values.get("status_reason")))
                    s.commit()
                    return True
                s.rollback()  # the status changed between the read and the update: read it again
        return False

    def dispatch(self) -> None:
        """Start queued runs, oldest first, while run slots and GPUs are free."""
        with self._dispatch_lock:
            with self.db.session() as s:
                active = list(s.exec(select(Run).where(Run.status.in_(ACTIVE))).all())
                # a run is ready once its MLflow run exists (submit creates it right after the row)
                queued = list(s.exec(select(Run).where(Run.status == RunStatus.queued, Run.mlflow_run_id.is_not(None))
                                     .order_by(Run.id)).all())
                admins = {u.id for u in s.exec(select(User).where(User.is_admin == True)).all()}  # noqa: E712
            # max_concurrent_runs and the per-user limits hold on every launcher; on a cluster they
            # count the runs submitted to it (also those its queue holds), and the cluster places them
            cluster = self._on_cluster
            slots = self.settings.max_concurrent_runs - len(active)
            used = {g for r in active for g in json.loads(r.launcher_state or "{}").get("gpu_ids", [])}
            free = [g for g in self.settings.gpu_ids if g not in used]
            running: dict[int, int] = {}
            holding: dict[int, int] = {}
            for r in active:
                running[r.owner_id] = running.get(r.owner_id, 0) + 1
                holding[r.owner_id] = holding.get(r.owner_id, 0) + r.gpus
            for run in queued:
                if slots <= 0 or (not cluster and run.gpus > len(free)):
                    break  # first in, first out: a big run is not overtaken forever
                limit = self._user_limit(run, running.get(run.owner_id, 0), holding.get(run.owner_id, 0), admins)
                if limit:
                    if run.status_reason != limit:
                        self._set(run.id, where=(RunStatus.queued,), status_reason=limit)
                    continue  # this user waits; other users' runs may go
                # on a cluster started_at is first when the portal handed the run over (what the
                # restart check below counts from), then when its pod began to run
                handed = {"started_at": utcnow()} if cluster else {}
                if not self._set(run.id, where=(RunStatus.queued,), status=RunStatus.starting, status_reason=None,
                                 **handed):
                    continue  # another portal process took it
                running[run.owner_id] = running.get(run.owner_id, 0) + 1
                holding[run.owner_id] = holding.get(run.owner_id, 0) + run.gpus
                if cluster:
                    gpu_ids = []  # the cluster picks the GPUs
                else:
                    gpu_ids, free = free[: run.gpus], free[run.gpus:]
                slots -= 1
                self._start(run, gpu_ids)

    def _user_limit(self, run: Run, running: int, holding: int, admins: set[int]) -> str | None:
        """Why this user's run must wait for their own runs to end (None: it may start)."""
        if run.owner_id in admins:
            return None
        cap = self.settings.max_runs_per_user
        if cap is not None and running >= cap:
            return f"waiting: {run.owner} already has {running} run(s) running (limit {cap} per user)"
        gpu_cap = self.settings.max_gpus_per_user
        if gpu_cap is not None and run.gpus and holding + run.gpus > gpu_cap:
            return f"waiting: {run.owner} holds {holding} GPU(s); this run needs {run.gpus} (limit {gpu_cap} per user)"
        return None

    def _start(self, run: Run, gpu_ids: list[int]) -> None:
        run_dir = Path(run.run_dir)
        command = "export" if run.kind == "export" else "train"  # an eval job is `train` with do_predict
        env = {
            "MLFLOW_TRACKING_URI": self.tracker.tracking_uri,
            "MLFLOW_RUN_ID": run.mlflow_run_id or "",
            "MLFLOW_EXPERIMENT_NAME": self.tracker.experiment_name,
        }
        spec = JobSpec(run_id=run.id, name=run.name, owner=run.owner, workdir=run_dir, log_path=run_dir / LOG_FILE,
                       argv=[llamafactory_cli(), command, str(run_dir / CONFIG_FILE)], env=env, gpu_ids=gpu_ids,
                       gpus=run.gpus, nodes=run.nodes, config_yaml=run.config_yaml, config_sha256=run.config_sha256,
                       experiment=self.tracker.experiment_name, command=command)
        self._starting.add(run.id)  # poll_active leaves it alone until its state is stored
        try:
            try:
                state = self.launcher.start(spec)
            except LaunchError as err:
                if self._set(run.id, where=ACTIVE, status=RunStatus.failed, status_reason=str(err),
                             finished_at=utcnow()) and run.mlflow_run_id:
                    self._finish_tracking(run.mlflow_run_id, "FAILED")
                return
            if self._on_cluster:
                self._submitted(run, state)
                return
            state["gpu_ids"] = gpu_ids
            self._set(run.id, status=RunStatus.running, started_at=utcnow(), launcher_state=json.dumps(state),
                      status_reason=f"running on {'GPU ' + ','.join(map(str, gpu_ids)) if gpu_ids else 'the CPU'}")
        finally:
            self._starting.discard(run.id)

    def _submitted(self, run: Run, state: dict[str, Any]) -> None:
        """A run handed to a cluster: it stays `starting` (while it waits for quota, a node or its
        image) until a poll sees its pod run."""
        what = f"{state.get('kind', 'Job')} {state.get('namespace')}/{state.get('job')}"
        if self._set(run.id, where=(RunStatus.starting,), launcher_state=json.dumps(state),
                     status_reason=f"submitted to Kubernetes as {what}: waiting for the cluster to run it"):
            with self.db.session() as s:
                current = s.get(Run, run.id)
            if current is None or not current.cancel_requested:
                return
            # cancelled while its Job was being made: the cancel found no job to stop, so stop it now
            log.info("run %s was cancelled while it was being submitted: stopping %s", run.id, what)
        else:
            with self.db.session() as s:
                current = s.get(Run, run.id)
            if current is not None and not current.status.is_final:
                return  # another portal process re-attached it meanwhile: it follows the Job
            log.warning("run %s ended while its Job was being made: deleting %s", run.id, what)
        try:
            self.launcher.stop(state, self.settings.cancel_grace_seconds)
        except LaunchError as err:
            log.warning("could not stop %s of run %s: %s", what, run.id, err)

    def poll_active(self, only: int | None = None) -> None:
        """Look at every starting/running run once (``only``: that one run): re-attached after a
        restart the same way."""
        with self.db.session() as s:
            query = select(Run).where(Run.status.in_(ACTIVE))
            if only is not None:
                query = query.where(Run.id == only)
            active = list(s.exec(query).all())
        found: dict[int, dict[str, Any]] | None = None  # the cluster's jobs by run id, asked at most once
        problem: str | None = None  # why they could not be listed
        for run in active:
            state = json.loads(run.launcher_state or "{}")
            if not state:
                if run.status != RunStatus.starting or run.id in self._starting:
                    continue  # being started by this process right now
                if found is None:
                    found, problem = self._find_jobs()
                state = self._adopt(run, found)
                if not state:
                    since = run.started_at or run.created_at
                    if since and (utcnow() - since).total_seconds() > 120:
                        why = f" (and its job could not be looked for: {problem})" if problem else ""
                        self._finish(run, -1, f"the portal stopped while it was starting this job{why}")
                    continue
            result = self.launcher.poll(state)
            if result.exit_code is not None:
                self._finish(run, result.exit_code, result.reason)
            else:
                self._note_progress(run, result)

    def _note_progress(self, run: Run, result: PollResult) -> None:
        """A job that has not ended: its status in words when that changed (a cluster's: "queued:
        waiting for quota in ...", "waiting for a node: ...", "status unknown: ..." while its API
        does not answer, which does not end the run), and `running` once it runs. The database is
        written only on a change."""
        changes: dict[str, Any] = {}
        if run.status == RunStatus.starting and result.phase == "running":
            changes.update(status=RunStatus.running, started_at=utcnow())
        if result.reason and result.reason != run.status_reason and not run.cancel_requested:
            changes["status_reason"] = result.reason  # a cancel keeps "cancelling (requested by ...)"
        if changes:
            self._set(run.id, where=(run.status,), **changes)

    def _find_jobs(self) -> tuple[dict[int, dict[str, Any]], str | None]:
        """The jobs a launcher that can list them (Kubernetes: ``reconcile``) still has, by run id;
        and why they could not be listed, if so."""
        reconcile = getattr(self.launcher, "reconcile", None)
        if reconcile is None:
            return {}, None
        try:
            return {int(state["run_id"]): state for state in reconcile()}, None
        except LaunchError as err:
            log.warning("could not list the cluster's jobs to re-attach runs: %s", err)
            return {}, str(err)

    def _adopt(self, run: Run, found: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
        """A run left `starting` without state (the portal stopped while it was submitting it)
        takes over the job found for it, if that job is this run's: same owner and config."""
        state = dict(found.get(run.id) or {})
        if not state:
            return None
        owner, sha = state.pop("owner", None), state.pop("config_sha256", None)
        if owner not in (None, run.owner) or sha not in (None, run.config_sha256):
            log.warning("run %s: the job %s/%s carries its id but not its owner and config; not adopted", run.id,
                        state.get("namespace"), state.get("job"))
            return None
        state["log_path"] = str(Path(run.run_dir) / LOG_FILE)
        what = f"{state.get('kind', 'Job')} {state.get('namespace')}/{state.get('job')}"
        with self.db.session() as s:
            stmt = (update(Run).where(Run.id == run.id, Run.status == RunStatus.starting,
                                      or_(Run.launcher_state.is_(None), Run.launcher_state.in_(("", "{}"))))
                    .values(launcher_state=json.dumps(state), status_reason=f"re-attached to {what} after a restart"))
            adopted = s.exec(stmt).rowcount == 1  # type: ignore[call-overload]
            s.commit()
        if adopted:
            log.info("run %s re-attached to %s", run.id, what)
        return state if adopted else None

    def _finish(self, run: Run, exit_code: int, reason: str | None) -> None:
        if run.cancel_requested:
            status, mlflow_status = RunStatus.cancelled, "KILLED"
            reason = (run.status_reason or "cancelled").replace("cancelling", "cancelled")
        elif exit_code == 0:
            status, mlflow_status, reason = RunStatus.succeeded, "FINISHED", None
        else:
            status, mlflow_status = RunStatus.failed, "FAILED"
            hint = _last_error_line(self.launcher.logs({}, Path(run.run_dir) / LOG_FILE, 16_000))
            reason = f"{reason or f'exited with code {exit_code}'}" + (f": {hint}" if hint else "")
        if self._set(run.id, where=ACTIVE, status=status, status_reason=reason, exit_code=exit_code,
                     finished_at=utcnow(), final_loss=last_loss(run.output_dir)):
            if run.mlflow_run_id:
                self._finish_tracking(run.mlflow_run_id, mlflow_status)
            log.info("run %s (%s) %s%s", run.id, run.name, status.value, f": {reason}" if reason else "")
            if status == RunStatus.succeeded and run.kind in ("eval", "export"):
                from .evaluation import after_success

                after_success(self, run)  # metrics onto the evaluated run; the merged model registered

    def _finish_tracking(self, mlflow_run_id: str, status: str) -> None:
        try:
            self.tracker.finish_run(mlflow_run_id, status)
        except Exception as err:  # the run's own state is what counts; MLflow catches up
            log.warning("could not close MLflow run %s: %s", mlflow_run_id, err)

    def stop_active_jobs(self, grace_seconds: float) -> int:
        """Stop every running job (tests, benchmarks, an admin's emergency stop); returns how many."""
        with self.db.session() as s:
            active = list(s.exec(select(Run).where(Run.status.in_(ACTIVE))).all())
        for run in active:
            state = json.loads(run.launcher_state or "{}")
            if state:
                try:
                    self.launcher.stop(state, grace_seconds)
                except LaunchError as err:  # one job that cannot be stopped does not keep the others running
                    log.warning("could not stop the job of run %s: %s", run.id, err)
        if active:
            self.poll_active()
        return len(active)

    def wait(self, user: User, run_id: int, timeout: float | None = None, interval: float = 1.0) -> Run:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll_active()
            self.dispatch()
            run = self.get_run(user, run_id)
            if run.status.is_final:
                return run
            if deadline is not None and time.monotonic() > deadline:
                return run
            time.sleep(interval)

    def start_supervisor(self) -> None:
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._supervise, name="run-supervisor", daemon=True)
        self._thread.start()

    def stop_supervisor(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_active()
                self.dispatch()
            except Exception:  # keep supervising; the next tick retries
                log.exception("run supervisor tick failed")
            self._stop.wait(self.settings.dispatch_interval_seconds)
