"""Shared parts of the benchmarks: a real `mlflow server`, portal services on a temp data root,
the demo assets, figures and budgets, and the JSON results in bench/results/.

Nothing here is a test: the benchmarks print their figures next to their budgets and write them
out; they never fail on a budget (only on a broken setup).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
VENV_BIN = ROOT / ".venv" / "bin"

if str(ROOT) not in sys.path:  # `python bench/xyz.py` from anywhere: import the portal from this checkout
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


# ---- figures -------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "OK" if ok else "OVER BUDGET"


def budget_line(label: str, figure: str, budget: str, ok: bool) -> str:
    return f"  {label:<44} {figure:>16}   budget {budget:<18} {verdict(ok)}"


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine()}


def write_result(name: str, data: dict[str, Any]) -> Path:
    """bench/results/<name>.json (the latest) and a timestamped copy."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    data = {"benchmark": name, "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), **data}
    text = json.dumps(data, indent=2, default=str)
    (RESULTS_DIR / f"{name}-{stamp}.json").write_text(text, encoding="utf-8")
    latest = RESULTS_DIR / f"{name}.json"
    latest.write_text(text, encoding="utf-8")
    return latest


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- a real MLflow server (as tests/conftest.py starts it) ---------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[tuple[str, int]]:
    """`mlflow server` (sqlite store, one worker) on a free loopback port, started by the portal's
    own EmbeddedMlflow; yields (url, pid); stopped on exit."""
    from portal.tracking import EmbeddedMlflow

    server = EmbeddedMlflow(root, free_port())
    try:
        url = server.ensure()
        yield url, server.pid
    finally:
        server.stop()


# ---- portal services on a temp data root ---------------------------------------------------

@contextlib.contextmanager
def bench_env(prefix: str, keep: bool = False, **settings_overrides: Any) -> Iterator[dict[str, Any]]:
    """A temp data root, a real MLflow server, services (CPU jobs) and the demo assets.

    Yields {"tmp", "settings", "services", "demo_config" (Path), "tracking_uri", "mlflow_pid"}. On exit every
    job still running is stopped (by its own recorded pid) and the temp folder is removed.
    """
    from portal.cli import make_demo
    from portal.config import Settings
    from portal.services import build_services

    tmp = Path(tempfile.mkdtemp(prefix=f"lbp-bench-{prefix}-"))
    services = None
    try:
        t0 = time.monotonic()
        with mlflow_server(tmp / "mlflow") as (url, pid):
            log(f"mlflow server ready at {url} ({time.monotonic() - t0:.1f} s)")
            values: dict[str, Any] = {"data_root": tmp / "portal", "mlflow_tracking_uri": url, "gpus": []}
            values.update(settings_overrides)
            settings = Settings(**values)
            services = build_services(settings)
            t0 = time.monotonic()
            demo_config = make_demo(settings)
            log(f"demo model + dataset + config made ({time.monotonic() - t0:.1f} s)")
            try:
                yield {"tmp": tmp, "settings": settings, "services": services, "demo_config": demo_config,
                       "tracking_uri": url, "mlflow_pid": pid}
            finally:
                stop_active_jobs(services)
    finally:
        if keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def stop_active_jobs(services) -> None:
    services.runs.stop_active_jobs(5)


def demo_args(demo_config: Path, **overrides: Any) -> dict[str, Any]:
    """The demo config (portal.cli.make_demo) as args, with overrides."""
    from llamaboard_ext.compile import yaml_to_args

    args = yaml_to_args(demo_config.read_bytes())
    args.update(overrides)
    return args


def job_env(tracking_uri: str, mlflow_run_id: str, experiment: str) -> dict[str, str]:
    """The environment the local launcher gives a job (portal/launchers/local.py + runs._start)."""
    try:  # the launcher's own allowlist of inherited variables
        from portal.launchers.local import job_environment
    except ImportError:  # an older launcher: everything but the portal's settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
    else:
        env = job_environment(os.environ)
    env.update({"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_RUN_ID": mlflow_run_id,
                "MLFLOW_EXPERIMENT_NAME": experiment, "CUDA_VISIBLE_DEVICES": ""})
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def llamafactory_cli() -> str:
    path = VENV_BIN / "llamafactory-cli"
    return str(path) if path.is_file() else (shutil.which("llamafactory-cli") or "llamafactory-cli")


def tree_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process and its live children (0.0 when it is gone)."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


class CpuMeter:
    """CPU seconds over a span: this process, its reaped children (a job and everything it waited
    for), an optional process tree (the MLflow server), and the whole machine, so that what other
    processes took (the machine is shared) can be told apart from what was measured."""

    def __init__(self, tree_pid: int | None = None, job_pid: int | None = None):
        self.tree_pid = tree_pid
        self.job_pid = job_pid  # a job still running (not yet reaped, so not in RUSAGE_CHILDREN)

    @staticmethod
    def _machine_busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _sample(self) -> dict[str, float]:
        import resource

        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"wall": time.monotonic(), "self": me.ru_utime + me.ru_stime, "children": kids.ru_utime + kids.ru_stime,
                "tree": tree_cpu_seconds(self.tree_pid) if self.tree_pid else 0.0,
                "job": tree_cpu_seconds(self.job_pid) if self.job_pid else 0.0, "machine": self._machine_busy()}

    def __enter__(self) -> Self:
        self.start = self._sample()
        self.load_before = os.getloadavg()[0]
        return self

    def __exit__(self, *exc) -> None:
        end = self._sample()
        d = {k: end[k] - self.start[k] for k in end}
        self.wall_s = d["wall"]
        self.self_cpu_s = d["self"]
        self.children_cpu_s = d["children"]
        self.tree_cpu_s = d["tree"]
        self.job_cpu_s = d["job"]
        self.machine_busy_cpu_s = d["machine"]
        self.others_cpu_s = max(0.0, d["machine"] - d["self"] - d["children"] - d["tree"] - d["job"])
        self.load_after = os.getloadavg()[0]

    def as_dict(self) -> dict[str, float]:
        return {"cpu_self_s": self.self_cpu_s, "cpu_children_s": self.children_cpu_s, "cpu_mlflow_s": self.tree_cpu_s,
                "cpu_running_job_s": self.job_cpu_s,
                "cpu_machine_busy_s": self.machine_busy_cpu_s, "cpu_other_processes_s": self.others_cpu_s,
                "loadavg_1m_before": self.load_before, "loadavg_1m_after": self.load_after}


class Served:
    """An ASGI app under uvicorn in a daemon thread on a free loopback port."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
