"""The Kubernetes objects of one run, as plain dicts: pure functions, no API calls.

One run is a ConfigMap (the config YAML, mounted at ``/config``) and, by the number of nodes:

- one node: a ``batch/v1`` Job with one pod (several GPUs: ``FORCE_TORCHRUN=1`` and
  ``NPROC_PER_NODE``, so ``llamafactory-cli train`` starts torchrun itself);
- several nodes, ``multi_node: jobset``: a JobSet (``jobset.x-k8s.io/v1alpha2``) whose one
  replicated Job is Indexed, one pod per node; JobSet makes the headless Service;
- several nodes, ``multi_node: indexed``: an Indexed Job and a headless Service of our own.

Every pod gets ``NNODES``, ``NODE_RANK`` (the completion index), ``MASTER_ADDR`` (pod 0's DNS
name) and ``MASTER_PORT``, which LLaMA-Factory's launcher hands to torchrun.

The shared volume (an RWX PVC) is mounted at the portal's data root, so every path in the
config means the same in the pod: the owner's folder ``users/<owner>`` read-write, ``shared``
read-only, nothing else (no other user's folder, no portal files). Secrets reach the pod as
``secretKeyRef`` only; the pod has no service-account token.

The ConfigMap (and, on several nodes, the Service and NetworkPolicy) cannot name the Job as its
owner before the Job exists: the launcher creates the Job, then sets ``owner_reference(job,
uid)`` on the others (a patch of the ConfigMap; the later ones can be created with it), so that
they are garbage-collected with it. They carry the Job's labels meanwhile, so a launcher
restarted between the two steps still finds them.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from ..storage import check_name
from .base import JobSpec
from .k8s_settings import DNS_LABEL, KubernetesSettings

# ---- labels and annotations: the launcher finds its objects by these after a restart ------
LABEL_APP = "app.kubernetes.io/name"
APP_NAME = "llamaboard-portal"
LABEL_COMPONENT = "app.kubernetes.io/component"
COMPONENT_TRAINING = "training-job"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RUN_ID = "llamaboard.io/run-id"
LABEL_OWNER = "llamaboard.io/owner"  # the owner as a label value (sanitised); the annotation has it as is
LABEL_EXPERIMENT = "llamaboard.io/experiment"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_OWNER = "llamaboard.io/owner"
ANNOTATION_RUN_NAME = "llamaboard.io/run-name"
ANNOTATION_CONFIG_SHA256 = "llamaboard.io/config-sha256"
ANNOTATION_RUN_URL = "llamaboard.io/run-url"
# every object of every run, and the objects of one run, as label selectors for list/watch calls
TRAINING_SELECTOR = f"{LABEL_APP}={APP_NAME},{LABEL_COMPONENT}={COMPONENT_TRAINING}"


def run_selector(run_id: int) -> str:
    return f"{TRAINING_SELECTOR},{LABEL_RUN_ID}={int(run_id)}"


# ---- the pod --------------------------------------------------------------------------------
JOB_NAME_PREFIX = "llamaboard-run-"
CONTAINER_NAME = "trainer"
CONFIG_MOUNT = "/config"
CONFIG_KEY = "config.yaml"
TRAIN_COMMAND = ["llamafactory-cli", "train", f"{CONFIG_MOUNT}/{CONFIG_KEY}"]
JOB_COMMANDS = ("train", "export")  # llamafactory-cli subcommands a run may use (JobSpec.command)
JOB_COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
CONFIGMAP_MAX_BYTES = 1_000_000  # the API server refuses objects over ~1 MiB

# ---- JobSet (several nodes) -----------------------------------------------------------------
JOBSET_GROUP = "jobset.x-k8s.io"
JOBSET_VERSION = "v1alpha2"
JOBSET_PLURAL = "jobsets"
JOBSET_API_VERSION = f"{JOBSET_GROUP}/{JOBSET_VERSION}"
REPLICATED_JOB = "node"  # the JobSet's one replicated Job: one pod per node
# the failure message the Job controller writes when a podFailurePolicy rule on the
# DisruptionTarget condition fails the Job (stable since Kubernetes 1.26; JobSet's own docs
# match it the same way)
DISRUPTION_MESSAGE_PATTERN = ".*has condition DisruptionTarget matching FailJob rule.*"

# names the portal sets for each run; the admin's kubernetes.env may not replace them
PER_RUN_ENV = frozenset({
    "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "FORCE_TORCHRUN", "NNODES", "NODE_RANK",
    "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "NVIDIA_VISIBLE_DEVICES",
})
SECRETISH_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|KEY", re.IGNORECASE)

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# [DNS subdomain prefix/]name, the name at most 63 of letters, digits, '-', '_', '.'
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_LENGTH = 8


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_HASH_LENGTH]


def _with_hash(cleaned: str, original: str, max_length: int, separators: str) -> str:
    """``cleaned`` cut to leave room for ``-<hash of original>``: deterministic, and two
    texts that clean to the same value still get different results."""
    suffix = _short_hash(original)
    head = cleaned[: max_length - len(suffix) - 1].rstrip(separators)
    return f"{head}-{suffix}" if head else suffix


def label_value(text: str) -> str:
    """``text`` as a valid label value (at most 63 of letters, digits, '-', '_', '.', alphanumeric
    at both ends); unchanged when it already is one, else cleaned with a hash suffix."""
    text = str(text)
    if _LABEL_VALUE.match(text) and len(text) <= 63:
        return text
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")
    return _with_hash(cleaned, text, 63, "-_.")


def dns_label(text: str) -> str:
    """``text`` as an RFC 1123 label (what a namespace or a LocalQueue name may be): unchanged
    when it already is one, else lower-cased and cleaned with a hash suffix, so that "Alice"
    and "alice" stay apart."""
    text = str(text)
    if DNS_LABEL.match(text):
        return text
    cleaned = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return _with_hash(cleaned, text, 63, "-")


def job_name(run_id: int) -> str:
    """The name of a run's Job or JobSet (and its Service); its ConfigMap adds ``-config``.
    Run ids start at 1; 0 is allowed as the placeholder of a dry run before the run exists."""
    if isinstance(run_id, bool) or not isinstance(run_id, int) or run_id < 0:
        raise ValueError(f"run id must be a whole number, 0 or more, not {run_id!r}")
    return f"{JOB_NAME_PREFIX}{run_id}"


def config_map_name(run_id: int) -> str:
    return f"{job_name(run_id)}-config"


def _for_user(template: str, owner: str) -> str:
    # str.replace, not str.format: an admin's braces must not reach Python's formatting
    return template.replace("{user}", dns_label(owner))


def namespace_for(owner: str, k8s: KubernetesSettings) -> str:
    """Where ``owner``'s jobs run: ``namespace_template`` with ``{user}`` replaced by the
    owner as a DNS label, or the shared ``namespace``."""
    if not k8s.namespace_template:
        return k8s.namespace
    namespace = _for_user(k8s.namespace_template, owner)
    if not DNS_LABEL.match(namespace):
        raise ValueError(f"kubernetes.namespace_template '{k8s.namespace_template}' gives '{namespace}' for user "
                         f"'{owner}', which is not a namespace name (lower case letters, digits and '-', at most 63)")
    return namespace


def queue_for(owner: str, k8s: KubernetesSettings) -> str | None:
    """The Kueue LocalQueue of ``owner``'s jobs (``kueue_queue``, ``{user}`` as in
    ``namespace_for``), or None without Kueue."""
    if not k8s.kueue_queue:
        return None
    queue = _for_user(k8s.kueue_queue, owner)
    if not DNS_LABEL.match(queue):
        raise ValueError(f"kubernetes.kueue_queue '{k8s.kueue_queue}' gives '{queue}' for user '{owner}', which is "
                         "not a LocalQueue name (lower case letters, digits and '-', at most 63)")
    return queue


def owner_reference(owner: dict[str, Any], uid: str) -> dict[str, Any]:
    """The ownerReference that ties a run's other objects to its Job or JobSet (``owner`` as
    built here, ``uid`` as the API server returned it). Not ``blockOwnerDeletion``: setting it
    needs the owner's ``finalizers`` permission, which the launcher's role does not grant."""
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"], "uid": uid}


def _check_name_lengths(name: str, nodes: int, multi_node: str) -> None:
    """The names the cluster derives from ``name`` must stay DNS labels (at most 63): the
    Job's name is also a pod label's value, and each node's pod has a hostname."""
    if len(name) > 63:
        raise ValueError(f"the Job name '{name}' is longer than 63 characters")
    if nodes == 1:
        return
    if multi_node == "jobset":
        # JobSet's own check: <jobset>-<replicated job>-<job index>-<pod index>-<5 random>
        what, longest = "pod", f"{name}-{REPLICATED_JOB}-0-{nodes - 1}-abcde"
    else:
        what, longest = "pod hostname", f"{name}-{nodes - 1}"
    if len(longest) > 63:
        raise ValueError(f"--nodes {nodes}: the {what} name '{longest}' would be longer than 63 characters")


