"""Local chat servers: an OpenAI-compatible server per run, started on demand on this machine.

The embedded default of "chat with a run" (production talks to a shared vLLM instead). For a
run, ``LocalChatServers.ensure`` starts ``llamafactory-cli api`` on the run's base model and
adapter through the local launcher (a process-group leader, like a training job), waits until
it answers, and hands back the endpoint; later messages reuse it. Servers are stopped when
idle for ``idle_seconds``, when a new one needs the slot of the least recently used
(``max_servers``), on request, and when the portal exits. A portal that died without stopping
them stops them the next time it starts (their state files under ``state_dir``).

Who may chat with which run is decided before this module: callers pass a Run they got from
``RunService.get_run(user, run_id)``. Paths come from the Run row, never from the user.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import yaml

from llamaboard_ext import compile as lbc

from . import inference
from .idle import Reaper, busy
from .launchers import JobSpec, LaunchError
from .launchers.local import LocalLauncher
from .models import Run, RunStatus
from .runs import PortalError, llamafactory_cli

log = logging.getLogger(__name__)

SERVER_DIR = "chat-server"  # <run dir>/chat-server/: the server's args and exit code (apart from the job's)
SERVER_LOG = "chat-server.log"  # <run dir>/chat-server.log
ARGS_FILE = "args.yaml"
START_MARKER = "---- chat server starting"  # each start appends one; failures show the log from the last one
ADAPTER_TYPES = ("lora", "oft")  # methods whose output_dir is an adapter on top of the base model


class ChatServerError(PortalError):
    """A chat server could not be started or used; the message is meant for the user."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # http://127.0.0.1:<port>/v1
    model_name: str  # run-<id>
    api_key: str | None = field(default=None, repr=False)  # portal-side only: never shown to a browser


@dataclass(frozen=True)
class ServerInfo:
    """What an admin page may show about one running server (no key)."""

    key: str  # run-<id>: the run's adapter; base-<digest>: a base model alone (side by side)
    run_id: int  # the run it was started for
    owner: str
    base_url: str
    model_name: str
    pid: int
    started_at: float  # time.time()
    last_used: float  # time.time()
    busy: int  # answers being streamed now


@dataclass
class _Server:
    key: str
    run_id: int
    owner: str
    endpoint: Endpoint
    state: dict[str, Any]  # the launcher's: pid, create_time, exit_file
    started_at: float
    last_used: float
    busy: int = 0
    answered_at: float = 0.0  # time.monotonic() of its last whole answer (or of its start)


PROBE_TIMEOUT_SECONDS = 3.0
# A server that finished an answer this recently is reused without asking /v1/models first: the
# probe costs a round trip on every message (a third of the portal's share of the first token
# on a small model). A server that died since then fails the next message at connect, before any
# text, and that message is retried once on a probed (or new) server.
TRUSTED_SECONDS = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_alive(pid: int, create_time: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) <= 0.5 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_group_leftovers(state: dict[str, Any]) -> None:
    """Kill what is left of a server's process group after its leader died.

    The launcher refuses to signal a group whose leader is gone (the pid could be anyone's by
    now), so a server whose wrapper was killed alone would keep running. Only processes in
    that group and started no earlier than the leader are ours.
    """
    pgid, born = int(state.get("pid", 0)), float(state.get("create_time", 0.0))
    if not pgid:
        return
    try:
        if abs(psutil.Process(pgid).create_time() - born) > 0.5:
            return  # the pid is another process's now: the group is not ours
    except psutil.Error:
        pass  # leader gone: while members of its group live, its pid is not given to anyone else
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid and proc.info["create_time"] >= born - 0.5:
                proc.kill()
        except (ProcessLookupError, PermissionError, psutil.Error, OSError):
            continue


def _answers(endpoint: Endpoint) -> bool:
    """The server itself answers (its job wrapper may outlive a killed model process for a moment).
    Not asked of a server that is streaming an answer: it may be too busy to reply in time."""
    try:
        inference.list_models(endpoint.base_url, endpoint.api_key, timeout=PROBE_TIMEOUT_SECONDS)
    except inference.InferenceError:
        return False
    return True


