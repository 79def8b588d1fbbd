"""The Kubernetes launcher against an HTTP fake of the API server (tests/k8s_fake_api.py): the
official ``kubernetes`` client talks to it over a real socket. No API server can run here."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from k8s_fake_api import FakeKubernetes

from portal.config import Settings
from portal.launchers import JobSpec, LaunchError, make_launcher
from portal.launchers import k8s_manifests as m
from portal.launchers.k8s_settings import KubernetesSettings
from portal.launchers.kubernetes import (
    EXIT_IMAGE,
    EXIT_UNKNOWN,
    OOM_REASON,
    KubernetesLauncher,
)

NS = "llamaboard"
JOB = m.job_name(1)
CONFIG = "model_name_or_path: /data/models/tiny\nstage: sft\n"
UNSCHEDULABLE = ("0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: "
                 "3 No preemption victims found for incoming pod.")


@pytest.fixture
def fake():
    with FakeKubernetes() as server:
        yield server


def make_settings(tmp_path: Path, **k8s) -> Settings:
    values = {"api_retries": 2, "api_timeout_seconds": 2.0, **k8s}
    return Settings(data_root=tmp_path, launcher="kubernetes", kubernetes=KubernetesSettings(**values))


def make_launcher_for(fake: FakeKubernetes, settings: Settings) -> KubernetesLauncher:
    return KubernetesLauncher(settings, api_client=fake.api_client(), retry_base_delay=0.001, poll_interval=0.01)


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path)


@pytest.fixture
def launcher(fake, settings):
    return make_launcher_for(fake, settings)


def make_spec(settings: Settings, run_id: int = 1, owner: str = "alice", gpus: int = 1, nodes: int = 1) -> JobSpec:
    workdir = Path(settings.data_root) / "users" / owner / "runs" / str(run_id)
    workdir.mkdir(parents=True, exist_ok=True)
    return JobSpec(run_id=run_id, name=f"run {run_id}", owner=owner, argv=["llamafactory-cli", "train", "config.yaml"],
                   workdir=workdir, log_path=workdir / "job.log", env={"MLFLOW_RUN_ID": "0123abcd"},
                   gpus=gpus, nodes=nodes, config_yaml=CONFIG, experiment="team-exp")


def take(events, count: int, timeout: float = 5.0) -> list:
    """The next ``count`` events of a watch, failing (not hanging) when they do not come."""
    got: list = []
    done = threading.Event()

    def pull():
        try:
            got.extend(next(events) for _ in range(count))
        finally:
            done.set()

    threading.Thread(target=pull, daemon=True).start()
    assert done.wait(timeout), f"{count} events were expected within {timeout} s"
    return got


def posts(fake: FakeKubernetes, plural: str) -> list:
    return [r for r in fake.requests if r.method == "POST" and r.path.endswith(f"/{plural}")]


# ---- start -----------------------------------------------------------------------------
def test_registered_by_name(settings):
    assert isinstance(make_launcher("kubernetes", settings), KubernetesLauncher)


def test_start_creates_the_job_and_a_config_map_it_owns(fake, launcher, settings):
    state = launcher.start(make_spec(settings))

    job = fake.get("jobs", NS, JOB)
    assert state == {"namespace": NS, "job": JOB, "kind": "Job", "uid": job["metadata"]["uid"], "nodes": 1,
                     "run_id": 1, "log_path": str(make_spec(settings).log_path)}
    assert job["metadata"]["labels"][m.LABEL_RUN_ID] == "1"
    config_map = fake.get("configmaps", NS, m.config_map_name(1))
    assert config_map["data"]["config.yaml"] == CONFIG
    assert config_map["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": JOB, "uid": job["metadata"]["uid"]}]
    # the ConfigMap exists before the Job whose pods mount it
    kinds = [r.path.rsplit("/", 1)[-1] for r in fake.requests if r.method == "POST"]
    assert kinds == ["configmaps", "jobs"]
    assert launcher.poll(state).phase == "starting"


def test_a_job_with_a_pending_then_running_pod_ends_succeeded_with_its_log_saved(fake, launcher, settings):
    spec = make_spec(settings)
    state = launcher.start(spec)
    pod = fake.add_pod(NS, JOB)
    fake.unschedulable(NS, pod, UNSCHEDULABLE)
    waiting = launcher.poll(state)
    assert (waiting.exit_code, waiting.phase) == (None, "queued")
    assert waiting.reason == f"waiting for a node: {UNSCHEDULABLE}"

    fake.waiting(NS, pod, "ContainerCreating")
    assert launcher.poll(state).reason == "starting the container on gpu-node-1"
    fake.run(NS, pod, node="gpu-node-7")
    fake.write_log(NS, pod, "step 1 loss 2.0\nstep 2 loss 1.5\n")
    running = launcher.poll(state)
    assert (running.exit_code, running.reason, running.phase) == (None, "running on gpu-node-7", "running")
    assert launcher.logs(state, spec.log_path) == "step 1 loss 2.0\nstep 2 loss 1.5\n"
    assert not spec.log_path.exists()  # saved once, when the job ends

    fake.write_log(NS, pod, "done\n")
    fake.terminate(NS, pod, 0)
    fake.set_condition(NS, JOB, "Complete")
    assert launcher.poll(state).exit_code == 0
    assert spec.log_path.read_text() == "step 1 loss 2.0\nstep 2 loss 1.5\ndone\n"

    fake.delete("jobs", NS, JOB)  # the TTL controller takes the Job and its pods
    assert fake.list("pods") == []
    assert launcher.logs(state, spec.log_path) == "step 1 loss 2.0\nstep 2 loss 1.5\ndone\n"


def test_out_of_memory_is_named(fake, launcher, settings):
    state = launcher.start(make_spec(settings))
    for _ in range(3):  # backoffLimit 2: three tries
        pod = fake.add_pod(NS, JOB)
        fake.run(NS, pod)
        fake.terminate(NS, pod, 137, reason="OOMKilled")
    fake.set_condition(NS, JOB, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    result = launcher.poll(state)
    assert result.exit_code == 137
    assert result.reason == f"{OOM_REASON} (failed 3 times)"


def test_a_retry_in_progress_says_why_the_last_try_failed(fake, launcher, settings):
    state = launcher.start(make_spec(settings))
    first = fake.add_pod(NS, JOB)
    fake.terminate(NS, first, 1, pod_reason="Evicted", message="The node was low on resource: memory.")
    fake.run(NS, fake.add_pod(NS, JOB))
    result = launcher.poll(state)
    assert result.exit_code is None
    assert result.reason == ("running on gpu-node-1 (try 2; the last one failed: evicted from its node: "
                             "The node was low on resource: memory.)")


def test_evicted_job_failure(fake, launcher, settings):
    state = launcher.start(make_spec(settings))
    pod = fake.add_pod(NS, JOB)
    fake.terminate(NS, pod, 143, pod_reason="Evicted", message="The node had condition: [DiskPressure].")
    fake.set_condition(NS, JOB, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    result = launcher.poll(state)
    assert (result.exit_code, result.reason) == (143, "evicted from its node: The node had condition: [DiskPressure].")


def test_deadline_exceeded(fake, launcher, settings):
    state = launcher.start(make_spec(settings))
    fake.run(NS, fake.add_pod(NS, JOB))
    fake.set_condition(NS, JOB, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
    result = launcher.poll(state)
    assert result.exit_code == EXIT_UNKNOWN
    assert result.reason == f"stopped after the deadline (activeDeadlineSeconds={7 * 24 * 3600})"


def test_a_bad_config_exit_code_is_not_retried(fake, launcher, settings):
    state = launcher.start(make_spec(settings))
    pod = fake.add_pod(NS, JOB)
    fake.terminate(NS, pod, 2)
    message = f"Container trainer for pod {NS}/{pod} failed with exit code 2 matching FailJob rule at index 0"
    fake.set_condition(NS, JOB, "Failed", "PodFailurePolicy", message)
    result = launcher.poll(state)
    assert result.exit_code == 2
    assert result.reason.startswith("exited with code 2") and "not retried" in result.reason

    fake.delete("pods", NS, pod)  # pods gone: the exit code still comes from the condition's message
    assert launcher.poll(state).exit_code == 2


def test_kueue_holds_the_job_until_it_admits_it(fake, tmp_path):
    settings = make_settings(tmp_path, kueue_queue="gpu-{user}")
    launcher = make_launcher_for(fake, settings)
    state = launcher.start(make_spec(settings))
    assert fake.get("jobs", NS, JOB)["spec"]["suspend"] is True
    queued = launcher.poll(state)
    assert (queued.exit_code, queued.reason, queued.phase) == (None, "queued: waiting for quota in gpu-alice", "queued")
    assert not [r for r in fake.requests if r.path.endswith("/pods")]  # no pods to look for while suspended

    fake.admit(NS, JOB)
    fake.run(NS, fake.add_pod(NS, JOB))
    assert launcher.poll(state).phase == "running"


def test_an_image_that_does_not_exist_fails_the_run_and_frees_its_quota(fake, launcher, settings):
    state = launcher.start(make_spec(settings))
    pod = fake.add_pod(NS, JOB)
    message = ('Back-off pulling image "llamaboard-trainer:latest": ErrImagePull: rpc error: code = NotFound '
               'desc = failed to pull and unpack image: manifest unknown')
    fake.waiting(NS, pod, "ImagePullBackOff", message)
    result = launcher.poll(state)
    assert result.exit_code == EXIT_IMAGE
    assert "llamaboard-trainer:latest" in result.reason and "manifest unknown" in result.reason
    assert fake.get("jobs", NS, JOB) is None and fake.list("pods") == []


def test_a_passing_pull_error_keeps_the_run_waiting(fake, launcher, settings):
    state = launcher.start(make_spec(settings))
    pod = fake.add_pod(NS, JOB)
    fake.waiting(NS, pod, "ErrImagePull", "dial tcp 10.0.0.5:443: i/o timeout")
    result = launcher.poll(state)
    assert (result.exit_code, result.phase) == (None, "starting")
    assert result.reason == ("waiting for the image llamaboard-trainer:latest (ErrImagePull): "
                             "dial tcp 10.0.0.5:443: i/o timeout")
    assert fake.get("jobs", NS, JOB) is not None


def test_a_job_deleted_behind_the_portals_back_ends_the_run(fake, launcher, settings):
    state = launcher.start(make_spec(settings))
    fake.delete("jobs", NS, JOB)
    result = launcher.poll(state)
    assert result.exit_code == EXIT_UNKNOWN and result.reason.startswith("the Job was deleted")


# ---- API errors --------------------------------------------------------------------------
def test_a_retried_start_adopts_its_own_job(fake, launcher, settings):
    first = launcher.start(make_spec(settings))
    again = launcher.start(make_spec(settings))
    assert again == first
    assert len(fake.list("jobs")) == 1


def test_a_create_whose_answer_was_lost_is_retried_and_adopted(fake, tmp_path):
    settings = make_settings(tmp_path, api_timeout_seconds=0.3)
    launcher = make_launcher_for(fake, settings)
    fake.hang("POST", r"/jobs$", 1.0, after_work=True)  # the Job is made, the answer never arrives
    state = launcher.start(make_spec(settings))
    assert len(posts(fake, "jobs")) == 2  # the retry answered 409 AlreadyExists: ours, adopted
    assert state["uid"] == fake.get("jobs", NS, JOB)["metadata"]["uid"]


def test_a_job_of_that_name_that_is_not_this_runs_is_refused(fake, launcher, settings):
    fake.create("jobs", NS, {"metadata": {"name": JOB, "labels": {m.LABEL_RUN_ID: "1"}},
                             "spec": {"template": {"spec": {"containers": [{"name": "x", "image": "y"}]}}}})
    with pytest.raises(LaunchError, match=f"a Job named {JOB} already exists in namespace {NS} and is not this run's"):
        launcher.start(make_spec(settings))
    assert fake.list("configmaps") == []  # its ConfigMap is not left behind


def test_forbidden_names_the_missing_permission(fake, launcher, settings):
    fake.fail("POST", r"/jobs$", 403)
    with pytest.raises(LaunchError) as failure:
        launcher.start(make_spec(settings))
    assert str(failure.value) == (
        "the portal's ServiceAccount (system:serviceaccount:llamaboard:portal) may not create jobs in namespace "
        "llamaboard: grant create on batch/jobs (see deploy/base/rbac.yaml)")
    assert len(posts(fake, "jobs")) == 1  # a 403 is not retried
    assert fake.list("configmaps") == []


def test_forbidden_patch_of_the_config_map_undoes_the_job(fake, launcher, settings):
    fake.fail("PATCH", r"/configmaps/", 403)
    with pytest.raises(LaunchError, match="may not patch configmaps in namespace llamaboard: grant patch on configmaps"):
        launcher.start(make_spec(settings))
    assert fake.list("jobs") == []


def test_server_errors_are_retried(fake, launcher, settings):
    fake.fail("POST", r"/jobs$", 500, times=2)
    fake.fail("GET", rf"/jobs/{JOB}$", 503)
    fake.fail("GET", r"/pods$", 429)
    state = launcher.start(make_spec(settings))
    assert len(posts(fake, "jobs")) == 3
    assert launcher.poll(state).phase == "starting"


def test_server_errors_that_last_give_up_with_a_clear_error(fake, launcher, settings):
    fake.fail("POST", r"/configmaps$", 500, times=10)
    with pytest.raises(LaunchError, match=r"could not create configmaps .*InternalError.*etcdserver.*tried 3 times"):
        launcher.start(make_spec(settings))
    assert len(posts(fake, "configmaps")) == 3


def test_an_api_that_does_not_answer_is_retried_then_reported(fake, tmp_path):
    settings = make_settings(tmp_path, api_timeout_seconds=0.2)
    launcher = make_launcher_for(fake, settings)
    state = launcher.start(make_spec(settings))
    fake.hang("GET", rf"/jobs/{JOB}$", 1.0)  # once: the retry answers
    assert launcher.poll(state).phase == "starting"

    fake.hang("GET", rf"/jobs/{JOB}$", 1.0, times=3)
    began = time.monotonic()
    result = launcher.poll(state)  # an outage does not end the run: it says so
    assert time.monotonic() - began < 2.0
    assert (result.exit_code, result.phase) == (None, "unknown")
    assert "the Kubernetes API did not answer (get jobs llamaboard-run-1 in namespace llamaboard, 3 tries" in result.reason

    fake.hang("POST", r"/configmaps$", 1.0, times=3)
    with pytest.raises(LaunchError, match="did not answer"):
        launcher.start(make_spec(settings, run_id=2))


# ---- stop, logs -------------------------------------------------------------------------
def test_stop_deletes_the_job_with_its_pods_and_keeps_the_log(fake, launcher, settings):
    spec = make_spec(settings)
    state = launcher.start(spec)
    pod = fake.add_pod(NS, JOB)
    fake.run(NS, pod)
    fake.write_log(NS, pod, "epoch 1\n")
    fake.foreground_delay_gets = 2  # the Job stays, being deleted, while its pods stop

    assert launcher.poll(state).phase == "running"
    launcher.stop(state, grace_seconds=5)

    assert fake.get("jobs", NS, JOB) is None
    assert fake.list("pods") == [] and fake.list("configmaps") == []  # the ConfigMap went with its owner
    deletes = [r for r in fake.requests if r.method == "DELETE"]
    assert deletes[0].path.endswith(f"/jobs/{JOB}")
    assert deletes[0].body["propagationPolicy"] == "Foreground"
    assert deletes[0].body["preconditions"] == {"uid": state["uid"]}
    assert deletes[1].path.endswith(f"/pods/{pod}") and deletes[1].body["gracePeriodSeconds"] == 5
    assert spec.log_path.read_text() == "epoch 1\n"
    assert launcher.poll(state).reason.startswith("the Job was deleted")
    launcher.stop(state, grace_seconds=5)  # stopping a stopped job is fine


def test_logs_of_several_nodes_put_rank_0_first(fake, tmp_path):
    settings = make_settings(tmp_path, multi_node="indexed")
    launcher = make_launcher_for(fake, settings)
    spec = make_spec(settings, gpus=2, nodes=2)
    state = launcher.start(spec)
    job = fake.get("jobs", NS, JOB)
    service = fake.get("services", NS, JOB)  # made after the Job, already owned by it
    assert service["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert state["nodes"] == 2

    rank1 = fake.add_pod(NS, JOB, index=1)
    rank0 = fake.add_pod(NS, JOB, index=0)
    fake.run(NS, rank0, node="gpu-a")
    assert launcher.poll(state).reason == "starting the container (1 of 2 pods running)"
    fake.run(NS, rank1, node="gpu-b")
    assert launcher.poll(state).reason == "running on 2 nodes"
    fake.write_log(NS, rank1, "worker ready\n")
    fake.write_log(NS, rank0, "master ready\nstep 1\n")
    assert launcher.logs(state, spec.log_path) == "master ready\nstep 1\n[rank 1] worker ready\n"

    fake.terminate(NS, rank0, 0)
    fake.terminate(NS, rank1, 0)
    fake.set_condition(NS, JOB, "Complete")
    assert launcher.poll(state).exit_code == 0
    assert spec.log_path.read_text() == "master ready\nstep 1\n[rank 1] worker ready\n"


def test_a_log_tail_is_cut_at_a_line(fake, launcher, settings):
    spec = make_spec(settings)
    state = launcher.start(spec)
    pod = fake.add_pod(NS, JOB)
    fake.run(NS, pod)
    fake.write_log(NS, pod, "".join(f"line {i}\n" for i in range(1000)))
    tail = launcher.logs(state, spec.log_path, tail_bytes=100)
    assert tail.endswith("line 999\n") and tail.startswith("line ") and len(tail) <= 100


def test_logs_before_the_container_starts_are_empty(fake, launcher, settings):
    spec = make_spec(settings)
    state = launcher.start(spec)
    fake.add_pod(NS, JOB)  # Pending: the API answers 400 "waiting to start"
    assert launcher.logs(state, spec.log_path) == ""
    assert launcher.logs({}, spec.log_path) == ""


def test_follow_logs_streams_until_the_pod_ends(fake, launcher, settings):
    state = launcher.start(make_spec(settings))
    pod = fake.add_pod(NS, JOB)
    fake.run(NS, pod)
    fake.write_log(NS, pod, "one\n")
    lines = launcher.follow_logs(state)
    assert next(lines) == "one"
    fake.write_log(NS, pod, "two\n")
    assert next(lines) == "two"
    fake.terminate(NS, pod, 0)
    assert list(lines) == []


# ---- several nodes with JobSet -----------------------------------------------------------
def test_a_jobset_run(fake, tmp_path):
    settings = make_settings(tmp_path, multi_node="jobset")
    launcher = make_launcher_for(fake, settings)
    spec = make_spec(settings, gpus=4, nodes=2)
    state = launcher.start(spec)
    assert state["kind"] == "JobSet"
    jobset = fake.get("jobsets", NS, JOB)
    config_map = fake.get("configmaps", NS, m.config_map_name(1))
    assert config_map["metadata"]["ownerReferences"][0] == {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "name": JOB, "uid": jobset["metadata"]["uid"]}

    pods = [fake.add_pod(NS, JOB, plural="jobsets", index=i) for i in range(2)]
    for pod in pods:
        fake.run(NS, pod)
    fake.write_log(NS, pods[0], "hello from 0\n")
    assert launcher.poll(state).phase == "running"
    fake.terminate(NS, pods[1], 137, reason="OOMKilled")
    fake.set_condition(NS, JOB, "Failed", "FailedJobs", "jobset failed due to failed job", plural="jobsets")
    assert launcher.poll(state).reason == OOM_REASON
    assert spec.log_path.read_text() == "hello from 0\n"

    launcher.stop(state, grace_seconds=0)
    assert fake.list("jobsets") == [] and fake.list("pods") == [] and fake.list("configmaps") == []


def test_gpus_that_do_not_split_over_the_nodes_are_refused(launcher, settings):
    with pytest.raises(LaunchError, match="3 GPUs cannot be spread evenly over 2 nodes"):
        launcher.start(make_spec(settings, gpus=3, nodes=2))


# ---- after a restart -----------------------------------------------------------------------
def test_reconcile_finds_the_runs_jobs_after_a_restart(fake, settings):
    before = make_launcher_for(fake, settings)
    states = [before.start(make_spec(settings, run_id=run_id)) for run_id in (1, 2)]
    fake.create("jobs", NS, {"metadata": {"name": "someone-elses", "labels": {"app": "other"}},
                             "spec": {"template": {"spec": {"containers": []}}}})

    after = make_launcher_for(fake, settings)  # a new portal process
    found = after.reconcile()
    assert [s["run_id"] for s in found] == [1, 2]
    assert [(s["job"], s["uid"]) for s in found] == [(s["job"], s["uid"]) for s in states]
    fake.run(NS, fake.add_pod(NS, m.job_name(2)))
    assert after.poll(found[1]).phase == "running"


def test_reconcile_across_the_users_namespaces(fake, tmp_path):
    settings = make_settings(tmp_path, namespace_template="llm-{user}")
    launcher = make_launcher_for(fake, settings)
    launcher.start(make_spec(settings, run_id=1, owner="alice"))
    launcher.start(make_spec(settings, run_id=2, owner="bob"))
    found = make_launcher_for(fake, settings).reconcile()
    assert [(s["run_id"], s["namespace"]) for s in found] == [(1, "llm-alice"), (2, "llm-bob")]
    assert any(r.path == "/apis/batch/v1/jobs" for r in fake.requests)  # one list across namespaces


def test_the_watch_resumes_after_a_drop_without_losing_or_repeating_events(fake, launcher, settings):
    launcher.start(make_spec(settings))
    events = launcher.watch_jobs()
    [first] = take(events, 1)
    assert (first.type, first.job["metadata"]["name"]) == ("ADDED", JOB)

    fake.drop_watch(after_events=2)
    versions = []
    for step in range(5):
        changed = fake.modify("jobs", NS, JOB, lambda job, step=step: job["metadata"]["labels"].update(step=str(step)))
        versions.append(changed["metadata"]["resourceVersion"])
    seen = take(events, 5)
    events.close()

    assert [e.job["metadata"]["resourceVersion"] for e in seen] == versions
    assert [e.job["metadata"]["labels"]["step"] for e in seen] == ["0", "1", "2", "3", "4"]
    watches = fake.watch_requests()
    assert len(watches) == 2
    assert watches[1].query["resourceVersion"] == versions[1]  # resumed after the last event it had


def test_the_watch_lists_again_when_its_version_is_gone(fake, launcher, settings):
    launcher.start(make_spec(settings, run_id=1))
    launcher.start(make_spec(settings, run_id=2))
    events = launcher.watch_jobs()
    assert sorted(e.job["metadata"]["name"] for e in take(events, 2)) == [m.job_name(1), m.job_name(2)]
    modified = fake.modify("jobs", NS, m.job_name(1), lambda job: job["metadata"]["labels"].update(step="a"))
    assert [e.type for e in take(events, 1)] == ["MODIFIED"]

    with fake.lock:  # while the stream is down and its history compacted: one change, one deletion
        fake.modify("jobs", NS, m.job_name(1), lambda job: job["metadata"]["labels"].update(step="b"))
        fake.delete("jobs", NS, m.job_name(2))
        fake.compact(cut_watches=True)
    resynced = take(events, 2)
    events.close()

    assert sorted((e.type, e.job["metadata"]["name"]) for e in resynced) == [
        ("DELETED", m.job_name(2)), ("MODIFIED", m.job_name(1))]
    # it first tried to resume from the last version it had, which was gone
    assert fake.watch_requests()[1].query["resourceVersion"] == modified["metadata"]["resourceVersion"]
    lists = [r for r in fake.requests if r.method == "GET" and r.path.endswith("/jobs") and "watch" not in r.query]
    assert len(lists) == 2  # the first list, and the one after 410 Gone


# ---- configuration -----------------------------------------------------------------------
def test_a_kubeconfig_and_its_context_are_used(fake, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters:
- {{name: wrong, cluster: {{server: "http://127.0.0.1:9"}}}}
- {{name: fake, cluster: {{server: "{fake.url}"}}}}
users:
- {{name: portal, user: {{token: abc}}}}
contexts:
- {{name: other, context: {{cluster: wrong, user: portal}}}}
- {{name: test, context: {{cluster: fake, user: portal}}}}
current-context: other
""")
    settings = make_settings(tmp_path, kubeconfig=str(kubeconfig), context="test")
    launcher = KubernetesLauncher(settings, retry_base_delay=0.001)
    state = launcher.start(make_spec(settings))
    assert fake.get("jobs", NS, JOB)["metadata"]["uid"] == state["uid"]


def test_outside_a_cluster_without_a_kubeconfig_the_error_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    settings = make_settings(tmp_path)
    with pytest.raises(LaunchError, match=r"cannot load the Kubernetes configuration .*\(set kubernetes.kubeconfig outside a cluster\)"):
        KubernetesLauncher(settings).start(make_spec(settings))


def test_a_missing_namespace_is_named(fake, launcher, settings):
    fake.namespaces = {"default"}
    with pytest.raises(LaunchError, match="namespace llamaboard does not exist: create it, or check kubernetes.namespace"):
        launcher.start(make_spec(settings))
