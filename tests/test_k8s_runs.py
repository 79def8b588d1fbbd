"""RunService with ``launcher: kubernetes``: a real submit (policy, validation, MLflow run) whose
Job goes to the HTTP fake of the API server (tests/k8s_fake_api.py), which the tests drive as a
cluster would (pods pending, running, ending; Kueue; deletions; faults). Nothing trains here.

What a run shows while its Job waits: ``starting`` (with the cluster's reason: "queued: waiting
for quota in ...", "waiting for a node: ...") until its pod runs, then ``running``."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from conftest import demo_form, submit_form
from fastapi import FastAPI
from fastapi.testclient import TestClient
from k8s_fake_api import FakeKubernetes

from llamaboard_ext.compile import args_to_yaml, form_to_args
from llamaboard_ext.form import form_defaults
from portal.api import build_api
from portal.launchers import k8s_manifests as m
from portal.launchers.k8s_settings import KubernetesSettings
from portal.launchers.kubernetes import OOM_REASON, KubernetesLauncher
from portal.models import Run, RunStatus, utcnow
from portal.runs import ConfigRejected, PortalError

NS = "llamaboard"
UNSCHEDULABLE = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."


@pytest.fixture
def fake():
    with FakeKubernetes() as server:
        yield server


@pytest.fixture
def cluster(fake, make_services):
    """Portal services on the Kubernetes launcher, talking to ``fake``. (``fake`` comes first, so
    it is still up when make_services' teardown stops the runs' jobs.)"""

    def build(**overrides):
        k8s = {"api_retries": 1, "api_timeout_seconds": 2.0, **overrides.pop("k8s", {})}
        services = make_services(launcher="kubernetes", gpus_per_run=1,
                                 kubernetes=KubernetesSettings(**k8s), **overrides)
        services.runs.launcher = KubernetesLauncher(services.settings, api_client=fake.api_client(),
                                                    retry_base_delay=0.01, poll_interval=0.01)
        runs = services.runs
        user = runs.ensure_user("alice")
        model_dir = services.settings.shared_models_root / "tiny-llama"

        def submit(name: str, **placement) -> Run:  # placement: gpus_per_node, nodes
            if placement:
                args = form_to_args(demo_form(model_dir, name), form_defaults())
                return runs.submit_args(user, args, source="form", **placement)
            return submit_form(runs, user, demo_form(model_dir, name))

        return services, runs, user, submit

    return build


def job_of(fake: FakeKubernetes, run: Run) -> dict:
    job = fake.get("jobs", NS, m.job_name(run.id))
    assert job is not None, f"no Job for run {run.id}"
    return job


def env_of(job: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def count_writes(runs, monkeypatch) -> list:
    """Every RunService._set from now on."""
    calls: list = []
    original = runs._set

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(runs, "_set", counting)
    return calls


def test_a_submit_makes_a_job_with_the_runs_labels_gpu_and_mlflow_run(cluster, fake):
    services, _, _, submit = cluster()
    assert services.settings.gpu_ids == []  # the portal's machine has no GPU: the run still asks for one

    run = submit("on_k8s")

    assert run.status == RunStatus.starting  # handed to the cluster, not running yet
    assert run.gpus == 1 and run.launcher == "kubernetes"
    assert run.status_reason == f"submitted to Kubernetes as Job {NS}/{m.job_name(run.id)}: waiting for the cluster to run it"
    config = yaml.safe_load(run.config_yaml)
    assert "use_cpu" not in config  # a GPU job, although this machine (where it was validated) has none
    assert config["preprocessing_num_workers"] == 4  # the pod's CPU request, not this machine's cores
    job = job_of(fake, run)
    labels = job["metadata"]["labels"]
    assert labels[m.LABEL_RUN_ID] == str(run.id) and labels[m.LABEL_OWNER] == "alice"
    assert labels[m.LABEL_EXPERIMENT] == services.tracker.experiment_name
    assert job["metadata"]["annotations"][m.ANNOTATION_CONFIG_SHA256] == run.config_sha256
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1" and resources["requests"]["nvidia.com/gpu"] == "1"
    env = env_of(job)
    assert env["MLFLOW_RUN_ID"] == run.mlflow_run_id
    assert env["MLFLOW_EXPERIMENT_NAME"] == services.tracker.experiment_name
    assert env["MLFLOW_TRACKING_URI"] == services.tracker.tracking_uri
    assert fake.get("configmaps", NS, m.config_map_name(run.id))["data"]["config.yaml"] == run.config_yaml
    state = json.loads(run.launcher_state)
    assert (state["job"], state["uid"]) == (m.job_name(run.id), job["metadata"]["uid"])
    assert state["log_path"] == str(Path(run.run_dir) / "job.log")
    assert "gpu_ids" not in state  # no local GPU accounting


def test_a_job_waiting_for_a_node_says_why_then_runs(cluster, fake, monkeypatch):
    _, runs, user, submit = cluster()
    run = submit("unschedulable")
    pod = fake.add_pod(NS, m.job_name(run.id))
    fake.unschedulable(NS, pod, UNSCHEDULABLE)

    runs.poll_active()
    run = runs.get_run(user, run.id)
    assert (run.status, run.status_reason) == (RunStatus.starting, f"waiting for a node: {UNSCHEDULABLE}")
    writes = count_writes(runs, monkeypatch)
    runs.poll_active()
    runs.poll_active()
    assert writes == []  # nothing changed: nothing written
    assert runs.get_run(user, run.id).status == RunStatus.starting

    fake.run(NS, pod, node="gpu-node-7")
    runs.poll_active()
    run = runs.get_run(user, run.id)
    assert (run.status, run.status_reason) == (RunStatus.running, "running on gpu-node-7")
    assert run.started_at is not None
    assert len(writes) == 1


def test_kueue_holds_the_run_in_its_queue(cluster, fake):
    _, runs, user, submit = cluster(k8s={"kueue_queue": "team-a"})
    run = submit("queued_in_kueue")
    assert job_of(fake, run)["spec"]["suspend"] is True

    runs.poll_active()
    run = runs.get_run(user, run.id)
    assert (run.status, run.status_reason) == (RunStatus.starting, "queued: waiting for quota in team-a")

    fake.admit(NS, m.job_name(run.id))
    fake.run(NS, fake.add_pod(NS, m.job_name(run.id)))
    runs.poll_active()
    assert runs.get_run(user, run.id).status == RunStatus.running


def test_an_api_that_does_not_answer_does_not_end_the_run(cluster, fake):
    _, runs, user, submit = cluster()
    run = submit("api_down")
    fake.run(NS, fake.add_pod(NS, m.job_name(run.id)))
    runs.poll_active()
    assert runs.get_run(user, run.id).status == RunStatus.running

    fake.fail("GET", rf"/jobs/{m.job_name(run.id)}$", 503, times=2)  # api_retries 1: two answers, both 503
    runs.poll_active()
    run = runs.get_run(user, run.id)
    assert run.status == RunStatus.running
    assert run.status_reason.startswith("status unknown: ") and "503" in run.status_reason

    runs.poll_active()  # the API is back
    assert runs.get_run(user, run.id).status_reason == "running on gpu-node-1"


def test_a_completed_job_succeeds_and_keeps_its_log_after_the_job_is_deleted(cluster, fake):
    services, runs, user, submit = cluster()
    run = submit("succeeds")
    pod = fake.add_pod(NS, m.job_name(run.id))
    fake.run(NS, pod)
    fake.write_log(NS, pod, "step 1 loss 2.0\n")
    runs.poll_active()
    assert runs.logs(user, run.id) == "step 1 loss 2.0\n"  # from the pod while it runs
    assert not (Path(run.run_dir) / "job.log").exists()

    fake.write_log(NS, pod, "training done\n")
    fake.terminate(NS, pod, 0)
    fake.set_condition(NS, m.job_name(run.id), "Complete")
    runs.poll_active()

    run = runs.get_run(user, run.id)
    assert (run.status, run.exit_code, run.status_reason) == (RunStatus.succeeded, 0, None)
    assert (Path(run.run_dir) / "job.log").read_text() == "step 1 loss 2.0\ntraining done\n"
    assert services.tracker.client.get_run(run.mlflow_run_id).info.status == "FINISHED"

    fake.delete("jobs", NS, m.job_name(run.id))  # the TTL controller takes the Job and its pods
    asked = len(fake.requests)
    assert runs.logs(user, run.id) == "step 1 loss 2.0\ntraining done\n"
    assert len(fake.requests) == asked  # an ended run's log is the saved file: the API is not asked
    runs.poll_active()
    assert runs.get_run(user, run.id).status == RunStatus.succeeded


def test_out_of_memory_fails_the_run_with_the_reason(cluster, fake):
    services, runs, user, submit = cluster()
    run = submit("oom")
    for _ in range(3):  # backoffLimit 2: three tries, each killed
        pod = fake.add_pod(NS, m.job_name(run.id))
        fake.run(NS, pod)
        fake.write_log(NS, pod, "loading the model\n")
        fake.terminate(NS, pod, 137, reason="OOMKilled")
    fake.set_condition(NS, m.job_name(run.id), "Failed", reason="BackoffLimitExceeded",
                       message="Job has reached the specified backoff limit")
    runs.poll_active()

    run = runs.get_run(user, run.id)
    assert (run.status, run.exit_code) == (RunStatus.failed, 137)
    assert run.status_reason.startswith(OOM_REASON)
    assert "loading the model" in (Path(run.run_dir) / "job.log").read_text()
    assert services.tracker.client.get_run(run.mlflow_run_id).info.status == "FAILED"


def test_cancel_deletes_the_job_and_the_run_ends_cancelled(cluster, fake):
    services, runs, user, submit = cluster()
    run = submit("cancel_me")
    pod = fake.add_pod(NS, m.job_name(run.id))
    fake.run(NS, pod)
    fake.write_log(NS, pod, "epoch 1\n")
    runs.poll_active()

    run = runs.cancel(user, run.id)

    assert (run.status, run.status_reason) == (RunStatus.cancelled, "cancelled (requested by alice)")
    assert fake.get("jobs", NS, m.job_name(run.id)) is None and fake.list("pods") == []
    delete = next(r for r in fake.requests if r.method == "DELETE" and r.path.endswith(f"/jobs/{m.job_name(run.id)}"))
    assert delete.body["preconditions"] == {"uid": json.loads(run.launcher_state)["uid"]}
    assert (Path(run.run_dir) / "job.log").read_text() == "epoch 1\n"  # saved before the pods went
    assert services.tracker.client.get_run(run.mlflow_run_id).info.status == "KILLED"


def test_a_refused_cancel_keeps_the_run_and_says_why(cluster, fake):
    _, runs, user, submit = cluster()
    run = submit("cannot_cancel")
    fake.run(NS, fake.add_pod(NS, m.job_name(run.id)))
    runs.poll_active()
    fake.fail("DELETE", r"/jobs/", 403)

    with pytest.raises(PortalError, match=r"marked to be cancelled, but its job could not be stopped: .*may not "
                                          r"delete jobs in namespace llamaboard: grant delete on batch/jobs"):
        runs.cancel(user, run.id)

    run = runs.get_run(user, run.id)
    assert run.status == RunStatus.running and run.cancel_requested
    assert fake.get("jobs", NS, m.job_name(run.id)) is not None  # nothing lost
    runs.poll_active()  # the supervisor goes on following it, and keeps the cancel's reason
    assert runs.get_run(user, run.id).status_reason == "cancelling (requested by alice)"

    run = runs.cancel(user, run.id)  # allowed now
    assert run.status == RunStatus.cancelled
    assert fake.get("jobs", NS, m.job_name(run.id)) is None


def _left_starting(runs, run: Run, minutes_ago: float) -> None:
    """As if the portal stopped after creating the run's Job, before it stored the Job's state."""
    runs._set(run.id, status=RunStatus.starting, launcher_state="{}", status_reason=None,
              started_at=utcnow() - timedelta(minutes=minutes_ago))


def test_a_run_left_starting_adopts_its_job_after_a_restart(cluster, fake):
    services, runs, user, submit = cluster()
    run = submit("adopted")
    state = json.loads(run.launcher_state)
    _left_starting(runs, run, minutes_ago=10)  # long past the 120 s after which a run without a job fails
    runs.launcher = KubernetesLauncher(services.settings, api_client=fake.api_client(), retry_base_delay=0.01)
    fake.run(NS, fake.add_pod(NS, m.job_name(run.id)))

    runs.poll_active()  # what the new portal process's supervisor does first

    run = runs.get_run(user, run.id)
    assert (run.status, run.status_reason) == (RunStatus.running, "running on gpu-node-1")
    adopted = json.loads(run.launcher_state)
    assert adopted == state  # what the start that was cut short would have stored
    assert adopted["log_path"] == str(Path(run.run_dir) / "job.log")


def test_a_run_left_starting_without_its_job_fails(cluster, fake):
    _, runs, user, submit = cluster(max_concurrent_runs=5)
    gone, foreign = submit("no_job_left"), submit("not_its_job")
    fake.delete("jobs", NS, m.job_name(gone.id))
    # a Job with this run's id but another config (an older database's run 2, say): not this run's
    fake.modify("jobs", NS, m.job_name(foreign.id),
                lambda job: job["metadata"]["annotations"].update({m.ANNOTATION_CONFIG_SHA256: "0" * 64}))
    recent = submit("just_left")
    fake.delete("jobs", NS, m.job_name(recent.id))
    _left_starting(runs, gone, minutes_ago=10)
    _left_starting(runs, foreign, minutes_ago=10)
    _left_starting(runs, recent, minutes_ago=0)

    runs.poll_active()

    for run in (gone, foreign):
        run = runs.get_run(user, run.id)
        assert (run.status, run.status_reason) == (RunStatus.failed, "the portal stopped while it was starting this job")
        assert run.launcher_state == "{}"
    recent = runs.get_run(user, recent.id)
    assert recent.status == RunStatus.starting  # within 120 s: it may still be being submitted


def test_the_portals_run_limit_still_holds_on_a_cluster(cluster, fake):
    _, runs, user, submit = cluster(max_concurrent_runs=1)
    first, second = submit("first"), submit("second")
    assert runs.get_run(user, second.id).status == RunStatus.queued
    assert fake.get("jobs", NS, m.job_name(second.id)) is None

    fake.set_condition(NS, m.job_name(first.id), "Complete")
    runs.poll_active()
    runs.dispatch()
    assert runs.get_run(user, first.id).status == RunStatus.succeeded
    assert runs.get_run(user, second.id).status == RunStatus.starting
    assert job_of(fake, second)["metadata"]["labels"][m.LABEL_RUN_ID] == str(second.id)


# ---- GPUs per node and nodes, per run ------------------------------------------------------

@pytest.mark.parametrize("multi_node", ["jobset", "indexed"])
def test_a_run_on_two_nodes_with_four_gpus_each(cluster, fake, multi_node):
    services, _, _, submit = cluster(k8s={"multi_node": multi_node})

    run = submit("two_nodes", gpus_per_node=4, nodes=2)

    assert (run.gpus, run.nodes, run.status) == (8, 2, RunStatus.starting)  # gpus: the whole run's, for the quota
    if multi_node == "jobset":
        workload = fake.get("jobsets", NS, m.job_name(run.id))
        job_spec = workload["spec"]["replicatedJobs"][0]["template"]["spec"]
    else:
        workload = job_of(fake, run)
        job_spec = workload["spec"]
    assert json.loads(run.launcher_state)["kind"] == workload["kind"]
    assert (job_spec["completionMode"], job_spec["completions"], job_spec["parallelism"]) == ("Indexed", 2, 2)
    container = job_spec["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "4"  # per pod, one pod per node
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    env = env_of({"spec": job_spec})
    assert (env["NNODES"], env["NPROC_PER_NODE"], env["FORCE_TORCHRUN"]) == ("2", "4", "1")
    params = services.tracker.client.get_run(run.mlflow_run_id).data.params
    assert (params["portal.gpus"], params["portal.nodes"]) == ("8", "2")


@pytest.mark.parametrize("placement, key, words", [
    ({"gpus_per_node": 9}, "gpus", "choose 0 to 8 (kubernetes.max_gpus_per_node"),
    ({"gpus_per_node": -1}, "gpus", "choose 0 to 8"),
    ({"nodes": 5}, "nodes", "choose 1 to 4 (kubernetes.max_nodes"),
    ({"nodes": 0}, "nodes", "choose 1 to 4"),
    ({"gpus_per_node": 0, "nodes": 2}, "nodes", "need 1 or more GPUs per node"),
])
def test_gpus_and_nodes_out_of_bounds_are_refused_by_key(cluster, fake, placement, key, words):
    _, runs, user, submit = cluster()
    with pytest.raises(ConfigRejected) as info:
        submit("out_of_bounds", **placement)
    assert words in info.value.problems[key], info.value.problems
    assert runs.list_runs(user) == [] and fake.list("jobs") == [] and fake.list("jobsets") == []


def test_the_admins_bounds_and_the_user_gpu_cap_count_every_gpu_of_the_run(cluster, fake):
    _, runs, user, submit = cluster(max_gpus_per_user=6, max_concurrent_runs=3,
                                    k8s={"max_gpus_per_node": 2, "max_nodes": 8})
    run = submit("wide", gpus_per_node=2, nodes=3)  # 6 GPUs: within the cap
    assert (run.gpus, run.nodes) == (6, 3)
    with pytest.raises(ConfigRejected) as info:
        submit("too_wide", gpus_per_node=2, nodes=4)  # 8 GPUs
    assert "a run takes 8 GPU(s) but users may hold 6" in info.value.problems["gpus"]
    waiting = submit("one_more", gpus_per_node=1)  # 6 + 1 held at once: it waits for the first
    assert runs.get_run(user, waiting.id).status == RunStatus.queued
    assert "holds 6 GPU(s); this run needs 1" in runs.get_run(user, waiting.id).status_reason


def test_the_api_takes_gpus_and_nodes(cluster, fake):
    services, runs, user, _ = cluster()
    app = FastAPI()
    app.include_router(build_api(runs, lambda request: user))
    client = TestClient(app)
    model_dir = services.settings.shared_models_root / "tiny-llama"
    text = args_to_yaml(form_to_args(demo_form(model_dir, "api_two_nodes"), form_defaults()))

    created = client.post("/api/runs", json={"yaml": text, "gpus": 2, "nodes": 2})
    assert created.status_code == 201, created.text
    assert (created.json()["gpus"], created.json()["nodes"]) == (4, 2)
    assert fake.get("jobsets", NS, m.job_name(created.json()["id"])) is not None
    refused = client.post("/api/runs", json={"yaml": text.replace("api_two_nodes", "api_x"), "nodes": 9})
    assert refused.status_code == 422
    assert "kubernetes.max_nodes" in refused.json()["problems"]["nodes"]
    checked = client.post("/api/validate", json={"yaml": text, "gpus": 0, "nodes": 2}).json()
    assert not checked["valid"] and "GPUs per node" in checked["problems"]["nodes"]


def test_a_loopback_mlflow_with_the_kubernetes_launcher_is_warned_about(tmp_path):
    from portal.config import Settings
    from portal.services import unreachable_tracking_warning

    embedded = Settings(data_root=tmp_path, launcher="kubernetes")  # the portal's own MLflow on 127.0.0.1
    assert "PORTAL_MLFLOW_TRACKING_URI" in unreachable_tracking_warning(embedded)
    assert unreachable_tracking_warning(Settings(data_root=tmp_path, launcher="kubernetes",
                                                 mlflow_tracking_uri="http://localhost:5000")) is not None
    assert unreachable_tracking_warning(Settings(data_root=tmp_path, launcher="kubernetes",
                                                 mlflow_tracking_uri="http://mlflow.ml-platform:5000")) is None
    assert unreachable_tracking_warning(Settings(data_root=tmp_path)) is None  # local jobs share the loopback
