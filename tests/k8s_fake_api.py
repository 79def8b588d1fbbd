"""An HTTP fake of the Kubernetes API server, for testing the Kubernetes launcher.

No API server can run on the dev and CI machines (DESIGN.md), so the launcher's client code is
tested against this: a real HTTP server on loopback that answers the REST paths the official
``kubernetes`` client calls, with the bodies a real API server sends (objects with uid,
resourceVersion and creationTimestamp; ``Status`` bodies for errors; watch streams of JSON
lines). The client itself runs unchanged, over a real socket.

What it implements:
- configmaps, services, networkpolicies, pods (get, list, create, patch, delete; pod logs with tailLines,
  limitBytes and follow), batch/v1 jobs and jobset.x-k8s.io/v1alpha2 jobsets (get, list with
  labelSelector, create, patch, delete with propagationPolicy and a uid precondition, watch);
- garbage collection by ownerReferences: Foreground and Background deletion remove the
  dependents, Orphan (the default for a Job deleted through the API) leaves them;
- watches from a resourceVersion, with 410 Gone once the history was compacted;
- what the cluster does, driven by the test: ``add_pod``, ``unschedulable``, ``waiting``
  (ContainerCreating, ImagePullBackOff, ...), ``run``, ``terminate`` (exit code, OOMKilled,
  Evicted), ``set_condition`` (Complete, Failed with its reason), ``admit`` (Kueue),
  ``write_log``, ``delete`` (kubectl, or the TTL controller); ``foreground_delay_gets`` keeps
  an owner deleted in the foreground visible for a few reads, as its pods terminate;
- faults: ``fail`` (the next N matching calls answer 403/409/429/500 with a real Status
  body), ``hang`` (no answer for a while, optionally after doing the work), ``drop_watch``
  (a watch connection cut after K events), ``compact`` (410 Gone for older versions, and
  optionally every open watch cut); ``namespaces`` to make creating elsewhere a 404.

What it does not: admission, validation of bodies, scheduling, any controller of its own.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

SERVICE_ACCOUNT = "system:serviceaccount:llamaboard:portal"


@dataclass(frozen=True)
class Resource:
    plural: str
    kind: str
    group: str  # "" for the core group
    version: str

    @property
    def prefix(self) -> str:
        return "/api/v1" if not self.group else f"/apis/{self.group}/{self.version}"

    @property
    def api_version(self) -> str:
        return self.version if not self.group else f"{self.group}/{self.version}"

    @property
    def qualified(self) -> str:  # how the API names it in messages: jobs.batch, configmaps
        return self.plural if not self.group else f"{self.plural}.{self.group}"


RESOURCES = {r.plural: r for r in (
    Resource("configmaps", "ConfigMap", "", "v1"),
    Resource("services", "Service", "", "v1"),
    Resource("networkpolicies", "NetworkPolicy", "networking.k8s.io", "v1"),
    Resource("pods", "Pod", "", "v1"),
    Resource("jobs", "Job", "batch", "v1"),
    Resource("jobsets", "JobSet", "jobset.x-k8s.io", "v1alpha2"),
)}
ROUTE = re.compile(r"^(?P<prefix>/api/v1|/apis/[^/]+/[^/]+)(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)"
                   r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[a-z]+))?)?$")
# labels the Job and JobSet controllers put on their pods
JOB_NAME = "batch.kubernetes.io/job-name"
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
JOBSET_JOB_INDEX = "jobset.sigs.k8s.io/job-index"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str, details: dict | None = None) -> dict[str, Any]:
    """The ``Status`` object the API server answers errors with."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


def matches(labels: dict[str, str], selector: str | None) -> bool:
    """Equality-based label selectors: ``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, comma separated."""
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic merge: lists are replaced)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: dict, operations: list[dict]) -> dict:
    """RFC 6902 add/replace/remove on object paths (enough for metadata fields)."""
    result = copy.deepcopy(target)
    for op in operations:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node = result
        for part in parents:
            node = node.setdefault(part, {})
        if op["op"] in ("add", "replace"):
            node[last] = op["value"]
        elif op["op"] == "remove":
            node.pop(last, None)
    return result


