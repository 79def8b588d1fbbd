"""Kubernetes launcher: one batch/v1 Job per run (a JobSet, or an Indexed Job with a headless
Service, for several nodes), sent with the official ``kubernetes`` client.

The manifests come from ``k8s_manifests`` (pure functions); this module talks to the API:
create them, read the Job and its pods into a status in words, save the pods' logs into the
run folder before the pods go, delete the Job with its pods, find the portal's Jobs again after
a restart, and watch them. The state kept in the Run row is the Job's namespace, name, kind and
uid, never a template.

API errors: 5xx, 429, timeouts and dropped connections are retried with exponential backoff;
403 becomes a message naming the missing RBAC permission; a 409 on create is a retried start
when the object carries this run's labels.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import k8s_manifests
from .base import JobSpec, Launcher, LaunchError, PollResult
from .local import describe_exit

log = logging.getLogger(__name__)

# labels the Job and JobSet controllers put on the pods they make
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
JOBSET_JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
KUEUE_QUEUE_LABEL = k8s_manifests.LABEL_KUEUE_QUEUE

EXIT_UNKNOWN = -1  # the job ended without an exit code of its own (deleted, deadline, evicted)
EXIT_IMAGE = 125  # as `docker run`: the container could not be started (its image cannot be pulled)
OOM_REASON = "out of memory (OOMKilled): ask for more memory or a smaller batch"

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_SECONDS = 8.0
IMAGE_ERRORS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
# pull errors that waiting cannot heal (a wrong name or tag, no access); others (a registry
# outage, a rate limit) may pass, so they are shown while the job keeps waiting
PERMANENT_PULL_ERROR = re.compile(r"not found|manifest unknown|unauthorized|denied|forbidden|does not exist|"
                                  r"invalid reference|repository name must|\b40[134]\b", re.IGNORECASE)
RBAC_FILE = "deploy/base/rbac.yaml"


@dataclass(frozen=True)
class Resource:
    """An API resource, named as RBAC rules name it."""

    group: str  # "" for the core group
    plural: str

    @property
    def rule(self) -> str:
        return f"{self.group}/{self.plural}" if self.group else self.plural


CONFIGMAPS = Resource("", "configmaps")
SERVICES = Resource("", "services")
NETWORK_POLICIES = Resource("networking.k8s.io", "networkpolicies")
PODS = Resource("", "pods")
POD_LOGS = Resource("", "pods/log")
JOBS = Resource("batch", "jobs")
JOBSET_GROUP, JOBSET_VERSION = k8s_manifests.JOBSET_GROUP, k8s_manifests.JOBSET_VERSION
JOBSETS = Resource(JOBSET_GROUP, k8s_manifests.JOBSET_PLURAL)


class KubernetesError(LaunchError):
    """An API call that failed for good; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED or DELETED
    job: dict[str, Any]


@dataclass(frozen=True)
class _Kind:
    """The client calls for one kind of object, with one signature for all kinds."""

    resource: Resource
    create: Callable[..., Any]  # (namespace, body)
    read: Callable[..., Any]  # (name, namespace)
    patch: Callable[..., Any]  # (name, namespace, body)
    delete: Callable[..., Any]  # (name, namespace, body=DeleteOptions)


