"""The Kubernetes manifests: what the launcher generates, deploy/ and images/.

No API server can run here, so every object is checked against the official schemas instead:
built-in kinds with kubernetes-validate (strict: an unknown field fails) for the oldest and the
newest Kubernetes we claim, JobSet and Kueue kinds with their CRDs' openAPIV3Schema (kept in
tests/data/k8s, made strict the same way). Names and labels are checked with the API server's
own rules, which the schemas do not carry.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement

from portal.launchers import k8s_manifests as km
from portal.launchers.base import JobSpec
from portal.launchers.k8s_settings import KubernetesSettings, SecretRef

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
IMAGES = REPO / "images"
CRD_DIR = Path(__file__).resolve().parent / "data" / "k8s"
# podFailurePolicy is GA from 1.31; the newest is what this kubernetes-validate knows
KUBERNETES_VERSIONS = ("1.31", kubernetes_validate.utils.latest_version())
DATA_ROOT = Path("/data")

# ---- the API server's own name rules (the OpenAPI schemas have none) --------------------
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# names that must be DNS labels rather than subdomains
DNS_LABEL_KINDS = {"Namespace", "Service", "Job", "JobSet", "LocalQueue"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "ClusterQueue",
                  "ResourceFlavor", "PriorityClass", "StorageClass"}


def check_label_key(key: str) -> None:
    prefix, _, name = key.rpartition("/")
    assert not prefix or DNS_SUBDOMAIN.match(prefix), f"label key prefix {prefix!r}"
    assert name and len(name) <= 63 and re.match(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", name), key


def check_metadata(doc: dict) -> None:
    meta = doc["metadata"]
    kind = doc["kind"]
    name_rule = DNS_LABEL if kind in DNS_LABEL_KINDS else DNS_SUBDOMAIN
    assert name_rule.match(meta["name"]), f"{kind} name {meta['name']!r}"
    if kind in CLUSTER_SCOPED:
        assert "namespace" not in meta, f"{kind}/{meta['name']} is cluster-scoped but names a namespace"
    else:
        assert DNS_LABEL.match(meta.get("namespace", "")), f"{kind}/{meta['name']} needs its namespace"
    for key, value in meta.get("labels", {}).items():
        check_label_key(key)
        assert isinstance(value, str) and len(value) <= 63 and LABEL_VALUE.match(value), f"label {key}={value!r}"
    for key, value in meta.get("annotations", {}).items():
        check_label_key(key)
        assert isinstance(value, str), f"annotation {key}"


# ---- schemas ------------------------------------------------------------------------------
def strict(schema):
    """A CRD's structural schema as the API server applies it with fieldValidation=Strict:
    an object with listed properties takes no others (unless it preserves unknown fields)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validators() -> dict[tuple[str, str], tuple[jsonschema.Draft202012Validator, str]]:
    validators = {}
    for path in sorted(CRD_DIR.glob("*.json")):
        crd = json.loads(path.read_text())
        schema = strict(crd["openAPIV3Schema"])
        validators[(f"{crd['group']}/{crd['version']}", crd["kind"])] = (jsonschema.Draft202012Validator(schema),
                                                                         crd["scope"])
    return validators


def describe(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def validate_builtin(doc: dict) -> None:
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{describe(doc)} is not a valid object of Kubernetes {version} at {err.json_path}: "
                        f"{err.message}")


def validate(doc: dict) -> None:
    """One object against the schema of its kind: built-in or one of the CRDs kept here."""
    check_metadata(doc)
    crd = crd_validators().get((doc["apiVersion"], doc["kind"]))
    if crd is None:
        validate_builtin(doc)
        return
    validator, scope = crd
    errors = sorted(validator.iter_errors(doc), key=lambda e: e.json_path)
    assert not errors, f"{describe(doc)}: " + "; ".join(f"{e.json_path}: {e.message}" for e in errors)
    assert (scope == "Cluster") == (doc["kind"] in CLUSTER_SCOPED)
    # the CRD leaves metadata open: check it as the API server does for every object
    validate_builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})
    if doc["kind"] == "JobSet":  # and its Jobs as the Job API of each Kubernetes version
        for replicated in doc["spec"]["replicatedJobs"]:
            validate_builtin({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": replicated["name"]},
                              "spec": replicated["template"]["spec"]})


