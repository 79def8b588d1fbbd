"""The portal's rules for a training config: what a user may ask for, and where it runs.

Applied to every config, from the form, a file or the API, before validation and launch:
paths are rewritten into (or checked against) the user's space, secrets and hub pushes are
refused, tracking goes to MLflow, and ``trust_remote_code`` is on only for a catalog model whose
entry an admin marked ``trust_remote_code: true`` (off for everything else).
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
    "hf_hub_token": "tokens never go in a config; the portal passes credentials to jobs itself",
    "export_hub_model_id": "runs do not push to a hub; export the run instead",
    "hub_always_push": "runs do not push to a hub; export the run instead",
    "swanlab_lark_webhook_url": "runs do not call outside services; remove it",
    "swanlab_lark_secret": "secrets never go in a config; runs do not call outside services",
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
}
# Keys that carry credentials: refused whatever the configured policy says.
CREDENTIAL_KEYS = frozenset({"hub_token", "hf_hub_token", "ms_hub_token", "om_hub_token", "swanlab_api_key",
                             "swanlab_lark_webhook_url", "swanlab_lark_secret"})


def forbidden_keys(settings: Settings) -> dict[str, str]:
    """The built-in refusals, minus those the admin lifted, plus the admin's own."""
    keys = {k: v for k, v in FORBIDDEN_KEYS.items() if k not in settings.policy_allowed_keys or k in CREDENTIAL_KEYS}
    keys.update({k: v or "refused by this portal's policy; ask an admin" for k, v in
                 settings.policy_forbidden_keys.items()})
    return keys


# Keys naming models or adapters: a folder in the user's space or the shared roots, or a hub id.
MODEL_KEYS = ("model_name_or_path", "adapter_name_or_path", "ref_model", "ref_model_adapters", "reward_model",
              "reward_model_adapters")
# Keys holding paths a user may set, as long as they stay in their space or the shared roots.
PATH_KEYS = ("tokenized_path", "media_dir", "resume_from_checkpoint", "export_dir", "kt_weight_path",
             "kt_expert_checkpoint_path", "profiler_output_dir", "swanlab_logdir", "new_special_tokens_config",
             "generation_config", "fsdp_config", "accelerator_config", "liger_kernel_config", "adapter_folder",
             "offload_folder", "export_quantization_dataset")
# Of those, the folders a job writes into: only inside the user's own space.
WRITE_KEYS = frozenset({"tokenized_path", "export_dir", "offload_folder", "profiler_output_dir", "swanlab_logdir"})
# Keys the policy sets for `llamafactory-cli train` that `llamafactory-cli export` does not parse
EXPORT_DROPPED_KEYS = ("output_dir", "report_to", "use_cpu", "do_train", "do_eval", "do_predict")
DEEPSPEED_FILES = re.compile(r"^ds_z[23](_offload)?_config\.json$")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
REPORT_OK = {None, "", "none", "mlflow"}


