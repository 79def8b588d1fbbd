"""The CLI's side of the HTTP API: a thin httpx client for `--server URL` (CI pipelines).

Errors become ``ClientError`` with the server's message and, for a rejected config, the
problems per key, so the CLI prints the same lines as it does locally.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import httpx

API_PREFIX = "/api"  # here, not in portal.api: a pipeline's CLI needs only httpx, not the server's imports
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class ClientError(RuntimeError):
    def __init__(self, message: str, status: int | None = None, problems: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.problems = problems or {}


class PortalClient:
    def __init__(self, server: str, token: str | None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        if not server.startswith(("http://", "https://")):
            raise ClientError(f"--server {server}: give the portal's URL, e.g. https://llm.example.com")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.server = server.rstrip("/")
        self._http = httpx.Client(base_url=self.server + API_PREFIX, headers=headers, timeout=timeout,
                                  transport=transport, follow_redirects=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "PortalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as err:
            raise ClientError(f"{self.server}: no answer in time ({err.__class__.__name__})") from err
        except httpx.HTTPError as err:
            raise ClientError(f"{self.server}: cannot reach the portal ({err})") from err
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"detail": response.text[:300] or response.reason_phrase}
            detail = body.get("detail") if isinstance(body, dict) else None
            raise ClientError(f"{self.server}: {detail or response.reason_phrase} (HTTP {response.status_code})",
                              response.status_code, body.get("problems") if isinstance(body, dict) else None)
        if response.status_code in (301, 302, 303, 307, 308):  # a login page: the token did not count
            raise ClientError(f"{self.server}: the portal asked for a browser sign-in: send a token with --token-env",
                              response.status_code)
        return response

    def me(self) -> dict[str, Any]:
        return self._call("GET", "/me").json()

    def validate(self, yaml_text: str, name: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/validate", json={"yaml": yaml_text, "name": name}).json()

    def submit(self, yaml_text: str, name: str | None = None, *, gpus: int | None = None,
               nodes: int = 1) -> dict[str, Any]:
        """``gpus`` (per node) and ``nodes``: on a portal with the Kubernetes launcher only."""
        return self._call("POST", "/runs", json={"yaml": yaml_text, "name": name, "gpus": gpus, "nodes": nodes}).json()

    def run(self, run_id: int) -> dict[str, Any]:
        return self._call("GET", f"/runs/{run_id}").json()

    def runs(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None}
        return self._call("GET", "/runs", params=params).json()

    def cancel(self, run_id: int) -> dict[str, Any]:
        return self._call("POST", f"/runs/{run_id}/cancel").json()

    def logs(self, run_id: int, *, tail: int | None = None, offset: int | None = None) -> tuple[str, int]:
        params = {"offset": offset} if offset is not None else {"tail": tail or 64_000}
        response = self._call("GET", f"/runs/{run_id}/logs", params=params)
        return response.text, int(response.headers.get("X-Log-Offset", "0"))

    def wait(self, run_id: int, timeout: float | None, interval: float = 2.0) -> dict[str, Any] | None:
        """The run once it has ended; None when ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.run(run_id)
            if run["status"] in FINAL_STATUSES:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))

    def follow_logs(self, run_id: int, interval: float = 2.0) -> Iterator[str]:
        """The log from its start, as it grows, until the run has ended."""
        offset = 0
        while True:
            status = self.run(run_id)["status"]  # before reading: the last read then has the whole log
            text, offset = self.logs(run_id, offset=offset)
            if text:
                yield text
            if status in FINAL_STATUSES:
                if not text:
                    return
                continue  # a long log comes in pieces: read on to its end
            time.sleep(interval)
