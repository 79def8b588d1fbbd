"""A run as JSON: what the HTTP API returns and `--json` prints (one shape for both)."""

from __future__ import annotations

import json
from typing import Any

from .models import Run
from .tracking import MetricPoint


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def run_to_dict(run: Run, mlflow_url: str | None) -> dict[str, Any]:
    return {
        "id": run.id, "name": run.name, "owner": run.owner, "status": run.status.value,
        "status_reason": run.status_reason, "created_at": _iso(run.created_at), "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at), "exit_code": run.exit_code, "mlflow_run_id": run.mlflow_run_id,
        "final_loss": run.final_loss, "model": run.model_name_or_path, "datasets": run.datasets, "stage": run.stage,
        "finetuning_type": run.finetuning_type, "output_dir": run.output_dir, "gpus": run.gpus, "nodes": run.nodes,
        "config_sha256": run.config_sha256, "mlflow_url": mlflow_url, "parent_id": run.parent_id, "note": run.note,
        "tags": [t for t in run.tags.split(",") if t],
        "dataset_fingerprints": json.loads(run.dataset_fingerprints or "[]"),
        "kind": run.kind, "git_commit": run.git_commit, "git_branch": run.git_branch, "git_path": run.git_path,
        "git_commit_url": run.git_commit_url,
    }


def metrics_summary(points: list[MetricPoint]) -> dict[str, Any]:
    """The last value and step of each metric, and how many points there are."""
    summary: dict[str, Any] = {}
    for point in sorted(points, key=lambda p: p.step):
        summary[point.key] = {"last": point.value, "step": point.step,
                              "points": summary.get(point.key, {}).get("points", 0) + 1}
    return summary


def event_to_dict(event) -> dict[str, Any]:
    """One status change (portal.models.RunEvent)."""
    return {"at": _iso(event.at), "status": event.status.value, "reason": event.reason}


def artifact_to_dict(artifact) -> dict[str, Any]:
    """One entry of a run's output folder (portal.run_files.Artifact)."""
    return {"path": artifact.path, "size": artifact.size, "modified": _iso(artifact.modified),
            "files": artifact.files, "folder": artifact.path.endswith("/"), "downloadable": artifact.downloadable}


def human_size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
