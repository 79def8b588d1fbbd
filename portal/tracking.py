"""MLflow: the run is created by the portal before the job starts; metrics are read back
through one cache that every viewer of a run shares."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx

log = logging.getLogger(__name__)

CURVE_KEYS = ("loss", "eval_loss")  # what the Runs tab draws; each key is one MLflow request


@dataclass(frozen=True)
class MetricPoint:
    key: str
    step: int
    value: float


class Tracker:
    """The portal's side of MLflow (creating runs, reading metric history)."""

    def __init__(self, tracking_uri: str, experiment: str, public_url: str | None = None):
        # The client prints run links to stdout on finishing a run; stdout is the CLI's (e.g. --json).
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.public_url = (public_url or tracking_uri).rstrip("/")
        self.experiment_name = experiment
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._experiment_id: str | None = None
        self.reads = 0  # metric-history requests sent to MLflow (tests and benchmarks read this)
        self._reads_lock = threading.Lock()

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(self.experiment_name)
                except Exception:  # created meanwhile by another portal process
                    exp = self.client.get_experiment_by_name(self.experiment_name)
                    if exp is None:
                        raise
                    self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def create_run(self, name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id(), run_name=name, tags=tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def finish_run(self, run_id: str, status: str) -> None:
        """Close a run the trainer left open (a crash or a cancel); FINISHED runs are kept."""
        run = self.client.get_run(run_id)
        if run.info.status == "RUNNING":
            self.client.set_terminated(run_id, status=status)

    def history(self, run_id: str, keys: tuple[str, ...] = CURVE_KEYS) -> list[MetricPoint]:
        points: list[MetricPoint] = []
        for key in keys:
            with self._reads_lock:
                self.reads += 1
            for m in self.client.get_metric_history(run_id, key):
                points.append(MetricPoint(key=key, step=int(m.step), value=float(m.value)))
        return points

    def run_url(self, run_id: str) -> str:
        return f"{self.public_url}/#/experiments/{self.experiment_id()}/runs/{run_id}"


class MetricsCache:
    """One read of MLflow per run per interval, however many viewers ask (single flight)."""

    def __init__(self, fetch: Callable[[str], list[MetricPoint]], ttl_seconds: float, clock: Callable[[], float] = time.monotonic):
        self._fetch = fetch
        self._ttl = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, list[MetricPoint], bool]] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self.fetches = 0

    def _fresh(self, entry, final: bool) -> bool:
        """A final run's history is read once more after it ended, then kept for good."""
        if entry is None:
            return False
        if entry[2]:
            return True
        return not final and self._clock() - entry[0] < self._ttl

    def get(self, run_id: str, final: bool = False) -> list[MetricPoint]:
        entry = self._entries.get(run_id)
        if self._fresh(entry, final):
            return entry[1]
        with self._lock:
            key_lock = self._key_locks.setdefault(run_id, threading.Lock())
        with key_lock:
            entry = self._entries.get(run_id)  # another viewer may have just fetched it
            if self._fresh(entry, final):
                return entry[1]
            points = self._fetch(run_id)
            self.fetches += 1
            self._entries[run_id] = (self._clock(), points, final)
            return points


# ---------------------------------------------------------------------------------------
# The embedded tracking server (one machine): `mlflow server` on loopback, sqlite store
# ---------------------------------------------------------------------------------------

def _healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class EmbeddedMlflow:
    """Starts (or reuses) a detached `mlflow server` for the data root; jobs outlive the portal,
    so the server does too. Its pid is kept in ``mlflow/server.pid``."""

    def __init__(self, root: Path, port: int, host: str = "127.0.0.1"):
        self.root = Path(root)
        self.port = port
        self.host = host
        self.url = f"http://{host}:{port}"
        self.pid_file = self.root / "server.pid"
        self.log_file = self.root / "server.log"
        self._proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", self.host, "--port", str(self.port), "--workers", "1",
        ]

    def ensure(self, timeout: float = 90.0) -> str:
        if _healthy(self.url):
            return self.url
        if not port_free(self.host, self.port):
            raise RuntimeError(
                f"port {self.port} is taken by something that is not an MLflow server; "
                "set PORTAL_MLFLOW_PORT to a free port or PORTAL_MLFLOW_TRACKING_URI to your MLflow"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "artifacts").mkdir(exist_ok=True)
        with open(self.log_file, "ab") as logf:
            proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.root)
        self._proc = proc
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {self.log_file}")
            if _healthy(self.url):
                log.info("MLflow tracking server ready at %s (log: %s)", self.url, self.log_file)
                return self.url
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer within {timeout:.0f} s; see {self.log_file}")

    @property
    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (its whole process group: uvicorn and its workers)."""
        pid = self.pid
        if pid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    break
                try:
                    os.killpg(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                continue
            break
        self.pid_file.unlink(missing_ok=True)
