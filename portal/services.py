"""Wires the services together from Settings (one place; the web app and the CLI share it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .catalog import Catalog
from .chat import ChatService
from .config import Settings
from .datasets import DatasetService
from .db import Database
from .launchers import make_launcher
from .runs import RunService
from .tokens import TokenService
from .tracking import EmbeddedMlflow, Tracker

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    db: Database
    catalog: Catalog
    tracker: Tracker
    runs: RunService
    datasets: DatasetService
    tokens: TokenService
    chat: ChatService
    mlflow_server: EmbeddedMlflow | None = None


def ensure_deepspeed_configs(settings: Settings) -> None:
    """LLaMA Board's DeepSpeed presets, written once into the shared folder (not the cwd)."""
    from llamaboard_ext.deepspeed import write_deepspeed_presets

    from .policy import deepspeed_dir

    write_deepspeed_presets(deepspeed_dir(settings))


def unreachable_tracking_warning(settings: Settings) -> str | None:
    """Why jobs on a cluster could not log to MLflow: a loopback tracking address (the embedded
    server included) means the pod itself, not the portal's machine."""
    from urllib.parse import urlsplit

    host = urlsplit(settings.tracking_uri).hostname or ""
    if settings.launcher != "kubernetes" or host not in ("127.0.0.1", "localhost", "::1"):
        return None
    return (f"launcher kubernetes with MLflow at {settings.tracking_uri}: job pods cannot reach this machine's "
            "loopback address, so runs would get no metrics; set PORTAL_MLFLOW_TRACKING_URI to an address the "
            "pods reach (see docs/admin-guide.md, Kubernetes)")


def build_services(settings: Settings, *, start_tracking: bool = True) -> Services:
    settings.ensure_dirs()
    warning = unreachable_tracking_warning(settings)
    if warning:
        log.warning(warning)
    catalog = Catalog(settings)  # first: a bad model catalog stops the start before anything is started
    db = Database(settings.db_url)
    db.migrate()
    ensure_deepspeed_configs(settings)
    server = None
    if settings.embedded_mlflow and start_tracking:
        server = EmbeddedMlflow(settings.mlflow_root, settings.mlflow_port)
        server.ensure()
    tracker = Tracker(settings.tracking_uri, settings.mlflow_experiment, settings.mlflow_public_url)
    launcher = make_launcher(settings.launcher, settings)
    datasets = DatasetService(settings, db, catalog)
    runs = RunService(settings, db, catalog, launcher, tracker, datasets)
    return Services(settings=settings, db=db, catalog=catalog, tracker=tracker, runs=runs, datasets=datasets,
                    tokens=TokenService(db), chat=ChatService(runs), mlflow_server=server)
