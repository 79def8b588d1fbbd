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
REGISTER_GRACE_SECONDS = 60.0  # MLflow's answer to a model registration, after the run ended


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

    def artifacts(self, run_id: int) -> dict[str, Any]:
        """The run's output files: ``{"artifacts": [...], "truncated": bool}``."""
        return self._call("GET", f"/runs/{run_id}/artifacts").json()

    def resume(self, run_id: int, name: str | None = None) -> dict[str, Any]:
        """A failed or cancelled run again, from its last checkpoint: the new run."""
        return self._call("POST", f"/runs/{run_id}/resume", json={"name": name}).json()

    def evaluate(self, run_id: int, datasets: list[str] | None = None, max_samples: int | None = None, *,
                 max_new_tokens: int = 128, predict_with_generate: bool = True, batch_size: int = 4,
                 name: str | None = None) -> dict[str, Any]:
        """An eval job of a succeeded run: the eval run (kind "eval")."""
        return self._call("POST", f"/runs/{run_id}/evaluate", json={
            "datasets": datasets, "max_samples": max_samples, "max_new_tokens": max_new_tokens,
            "predict_with_generate": predict_with_generate, "batch_size": batch_size, "name": name}).json()

    def evaluations(self, run_id: int) -> list[dict[str, Any]]:
        """The eval runs of a run, newest first: ``{"run": ..., "metrics": ..., "predictions": ...}`` each."""
        return self._call("GET", f"/runs/{run_id}/evaluations").json()["evaluations"]

    def merge(self, run_id: int, name: str | None = None) -> dict[str, Any]:
        """An export job of a succeeded run, registered as ``name`` once it succeeds: the export run."""
        return self._call("POST", f"/runs/{run_id}/merge", json={"name": name}).json()

    def set_alias(self, name: str, version: str | int, alias: str) -> dict[str, Any]:
        """Point a registry alias (candidate, production) at a model version (admins)."""
        from urllib.parse import quote

        return self._call("POST", f"/models/{quote(name, safe='')}/versions/{quote(str(version), safe='')}/alias",
                          json={"alias": alias}).json()

    def logs(self, run_id: int, *, tail: int | None = None, offset: int | None = None) -> tuple[str, int]:
        params = {"offset": offset} if offset is not None else {"tail": tail or 64_000}
        response = self._call("GET", f"/runs/{run_id}/logs", params=params)
        return response.text, int(response.headers.get("X-Log-Offset", "0"))

    def wait(self, run_id: int, timeout: float | None, interval: float = 2.0) -> dict[str, Any] | None:
        """The run once it has ended (a succeeded export run: once its model is registered too, or the
        portal said why not); None when ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        registering_until = None
        while True:
            run = self.run(run_id)
            if run["status"] in FINAL_STATUSES:
                # the portal registers an export run's model just after it marked the run succeeded
                if (run["status"] != "succeeded" or run.get("kind") != "export" or run.get("registered_version")
                        or run.get("status_reason")):
                    return run
                registering_until = registering_until or time.monotonic() + REGISTER_GRACE_SECONDS
                if time.monotonic() >= registering_until or (deadline is not None and time.monotonic() >= deadline):
                    return run  # it has ended: said as it is
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