@dataclass
class Fault:
    method: str
    path: re.Pattern
    times: int
    status: int | None = None  # answer this status
    body: dict | None = None  # ... with this Status body (None: the real one for the status)
    hang_seconds: float = 0.0  # or answer nothing for this long
    after_work: bool = False  # hang after doing the work (the answer is lost, the change is made)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up: no news
            super().handle_error(request, client_address)


class FakeKubernetes:
    """Start with ``start()`` (or as a context manager); ``url`` is what the client points at."""

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) -> object
        self._events: list[tuple[int, str, str, dict]] = []  # (resourceVersion, plural, type, object)
        self._logs: dict[tuple[str, str], str] = {}  # (namespace, pod) -> text
        self._rv = 100
        self._compacted_rv = 0  # watches from an older resourceVersion get 410 Gone
        self._watch_generation = 0  # bumped to cut every open watch stream
        self._faults: list[Fault] = []
        self._watch_drops: list[int] = []  # each entry: the next watch is cut after that many events
        self._foreground_gets: dict[tuple[str, str, str], int] = {}  # owner -> GETs left before it is gone
        self.foreground_delay_gets = 0  # how many GETs see an owner being deleted in the foreground
        self.namespaces: set[str] | None = None  # None: every namespace exists
        self.requests: list[Request] = []
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    # ---- server ------------------------------------------------------------------------
    def start(self) -> FakeKubernetes:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and chunked watch streams, as the real one

            def setup(self):
                super().setup()
                # headers and body go in separate writes: without this, Nagle's algorithm and
                # delayed ACKs cost 40 ms per answer
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):
                pass

            def do_GET(self):
                fake._handle(self, "GET")

            def do_POST(self):
                fake._handle(self, "POST")

            def do_PATCH(self):
                fake._handle(self, "PATCH")

            def do_PUT(self):
                fake._handle(self, "PUT")

            def do_DELETE(self):
                fake._handle(self, "DELETE")

        self._server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def api_client(self):
        """An official ``kubernetes.client.ApiClient`` pointed at this fake (urllib3's own
        retries off, so every retry the tests count is the launcher's)."""
        from kubernetes import client

        configuration = client.Configuration(host=self.url)
        configuration.retries = False
        return client.ApiClient(configuration)

    # ---- faults ------------------------------------------------------------------------
    def fail(self, method: str, path: str, status: int, times: int = 1, body: dict | None = None,
             headers: dict[str, str] | None = None) -> None:
        """The next ``times`` calls of ``method`` on a path matching the regex ``path`` answer ``status``."""
        self._faults.append(Fault(method, re.compile(path), times, status=status, body=body, headers=headers or {}))

    def hang(self, method: str, path: str, seconds: float, times: int = 1, after_work: bool = False) -> None:
        """The next ``times`` matching calls get no answer for ``seconds`` (with ``after_work``
        the change is made first: a create whose answer is lost)."""
        self._faults.append(Fault(method, re.compile(path), times, hang_seconds=seconds, after_work=after_work))

    def drop_watch(self, after_events: int) -> None:
        """The next watch connection is cut (no end of stream) after ``after_events`` events."""
        self._watch_drops.append(after_events)

    def compact(self, cut_watches: bool = False) -> None:
        """Forget the event history, as etcd compaction does: older resourceVersions get 410 Gone.
        With ``cut_watches`` the open watch streams are cut too (an API server restarting)."""
        with self._cond:
            self._compacted_rv = self._rv
            self._events.clear()
            if cut_watches:
                self._watch_generation += 1
            self._cond.notify_all()

    @property
    def lock(self):
        """Hold it to make several changes at once, unseen by the streams in between."""
        return self._cond

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._cond:
            for fault in self._faults:
                if fault.method == method and fault.path.search(path) and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    # ---- the store ---------------------------------------------------------------------
    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _record(self, plural: str, event_type: str, obj: dict) -> None:
        self._events.append((int(obj["metadata"]["resourceVersion"]), plural, event_type, copy.deepcopy(obj)))
        self._cond.notify_all()

    def _put(self, plural: str, obj: dict, event_type: str) -> dict:
        obj["metadata"]["resourceVersion"] = str(self._next_rv())
        self._objects[(plural, obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
        self._record(plural, event_type, obj)
        return obj

    def _remove(self, key: tuple[str, str, str]) -> dict | None:
        obj = self._objects.pop(key, None)
        if obj is not None:
            obj["metadata"]["resourceVersion"] = str(self._next_rv())
            self._record(key[0], "DELETED", obj)
        return obj

    def _dependents(self, uid: str) -> list[tuple[str, str, str]]:
        return [key for key, obj in self._objects.items()
                if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences", []))]

    def _collect(self, key: tuple[str, str, str]) -> None:
        """Delete an object and (as the garbage collector does) everything it owns."""
        obj = self._objects.get(key)
        if obj is None:
            return
        for dependent in self._dependents(obj["metadata"]["uid"]):
            self._collect(dependent)
        self._remove(key)

    def create(self, plural: str, namespace: str, body: dict) -> dict:
        """Store a new object as the API server would (used by the handler and by tests)."""
        resource = RESOURCES[plural]
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = namespace
        meta.setdefault("labels", {})
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        obj.update(kind=resource.kind, apiVersion=resource.api_version)
        obj.setdefault("status", {})
        if plural in ("jobs", "jobsets") and obj.get("spec", {}).get("suspend"):
            obj["status"]["conditions"] = [_condition("Suspended", "JobSuspended", "Job suspended")]
        with self._cond:
            return copy.deepcopy(self._put(plural, obj, "ADDED"))

    def get(self, plural: str, namespace: str, name: str) -> dict | None:
        with self._cond:
            obj = self._objects.get((plural, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, plural: str, namespace: str | None = None, selector: str | None = None) -> list[dict]:
        with self._cond:
            return [copy.deepcopy(obj) for (p, ns, _), obj in sorted(self._objects.items())
                    if p == plural and namespace in (None, ns) and matches(obj["metadata"].get("labels", {}), selector)]

    def delete(self, plural: str, namespace: str, name: str) -> None:
        """Delete an object and its dependents (a person with kubectl, or the TTL controller)."""
        with self._cond:
            self._collect((plural, namespace, name))

    def modify(self, plural: str, namespace: str, name: str, change) -> dict:
        """Apply ``change(obj)`` in place and publish a MODIFIED event."""
        with self._cond:
            obj = self._objects[(plural, namespace, name)]
            change(obj)
            return copy.deepcopy(self._put(plural, obj, "MODIFIED"))

    # ---- what the cluster does (driven by tests) ---------------------------------------
    def add_pod(self, namespace: str, owner: str, *, plural: str = "jobs", index: int = 0, job_index: int = 0) -> str:
        """A pod of a Job (or JobSet), as its controller makes it: Pending, not yet scheduled."""
        workload = self.get(plural, namespace, owner)
        assert workload is not None, f"no {plural} {owner}"
        if plural == "jobsets":
            template = workload["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
            labels = {JOBSET_NAME: owner, JOBSET_JOB_INDEX: str(job_index), JOB_NAME: f"{owner}-worker-{job_index}"}
        else:
            template = workload["spec"]["template"]
            labels = {JOB_NAME: owner, "job-name": owner, CONTROLLER_UID: workload["metadata"]["uid"]}
        labels = {**template.get("metadata", {}).get("labels", {}), **labels, COMPLETION_INDEX: str(index)}
        name = f"{owner}-{job_index}-{index}-{uuid.uuid4().hex[:5]}"
        containers = template.get("spec", {}).get("containers") or [{"name": "trainer", "image": "trainer:latest"}]
        pod = {
            "metadata": {"name": name, "labels": labels, "ownerReferences": [{
                "apiVersion": workload["apiVersion"], "kind": workload["kind"], "name": owner,
                "uid": workload["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"containers": [{"name": c["name"], "image": c.get("image", "")} for c in containers]},
            "status": {"phase": "Pending", "conditions": []},
        }
        self.create("pods", namespace, pod)
        return name

    def unschedulable(self, namespace: str, pod: str, message: str) -> None:
        def change(obj):
            obj["status"]["conditions"] = [_condition("PodScheduled", "Unschedulable", message, status="False")]
        self.modify("pods", namespace, pod, change)

    def waiting(self, namespace: str, pod: str, reason: str, message: str = "", node: str = "gpu-node-1") -> None:
        """Scheduled, its container waiting (ContainerCreating, ErrImagePull, ImagePullBackOff, ...)."""
        def change(obj):
            obj["spec"]["nodeName"] = node
            obj["status"]["conditions"] = [_condition("PodScheduled", "", "")]
            obj["status"]["containerStatuses"] = [
                {"name": c["name"], "image": c["image"], "ready": False, "restartCount": 0,
                 "state": {"waiting": {"reason": reason, "message": message}}} for c in obj["spec"]["containers"]]
        self.modify("pods", namespace, pod, change)

    def run(self, namespace: str, pod: str, node: str = "gpu-node-1") -> None:
        def change(obj):
            obj["spec"]["nodeName"] = node
            obj["status"]["phase"] = "Running"
            obj["status"]["conditions"] = [_condition("PodScheduled", "", ""), _condition("Ready", "", "")]
            obj["status"]["containerStatuses"] = [
                {"name": c["name"], "image": c["image"], "ready": True, "restartCount": 0,
                 "state": {"running": {"startedAt": now()}}} for c in obj["spec"]["containers"]]
        self.modify("pods", namespace, pod, change)

    def terminate(self, namespace: str, pod: str, exit_code: int, reason: str | None = None,
                  pod_reason: str | None = None, message: str = "") -> None:
        """The container ended with ``exit_code`` (``reason`` e.g. OOMKilled); ``pod_reason`` e.g. Evicted."""
        def change(obj):
            obj["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            if pod_reason:
                obj["status"].update(reason=pod_reason, message=message)
            terminated = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                          "startedAt": now(), "finishedAt": now()}
            obj["status"]["containerStatuses"] = [
                {"name": c["name"], "image": c["image"], "ready": False, "restartCount": 0,
                 "state": {"terminated": terminated}} for c in obj["spec"]["containers"]]
        self.modify("pods", namespace, pod, change)

    def set_condition(self, namespace: str, name: str, type_: str, reason: str = "", message: str = "",
                      plural: str = "jobs") -> None:
        """A Job (or JobSet) condition, as its controller sets it (Complete, Failed, ...)."""
        def change(obj):
            conditions = [c for c in obj["status"].get("conditions", []) if c["type"] != type_]
            obj["status"]["conditions"] = conditions + [_condition(type_, reason, message)]
            if type_ in ("Complete", "Completed", "Failed"):
                obj["status"]["active"] = 0
                obj["status"]["completionTime" if type_ != "Failed" else "failedTime"] = now()
        self.modify(plural, namespace, name, change)

    def admit(self, namespace: str, name: str, plural: str = "jobs") -> None:
        """Kueue admits the workload: it unsuspends it."""
        def change(obj):
            obj["spec"]["suspend"] = False
            conditions = [c for c in obj["status"].get("conditions", []) if c["type"] != "Suspended"]
            obj["status"]["conditions"] = conditions + [_condition("Suspended", "JobResumed", "Job resumed", "False")]
        self.modify(plural, namespace, name, change)

    def write_log(self, namespace: str, pod: str, text: str) -> None:
        with self._cond:
            self._logs[(namespace, pod)] = self._logs.get((namespace, pod), "") + text
            self._cond.notify_all()

    # ---- HTTP --------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with self._cond:
            self.requests.append(Request(method, url.path, query, body))
        route = ROUTE.match(url.path)
        resource = RESOURCES.get(route["plural"]) if route else None
        if resource is None or route["prefix"] != resource.prefix:
            return self._send(h, 404, status_body(404, "NotFound", "the server could not find the requested resource"))
        namespace, name, sub = route["ns"], route["name"], route["sub"]
        if method == "POST" and body:
            name = name or body.get("metadata", {}).get("name")
        watch = query.get("watch", "").lower() in ("true", "1")

        fault = self._take_fault(method, url.path)
        if fault is not None and fault.status is not None:
            verb = _verb(method, route["name"], watch)
            body_out = fault.body or _fault_body(fault.status, verb, resource, namespace, name)
            return self._send(h, fault.status, body_out, fault.headers)
        if fault is not None and not fault.after_work:
            self._stopping.wait(fault.hang_seconds)

        if method == "GET" and sub == "log":
            code, answer = self._pod_log(h, namespace, name, query)
        elif method == "GET" and watch:
            return self._watch(h, resource, namespace, query)
        elif method == "GET" and name:
            code, answer = self._get(resource, namespace, name)
        elif method == "GET":
            items = self.list(resource.plural, namespace, query.get("labelSelector"))
            code, answer = 200, {"kind": f"{resource.kind}List", "apiVersion": resource.api_version,
                                 "metadata": {"resourceVersion": str(self._rv)}, "items": items}
        elif method == "POST":
            code, answer = self._create(resource, namespace, body or {})
        elif method == "PATCH":
            code, answer = self._patch(resource, namespace, name, body, h.headers.get("Content-Type", ""))
        elif method == "DELETE":
            code, answer = self._delete(resource, namespace, name, {**query, **(body or {})})
        else:
            code, answer = 405, status_body(405, "MethodNotAllowed", f"{method} is not supported by the fake")
        if code is None:
            return None  # a streamed answer was sent
        if fault is not None and fault.after_work:
            self._stopping.wait(fault.hang_seconds)
        self._send(h, code, answer)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, body: dict | str, headers: dict[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        try:
            h.send_response(code)
            h.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
            h.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                h.send_header(key, value)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True  # the client gave up waiting (a hang fault)

    def _get(self, resource: Resource, namespace: str, name: str) -> tuple[int, dict]:
        key = (resource.plural, namespace, name)
        with self._cond:
            if key in self._foreground_gets:  # an owner deleted in the foreground goes after a few reads
                self._foreground_gets[key] -= 1
                if self._foreground_gets[key] < 0:
                    del self._foreground_gets[key]
                    self._collect(key)
            obj = self._objects.get(key)
            if obj is None:
                return 404, _not_found(resource, name)
            return 200, copy.deepcopy(obj)

    def _create(self, resource: Resource, namespace: str, body: dict) -> tuple[int, dict]:
        name = body.get("metadata", {}).get("name")
        if self.namespaces is not None and namespace not in self.namespaces:
            return 404, status_body(404, "NotFound", f'namespaces "{namespace}" not found',
                                    {"name": namespace, "kind": "namespaces"})
        with self._cond:
            if (resource.plural, namespace, name) in self._objects:
                return 409, _fault_body(409, "create", resource, namespace, name)
            return 201, self.create(resource.plural, namespace, body)

    def _patch(self, resource: Resource, namespace: str, name: str, body: Any, content_type: str) -> tuple[int, dict]:
        with self._cond:
            obj = self._objects.get((resource.plural, namespace, name))
            if obj is None:
                return 404, _not_found(resource, name)
            patched = json_patch(obj, body) if "json-patch" in content_type else merge_patch(obj, body)
            patched["metadata"].update({k: obj["metadata"][k] for k in ("uid", "name", "namespace", "creationTimestamp")})
            return 200, copy.deepcopy(self._put(resource.plural, patched, "MODIFIED"))

    def _delete(self, resource: Resource, namespace: str, name: str, options: dict) -> tuple[int, dict]:
        key = (resource.plural, namespace, name)
        # batch/v1 Jobs deleted through the API orphan their pods unless told otherwise
        policy = options.get("propagationPolicy") or ("Orphan" if resource.plural == "jobs" else "Background")
        with self._cond:
            obj = self._objects.get(key)
            if obj is None:
                return 404, _not_found(resource, name)
            expected_uid = (options.get("preconditions") or {}).get("uid")
            if expected_uid and expected_uid != obj["metadata"]["uid"]:
                return 409, status_body(409, "Conflict", f"Operation cannot be fulfilled on {resource.qualified} "
                                        f'"{name}": Precondition failed: UID in precondition: {expected_uid}, '
                                        f"UID in object meta: {obj['metadata']['uid']}")
            if policy == "Orphan":
                for dependent in self._dependents(obj["metadata"]["uid"]):
                    refs = self._objects[dependent]["metadata"]["ownerReferences"]
                    self._objects[dependent]["metadata"]["ownerReferences"] = [
                        r for r in refs if r.get("uid") != obj["metadata"]["uid"]]
                self._remove(key)
            elif policy == "Foreground" and self.foreground_delay_gets > 0:
                obj["metadata"]["deletionTimestamp"] = now()
                obj["metadata"]["finalizers"] = ["foregroundDeletion"]
                self._put(resource.plural, obj, "MODIFIED")
                self._foreground_gets[key] = self.foreground_delay_gets
            else:
                self._collect(key)
            return 200, copy.deepcopy(obj)

    def _pod_log(self, h: BaseHTTPRequestHandler, namespace: str, name: str, query: dict) -> tuple[int | None, Any]:
        pod = self.get("pods", namespace, name)
        if pod is None:
            return 404, _not_found(RESOURCES["pods"], name)
        names = [c["name"] for c in pod["spec"]["containers"]]
        container = query.get("container")
        if container is None and len(names) > 1:
            return 400, status_body(400, "BadRequest", f"a container name must be specified for pod {name}, "
                                    f"choose one of: [{' '.join(names)}]")
        container = container or names[0]
        waiting = [s["state"]["waiting"] for s in pod["status"].get("containerStatuses", [])
                   if s["name"] == container and "waiting" in s["state"]]
        if pod["status"]["phase"] == "Pending" or waiting:
            why = waiting[0].get("reason") if waiting else "ContainerCreating"
            return 400, status_body(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: {why}')
        with self._cond:
            text = self._logs.get((namespace, name), "")
        if query.get("follow", "").lower() == "true":
            self._follow_log(h, namespace, name, text)
            return None, None
        if "tailLines" in query:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(query["tailLines"]):]) if int(query["tailLines"]) else ""
        if "limitBytes" in query:
            text = text.encode()[: int(query["limitBytes"])].decode(errors="ignore")
        return 200, text

    # ---- streams -----------------------------------------------------------------------
    @staticmethod
    def _start_stream(h: BaseHTTPRequestHandler, content_type: str) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

    @staticmethod
    def _chunk(h: BaseHTTPRequestHandler, data: bytes) -> None:
        h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        h.wfile.flush()

    def _follow_log(self, h: BaseHTTPRequestHandler, namespace: str, name: str, text: str) -> None:
        """Stream the log, then what is written to it, until the pod ends or goes."""
        self._start_stream(h, "text/plain")
        sent = 0
        try:
            while True:
                with self._cond:
                    text = self._logs.get((namespace, name), "")
                    pod = self._objects.get(("pods", namespace, name))
                    ended = pod is None or pod["status"]["phase"] in ("Succeeded", "Failed")
                    if len(text) == sent and not ended and not self._stopping.is_set():
                        self._cond.wait(0.5)
                        continue
                if len(text) > sent:
                    self._chunk(h, text[sent:].encode())
                    sent = len(text)
                    continue
                break
            h.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    def _watch(self, h: BaseHTTPRequestHandler, resource: Resource, namespace: str | None, query: dict) -> None:
        selector = query.get("labelSelector")
        timeout = float(query.get("timeoutSeconds") or 3600)
        drop_after = self._watch_drops.pop(0) if self._watch_drops else None
        self._start_stream(h, "application/json")

        def wanted(plural: str, obj: dict) -> bool:
            return (plural == resource.plural and namespace in (None, obj["metadata"]["namespace"])
                    and matches(obj["metadata"].get("labels", {}), selector))

        sent = 0
        generation = self._watch_generation
        try:
            with self._cond:
                since = query.get("resourceVersion")
                if since and int(since) < self._compacted_rv:
                    gone = status_body(410, "Expired", f"too old resource version: {since} ({self._compacted_rv})")
                    self._chunk(h, json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                    h.wfile.write(b"0\r\n\r\n")
                    return
                if not since:  # "most recent": the current objects as ADDED, then changes
                    for (plural, _, _), obj in sorted(self._objects.items()):
                        if wanted(plural, obj):
                            self._chunk(h, json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n")
                cursor = int(since) if since else self._rv
            deadline = threading.Event()
            timer = threading.Timer(timeout, deadline.set)
            timer.daemon = True
            timer.start()
            while not deadline.is_set() and not self._stopping.is_set():
                with self._cond:
                    if self._watch_generation != generation:
                        h.close_connection = True  # cut without the end of the chunked stream
                        return
                    pending = [e for e in self._events if e[0] > cursor]
                    if not pending:
                        self._cond.wait(0.2)
                        continue
                    cursor = pending[-1][0]
                for _, plural, event_type, obj in pending:
                    if not wanted(plural, obj):
                        continue
                    if drop_after is not None and sent >= drop_after:
                        h.close_connection = True  # cut without the end of the chunked stream
                        return
                    self._chunk(h, json.dumps({"type": event_type, "object": obj}).encode() + b"\n")
                    sent += 1
            timer.cancel()
            h.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True
        return

    def watch_requests(self) -> list[Request]:
        return [r for r in self.requests if r.query.get("watch", "").lower() in ("true", "1")]


def _condition(type_: str, reason: str, message: str, status: str = "True") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": now(), "lastProbeTime": now()}


def _verb(method: str, name: str | None, watch: bool) -> str:
    if method == "GET":
        return "watch" if watch else ("get" if name else "list")
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(method, method.lower())


def _not_found(resource: Resource, name: str) -> dict:
    return status_body(404, "NotFound", f'{resource.qualified} "{name}" not found',
                       {"name": name, "group": resource.group, "kind": resource.plural})


def _fault_body(code: int, verb: str, resource: Resource, namespace: str | None, name: str | None) -> dict:
    """The Status body a real API server sends for ``code``."""
    details = {"name": name or "", "group": resource.group, "kind": resource.plural}
    where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
    if code == 403:
        return status_body(403, "Forbidden", f'{resource.qualified}{" " + chr(34) + name + chr(34) if name else ""} '
                           f'is forbidden: User "{SERVICE_ACCOUNT}" cannot {verb} resource "{resource.plural}" '
                           f'in API group "{resource.group}"{where}', details)
    if code == 409:
        return status_body(409, "AlreadyExists", f'{resource.qualified} "{name}" already exists', details)
    if code == 410:
        return status_body(410, "Gone", "the resource version is too old")
    if code == 429:
        return status_body(429, "TooManyRequests", "Too many requests, please try again later.", {"retryAfterSeconds": 1})
    if code == 504:
        return status_body(504, "Timeout", "Timeout: request did not complete within the allotted timeout")
    if code >= 500:
        return status_body(code, "InternalError", "Internal error occurred: etcdserver: request timed out")
    return status_body(code, "BadRequest", "the fake was told to fail this request")
