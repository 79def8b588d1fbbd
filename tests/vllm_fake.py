"""An HTTP server that answers like vLLM's OpenAI-compatible server with runtime LoRA updating.

vLLM needs a GPU and cannot run here. This server implements the endpoints the portal uses the
way vLLM 0.25.1 answered them on a GPU (status codes and bodies recorded verbatim in
docs/gpu-measurements.md): ``GET /v1/models`` (the base model with ``root`` and ``parent: null``;
each loaded adapter with ``root`` = its path and ``parent`` = the base model's id),
``POST /v1/load_lora_adapter`` (200 plain text "Success: …"; 400 "… has already been loaded. …";
404 "Loading lora … failed: No adapter found for <path>"), ``POST /v1/unload_lora_adapter``
(200 plain text; 404 "… cannot be found."), ``POST /v1/chat/completions`` (SSE or not; 404 "The
model `x` does not exist."), errors as ``{"error": {message, type, param, code}}``. Replies are
made up, but say which model answered, so a test sees where the portal sent a message.

``mounts`` maps the paths vLLM sees to this machine's (a vLLM pod mounting the shared volume
somewhere else than the portal does).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeVllm:
    def __init__(self, base_model: str, root: str, *, api_key: str | None = None,
                 mounts: dict[str, Path] | None = None, runtime_lora: bool = True):
        self.base_model, self.root = base_model, root
        self.api_key = api_key
        self.mounts = mounts or {}
        self.runtime_lora = runtime_lora
        self.adapters: dict[str, str] = {}  # name -> path as given
        self.calls: list[tuple[str, str]] = []  # (path, model or lora_name)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body, content_type: str = "application/json") -> None:
                data = (json.dumps(body) if content_type == "application/json" else body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, code: int, message: str, kind: str, param: str | None = None) -> None:
                self._send(code, {"error": {"message": message, "type": kind, "param": param, "code": code}})

            def _authorized(self) -> bool:
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    self._send(401, {"error": "Unauthorized"})
                    return False
                return True

            def do_GET(self):
                if not self._authorized():
                    return
                if self.path != "/v1/models":
                    return self._send(404, {"detail": "Not Found"})
                with fake.lock:
                    cards = [{"id": fake.base_model, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                              "root": fake.root, "parent": None, "max_model_len": 2048}]
                    cards += [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                               "root": path, "parent": fake.base_model} for name, path in fake.adapters.items()]
                self._send(200, {"object": "list", "data": cards})

            def do_POST(self):
                if not self._authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter") and not fake.runtime_lora:
                    return self._send(404, {"detail": "Not Found"})  # no VLLM_ALLOW_RUNTIME_LORA_UPDATING
                if self.path == "/v1/load_lora_adapter":
                    return self._load(body)
                if self.path == "/v1/unload_lora_adapter":
                    return self._unload(body)
                if self.path == "/v1/chat/completions":
                    return self._chat(body)
                self._send(404, {"detail": "Not Found"})

            def _load(self, body):
                name, path = body.get("lora_name"), body.get("lora_path")
                with fake.lock:
                    fake.calls.append(("load", str(name)))
                    if not name or not path:
                        return self._error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
                    if name in fake.adapters:
                        return self._error(400, f"The lora adapter '{name}' has already been loaded. If you want to "
                                           "load the adapter in place, set 'load_inplace' to True.", "InvalidUserInput")
                    if not (fake.local(path) / "adapter_config.json").is_file():
                        return self._error(404, f"Loading lora {name} failed: No adapter found for {path}",
                                           "NotFoundError")
                    fake.adapters[name] = path
                self._send(200, f"Success: LoRA adapter '{name}' added successfully.", "text/plain")

            def _unload(self, body):
                name = body.get("lora_name")
                with fake.lock:
                    fake.calls.append(("unload", str(name)))
                    if fake.adapters.pop(name, None) is None:
                        return self._error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
                self._send(200, f"Success: LoRA adapter '{name}' removed successfully.", "text/plain")

            def _chat(self, body):
                model = body.get("model")
                with fake.lock:
                    fake.calls.append(("chat", str(model)))
                    known = model == fake.base_model or model in fake.adapters
                if not known:
                    return self._error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
                words = f"[{model}] you said: {body['messages'][-1]['content']}".split(" ")
                if not body.get("stream"):
                    return self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "model": model,
                                            "choices": [{"index": 0, "finish_reason": "stop",
                                                         "message": {"role": "assistant", "content": " ".join(words)}}]})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for i, word in enumerate(words):
                    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
                             "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def local(self, path: str) -> Path:
        for prefix, local in self.mounts.items():
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return Path(local) / path[len(prefix):].lstrip("/")
        return Path(path)

    def restart(self) -> None:
        """What a vLLM restart does to runtime-loaded adapters: forgets them."""
        with self.lock:
            self.adapters.clear()

    def count(self, kind: str, name: str | None = None) -> int:
        with self.lock:
            return sum(1 for k, n in self.calls if k == kind and (name is None or n == name))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
