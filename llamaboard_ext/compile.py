"""Form values <-> LLaMA-Factory args dict <-> YAML.

Form values are a plain dict keyed by LLaMA Board's element ids (``top.model_path``,
``train.learning_rate`` ...). The args dict is built by LLaMA Board's own
``Runner._parse_train_args`` (so "what the form means" stays LLaMA-Factory's definition), with
two portal rules on top: extra args win over derived values, and int-typed fields hold ints.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from llamafactory.extras.constants import (
    METHODS,
    MULTIMODAL_SUPPORTED_MODELS,
    PEFT_METHODS,
    SUPPORTED_MODELS,
    TRAINING_STAGES,
    DownloadSource,
)
from llamafactory.webui.common import _clean_cmd
from llamafactory.webui.runner import Runner

from .arguments import KNOWN_KEYS, coerce_types

STAGE_NAMES = {code: name for name, code in TRAINING_STAGES.items()}  # "sft" -> "Supervised Fine-Tuning"
CUSTOM_MODEL = "Custom"


class FormError(ValueError):
    """Bad form input; ``problems`` maps a form field id to what is wrong and how to fix it."""

    def __init__(self, problems: dict[str, str]):
        self.problems = problems
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in problems.items()))


class _IdManager:
    """Stands in for LLaMA Board's Manager: element ids are their own keys."""

    @staticmethod
    def get_elem_by_id(elem_id: str) -> str:
        return elem_id


class _IdRunner:
    manager = _IdManager()


def _num_problem(value: Any, kind: type, label: str, *, minimum: float | None = None) -> str | None:
    example = {"the learning rate": "5e-5", "the number of epochs": "3.0", "the max gradient norm": "1.0"}.get(label, "1000")
    try:
        number = kind(str(value).strip())
    except (TypeError, ValueError):
        return f"'{value}' is not a {'number' if kind is float else 'whole number'} (write {label} like {example})"
    if not math.isfinite(number):
        return f"'{value}' is not a finite number (write {label} like {example})"
    if minimum is not None and number < minimum:
        return f"{label} must be at least {minimum}, got {value}"
    return None


def check_form(values: dict[str, Any]) -> dict[str, str]:
    """The checks of LLaMA Board's ``Runner._initialize``, stricter and per field."""
    problems: dict[str, str] = {}
    if not values.get("top.model_path"):
        problems["top.model_path"] = "no model: pick a model from the list or type the path of one"
    if not values.get("train.dataset"):
        problems["train.dataset"] = "no dataset: pick at least one dataset"
    if not str(values.get("train.output_dir") or "").strip():
        problems["train.output_dir"] = "no run name: type a name for the output (e.g. train_my_first_run)"
    stage = values.get("train.training_stage")
    if stage not in TRAINING_STAGES:
        problems["train.training_stage"] = f"unknown stage '{stage}': choose one of {', '.join(TRAINING_STAGES)}"
    if values.get("top.finetuning_type") not in METHODS:
        problems["top.finetuning_type"] = f"unknown method: choose one of {', '.join(METHODS)}"
    for key, kind, label, minimum in (
        ("train.learning_rate", float, "the learning rate", 0.0),
        ("train.num_train_epochs", float, "the number of epochs", 0.0),
        ("train.max_grad_norm", float, "the max gradient norm", 0.0),
        ("train.max_samples", int, "max samples", 1),
    ):
        msg = _num_problem(values.get(key), kind, label, minimum=minimum)
        if msg:
            problems[key] = msg
    raw_extra = values.get("train.extra_args") or "{}"
    try:
        extra = json.loads(raw_extra)
        if not isinstance(extra, dict):
            problems["train.extra_args"] = 'extra args must be a JSON object, e.g. {"optim": "adamw_torch"}'
    except json.JSONDecodeError as err:
        problems["train.extra_args"] = f"extra args are not valid JSON ({err.msg} at column {err.colno}); write a JSON object, e.g. {{\"optim\": \"adamw_torch\"}}"
    if TRAINING_STAGES.get(stage) == "ppo" and not values.get("train.reward_model"):
        problems["train.reward_model"] = "PPO needs a reward model: pick one in the RLHF section"
    return problems


