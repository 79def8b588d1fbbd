"""The portal's rules for a training config: what a user may ask for, and where it runs.

Applied to every config, from the form, a file or the API, before validation and launch:
paths are rewritten into (or checked against) the user's space, secrets and hub pushes are
refused, tracking goes to MLflow, and ``trust_remote_code`` stays off.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import Catalog
from .config import Settings
from .storage import PathNotAllowed, UserSpace, resolve_inside

# Keys no config may set, with what to do instead.
FORBIDDEN_KEYS: dict[str, str] = {
    "hub_token": "tokens never go in a config; the portal passes credentials to jobs itself",
    "ms_hub_token": "tokens never go in a config; the portal passes credentials to jobs itself",
    "om_hub_token": "tokens never go in a config; the portal passes credentials to jobs itself",
    "swanlab_api_key": "API keys never go in a config",
    "push_to_hub": "runs do not push to a hub; export the run instead",
    "hub_model_id": "runs do not push to a hub; export the run instead",
    "hub_strategy": "runs do not push to a hub; export the run instead",
    "use_swanlab": "runs are tracked in the portal's MLflow; remove use_swanlab",
    "overwrite_output_dir": "each run has its own output folder; a restarted job resumes from its last checkpoint",
    "cache_dir": "the portal chooses cache folders",
    "logging_dir": "the portal chooses log folders",
    "ray_storage_path": "Ray is not used by the portal",
}
# Keys holding paths a user may set, as long as they stay in their space or the shared roots.
PATH_KEYS = ("adapter_name_or_path", "tokenized_path", "media_dir", "resume_from_checkpoint", "export_dir")
DEEPSPEED_FILES = re.compile(r"^ds_z[23](_offload)?_config\.json$")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
REPORT_OK = {None, "", "none", "mlflow"}


@dataclass
class PolicyResult:
    args: dict[str, Any]
    problems: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def deepspeed_dir(settings: Settings) -> Path:
    return settings.shared_root / "deepspeed"


def apply_policy(
    args: dict[str, Any], *, settings: Settings, catalog: Catalog, space: UserSpace, run_dir: Path, gpus: int, cpus: int
) -> PolicyResult:
    out = dict(args)
    problems: dict[str, str] = {}
    notes: list[str] = []
    roots = catalog.readable_roots(space)

    for key, why in FORBIDDEN_KEYS.items():
        if key in out and out[key] not in (None, False, "", "none"):
            problems[key] = f"not allowed: {why}"
    for key in FORBIDDEN_KEYS:
        if out.get(key) in (None, False, "", "none"):
            out.pop(key, None)

    if out.get("trust_remote_code"):
        problems["trust_remote_code"] = (
            "not allowed: model folders may not run their own code here; remove trust_remote_code"
        )
    out["trust_remote_code"] = False

    model = str(out.get("model_name_or_path") or "")
    if model:
        if os.path.isabs(model):
            try:
                resolve_inside(model, roots, "model_name_or_path")
            except PathNotAllowed as err:
                problems["model_name_or_path"] = str(err)
        elif HUB_ID.match(model) and ".." not in model:
            if not settings.allow_hub_models:
                problems["model_name_or_path"] = f"hub models are not allowed here: pick a catalog model instead of '{model}'"
        else:
            problems["model_name_or_path"] = (
                f"'{model}' is neither a catalog model folder nor a hub id (org/name): pick a model from the list"
            )

    for key in PATH_KEYS:
        value = out.get(key)
        if not value:
            continue
        for part in str(value).split(","):
            try:
                resolve_inside(part.strip(), roots, key)
            except PathNotAllowed as err:
                problems[key] = str(err)

    ds = out.get("deepspeed")
    if isinstance(ds, str) and ds:
        name = os.path.basename(ds)
        if DEEPSPEED_FILES.match(name):
            out["deepspeed"] = str(deepspeed_dir(settings) / name)
        else:
            problems["deepspeed"] = "use the DeepSpeed stage choice of the form (or an inline JSON object), not a file path"

    report = out.get("report_to")
    if isinstance(report, list):
        unexpected = [r for r in report if r not in REPORT_OK]
    else:
        unexpected = [] if report in REPORT_OK else [report]
    if unexpected:
        problems["report_to"] = f"runs are tracked in the portal's MLflow only; set report_to to mlflow (not {', '.join(map(str, unexpected))})"
    out["report_to"] = "mlflow"

    if out.get("dataset_dir") not in (None, "", str(space.datasets_dir)) and out.get("dataset_dir") != "data":
        notes.append(f"dataset_dir {out['dataset_dir']} replaced by your data folder {space.datasets_dir}")
    out["dataset_dir"] = str(space.datasets_dir)
    names = [d.strip() for d in str(out.get("dataset") or "").split(",") if d.strip()]
    problems.update(catalog.check_dataset_files(space, names))
    if out.get("eval_dataset"):
        problems.update(catalog.check_dataset_files(space, [d.strip() for d in str(out["eval_dataset"]).split(",")]))

    if not any(out.get(k) for k in ("do_train", "do_eval", "do_predict")):
        problems["do_train"] = "the config would not train anything (LLaMA-Factory exits at once): add do_train: true"

    out["output_dir"] = str(run_dir / "output")
    out["preprocessing_num_workers"] = max(1, cpus)
    if gpus == 0:
        out["use_cpu"] = True  # transformers refuses bf16/fp16 without a GPU unless told to use the CPU
    else:
        out.pop("use_cpu", None)
    return PolicyResult(args=out, problems=problems, notes=notes)