def _check_inputs(spec: JobSpec, k8s: KubernetesSettings, data_root: Path, config_yaml: str, config_sha256: str,
                  gpus_per_node: int, nodes: int, portal_url: str | None) -> None:
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or gpus_per_node < 0:
        raise ValueError(f"--gpus must be a whole number of GPUs per node, 0 or more (got {gpus_per_node!r})")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"--nodes must be 1 or more (got {nodes!r})")
    if nodes > 1 and gpus_per_node < 1:
        # several nodes train with torchrun over NCCL: a CPU run on several nodes is not supported
        raise ValueError(f"--nodes {nodes} needs --gpus 1 or more per node: training on several nodes uses GPUs")
    if spec.command not in JOB_COMMANDS:
        raise ValueError(f"the job command '{spec.command}' is not one of {', '.join(JOB_COMMANDS)}")
    check_name(spec.owner, "owner")  # becomes a path under users/: no '/', no '..'
    if not data_root.is_absolute():
        raise ValueError(f"the data root must be an absolute path (got '{data_root}')")
    user_root = data_root / "users" / spec.owner
    if not Path(spec.workdir).is_relative_to(user_root):
        raise ValueError(f"the run folder {spec.workdir} is not under {user_root}, the only folder the job can write")
    if not _SHA256.match(config_sha256):
        raise ValueError("config_sha256 must be 64 lower-case hex digits")
    if not config_yaml.strip():
        raise ValueError("the config YAML is empty")
    if len(config_yaml.encode("utf-8")) > CONFIGMAP_MAX_BYTES:
        raise ValueError(f"the config YAML is over {CONFIGMAP_MAX_BYTES} bytes, more than a ConfigMap holds")
    if portal_url is not None and urlsplit(portal_url).scheme not in ("http", "https"):
        raise ValueError(f"the run's portal URL must start with http:// or https:// (got '{portal_url}')")
    for key, value in k8s.pod_labels.items():
        if not _LABEL_KEY.match(key) or not (_LABEL_VALUE.match(value) and len(value) <= 63):
            raise ValueError(f"kubernetes.pod_labels: '{key}: {value}' is not a valid label")
    bad_keys = [key for key in k8s.pod_annotations if not _LABEL_KEY.match(key)]
    if bad_keys:
        raise ValueError(f"kubernetes.pod_annotations: {', '.join(bad_keys)} are not valid annotation keys")
    bad_codes = [code for code in k8s.fail_fast_exit_codes if not 1 <= code <= 255]
    if bad_codes:
        raise ValueError(f"kubernetes.fail_fast_exit_codes: {bad_codes} are not exit codes of a failed process (1-255)")
    for name, value in spec.env.items():
        if SECRETISH_NAME.search(name):
            raise ValueError(f"the job environment has {name} as a value: credentials go in kubernetes.env_secrets")
        if "://" in value and urlsplit(value).password:
            raise ValueError(f"the job environment's {name} holds a password in its URL: "
                             "put the credentials in kubernetes.env_secrets")
    clashing = sorted((set(k8s.env) | set(k8s.env_secrets)) & PER_RUN_ENV)
    if clashing:
        raise ValueError(f"kubernetes.env / env_secrets set {', '.join(clashing)}, which the portal sets for each run")
    _check_name_lengths(job_name(spec.run_id), nodes, k8s.multi_node)