def _answered_lately(server: _Server) -> bool:
    """Answering now, or answered in the last TRUSTED_SECONDS: used without asking it first."""
    return bool(server.busy) or time.monotonic() - server.answered_at < TRUSTED_SECONDS


def _reap(state: dict[str, Any], within: float = 5.0) -> None:
    """Wait for a dead server's leader if it is this process's child (a zombie keeps its process
    group alive); other processes are reaped by their own parent."""
    pid = state.get("pid")
    if not pid:
        return
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(int(pid), os.WNOHANG)
        except ChildProcessError:
            return  # not our child, or already reaped
        if done:
            return
        time.sleep(0.05)


def run_key(run_id: int) -> str:
    return f"run-{run_id}"


def base_key(args: dict[str, Any]) -> str:
    """One base-model server per (model, template, remote code) whichever run asked for it."""
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    return f"base-{digest}"


def _what(server: _Server) -> str:
    return f"run {server.run_id}" if server.key == run_key(server.run_id) else f"the base model of run {server.run_id}"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_servable(run: Run) -> None:
    """Raise ChatServerError unless the run finished with an adapter this module can serve."""
    status = run.status.value if isinstance(run.status, RunStatus) else str(run.status)
    if status != RunStatus.succeeded.value:
        raise ChatServerError(f"run {run.id} ({run.name}) has status '{status}': only runs that succeeded can be "
                              "chatted with")
    kind = getattr(run, "kind", "train")
    if kind == "eval":
        raise ChatServerError(f"run {run.id} ({run.name}) is an evaluation: chat with the run it evaluated "
                              f"(run {run.parent_id})")
    if kind == "export":  # a merged model: served as a whole model from its export folder
        if not run.output_dir or not (Path(run.output_dir) / "config.json").is_file():
            raise ChatServerError(f"the merged model of run {run.id} ({run.name}) is missing from {run.output_dir}: "
                                  "it may have been deleted; merge the trained run again")
        return
    if run.finetuning_type not in ADAPTER_TYPES:
        raise ChatServerError(f"run {run.id} ({run.name}) trained with finetuning_type '{run.finetuning_type}': "
                              f"chat serves adapters ({', '.join(ADAPTER_TYPES)}) for now; export the model "
                              "and add it to the model catalog to chat with it")
    if run.stage == "rm":
        raise ChatServerError(f"run {run.id} ({run.name}) is a reward model: it scores answers and cannot chat")
    adapter = Path(run.output_dir) if run.output_dir else None
    if adapter is None or not (adapter / "adapter_config.json").is_file():
        raise ChatServerError(f"the adapter of run {run.id} ({run.name}) is missing from its output folder: "
                              "it may have been deleted; train the run again (clone it)")