@dataclass
class PolicyResult:
    args: dict[str, Any]
    problems: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _parts(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def _model_problem(key: str, value: str, roots: list[Path], allow_hub: bool, catalog: Catalog) -> str | None:
    entry = catalog.model_entry(value)
    if entry is not None and value == entry.source:
        return None  # the folder or hub id of an admin's catalog entry: approved, wherever it is
    if os.path.isabs(value):
        try:
            resolve_inside(value, roots, key)
        except PathNotAllowed as err:
            return str(err)
        return None
    if HUB_ID.match(value) and ".." not in value:
        return None if allow_hub else f"hub models are not allowed here: pick a catalog model instead of '{value}'"
    return f"'{value}' is neither a folder in your space or the catalog nor a hub id (org/name): pick one from the list"


# Keys naming a full model that LLaMA-Factory loads with the main model's trust_remote_code.
REMOTE_CODE_MODEL_KEYS = ("ref_model", "reward_model")
REMOTE_CODE_REFUSED = "not allowed: only catalog models an admin approved may run their own code"


def _asked(value: Any) -> bool:
    return bool(value) and str(value).strip().lower() not in ("false", "0", "none", "no")


def _remote_code(out: dict[str, Any], catalog: Catalog) -> tuple[bool, dict[str, str]]:
    """Whether the run gets ``trust_remote_code: true``, and the problems when it may not."""
    model = out.get("model_name_or_path")
    entry = catalog.model_entry(model) if isinstance(model, str) else None
    approved = entry is not None and entry.trust_remote_code and model == entry.source
    problems: dict[str, str] = {}
    if _asked(out.get("trust_remote_code")) and not approved:
        if entry is None:
            problems["trust_remote_code"] = (f"{REMOTE_CODE_REFUSED}, and '{model}' is not a catalog model: "
                                             "remove trust_remote_code or pick an approved catalog model")
        else:
            problems["trust_remote_code"] = (f"{REMOTE_CODE_REFUSED}, and catalog model '{entry.name}' is not "
                                             "approved for it: remove trust_remote_code or ask an admin")
    if not approved:
        return False, problems
    for key in REMOTE_CODE_MODEL_KEYS:
        if key == "reward_model" and out.get("reward_model_type", "lora") != "full":
            continue  # a LoRA reward adapter or a reward API loads no model code
        for part in _parts(out.get(key)):
            other = catalog.model_entry(part)
            if other is None or not other.trust_remote_code or part != other.source:
                problems[key] = (f"{key} '{part}' would run with trust_remote_code on (approved for catalog model "
                                 f"'{entry.name}' only): pick a catalog model approved for its own code, or leave it out")
                break
    if out.get("model_revision") not in (None, "", "main"):
        problems["model_revision"] = (f"catalog model '{entry.name}' runs its own code as approved by an admin (the "
                                      "main revision): remove model_revision")
    return True, problems


def deepspeed_dir(settings: Settings) -> Path:
    return settings.shared_root / "deepspeed"


def apply_policy(
    args: dict[str, Any], *, settings: Settings, catalog: Catalog, space: UserSpace, run_dir: Path, gpus: int, cpus: int,
    kind: str = "train",
) -> PolicyResult:
    """``kind``: "train" and "eval" configs run `llamafactory-cli train`; an "export" config (the
    portal's own merge job, `llamafactory-cli export`) trains nothing by design."""
    out = dict(args)
    problems: dict[str, str] = {}
    notes: list[str] = []
    roots = catalog.readable_roots(space)

    refused = forbidden_keys(settings)
    for key, why in refused.items():
        if key in out and out[key] not in (None, False, "", "none"):
            problems[key] = f"not allowed: {why}"
    for key in refused:
        if out.get(key) in (None, False, "", "none"):
            out.pop(key, None)

    # A catalog model named by its name, or by another path to its folder (a link in the user's
    # space, which could be re-pointed before the job starts): the job gets the entry's own folder or hub id.
    for key in ("model_name_or_path", "ref_model", "reward_model"):
        value = out.get(key)
        entry = catalog.model_entry(value) if isinstance(value, str) else None
        if entry is not None and value != entry.source:
            out[key] = entry.source
            notes.append(f"{key}: catalog model '{entry.name}' is {entry.source}")

    out["trust_remote_code"], remote_code_problems = _remote_code(out, catalog)
    problems.update(remote_code_problems)

    for key in MODEL_KEYS:
        for part in _parts(out.get(key)):
            problem = _model_problem(key, part, roots, settings.allow_hub_models, catalog)
            if problem:
                problems[key] = problem
                break

    for key in PATH_KEYS:
        value = out.get(key)
        if not value or isinstance(value, dict):
            continue  # inline JSON configs name no file
        for part in _parts(value):
            try:
                # folders a job writes to stay in the user's space: shared/ is read-only for users
                resolve_inside(part, [space.root] if key in WRITE_KEYS else roots, key)
            except PathNotAllowed as err:
                problems[key] = str(err)
                break

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

    if kind != "export" and not any(out.get(k) for k in ("do_train", "do_eval", "do_predict")):
        problems["do_train"] = "the config would not train anything (LLaMA-Factory exits at once): add do_train: true"

    out["output_dir"] = str(run_dir / "output")
    out["preprocessing_num_workers"] = max(1, cpus)
    if gpus == 0:
        out["use_cpu"] = True  # transformers refuses bf16/fp16 without a GPU unless told to use the CPU
    else:
        out.pop("use_cpu", None)
    return PolicyResult(args=out, problems=problems, notes=notes)
