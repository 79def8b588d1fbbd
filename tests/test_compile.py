"""Form values <-> LLaMA-Factory args <-> YAML (llamaboard_ext.compile), and validate_args.

No mocks: the form defaults are read from LLaMA Board's real components, the args are built by
LLaMA Board's own ``Runner._parse_train_args`` and checked against LLaMA-Factory's dataclasses,
and ``validate_args`` runs LLaMA-Factory's parser on a tiny local model and dataset (no hub).
"""

from __future__ import annotations

import json

import pytest
from llamafactory.extras.constants import METHODS, PEFT_METHODS, TRAINING_STAGES

from llamaboard_ext.arguments import KNOWN_KEYS, type_problems
from llamaboard_ext.compile import (
    FormError,
    YamlError,
    args_to_form,
    args_to_yaml,
    check_form,
    form_to_args,
    yaml_to_args,
)
from llamaboard_ext.form import form_defaults
from llamaboard_ext.validate import validate_args
from portal.demo import DEMO_DATASET_NAME, DEMO_TEMPLATE, make_demo_dataset, make_tiny_model

MODEL_PATH = "/models/tiny-llama"
REWARD = "/some/abs/adapter"
STAGE_CASES = [(name, method) for name in TRAINING_STAGES for method in METHODS]
STAGE_IDS = [f"{TRAINING_STAGES[name]}-{method}" for name, method in STAGE_CASES]


@pytest.fixture(scope="module")
def defaults() -> dict:
    return form_defaults()  # builds LLaMA Board's form once (~10 s); lru_cached after that


def form_values(stage: str = "Supervised Fine-Tuning", method: str = "lora", **overrides) -> dict:
    """What a user fills in; everything else comes from the form defaults."""
    values = {
        "top.model_name": "Custom",
        "top.model_path": MODEL_PATH,
        "train.dataset": [DEMO_DATASET_NAME],
        "train.output_dir": "train_test",
        "train.training_stage": stage,
        "top.finetuning_type": method,
    }
    if TRAINING_STAGES[stage] == "ppo":
        # LLaMA Board's reward model dropdown is multi-select for PEFT methods, single otherwise
        values["train.reward_model"] = [REWARD] if method in PEFT_METHODS else REWARD
    values.update(overrides)
    return values


def round_trip(args: dict, defaults: dict) -> tuple[str, str, list[str]]:
    text = args_to_yaml(args)
    load = args_to_form(yaml_to_args(text))
    again = args_to_yaml(form_to_args(load.values, defaults))
    return text, again, load.warnings


# ---------------------------------------------------------------------------------------
# 1. every stage x every method compiles to the right args
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "method"), STAGE_CASES, ids=STAGE_IDS)
def test_form_to_args_every_stage_and_method(defaults, stage, method):
    code = TRAINING_STAGES[stage]
    args = form_to_args(form_values(stage, method), defaults)

    assert args["stage"] == code
    assert args["finetuning_type"] == method
    assert args["do_train"] is True
    assert args["model_name_or_path"] == MODEL_PATH
    assert args["dataset"] == DEMO_DATASET_NAME
    assert args["output_dir"].endswith(f"{method}/train_test")
    assert args["learning_rate"] == pytest.approx(5e-5) and isinstance(args["learning_rate"], float)
    assert args["num_train_epochs"] == 3.0
    assert args["max_samples"] == 100000 and isinstance(args["max_samples"], int)
    assert args["optim"] == "adamw_torch"  # the form's default extra args
    # LLaMA Board hard-codes trust_remote_code=True; the portal never lets the form turn it on
    assert args.get("trust_remote_code", False) is False
    assert "cache_dir" not in args

    if method == "lora":
        assert args["lora_rank"] == defaults["train.lora_rank"] == 8
        assert args["lora_alpha"] == 16 and args["lora_target"] == "all"
    else:
        assert not any(key.startswith("lora_") for key in args)
    if method == "freeze":
        assert args["freeze_trainable_layers"] == defaults["train.freeze_trainable_layers"] == 2
        assert args["freeze_trainable_modules"] == "all"
    else:
        assert "freeze_trainable_layers" not in args and "freeze_trainable_modules" not in args

    if code in ("dpo", "kto"):
        assert args["pref_beta"] == pytest.approx(0.1)
        assert args["pref_loss"] == "sigmoid"
    else:
        assert not any(key.startswith("pref_") for key in args)

    if code == "ppo":
        assert args["reward_model"] == REWARD
        assert args["reward_model_type"] == ("lora" if method == "lora" else "full")
        assert args["top_k"] == 0 and args["top_p"] == pytest.approx(0.9)
    else:
        assert "reward_model" not in args and "reward_model_type" not in args

    assert type_problems(args) == {}
    assert set(args) <= KNOWN_KEYS