def test_the_validators_refuse_what_the_api_server_refuses():
    """The checks below mean something only if they can fail."""
    k8s = KubernetesSettings()
    job = next(d for d in build(gpus_per_node=1, k8s=k8s) if d["kind"] == "Job")
    bad_field = copy.deepcopy(job)
    bad_field["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(pytest.fail.Exception, match="gpus"):
        validate(bad_field)
    bad_label = copy.deepcopy(job)
    bad_label["metadata"]["labels"][km.LABEL_OWNER] = "Alice Smith"
    with pytest.raises(AssertionError, match="label"):
        validate(bad_label)
    jobset = next(d for d in build(gpus_per_node=1, nodes=2, k8s=k8s) if d["kind"] == "JobSet")
    bad_jobset = copy.deepcopy(jobset)
    bad_jobset["spec"]["failurePolicy"]["rules"][0]["action"] = "Retry"
    with pytest.raises(AssertionError, match="Retry"):
        validate(bad_jobset)
    unknown_in_crd = copy.deepcopy(jobset)
    unknown_in_crd["spec"]["network"]["hostnames"] = True
    with pytest.raises(AssertionError, match="hostnames"):
        validate(unknown_in_crd)
    bad_pod_in_jobset = copy.deepcopy(jobset)
    bad_pod_in_jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["restartPolicy"] = 3
    with pytest.raises(AssertionError):
        validate(bad_pod_in_jobset)


# ---- building a run's manifests ----------------------------------------------------------
CONFIG_YAML = ("### portal header\nmodel_name_or_path: /data/shared/models/tiny\nstage: sft\n"
               "output_dir: /data/users/alice/runs/sft-1/output\n")
CONFIG_SHA = hashlib.sha256(CONFIG_YAML.encode()).hexdigest()
MLFLOW_ENV = {"MLFLOW_TRACKING_URI": "https://mlflow.example.com", "MLFLOW_RUN_ID": "0123abcd",
              "MLFLOW_EXPERIMENT_NAME": "llamaboard-portal"}


def make_spec(owner: str = "alice", run_id: int = 42, env: dict | None = None) -> JobSpec:
    run_dir = DATA_ROOT / "users" / owner / "runs" / "sft-1"
    return JobSpec(run_id=run_id, name="sft-1", owner=owner, argv=["/venv/bin/llamafactory-cli", "train", "x.yaml"],
                   workdir=run_dir, log_path=run_dir / "job.log", env=dict(MLFLOW_ENV if env is None else env))


def settings(**changes) -> KubernetesSettings:
    base = {
        "env": {"HF_HUB_DISABLE_TELEMETRY": "1"},
        "env_secrets": {
            "HF_TOKEN": SecretRef(secret="llamaboard-hf", key="HF_TOKEN", optional=True),
            "HF_ENDPOINT": SecretRef(secret="llamaboard-hf", key="HF_ENDPOINT", optional=True),
            "MLFLOW_TRACKING_PASSWORD": SecretRef(secret="llamaboard-mlflow", key="MLFLOW_TRACKING_PASSWORD"),
        },
        "service_account": "llamaboard-job",
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priority_class": "llamaboard-training",
        "image_pull_secrets": ["registry"],
    }
    return KubernetesSettings(**{**base, **changes})


def build(*, gpus_per_node: int, nodes: int = 1, k8s: KubernetesSettings | None = None, spec: JobSpec | None = None,
          experiment: str = "llamaboard-portal", portal_url: str | None = "https://llm.example.com/ui/?run=42"):
    return km.build_manifests(spec or make_spec(), k8s or settings(), data_root=DATA_ROOT, config_yaml=CONFIG_YAML,
                              config_sha256=CONFIG_SHA, gpus_per_node=gpus_per_node, nodes=nodes,
                              experiment=experiment, portal_url=portal_url)


def by_kind(manifests: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in manifests}


def pod_templates(manifests: list[dict]) -> list[dict]:
    kinds = by_kind(manifests)
    if "JobSet" in kinds:
        return [rj["template"]["spec"]["template"] for rj in kinds["JobSet"]["spec"]["replicatedJobs"]]
    return [kinds["Job"]["spec"]["template"]]


def container_env(manifests: list[dict]) -> dict[str, dict]:
    (template,) = pod_templates(manifests)
    return {entry["name"]: entry for entry in template["spec"]["containers"][0]["env"]}


def plain_env(manifests: list[dict]) -> dict[str, str]:
    return {name: entry["value"] for name, entry in container_env(manifests).items() if "value" in entry}


# Every shape of run the launcher makes: (gpus per node, nodes, settings changes, expected kinds)
SHAPES = {
    "cpu": (0, 1, {}, ["ConfigMap", "Job"]),
    "1-gpu": (1, 1, {}, ["ConfigMap", "Job"]),
    "4-gpus": (4, 1, {}, ["ConfigMap", "Job"]),
    "4-gpus-kueue": (4, 1, {"kueue_queue": "team-{user}"}, ["ConfigMap", "Job"]),
    "2-nodes-jobset": (8, 2, {"multi_node": "jobset"}, ["ConfigMap", "JobSet", "NetworkPolicy"]),
    "2-nodes-jobset-kueue": (8, 2, {"multi_node": "jobset", "kueue_queue": "llamaboard"},
                             ["ConfigMap", "JobSet", "NetworkPolicy"]),
    "2-nodes-indexed": (8, 2, {"multi_node": "indexed"}, ["ConfigMap", "Job", "Service", "NetworkPolicy"]),
    "3-nodes-indexed-kueue": (1, 3, {"multi_node": "indexed", "kueue_queue": "llamaboard"},
                              ["ConfigMap", "Job", "Service", "NetworkPolicy"]),
    "per-user-namespace": (1, 1, {"namespace_template": "llm-{user}", "kueue_queue": "llamaboard"},
                           ["ConfigMap", "Job"]),
    "minimal-settings": (2, 1, "defaults", ["ConfigMap", "Job"]),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_generated_manifest_is_valid_for_kubernetes_and_the_crds(shape):
    gpus, nodes, changes, kinds = SHAPES[shape]
    k8s = KubernetesSettings() if changes == "defaults" else settings(**changes)
    manifests = build(gpus_per_node=gpus, nodes=nodes, k8s=k8s)
    assert [doc["kind"] for doc in manifests] == kinds
    for doc in manifests:
        validate(doc)
    # the dry run prints the same objects
    assert list(yaml.safe_load_all(km.to_yaml(manifests))) == manifests


def test_one_gpu_job():
    manifests = build(gpus_per_node=1)
    job = by_kind(manifests)["Job"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["llamafactory-cli", "train", "/config/config.yaml"]
    assert container["image"] == "llamaboard-trainer:latest"
    assert container["workingDir"] == "/data/users/alice/runs/sft-1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["cpu"] == "4" and container["resources"]["limits"]["memory"] == "64Gi"
    env = plain_env(manifests)
    assert {k: env[k] for k in MLFLOW_ENV} == MLFLOW_ENV
    assert "FORCE_TORCHRUN" not in env and "NPROC_PER_NODE" not in env and "NVIDIA_VISIBLE_DEVICES" not in env
    assert env["HF_HOME"] == "/data/users/alice/.cache/huggingface"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "llamaboard-training"
    assert pod["serviceAccountName"] == "llamaboard-job"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert "suspend" not in job["spec"] and km.LABEL_KUEUE_QUEUE not in job["metadata"]["labels"]


def test_an_export_job_runs_llamafactory_export():
    from dataclasses import replace

    spec = replace(make_spec(), argv=["/venv/bin/llamafactory-cli", "export", "x.yaml"], command="export")
    manifests = build(gpus_per_node=0, spec=spec)
    (container,) = by_kind(manifests)["Job"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["llamafactory-cli", "export", "/config/config.yaml"]
    for doc in manifests:
        validate(doc)
    with pytest.raises(ValueError, match="not one of"):
        build(gpus_per_node=0, spec=replace(make_spec(), command="webui"))


def test_a_cpu_job_asks_for_no_gpu_and_sees_none():
    manifests = build(gpus_per_node=0)
    resources = pod_templates(manifests)[0]["spec"]["containers"][0]["resources"]
    assert not any("gpu" in name for part in resources.values() for name in part)
    assert plain_env(manifests)["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert "FORCE_TORCHRUN" not in plain_env(manifests)


def test_several_gpus_on_one_node_run_torchrun():
    manifests = build(gpus_per_node=4)
    env = plain_env(manifests)
    assert {k: env[k] for k in ("FORCE_TORCHRUN", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT")} \
        == {"FORCE_TORCHRUN": "1", "NNODES": "1", "NODE_RANK": "0", "NPROC_PER_NODE": "4", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}
    job = by_kind(manifests)["Job"]
    assert "completionMode" not in job["spec"]
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_gpu_resource_name_is_configurable():
    manifests = build(gpus_per_node=2, k8s=settings(gpu_resource="amd.com/gpu"))
    resources = pod_templates(manifests)[0]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["amd.com/gpu"] == resources["limits"]["amd.com/gpu"] == "2"
    assert "nvidia.com/gpu" not in resources["requests"]


def test_two_nodes_as_a_jobset():
    manifests = build(gpus_per_node=8, nodes=2, k8s=settings(multi_node="jobset", backoff_limit=3))
    jobset = by_kind(manifests)["JobSet"]
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated["replicas"] == 1
    child = replicated["template"]["spec"]
    assert (child["completionMode"], child["completions"], child["parallelism"]) == ("Indexed", 2, 2)
    assert child["backoffLimit"] == 0  # the JobSet restarts the whole group instead
    env = container_env(manifests)
    assert env["NNODES"]["value"] == "2" and env["NPROC_PER_NODE"]["value"] == "8"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == km.JOB_COMPLETION_INDEX
    # JobSet's pod hostnames: <jobset>-<replicated job>-<job index>-<pod index>.<jobset>
    assert env["MASTER_ADDR"]["value"] == "llamaboard-run-42-node-0-0.llamaboard-run-42"
    assert jobset["spec"]["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    policy = jobset["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 3
    assert [(r["action"], r.get("onJobFailureMessagePatterns")) for r in policy["rules"]] == [
        ("RestartJobSetAndIgnoreMaxRestarts", [km.DISRUPTION_MESSAGE_PATTERN]), ("FailJobSet", None)]
    # the patterns must match the Job controller's messages (pkg/controller/job/pod_failure_policy.go)
    disruption = "Pod llamaboard/llamaboard-run-42-node-0-1-x7k2p has condition DisruptionTarget matching FailJob rule at index 0"
    exit_code = "Container trainer for pod llamaboard/llamaboard-run-42-node-0-1-x7k2p failed with exit code 1 matching FailJob rule at index 1"
    assert re.fullmatch(km.DISRUPTION_MESSAGE_PATTERN, disruption)
    assert not re.fullmatch(km.DISRUPTION_MESSAGE_PATTERN, exit_code)
    assert [r["action"] for r in child["podFailurePolicy"]["rules"]] == ["FailJob", "FailJob"]


def test_two_nodes_as_an_indexed_job_with_a_headless_service():
    manifests = build(gpus_per_node=8, nodes=2, k8s=settings(multi_node="indexed"))
    kinds = by_kind(manifests)
    job, service, policy = kinds["Job"], kinds["Service"], kinds["NetworkPolicy"]
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 2, 2)
    pod = job["spec"]["template"]
    assert pod["spec"]["subdomain"] == service["metadata"]["name"] == "llamaboard-run-42"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == 29500
    env = container_env(manifests)
    assert env["MASTER_ADDR"]["value"] == "llamaboard-run-42-0.llamaboard-run-42"  # Indexed pod 0: <job>-0
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == km.JOB_COMPLETION_INDEX
    # only this run's pods may reach this run's pods
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector == policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    other_run = build(gpus_per_node=8, nodes=2, k8s=settings(multi_node="indexed"), spec=make_spec(run_id=43))
    assert not selector.items() <= pod_templates(other_run)[0]["metadata"]["labels"].items()


@pytest.mark.parametrize("nodes,multi_node", [(1, "jobset"), (2, "jobset"), (2, "indexed")])
def test_kueue_queue_label_and_suspend_on_the_top_object_only(nodes, multi_node):
    with_queue = build(gpus_per_node=2, nodes=nodes, k8s=settings(kueue_queue="team-{user}", multi_node=multi_node))
    without = build(gpus_per_node=2, nodes=nodes, k8s=settings(multi_node=multi_node))
    top = with_queue[1]
    assert top["kind"] in ("Job", "JobSet")
    assert top["metadata"]["labels"][km.LABEL_KUEUE_QUEUE] == "team-alice"
    assert top["spec"]["suspend"] is True
    for doc in with_queue[:1] + with_queue[2:]:
        assert km.LABEL_KUEUE_QUEUE not in doc["metadata"]["labels"]
    assert all(km.LABEL_KUEUE_QUEUE not in t["metadata"]["labels"] for t in pod_templates(with_queue))
    assert km.LABEL_KUEUE_QUEUE not in without[1]["metadata"]["labels"] and "suspend" not in without[1]["spec"]


def test_reliability_fields():
    k8s = settings(backoff_limit=5, active_deadline_seconds=3600, ttl_seconds_after_finished=600,
                   fail_fast_exit_codes=[2, 1, 2, 3])
    job = by_kind(build(gpus_per_node=1, k8s=k8s))["Job"]["spec"]
    assert (job["backoffLimit"], job["activeDeadlineSeconds"], job["ttlSecondsAfterFinished"]) == (5, 3600, 600)
    assert job["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob",
                        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [1, 2, 3]}}
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    unlimited = by_kind(build(gpus_per_node=1, k8s=settings(active_deadline_seconds=None,
                                                                 ttl_seconds_after_finished=None,
                                                                 fail_fast_exit_codes=[])))["Job"]["spec"]
    assert "activeDeadlineSeconds" not in unlimited and "ttlSecondsAfterFinished" not in unlimited
    assert unlimited["podFailurePolicy"]["rules"] == [rules[1]]
    jobset = by_kind(build(gpus_per_node=1, nodes=2, k8s=k8s))["JobSet"]
    assert jobset["spec"]["ttlSecondsAfterFinished"] == 600
    assert jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["activeDeadlineSeconds"] == 3600


def test_the_pod_reaches_only_the_owners_folder_and_shared_read_only():
    manifests = build(gpus_per_node=1)
    pod = pod_templates(manifests)[0]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/data/users/alice"] == {"name": "data", "mountPath": "/data/users/alice", "subPath": "users/alice"}
    assert mounts["/data/shared"]["subPath"] == "shared" and mounts["/data/shared"]["readOnly"] is True
    assert mounts["/config"]["readOnly"] is True
    assert all(m.get("subPath") for m in mounts.values() if m["name"] == "data")  # never the whole volume
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "llamaboard-data"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert mounts["/dev/shm"]["name"] == "dshm"
    assert volumes["config"]["configMap"]["name"] == by_kind(manifests)["ConfigMap"]["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    with_fs_group = pod_templates(build(gpus_per_node=1, k8s=settings(fs_group=10001)))[0]["spec"]["securityContext"]
    assert with_fs_group["fsGroup"] == 10001 and with_fs_group["fsGroupChangePolicy"] == "OnRootMismatch"
    assert "fsGroup" not in pod["securityContext"]


def test_labels_annotations_and_the_config_map():
    manifests = build(gpus_per_node=1, nodes=2, spec=make_spec(owner="Alice.Smith_2"), experiment="My Experiment!")
    config_map = manifests[0]
    assert config_map["kind"] == "ConfigMap" and config_map["immutable"] is True
    assert config_map["data"] == {"config.yaml": CONFIG_YAML}
    labels = config_map["metadata"]["labels"]
    assert labels[km.LABEL_RUN_ID] == "42"
    assert labels[km.LABEL_OWNER] == "Alice.Smith_2"  # already a label value: unchanged
    assert labels[km.LABEL_EXPERIMENT] == km.label_value("My Experiment!") != "My Experiment!"
    assert labels[km.LABEL_APP] == "llamaboard-portal" and labels[km.LABEL_COMPONENT] == "training-job"
    for doc in manifests:  # every object of the run carries the labels the launcher finds it by
        assert doc["metadata"]["labels"].items() >= labels.items()
        assert doc["metadata"]["annotations"][km.ANNOTATION_CONFIG_SHA256] == CONFIG_SHA
        assert doc["metadata"]["annotations"][km.ANNOTATION_RUN_URL] == "https://llm.example.com/ui/?run=42"
        assert doc["metadata"]["annotations"][km.ANNOTATION_OWNER] == "Alice.Smith_2"
        assert doc["metadata"]["namespace"] == "llamaboard"
    assert all(t["metadata"]["labels"] == labels for t in pod_templates(manifests))
    assert km.TRAINING_SELECTOR == "app.kubernetes.io/name=llamaboard-portal,app.kubernetes.io/component=training-job"
    assert km.run_selector(42) == km.TRAINING_SELECTOR + ",llamaboard.io/run-id=42"
    no_url = build(gpus_per_node=1, portal_url=None, experiment="")
    assert km.ANNOTATION_RUN_URL not in no_url[1]["metadata"]["annotations"]
    assert km.LABEL_EXPERIMENT not in no_url[1]["metadata"]["labels"]


def test_extra_pod_labels_and_annotations_never_replace_the_portals():
    k8s = settings(pod_labels={"azure.workload.identity/use": "true", km.LABEL_RUN_ID: "1"},
                   pod_annotations={"cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
                                    km.ANNOTATION_CONFIG_SHA256: "x"})
    manifests = build(gpus_per_node=1, k8s=k8s)
    (template,) = pod_templates(manifests)
    assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert template["metadata"]["labels"][km.LABEL_RUN_ID] == "42"
    assert template["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert template["metadata"]["annotations"][km.ANNOTATION_CONFIG_SHA256] == CONFIG_SHA
    assert "azure.workload.identity/use" not in manifests[1]["metadata"]["labels"]  # the pods only
    for doc in manifests:
        validate(doc)
    with pytest.raises(ValueError, match="kubernetes.pod_labels"):
        build(gpus_per_node=1, k8s=settings(pod_labels={"team": "data science"}))
    with pytest.raises(ValueError, match="kubernetes.pod_annotations"):
        build(gpus_per_node=1, k8s=settings(pod_annotations={"not a key": "x"}))


def test_owner_reference_for_the_objects_created_before_their_job():
    manifests = build(gpus_per_node=1, nodes=2, k8s=settings(multi_node="indexed"))
    reference = km.owner_reference(by_kind(manifests)["Job"], "0b7f7c8e-1111-2222-3333-444455556666")
    assert reference == {"apiVersion": "batch/v1", "kind": "Job", "name": "llamaboard-run-42",
                         "uid": "0b7f7c8e-1111-2222-3333-444455556666"}
    owned = copy.deepcopy(manifests[0])
    owned["metadata"]["ownerReferences"] = [reference]
    validate(owned)
    jobset = by_kind(build(gpus_per_node=1, nodes=2))["JobSet"]
    assert km.owner_reference(jobset, "u")["apiVersion"] == "jobset.x-k8s.io/v1alpha2"


def test_secrets_only_by_reference(monkeypatch):
    secret_values = {"HF_TOKEN": "hf_sentinelTOKENvalue", "MLFLOW_TRACKING_PASSWORD": "sentinel-mlflow-password",
                     "PORTAL_OIDC_CLIENT_SECRET": "sentinel-oidc-secret", "PORTAL_SESSION_SECRET": "sentinel-session"}
    for name, value in secret_values.items():
        monkeypatch.setenv(name, value)
    for shape, (gpus, nodes, changes, _) in SHAPES.items():
        k8s = KubernetesSettings() if changes == "defaults" else settings(**changes)
        manifests = build(gpus_per_node=gpus, nodes=nodes, k8s=k8s)
        text = km.to_yaml(manifests)
        for value in secret_values.values():
            assert value not in text, shape
        for name, entry in container_env(manifests).items():
            if km.SECRETISH_NAME.search(name):
                assert set(entry) == {"name", "valueFrom"} and set(entry["valueFrom"]) == {"secretKeyRef"}, name
    env = container_env(build(gpus_per_node=1))
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "llamaboard-hf", "key": "HF_TOKEN", "optional": True}
    assert env["HF_ENDPOINT"]["valueFrom"]["secretKeyRef"]["key"] == "HF_ENDPOINT"
    assert not any(name.startswith("PORTAL_") for name in env)
    # a credential handed in as a value is refused, not passed on
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_TOKEN"):
        build(gpus_per_node=1, spec=make_spec(env={**MLFLOW_ENV, "MLFLOW_TRACKING_TOKEN": "abc"}))
    with pytest.raises(ValueError, match="password in its URL"):
        build(gpus_per_node=1, spec=make_spec(env={**MLFLOW_ENV, "MLFLOW_TRACKING_URI": "https://u:p@mlflow.example"}))


def test_the_admins_env_cannot_replace_what_the_portal_sets_per_run():
    with pytest.raises(ValueError, match="MLFLOW_RUN_ID"):
        build(gpus_per_node=1, k8s=settings(env={"MLFLOW_RUN_ID": "x"}))
    with pytest.raises(ValueError, match="NNODES"):
        build(gpus_per_node=1, k8s=settings(env_secrets={"NNODES": SecretRef(secret="s", key="k")}))
    # but it may replace a default of the portal's, and comes last then
    env = plain_env(build(gpus_per_node=1, k8s=settings(env={"HF_HOME": "/cache/hf"})))
    assert env["HF_HOME"] == "/cache/hf"


def test_per_user_namespace_and_queue_templates():
    k8s = settings(namespace_template="llm-{user}", kueue_queue="q-{user}")
    manifests = build(gpus_per_node=1, k8s=k8s, spec=make_spec(owner="Bob_Smith"))
    namespace = km.namespace_for("Bob_Smith", k8s)
    assert namespace.startswith("llm-bob-smith-") and DNS_LABEL.match(namespace)
    assert {doc["metadata"]["namespace"] for doc in manifests} == {namespace}
    assert manifests[1]["metadata"]["labels"][km.LABEL_KUEUE_QUEUE] == namespace.replace("llm-", "q-", 1)
    assert km.namespace_for("alice", k8s) == "llm-alice"
    assert km.namespace_for("alice", settings()) == "llamaboard"  # no template: the shared namespace
    assert km.namespace_for("Alice", k8s) != km.namespace_for("alice", k8s)  # two users, two namespaces
    with pytest.raises(ValueError, match="namespace_template"):
        km.namespace_for("alice", settings(namespace_template="LLM_{user}"))
    with pytest.raises(ValueError, match="namespace_template"):
        km.namespace_for("a" * 60, settings(namespace_template="llm-{user}"))
    with pytest.raises(ValueError, match="kueue_queue"):
        build(gpus_per_node=1, k8s=settings(kueue_queue="{user}.queue"))
    with pytest.raises(ValueError, match=r"gives 'llm-alice-\{0\}'"):  # other braces stay text, never formatted
        km.namespace_for("alice", settings(namespace_template="llm-{user}-{0}"))


@pytest.mark.parametrize("text", ["alice", "Alice.Smith_2", "a" * 63, "", "0"])
def test_label_value_keeps_what_is_valid(text):
    assert km.label_value(text) == text


@pytest.mark.parametrize("text", ["alice smith", "Alice@Bank", "a" * 64, "-x-", "@@@", "é", "x" * 300, "a_" * 40])
def test_label_value_sanitises_with_a_hash_suffix(text):
    value = km.label_value(text)
    assert LABEL_VALUE.match(value) and 0 < len(value) <= 63
    assert value == km.label_value(text)  # deterministic
    assert value.endswith(hashlib.sha256(text.encode()).hexdigest()[:8])
    assert value != km.label_value(text + " ")  # texts that clean alike stay apart


def test_dns_label():
    assert km.dns_label("alice") == "alice"
    assert DNS_LABEL.match(km.dns_label("Alice.Smith_2")) and km.dns_label("Alice") != "alice"
    assert len(km.dns_label("b" * 100)) == 63


def test_job_names():
    assert km.job_name(42) == "llamaboard-run-42" and km.config_map_name(42) == "llamaboard-run-42-config"
    assert km.job_name(0) == "llamaboard-run-0"  # a dry run's placeholder
    for bad in (-1, True, "42", 4.2):
        with pytest.raises(ValueError, match="run id"):
            km.job_name(bad)


@pytest.mark.parametrize("kwargs,message", [
    ({"gpus_per_node": -1}, "--gpus"),
    ({"gpus_per_node": 1.5}, "--gpus"),
    ({"gpus_per_node": 1, "nodes": 0}, "--nodes"),
    ({"gpus_per_node": 0, "nodes": 2}, "--nodes 2 needs --gpus 1"),
])
def test_bad_gpu_and_node_counts_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(**kwargs)


def test_names_the_cluster_derives_must_fit():
    huge_run = make_spec(run_id=10 ** 45)  # a 61-character Job name
    build(gpus_per_node=1, spec=huge_run)
    with pytest.raises(ValueError, match="Job name .* longer than 63"):
        build(gpus_per_node=1, spec=make_spec(run_id=10 ** 48))
    build(gpus_per_node=1, nodes=2, spec=huge_run, k8s=settings(multi_node="indexed"))  # <job>-1: 63
    with pytest.raises(ValueError, match="--nodes 2.*longer than 63"):
        build(gpus_per_node=1, nodes=2, spec=huge_run, k8s=settings(multi_node="jobset"))
    with pytest.raises(ValueError, match="--nodes 12.*longer than 63"):
        build(gpus_per_node=1, nodes=12, spec=huge_run, k8s=settings(multi_node="indexed"))
    # JobSet's own limit, as its webhook computes it: <jobset>-node-0-<last pod>-<5 random> <= 63
    js = km.job_name(42)
    build(gpus_per_node=1, nodes=100, spec=make_spec(run_id=42))
    assert len(f"{js}-{km.REPLICATED_JOB}-0-99-abcde") <= 63


def test_other_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="owner"):
        build(gpus_per_node=1, spec=make_spec(owner="../bob"))
    outside = JobSpec(run_id=1, name="x", owner="alice", argv=[], workdir=DATA_ROOT / "users" / "bob" / "runs" / "x",
                      log_path=Path("/tmp/x"), env=MLFLOW_ENV)
    with pytest.raises(ValueError, match="only folder the job can write"):
        build(gpus_per_node=1, spec=outside)
    with pytest.raises(ValueError, match="config_sha256"):
        km.build_manifests(make_spec(), settings(), data_root=DATA_ROOT, config_yaml=CONFIG_YAML,
                           config_sha256="abc", gpus_per_node=1)
    with pytest.raises(ValueError, match="ConfigMap"):
        big = "a: " + "x" * 1_000_001
        km.build_manifests(make_spec(), settings(), data_root=DATA_ROOT, config_yaml=big,
                           config_sha256=hashlib.sha256(big.encode()).hexdigest(), gpus_per_node=1)
    with pytest.raises(ValueError, match="absolute"):
        km.build_manifests(make_spec(), settings(), data_root=Path("data"), config_yaml=CONFIG_YAML,
                           config_sha256=CONFIG_SHA, gpus_per_node=1)
    with pytest.raises(ValueError, match="fail_fast_exit_codes"):
        build(gpus_per_node=1, k8s=settings(fail_fast_exit_codes=[0, 1]))
    with pytest.raises(ValueError, match="http"):
        build(gpus_per_node=1, portal_url="javascript:alert(1)")


def test_to_yaml_writes_the_config_as_a_block():
    text = km.to_yaml(build(gpus_per_node=1))
    assert text.startswith("---\napiVersion: v1\nkind: ConfigMap\n")
    assert "  config.yaml: |\n    ### portal header\n    model_name_or_path: /data/shared/models/tiny\n" in text
    assert text.count("\n---\n") == 1


# ---- deploy/ -----------------------------------------------------------------------------
KUSTOMIZATIONS = sorted(str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml"))
GENERATED_NAME = re.compile(r"^(llamaboard-portal-config)-[a-z0-9]{10}$")


@functools.cache
def render(directory: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render deploy/ (scripts/setup.sh --test installs it)"
    done = subprocess.run([kubectl, "kustomize", str(DEPLOY / directory)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, f"kubectl kustomize deploy/{directory}: {done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def find(docs, kind: str, name: str | None = None) -> dict:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name
                                                           or GENERATED_NAME.sub(r"\1", d["metadata"]["name"]) == name)]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def test_the_expected_kustomizations_exist():
    assert KUSTOMIZATIONS == ["base", "examples/tenant", "examples/tenant-kueue", "kueue", "overlays/dev",
                              "overlays/prod", "secrets", "vllm"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_rendered_deploy_object_is_valid(directory):
    docs = render(directory)
    assert docs
    for doc in docs:
        validate(doc)
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys))


def listed_files(kustomization_dir: Path) -> set[Path]:
    spec = yaml.safe_load((kustomization_dir / "kustomization.yaml").read_text())
    files = set()
    for key in ("resources", "bases", "patchesStrategicMerge"):
        for entry in spec.get(key, []):
            path = (kustomization_dir / entry).resolve()
            if path.is_file():
                files.add(path)
    for generator in spec.get("configMapGenerator", []):
        files.update((kustomization_dir / f).resolve() for f in generator.get("files", []))
    return files


def test_every_file_under_deploy_is_rendered_by_some_kustomization():
    listed = set().union(*(listed_files(DEPLOY / d) for d in KUSTOMIZATIONS))
    all_files = {p.resolve() for p in DEPLOY.rglob("*") if p.is_file() and p.name != "kustomization.yaml"}
    assert all_files - listed == set(), "files no kustomization renders (so no test validates)"
    assert all(p.suffix == ".yaml" for p in all_files)


def test_the_overlays_change_what_they_should():
    base, dev, prod = render("base"), render("overlays/dev"), render("overlays/prod")
    for docs, tag in ((dev, "dev"), (prod, "0.1.0")):
        container = find(docs, "Deployment", "llamaboard-portal")["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == f"registry.example.com/llamaboard/portal:{tag}"
        assert container["readinessProbe"] and container["livenessProbe"]  # the patch merged, not replaced
    assert find(dev, "Ingress")["spec"]["rules"][0]["host"] == "llamaboard-dev.example.com"
    assert find(prod, "Ingress")["spec"]["tls"][0]["secretName"] == "llamaboard-portal-tls"
    assert find(prod, "Ingress")["spec"]["rules"][0]["host"] == "llamaboard.example.com"
    assert {d["kind"] for d in prod} - {d["kind"] for d in base} == {"ClusterQueue", "LocalQueue", "ResourceFlavor"}
    assert len(dev) == len(base)


def portal_config(docs) -> dict:
    return yaml.safe_load(find(docs, "ConfigMap", "llamaboard-portal-config")["data"]["portal.yaml"])


@pytest.mark.parametrize("directory", ["base", "overlays/dev", "overlays/prod"])
def test_the_portal_deployment_and_its_config(directory, monkeypatch, tmp_path):
    docs = render(directory)
    deployment = find(docs, "Deployment", "llamaboard-portal")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz" and container[probe]["httpGet"]["port"] in port_names
    assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
    env = {e["name"]: e for e in container["env"]}
    assert all("valueFrom" in env[n] for n in env if km.SECRETISH_NAME.search(n) or n.endswith("DATABASE_URL"))
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map = find(docs, "ConfigMap", "llamaboard-portal-config")
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]  # the generated name
    assert os.path.dirname(env["PORTAL_CONFIG_FILE"]["value"]) == mounts["config"]
    config = portal_config(docs)
    assert mounts["data"] == config["data_root"]
    assert port_names["http"] == config["port"]
    service = find(docs, "Service", "llamaboard-portal")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()

    # the config file is one the portal accepts
    from portal.config import Settings

    for name in [n for n in os.environ if n.startswith("PORTAL_")]:
        monkeypatch.delenv(name)
    config_file = tmp_path / "portal.yaml"
    config_file.write_text(config_map["data"]["portal.yaml"])
    monkeypatch.setenv("PORTAL_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("PORTAL_OIDC_CLIENT_SECRET", "from-the-secret")
    loaded = Settings()
    assert loaded.launcher == "kubernetes" and loaded.auth_mode == "oidc"
    assert str(loaded.data_root) == config["data_root"]


@pytest.mark.parametrize("directory", ["base", "overlays/dev", "overlays/prod"])
def test_the_jobs_the_deployed_portal_makes_fit_the_deployment(directory):
    """Build a run with each overlay's settings and check it against what deploy/ creates:
    the volume, the service account, the Secrets and keys, the Kueue queue, RBAC, policies."""
    docs = render(directory)
    config = portal_config(docs)
    k8s = KubernetesSettings.model_validate(config["kubernetes"])
    data_root = Path(config["data_root"])
    spec = JobSpec(run_id=7, name="r", owner="alice", argv=[], workdir=data_root / "users/alice/runs/r",
                   log_path=data_root / "users/alice/runs/r/job.log", env=MLFLOW_ENV)
    secrets = render("secrets")
    cluster_role = find(docs, "ClusterRole", "llamaboard-launcher")
    binding = find(docs, "RoleBinding", "llamaboard-launcher")
    portal_sa = find(docs, "Deployment", "llamaboard-portal")["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["roleRef"]["name"] == "llamaboard-launcher"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": portal_sa, "namespace": "llamaboard"}]

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                   for r in cluster_role["rules"])

    # what portal/launchers/kubernetes.py does besides creating: follow, read logs, stop
    for verb in ("get", "list", "watch"):
        assert allowed("", "pods", verb) and allowed("", "events", verb) and allowed("batch", "jobs", verb)
    assert allowed("", "pods/log", "get") and allowed("", "pods", "delete") and allowed("jobset.x-k8s.io", "jobsets", "watch")
    assert not any("secrets" in r["resources"] or "*" in r["resources"] + r["verbs"] for r in cluster_role["rules"])
    for nodes, multi_node in ((1, k8s.multi_node), (2, "jobset"), (2, "indexed")):
        manifests = km.build_manifests(spec, k8s.model_copy(update={"multi_node": multi_node}), data_root=data_root,
                                       config_yaml=CONFIG_YAML, config_sha256=CONFIG_SHA, gpus_per_node=2, nodes=nodes)
        for doc in manifests:
            validate(doc)
            assert doc["metadata"]["namespace"] == binding["metadata"]["namespace"]
            group = doc["apiVersion"].rpartition("/")[0]
            resource = {"ConfigMap": "configmaps", "Job": "jobs", "JobSet": "jobsets", "Service": "services",
                        "NetworkPolicy": "networkpolicies"}[doc["kind"]]
            for verb in ("create", "get", "list", "delete"):
                assert allowed(group, resource, verb), f"the launcher may not {verb} {resource}"
        pod = pod_templates(manifests)[0]
        find(docs, "PersistentVolumeClaim", pod["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"])
        job_sa = find(docs, "ServiceAccount", pod["spec"]["serviceAccountName"])
        assert job_sa["automountServiceAccountToken"] is False
        for entry in pod["spec"]["containers"][0]["env"]:
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in find(secrets, "Secret", ref["name"])["stringData"]
        # the namespace's policy governs the job pods: no ingress but their run's, egress limited
        policy = find(docs, "NetworkPolicy", "llamaboard-training-jobs")
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert "ingress" not in policy["spec"] and set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        top = manifests[1]
        queue = top["metadata"]["labels"].get(km.LABEL_KUEUE_QUEUE)
        if queue:  # the LocalQueue it names exists, and its ClusterQueue takes this namespace
            local_queue = find(docs, "LocalQueue", queue)
            cluster_queue = find(docs, "ClusterQueue", local_queue["spec"]["clusterQueue"])
            namespace = find(docs, "Namespace", top["metadata"]["namespace"])
            assert cluster_queue["spec"]["namespaceSelector"]["matchLabels"].items() \
                <= namespace["metadata"]["labels"].items()
            for group in cluster_queue["spec"]["resourceGroups"]:
                assert k8s.gpu_resource in group["coveredResources"]
                for flavor in group["flavors"]:
                    find(docs, "ResourceFlavor", flavor["name"])
    assert ("kueue_queue" in config["kubernetes"]) == (directory == "overlays/prod")


def test_secret_templates_have_no_values():
    docs = render("secrets")
    assert {d["kind"] for d in docs} == {"Secret"}
    for doc in docs:
        assert "data" not in doc and doc["stringData"] and set(doc["stringData"].values()) == {""}
    # and no overlay applies them over the real ones
    for directory in ("base", "overlays/dev", "overlays/prod"):
        assert not [d for d in render(directory) if d["kind"] == "Secret"]


def test_the_tenant_example_gives_the_portal_what_it_needs_there():
    docs = render("examples/tenant")
    namespace = find(docs, "Namespace")["metadata"]["name"]
    assert namespace == km.namespace_for("alice", settings(namespace_template="llm-{user}"))
    assert find(docs, "RoleBinding")["roleRef"]["name"] == find(render("base"), "ClusterRole")["metadata"]["name"]
    quota = find(docs, "ResourceQuota")["spec"]["hard"]
    assert "requests.nvidia.com/gpu" in quota
    find(docs, "LimitRange")
    claim, volume = find(docs, "PersistentVolumeClaim", "llamaboard-data"), find(docs, "PersistentVolume")
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    assert volume["spec"]["claimRef"] == {"namespace": namespace, "name": "llamaboard-data"}
    assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert find(render("examples/tenant-kueue"), "LocalQueue")["metadata"]["namespace"] == namespace
    # with namespaces per user the launcher lists and watches its Jobs across namespaces: read-only
    watch_role, watch_binding = find(docs, "ClusterRole"), find(docs, "ClusterRoleBinding")
    assert watch_binding["roleRef"]["name"] == watch_role["metadata"]["name"]
    assert watch_binding["subjects"] == find(docs, "RoleBinding")["subjects"]
    assert {(g, r) for rule in watch_role["rules"] for g in rule["apiGroups"] for r in rule["resources"]} \
        == {("batch", "jobs"), ("jobset.x-k8s.io", "jobsets")}
    assert {v for rule in watch_role["rules"] for v in rule["verbs"]} == {"list", "watch"}


def test_the_optional_vllm_reads_the_shared_volume_read_only():
    docs = render("vllm")
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["readOnly"] is True
    assert all(m["readOnly"] for m in container["volumeMounts"] if m["name"] == "data")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


# ---- images/ -----------------------------------------------------------------------------
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(requirements: list[str]) -> dict[str, Requirement]:
    return {Requirement(line).name: Requirement(line) for line in requirements}


@pytest.mark.parametrize("image,context", [("portal", REPO), ("trainer", IMAGES / "trainer")])
def test_dockerfiles_parse_and_run_as_non_root(image, context):
    parser = DockerfileParser(path=str(IMAGES / image / "Dockerfile"))
    instructions = [i["instruction"] for i in parser.structure]
    assert instructions.count("FROM") >= 1 and "CMD" in instructions
    users = [i["value"].strip() for i in parser.structure if i["instruction"] == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: numeric and not root, so runAsNonRoot can check it"
    assert int(uid) == KubernetesSettings().run_as_user  # the job pods and the portal write the same folders
    for item in parser.structure:  # what it copies from the build context exists
        if item["instruction"] == "COPY" and "--from=" not in item["value"]:
            for source in item["value"].split()[:-1]:
                assert (context / source).exists(), f"{image}: COPY {source} is not in its build context"


def test_the_trainer_pins_the_portals_llamafactory_torch_and_mlflow():
    ours = pinned([line for line in (IMAGES / "trainer/requirements.txt").read_text().splitlines()
                   if line.strip() and not line.startswith("#")])
    portal = pinned(pyproject()["project"]["dependencies"])
    for name in ("llamafactory", "torch", "torchaudio", "torchvision", "mlflow"):
        assert str(ours[name].specifier) == str(portal[name].specifier), name
    assert str(ours["llamafactory"].specifier).startswith("==")
    for name in ("deepspeed", "bitsandbytes", "liger-kernel"):
        assert name in ours


def test_the_portal_image_serves_what_the_deployment_expects():
    parser = DockerfileParser(path=str(IMAGES / "portal/Dockerfile"))
    entrypoint = next(i["value"] for i in parser.structure if i["instruction"] == "ENTRYPOINT")
    assert json.loads(entrypoint) == ["llamaboard-portal"] and "llamaboard-portal" in pyproject()["project"]["scripts"]
    exposed = next(i["value"] for i in parser.structure if i["instruction"] == "EXPOSE")
    container = find(render("base"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert int(exposed) == container["ports"][0]["containerPort"]
    assert container["args"] == ["serve"]
    # an image ENV would silently win over the mounted config file
    assert not [name for name in parser.envs if name.startswith("PORTAL_")]


def test_the_build_script(tmp_path):
    script = IMAGES / "build.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    assert os.access(script, os.X_OK)
    # a dry run: the engine is `echo`, so the commands it would run are printed
    env = {**os.environ, "CONTAINER_ENGINE": "echo"}
    done = subprocess.run([str(script), "--registry", "reg.example/llb", "--push"], capture_output=True, text=True,
                          env=env, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    version = pyproject()["project"]["version"]
    assert f"build -f images/portal/Dockerfile -t reg.example/llb/portal:{version}" in done.stdout
    assert re.search(rf"build -f images/trainer/Dockerfile -t reg.example/llb/trainer:{version} .* images/trainer$",
                     done.stdout, re.MULTILINE)
    assert f"push reg.example/llb/trainer:{version}" in done.stdout
    assert subprocess.run([str(script), "nonsense"], capture_output=True, env=env, check=False).returncode == 2
    # it refuses a trainer that would run another LLaMA-Factory than the portal's
    copy_root = tmp_path / "repo"
    shutil.copytree(IMAGES, copy_root / "images")
    shutil.copy(REPO / "pyproject.toml", copy_root / "pyproject.toml")
    requirements = copy_root / "images/trainer/requirements.txt"
    requirements.write_text(re.sub(r"llamafactory==\S+", "llamafactory==0.9.4", requirements.read_text()))
    drifted = subprocess.run([str(copy_root / "images/build.sh")], capture_output=True, text=True, env=env,
                             check=False)
    assert drifted.returncode == 1 and "must pin llamafactory==" in drifted.stderr
