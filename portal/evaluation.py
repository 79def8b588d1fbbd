"""Evaluate and merge a finished run: jobs made from its Run row (decision 0021).

``evaluate`` submits an *eval* run: `llamafactory-cli train` with ``do_predict`` (or ``do_eval``)
and no training, on the parent's model and adapter; ``merge`` submits an *export* run:
`llamafactory-cli export` writing the merged model into the owner's ``models/`` folder. Both go
through ``RunService.submit_args`` like any run (quotas, policy, validation, MLflow run, launcher),
with ``parent_id`` the run they were made from. Every path comes from the parent's Run row, never
from the person asking; only the parent's owner may make them (the files lie in their space).

When such a run succeeds, ``after_success`` (called by ``RunService._finish``) logs the eval
metrics onto both MLflow runs, or registers the merged model (``portal/registry.py``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaboard_ext import compile as lbc

from .models import Run, RunStatus, User
from .storage import check_name

if TYPE_CHECKING:
    from .runs import RunService

log = logging.getLogger(__name__)

ADAPTER_METHODS = ("lora", "oft")  # the run's output folder is an adapter; full/freeze: a whole model
# The parent's keys an eval or export job keeps: what loads and prompts its model the same way
MODEL_KEYS_KEPT = ("model_name_or_path", "model_revision", "template", "finetuning_type", "trust_remote_code",
                   "rope_scaling", "flash_attn", "default_system", "enable_thinking", "tool_format",
                   "image_max_pixels", "image_min_pixels", "video_max_pixels", "video_min_pixels")
EVAL_ONLY_KEPT = ("quantization_bit", "quantization_method", "quantization_type", "double_quantization",
                  "cutoff_len", "bf16", "fp16")  # an adapter cannot be merged into a quantized model
EVAL_STAGES = ("sft", "pt")  # sft: generated answers scored (BLEU/ROUGE); pt: the eval loss
RESULT_FILES = ("all_results.json", "predict_results.json", "eval_results.json")
PREDICTIONS_FILE = "generated_predictions.jsonl"
PARENT_METRIC_PREFIX = "evaluation/"  # on the evaluated run: apart from its training curves
MAX_EVAL_SAMPLES = 100_000
MAX_NEW_TOKENS = 4096
EXPORT_SIZE_GB = 5


@dataclass
class Evaluation:
    """One eval run of a run, and what it measured (empty until it succeeded)."""

    run: Run
    metrics: dict[str, float] = field(default_factory=dict)
    predictions: str | None = None  # the predictions file, relative to the eval run's output folder


def _parent_args(parent: Run) -> dict[str, Any]:
    try:
        return lbc.yaml_to_args(parent.config_yaml) if parent.config_yaml else {}
    except lbc.YamlError:
        return {}


def _model_source(parent: Run) -> dict[str, str]:
    """model_name_or_path (and adapter_name_or_path) of the parent's trained model, from its
    Run row. Raises PortalError when its output is not there."""
    from .runs import PortalError

    output = Path(parent.output_dir) if parent.output_dir else None
    if parent.finetuning_type in ADAPTER_METHODS:
        if output is None or not (output / "adapter_config.json").is_file():
            raise PortalError(f"the adapter of run {parent.id} ({parent.name}) is missing from its output folder "
                              f"({parent.output_dir}): it may have been deleted")
        return {"model_name_or_path": parent.model_name_or_path, "adapter_name_or_path": str(output)}
    if output is None or not (output / "config.json").is_file():
        raise PortalError(f"run {parent.id} ({parent.name}) has no model in its output folder ({parent.output_dir})")
    return {"model_name_or_path": str(output)}


def _mergeable(user: User, parent: Run, verb: str) -> None:
    from .runs import PortalError

    if parent.kind != "train":
        raise PortalError(f"run {parent.id} is an {parent.kind} run: {verb} the training run it was made from "
                          f"(run {parent.parent_id})")
    if parent.status != RunStatus.succeeded:
        raise PortalError(f"run {parent.id} is {parent.status.value}: only a succeeded run can be {verb}d")
    if parent.owner_id != user.id:
        raise PortalError(f"run {parent.id} is {parent.owner}'s: only its owner can {verb} it (its model lies "
                          "in their space); clone it to train it in yours")


def _free_name(runs: "RunService", user: User, stem: str, suffix: str) -> str:
    space, stem = runs.space(user), stem[:90]
    name, number = f"{stem}_{suffix}", 2
    while space.run_dir(name).exists() or (space.models_dir / name).exists():
        name, number = f"{stem}_{suffix}{number}", number + 1
    return name


# ---- evaluate ------------------------------------------------------------------------------
def eval_args(parent: Run, datasets: list[str], *, max_samples: int | None, predict_with_generate: bool,
              max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """The eval job's LLaMA-Factory args, built from the parent's config and Run row."""
    trained = _parent_args(parent)
    args = {key: trained[key] for key in MODEL_KEYS_KEPT + EVAL_ONLY_KEPT if trained.get(key) is not None}
    args.update(_model_source(parent))
    stage = parent.stage or trained.get("stage") or "sft"
    generate = predict_with_generate and stage == "sft"  # LLaMA-Factory generates for SFT only
    args.update({
        "stage": stage, "do_train": False, "do_predict": generate, "do_eval": not generate,
        "predict_with_generate": generate, "eval_dataset": ",".join(datasets),
        "per_device_eval_batch_size": batch_size, "report_to": "mlflow",
    })
    if generate:
        args["max_new_tokens"] = max_new_tokens
    if max_samples:
        args["max_samples"] = max_samples
    return args


def evaluate(runs: "RunService", user: User, run_id: int, datasets: list[str] | None = None,
             max_samples: int | None = None, *, predict_with_generate: bool = True, max_new_tokens: int = 128,
             batch_size: int = 4, name: str | None = None) -> Run:
    from .runs import ConfigRejected, PortalError

    parent = runs.get_run(user, run_id, purpose="evaluate")
    _mergeable(user, parent, "evaluate")
    if parent.stage not in EVAL_STAGES:
        raise PortalError(f"run {parent.id} trained stage '{parent.stage}': evaluation jobs cover "
                          f"{' and '.join(EVAL_STAGES)} runs for now")
    trained = _parent_args(parent)
    if not datasets:  # the parent's own eval set, else its training data
        datasets = str(trained.get("eval_dataset") or trained.get("dataset") or "").split(",")
    datasets = [d.strip() for d in datasets if d and d.strip()]
    problems: dict[str, str] = {}
    if not datasets:
        problems["eval_dataset"] = "choose at least one dataset to evaluate on"
    if max_samples is not None and not 1 <= int(max_samples) <= MAX_EVAL_SAMPLES:
        problems["max_samples"] = f"choose 1 to {MAX_EVAL_SAMPLES:,} samples (or none: the whole dataset)"
    if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS:
        problems["max_new_tokens"] = f"choose 1 to {MAX_NEW_TOKENS} new tokens"
    if not 1 <= int(batch_size) <= 1024:
        problems["per_device_eval_batch_size"] = "choose a batch size of 1 to 1024"
    if problems:
        raise ConfigRejected(problems)
    args = eval_args(parent, datasets, max_samples=max_samples, predict_with_generate=predict_with_generate,
                     max_new_tokens=int(max_new_tokens), batch_size=int(batch_size))
    try:
        name = check_name(name, "run name") if name else _free_name(runs, user, parent.name, "eval")
    except ValueError as err:
        raise ConfigRejected({"name": str(err)}) from err
    run = runs.submit_args(user, args, name=name, source="evaluate", parent=parent, kind="eval")
    runs.audit(user.username, "evaluate", f"run:{parent.id}", f"eval run {run.id} on {', '.join(datasets)}")
    return run


def _read_results(output_dir: Path) -> dict[str, float]:
    """The numbers LLaMA-Factory saved for the eval/predict step (its *_results.json files)."""
    metrics: dict[str, float] = {}
    for file_name in RESULT_FILES:
        try:
            data = json.loads((output_dir / file_name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key, value in data.items() if isinstance(data, dict) else ():
            if (key.startswith(("predict_", "eval_")) and isinstance(value, (int, float))
                    and not isinstance(value, bool) and math.isfinite(value)):
                metrics.setdefault(key, float(value))
    return metrics


def evaluations(runs: "RunService", user: User, run_id: int) -> list[Evaluation]:
    """The eval runs made of a run (newest first) and their metrics, read from their output files."""
    from sqlmodel import select

    parent = runs.get_run(user, run_id)
    with runs.db.session() as s:
        children = list(s.exec(select(Run).where(Run.parent_id == parent.id, Run.kind == "eval")
                               .order_by(Run.id.desc())).all())
    out = []
    for child in children:
        if child.owner_id != user.id and not user.is_admin:
            continue
        item = Evaluation(run=child)
        if child.status == RunStatus.succeeded:
            output = Path(child.output_dir)
            item.metrics = _read_results(output)
            if (output / PREDICTIONS_FILE).is_file():
                item.predictions = PREDICTIONS_FILE
        out.append(item)
    return out


def _log_eval(runs: "RunService", run: Run) -> None:
    from mlflow.entities import Metric

    metrics = _read_results(Path(run.output_dir))
    if not metrics:
        runs._set(run.id, status_reason="succeeded, but it wrote no eval results (all_results.json)")
        return
    now = int(__import__("time").time() * 1000)
    client = runs.tracker.client
    if run.mlflow_run_id:  # the eval run's own: LLaMA-Factory's names
        client.log_batch(run.mlflow_run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    with runs.db.session() as s:
        parent = s.get(Run, run.parent_id) if run.parent_id else None
    if parent is not None and parent.mlflow_run_id:
        # the evaluated run's: under evaluation/, one step per eval run (its portal id), so several
        # evaluations keep their history and never mix into the training curves
        client.log_batch(parent.mlflow_run_id,
                         metrics=[Metric(PARENT_METRIC_PREFIX + k, v, now, run.id) for k, v in metrics.items()])
        runs.tracker.client.set_tag(parent.mlflow_run_id, "portal.last_eval_run_id", str(run.id))
        runs.tracker.client.set_tag(parent.mlflow_run_id, "portal.last_eval_datasets", run.datasets)


# ---- merge ---------------------------------------------------------------------------------
def export_args(parent: Run, export_dir: Path) -> dict[str, Any]:
    """The export job's LLaMA-Factory args: the parent's model (and adapter) merged into export_dir."""
    trained = _parent_args(parent)
    args = {key: trained[key] for key in MODEL_KEYS_KEPT if trained.get(key) is not None}
    args.update(_model_source(parent))
    args.update({"export_dir": str(export_dir), "export_size": EXPORT_SIZE_GB, "export_device": "cpu",
                 "export_legacy_format": False})
    return args


def merge(runs: "RunService", user: User, run_id: int, name: str | None = None) -> Run:
    """Submit an export job of a succeeded run; its model is registered as ``name`` (default
    ``<owner>-<run name>``) once the job succeeds."""
    from . import registry
    from .runs import ConfigRejected

    parent = runs.get_run(user, run_id, purpose="merge")
    _mergeable(user, parent, "merge")
    try:
        model_name = check_name(name, "model name") if name else check_name(f"{user.username}-{parent.name}"[:100],
                                                                           "model name")
    except ValueError as err:
        raise ConfigRejected({"name": str(err)}) from err
    registry.check_can_register(runs.tracker.client, user, model_name)
    run_name = _free_name(runs, user, parent.name, "merged")
    export_dir = runs.space(user).models_dir / run_name
    args = export_args(parent, export_dir)
    # the cluster gives an export job no GPU (export_device: cpu); locally the portal's gpus_per_run
    run = runs.submit_args(user, args, name=run_name, source="merge", parent=parent, kind="export",
                           gpus_per_node=0 if runs.launcher.on_cluster else None)
    runs._set(run.id, registered_model=model_name)
    runs.audit(user.username, "merge", f"run:{parent.id}", f"export run {run.id} -> model {model_name}")
    return runs.get_run(user, run.id)


def after_success(runs: "RunService", run: Run) -> None:
    """What a succeeded eval/export run leaves: never raises (the run's status stands)."""
    try:
        if run.kind == "eval":
            _log_eval(runs, run)
        elif run.kind == "export":
            from . import registry

            with runs.db.session() as s:
                current = s.get(Run, run.id)
                parent = s.get(Run, run.parent_id) if run.parent_id else None
            registry.register(runs, current or run, parent)
    except Exception as err:  # MLflow down, files gone: said on the run, logged for the admin
        log.exception("run %s (%s): could not record its %s results", run.id, run.name, run.kind)
        what = "log its metrics" if run.kind == "eval" else "register its model"
        runs._set(run.id, status_reason=f"succeeded, but the portal could not {what} in MLflow: {err}"[:900])