def test_extra_args_win_over_derived_values_and_ints_stay_ints(defaults):
    extra = {"lora_rank": 32, "learning_rate": 1e-4, "trust_remote_code": True, "seed": 7}
    values = form_values(**{"train.extra_args": json.dumps(extra), "train.lora_alpha": 64.0, "train.cutoff_len": 1024.0})
    args = form_to_args(values, defaults)
    assert args["lora_rank"] == 32  # extra args beat the form's lora section (8)
    assert args["learning_rate"] == 1e-4  # ... and the learning rate box (5e-5)
    assert args["trust_remote_code"] is True  # only extra args can ask for it
    assert args["seed"] == 7
    # sliders send floats; int fields hold ints in the args and the YAML
    assert args["lora_alpha"] == 64 and type(args["lora_alpha"]) is int
    assert args["cutoff_len"] == 1024 and type(args["cutoff_len"]) is int
    assert "lora_alpha: 64\n" in args_to_yaml(args)
    assert type_problems(args) == {}


def test_form_with_many_settings_compiles(defaults):
    values = form_values(**{
        "top.checkpoint_path": ["/abs/ckpt1", "/abs/ckpt2"],
        "top.quantization_bit": "8",
        "top.rope_scaling": "linear",
        "top.booster": "liger_kernel",
        "train.learning_rate": " 2e-4 ",
        "train.compute_type": "fp16",
        "train.val_size": 0.2,
        "train.ds_stage": "2",
        "train.neftune_alpha": 5,
        "train.packing": True,
        "train.use_galore": True,
        "train.lora_target": "q_proj,v_proj",
    })
    args = form_to_args(values, defaults)
    assert args["adapter_name_or_path"] == "/abs/ckpt1,/abs/ckpt2"
    assert args["quantization_bit"] == 8 and args["quantization_method"] == "bnb"
    assert args["rope_scaling"] == "linear"
    assert args["enable_liger_kernel"] is True and args["flash_attn"] == "auto"
    assert args["learning_rate"] == pytest.approx(2e-4)
    assert args["fp16"] is True and "bf16" not in args
    assert (args["val_size"], args["eval_strategy"], args["eval_steps"]) == (0.2, "steps", args["save_steps"])
    assert args["deepspeed"].endswith("ds_z2_config.json")
    assert args["neftune_noise_alpha"] == 5 and args["packing"] is True
    assert args["galore_rank"] == 16 and args["galore_target"] == "all"
    assert args["lora_target"] == "q_proj,v_proj"
    assert type_problems(args) == {}


# ---------------------------------------------------------------------------------------
# 2. round trips: args -> YAML -> args -> form -> args -> YAML
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "method"), STAGE_CASES, ids=STAGE_IDS)
def test_round_trip_every_stage_and_method(defaults, stage, method):
    args = form_to_args(form_values(stage, method), defaults)
    text, again, warnings = round_trip(args, defaults)
    assert again == text
    assert warnings == []
    assert f"stage: {TRAINING_STAGES[stage]}\n" in text
    assert f"finetuning_type: {method}\n" in text