class LocalChatServers:
    """The chat servers of one portal process. Thread-safe: two users asking for the same run
    at once get one server."""

    def __init__(self, state_dir: str | os.PathLike, *, launcher: LocalLauncher | None = None,
                 max_servers: int = 2, idle_seconds: float = 900.0, start_timeout: float = 300.0,
                 stop_grace_seconds: float = 5.0, gpu_ids: Sequence[int] = ()):
        if max_servers < 1:
            raise ValueError("max_servers must be at least 1")
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.launcher = launcher or LocalLauncher()
        self.max_servers = max_servers
        self.idle_seconds = idle_seconds
        self.start_timeout = start_timeout
        self.stop_grace_seconds = stop_grace_seconds
        self.gpu_ids = list(gpu_ids)  # [] runs servers on the CPU
        self._servers: dict[str, _Server] = {}
        self._starting: set[str] = set()  # keys of servers starting: they hold a slot
        self._run_locks: dict[str, threading.Lock] = {}
        self._base_keys: dict[tuple[int, str | None], str] = {}  # (run id, template) -> base-<digest>
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reaper = Reaper("chat-server-reaper", lambda: self.idle_seconds, self.reap_idle, self._closed)
        self._me = self._portal_identity()
        self.stop_leftovers()
        atexit.register(self.stop_all)

    # ---- public --------------------------------------------------------------------------
    def ensure(self, run: Run, *, template: str | None = None, base: bool = False) -> Endpoint:
        """The endpoint of the run's server: the running one, else a new one once it answers.

        ``template``: LLaMA-Factory chat template; None takes the one the run trained with.
        ``base``: a server of the run's base model without the adapter (shared by every run on
        that model and template): the "before" of a side-by-side chat.
        """
        return self._ensure(run, template, base)[1]

    def _ensure(self, run: Run, template: str | None, base: bool) -> tuple[str, Endpoint]:
        check_servable(run)
        if self._closed.is_set():
            raise ChatServerError("the portal is shutting down: chat is not available")
        # the args are made (the run's YAML parsed, ~10 ms) only to start a server, or once per run
        # for a base model's key: not for every message to a running one
        args: dict[str, Any] | None = None
        if base:
            with self._lock:
                key = self._base_keys.get((run.id, template))
            if key is None:
                args = self.server_args(run, template, base=True)
                key = base_key(args)
                with self._lock:
                    self._base_keys[(run.id, template)] = key
        else:
            key = run_key(run.id)
        with self._lock:
            run_lock = self._run_locks.setdefault(key, threading.Lock())
        with run_lock:  # one start per server; others start in parallel
            server = self._servers.get(key)
            if server is not None:
                if self.launcher.is_alive(server.state) and (_answered_lately(server) or _answers(server.endpoint)):
                    server.last_used = time.time()
                    return key, server.endpoint
                log.warning("chat server %s (pid %s) died; starting a new one", key, server.state.get("pid"))
                self._forget(key)
                _kill_group_leftovers(server.state)
                self.launcher.is_alive(server.state)  # waits for the leader if it is our child
                _reap(server.state)
            for victim in self._take_slot(key):
                self._stop_server(victim, "making room for another run's chat server")
            try:
                server = self._start(run, key, args or self.server_args(run, template, base=base))
            finally:
                with self._lock:
                    self._starting.discard(key)
            with self._lock:
                closing = self._closed.is_set()  # stop_all ran while this server was starting
                if not closing:
                    self._servers[key] = server
            if closing:
                self._stop_server(server, "the portal is stopping")
                raise ChatServerError("the portal is shutting down: chat is not available")
            self._reaper.start()
            return key, server.endpoint

    def touch(self, run_id: int) -> None:
        """Mark the run's server as used now (the idle clock restarts)."""
        with self._lock:
            server = self._servers.get(run_key(run_id))
            if server is not None:
                server.last_used = time.time()

    def stream_chat(self, run: Run, messages: Sequence[inference.Message], *, template: str | None = None,
                    base: bool = False, temperature: float = 0.7, top_p: float = 0.9, max_tokens: int = 512,
                    timeout: float = inference.DEFAULT_TIMEOUT) -> Iterator[str]:
        """Ensure the run's server (``base``: its base model's) and stream an answer from it.
        While it streams the server is neither idle-stopped nor evicted for another run."""
        for attempt in (1, 2):
            key, endpoint = self._ensure(run, template, base)
            answered = False
            with self._in_use(key) as server:
                try:
                    for piece in inference.stream_chat(endpoint.base_url, endpoint.model_name, messages,
                                                       temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                                       api_key=endpoint.api_key, timeout=timeout):
                        answered = True
                        yield piece
                except inference.InferenceError as err:
                    if self._again_after(server, err, answered, attempt):
                        continue
                    raise
                if server is not None:
                    server.answered_at = time.monotonic()
                return

    def open_stream(self, run: Run, messages: Sequence[inference.Message], *, template: str | None = None,
                    base: bool = False, **params: Any) -> AsyncIterator[str]:
        """``stream_chat`` for the event loop: the server is ensured here (this may start it: call
        this in a worker thread), and the returned iterator streams on the loop. Its first item is
        "" once the server took the request (``inference.astream_chat``)."""
        return self._astream(run, self._ensure(run, template, base), messages, template, base, params)

    def open_stream_now(self, run: Run, messages: Sequence[inference.Message],
                        **params: Any) -> AsyncIterator[str] | None:
        """``open_stream`` of the run's own server when there is nothing to wait for: it is up,
        not starting, and answered in the last TRUSTED_SECONDS (or is answering now). Safe on the
        event loop: it takes only locks held for moments, and starts or asks nothing. None
        otherwise. A server that died since is found as in ``open_stream``: it takes nothing,
        and the stream routes once more (in a worker thread)."""
        check_servable(run)
        key = run_key(run.id)
        with self._lock:
            server = None if self._closed.is_set() or key in self._starting else self._servers.get(key)
        if server is None or not _answered_lately(server):
            return None
        if not self.launcher.is_alive(server.state):
            return None
        server.last_used = time.time()
        return self._astream(run, (key, server.endpoint), messages, None, False, params)

    async def _astream(self, run: Run, ready: tuple[str, Endpoint], messages: Sequence[inference.Message],
                       template: str | None, base: bool, params: dict[str, Any]) -> AsyncIterator[str]:
        for attempt in (1, 2):
            if attempt == 2:
                ready = await anyio.to_thread.run_sync(self._ensure, run, template, base)
            key, endpoint = ready
            answered = False
            with self._in_use(key) as server:
                try:
                    async for piece in inference.astream_chat(endpoint.base_url, endpoint.model_name, messages,
                                                              api_key=endpoint.api_key, **params):
                        answered = answered or bool(piece)
                        yield piece
                except inference.InferenceError as err:
                    if self._again_after(server, err, answered, attempt):
                        continue
                    raise
                if server is not None:
                    server.answered_at = time.monotonic()
                return

    @staticmethod
    def _again_after(server: _Server | None, err: inference.InferenceError, answered: bool, attempt: int) -> bool:
        """After a failed answer the server is not trusted any more (the next use asks it first).
        True: send the message once more, to a checked or new server, because this one took
        nothing (it is gone); never after text was given out."""
        if server is not None:
            server.answered_at = 0.0
        if answered or attempt == 2 or not isinstance(err, inference.ServerGone):
            return False
        log.warning("chat server %s did not take the message; checking it and trying once more",
                    server.key if server is not None else "?")
        return True

    def stop(self, run_id: int) -> bool:
        """Stop the run's server (after its start, if one is under way); False when none was running."""
        key = run_key(run_id)
        with self._lock:
            run_lock = self._run_locks.setdefault(key, threading.Lock())
        with run_lock, self._lock:
            server = self._servers.pop(key, None)
        if server is None:
            return False
        self._stop_server(server, "stopped on request")
        return True

    def stop_all(self) -> None:
        """Stop the reaper and every server (portal shutdown; registered with atexit)."""
        self._closed.set()
        with self._lock:
            servers = list(self._servers.values())
            self._servers.clear()
        for server in servers:
            self._stop_server(server, "the portal is stopping")
        self._reaper.join()

    def running(self) -> list[ServerInfo]:
        with self._lock:
            servers = list(self._servers.values())
        return [ServerInfo(key=s.key, run_id=s.run_id, owner=s.owner, base_url=s.endpoint.base_url,
                           model_name=s.endpoint.model_name, pid=int(s.state["pid"]), started_at=s.started_at,
                           last_used=s.last_used, busy=s.busy) for s in servers]

    def info(self, run_id: int) -> ServerInfo | None:
        return next((info for info in self.running() if info.key == run_key(run_id)), None)

    def stop_leftovers(self) -> int:
        """Stop servers recorded by portal processes that are gone (killed, crashed); returns how many."""
        stopped = 0
        for path in sorted(self.state_dir.glob("*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            portal = record.get("portal", {})
            if portal == self._me or _process_alive(int(portal.get("pid", 0)), float(portal.get("create_time", 0))):
                continue  # ours, or another live portal process's
            state = record.get("state", {})
            if self.launcher.is_alive(state):
                log.info("stopping chat server %s left by portal process %s", record.get("key", record.get("run_id")),
                         portal.get("pid"))
                self.launcher.stop(state, self.stop_grace_seconds)
                stopped += 1
            _kill_group_leftovers(state)
            path.unlink(missing_ok=True)
        return stopped

    # ---- starting ------------------------------------------------------------------------
    def _take_slot(self, key: str) -> list[_Server]:
        """Reserve a slot for the run's new server; returns the servers to stop for it (LRU)."""
        with self._lock:
            victims: list[_Server] = []
            while len(self._servers) + len(self._starting) >= self.max_servers:
                idle = [s for s in self._servers.values() if s.busy == 0]
                if not idle:
                    raise ChatServerError(f"all {self.max_servers} chat server slot(s) are in use right now: "
                                          "try again in a minute, or ask an admin for more")
                victim = min(idle, key=lambda s: s.last_used)
                del self._servers[victim.key]
                victims.append(victim)
            self._starting.add(key)
            return victims

    def server_args(self, run: Run, template: str | None, *, base: bool = False) -> dict[str, Any]:
        """The arguments of ``llamafactory-cli api`` for the run (``base``: its base model alone),
        all from the Run row."""
        try:
            trained = lbc.yaml_to_args(run.config_yaml) if run.config_yaml else {}
        except lbc.YamlError:
            trained = {}
        template = template or trained.get("template")
        if not template:
            raise ChatServerError(f"run {run.id} ({run.name}) names no chat template in its config: choose one")
        merged = getattr(run, "kind", "train") == "export" and not base  # its export folder, no adapter
        args: dict[str, Any] = {
            "model_name_or_path": run.output_dir if merged else run.model_name_or_path,
            **({} if base or merged else {"adapter_name_or_path": run.output_dir}),
            "template": template,
            "finetuning_type": run.finetuning_type,
            # vLLM needs a GPU; the huggingface backend runs anywhere
            "infer_backend": "vllm" if self.gpu_ids and vllm_installed() else "huggingface",
        }
        if trained.get("trust_remote_code"):  # approved by an admin for that model when the run was submitted
            args["trust_remote_code"] = True
        if not self.gpu_ids:
            # "auto" means float32 on a CPU in 0.9.5 too; written out so that the args file says
            # what ran, whatever a later LLaMA-Factory's "auto" picks
            args["infer_dtype"] = "float32"
        return args

    def _start(self, run: Run, key: str, args: dict[str, Any]) -> _Server:
        if "adapter_name_or_path" in args:  # the run's own: beside its training output
            workdir, log_path = Path(run.run_dir) / SERVER_DIR, Path(run.run_dir) / SERVER_LOG
        else:  # a base model's, shared by runs of several users: in the portal's own folder
            workdir, log_path = self.state_dir / key, self.state_dir / f"{key}.log"
        workdir.mkdir(parents=True, exist_ok=True)
        args_file = workdir / ARGS_FILE
        args_file.write_text(yaml.safe_dump(args, sort_keys=False), encoding="utf-8")
        model_name = key
        # a fresh key per server: other local users of this machine can reach loopback ports too
        api_key = secrets.token_urlsafe(32)
        for attempt in (1, 2):  # a port taken between choosing and binding: once more on another
            port = _free_port()
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(f"\n{START_MARKER} {datetime.now(UTC).isoformat(timespec='seconds')} "
                         f"on 127.0.0.1:{port} ----\n")
            spec = JobSpec(run_id=run.id, name=f"chat-{run.name}", owner=run.owner, workdir=workdir,
                           log_path=log_path, argv=[llamafactory_cli(), "api", str(args_file)], gpu_ids=self.gpu_ids,
                           env={"API_HOST": "127.0.0.1", "API_PORT": str(port), "API_MODEL_NAME": model_name,
                                "API_KEY": api_key})
            started = time.monotonic()
            try:
                state = self.launcher.start(spec)
            except LaunchError as err:
                raise ChatServerError(f"could not start the chat server of run {run.id}: {err}") from err
            now = time.time()
            server = _Server(key=key, run_id=run.id, owner=run.owner, state=state, started_at=now, last_used=now,
                             answered_at=time.monotonic(),
                             endpoint=Endpoint(f"http://127.0.0.1:{port}/v1", model_name, api_key))
            self._write_record(server)
            try:
                self._wait_ready(server, log_path)
            except ChatServerError as err:
                self._stop_server(server, "it did not start")
                if attempt == 1 and "address already in use" in str(err).lower():
                    continue
                raise
            log.info("chat server %s ready on port %s in %.1f s (pid %s)", key, port,
                     time.monotonic() - started, state["pid"])
            return server
        raise AssertionError("unreachable")

    def _wait_ready(self, server: _Server, log_path: Path) -> None:
        deadline = time.monotonic() + self.start_timeout
        headers = {"Authorization": f"Bearer {server.endpoint.api_key}"}
        url = server.endpoint.base_url + "/models"
        while True:
            ended = self.launcher.poll(server.state)
            if ended.exit_code is not None:
                raise ChatServerError(f"the chat server of {_what(server)} stopped while starting "
                                      f"({ended.reason or 'exit code 0'}); the end of {log_path.name}:\n"
                                      f"{self._log_tail(log_path)}")
            try:
                if httpx.get(url, headers=headers, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet: loading the model
            if time.monotonic() > deadline:
                raise ChatServerError(f"the chat server of {_what(server)} did not answer within "
                                      f"{self.start_timeout:g} s (a big model loads slowly; an admin can raise the "
                                      f"start timeout); the end of {log_path.name}:\n{self._log_tail(log_path)}")
            time.sleep(0.25)

    def _log_tail(self, log_path: Path, lines: int = 25) -> str:
        text = self.launcher.logs({}, log_path, tail_bytes=32_000)
        text = text.rsplit(START_MARKER, 1)[-1].split("\n", 1)[-1]  # this start's output only
        return "\n".join(text.strip().splitlines()[-lines:])

    # ---- stopping ------------------------------------------------------------------------
    def _stop_server(self, server: _Server, why: str) -> None:
        began = time.monotonic()
        try:
            self.launcher.stop(server.state, self.stop_grace_seconds)
        finally:
            _kill_group_leftovers(server.state)
            # stop() may return while the leader is a zombie not yet waited for (it counts
            # zombies as gone); nothing polls a chat server later, so wait for it here
            self.launcher.is_alive(server.state)
            self._record_path(server.key).unlink(missing_ok=True)
        log.info("stopped chat server %s (pid %s) in %.1f s: %s", server.key, server.state.get("pid"),
                 time.monotonic() - began, why)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._servers.pop(key, None)
        self._record_path(key).unlink(missing_ok=True)

    def _in_use(self, key: str):
        """While it streams an answer, a server is neither idle-stopped nor evicted."""
        return busy(self._lock, lambda: self._servers.get(key))

    def reap_idle(self) -> int:
        """Stop servers idle longer than ``idle_seconds`` and forget dead ones; returns how many."""
        now = time.time()
        due: list[tuple[_Server, str]] = []
        with self._lock:
            for server in list(self._servers.values()):
                if not self.launcher.is_alive(server.state):
                    due.append((server, "it died"))
                elif server.busy == 0 and now - server.last_used > self.idle_seconds:
                    due.append((server, f"idle for more than {self.idle_seconds:g} s"))
            for server, _ in due:
                del self._servers[server.key]
        for server, why in due:
            self._stop_server(server, why)
        return len(due)

    # ---- state files (a portal killed without atexit leaves servers behind) ---------------
    @staticmethod
    def _portal_identity() -> dict[str, Any]:
        try:
            create_time = psutil.Process(os.getpid()).create_time()
        except psutil.Error:
            create_time = 0.0
        return {"pid": os.getpid(), "create_time": create_time}

    def _record_path(self, key: str) -> Path:
        return self.state_dir / f"{key}.json"

    def _write_record(self, server: _Server) -> None:
        # no API key here: a server left by a dead portal is stopped, never re-adopted
        record = {"key": server.key, "run_id": server.run_id, "portal": self._me, "state": server.state,
                  "base_url": server.endpoint.base_url, "started_at": server.started_at}
        path = self._record_path(server.key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, path)

