"""RunService + local launcher + MLflow, for real: training, failure, cancel, restart, queue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from sqlmodel import select
from conftest import demo_form, submit_form

from portal.models import AuditEvent, Run
from portal.runs import ConfigRejected


def trainer_losses(output_dir: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in Path(output_dir, "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    return [(r["current_steps"], r["loss"]) for r in rows if r.get("loss") is not None]


def test_trained_run_succeeds_with_adapter_and_mlflow_curve(trained):
    services, user, run = trained["services"], trained["user"], trained["run"]
    assert run.status.value == "succeeded" and run.exit_code == 0
    output = Path(run.output_dir)
    assert (output / "adapter_model.safetensors").is_file()
    assert (output / "adapter_config.json").is_file()
    # the YAML that ran is the run's config, in its folder and its row
    on_disk = yaml.safe_load(Path(run.run_dir, "config.yaml").read_text())
    assert on_disk == yaml.safe_load(run.config_yaml)
    assert on_disk["output_dir"] == run.output_dir and on_disk["report_to"] == "mlflow"
    # MLflow's loss history is the trainer's own log, point for point
    expected = trainer_losses(run.output_dir)
    assert len(expected) >= 2
    history = services.tracker.client.get_metric_history(run.mlflow_run_id, "loss")
    got = sorted((m.step, m.value) for m in history)
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-5)
    assert run.final_loss == pytest.approx(expected[-1][1], rel=1e-5)
    mlrun = services.tracker.client.get_run(run.mlflow_run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.tags["portal.run_id"] == str(run.id)
    assert mlrun.data.tags["portal.owner"] == "alice"
    assert mlrun.data.tags["portal.config_sha256"] == run.config_sha256
    # the portal's own metrics view gives the same curve
    points = services.runs.metrics(user, run.id)
    assert [(p.step, p.value) for p in points if p.key == "loss"] == got
    with services.db.session() as s:
        actions = [e.action for e in s.exec(select(AuditEvent).where(AuditEvent.username == "alice"))]
    assert "submit" in actions


def test_fifty_viewers_cost_mlflow_one_read_per_interval(trained):
    services, run = trained["services"], trained["run"]
    from portal.tracking import MetricsCache

    cache = MetricsCache(services.tracker.history, ttl_seconds=60)
    services.tracker.reads = 0
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(run.mlflow_run_id))) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 50 and all(r == results[0] for r in results) and results[0]
    assert cache.fetches == 1
    assert services.tracker.reads == 2  # loss and eval_loss: one history call each


def test_broken_dataset_fails_and_keeps_log_and_row(make_services):
    services = make_services()
    user = services.runs.ensure_user("bob")
    space = services.runs.space(user)
    (space.datasets_dir / "broken.json").write_text(json.dumps([{"question": "no alpaca columns here"}] * 4))
    (space.datasets_dir / "dataset_info.json").write_text(json.dumps({"broken": {"file_name": "broken.json"}}))
    model = services.settings.shared_models_root / "tiny-llama"
    run = submit_form(services.runs, user, demo_form(model, "broken_run", **{"train.dataset": ["broken"]}))
    run = services.runs.wait(user, run.id, timeout=240, interval=0.5)
    assert run.status.value == "failed"
    assert run.exit_code not in (None, 0)
    assert run.status_reason and "exited with code" in run.status_reason
    log = services.runs.logs(user, run.id)
    assert "Traceback" in log or "Error" in log
    assert services.runs.get_run(user, run.id).id == run.id  # the row stays
    assert services.tracker.client.get_run(run.mlflow_run_id).info.status == "FAILED"


def _wait_for(predicate, timeout=180, interval=0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met")


def test_queue_limit_and_cancel_stop_the_process_group(make_services, monkeypatch):
    monkeypatch.setenv("PORTAL_TEST_SECRET", "s3cret")  # secrets in the portal's environment
    monkeypatch.setenv("SECRET_API_TOKEN", "t0ken")
    services = make_services(max_concurrent_runs=1)
    runs = services.runs
    user = runs.ensure_user("carol")
    model = services.settings.shared_models_root / "tiny-llama"
    long = {"train.num_train_epochs": "500.0", "train.max_samples": "200"}
    first = submit_form(runs, user, demo_form(model, "long_one", **long))
    second = submit_form(runs, user, demo_form(model, "waits", **long))
    assert first.status.value == "running"
    assert second.status.value == "queued"  # one slot: it waits its turn
    runs.poll_active()
    runs.dispatch()
    assert runs.get_run(user, second.id).status.value == "queued"
    # cancelling a queued run never starts it
    assert runs.cancel(user, second.id).status.value == "cancelled"
    # wait until training really runs (the trainer logs steps), then cancel
    _wait_for(lambda: "it/s" in runs.logs(user, first.id) or "s/it" in runs.logs(user, first.id))
    pgid = json.loads(runs.get_run(user, first.id).launcher_state)["pid"]
    members = [p for p in psutil.process_iter() if _pgid(p) == pgid]
    assert len(members) >= 2  # the wrapper and llamafactory-cli
    job_env = psutil.Process(pgid).environ()
    assert job_env["MLFLOW_RUN_ID"] == first.mlflow_run_id and job_env["CUDA_VISIBLE_DEVICES"] == ""
    assert "PORTAL_TEST_SECRET" not in job_env and "SECRET_API_TOKEN" not in job_env
    cancelled = runs.cancel(user, first.id)
    assert cancelled.status.value == "cancelled"
    assert "carol" in (cancelled.status_reason or "")
    alive = [p for p in psutil.process_iter() if _pgid(p) == pgid and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    assert services.tracker.client.get_run(cancelled.mlflow_run_id).info.status == "KILLED"
    assert runs.get_run(user, second.id).started_at is None


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, OSError):
        return None


def test_job_outlives_the_portal_and_is_reattached(make_services, tmp_path):
    """The job is started by one portal process (the CLI) that then exits; a new portal process
    re-attaches by pid + start time and sees it through to succeeded."""
    services = make_services()
    settings = services.settings
    config = {
        "stage": "sft", "do_train": True, "model_name_or_path": str(settings.shared_models_root / "tiny-llama"),
        "finetuning_type": "lora", "template": "default", "dataset": "demo_alpaca", "cutoff_len": 96,
        "max_samples": 64, "per_device_train_batch_size": 8, "num_train_epochs": 2.0, "learning_rate": 1e-3,
        "logging_steps": 2, "lora_target": "all", "output_dir": "reattach_me",
    }
    path = tmp_path / "reattach.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PORTAL_MLFLOW_TRACKING_URI=settings.tracking_uri, PORTAL_GPUS="[]")
    out = subprocess.run([sys.executable, "-m", "portal.cli", "submit", str(path), "--data-root", str(settings.data_root)],
                         capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "running" in out.stdout
    # the submitting process is gone; this RunService never started the job
    runs = services.runs
    user = runs.ensure_user("local", is_admin=True)
    run = [r for r in runs.list_runs(user) if r.name == "reattach_me"][0]
    state = json.loads(run.launcher_state)
    assert state["pid"] not in runs.launcher._children
    assert runs.launcher.poll(state).exit_code is None  # alive, seen by pid + start time
    run = runs.wait(user, run.id, timeout=240, interval=0.5)
    assert run.status.value == "succeeded", run.status_reason
    assert run.final_loss is not None


def test_pid_reuse_is_not_mistaken_for_the_job(make_services):
    runs = make_services().runs
    me = psutil.Process()
    state = {"pid": me.pid, "create_time": me.create_time() - 1000, "exit_file": "/nonexistent/exit_code"}
    result = runs.launcher.poll(state)
    assert result.exit_code == -1 and "without recording an exit code" in result.reason


# ---- rejected configs: a clear message naming the key, nothing launched ---------------------

def _rejected(runs, user, args):
    before = len(runs.list_runs(user))
    with pytest.raises(ConfigRejected) as info:
        runs.submit_args(user, args)
    assert len(runs.list_runs(user)) == before  # no run row, nothing launched
    return info.value.problems


@pytest.fixture
def rejecting(make_services):
    services = make_services()
    user = services.runs.ensure_user("dave")
    model = str(services.settings.shared_models_root / "tiny-llama")
    base = {"stage": "sft", "do_train": True, "model_name_or_path": model, "finetuning_type": "lora", "template": "default",
            "dataset": "demo_alpaca", "output_dir": "x1", "learning_rate": 1e-3}
    return services, user, base


@pytest.mark.parametrize("change, key, words", [
    ({"model_name_or_path": "/etc"}, "model_name_or_path", "outside the folders you may use"),
    ({"model_name_or_path": "{shared}/models/../../../etc"}, "model_name_or_path", "'..'"),
    ({"model_name_or_path": "relative/../../x"}, "model_name_or_path", "neither a folder"),
    ({"ref_model": "/etc"}, "ref_model", "outside"),
    ({"reward_model": "/root"}, "reward_model", "outside"),
    ({"adapter_name_or_path": "{shared}/models,/etc"}, "adapter_name_or_path", "outside"),
    ({"tokenized_path": "/tmp/cache"}, "tokenized_path", "outside"),
    ({"media_dir": "../media"}, "media_dir", "absolute path"),
    ({"resume_from_checkpoint": "/var/lib"}, "resume_from_checkpoint", "outside"),
    ({"profiler_output_dir": "/tmp/prof"}, "profiler_output_dir", "outside"),
    ({"fsdp_config": "/etc/fsdp.json"}, "fsdp_config", "outside"),
    ({"hf_hub_token": "hf_x"}, "hf_hub_token", "tokens never go in a config"),
    ({"swanlab_lark_webhook_url": "https://evil.example"}, "swanlab_lark_webhook_url", "outside services"),
    ({"adapter_name_or_path": "/tmp"}, "adapter_name_or_path", "outside"),
    ({"hub_token": "hf_secret"}, "hub_token", "tokens never go in a config"),
    ({"swanlab_lark_secret": "s3"}, "swanlab_lark_secret", "secrets never go in a config"),
    ({"tokenized_path": "{shared}/datasets/cache"}, "tokenized_path", "outside"),  # shared is read-only
    ({"export_dir": "{shared}/models/mine"}, "export_dir", "outside"),
    ({"push_to_hub": True}, "push_to_hub", "not allowed"),
    ({"trust_remote_code": True}, "trust_remote_code", "not allowed"),
    ({"report_to": "wandb"}, "report_to", "MLflow only"),
    ({"deepspeed": "/etc/passwd"}, "deepspeed", "DeepSpeed stage"),
    ({"learning_rate": "fast"}, "learning_rate", "expected a number"),
    ({"stage": "foo"}, "stage", "one of"),
    ({"learning_rat": 0.1}, "learning_rat", "unknown key"),
    ({"dataset": "nope"}, "dataset", "unknown dataset 'nope'"),
    ({"model_name_or_path": "{shared}/models/missing"}, "model_name_or_path", "does not exist"),
    ({"output_dir": "../escape"}, "output_dir", "not allowed"),
    ({"do_train": False}, "do_train", "would not train"),
])
def test_bad_configs_are_rejected_by_key(rejecting, change, key, words):
    services, user, base = rejecting
    shared = str(services.settings.shared_root)
    args = dict(base)
    args.update({k: v.replace("{shared}", shared) if isinstance(v, str) else v for k, v in change.items()})
    problems = _rejected(services.runs, user, args)
    assert key in problems, problems
    assert words in problems[key]


def test_the_key_policy_is_configurable_but_credentials_stay_refused(make_services, tmp_path):
    """Admins add refusals (with their reason) and lift built-in ones; token keys cannot be lifted."""
    from pydantic import ValidationError

    from portal.config import Settings

    services = make_services(policy_forbidden_keys={"neftune_noise_alpha": "not approved by model risk; remove it"},
                             policy_allowed_keys=["overwrite_output_dir"])
    user = services.runs.ensure_user("erin")
    model = str(services.settings.shared_models_root / "tiny-llama")
    base = {"stage": "sft", "do_train": True, "model_name_or_path": model, "finetuning_type": "lora",
            "template": "default", "dataset": "demo_alpaca", "output_dir": "p1", "learning_rate": 1e-3}
    problems = _rejected(services.runs, user, dict(base, neftune_noise_alpha=5))
    assert problems["neftune_noise_alpha"] == "not allowed: not approved by model risk; remove it"
    prepared = services.runs.prepare(user, dict(base, overwrite_output_dir=True), for_submit=False)
    assert prepared.args["overwrite_output_dir"] is True  # lifted by the admin
    assert "push_to_hub" in _rejected(services.runs, user, dict(base, push_to_hub=True))  # the rest stays
    with pytest.raises(ValidationError) as info:
        Settings(data_root=tmp_path, policy_allowed_keys=["hub_token", "overwrite_output_dir"])
    assert "may not lift hub_token" in str(info.value)


def test_symlink_out_of_the_space_is_refused(rejecting, tmp_path):
    services, user, base = rejecting
    link = services.runs.space(user).root / "sneaky_model"
    link.symlink_to("/etc")
    problems = _rejected(services.runs, user, dict(base, model_name_or_path=str(link)))
    assert "outside" in problems["model_name_or_path"]


def test_dataset_file_outside_allowed_roots_is_refused(rejecting, tmp_path):
    services, user, base = rejecting
    datasets = services.runs.space(user).datasets_dir
    (datasets / "dataset_info.json").write_text(json.dumps({"leak": {"file_name": "/etc/hostname"}}))
    problems = _rejected(services.runs, user, dict(base, dataset="leak"))
    assert "outside" in problems["dataset"]


def test_empty_dataset_and_taken_name(rejecting):
    services, user, base = rejecting
    datasets = services.runs.space(user).datasets_dir
    (datasets / "empty.json").write_text("[]")
    (datasets / "dataset_info.json").write_text(json.dumps({"empty": {"file_name": "empty.json"}}))
    problems = _rejected(services.runs, user, dict(base, dataset="empty"))
    assert "empty" in problems["dataset"]
    services.runs.space(user).run_dir("taken").mkdir(parents=True)
    problems = _rejected(services.runs, user, dict(base, output_dir="taken"))
    assert "already exists" in problems["output_dir"]


def test_gpus_and_nodes_per_run_need_the_kubernetes_launcher(rejecting):
    services, user, base = rejecting
    with pytest.raises(ConfigRejected) as info:
        services.runs.submit_args(user, base, gpus_per_node=2, nodes=2)
    assert set(info.value.problems) == {"gpus", "nodes"}
    assert "several nodes need the Kubernetes launcher (launcher: kubernetes)" in info.value.problems["nodes"]
    assert "Kubernetes launcher" in info.value.problems["gpus"]
    assert services.runs.list_runs(user) == []  # nothing recorded, nothing launched
    assert services.runs.prepare(user, base, for_submit=False, nodes=1).nodes == 1  # the default still goes


def test_bad_yaml_is_rejected(rejecting):
    services, user, _ = rejecting
    for text, words in [("stage: [sft", "line"), ("- a\n- b\n", "mapping"), ("", "empty"),
                        ("a: &x [1]\nb: *x\n", "anchors")]:
        with pytest.raises(ConfigRejected) as info:
            services.runs.submit_yaml(user, text)
        assert words in info.value.problems["yaml"]


def test_users_only_reach_their_own_runs(trained, make_services):
    services, alice, run = trained["services"], trained["user"], trained["run"]
    from portal.runs import NotFound

    assert services.runs.get_run(alice, run.id).owner == "alice"

    mallory = services.runs.ensure_user("mallory")
    with pytest.raises(NotFound):
        services.runs.get_run(mallory, run.id)
    with pytest.raises(NotFound):
        services.runs.logs(mallory, run.id)
    with pytest.raises(NotFound):
        services.runs.cancel(mallory, run.id)
    with pytest.raises(NotFound):
        services.runs.metrics(mallory, run.id)
    assert run.id not in [r.id for r in services.runs.list_runs(mallory)]
    with services.db.session() as s:
        denied = s.exec(select(AuditEvent).where(AuditEvent.username == "mallory", AuditEvent.action == "denied")).all()
    assert all(e.target == f"run:{run.id}" for e in denied)
    details = [e.detail for e in denied]
    assert details.count("view of a run of alice") == 1  # repeated views: once a minute
    assert details.count("cancel of a run of alice") == 1  # every denied change
    admin = services.runs.ensure_user("root_admin", is_admin=True)
    assert services.runs.get_run(admin, run.id).id == run.id
    with services.db.session() as s:
        assert s.get(Run, run.id).owner == "alice"


def test_metrics_cache_rereads_once_when_a_run_ends():
    """A live read cached a moment before the run ended must not hide the final curve."""
    from portal.tracking import MetricPoint, MetricsCache

    now = [0.0]
    history = [[], [MetricPoint("loss", 5, 1.0)]]
    calls = []

    def fetch(run_id):
        calls.append(run_id)
        return history[min(len(calls) - 1, 1)]

    cache = MetricsCache(fetch, ttl_seconds=2.0, clock=lambda: now[0])
    assert cache.get("r") == [] and cache.get("r") == []  # live, within the interval: one read
    assert len(calls) == 1
    assert cache.get("r", final=True) == [MetricPoint("loss", 5, 1.0)]  # ended: read again
    now[0] = 1000.0
    assert cache.get("r", final=True) == [MetricPoint("loss", 5, 1.0)]  # and kept for good
    assert len(calls) == 2


def test_dispatch_waits_for_the_mlflow_run(make_services):
    """A queued row whose MLflow run is not created yet is never started (the job would log
    into a stray MLflow run of its own)."""
    services = make_services()
    user = services.runs.ensure_user("erin")
    with services.db.session() as s:
        row = Run(name="not_ready", owner_id=user.id, owner="erin", run_dir="/nonexistent", output_dir="/nonexistent")
        s.add(row)
        s.commit()
        s.refresh(row)
    services.runs.dispatch()
    assert services.runs.get_run(user, row.id).status.value == "queued"


def test_embedded_mlflow_starts_once_and_is_reused(tmp_path):
    """The embedded default: `mlflow server` on loopback with a sqlite store under the data root."""
    import httpx
    from conftest import free_port

    from portal.tracking import EmbeddedMlflow

    server = EmbeddedMlflow(tmp_path / "mlflow", free_port())
    try:
        url = server.ensure()
        assert httpx.get(f"{url}/health").status_code == 200
        pid = int(server.pid_file.read_text())
        assert server.ensure() == url  # a second portal process reuses it
        assert int(server.pid_file.read_text()) == pid
        assert (tmp_path / "mlflow" / "mlflow.db").is_file()
    finally:
        server.stop()
    _wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, timeout=30)


def test_per_user_limit_queues_with_a_reason_and_lets_others_run(make_services):
    services = make_services(max_concurrent_runs=3, max_runs_per_user=1)
    runs = services.runs
    frank, grace = runs.ensure_user("frank"), runs.ensure_user("grace")
    model = services.settings.shared_models_root / "tiny-llama"
    long = {"train.num_train_epochs": "500.0", "train.max_samples": "200"}
    first = submit_form(runs, frank, demo_form(model, "frank_1", **long))
    second = submit_form(runs, frank, demo_form(model, "frank_2", **long))
    other = submit_form(runs, grace, demo_form(model, "grace_1", **long))
    try:
        assert first.status.value == "running"
        second = runs.get_run(frank, second.id)
        assert second.status.value == "queued"
        assert second.status_reason == "waiting: frank already has 1 run(s) running (limit 1 per user)"
        assert other.status.value == "running"  # another user's run is not held up by frank's limit
    finally:
        for run, owner in ((second, frank), (first, frank), (other, grace)):
            runs.cancel(owner, run.id)
    assert runs.get_run(frank, second.id).started_at is None