def test_round_trip_form_values(defaults):
    """Loading the YAML of a busy form shows the same choices in the form."""
    values = form_values(**{
        "top.checkpoint_path": ["/abs/ckpt1"],
        "top.quantization_bit": "4",
        "top.booster": "flashattn2",
        "train.learning_rate": "2e-4",
        "train.num_train_epochs": "1.5",
        "train.compute_type": "pure_bf16",
        "train.val_size": 0.1,
        "train.ds_stage": "3",
        "train.ds_offload": True,
        "train.lora_rank": 16,
        "train.use_rslora": True,
        "train.extra_args": '{"optim": "adamw_torch", "seed": 3}',
    })
    args = form_to_args(values, defaults)
    text, again, warnings = round_trip(args, defaults)
    assert again == text and warnings == []
    loaded = args_to_form(yaml_to_args(text)).values
    assert loaded["top.checkpoint_path"] == ["/abs/ckpt1"]
    assert loaded["top.quantization_bit"] == "4"
    assert loaded["top.booster"] == "flashattn2"
    assert float(loaded["train.learning_rate"]) == pytest.approx(2e-4)
    assert float(loaded["train.num_train_epochs"]) == 1.5
    assert loaded["train.compute_type"] == "pure_bf16"
    assert loaded["train.val_size"] == 0.1
    assert (loaded["train.ds_stage"], loaded["train.ds_offload"]) == ("3", True)
    assert loaded["train.lora_rank"] == 16 and loaded["train.use_rslora"] is True
    assert loaded["train.output_dir"] == "train_test"
    assert json.loads(loaded["train.extra_args"]) == {"optim": "adamw_torch", "seed": 3}


def test_round_trip_extra_arg_overriding_a_form_field_keeps_its_value(defaults):
    values = form_values(**{"train.extra_args": '{"lora_alpha": 128}'})
    args = form_to_args(values, defaults)
    assert args["lora_alpha"] == 128
    again = form_to_args(args_to_form(yaml_to_args(args_to_yaml(args))).values, defaults)
    assert again == args  # same keys and values (the key order may differ)


HAND_WRITTEN = """\
### written by hand, with keys the form has no field for
stage: sft
do_train: true
model_name_or_path: /models/tiny-llama
finetuning_type: lora
template: default
flash_attn: fa2
dataset: demo_alpaca,other_set
cutoff_len: 1024
learning_rate: 0.0001
num_train_epochs: 2.0
max_samples: 500
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
lr_scheduler_type: cosine
max_grad_norm: 1.0
logging_steps: 5
save_steps: 50
warmup_steps: 0
packing: false
enable_thinking: true
report_to: none
output_dir: saves/Custom/lora/my_run
bf16: true
quantization_bit: 4
quantization_method: bnb
double_quantization: true
lora_rank: 16
lora_alpha: 32
lora_dropout: 0.05
lora_target: all
val_size: 0.1
eval_strategy: steps
eval_steps: 50
per_device_eval_batch_size: 4
deepspeed: /opt/presets/ds_z3_offload_config.json
seed: 7
optim: adamw_torch
"""


def test_hand_written_yaml_round_trips(defaults):
    original = yaml_to_args(HAND_WRITTEN)
    load = args_to_form(original)
    assert load.warnings == []
    values = load.values
    assert json.loads(values["train.extra_args"]) == {"optim": "adamw_torch", "seed": 7}
    assert values["top.booster"] == "flashattn2"
    assert values["top.quantization_bit"] == "4"
    assert values["train.val_size"] == 0.1
    assert (values["train.ds_stage"], values["train.ds_offload"]) == ("3", True)
    assert values["train.dataset"] == ["demo_alpaca", "other_set"]
    assert values["train.output_dir"] == "my_run"

    args = form_to_args(values, defaults)
    assert type_problems(args) == {}
    for key, value in original.items():
        if key == "deepspeed":  # the portal's copy of the same LLaMA Board preset
            assert args[key].endswith("/ds_z3_offload_config.json")
        else:
            assert args.get(key) == value, key
    # what the form adds is only what LLaMA Board always writes
    assert set(args) - set(original) <= {"preprocessing_num_workers", "dataset_dir", "plot_loss", "ddp_timeout",
                                         "include_num_input_tokens_seen"}
    # and from there on the text is stable
    text, again, warnings = round_trip(args, defaults)
    assert again == text and warnings == []


def test_unknown_keys_warn_and_are_kept(defaults):
    original = {**yaml_to_args(HAND_WRITTEN), "learning_rat": 0.1, "zz_typo": "x"}
    load = args_to_form(original)
    assert len(load.warnings) == 1
    assert "learning_rat" in load.warnings[0] and "zz_typo" in load.warnings[0]
    assert "seed" not in load.warnings[0] and "optim" not in load.warnings[0]  # known keys are not named
    extra = json.loads(load.values["train.extra_args"])
    assert extra["learning_rat"] == 0.1 and extra["zz_typo"] == "x"
    args = form_to_args(load.values, defaults)
    assert args["learning_rat"] == 0.1  # nothing lost: it reaches the args, where validation names it
    assert "learning_rat" in type_problems(args)