def form_to_args(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Form values (missing ones taken from ``defaults``) -> LLaMA-Factory args dict."""
    merged = {**defaults, **{k: v for k, v in values.items() if v is not None or k not in defaults}}
    problems = check_form(merged)
    if problems:
        raise FormError(problems)
    merged["train.learning_rate"] = str(merged["train.learning_rate"]).strip()
    merged["top.model_name"] = merged.get("top.model_name") or CUSTOM_MODEL  # a typed path needs no list entry
    peft = merged.get("top.finetuning_type") in PEFT_METHODS
    for key in ("top.checkpoint_path", "train.reward_model"):  # LLaMA Board: a list for PEFT, else one path
        value = merged.get(key)
        if peft and isinstance(value, str):
            merged[key] = [value] if value else []
        elif not peft and isinstance(value, (list, tuple)):
            merged[key] = value[0] if len(value) == 1 else ",".join(value) if value else None
    args = Runner._parse_train_args(_IdRunner(), merged)
    args["cache_dir"] = None  # LLaMA Board reads it from a process-wide file; the portal decides caches
    args["trust_remote_code"] = False  # LLaMA Board hard-codes True; only extra args can ask (and policy decides)
    extra = json.loads(merged.get("train.extra_args") or "{}")
    args.update(extra)  # extra args win, also over derived values
    _drop_conflicting_val_size(args, extra)
    return coerce_types(clean_args(args))


def _drop_conflicting_val_size(args: dict[str, Any], extra: dict[str, Any]) -> None:
    """The form holds out a share of the data by default (val_size, decision 0023). Extra args
    that name an ``eval_dataset`` evaluate on that instead, and ``streaming`` cannot split by a
    share: LLaMA-Factory refuses val_size with either, so the default steps aside (a val_size
    written in the extra args stays, and LLaMA-Factory's message names it)."""
    if "val_size" in extra or not args.get("val_size"):
        return
    if args.get("eval_dataset"):
        args.pop("val_size")
    elif args.get("streaming") and float(args["val_size"]) < 1:
        for key in ("val_size", "eval_strategy", "eval_steps", "per_device_eval_batch_size"):
            if key not in extra:
                args.pop(key, None)


def clean_args(args: dict[str, Any]) -> dict[str, Any]:
    """Drop unset values the way LLaMA Board's ``save_cmd`` does before writing YAML."""
    return _clean_cmd(dict(args))


def args_to_yaml(args: dict[str, Any], header: str | None = None) -> str:
    body = yaml.safe_dump(clean_args(args), sort_keys=False, allow_unicode=True, default_flow_style=False)
    if header:
        body = "".join(f"# {line}\n" for line in header.splitlines()) + body
    return body


class YamlError(ValueError):
    pass


def yaml_to_args(text: str | bytes) -> dict[str, Any]:
    """Parse a config file: a mapping of LLaMA-Factory keys. Aliases are refused (YAML bombs)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise YamlError(f"the file is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    try:
        for token in yaml.scan(text):
            if isinstance(token, (yaml.AliasToken, yaml.AnchorToken)):
                raise YamlError("YAML anchors and aliases (& and *) are not accepted; write the values out")
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise YamlError(f"invalid YAML{where}: {getattr(err, 'problem', None) or err}") from err
    if data is None:
        raise YamlError("the file is empty; a config is a YAML mapping like 'stage: sft'")
    if not isinstance(data, dict):
        raise YamlError("a config must be a YAML mapping of keys to values, like 'stage: sft'")
    bad = [str(k) for k in data if not isinstance(k, str)]
    if bad:
        raise YamlError(f"keys must be text: {', '.join(bad)}")
    return coerce_types(data)  # e.g. learning_rate: 5e-4, which YAML 1.1 reads as text


# ---------------------------------------------------------------------------------------
# args -> form values (the inverse of Runner._parse_train_args)
# ---------------------------------------------------------------------------------------

# Keys that map one to one between the args dict and a form field.
_DIRECT = {
    "finetuning_type": "top.finetuning_type",
    "template": "top.template",
    "cutoff_len": "train.cutoff_len",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "lr_scheduler_type": "train.lr_scheduler_type",
    "logging_steps": "train.logging_steps",
    "save_steps": "train.save_steps",
    "warmup_steps": "train.warmup_steps",
    "neat_packing": "train.neat_packing",
    "train_on_prompt": "train.train_on_prompt",
    "mask_history": "train.mask_history",
    "resize_vocab": "train.resize_vocab",
    "use_llama_pro": "train.use_llama_pro",
    "enable_thinking": "train.enable_thinking",
    "report_to": "train.report_to",
    "use_galore": "train.use_galore",
    "use_apollo": "train.use_apollo",
    "use_badam": "train.use_badam",
    "use_swanlab": "train.use_swanlab",
    "quantization_method": "top.quantization_method",
}
_STR_NUMBERS = {  # textboxes holding numbers
    "learning_rate": "train.learning_rate",
    "num_train_epochs": "train.num_train_epochs",
    "max_grad_norm": "train.max_grad_norm",
    "max_samples": "train.max_samples",
}
_SECTION = {  # keys LLaMA Board sets only in one section of the form
    "freeze": ["freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"],
    "lora": ["lora_rank", "lora_alpha", "lora_dropout", "loraplus_lr_ratio", "create_new_adapter", "use_rslora",
             "use_dora", "lora_target", "additional_target"],
    "pref": ["pref_beta", "pref_ftx", "pref_loss"],
    "ppo": ["ppo_score_norm", "ppo_whiten_rewards"],
    "galore": ["galore_rank", "galore_update_interval", "galore_scale", "galore_target"],
    "apollo": ["apollo_rank", "apollo_update_interval", "apollo_scale", "apollo_target"],
    "badam": ["badam_mode", "badam_switch_mode", "badam_switch_interval", "badam_update_ratio"],
    "swanlab": ["swanlab_project", "swanlab_run_name", "swanlab_workspace", "swanlab_api_key", "swanlab_mode"],
    "mm": ["freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model"],
}
_PIXELS = ["image_max_pixels", "image_min_pixels", "video_max_pixels", "video_min_pixels"]
# Values _parse_train_args always writes; equal ones are implied by the form.
_CONSTANTS = {"do_train": True, "plot_loss": True, "ddp_timeout": 180000000, "include_num_input_tokens_seen": True}


@dataclass
class FormLoad:
    values: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _fmt_number(value: Any) -> str:
    return str(value)


def model_name_for_path(path: str, catalog: dict[str, str] | None = None) -> str:
    """The model list entry for a path: the portal catalog first, then LLaMA-Factory's list."""
    for name, model_path in (catalog or {}).items():
        if model_path == path:
            return name
    for name, sources in SUPPORTED_MODELS.items():
        if sources.get(DownloadSource.DEFAULT) == path:
            return name
    return CUSTOM_MODEL


def args_to_form(args: dict[str, Any], catalog: dict[str, str] | None = None) -> FormLoad:
    """LLaMA-Factory args -> form values. Keys the form cannot show go into extra args;
    keys LLaMA-Factory does not know are named in a warning (and kept, so nothing is lost)."""
    rest = dict(args)
    values: dict[str, Any] = {}
    warnings: list[str] = []

    def take(key: str, default: Any = None) -> Any:
        return rest.pop(key, default)

    stage = take("stage", "sft")
    values["train.training_stage"] = STAGE_NAMES.get(stage, stage)
    model_path = take("model_name_or_path", "")
    values["top.model_path"] = model_path
    values["top.model_name"] = model_name_for_path(model_path, catalog)
    for key, elem in _DIRECT.items():
        if key in rest:
            values[elem] = take(key)
    for key, elem in _STR_NUMBERS.items():
        if key in rest:
            values[elem] = _fmt_number(take(key))
    rope = take("rope_scaling")
    values["top.rope_scaling"] = rope or "none"
    flash_attn = take("flash_attn", "auto")
    unsloth, liger = take("use_unsloth", False), take("enable_liger_kernel", False)
    values["top.booster"] = "unsloth" if unsloth else "liger_kernel" if liger else "flashattn2" if flash_attn == "fa2" else "auto"
    if flash_attn not in ("auto", "fa2") or (flash_attn == "fa2" and (unsloth or liger)):
        rest["flash_attn"] = flash_attn  # the booster list holds one choice; extra args keep the other
    take("dataset_dir")  # the portal chooses the dataset folder
    dataset = take("dataset", "")
    names = dataset if isinstance(dataset, (list, tuple)) else str(dataset).split(",")
    values["train.dataset"] = [str(d).strip() for d in names if str(d).strip()]
    neftune = take("neftune_noise_alpha")
    values["train.neftune_alpha"] = neftune or 0
    packing = take("packing", False)
    values["train.packing"] = bool(packing) and not values.get("train.neat_packing", False)
    output_dir = take("output_dir", "")
    if output_dir:
        values["train.output_dir"] = os.path.basename(os.path.normpath(str(output_dir)))
    fp16, bf16, pure_bf16 = take("fp16", False), take("bf16", False), take("pure_bf16", False)
    values["train.compute_type"] = "pure_bf16" if pure_bf16 else "bf16" if bf16 else "fp16" if fp16 else "fp32"
    take("preprocessing_num_workers")
    take("cache_dir")
    take("trust_remote_code")  # decided by the portal's policy, never by the file

    if "quantization_bit" in rest:
        values["top.quantization_bit"] = str(take("quantization_bit"))
        if rest.get("double_quantization", True) is True:
            take("double_quantization")  # what LLaMA Board derives; false stays in extra args
    finetuning_type = values.get("top.finetuning_type", "lora")
    adapters = take("adapter_name_or_path")
    if adapters:
        values["top.checkpoint_path"] = [a for a in str(adapters).split(",") if a] if finetuning_type in PEFT_METHODS else adapters

    sections = ["freeze", "galore", "apollo", "badam", "swanlab"]
    if finetuning_type == "lora":
        sections.append("lora")
        values["train.use_pissa"] = bool(take("pissa_init", False))
        take("pissa_convert")
    if stage in ("dpo", "kto"):
        sections.append("pref")
    if stage == "ppo":
        sections.append("ppo")
        reward = take("reward_model")
        if reward:
            values["train.reward_model"] = [r for r in str(reward).split(",") if r] if finetuning_type in PEFT_METHODS else reward
        derived = {"reward_model_type": "lora" if finetuning_type == "lora" else "full", "top_k": 0, "top_p": 0.9}
        for key, value in derived.items():
            if rest.get(key, value) == value:
                take(key)  # other values stay in extra args, which win
    if values["top.model_name"] in MULTIMODAL_SUPPORTED_MODELS:
        sections.append("mm")
        for key in _PIXELS:
            if key in rest:
                values[f"train.{key}"] = str(take(key))
    for section in sections:
        for key in _SECTION[section]:
            if key in rest:
                value = take(key)
                values[f"train.{key}"] = "" if value is None else value
    if finetuning_type == "lora" and values.get("train.use_llama_pro") and "freeze_trainable_layers" in rest:
        values["train.freeze_trainable_layers"] = take("freeze_trainable_layers")

    if "val_size" not in rest and stage != "ppo":
        values["train.val_size"] = 0  # the file holds out nothing: not the form's default (0.1)
    if "val_size" in rest and stage != "ppo":
        values["train.val_size"] = take("val_size")
        if rest.get("eval_strategy") == "steps":
            take("eval_strategy")
        if rest.get("eval_steps") == args.get("save_steps"):
            take("eval_steps")
        if rest.get("per_device_eval_batch_size") == args.get("per_device_train_batch_size"):
            take("per_device_eval_batch_size")
    deepspeed = take("deepspeed")
    if deepspeed:
        name = os.path.basename(str(deepspeed))
        if re.match(r"^ds_z[23](_offload)?_config\.json$", name):
            values["train.ds_stage"] = name[4]
            values["train.ds_offload"] = "offload" in name
        else:
            rest["deepspeed"] = deepspeed
    for key, constant in _CONSTANTS.items():
        if rest.get(key) == constant:
            take(key)

    unknown = [key for key in rest if key not in KNOWN_KEYS]
    if unknown:
        warnings.append(
            "not LLaMA-Factory arguments (kept in extra args; fix or remove them before submitting): "
            + ", ".join(sorted(unknown))
        )
    values["train.extra_args"] = json.dumps(rest, ensure_ascii=False, sort_keys=True) if rest else "{}"
    return FormLoad(values=values, warnings=warnings)
