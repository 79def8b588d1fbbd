"""Evaluate, merge and register the session's trained run, for real: an eval job and an export
job through RunService and the local launcher, the real MLflow server (metrics, Model Registry),
and a chat with the merged model through a real `llamafactory-cli api` server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlmodel import select

from portal.models import AuditEvent
from portal.runs import ConfigRejected, NotFound, PortalError

TINY_EVAL = {"max_samples": 8, "max_new_tokens": 8, "batch_size": 4}


@pytest.fixture(scope="module")
def evaluated(trained):
    runs, alice, parent = trained["services"].runs, trained["user"], trained["run"]
    started = time.monotonic()
    run = runs.evaluate(alice, parent.id, ["demo_alpaca"], TINY_EVAL["max_samples"],
                        max_new_tokens=TINY_EVAL["max_new_tokens"], batch_size=TINY_EVAL["batch_size"])
    run = runs.wait(alice, run.id, timeout=300, interval=0.5)
    print(f"\neval job: {time.monotonic() - started:.1f} s")
    assert run.status.value == "succeeded", runs.logs(alice, run.id)[-3000:]
    return run


@pytest.fixture(scope="module")
def merged(trained):
    runs, alice, parent = trained["services"].runs, trained["user"], trained["run"]
    started = time.monotonic()
    run = runs.merge(alice, parent.id, name="alice-tiny-faq")
    run = runs.wait(alice, run.id, timeout=300, interval=0.5)
    print(f"\nmerge job: {time.monotonic() - started:.1f} s")
    assert run.status.value == "succeeded", runs.logs(alice, run.id)[-3000:]
    return run


def test_eval_job_logs_predict_metrics_on_the_evaluated_run(trained, evaluated):
    runs, alice, parent = trained["services"].runs, trained["user"], trained["run"]
    from portal.evaluation import PARENT_METRIC_PREFIX

    assert evaluated.kind == "eval" and evaluated.parent_id == parent.id and evaluated.datasets == "demo_alpaca"
    config = runs.parse_config(evaluated.config_yaml)
    assert config["do_predict"] is True and not config.get("do_train") and config["predict_with_generate"] is True
    assert config["adapter_name_or_path"] == parent.output_dir  # from the Run row
    assert config["model_name_or_path"] == parent.model_name_or_path and config["max_samples"] == 8
    assert "dataset" not in config and config["eval_dataset"] == "demo_alpaca"

    client = runs.tracker.client
    on_parent = client.get_run(parent.mlflow_run_id).data
    for key in ("predict_bleu-4", "predict_rouge-1", "predict_rouge-l"):
        assert PARENT_METRIC_PREFIX + key in on_parent.metrics, on_parent.metrics
    history = client.get_metric_history(parent.mlflow_run_id, PARENT_METRIC_PREFIX + "predict_bleu-4")
    assert [m.step for m in history] == [evaluated.id]
    assert on_parent.tags["portal.last_eval_run_id"] == str(evaluated.id)
    own = client.get_run(evaluated.mlflow_run_id).data
    assert "predict_bleu-4" in own.metrics and own.tags["portal.kind"] == "eval"
    assert own.tags["portal.parent_run_id"] == str(parent.id)

    # the evaluated run's page lists it; the predictions are one of the eval run's files
    (item,) = [e for e in runs.evaluations(alice, parent.id) if e.run.id == evaluated.id]
    assert item.metrics["predict_bleu-4"] == on_parent.metrics[PARENT_METRIC_PREFIX + "predict_bleu-4"]
    assert item.predictions == "generated_predictions.jsonl"
    files, _ = runs.artifacts(alice, evaluated.id)
    assert "generated_predictions.jsonl" in [a.path for a in files]
    name, data = runs.artifact_bytes(alice, evaluated.id, "generated_predictions.jsonl")
    lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    assert name == "generated_predictions.jsonl" and len(lines) == 8 and {"predict", "label"} <= set(lines[0])


def test_merge_exports_and_registers_a_model_version(trained, merged):
    runs, alice, parent = trained["services"].runs, trained["user"], trained["run"]
    export_dir = Path(merged.output_dir)
    assert merged.kind == "export" and merged.parent_id == parent.id
    assert export_dir == runs.space(alice).models_dir / merged.name
    assert (export_dir / "config.json").is_file() and list(export_dir.glob("*.safetensors"))
    assert not (export_dir / "adapter_config.json").exists()
    config = runs.parse_config(merged.config_yaml)
    assert config["export_dir"] == str(export_dir) and config["adapter_name_or_path"] == parent.output_dir
    assert config["export_device"] == "cpu" and not config.get("export_legacy_format")
    assert "output_dir" not in config and "do_train" not in config

    assert merged.registered_model == "alice-tiny-faq" and merged.registered_version == "1"
    client = runs.tracker.client
    version = client.get_model_version("alice-tiny-faq", "1")
    assert version.run_id == merged.mlflow_run_id and version.source == f"runs:/{merged.mlflow_run_id}/model"
    tags = version.tags
    assert tags["portal.run_id"] == str(merged.id) and tags["portal.parent_run_id"] == str(parent.id)
    assert tags["portal.config_sha256"] == merged.config_sha256
    assert tags["portal.parent_config_sha256"] == parent.config_sha256
    assert tags["portal.base_model"] == parent.model_name_or_path and tags["portal.model_path"] == str(export_dir)
    fingerprints = json.loads(tags["portal.datasets"])
    assert fingerprints and fingerprints[0]["name"] == "demo_alpaca" and len(fingerprints[0]["sha256"]) == 64
    assert client.get_registered_model("alice-tiny-faq").tags["portal.owner"] == "alice"
    assert client.get_run(merged.mlflow_run_id).data.tags["portal.registered_version"] == "1"


def test_the_merged_model_chats_on_a_local_server(trained, merged):
    services, alice = trained["services"], trained["user"]
    chat = services.chat
    assert merged.id in [r.id for r in chat.runs_to_chat(alice)]
    args = chat.local_servers.server_args(merged, None)
    assert args["model_name_or_path"] == merged.output_dir and "adapter_name_or_path" not in args
    try:
        deltas = list(chat.stream_run(alice, merged.id, [{"role": "user", "content": "hello"}], max_tokens=4))
        assert deltas and "".join(deltas)
    finally:
        chat.release(alice, f"run-{merged.id}")


def test_other_users_cannot_evaluate_merge_or_chat(trained, merged):
    services, parent = trained["services"], trained["run"]
    runs = services.runs
    bob = runs.ensure_user("bob_eval")
    with pytest.raises(NotFound):
        runs.evaluate(bob, parent.id, ["demo_alpaca"], 8)
    with pytest.raises(NotFound):
        runs.merge(bob, parent.id)
    with pytest.raises(NotFound):
        next(iter(services.chat.stream_run(bob, merged.id, [{"role": "user", "content": "hi"}])))
    with pytest.raises(NotFound):
        runs.evaluations(bob, parent.id)
    assert merged.id not in [r.id for r in services.chat.runs_to_chat(bob)]
    with services.db.session() as s:
        denied = s.exec(select(AuditEvent).where(AuditEvent.username == "bob_eval",
                                                 AuditEvent.action == "denied")).all()
    assert {e.detail for e in denied} >= {"evaluate of a run of alice", "merge of a run of alice"}
    # a name that is alice's registered model is not bob's to add versions to
    from portal.registry import check_can_register

    with pytest.raises(PortalError, match="belongs to another user"):
        check_can_register(runs.tracker.client, bob, "alice-tiny-faq")


def test_only_admins_set_aliases(trained, merged):
    runs, alice = trained["services"].runs, trained["user"]
    with pytest.raises(PermissionError):
        runs.set_alias(alice, "alice-tiny-faq", "1", "production")
    admin = runs.ensure_user("registry_admin", is_admin=True)
    with pytest.raises(PortalError, match="not one of"):
        runs.set_alias(admin, "alice-tiny-faq", "1", "latest")
    with pytest.raises(NotFound):
        runs.set_alias(admin, "alice-tiny-faq", "99", "candidate")
    runs.set_alias(admin, "alice-tiny-faq", "1", "candidate")
    model = runs.tracker.client.get_registered_model("alice-tiny-faq")
    assert model.aliases == {"candidate": "1"} or model.aliases.get("candidate") == "1"


def test_what_cannot_be_evaluated_or_merged_is_refused_in_words(trained, evaluated):
    runs, alice, parent = trained["services"].runs, trained["user"], trained["run"]
    with pytest.raises(PortalError, match="is an eval run"):
        runs.merge(alice, evaluated.id)
    with pytest.raises(ConfigRejected) as err:
        runs.evaluate(alice, parent.id, ["no_such_dataset"], 8)
    assert "no_such_dataset" in str(err.value) and {"dataset", "eval_dataset"} & set(err.value.problems)
    with pytest.raises(ConfigRejected) as err:
        runs.evaluate(alice, parent.id, ["demo_alpaca"], 0)
    assert "max_samples" in err.value.problems


def test_cli_eval_merge_and_alias(trained, merged, mlflow_server, monkeypatch, capsys):
    """The CLI acts as the portal's local admin: aliases yes; another user's run is not its to merge."""
    from portal.cli import EXIT_FAILED, EXIT_OK, main

    monkeypatch.setenv("PORTAL_MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("PORTAL_GPUS", "[]")
    root = ["--data-root", str(trained["services"].settings.data_root)]
    assert main(["models", "alias", "alice-tiny-faq", "1", "production", *root]) == EXIT_OK
    assert "alice-tiny-faq@production -> version 1" in capsys.readouterr().out
    client = trained["services"].runs.tracker.client
    assert client.get_model_version_by_alias("alice-tiny-faq", "production").version == "1"
    assert main(["merge", str(trained["run"].id), *root]) == EXIT_FAILED
    assert "only its owner can merge it" in capsys.readouterr().err
    assert main(["eval", "999999", "--dataset", "demo_alpaca", *root]) == EXIT_FAILED
    assert "not found" in capsys.readouterr().err