def test_trust_remote_code_in_a_file_is_not_taken_into_the_form(defaults):
    original = {**yaml_to_args(HAND_WRITTEN), "trust_remote_code": True, "cache_dir": "/somewhere"}
    values = args_to_form(original).values
    assert "trust_remote_code" not in json.loads(values["train.extra_args"])
    args = form_to_args(values, defaults)
    assert args.get("trust_remote_code", False) is False
    assert "cache_dir" not in args


def test_args_to_yaml_header_and_cleaning():
    text = args_to_yaml({"stage": "sft", "rope_scaling": None, "use_dora": False, "packing": False, "template": ""},
                        header="line one\nline two")
    assert text == "# line one\n# line two\nstage: sft\npacking: false\n"
    assert yaml_to_args(text) == {"stage": "sft", "packing": False}


# ---------------------------------------------------------------------------------------
# 3. bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("top.model_path", "", "no model"),
    ("train.dataset", [], "no dataset"),
    ("train.learning_rate", "abc", "'abc' is not a number"),
    ("train.num_train_epochs", "-1", "at least 0"),
    ("train.max_samples", "1.5", "'1.5' is not a whole number"),
    ("train.max_samples", "0", "at least 1"),
    ("train.max_grad_norm", "x", "'x' is not a number"),
    ("train.output_dir", "  ", "no run name"),
    ("train.training_stage", "Unknown stage", "unknown stage"),
    ("top.finetuning_type", "qlora", "unknown method"),
    ("train.extra_args", "{optim: adamw}", "not valid JSON"),
    ("train.extra_args", '["optim", "adamw_torch"]', "must be a JSON object"),
    ("train.extra_args", "null", "must be a JSON object"),
], ids=lambda v: str(v)[:24])
def test_bad_form_field_is_named(defaults, field, value, expected):
    values = form_values(**{field: value})
    problems = check_form({**defaults, **values})
    assert list(problems) == [field]
    assert expected in problems[field]
    with pytest.raises(FormError) as info:
        form_to_args(values, defaults)
    assert info.value.problems == problems
    assert field in str(info.value)


@pytest.mark.parametrize("method", METHODS)
def test_ppo_without_reward_model(defaults, method):
    values = form_values("PPO", method)
    del values["train.reward_model"]  # the default: nothing picked
    with pytest.raises(FormError) as info:
        form_to_args(values, defaults)
    assert list(info.value.problems) == ["train.reward_model"]
    assert "reward model" in info.value.problems["train.reward_model"]


def test_several_problems_reported_together(defaults):
    values = form_values(**{"top.model_path": None, "train.learning_rate": "fast", "train.extra_args": "[]"})
    with pytest.raises(FormError) as info:
        form_to_args(values, defaults)
    assert set(info.value.problems) == {"top.model_path", "train.learning_rate", "train.extra_args"}


def test_good_form_has_no_problems(defaults):
    assert check_form({**defaults, **form_values()}) == {}


@pytest.mark.parametrize(("text", "expected"), [
    ("stage: sft\nlearning_rate: [\n", "invalid YAML at line 3"),
    ("stage: sft\n  dataset: a: b\n", "invalid YAML at line 2"),
    ("stage: sft\nbad: !!python/object:os.system x\n", "invalid YAML at line 2"),
    ("- stage: sft\n- dataset: x\n", "must be a YAML mapping"),
    ("just some words", "must be a YAML mapping"),
    ("", "empty"),
    ("# only a comment\n\n", "empty"),
    (b"stage: sft\nname: caf\xe9\n", "not UTF-8"),
    ("a: &x [1, 2]\nb: *x\n", "anchors and aliases"),
    ("1: sft\n", "keys must be text"),
], ids=["unclosed", "bad-indent", "python-tag", "list", "scalar", "empty", "comment-only", "latin1", "alias", "int-key"])
def test_yaml_errors(text, expected):
    with pytest.raises(YamlError) as info:
        yaml_to_args(text)
    assert expected in str(info.value)


def test_yaml_bomb_is_refused_quickly():
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, (prev, name) in enumerate(zip("abcdefgh", "bcdefghi")):
        lines.append(f"{name}: &{name} [{','.join('*' + prev for _ in range(9))}]")
    with pytest.raises(YamlError, match="anchors and aliases"):
        yaml_to_args("\n".join(lines) + "\n")