def _labels(spec: JobSpec, experiment: str) -> dict[str, str]:
    labels = {
        LABEL_APP: APP_NAME,
        LABEL_COMPONENT: COMPONENT_TRAINING,
        LABEL_MANAGED_BY: APP_NAME,
        LABEL_RUN_ID: str(spec.run_id),
        LABEL_OWNER: label_value(spec.owner),
    }
    if experiment:
        labels[LABEL_EXPERIMENT] = label_value(experiment)
    return labels


def _annotations(spec: JobSpec, config_sha256: str, portal_url: str | None) -> dict[str, str]:
    annotations = {ANNOTATION_OWNER: spec.owner, ANNOTATION_RUN_NAME: spec.name, ANNOTATION_CONFIG_SHA256: config_sha256}
    if portal_url:
        annotations[ANNOTATION_RUN_URL] = portal_url
    return annotations


def _env(spec: JobSpec, k8s: KubernetesSettings, data_root: Path, gpus_per_node: int, nodes: int,
         master_addr: str) -> list[dict[str, Any]]:
    """The container's environment; later entries replace earlier ones of the same name."""
    by_name: dict[str, dict[str, Any]] = {}

    def put(name: str, entry: dict[str, Any]) -> None:
        by_name.pop(name, None)  # a replaced name moves to the end, where the admin expects it
        by_name[name] = {"name": name, **entry}

    put("PYTHONUNBUFFERED", {"value": "1"})
    # the Hugging Face cache in the owner's folder: a retried pod does not download the model again
    put("HF_HOME", {"value": str(data_root / "users" / spec.owner / ".cache" / "huggingface")})
    for name, value in k8s.env.items():
        put(name, {"value": value})
    for name, ref in k8s.env_secrets.items():
        put(name, {"valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.key, "optional": ref.optional}}})
    for name, value in spec.env.items():
        put(name, {"value": value})
    if gpus_per_node == 0:
        # a CUDA base image says NVIDIA_VISIBLE_DEVICES=all: without this a CPU pod on a GPU
        # node could see GPUs it was not given
        put("NVIDIA_VISIBLE_DEVICES", {"value": "void"})
    if gpus_per_node > 1 or nodes > 1:
        put("FORCE_TORCHRUN", {"value": "1"})
        put("NNODES", {"value": str(nodes)})
        put("NPROC_PER_NODE", {"value": str(gpus_per_node)})
        if nodes > 1:
            put("NODE_RANK", {"valueFrom": {"fieldRef": {"fieldPath": JOB_COMPLETION_INDEX}}})
        else:
            put("NODE_RANK", {"value": "0"})
        put("MASTER_ADDR", {"value": master_addr})
        put("MASTER_PORT", {"value": str(k8s.master_port)})
    return list(by_name.values())


def _resources(k8s: KubernetesSettings, gpus_per_node: int) -> dict[str, dict[str, str]]:
    requests = {"cpu": k8s.cpu_request, "memory": k8s.memory_request}
    limits: dict[str, str] = {}
    if k8s.cpu_limit:
        limits["cpu"] = k8s.cpu_limit
    if k8s.memory_limit:
        limits["memory"] = k8s.memory_limit
    if gpus_per_node:
        # an extended resource must have its limit equal to its request
        requests[k8s.gpu_resource] = limits[k8s.gpu_resource] = str(gpus_per_node)
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}


def _pod_template(spec: JobSpec, k8s: KubernetesSettings, *, data_root: Path, labels: dict[str, str],
                  annotations: dict[str, str], gpus_per_node: int, nodes: int, master_addr: str,
                  subdomain: str | None = None) -> dict[str, Any]:
    owner_dir = PurePosixPath("users") / spec.owner
    container = {
        "name": CONTAINER_NAME,
        "image": k8s.image,
        "imagePullPolicy": k8s.image_pull_policy,
        "command": ["llamafactory-cli", spec.command, f"{CONFIG_MOUNT}/{CONFIG_KEY}"],
        "workingDir": str(spec.workdir),
        "env": _env(spec, k8s, data_root, gpus_per_node, nodes, master_addr),
        "resources": _resources(k8s, gpus_per_node),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "data", "mountPath": str(data_root / owner_dir), "subPath": str(owner_dir)},
            {"name": "data", "mountPath": str(data_root / "shared"), "subPath": "shared", "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
    }
    pod_security = {
        "runAsNonRoot": True,
        "runAsUser": k8s.run_as_user,
        "runAsGroup": k8s.run_as_group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if k8s.fs_group is not None:
        pod_security["fsGroup"] = k8s.fs_group
        pod_security["fsGroupChangePolicy"] = "OnRootMismatch"  # no recursive chown of a big volume at each start
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # podFailurePolicy requires it; retries are new pods
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # no environment variables for every Service in the namespace
        "securityContext": pod_security,
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(spec.run_id),
                                             "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}},
            {"name": "data", "persistentVolumeClaim": {"claimName": k8s.pvc_name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size}},
        ],
    }
    if k8s.service_account:
        pod_spec["serviceAccountName"] = k8s.service_account
    if k8s.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in k8s.image_pull_secrets]
    if k8s.node_selector:
        pod_spec["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in k8s.tolerations]
    if k8s.priority_class:
        pod_spec["priorityClassName"] = k8s.priority_class
    if subdomain:
        pod_spec["subdomain"] = subdomain
    # the admin's extra labels and annotations never replace the portal's own
    pod_labels = {**k8s.pod_labels, **labels}
    pod_annotations = {**k8s.pod_annotations, **annotations}
    return {"metadata": {"labels": pod_labels, "annotations": pod_annotations}, "spec": pod_spec}


def _exit_code_rule(k8s: KubernetesSettings) -> list[dict[str, Any]]:
    """FailJob on the exit codes that mean a bad config: retrying cannot help."""
    codes = sorted(set(k8s.fail_fast_exit_codes))  # the API wants them unique and ordered
    if not codes:
        return []
    return [{"action": "FailJob", "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In", "values": codes}}]


