"""Shared, real test parts: one MLflow server, one tiny model + dataset, one trained run.

Everything is made locally by the test run (no hub); the expensive parts are session-scoped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
FAST_TRAINING = {  # a few steps: enough for a loss curve, seconds on a CPU
    "train.cutoff_len": 96,
    "train.batch_size": 8,
    "train.gradient_accumulation_steps": 1,
    "train.learning_rate": "1e-3",
    "train.num_train_epochs": "1.0",
    "train.max_samples": "64",
    "train.logging_steps": 2,
    "train.save_steps": 500,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` (sqlite store) on loopback, shared by the whole session."""
    from portal.tracking import EmbeddedMlflow

    server = EmbeddedMlflow(tmp_path_factory.mktemp("mlflow"), free_port())  # the portal's own starter
    try:
        yield server.ensure()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny LLaMA and the toy alpaca dataset, made once; copied into each data root."""
    from portal.demo import make_demo_dataset, make_tiny_model

    root = tmp_path_factory.mktemp("assets")
    model = make_tiny_model(root / "models" / "tiny-llama")
    make_demo_dataset(root / "datasets", rows=200)
    return {"model": model, "datasets": root / "datasets"}


def install_assets(settings, assets: dict[str, Path]) -> Path:
    settings.ensure_dirs()
    model_dir = settings.shared_models_root / "tiny-llama"
    if not model_dir.exists():
        shutil.copytree(assets["model"], model_dir)
    for item in assets["datasets"].iterdir():
        target = settings.shared_datasets_root / item.name
        if not target.exists():
            shutil.copy2(item, target)
    return model_dir


@pytest.fixture
def make_services(tmp_path_factory, mlflow_server, demo_assets):
    """Build portal services on a fresh data root (CPU jobs, the session's MLflow)."""
    from portal.config import Settings
    from portal.services import build_services

    made = []

    def factory(**overrides):
        data_root = overrides.pop("data_root", None) or tmp_path_factory.mktemp("portal")
        values = dict(data_root=data_root, mlflow_tracking_uri=mlflow_server, gpus=[], max_concurrent_runs=2,
                      cancel_grace_seconds=5, dispatch_interval_seconds=0.5, metrics_refresh_seconds=2.0)
        values.update(overrides)
        settings = Settings(**values)
        install_assets(settings, demo_assets)
        services = build_services(settings)
        made.append(services)
        return services

    yield factory
    for services in made:  # no job outlives its test
        services.runs.stop_supervisor()
        services.runs.stop_active_jobs(2)


def submit_form(runs, user, values: dict):
    """Submit form values the way the Train tab does: LLaMA Board's form -> args -> RunService."""
    from llamaboard_ext.compile import form_to_args
    from llamaboard_ext.form import form_defaults

    return runs.submit_args(user, form_to_args(values, form_defaults()), source="form")


def demo_form(model_dir: Path, name: str, **extra) -> dict:
    values = {"top.model_name": "tiny-llama", "top.model_path": str(model_dir), "train.dataset": ["demo_alpaca"],
              "train.output_dir": name, **FAST_TRAINING}
    values.update(extra)
    return values


@pytest.fixture(scope="session")
def trained(tmp_path_factory, mlflow_server, demo_assets):
    """One run trained for real through RunService and the local launcher, shared by tests."""
    from portal.config import Settings
    from portal.services import build_services

    settings = Settings(data_root=tmp_path_factory.mktemp("trained"), mlflow_tracking_uri=mlflow_server, gpus=[],
                        dispatch_interval_seconds=0.5)
    model_dir = install_assets(settings, demo_assets)
    services = build_services(settings)
    user = services.runs.ensure_user("alice")
    run = submit_form(services.runs, user, demo_form(model_dir, "trained_once"))
    run = services.runs.wait(user, run.id, timeout=300, interval=0.5)
    assert run.status.value == "succeeded", services.runs.logs(user, run.id)[-3000:]
    return {"services": services, "user": user, "run": run, "model_dir": model_dir}


@pytest.fixture(scope="session", autouse=True)
def _artifacts_dir():
    ARTIFACTS.mkdir(exist_ok=True)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    yield


class _ServerThread:
    def __init__(self, app, port: int):
        import threading

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self):
        self.thread.start()
        wait_http(f"{self.url}/healthz", timeout=120)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def portal(tmp_path_factory, mlflow_server, demo_assets):
    """The portal's real web app served over HTTP (uvicorn) on a fresh data root."""
    from portal.config import Settings
    from portal.services import build_services
    from portal.web import create_app

    settings = Settings(data_root=tmp_path_factory.mktemp("web"), mlflow_tracking_uri=mlflow_server, gpus=[],
                        dispatch_interval_seconds=0.5)
    install_assets(settings, demo_assets)
    services = build_services(settings)
    app = create_app(services)
    with _ServerThread(app, free_port()) as server:
        yield {"url": server.url, "services": services, "app": app}
    services.runs.stop_supervisor()


def launch_chromium(playwright):
    return playwright.chromium.launch(
        executable_path=shutil.which("chromium"),
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run", "--disable-quic"],
    )


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory) -> str:
    """A real PostgreSQL server (Debian's), started in a temp folder for the session."""
    import glob
    import pwd

    import tempfile

    bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
    root = Path(tempfile.mkdtemp(prefix="portal-pg-"))  # pytest's tmp folders are closed to other users
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        entry = pwd.getpwnam("postgres")
        for path in (root, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*prefix, f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*prefix, f"{bindir}/pg_ctl", "-D", str(data), "-w", "-l", str(root / "server.log"), "-o",
                    f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "portal"],
                       check=True, capture_output=True)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/portal"
    finally:
        subprocess.run([*prefix, f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
