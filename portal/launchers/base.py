"""The launcher contract (after JupyterHub's Spawner): start, poll, stop, logs; the state a
launcher needs to find its job again is a JSON dict kept in the Run row."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LaunchError(RuntimeError):
    pass


@dataclass(frozen=True)
class JobSpec:
    run_id: int
    name: str
    owner: str
    argv: list[str]  # the command, never a shell string
    workdir: Path  # the run folder: config, log, exit code
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    gpu_ids: list[int] = field(default_factory=list)
    # what a cluster launcher needs besides (the local launcher ignores them)
    gpus: int = 0  # GPUs of the whole run, spread evenly over `nodes`
    nodes: int = 1
    config_yaml: str = ""  # the exact config (empty: read from workdir/config.yaml)
    config_sha256: str = ""
    experiment: str = ""  # the MLflow experiment, for labels
    # llamafactory-cli's subcommand, from the run's kind: "train" (train and eval runs) or "export"
    command: str = "train"


@dataclass(frozen=True)
class PollResult:
    """``exit_code`` is None while the job runs; ``reason`` says why in words (also while it
    waits: "queued: waiting for quota in ...", "waiting for a node: ...")."""

    exit_code: int | None
    reason: str | None = None
    phase: str | None = None  # while running: "queued", "starting", "running" or "stopping"


class Launcher(ABC):
    name: str = "base"
    # True when a cluster places the jobs: this machine's GPUs and cores say nothing about a job's
    on_cluster: bool = False

    @abstractmethod
    def start(self, spec: JobSpec) -> dict[str, Any]:
        """Start the job; return the state that finds it again (kept in the Run row)."""

    @abstractmethod
    def poll(self, state: dict[str, Any]) -> PollResult:
        """Running (exit_code None) or finished, with the exit code and a reason in words."""

    @abstractmethod
    def stop(self, state: dict[str, Any], grace_seconds: float) -> None:
        """Ask the job to stop, then force it after ``grace_seconds``. Returns when it is gone."""

    def logs(self, state: dict[str, Any], log_path: Path, tail_bytes: int = 64_000) -> str:
        try:
            with open(log_path, "rb") as fh:
                fh.seek(0, 2)
                size = fh.tell()
                fh.seek(max(0, size - tail_bytes))
                data = fh.read()
        except FileNotFoundError:
            return ""
        text = data.decode("utf-8", errors="replace")
        if size > tail_bytes:
            text = text.split("\n", 1)[-1]
        return text