def test_yaml_bytes_utf8_accepted():
    assert yaml_to_args("stage: sft\nrun: café\n".encode("utf-8")) == {"stage": "sft", "run": "café"}


# ---------------------------------------------------------------------------------------
# 4. validate_args on a tiny local model and dataset
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "model")
    data_dir = root / "data"
    make_demo_dataset(data_dir, rows=20)
    return {"root": root, "model": model, "data": data_dir}


@pytest.fixture(scope="module")
def good_args(tiny, defaults):
    values = form_values(**{
        "top.model_path": str(tiny["model"]),
        "top.template": DEMO_TEMPLATE,
        "train.dataset_dir": str(tiny["data"]),
        "train.output_dir": str(tiny["root"] / "out" / "run1"),
        "train.compute_type": "fp32",
        "train.extra_args": json.dumps({"optim": "adamw_torch", "use_cpu": True}),
    })
    return form_to_args(values, defaults)


def test_validate_good_lora_sft(good_args, tiny):
    assert good_args["use_cpu"] is True and good_args["finetuning_type"] == "lora"
    assert validate_args(good_args) == {}


def test_validate_good_config_from_yaml(good_args):
    assert validate_args(yaml_to_args(args_to_yaml(good_args))) == {}


@pytest.mark.parametrize(("change", "key", "expected"), [
    ({"learning_rate": "5e-5"}, "learning_rate", "wrong type"),
    ({"stage": "foo"}, "stage", "wrong type"),
    ({"learning_rat": 0.1}, "learning_rat", "unknown key"),
    ({"num_train_epochs": True}, "num_train_epochs", "wrong type"),
    ({"dataset": "no_such_set"}, "dataset", "unknown dataset 'no_such_set'"),
    ({"dataset": ""}, "dataset", "no dataset"),
    ({"model_name_or_path": ""}, "model_name_or_path", "no model"),
], ids=["str-lr", "stage-foo", "unknown-key", "bool-epochs", "unknown-dataset", "no-dataset", "no-model"])
def test_validate_problems(good_args, change, key, expected):
    problems = validate_args({**good_args, **change})
    assert key in problems, problems
    assert expected in problems[key]


def test_validate_missing_model_folder(good_args, tiny):
    missing = tiny["root"] / "no_such_model"
    problems = validate_args({**good_args, "model_name_or_path": str(missing)})
    assert list(problems) == ["model_name_or_path"]
    assert "does not exist" in problems["model_name_or_path"]


def test_validate_folder_without_config(good_args, tiny):
    problems = validate_args({**good_args, "model_name_or_path": str(tiny["data"])})
    assert list(problems) == ["model_name_or_path"]
    assert "config.json" in problems["model_name_or_path"]


@pytest.mark.parametrize(("file_name", "content", "expected"), [
    ("empty.json", "[]", "is empty"),
    ("empty.jsonl", "\n\n", "is empty"),
    ("empty.csv", "instruction,input,output\n", "is empty"),
    ("zero.json", "", "cannot be parsed"),
    ("missing.json", None, "does not exist"),
])
def test_validate_bad_dataset_file(good_args, tmp_path, file_name, content, expected):
    if content is not None:
        (tmp_path / file_name).write_text(content, encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"bad_set": {"file_name": file_name}}), encoding="utf-8")
    problems = validate_args({**good_args, "dataset_dir": str(tmp_path), "dataset": "bad_set"})
    assert list(problems) == ["dataset"]
    assert expected in problems["dataset"] and "bad_set" in problems["dataset"]


def test_validate_dataset_dir_without_info(good_args, tmp_path):
    problems = validate_args({**good_args, "dataset_dir": str(tmp_path)})
    assert list(problems) == ["dataset_dir"]
    assert "dataset_info.json" in problems["dataset_dir"]


def test_validate_bf16_on_cpu_needs_use_cpu(good_args):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this check is about machines without a GPU")
    args = {k: v for k, v in good_args.items() if k != "use_cpu"}
    problems = validate_args({**args, "bf16": True})
    assert problems, "bf16 without use_cpu on a CPU-only machine must be rejected"
    assert any("use_cpu" in message for message in problems.values()), problems
    assert validate_args({**good_args, "bf16": True}) == {}  # with use_cpu it is accepted


