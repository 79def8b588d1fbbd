"""A shared inference endpoint (vLLM): the models it serves, and runs' adapters loaded at run time.

Production chat (decision 0013, "Production"): an admin runs vLLM with ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, reading the shared volume. For a run whose base model
the endpoint serves, ``ensure_adapter`` loads the run's adapter under ``<prefix><run id>``
(``/v1/load_lora_adapter``) and the chat goes to that name. An adapter is unloaded when it has
been idle for ``idle_seconds``, when ``max_adapters`` are loaded and another is needed (the least
recently used idle one), and at portal shutdown. A vLLM that restarted forgot its adapters: a
chat that gets "model not loaded" before the first token loads it again once.

Who may chat with which run is decided before this module (callers pass a Run from
``RunService.get_run``). The adapter path comes from the Run row, mapped from the portal's data
root to where the endpoint mounts the same volume (``adapter_root``); the API key is sent in the
Authorization header only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from . import inference
from .idle import Reaper, busy
from .inference import InferenceError, ModelNotLoaded
from .models import Run

log = logging.getLogger(__name__)

MODELS_CACHE_SECONDS = 10.0  # /models is asked on every target list; a new served model shows within this


class EndpointError(InferenceError):
    """The endpoint cannot serve this run; the message says why and what an admin can do."""


@dataclass
class _Adapter:
    run_id: int
    name: str
    path: str
    last_used: float
    busy: int = 0


class InferenceEndpoint:
    """One OpenAI-compatible endpoint. Thread-safe; one per portal process."""

    def __init__(self, base_url: str, api_key: str | None = None, *, data_root: Path,
                 adapter_root: str | None = None, name_prefix: str = "run-", runtime_lora: bool = True,
                 max_adapters: int = 8, idle_seconds: float = 900.0, timeout: float = inference.DEFAULT_TIMEOUT,
                 model_aliases: Callable[[str], Sequence[str]] | None = None):
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.data_root = Path(data_root).resolve()
        self.adapter_root = adapter_root.rstrip("/") if adapter_root else None
        self.name_prefix = name_prefix
        self.runtime_lora = runtime_lora
        self.max_adapters = max_adapters
        self.idle_seconds = idle_seconds
        self.timeout = timeout
        self._aliases = model_aliases or (lambda path: ())
        self._adapters: dict[int, _Adapter] = {}
        self._run_locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()
        self._cards: tuple[float, list[dict[str, Any]]] | None = None
        self._closed = threading.Event()
        self._reaper = Reaper("adapter-reaper", lambda: self.idle_seconds, self.reap_idle, self._closed)

    # ---- what it serves -------------------------------------------------------------------
    def cards(self, *, fresh: bool = False) -> list[dict[str, Any]]:
        with self._lock:
            cached = self._cards
        if not fresh and cached is not None and time.monotonic() - cached[0] < MODELS_CACHE_SECONDS:
            return cached[1]
        cards = inference.model_cards(self.base_url, self._api_key, timeout=min(self.timeout, 10.0))
        with self._lock:
            self._cards = (time.monotonic(), cards)
        return cards

    def served_models(self) -> list[str]:
        """The base models anyone may chat with. Adapters are left out: vLLM lists every loaded
        adapter (``parent`` set), other users' runs included, and names the portal loads are its own."""
        return [str(c["id"]) for c in self.cards()
                if not c.get("parent") and not str(c["id"]).startswith(self.name_prefix)]

    def endpoint_path(self, path: str | Path) -> str:
        """Where the endpoint sees a file of the shared volume (the portal's data root mapped to
        ``adapter_root``); paths outside the data root are left as they are."""
        local = Path(path).resolve()
        if self.adapter_root is None:
            return str(local)
        try:
            return f"{self.adapter_root}/{local.relative_to(self.data_root).as_posix()}"
        except ValueError:
            return str(path)

    def base_model_for(self, run: Run) -> str | None:
        """The served model that is the run's base model, or None. It matches by the id vLLM was
        given (``--served-model-name``: the path, hub id or catalog name) or by what it loaded (``root``)."""
        model = run.model_name_or_path.rstrip("/")
        wanted = {model, *self._aliases(model)}
        if model.startswith("/"):
            wanted.add(self.endpoint_path(model).rstrip("/"))
        for card in self.cards():
            if card.get("parent") or str(card["id"]).startswith(self.name_prefix):
                continue
            if str(card["id"]).rstrip("/") in wanted or str(card.get("root") or "").rstrip("/") in wanted:
                return str(card["id"])
        return None

    def adapter_name(self, run_id: int) -> str:
        return f"{self.name_prefix}{run_id}"

    # ---- adapters ---------------------------------------------------------------------------
    def loaded(self) -> list[int]:
        with self._lock:
            return sorted(self._adapters)

    def ensure_adapter(self, run: Run) -> str:
        """Load the run's adapter unless this process did already; returns the model name to chat with."""
        if self._closed.is_set():
            raise EndpointError("the portal is shutting down: chat is not available")
        if not self.runtime_lora:
            raise EndpointError("the inference endpoint is set not to load adapters at run time "
                                "(inference_runtime_lora: false)")
        if self.base_model_for(run) is None:
            raise EndpointError(f"the inference endpoint does not serve this run's base model "
                                f"({run.model_name_or_path}); it serves: {', '.join(self.served_models()) or 'nothing'}. "
                                "An admin can serve it there (docs/admin-guide.md, \"Production: a shared vLLM\")")
        with self._lock:
            run_lock = self._run_locks.setdefault(run.id, threading.Lock())
        with run_lock:  # one load per run; different runs load in parallel
            with self._lock:
                adapter = self._adapters.get(run.id)
                if adapter is not None:
                    adapter.last_used = time.time()
                    return adapter.name
            for victim in self._take_slot():
                self._unload(victim, "making room for another run's adapter")
            name, path = self.adapter_name(run.id), self.endpoint_path(run.output_dir)
            began = time.monotonic()
            if not inference.load_lora_adapter(self.base_url, name, path, api_key=self._api_key,
                                               timeout=min(self.timeout, 120.0)):
                self._check_same_adapter(name, path)  # loaded by another portal process, or before a restart
            log.info("loaded adapter %s (%s) into %s in %.2f s", name, path, self.base_url, time.monotonic() - began)
            with self._lock:
                self._adapters[run.id] = _Adapter(run.id, name, path, last_used=time.time())
                self._cards = None  # /models changed
            self._reaper.start()
            return name

    def _check_same_adapter(self, name: str, path: str) -> None:
        """A name already loaded must be this run's adapter: another portal sharing the endpoint
        (its own database, its own run ids) could have loaded its run with the same number."""
        card = next((c for c in self.cards(fresh=True) if c.get("id") == name), None)
        root = str((card or {}).get("root") or "")
        if card is not None and root and root.rstrip("/") != path.rstrip("/"):
            log.error("adapter name %s on %s is taken by %s (this run's is %s)", name, self.base_url, root, path)
            raise EndpointError(f"the inference endpoint has another adapter loaded under the name {name}: "
                                "another portal shares it; an admin must give each portal its own "
                                "inference_adapter_prefix")

    def _take_slot(self) -> list[_Adapter]:
        with self._lock:
            victims: list[_Adapter] = []
            while len(self._adapters) >= self.max_adapters:
                idle = [a for a in self._adapters.values() if a.busy == 0]
                if not idle:
                    raise EndpointError(f"all {self.max_adapters} adapter slot(s) of the inference endpoint are "
                                        "answering right now: try again in a minute")
                victim = min(idle, key=lambda a: a.last_used)
                del self._adapters[victim.run_id]
                victims.append(victim)
            return victims

    def stream_chat(self, run: Run, messages: Sequence[inference.Message], **params: Any) -> Iterator[str]:
        """Stream an answer of the run's adapter; loads it first, and once more if the endpoint
        forgot it (restarted) before answering."""
        for attempt in (1, 2):
            name = self.ensure_adapter(run)
            answered = False
            with self._in_use(run.id):
                try:
                    for piece in inference.stream_chat(self.base_url, name, messages, api_key=self._api_key,
                                                       timeout=self.timeout, **params):
                        answered = True
                        yield piece
                    return
                except ModelNotLoaded:
                    if not self._load_again(run, name, answered, attempt):
                        raise

    def open_stream(self, run: Run, messages: Sequence[inference.Message], **params: Any) -> AsyncIterator[str]:
        """``stream_chat`` for the event loop: the adapter is loaded here (a blocking request: call
        this in a worker thread), the returned iterator streams on the loop; its first item is ""
        once the endpoint took the request (``inference.astream_chat``)."""
        return self._astream(run, self.ensure_adapter(run), messages, params)

    async def _astream(self, run: Run, name: str, messages: Sequence[inference.Message],
                       params: dict[str, Any]) -> AsyncIterator[str]:
        for attempt in (1, 2):
            if attempt == 2:
                name = await anyio.to_thread.run_sync(self.ensure_adapter, run)
            answered = False
            with self._in_use(run.id):
                try:
                    async for piece in inference.astream_chat(self.base_url, name, messages, api_key=self._api_key,
                                                              timeout=self.timeout, **params):
                        answered = answered or bool(piece)
                        yield piece
                    return
                except ModelNotLoaded:
                    if not self._load_again(run, name, answered, attempt):
                        raise

    def _load_again(self, run: Run, name: str, answered: bool, attempt: int) -> bool:
        """The endpoint does not know the adapter (it restarted): True to load it and ask once more,
        unless text was given out already or this was the second try."""
        if answered or attempt == 2:
            return False
        log.warning("inference endpoint %s forgot adapter %s (restarted?): loading it again", self.base_url, name)
        with self._lock:
            self._adapters.pop(run.id, None)
        return True

    def _check_served(self, model: str) -> None:
        if model not in self.served_models():
            raise EndpointError(f"the inference endpoint does not serve '{model}'; it serves: "
                                f"{', '.join(self.served_models()) or 'nothing'}")

    def stream_model(self, model: str, messages: Sequence[inference.Message], **params: Any) -> Iterator[str]:
        """Stream an answer of a served base model."""
        self._check_served(model)
        yield from inference.stream_chat(self.base_url, model, messages, api_key=self._api_key, timeout=self.timeout,
                                         **params)

    def open_model_stream(self, model: str, messages: Sequence[inference.Message],
                          **params: Any) -> AsyncIterator[str]:
        """``stream_model`` for the event loop (the model list is read here: call it in a worker thread)."""
        self._check_served(model)
        return inference.astream_chat(self.base_url, model, messages, api_key=self._api_key, timeout=self.timeout,
                                      **params)

    def unload(self, run_id: int) -> bool:
        with self._lock:
            adapter = self._adapters.pop(run_id, None)
        if adapter is None:
            return False
        self._unload(adapter, "unloaded on request")
        return True

    def close(self) -> None:
        """Unload every adapter this process loaded (portal shutdown)."""
        self._closed.set()
        with self._lock:
            adapters = list(self._adapters.values())
            self._adapters.clear()
        for adapter in adapters:
            self._unload(adapter, "the portal is stopping")
        self._reaper.join()

    def reap_idle(self) -> int:
        now = time.time()
        with self._lock:
            due = [a for a in self._adapters.values() if a.busy == 0 and now - a.last_used > self.idle_seconds]
            for adapter in due:
                del self._adapters[adapter.run_id]
        for adapter in due:
            self._unload(adapter, f"idle for more than {self.idle_seconds:g} s")
        return len(due)

    def _unload(self, adapter: _Adapter, why: str) -> None:
        try:
            inference.unload_lora_adapter(self.base_url, adapter.name, api_key=self._api_key,
                                          timeout=min(self.timeout, 30.0))
            log.info("unloaded adapter %s from %s: %s", adapter.name, self.base_url, why)
        except InferenceError as err:  # the endpoint may be down: it forgot the adapter then anyway
            log.warning("could not unload adapter %s from %s (%s): %s", adapter.name, self.base_url, why, err)
        with self._lock:
            self._cards = None

    def _in_use(self, run_id: int):
        """While an answer streams, its adapter is neither idle-unloaded nor evicted."""
        return busy(self._lock, lambda: self._adapters.get(run_id))
