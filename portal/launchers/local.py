"""Local launcher: one process group per run on this machine (the embedded default).

Each job is ``python -m portal.launchers.jobwrapper EXIT_FILE -- llamafactory-cli train
config.yaml`` in a new session, its output in the run folder's log. The state kept in the Run
row is the wrapper's pid and start time: a pid alone may have been reused after a restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from .base import JobSpec, Launcher, LaunchError, PollResult

EXIT_FILE = "exit_code"


def describe_exit(code: int) -> str | None:
    if code == 0:
        return None
    if code < 0:
        try:
            return f"stopped by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"stopped by signal {-code}"
    if code > 128:
        try:
            return f"exited with code {code} ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f"exited with code {code}"


# What a job inherits from the portal's environment: the basics a Python program needs, and
# the settings of the libraries it runs. Nothing else (portal settings, secrets, tokens).
INHERITED_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "VIRTUAL_ENV", "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED",
})
INHERITED_PREFIXES = ("LC_", "HF_", "CUDA_", "NCCL_", "TORCH_", "TRANSFORMERS_", "HUGGINGFACE_", "TOKENIZERS_")


def job_environment(environ) -> dict[str, str]:
    return {k: v for k, v in environ.items()
            if k in INHERITED_NAMES or (k.startswith(INHERITED_PREFIXES) and "TOKEN" not in k)}


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, settings=None):
        self.settings = settings
        self._children: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def start(self, spec: JobSpec) -> dict[str, Any]:
        spec.workdir.mkdir(parents=True, exist_ok=True)
        exit_file = spec.workdir / EXIT_FILE
        exit_file.unlink(missing_ok=True)
        env = job_environment(os.environ)
        env.update(spec.env)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in spec.gpu_ids)
        env.setdefault("PYTHONUNBUFFERED", "1")
        argv = [sys.executable, "-m", "portal.launchers.jobwrapper", str(exit_file), "--", *spec.argv]
        try:
            with open(spec.log_path, "ab") as logf:
                proc = subprocess.Popen(argv, cwd=spec.workdir, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as err:
            raise LaunchError(f"could not start the job: {err}") from err
        with self._lock:
            self._children[proc.pid] = proc
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            create_time = 0.0
        return {"pid": proc.pid, "create_time": create_time, "exit_file": str(exit_file)}

    # ---- polling -------------------------------------------------------------------------
    def _reap(self, pid: int) -> int | None:
        with self._lock:
            proc = self._children.get(pid)
        if proc is None:
            return None
        code = proc.poll()
        if code is not None:
            with self._lock:
                self._children.pop(pid, None)
        return code

    @staticmethod
    def _read_exit(state: dict[str, Any]) -> int | None:
        try:
            return int(Path(state["exit_file"]).read_text().strip())
        except (OSError, ValueError, KeyError):
            return None

    @staticmethod
    def _same_process_alive(state: dict[str, Any]) -> bool:
        try:
            proc = psutil.Process(int(state["pid"]))
            if abs(proc.create_time() - float(state.get("create_time", 0))) > 0.5:
                return False  # the pid was reused by another process
            return proc.status() != psutil.STATUS_ZOMBIE
        except (psutil.Error, KeyError, ValueError):
            return False

    def is_alive(self, state: dict[str, Any]) -> bool:
        pid = int(state.get("pid", 0))
        if pid in self._children:
            return self._reap(pid) is None
        return self._same_process_alive(state)

    def poll(self, state: dict[str, Any]) -> PollResult:
        if self.is_alive(state):
            return PollResult(None)
        code = self._read_exit(state)
        if code is not None:
            return PollResult(code, describe_exit(code))
        return PollResult(-1, "the job ended without recording an exit code (killed, or the machine restarted)")

    # ---- stopping ------------------------------------------------------------------------
    def _group_alive(self, pgid: int) -> bool:
        self._reap(pgid)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # only zombies left (reparented children reaped by init soon) count as gone
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(proc.info["pid"]) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    return True
            except (ProcessLookupError, psutil.Error, OSError):
                continue
        return False

    def stop(self, state: dict[str, Any], grace_seconds: float) -> None:
        pid = int(state.get("pid", 0))
        if not pid or not self.is_alive(state):
            return  # never signal a group we cannot prove is this job's
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            if not self._group_alive(pid):
                return
            time.sleep(0.1)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        for _ in range(50):
            if not self._group_alive(pid):
                return
            time.sleep(0.1)