@pytest.mark.parametrize(("change", "key", "expected"), [
    ({"finetuning_type": "freeze", "use_dora": True}, "use_dora", "only valid for LoRA"),
    ({"stage": "pt", "train_on_prompt": True}, "train_on_prompt", "except SFT"),
    ({"stage": "ppo"}, "reward_model", "necessary for PPO"),
], ids=["dora-freeze", "pt-train-on-prompt", "ppo-no-reward"])
def test_validate_runs_llamafactory_parser(good_args, change, key, expected):
    # types and files are fine here: only LLaMA-Factory's own parser knows these combinations are wrong
    assert type_problems({**good_args, **change}) == {}
    problems = validate_args({**good_args, **change})
    assert key in problems, problems
    assert expected in problems[key]
    assert validate_args({**good_args, **change}, run_parser=False) == {}


def test_validate_other_stage_passes(good_args):
    assert validate_args({**good_args, "stage": "pt"}) == {}


# ---------------------------------------------------------------------------------------
# Regressions: bugs found in review, fixed, kept from coming back
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("train.learning_rate", "nan"), ("train.learning_rate", "inf"),
                                              ("train.num_train_epochs", "nan")])
def test_bug_non_finite_numbers_rejected(defaults, field, value):
    with pytest.raises(FormError):
        form_to_args(form_values(**{field: value}), defaults)


def test_bug_no_model_name_is_not_a_crash(defaults):
    values = form_values(**{"top.model_name": None})
    args = form_to_args(values, defaults)  # a typed path is enough: no crash
    assert args["model_name_or_path"] == values["top.model_path"]


def test_bug_ppo_settings_in_yaml_are_kept(defaults):
    original = yaml_to_args(
        "stage: ppo\nmodel_name_or_path: /m\nfinetuning_type: lora\ndataset: x\noutput_dir: saves/Custom/lora/r\n"
        "reward_model: /rm\nreward_model_type: full\ntop_k: 50\ntop_p: 0.7\n")
    args = form_to_args(args_to_form(original).values, defaults)
    assert (args["reward_model_type"], args["top_k"], args["top_p"]) == ("full", 50, 0.7)


def test_bug_custom_deepspeed_file_is_kept(defaults):
    original = {**yaml_to_args(HAND_WRITTEN), "deepspeed": "/opt/mine/ds_z3_custom.json"}
    args = form_to_args(args_to_form(original).values, defaults)
    assert args["deepspeed"] == "/opt/mine/ds_z3_custom.json"


def test_bug_flash_attn_kept_with_other_booster(defaults):
    original = {**yaml_to_args(HAND_WRITTEN), "enable_liger_kernel": True, "flash_attn": "fa2"}
    args = form_to_args(args_to_form(original).values, defaults)
    assert args["enable_liger_kernel"] is True and args["flash_attn"] == "fa2"


def test_bug_dataset_list_in_yaml(defaults):
    original = {**yaml_to_args(HAND_WRITTEN), "dataset": ["demo_alpaca", "other_set"]}
    assert args_to_form(original).values["train.dataset"] == ["demo_alpaca", "other_set"]


def test_bug_double_quantization_false_kept(defaults):
    original = {**yaml_to_args(HAND_WRITTEN), "double_quantization": False}
    args = form_to_args(args_to_form(original).values, defaults)
    assert args.get("double_quantization") is False


def test_numbers_written_as_text_in_yaml_become_numbers():
    """YAML 1.1 reads 5e-4 (no dot) as a string; the trainer would only fail at run time."""
    args = yaml_to_args("learning_rate: 5e-4\nnum_train_epochs: '3'\nper_device_train_batch_size: '8'\n"
                        "max_grad_norm: nan\nrun_name: 1e-3\ngradient_accumulation_steps: '2.5'\n")
    assert args["learning_rate"] == 0.0005 and isinstance(args["learning_rate"], float)
    assert args["num_train_epochs"] == 3.0
    assert args["per_device_train_batch_size"] == 8 and isinstance(args["per_device_train_batch_size"], int)
    assert args["max_grad_norm"] == "nan"  # not a finite number: left for the type check to name
    assert args["run_name"] == "1e-3"  # a text field stays text
    assert args["gradient_accumulation_steps"] == "2.5"  # an int field given a fraction: left for the check
    problems = validate_args(args)
    assert "wrong type" in problems["max_grad_norm"] and "wrong type" in problems["gradient_accumulation_steps"]