def _api_message(body: Any) -> tuple[str, str]:
    """(reason, message) of a ``Status`` body, or its text when it is none."""
    try:
        status = json.loads(body)
        return status.get("reason") or "", status.get("message") or ""
    except (TypeError, ValueError, AttributeError):
        return "", (body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")).strip()


def _where(namespace: str | None) -> str:
    return f"in namespace {namespace}" if namespace else "across all namespaces"


def describe_api_error(status: int, reason: str, message: str, verb: str, resource: Resource,
                       namespace: str | None, name: str | None = None) -> str:
    """What a person can act on, for an API answer that was not a success."""
    what = f"{resource.plural} {name}" if name else resource.plural
    if status == 403:
        user = re.search(r'User "([^"]+)"', message)
        who = f"the portal's ServiceAccount ({user[1]})" if user else "the portal's ServiceAccount"
        scope = "" if namespace else " with a ClusterRole"
        return (f"{who} may not {verb} {resource.plural} {_where(namespace)}: grant {verb} on {resource.rule}"
                f"{scope} (see {RBAC_FILE})")
    if status == 401:
        return (f"the Kubernetes API refused the portal's credentials (401 {message or reason}): "
                "check kubernetes.kubeconfig or the ServiceAccount token")
    if status == 404 and "namespaces" in message and verb == "create":
        return (f"namespace {namespace} does not exist: create it, or check kubernetes.namespace / "
                "kubernetes.namespace_template")
    if status == 404:
        return f"{what} not found {_where(namespace)}"
    if status == 422:
        return f"the cluster rejected the {resource.plural} {name or ''} it was sent: {message}"
    return f"could not {verb} {what} {_where(namespace)} ({status} {reason}): {message}"


class KubernetesLauncher(Launcher):
    name = "kubernetes"
    on_cluster = True

    def __init__(self, settings, *, api_client=None, retry_base_delay: float = 0.5, poll_interval: float = 0.5):
        self.settings = settings
        self.k8s = settings.kubernetes
        self.retry_base_delay = retry_base_delay
        self.poll_interval = poll_interval  # between reads while waiting for a deletion
        self._api_client = api_client
        self._apis: tuple[Any, Any, Any, Any] | None = None
        self._lock = threading.Lock()

    # ---- the client ----------------------------------------------------------------------
    def _load_api_client(self):
        """In-cluster config (the portal's ServiceAccount), or a kubeconfig when one is named."""
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            if self.k8s.kubeconfig or self.k8s.context:
                config.load_kube_config(config_file=self.k8s.kubeconfig, context=self.k8s.context,
                                        client_configuration=configuration)
            else:
                config.load_incluster_config(client_configuration=configuration)
        except (config.ConfigException, OSError) as err:
            where = self.k8s.kubeconfig or "the in-cluster ServiceAccount (set kubernetes.kubeconfig outside a cluster)"
            raise KubernetesError(f"cannot load the Kubernetes configuration from {where}: {err}") from err
        configuration.retries = False  # urllib3's hidden retries off: api_retries says how many
        return client.ApiClient(configuration)

    def _clients(self):
        with self._lock:
            if self._apis is None:
                from kubernetes import client

                api_client = self._api_client or self._load_api_client()
                self._apis = (client.CoreV1Api(api_client), client.BatchV1Api(api_client),
                              client.CustomObjectsApi(api_client), client.NetworkingV1Api(api_client))
            return self._apis

    def _kind(self, kind: str) -> _Kind:
        core, batch, custom, networking = self._clients()
        if kind == "ConfigMap":
            return _Kind(CONFIGMAPS, core.create_namespaced_config_map, core.read_namespaced_config_map,
                         core.patch_namespaced_config_map, core.delete_namespaced_config_map)
        if kind == "Service":
            return _Kind(SERVICES, core.create_namespaced_service, core.read_namespaced_service,
                         core.patch_namespaced_service, core.delete_namespaced_service)
        if kind == "NetworkPolicy":
            return _Kind(NETWORK_POLICIES, networking.create_namespaced_network_policy,
                         networking.read_namespaced_network_policy, networking.patch_namespaced_network_policy,
                         networking.delete_namespaced_network_policy)
        if kind == "Job":
            return _Kind(JOBS, batch.create_namespaced_job, batch.read_namespaced_job,
                         batch.patch_namespaced_job, batch.delete_namespaced_job)
        if kind == "JobSet":
            def args(namespace: str) -> tuple[str, str, str, str]:
                return JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSETS.plural

            return _Kind(
                JOBSETS,
                lambda namespace, body, **kw: custom.create_namespaced_custom_object(*args(namespace), body, **kw),
                lambda name, namespace, **kw: custom.get_namespaced_custom_object(*args(namespace), name, **kw),
                lambda name, namespace, body, **kw: custom.patch_namespaced_custom_object(*args(namespace), name, body, **kw),
                lambda name, namespace, **kw: custom.delete_namespaced_custom_object(*args(namespace), name, **kw))
        raise LaunchError(f"the Kubernetes launcher cannot create a {kind}")

    def _call(self, verb: str, resource: Resource, namespace: str | None, fn: Callable[..., Any], *args: Any,
              name: str | None = None, stream: bool = False, text: bool = False, request_timeout: Any = None,
              **kwargs: Any) -> Any:
        """One API call, retried on 5xx, 429, timeouts and dropped connections; the parsed JSON
        answer (``text``: the answer as text; ``stream``: the open response). Errors become
        ``KubernetesError``."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        kwargs.update(_preload_content=False, _request_timeout=request_timeout or self.k8s.api_timeout_seconds)
        tries = 1 + self.k8s.api_retries
        for attempt in range(tries):
            try:
                response = fn(*args, **kwargs)
                if stream:
                    return response
                try:
                    data = response.data
                finally:
                    response.release_conn()
            except ApiException as err:
                reason, message = _api_message(err.body)
                if err.status in RETRYABLE_STATUSES and attempt + 1 < tries:
                    self._backoff(attempt, err.headers)
                    continue
                problem = describe_api_error(err.status or 0, reason or err.reason or "", message, verb, resource,
                                             namespace, name)
                if err.status in RETRYABLE_STATUSES:
                    problem += f" (tried {tries} times)"
                raise KubernetesError(problem, err.status, reason) from err
            except HTTPError as err:  # timeouts, refused or dropped connections
                if attempt + 1 < tries:
                    self._backoff(attempt)
                    continue
                what = f"{resource.plural} {name}" if name else resource.plural
                raise KubernetesError(
                    f"the Kubernetes API did not answer ({verb} {what} {_where(namespace)}, {tries} tries, "
                    f"{self.k8s.api_timeout_seconds:g} s each): {err}") from err
            if text:
                return data.decode("utf-8", errors="replace")
            return json.loads(data) if data else None
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, headers: Any = None) -> None:
        delay = min(MAX_BACKOFF_SECONDS, self.retry_base_delay * 2 ** attempt)
        retry_after = headers.get("Retry-After") if hasattr(headers, "get") else None
        if retry_after and str(retry_after).isdigit():  # 429: the server says when
            delay = max(delay, min(MAX_BACKOFF_SECONDS, float(retry_after)))
        time.sleep(delay)

    # ---- start ---------------------------------------------------------------------------
    def _config_of(self, spec: JobSpec) -> tuple[str, str]:
        import hashlib

        text = spec.config_yaml
        if not text:
            path = spec.workdir / "config.yaml"
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as err:
                raise LaunchError(f"no config to run: {path} cannot be read ({err})") from err
        return text, spec.config_sha256 or hashlib.sha256(text.encode("utf-8")).hexdigest()

    def build(self, spec: JobSpec) -> list[dict[str, Any]]:
        """The manifests of a run, in the order to create them, without sending them."""
        nodes = max(1, spec.nodes)
        if spec.gpus % nodes:
            raise LaunchError(f"{spec.gpus} GPUs cannot be spread evenly over {nodes} nodes")
        config_yaml, config_sha256 = self._config_of(spec)
        experiment = spec.experiment or spec.env.get("MLFLOW_EXPERIMENT_NAME", "")
        try:
            return k8s_manifests.build_manifests(
                spec, self.k8s, data_root=Path(self.settings.data_root), config_yaml=config_yaml,
                config_sha256=config_sha256, gpus_per_node=spec.gpus // nodes, nodes=nodes, experiment=experiment,
                portal_url=getattr(self.settings, "public_url", None))
        except ValueError as err:
            raise LaunchError(str(err)) from err

    def start(self, spec: JobSpec) -> dict[str, Any]:
        """Create the run's objects in order: those before the Job (the ConfigMap its pods mount)
        get the Job as their owner once it exists, those after it (a Service, a NetworkPolicy)
        are created owned by it."""
        manifests = self.build(spec)
        position = next((i for i, m in enumerate(manifests) if m.get("kind") in ("Job", "JobSet")), None)
        if position is None:
            raise LaunchError("the manifests of this run hold no Job or JobSet")
        workload = manifests[position]
        namespace = workload["metadata"].get("namespace") or k8s_manifests.namespace_for(spec.owner, self.k8s)
        before: list[dict[str, Any]] = []
        try:
            for manifest in manifests[:position]:
                before.append(self._create_or_adopt(manifest, namespace))
            job = self._create_or_adopt(workload, namespace)
        except LaunchError:
            for obj in before:  # nothing owns them yet: they would stay behind
                self._delete_quietly(obj["kind"], obj["metadata"]["name"], namespace, obj["metadata"]["uid"])
            raise
        state = {
            "namespace": namespace, "job": job["metadata"]["name"], "kind": job["kind"],
            "uid": job["metadata"]["uid"], "nodes": max(1, spec.nodes), "run_id": spec.run_id,
            "log_path": str(spec.log_path),
        }
        reference = k8s_manifests.owner_reference(job, job["metadata"]["uid"])
        try:
            for obj in before:
                self._own(obj, reference, namespace)
            for manifest in manifests[position + 1:]:
                meta = {**manifest["metadata"], "ownerReferences": [reference]}
                self._create_or_adopt({**manifest, "metadata": meta}, namespace)
        except LaunchError:
            # objects that would outlive the Job, or a run without its Service: undo it all
            # (the garbage collector takes what the Job owns), and say what went wrong
            self._delete_quietly(job["kind"], state["job"], namespace, state["uid"])
            raise
        return state

    def _create_or_adopt(self, manifest: dict[str, Any], namespace: str) -> dict[str, Any]:
        kind = self._kind(manifest["kind"])
        name = manifest["metadata"]["name"]
        try:
            return self._call("create", kind.resource, namespace, kind.create, namespace, manifest, name=name)
        except KubernetesError as err:
            if err.status != 409:
                raise
        # it exists: ours when it carries this run's labels (a start retried after a lost answer)
        existing = self._call("get", kind.resource, namespace, kind.read, name, namespace, name=name)
        if not _same_run(existing, manifest):
            raise LaunchError(f"a {manifest['kind']} named {name} already exists in namespace {namespace} and is not "
                              "this run's (another portal sharing the namespace?): delete it or use another namespace")
        log.info("adopting the existing %s %s/%s (a retried start)", manifest["kind"], namespace, name)
        return existing

    def _own(self, obj: dict[str, Any], reference: dict[str, Any], namespace: str) -> None:
        """Give ``obj`` the owner ``reference`` (the Job), so the garbage collector deletes it with the Job."""
        if reference in obj["metadata"].get("ownerReferences", []):
            return
        kind = self._kind(obj["kind"])
        name = obj["metadata"]["name"]
        self._call("patch", kind.resource, namespace, kind.patch, name, namespace,
                   {"metadata": {"ownerReferences": [reference]}}, name=name)

    # ---- status --------------------------------------------------------------------------
    def _read_workload(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """The run's Job (or JobSet); None when it is gone or was replaced by another of that name."""
        kind = self._kind(state.get("kind", "Job"))
        try:
            obj = self._call("get", kind.resource, state["namespace"], kind.read, state["job"], state["namespace"],
                             name=state["job"])
        except KubernetesError as err:
            if err.status == 404:
                return None
            raise
        if state.get("uid") and obj["metadata"].get("uid") != state["uid"]:
            return None
        return obj

    def _pods(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        core = self._clients()[0]
        label = JOBSET_NAME_LABEL if state.get("kind") == "JobSet" else JOB_NAME_LABEL
        answer = self._call("list", PODS, state["namespace"], core.list_namespaced_pod, state["namespace"],
                            label_selector=f"{label}={state['job']}")
        return answer.get("items", []) if answer else []

    def poll(self, state: dict[str, Any]) -> PollResult:
        try:
            workload = self._read_workload(state)
            if workload is None:
                return self._gone(state)
            pods = [] if _finished_condition(workload, "success") or _suspended(workload) else self._pods(state)
        except KubernetesError as err:  # an API outage does not end a run: say so, and look again later
            return PollResult(None, f"status unknown: {err}", phase="unknown")
        result = job_status(workload, pods, nodes=int(state.get("nodes", 1)))
        if result.exit_code == EXIT_IMAGE:  # it would wait forever, holding its quota
            self._delete_quietly(state.get("kind", "Job"), state["job"], state["namespace"], state.get("uid"))
        if result.exit_code is not None:
            self.save_logs(state)
        return result

    @staticmethod
    def _gone(state: dict[str, Any]) -> PollResult:
        """The Job was deleted behind the portal's back: by a person, or after its time to live
        while the portal was down (how it ended is not known any more)."""
        return PollResult(EXIT_UNKNOWN, "the Job was deleted (by someone, or after its time to live) before the "
                                        "portal saw it finish")

    # ---- stop ----------------------------------------------------------------------------
    def stop(self, state: dict[str, Any], grace_seconds: float) -> None:
        if not state.get("job"):
            return
        namespace, name = state["namespace"], state["job"]
        kind = self._kind(state.get("kind", "Job"))
        self.save_logs(state)  # the pods' logs go with them
        grace = max(0, int(grace_seconds))
        options = {"propagationPolicy": "Foreground", "gracePeriodSeconds": grace}
        if state.get("uid"):
            options["preconditions"] = {"uid": state["uid"]}  # never a newer Job of the same name
        try:
            self._call("delete", kind.resource, namespace, kind.delete, name, namespace, body=options, name=name)
        except KubernetesError as err:
            if err.status in (404, 409):  # gone already, or not ours any more
                return
            raise
        # the garbage collector deletes the pods with their own grace period: ask for ours
        core = self._clients()[0]
        try:
            for pod in self._pods(state):
                pod_name = pod["metadata"]["name"]
                try:
                    self._call("delete", PODS, namespace, core.delete_namespaced_pod, pod_name, namespace,
                               body={"gracePeriodSeconds": grace}, name=pod_name)
                except KubernetesError as err:
                    if err.status != 404:
                        raise
        except KubernetesError as err:
            log.warning("could not delete the pods of %s/%s with a grace of %s s: %s", namespace, name, grace, err)
        deadline = time.monotonic() + grace + self.k8s.api_timeout_seconds
        while time.monotonic() < deadline:
            try:
                if self._read_workload(state) is None:
                    return
            except KubernetesError as err:  # a passing API error: look again until the deadline
                log.debug("while waiting for %s/%s to go: %s", namespace, name, err)
            time.sleep(self.poll_interval)
        log.warning("%s %s/%s is still being deleted after %.0f s", state.get("kind", "Job"), namespace, name,
                    grace + self.k8s.api_timeout_seconds)

    def _delete_quietly(self, kind: str, name: str, namespace: str, uid: str | None) -> None:
        options: dict[str, Any] = {"propagationPolicy": "Foreground"}
        if uid:
            options["preconditions"] = {"uid": uid}
        api = self._kind(kind)
        try:
            self._call("delete", api.resource, namespace, api.delete, name, namespace, body=options, name=name)
        except KubernetesError as err:
            if err.status != 404:
                log.warning("could not delete %s %s/%s: %s", kind, namespace, name, err)

    # ---- logs ----------------------------------------------------------------------------
    def _ranked_pods(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """One pod per rank (the latest try), rank 0 first."""
        latest: dict[tuple[int, int], dict[str, Any]] = {}
        for pod in self._pods(state):
            labels = pod["metadata"].get("labels", {})
            rank = (_int(labels.get(JOBSET_JOB_INDEX_LABEL)), _int(labels.get(COMPLETION_INDEX_LABEL)))
            if rank not in latest or _created(pod) >= _created(latest[rank]):
                latest[rank] = pod
        return [latest[rank] for rank in sorted(latest)]

    def _pod_log(self, namespace: str, pod: dict[str, Any], *, stream: bool = False, follow: bool = False,
                 tail_lines: int | None = None) -> Any:
        core = self._clients()[0]
        name = pod["metadata"]["name"]
        kwargs: dict[str, Any] = {"container": pod["spec"]["containers"][0]["name"]}
        if tail_lines is not None:
            kwargs["tail_lines"] = tail_lines
        if follow:
            kwargs["follow"] = True
        # a followed log may be quiet for long: bound the connect, not the reads
        timeout = (self.k8s.api_timeout_seconds, None) if follow else None
        return self._call("get", POD_LOGS, namespace, core.read_namespaced_pod_log, name, namespace, name=name,
                          stream=stream, text=not stream, request_timeout=timeout, **kwargs)

    def logs(self, state: dict[str, Any], log_path: Path, tail_bytes: int = 64_000) -> str:
        """The pods' log tail (several nodes: rank 0, then the others line by line prefixed with
        their rank); the saved log in the run folder once the pods are gone."""
        if state.get("job"):
            try:
                pods = self._ranked_pods(state)
                if pods:
                    share = max(1, tail_bytes // len(pods))
                    parts = []
                    for rank, pod in enumerate(pods):
                        text = self._pod_log(state["namespace"], pod, tail_lines=max(100, share // 40)) or ""
                        parts.append(_prefixed(_tail(text, share), rank))
                    return "".join(parts)
            except KubernetesError as err:  # not started yet (400), or gone: the saved log, if any
                log.debug("no pod log for %s: %s", state.get("job"), err)
        return super().logs(state, log_path, tail_bytes)

    def save_logs(self, state: dict[str, Any]) -> bool:
        """Write the pods' whole logs into the run's log file (on the shared volume), so a run keeps
        its log after its pods are deleted. A log already there (written by the job itself, or saved
        before) is kept. True when it was saved now."""
        if not state.get("log_path") or not state.get("job"):
            return False
        path = Path(state["log_path"])
        try:
            if path.exists() and path.stat().st_size > 0:
                return False
            pods = self._ranked_pods(state)
            if not pods:
                return False
            partial = path.with_name(path.name + ".part")
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "w+b") as out:
                for rank, pod in enumerate(pods):
                    try:
                        response = self._pod_log(state["namespace"], pod, stream=True)
                    except KubernetesError as err:
                        if err.status in (400, 404):  # never started, or gone meanwhile
                            continue
                        raise
                    try:
                        if rank == 0:
                            out.writelines(response.stream(64 * 1024))
                        else:
                            out.writelines(f"[rank {rank}] {line}\n".encode() for line in _response_lines(response))
                    finally:
                        response.release_conn()
                saved = out.tell() > 0
            if not saved:  # no pod ever started: no log to keep
                partial.unlink(missing_ok=True)
                return False
            os.replace(partial, path)
            return True
        except (KubernetesError, OSError) as err:
            log.warning("could not save the log of %s/%s: %s", state.get("namespace"), state.get("job"), err)
            return False

    def follow_logs(self, state: dict[str, Any]) -> Iterator[str]:
        """The log of rank 0's pod, line by line, as it is written (until the pod ends)."""
        pods = self._ranked_pods(state) if state.get("job") else []
        if not pods:
            return
        response = self._pod_log(state["namespace"], pods[0], stream=True, follow=True)
        try:
            yield from _response_lines(response)
        finally:
            response.close()
            response.release_conn()

    # ---- after a restart -----------------------------------------------------------------
    def reconcile(self) -> list[dict[str, Any]]:
        """The state of every Job (and JobSet) the portal made that the cluster still has, each
        with ``run_id`` from its label, and the ``owner`` and ``config_sha256`` its annotations name:
        after a restart, RunService re-attaches its runs to them."""
        _, batch, custom, _ = self._clients()
        shared = None if self.k8s.namespace_template else self.k8s.namespace
        selector = k8s_manifests.TRAINING_SELECTOR
        if shared:
            jobs = self._call("list", JOBS, shared, batch.list_namespaced_job, shared, label_selector=selector)
        else:
            jobs = self._call("list", JOBS, None, batch.list_job_for_all_namespaces, label_selector=selector)
        items = list(jobs.get("items", []))
        try:
            if self.k8s.multi_node != "jobset":
                pass  # several nodes run as Indexed Jobs: no JobSets to look for (nor RBAC to list them)
            elif shared:
                jobsets = self._call("list", JOBSETS, shared, custom.list_namespaced_custom_object, JOBSET_GROUP,
                                     JOBSET_VERSION, shared, JOBSETS.plural, label_selector=selector)
            else:
                jobsets = self._call("list", JOBSETS, None, custom.list_cluster_custom_object, JOBSET_GROUP,
                                     JOBSET_VERSION, JOBSETS.plural, label_selector=selector)
            items += jobsets.get("items", [])
        except KubernetesError as err:
            if err.status != 404:  # 404: no JobSet CRD in this cluster
                raise
        states = []
        for obj in items:
            meta = obj["metadata"]
            if any(ref.get("kind") == "JobSet" for ref in meta.get("ownerReferences", [])):
                continue  # a JobSet's child Job: the JobSet is the run's
            run_id = _int(meta.get("labels", {}).get(k8s_manifests.LABEL_RUN_ID), default=None)
            if run_id is None:
                continue
            annotations = meta.get("annotations") or {}
            states.append({"namespace": meta["namespace"], "job": meta["name"], "kind": obj.get("kind", "Job"),
                           "uid": meta["uid"], "nodes": _workload_nodes(obj), "run_id": run_id,
                           # to tell this run's Job from another portal's (or an older database's) run of that id
                           "owner": annotations.get(k8s_manifests.ANNOTATION_OWNER),
                           "config_sha256": annotations.get(k8s_manifests.ANNOTATION_CONFIG_SHA256)})
        return sorted(states, key=lambda s: s["run_id"])

    def watch_jobs(self, resource_version: str | None = None) -> Iterator[WatchEvent]:
        """The portal's Jobs as they change, forever. A dropped stream resumes from the last
        resourceVersion seen; when that is too old (410 Gone) the Jobs are listed again and the
        differences yielded (ADDED, MODIFIED, DELETED), then watched from the list's version.
        Without ``resource_version`` it starts with a list: every current Job as ADDED."""
        from kubernetes.watch.watch import iter_resp_lines
        from urllib3.exceptions import HTTPError

        batch = self._clients()[1]
        shared = None if self.k8s.namespace_template else self.k8s.namespace
        selector = k8s_manifests.TRAINING_SELECTOR
        known: dict[str, dict[str, Any]] = {}  # uid -> the last version yielded
        failures = 0

        def watch_call(version: str):
            kwargs = {"label_selector": selector, "watch": True, "resource_version": version,
                          "allow_watch_bookmarks": True, "timeout_seconds": 300, "stream": True,
                          "request_timeout": (self.k8s.api_timeout_seconds, 330)}
            if shared:
                return self._call("watch", JOBS, shared, batch.list_namespaced_job, shared, **kwargs)
            return self._call("watch", JOBS, None, batch.list_job_for_all_namespaces, **kwargs)

        def relist() -> tuple[str, list[WatchEvent]]:
            if shared:
                answer = self._call("list", JOBS, shared, batch.list_namespaced_job, shared, label_selector=selector)
            else:
                answer = self._call("list", JOBS, None, batch.list_job_for_all_namespaces, label_selector=selector)
            current = {job["metadata"]["uid"]: job for job in answer.get("items", [])}
            events = [WatchEvent("DELETED", job) for uid, job in known.items() if uid not in current]
            for uid, job in current.items():
                if uid not in known:
                    events.append(WatchEvent("ADDED", job))
                elif known[uid]["metadata"].get("resourceVersion") != job["metadata"].get("resourceVersion"):
                    events.append(WatchEvent("MODIFIED", job))
            return answer["metadata"]["resourceVersion"], events

        version = resource_version
        while True:
            if version is None:
                version, events = relist()
                for event in events:
                    self._remember(known, event)
                    yield event
            response = watch_call(version)
            try:
                for line in iter_resp_lines(response):
                    if not line:
                        continue
                    raw = json.loads(line)
                    obj = raw.get("object") or {}
                    if raw.get("type") == "ERROR":
                        if obj.get("code") == 410:  # our version was compacted away: list again
                            version = None
                            break
                        raise KubernetesError(f"the watch of Jobs failed: {obj.get('message')}", obj.get("code"),
                                              obj.get("reason"))
                    version = obj["metadata"]["resourceVersion"]
                    failures = 0
                    if raw.get("type") == "BOOKMARK":
                        continue
                    event = WatchEvent(raw["type"], obj)
                    self._remember(known, event)
                    yield event
            except (HTTPError, ValueError) as err:  # dropped (or cut mid-line): resume from `version`
                failures += 1
                if failures > self.k8s.api_retries:
                    raise KubernetesError(f"the watch of Jobs keeps dropping ({failures} times): {err}") from err
                log.info("the watch of Jobs dropped (%s); resuming from resourceVersion %s", err, version)
                self._backoff(failures - 1)
            finally:
                response.close()
                response.release_conn()

    @staticmethod
    def _remember(known: dict[str, dict[str, Any]], event: WatchEvent) -> None:
        uid = event.job["metadata"]["uid"]
        if event.type == "DELETED":
            known.pop(uid, None)
        else:
            known[uid] = event.job


# ---- reading a Job (pure: also for a watch's objects) ----------------------------------------
def _int(value: Any, default: Any = 0) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _created(obj: dict[str, Any]) -> str:
    return obj["metadata"].get("creationTimestamp") or ""  # RFC 3339 in UTC: sorts as text


def _same_run(existing: dict[str, Any], manifest: dict[str, Any]) -> bool:
    """Made for the same run: every label and annotation the manifest sets, with the same value
    (the run id alone could repeat across two portals sharing a namespace)."""
    want, have = manifest["metadata"], existing["metadata"]
    if not want.get("labels"):
        return False
    return all((have.get(part) or {}).get(key) == value
               for part in ("labels", "annotations") for key, value in (want.get(part) or {}).items())


def _workload_nodes(obj: dict[str, Any]) -> int:
    spec = obj.get("spec", {})
    if obj.get("kind") == "JobSet":
        return sum(_int(r.get("replicas"), 1) * _int(r.get("template", {}).get("spec", {}).get("parallelism"), 1)
                   for r in spec.get("replicatedJobs", [])) or 1
    return _int(spec.get("parallelism"), 1) or 1


def _true_conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def _finished_condition(obj: dict[str, Any], outcome: str) -> dict[str, Any] | None:
    """The condition saying the Job (Complete) or JobSet (Completed) succeeded, or that it failed."""
    types = ("Complete", "Completed") if outcome == "success" else ("Failed",)
    conditions = _true_conditions(obj)
    return next((conditions[t] for t in types if t in conditions), None)


def _suspended(obj: dict[str, Any]) -> bool:
    return bool((obj.get("spec") or {}).get("suspend")) or "Suspended" in _true_conditions(obj)


def _container_states(pod: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(container status, its state) of the init and main containers."""
    status = pod.get("status") or {}
    return [(s, s.get("state") or {}) for s in (status.get("initContainerStatuses") or []) +
            (status.get("containerStatuses") or [])]


def pod_failure(pod: dict[str, Any]) -> tuple[int, str]:
    """The exit code of a failed pod and why, in words."""
    status = pod.get("status") or {}
    terminated = [state["terminated"] for _, state in _container_states(pod) if "terminated" in state]
    failed = next((t for t in terminated if t.get("exitCode")), terminated[0] if terminated else None)
    code = _int(failed.get("exitCode"), EXIT_UNKNOWN) if failed else EXIT_UNKNOWN
    if any(t.get("reason") == "OOMKilled" for t in terminated):
        oom = next(t for t in terminated if t.get("reason") == "OOMKilled")
        return _int(oom.get("exitCode"), 137) or 137, OOM_REASON
    if status.get("reason") == "Evicted":
        return code, f"evicted from its node: {status.get('message') or 'the node ran short of a resource'}"
    if status.get("reason") == "DeadlineExceeded":
        return code, "stopped after the pod's deadline (activeDeadlineSeconds)"
    if failed is not None and code != EXIT_UNKNOWN:
        text = describe_exit(code) or f"exited with code {code}"
        if failed.get("message"):
            text += f": {failed['message'].strip().splitlines()[-1]}"
        return code, text
    if status.get("reason") or status.get("message"):
        return code, ": ".join(filter(None, (status.get("reason"), status.get("message"))))
    return code, "the pod failed"


def _waiting(pod: dict[str, Any]) -> tuple[str, str, str] | None:
    """(reason, message, image) of the first container waiting to start, if any."""
    images = {c["name"]: c.get("image", "") for c in (pod.get("spec") or {}).get("initContainers", []) +
              (pod.get("spec") or {}).get("containers", [])}
    for status, state in _container_states(pod):
        if "waiting" in state:
            waiting = state["waiting"]
            image = status.get("image") or images.get(status.get("name"), "")
            return waiting.get("reason") or "", (waiting.get("message") or "").strip(), image
    return None


def _unschedulable(pod: dict[str, Any]) -> str | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return condition.get("message") or condition.get("reason") or "no node fits it yet"
    return None


def job_status(workload: dict[str, Any], pods: list[dict[str, Any]], nodes: int = 1) -> PollResult:
    """A Job's (or JobSet's) status in words, from its conditions and its pods'."""
    if _finished_condition(workload, "success"):
        return PollResult(0)
    failed_pods = sorted((p for p in pods if (p.get("status") or {}).get("phase") == "Failed"), key=_created)
    failed = _finished_condition(workload, "Failed")
    if failed is not None:
        return _failure(workload, failed, failed_pods)
    if (workload.get("metadata") or {}).get("deletionTimestamp"):
        return PollResult(None, "stopping: the Job is being deleted", phase="stopping")
    if _suspended(workload):
        queue = (workload["metadata"].get("labels") or {}).get(KUEUE_QUEUE_LABEL)
        if queue:
            return PollResult(None, f"queued: waiting for quota in {queue}", phase="queued")
        return PollResult(None, "suspended: the Job waits to be resumed", phase="queued")

    live = [p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running", None)
            and not p["metadata"].get("deletionTimestamp")]
    retry = ""
    if failed_pods:
        _, why = pod_failure(failed_pods[-1])
        retry = f" (try {len(failed_pods) + 1}; the last one failed: {why})"
    for pod in live:  # a wrong image never heals by waiting
        waiting = _waiting(pod)
        if waiting and waiting[0] in IMAGE_ERRORS:
            reason, message, image = waiting
            if reason in ("InvalidImageName", "ErrImageNeverPull") or PERMANENT_PULL_ERROR.search(message):
                return PollResult(EXIT_IMAGE, f"the image {image} cannot be pulled ({reason}): {message}")
    if not live and any((p.get("status") or {}).get("phase") == "Succeeded" for p in pods):
        return PollResult(None, "finishing: the pods are done", phase="running")
    if not live:
        return PollResult(None, "waiting for the Job controller to create the pod" + retry, phase="starting")
    pending = [p for p in live if p["status"].get("phase") != "Running"]
    for pod in pending:
        message = _unschedulable(pod)
        if message:
            scheduled = len(live) - sum(1 for p in live if _unschedulable(p))
            count = f" ({scheduled} of {len(live)} pods placed)" if len(live) > 1 else ""
            return PollResult(None, f"waiting for a node: {message}{count}{retry}", phase="queued")
    for pod in pending:
        waiting = _waiting(pod)
        if waiting and waiting[0] in IMAGE_ERRORS:
            return PollResult(None, f"waiting for the image {waiting[2]} ({waiting[0]}): {waiting[1]}{retry}",
                              phase="starting")
        if waiting and waiting[0] not in ("ContainerCreating", "PodInitializing", ""):
            return PollResult(None, f"cannot start the container yet ({waiting[0]}): {waiting[1]}{retry}",
                              phase="starting")
    if pending:
        node = pending[0]["spec"].get("nodeName")
        where = f" on {node}" if node else ""
        count = f" ({len(live) - len(pending)} of {max(nodes, len(live))} pods running)" if max(nodes, len(live)) > 1 else ""
        return PollResult(None, f"starting the container{where}{count}{retry}", phase="starting")
    node_names = sorted({p["spec"].get("nodeName") or "?" for p in live})
    where = node_names[0] if len(node_names) == 1 else f"{len(node_names)} nodes"
    return PollResult(None, f"running on {where}{retry}", phase="running")


def _failure(workload: dict[str, Any], condition: dict[str, Any], failed_pods: list[dict[str, Any]]) -> PollResult:
    reason, message = condition.get("reason") or "", (condition.get("message") or "").strip()
    if reason == "DeadlineExceeded":
        deadline = (workload.get("spec") or {}).get("activeDeadlineSeconds")
        limit = f"activeDeadlineSeconds={deadline}" if deadline else "activeDeadlineSeconds"
        return PollResult(EXIT_UNKNOWN, f"stopped after the deadline ({limit})")
    if failed_pods:
        # a cause with a name (out of memory, eviction) wins over the exit codes it caused
        named = [p for p in failed_pods if pod_failure(p)[1] == OOM_REASON
                 or (p.get("status") or {}).get("reason") == "Evicted"]
        code, why = pod_failure((named or failed_pods)[-1])
    else:  # the pods are gone: what the condition says
        found = re.search(r"exit code (\d+)", message)
        code = int(found[1]) if found else EXIT_UNKNOWN
        why = describe_exit(code) if found else (message or reason or "the Job failed")
    if reason == "PodFailurePolicy":
        why += " (not retried: the pod failure policy says retrying cannot help)"
    elif reason == "BackoffLimitExceeded" and len(failed_pods) > 1:
        why += f" (failed {len(failed_pods)} times)"
    return PollResult(code, why)


def _tail(text: str, tail_bytes: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= tail_bytes:
        return text
    return data[-tail_bytes:].decode("utf-8", errors="replace").split("\n", 1)[-1]


def _prefixed(text: str, rank: int) -> str:
    if rank == 0 or not text:
        return text
    return "".join(f"[rank {rank}] {line}\n" for line in text.splitlines())


def _response_lines(response) -> Iterator[str]:
    from kubernetes.watch.watch import iter_resp_lines

    yield from iter_resp_lines(response)
