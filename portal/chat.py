"""Chat: what a user may talk to, and the way to each model (decisions 0013 and 0020).

Targets are the models a configured inference endpoint serves (everyone's) and the user's own
finished runs as ``run-<id>`` (an admin: anyone's). A run goes to the endpoint when it serves the
run's base model and loads adapters at run time; otherwise, with the local launcher, to a server
the portal starts for the run on this machine (``portal/serving.py``). On a cluster the portal
starts no model servers of its own: there a run needs the endpoint.

Every way in (the Chat tab, the ``/v1`` gateway) goes through here, and every run is fetched
with ``RunService.get_run(user, …)``: another user's run is "not found".
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .endpoint import InferenceEndpoint
from .inference import InferenceError, Message
from .models import Run, User
from .recent import Recent
from .run_query import RunQuery
from .runs import NotFound, PortalError, RunService

log = logging.getLogger(__name__)

RUN_MODEL = re.compile(r"^run-(\d+)$")
# A run a user may chat with is read from the database once per this many seconds, not per message:
# the two reads were half of the portal's share of the first token (decision 0024). What chat needs
# of a run that succeeded (owner, output folder, method, config) does not change; the adapter's
# presence on disk is checked on every message all the same.
CHAT_RUN_SECONDS = 30.0
CHAT_RUNS_KEPT = 1024


@dataclass(frozen=True)
class ChatTarget:
    model: str  # what a client sends as "model": run-<id>, or the endpoint's own model id
    label: str
    run: Run | None = None  # None: a model the endpoint serves


def make_endpoint(runs: RunService) -> InferenceEndpoint | None:
    settings = runs.settings
    if not settings.inference_base_url:
        return None

    def aliases(model: str) -> list[str]:  # a catalog model may be served under its catalog name or hub id
        entry = runs.catalog.model_entry(model)
        return [name for name in (entry.name, entry.hub_id) if name] if entry is not None else []

    return InferenceEndpoint(settings.inference_base_url, settings.inference_key(), data_root=settings.data_root,
                             adapter_root=settings.inference_adapter_root,
                             name_prefix=settings.inference_adapter_prefix,
                             runtime_lora=settings.inference_runtime_lora,
                             max_adapters=settings.inference_max_adapters, idle_seconds=settings.chat_idle_seconds,
                             timeout=settings.inference_timeout_seconds, model_aliases=aliases)


class ChatService:
    def __init__(self, runs: RunService, endpoint: InferenceEndpoint | None = None):
        self.runs = runs
        self.settings = runs.settings
        self.endpoint = endpoint if endpoint is not None else make_endpoint(runs)
        self._local = None
        self._lock = threading.Lock()
        # (user id, admin?, run id) -> the run as get_run gave it: see CHAT_RUN_SECONDS
        self._chat_runs: Recent[tuple[int, bool, int], Run] = Recent(CHAT_RUN_SECONDS, CHAT_RUNS_KEPT)

    # ---- where models run ---------------------------------------------------------------------
    @property
    def local_servers(self):
        """This process's own model servers, made on first use (they start nothing until asked)."""
        with self._lock:
            if self._local is None:
                from .launchers.local import LocalLauncher
                from .serving import LocalChatServers

                launcher = self.runs.launcher if isinstance(self.runs.launcher, LocalLauncher) else None
                self._local = LocalChatServers(
                    self.settings.data_root / "chat-servers", launcher=launcher,
                    max_servers=self.settings.chat_max_servers, idle_seconds=self.settings.chat_idle_seconds,
                    gpu_ids=self.settings.chat_gpus)
            return self._local

    def close(self) -> None:
        """Stop this process's servers and unload the adapters it loaded (portal shutdown). A later
        chat (a test, an embedding program) gets fresh local servers."""
        with self._lock:
            local, self._local = self._local, None
        if local is not None:
            local.stop_all()
        if self.endpoint is not None:
            self.endpoint.close()

    def _on_endpoint(self, run: Run) -> bool:
        """True when the run chats through the endpoint; False: through a local server."""
        from .serving import ChatServerError

        local_allowed = not getattr(self.runs.launcher, "on_cluster", False)
        if getattr(run, "kind", "train") == "export":  # a merged model: never an adapter on the endpoint
            if local_allowed:
                return False
            raise ChatServerError(f"run {run.id} is a merged model ({run.output_dir}): on a cluster chat goes through "
                                  "the inference endpoint, which serves adapters of its base models, not merged "
                                  "models. An admin can serve it there as a model of its own (it is registered "
                                  f"in MLflow as {run.registered_model or 'a model'}); chat with the trained run "
                                  f"{run.parent_id} meanwhile")
        if self.endpoint is not None and self.endpoint.runtime_lora and run.finetuning_type != "lora":
            why = f"vLLM serves LoRA adapters only, and this run trained '{run.finetuning_type}'"
        elif self.endpoint is not None and self.endpoint.runtime_lora:
            try:
                if self.endpoint.base_model_for(run) is not None:
                    return True
                why = (f"the inference endpoint does not serve this run's base model ({run.model_name_or_path}); "
                       f"it serves: {', '.join(self.endpoint.served_models()) or 'nothing'}")
            except InferenceError as err:
                if not local_allowed:
                    raise
                log.warning("inference endpoint unavailable, chat with run %s on a local server: %s", run.id, err)
                return False
        elif self.endpoint is not None:
            why = "the inference endpoint does not load adapters at run time (inference_runtime_lora: false)"
        else:
            why = "no inference endpoint is configured (PORTAL_INFERENCE_BASE_URL)"
        if local_allowed:
            return False
        raise ChatServerError(f"on a cluster runs chat through the inference endpoint, but {why}. An admin can serve "
                              "the base model there with runtime LoRA (docs/admin-guide.md, \"Production: a shared vLLM\")")

    # ---- what a user may chat with ------------------------------------------------------------
    def runs_to_chat(self, user: User, limit: int = 100) -> list[Run]:
        """The user's runs one can chat with: succeeded LoRA/OFT runs whose adapter is there."""
        from .serving import ChatServerError, check_servable

        history, _ = self.runs.search_runs(user, RunQuery(status=["succeeded"], limit=min(limit, 500)))
        out = []
        for run in history:
            try:
                check_servable(run)
            except ChatServerError:
                continue
            out.append(run)
        return out

    def served_models(self) -> list[str]:
        """The endpoint's base models ([] without an endpoint, or while it does not answer)."""
        if self.endpoint is None:
            return []
        try:
            return [m for m in self.endpoint.served_models() if not RUN_MODEL.match(m)]
        except InferenceError as err:
            log.warning("inference endpoint %s: %s", self.endpoint.base_url, err)
            return []

    def targets(self, user: User) -> list[ChatTarget]:
        served = [ChatTarget(model, f"{model} (served)") for model in self.served_models()]
        own = [ChatTarget(f"run-{run.id}", f"run-{run.id} · {run.name} "
                                           f"({run.model_name_or_path.rstrip('/').split('/')[-1]})", run)
               for run in self.runs_to_chat(user)]
        return own + served

    # ---- talking ------------------------------------------------------------------------------
    def stream(self, user: User, model: str, messages: Sequence[Message], **params: Any) -> Iterator[str]:
        """Stream an answer of ``model`` (``run-<id>`` or a served model). Raises NotFound for a
        model that is not the user's, PortalError/InferenceError with a message for the person."""
        match = RUN_MODEL.match(model or "")
        if match:
            return self.stream_run(user, int(match.group(1)), messages, **params)
        if model in self.served_models():
            return self.endpoint.stream_model(model, messages, **params)
        raise NotFound(f"model '{model}' is not one of yours: GET /v1/models lists them")

    def stream_run(self, user: User, run_id: int, messages: Sequence[Message], *, base: bool = False,
                   **params: Any) -> Iterator[str]:
        """Stream an answer of a run (``base``: of its base model without the adapter)."""
        run, on_endpoint = self._run_target(user, run_id, base)
        if on_endpoint:
            if base:
                return self.endpoint.stream_model(self.endpoint.base_model_for(run), messages, **params)
            return self.endpoint.stream_chat(run, messages, **params)
        return self.local_servers.stream_chat(run, messages, base=base, **params)

    def open_stream(self, user: User, model: str, messages: Sequence[Message], **params: Any) -> AsyncIterator[str]:
        """``stream`` for the /v1 gateway: everything that may block (the rows, a server start, an
        adapter load, the endpoint's model list) happens in this call, so call it in a worker
        thread; the returned iterator streams the answer on the event loop, where no thread waits
        for its pieces. Its first item is "" once the model's server took the request: a failure
        before it is the request's. Raises like ``stream``."""
        match = RUN_MODEL.match(model or "")
        if match:
            run, on_endpoint = self._run_target(user, int(match.group(1)), base=False)
            if on_endpoint:
                return self.endpoint.open_stream(run, messages, **params)
            return self.local_servers.open_stream(run, messages, **params)
        if model in self.served_models():
            return self.endpoint.open_model_stream(model, messages, **params)
        raise NotFound(f"model '{model}' is not one of yours: GET /v1/models lists them")

    def open_stream_now(self, user: User, model: str, messages: Sequence[Message],
                        **params: Any) -> AsyncIterator[str] | None:
        """``open_stream`` without a worker thread, for the common case of a chat in progress on
        this machine: the run was read for this user a moment ago, no inference endpoint is
        configured, and the run's server is up and answered a moment ago. None when anything has
        to be read, asked or started first: then call ``open_stream`` in a worker thread
        (decision 0026). What touches the disk here is one stat of the adapter's config."""
        match = RUN_MODEL.match(model or "")
        if not match or self.endpoint is not None or self._local is None \
                or getattr(self.runs.launcher, "on_cluster", False):
            return None
        run = self._chat_runs.get((user.id, bool(user.is_admin), int(match.group(1))))
        if run is None:
            return None
        return self._local.open_stream_now(run, messages, **params)

    def _run_target(self, user: User, run_id: int, base: bool) -> tuple[Run, bool]:
        """The run (another user's: NotFound, audited) and whether it chats through the endpoint
        (else a local server); a model loaded for the user's chat is audited."""
        run = self._chat_run(user, run_id)
        on_endpoint = self._on_endpoint(run)
        if on_endpoint and not base and run.id not in self.endpoint.loaded():
            self.runs.audit(user.username, "chat_load", f"run:{run.id}", "adapter loaded into the inference endpoint")
        if not on_endpoint and not base and self.local_servers.info(run.id) is None:
            self.runs.audit(user.username, "chat_load", f"run:{run.id}", "model server started for a chat")
        return run, on_endpoint

    def _chat_run(self, user: User, run_id: int) -> Run:
        """The run as ``get_run`` gives it to this user (another user's run: NotFound, audited),
        read again once it is CHAT_RUN_SECONDS old; checked servable on every call. A run that
        cannot chat (still training, say) is not kept: it is read again at the next message."""
        from .serving import check_servable

        key = (user.id, bool(user.is_admin), run_id)
        run = self._chat_runs.get(key)
        if run is not None:
            check_servable(run)
            return run
        run = self.runs.get_run(user, run_id, purpose="chat")
        check_servable(run)
        self._chat_runs.put(key, run)
        return run

    def release(self, user: User, model: str) -> str:
        """Let go of a run's model now (its local server stopped, its adapter unloaded) rather
        than when idle; says what was done. Served models belong to the endpoint: nothing to do."""
        match = RUN_MODEL.match(model or "")
        if not match:
            return f"{model} is served by the inference endpoint: there is nothing to unload"
        run = self.runs.get_run(user, int(match.group(1)), purpose="chat")
        stopped = self._local is not None and self._local.stop(run.id)
        unloaded = self.endpoint is not None and self.endpoint.unload(run.id)
        if not (stopped or unloaded):
            return f"run-{run.id} has no model loaded"
        self.runs.audit(user.username, "chat_unload", f"run:{run.id}",
                        "model server stopped" if stopped else "adapter unloaded from the inference endpoint")
        return f"run-{run.id}: " + ("its model server is stopped" if stopped else "its adapter is unloaded")

    def side_by_side(self, user: User, run_id: int, run_messages: Sequence[Message], base_messages: Sequence[Message],
                     **params: Any) -> Iterator[tuple[str, str]]:
        """The run and its base model answer at once; yields (run's text, base's text) as they grow.
        A failure of one side ends with a ⚠ note in its text; the other goes on."""
        streams = [self.stream_run(user, run_id, run_messages, **params),
                   self.stream_run(user, run_id, base_messages, base=True, **params)]
        texts = ["", ""]
        pieces: queue.Queue = queue.Queue()
        stop = threading.Event()

        def pump(side: int) -> None:
            try:
                for piece in streams[side]:
                    if stop.is_set():
                        break
                    pieces.put((side, piece))
            except (PortalError, InferenceError) as err:
                pieces.put((side, f"\n\n⚠ {err}"))
            finally:
                pieces.put((side, None))

        for side in (0, 1):
            threading.Thread(target=pump, args=(side,), name=f"side-by-side-{side}", daemon=True).start()
        running = 2
        try:
            while running:
                side, piece = pieces.get()
                if piece is None:
                    running -= 1
                    continue
                texts[side] += piece
                yield texts[0], texts[1]
        finally:
            stop.set()  # the reader went away (Stop): the pumps end at their next piece