def _disruption_rule(action: str) -> dict[str, Any]:
    """A pod lost to preemption, eviction or node drain (the DisruptionTarget condition)."""
    return {"action": action, "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


def _job_spec(k8s: KubernetesSettings, pod_template: dict[str, Any], *, nodes: int, backoff_limit: int,
              pod_failure_rules: list[dict[str, Any]], suspend: bool = False,
              ttl_seconds_after_finished: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"backoffLimit": backoff_limit}
    if nodes > 1:
        spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes)
    if k8s.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = k8s.active_deadline_seconds
    if ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = ttl_seconds_after_finished
    if suspend:
        spec["suspend"] = True  # Kueue admits the job by unsuspending it
    if pod_failure_rules:
        spec["podFailurePolicy"] = {"rules": pod_failure_rules}
    spec["template"] = pod_template
    return spec


def _peer_network_policy(run_id: int, object_metadata: dict[str, Any]) -> dict[str, Any]:
    """Lets the pods of one run on several nodes reach each other (torchrun, NCCL), and no
    other run's pods: deploy/'s NetworkPolicy denies all ingress to training pods."""
    run_pods = {"matchLabels": {LABEL_RUN_ID: str(run_id), LABEL_COMPONENT: COMPONENT_TRAINING}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_metadata,
        "spec": {"podSelector": run_pods, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": run_pods}]}]},
    }


def build_manifests(spec: JobSpec, k8s: KubernetesSettings, *, data_root: Path, config_yaml: str, config_sha256: str,
                    gpus_per_node: int, nodes: int = 1, experiment: str = "",
                    portal_url: str | None = None) -> list[dict[str, Any]]:
    """The objects of one run, in the order to create them: the ConfigMap, then the Job or
    JobSet, then on several nodes the headless Service (``multi_node: indexed`` only; JobSet
    makes its own) and a NetworkPolicy letting the run's pods reach each other.

    ``spec.env`` holds the per-run values (MLflow tracking URI, run id, experiment name), never
    credentials; ``data_root`` is the portal's data root, where the shared volume is mounted;
    ``portal_url`` is the run's page in the portal (an annotation). The objects after the Job
    or JobSet get their ownerReference from the launcher once it exists (see the module doc).
    Raises ValueError naming the option (--gpus, --nodes, kubernetes.*) for what cannot run.
    """
    data_root = Path(data_root)
    _check_inputs(spec, k8s, data_root, config_yaml, config_sha256, gpus_per_node, nodes, portal_url)
    name = job_name(spec.run_id)
    namespace = namespace_for(spec.owner, k8s)
    queue = queue_for(spec.owner, k8s)
    labels = _labels(spec, experiment)
    annotations = _annotations(spec, config_sha256, portal_url)
    top_labels = {**labels, LABEL_KUEUE_QUEUE: queue} if queue else labels

    def metadata(object_name: str, object_labels: dict[str, str]) -> dict[str, Any]:
        return {"name": object_name, "namespace": namespace, "labels": dict(object_labels),
                "annotations": dict(annotations)}

    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(config_map_name(spec.run_id), labels),
        "immutable": True,  # what ran is what was submitted
        "data": {CONFIG_KEY: config_yaml},
    }
    pod_args = {"data_root": data_root, "labels": labels, "annotations": annotations,
                "gpus_per_node": gpus_per_node, "nodes": nodes}

    if nodes > 1 and k8s.multi_node == "jobset":
        # JobSet's headless Service is named after the JobSet; pod hostnames are
        # <jobset>-<replicated job>-<job index>-<pod index>
        pod_template = _pod_template(spec, k8s, master_addr=f"{name}-{REPLICATED_JOB}-0-0.{name}", **pod_args)
        # a child Job fails at its first failed pod; the JobSet decides: restart everything on a
        # disruption (not counted), give up on a bad-config exit code, else restart up to backoff_limit
        child_spec = _job_spec(k8s, pod_template, nodes=nodes, backoff_limit=0,
                               pod_failure_rules=[_disruption_rule("FailJob"), *_exit_code_rule(k8s)])
        jobset_spec: dict[str, Any] = {
            "failurePolicy": {
                "maxRestarts": k8s.backoff_limit,
                "rules": [
                    {"name": "Disruption", "action": "RestartJobSetAndIgnoreMaxRestarts",
                     "onJobFailureReasons": ["PodFailurePolicy"],
                     "onJobFailureMessagePatterns": [DISRUPTION_MESSAGE_PATTERN]},
                    {"name": "BadConfig", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
                ],
            },
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        }
        if queue:
            jobset_spec["suspend"] = True  # Kueue admits the JobSet by unsuspending it
        if k8s.ttl_seconds_after_finished is not None:
            jobset_spec["ttlSecondsAfterFinished"] = k8s.ttl_seconds_after_finished
        jobset_spec["replicatedJobs"] = [{"name": REPLICATED_JOB, "replicas": 1,
                                          "template": {"metadata": {"labels": dict(labels)}, "spec": child_spec}}]
        jobset = {"apiVersion": JOBSET_API_VERSION, "kind": "JobSet", "metadata": metadata(name, top_labels),
                  "spec": jobset_spec}
        return [config_map, jobset, _peer_network_policy(spec.run_id, metadata(name, labels))]

    indexed = nodes > 1
    master_addr = f"{name}-0.{name}" if indexed else "127.0.0.1"  # Indexed pods are <job>-<index>.<subdomain>
    pod_template = _pod_template(spec, k8s, master_addr=master_addr, subdomain=name if indexed else None, **pod_args)
    job_spec = _job_spec(k8s, pod_template, nodes=nodes, backoff_limit=k8s.backoff_limit,
                         pod_failure_rules=[*_exit_code_rule(k8s), _disruption_rule("Ignore")],
                         suspend=bool(queue), ttl_seconds_after_finished=k8s.ttl_seconds_after_finished)
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata(name, top_labels), "spec": job_spec}
    if not indexed:
        return [config_map, job]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name, labels),
        "spec": {
            "clusterIP": "None",
            # pod 0's name must resolve before it is Ready: the other nodes look for it at start
            "publishNotReadyAddresses": True,
            "selector": {LABEL_RUN_ID: str(spec.run_id), LABEL_COMPONENT: COMPONENT_TRAINING},
            "ports": [{"name": "torchrun", "port": k8s.master_port, "targetPort": k8s.master_port}],
        },
    }
    return [config_map, job, service, _peer_network_policy(spec.run_id, metadata(name, labels))]


class _BlockStyleDumper(yaml.SafeDumper):
    """Multi-line strings (the config YAML) as ``|`` blocks, so the dry run reads like the file."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStyleDumper.add_representer(str, _represent_str)


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    """The manifests as one multi-document YAML text (what ``submit --dry-run`` prints)."""
    return yaml.dump_all(manifests, Dumper=_BlockStyleDumper, sort_keys=False, default_flow_style=False,
                         allow_unicode=True, explicit_start=True)
