"""Settings of the Kubernetes launcher (``kubernetes:`` in the portal config file, or
``PORTAL_KUBERNETES__<FIELD>`` environment variables).

Plain data: the manifests are built by ``portal.launchers.k8s_manifests`` and sent by
``portal.launchers.kubernetes``. Secrets are named here (Secret name + key), never given.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# RFC 1123 label: what a namespace, a Secret or a PVC name must be
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class SecretRef(BaseModel):
    """An environment variable filled from a key of a Kubernetes Secret (``secretKeyRef``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str  # the Secret's name
    key: str  # the key inside it
    optional: bool = False

    @field_validator("secret")
    @classmethod
    def _secret_name(cls, value: str) -> str:
        if not DNS_SUBDOMAIN.match(value):
            raise ValueError(f"secret name '{value}' is not a Kubernetes object name (lower case letters, digits, '-', '.')")
        return value


class KubernetesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # where jobs run: one namespace, or one per user from a template ({user} is the owner as a label value)
    namespace: str = "llamaboard"
    namespace_template: str | None = None  # e.g. "llm-{user}"; None: every job in `namespace`
    kubeconfig: str | None = None  # None: in-cluster config (the portal's ServiceAccount), else this file
    context: str | None = None  # kubeconfig context

    # the trainer container
    image: str = "llamaboard-trainer:latest"
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    service_account: str | None = None  # the job pods' ServiceAccount (Workload Identity); None: the default
    # the shared RWX volume holding models, datasets and run folders; mounted in the job pods at the
    # portal's data root, so every path the portal writes into a config means the same in the pod
    pvc_name: str = "llamaboard-data"
    shm_size: str = "16Gi"  # /dev/shm as a memory emptyDir (PyTorch data loaders and NCCL use it)
    # the job pods' user and group, never root; the portal image runs as the same ids, so the jobs
    # can write into the run folders the portal made on the shared volume
    run_as_user: int = Field(default=10001, ge=1)
    run_as_group: int = Field(default=10001, ge=1)
    fs_group: int | None = Field(default=None, ge=1)  # for volumes whose ownership the kubelet sets (not NFS)

    # resources of one pod (one node's share of the run)
    gpu_resource: str = "nvidia.com/gpu"
    cpu_request: str = "4"
    cpu_limit: str | None = None
    memory_request: str = "32Gi"
    memory_limit: str | None = "64Gi"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)  # as in a pod spec
    priority_class: str | None = None
    # added to the job pods, under the portal's own: e.g. azure.workload.identity/use: "true"
    # (Azure Workload Identity), sidecar.istio.io/inject: "false" (a sidecar would keep a Job running)
    pod_labels: dict[str, str] = Field(default_factory=dict)
    pod_annotations: dict[str, str] = Field(default_factory=dict)

    # reliability
    backoff_limit: int = Field(default=2, ge=0)  # retries after disruptions; bad-config exit codes never retry
    active_deadline_seconds: int | None = Field(default=7 * 24 * 3600, ge=1)
    ttl_seconds_after_finished: int | None = Field(default=24 * 3600, ge=0)
    # exit codes that mean "the config is wrong": retrying cannot help (podFailurePolicy FailJob)
    fail_fast_exit_codes: list[int] = Field(default_factory=lambda: [1, 2])

    # Kueue: when set, jobs are created suspended with this LocalQueue ({user} as in namespace_template)
    kueue_queue: str | None = None
    # several nodes: "jobset" (JobSet CRD) or "indexed" (an Indexed Job + a headless Service)
    multi_node: str = "jobset"
    master_port: int = Field(default=29500, ge=1, le=65535)
    # what one run may ask for (submit --gpus/--nodes, the API's gpus/nodes); gpus_per_run is the default
    max_gpus_per_node: int = Field(default=8, ge=1)
    max_nodes: int = Field(default=4, ge=1)

    # environment of the job pods: secrets by reference only (HF_TOKEN, MLflow credentials, ...)
    env_secrets: dict[str, SecretRef] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)  # plain values, e.g. HF_ENDPOINT of an Artifactory proxy

    # API calls: retries for 5xx and timeouts, with exponential backoff
    api_retries: int = Field(default=4, ge=0)
    api_timeout_seconds: float = Field(default=30.0, gt=0)

    @field_validator("namespace", "pvc_name")
    @classmethod
    def _label(cls, value: str) -> str:
        if not DNS_LABEL.match(value):
            raise ValueError(f"'{value}' is not a Kubernetes name (lower case letters, digits and '-', at most 63)")
        return value

    @field_validator("multi_node")
    @classmethod
    def _multi_node(cls, value: str) -> str:
        if value not in ("jobset", "indexed"):
            raise ValueError("kubernetes.multi_node must be 'jobset' or 'indexed'")
        return value

    @field_validator("env")
    @classmethod
    def _no_secret_values(cls, value: dict[str, str]) -> dict[str, str]:
        secretish = sorted(k for k in value if re.search(r"TOKEN|SECRET|PASSWORD|KEY", k, re.I))
        if secretish:
            raise ValueError(f"kubernetes.env {', '.join(secretish)}: credentials go in env_secrets "
                             "(a Secret name and key), never as values")
        return value
