"""MLflow Model Registry: the merged models of export runs, and the aliases admins set (decision 0022).

A succeeded export run's model is registered as a new version of its registered model. The
weights stay where the job wrote them (the owner's ``models/`` folder on the shared volume); the
version's ``source`` is ``runs:/<export run>/model``, a small folder the portal logs into the
export run (the model's config.json and a manifest naming the files, their sizes and their
path): MLflow 3.17's server refuses a local path as a source unless it lies inside the run's own
artifact folder, which a proxied artifact store (``mlflow-artifacts:/``) never is, and copying
gigabytes of weights into the artifact store is not the point. The tags say the rest: portal run
ids, config sha256, dataset fingerprints, base model, the files' path.

Registered model names are global in MLflow; the portal tags each it creates with its owner and
lets only that user (or an admin) add versions to it.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .models import Run, User

if TYPE_CHECKING:
    from .runs import RunService

ALIASES = ("candidate", "production")  # what admins may point at a version
OWNER_TAG = "portal.owner"
MODEL_ARTIFACT = "model"
MANIFEST_FILE = "portal_model.json"
WEIGHT_FILES = re.compile(r"^(model.*\.safetensors|pytorch_model.*\.bin|model\.safetensors\.index\.json)$")


def _missing(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "RESOURCE_DOES_NOT_EXIST" in str(err)


def _registered(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if _missing(err):
            return None
        raise


def check_can_register(client, user: User, name: str) -> None:
    """Refuse a name that is someone else's registered model (or one made outside the portal)."""
    from .runs import PortalError

    model = _registered(client, name)
    if model is None or user.is_admin:
        return
    owner = (model.tags or {}).get(OWNER_TAG)
    if owner != user.username:
        raise PortalError(f"the registered model '{name}' belongs to {'another user' if owner else 'MLflow, not the portal'}: "
                          "choose another name")


def model_files(export_dir: Path) -> list[dict[str, Any]]:
    return [{"name": p.name, "size": p.stat().st_size} for p in sorted(export_dir.iterdir()) if p.is_file()]


def register(runs: "RunService", run: Run, parent: Run | None) -> tuple[str, str]:
    """Register a succeeded export run's model; records the name and version on its Run row and
    in its MLflow tags. Returns (name, version)."""
    from .runs import PortalError

    client = runs.tracker.client
    export_dir = Path(run.output_dir)
    files = model_files(export_dir) if export_dir.is_dir() else []
    if not (export_dir / "config.json").is_file() or not any(WEIGHT_FILES.match(f["name"]) for f in files):
        raise PortalError(f"the export folder {export_dir} has no model (config.json and weights)")
    name = run.registered_model or f"{run.owner}-{parent.name if parent else run.name}"
    fingerprints = json.loads((parent.dataset_fingerprints if parent else run.dataset_fingerprints) or "[]")
    manifest = {"path": str(export_dir), "files": files, "portal_run_id": run.id,
                "parent_run_id": parent.id if parent else None, "base_model": run.model_name_or_path,
                "finetuning_type": run.finetuning_type, "config_sha256": run.config_sha256}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / MODEL_ARTIFACT
        folder.mkdir()
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        (folder / "config.json").write_bytes((export_dir / "config.json").read_bytes())
        client.log_artifacts(run.mlflow_run_id, str(folder), MODEL_ARTIFACT)
    if _registered(client, name) is None:
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(name, tags={OWNER_TAG: run.owner},
                                           description=f"models merged by the LLaMA Board Portal for {run.owner}")
        except MlflowException:  # made meanwhile: fine if it is this user's
            model = _registered(client, name)
            if model is None or (model.tags or {}).get(OWNER_TAG) != run.owner:
                raise
    tags = {
        "portal.run_id": str(run.id),
        "portal.parent_run_id": str(parent.id) if parent else "",
        "portal.owner": run.owner,
        "portal.config_sha256": run.config_sha256,
        "portal.parent_config_sha256": parent.config_sha256 if parent else "",
        "portal.base_model": run.model_name_or_path,
        "portal.finetuning_type": run.finetuning_type,
        "portal.model_path": str(export_dir),
        "portal.datasets": json.dumps([{k: fp.get(k) for k in ("name", "version", "sha256")} for fp in fingerprints]),
    }
    version = client.create_model_version(name, f"runs:/{run.mlflow_run_id}/{MODEL_ARTIFACT}",
                                          run_id=run.mlflow_run_id, tags=tags,
                                          description=f"run {run.id} ({run.name}): run {parent.id if parent else '?'} "
                                                      f"merged into {export_dir}")
    client.set_tag(run.mlflow_run_id, "portal.registered_model", name)
    client.set_tag(run.mlflow_run_id, "portal.registered_version", str(version.version))
    runs._set(run.id, registered_model=name, registered_version=str(version.version))
    runs.audit(run.owner, "register_model", f"run:{run.id}", f"{name} version {version.version}")
    return name, str(version.version)


def set_alias(runs: "RunService", admin: User, name: str, version: str | int, alias: str) -> None:
    """Point ``alias`` (candidate, production) of a registered model at ``version``: admins only."""
    from .runs import NotFound, PortalError

    if not admin.is_admin:
        runs.audit(admin.username, "denied", f"model:{name}", f"set alias {alias}")
        raise PermissionError("only admins set registry aliases")
    if alias not in ALIASES:
        raise PortalError(f"alias '{alias}' is not one of {', '.join(ALIASES)}")
    client = runs.tracker.client
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, str(version))
    except MlflowException as err:
        if _missing(err):
            raise NotFound(f"registered model '{name}' has no version {version}") from err
        raise
    client.set_registered_model_alias(name, alias, str(version))
    runs.audit(admin.username, "set_alias", f"model:{name}", f"{alias} -> version {version}")


def aliases(runs: "RunService", name: str, version: str) -> list[str]:
    """The aliases pointing at one version (for pages and the CLI); [] when MLflow does not answer."""
    try:
        return list(runs.tracker.client.get_model_version(name, str(version)).aliases or [])
    except Exception:
        return []
