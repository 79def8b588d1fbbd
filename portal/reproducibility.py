"""A run's reproducibility record: what it takes to run it again and get the same model.

Seed, the config's sha256, the dataset fingerprints, the software versions the portal logged to
MLflow at submit (kept on the Run row since migration 0011; read back from the MLflow params for
older runs), where the job ran (a Python environment, or the trainer image on Kubernetes), the
run it was made from and the Git commit of its config. One dict for the run page, `show --json`
and the HTTP API alike (decision 0023)."""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any

from llamaboard_ext import compile as lbc

from .models import Run

if TYPE_CHECKING:
    from .runs import RunService

DEFAULT_SEED = 42  # LLaMA-Factory's (transformers') seed when a config names none
SOFTWARE = ("llamafactory", "transformers", "torch", "peft", "accelerate", "datasets", "python", "portal")

_mlflow_params: dict[str, dict[str, str]] = {}  # older runs' params, read once per process
_failed: dict[str, float] = {}  # MLflow did not answer for this run: not asked again for a minute
RETRY_SECONDS = 60.0
_lock = threading.Lock()


def relation(run: Run) -> str | None:
    """How a run was made from its parent: cloned, resumed, evaluates, merged."""
    if not run.parent_id:
        return None
    if run.kind == "eval":
        return "evaluates"
    if run.kind == "export":
        return "merged from"
    if "\nresume_from_checkpoint:" in "\n" + (run.config_yaml or ""):
        return "resumed from"
    return "cloned from"


def seed_of(run: Run) -> int | str:
    try:
        args = lbc.yaml_to_args(run.config_yaml) if run.config_yaml else {}
    except lbc.YamlError:
        args = {}
    return args.get("seed", DEFAULT_SEED)


def _params(runs: RunService, run: Run) -> dict[str, str]:
    """The environment of a run made before migration 0011, from its MLflow params ({} when
    MLflow does not answer: the record says "unknown" rather than fail the page)."""
    if not run.mlflow_run_id:
        return {}
    with _lock:
        if run.mlflow_run_id in _mlflow_params:
            return _mlflow_params[run.mlflow_run_id]
        if time.monotonic() - _failed.get(run.mlflow_run_id, -RETRY_SECONDS) < RETRY_SECONDS:
            return {}  # the page refreshes every 2 s: a down MLflow is not asked each time
    try:
        params = dict(runs.tracker.client.get_run(run.mlflow_run_id).data.params)
    except Exception:  # noqa: BLE001 - MLflow down: shown as unknown, asked again a minute later
        with _lock:
            _failed[run.mlflow_run_id] = time.monotonic()
        return {}
    found = {k: v for k, v in params.items() if k.startswith("env.") or k == "portal.seed"}
    with _lock:
        _mlflow_params[run.mlflow_run_id] = found
    return found


def record(runs: RunService, run: Run) -> dict[str, Any]:
    """The record of a run the caller may see (RunService.reproducibility checks that)."""
    environment = json.loads(run.environment or "{}")
    source = "run"
    if not any(k.startswith("env.") for k in environment):
        environment, source = _params(runs, run), "mlflow"
        if not environment:
            source = None
    software = {name: environment.get(f"env.{name}") for name in SOFTWARE}
    job = environment.get("job.environment")
    if not job and run.launcher == "kubernetes":
        job = f"image {runs.settings.kubernetes.image} (the portal's setting now; not recorded for this run)"
    fingerprints = json.loads(run.dataset_fingerprints or "[]")
    return {
        "seed": seed_of(run),
        "config_sha256": run.config_sha256,
        "datasets": [{"name": fp.get("name"), "version": fp.get("version"), "sha256": fp.get("sha256"),
                      "rows": fp.get("rows"), "source": fp.get("source")} for fp in fingerprints],
        "software": software,
        "software_source": source,  # "run" (the row), "mlflow" (its params, older runs) or None (unknown)
        "job_environment": job,
        "launcher": run.launcher,
        "parent": {"id": run.parent_id, "relation": relation(run)} if run.parent_id else None,
        "git": ({"commit": run.git_commit, "branch": run.git_branch, "path": run.git_path,
                 "url": run.git_commit_url} if run.git_commit else None),
    }


def record_rows(rec: dict[str, Any]) -> list[tuple[str, str]]:
    """The record as (item, value) rows: the run page's "Reproducibility" table."""
    rows = [("Seed", str(rec["seed"])), ("Config sha256", rec["config_sha256"] or "—")]
    for fp in rec["datasets"]:
        parts = [f"v{fp['version']}" if fp.get("version") else "",
                 f"sha256 {fp['sha256'][:12]}" if fp.get("sha256") else (f"hub {fp['source']}" if fp.get("source") else ""),
                 f"{fp['rows']} rows" if fp.get("rows") is not None else ""]
        rows.append((f"Dataset {fp['name']}", " · ".join(p for p in parts if p) or "—"))
    if not rec["datasets"]:
        rows.append(("Datasets", "— (no fingerprint recorded)"))
    software = rec["software"]
    names = ("llamafactory", "transformers", "torch", "peft", "python")
    text = " · ".join(f"{n} {software[n]}" for n in names if software.get(n))
    if rec["software_source"] == "mlflow":
        text += " (from the MLflow params)"
    rows.append(("Software", text or "unknown (not recorded)"))
    rows.append(("Job environment", rec["job_environment"] or "unknown (not recorded)"))
    parent = rec["parent"]
    rows.append(("Parent run", f"{parent['relation']} run #{parent['id']}" if parent else "—"))
    git = rec["git"]
    rows.append(("Git commit", f"{git['commit'][:12]} · {git['path']} on {git['branch']}" if git else
                 "— (not exported to Git)"))
    return rows


def record_markdown(rec: dict[str, Any]) -> str:
    """The record as a Markdown list like the run's details above it (a two-column table in the
    details' narrow column squeezed its labels to a letter per line); the Git commit linked when the
    portal has a commit link."""
    lines = ["#### Reproducibility", ""]
    git = rec["git"]
    for item, value in record_rows(rec):
        if item == "Git commit" and git and git.get("url"):
            value = f"[`{git['commit'][:12]}`]({git['url']}) · `{git['path']}` on `{git['branch']}`"
        elif item in ("Config sha256",) and value != "—":
            value = f"`{value}`"
        lines.append(f"- **{item}:** {value}")
    return "\n".join(lines)
