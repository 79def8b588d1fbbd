"""Resume a cancelled run from its last checkpoint: a real training of the tiny model that saves
a checkpoint every 2 steps, cancelled, then resumed from the command line (`resume`, `show --json`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import demo_form, submit_form

from portal.runs import NotFound, PortalError

RESUMED = ("Resuming training from checkpoint",)  # transformers 4.5x: "... with epoch E and global step N"


def cancelled_with_checkpoint(runs, user, model: Path, name: str):
    """A run that trains long (30 epochs), saves checkpoint-2 early, and is cancelled once it has."""
    run = submit_form(runs, user, demo_form(model, name, **{"train.save_steps": 2, "train.num_train_epochs": "30.0"}))
    state = Path(run.output_dir) / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not state.is_file():
        runs.poll_active()
        current = runs.get_run(user, run.id)
        assert not current.status.is_final, runs.logs(user, run.id)[-2000:]
        assert time.monotonic() < deadline, "no checkpoint-2 within 240 s: " + runs.logs(user, run.id)[-2000:]
        time.sleep(0.5)
    cancelled = runs.cancel(user, run.id)
    assert cancelled.status.value == "cancelled", cancelled.status_reason
    return cancelled


def wait_for_resumed_log(runs, user, run_id: int, timeout: float = 240) -> str:
    """The child's log once it says it resumed (then the child is cancelled: it has 30 epochs to go)."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            runs.poll_active()
            text = runs.logs(user, run_id, tail_bytes=400_000)
            if any(marker in text for marker in RESUMED):
                return text
            run = runs.get_run(user, run_id)
            assert not run.status.is_final, f"{run.status.value}: {run.status_reason}\n{text[-3000:]}"
            assert time.monotonic() < deadline, text[-3000:]
            time.sleep(1.0)
    finally:
        if not runs.get_run(user, run_id).status.is_final:
            runs.cancel(user, run_id)


def test_resume_a_cancelled_run_from_the_command_line(make_services, mlflow_server, capsys, monkeypatch):
    services = make_services()
    runs, settings = services.runs, services.settings
    local = runs.ensure_user(settings.local_username, is_admin=True)  # the CLI acts as the local admin
    model = settings.shared_models_root / "tiny-llama"
    parent = cancelled_with_checkpoint(runs, local, model, "long_run")
    assert [e.status.value for e in runs.status_events(local, parent.id)] == ["starting", "running", "cancelled"]
    checkpoint = runs.resumable_checkpoint(local, parent)
    assert checkpoint is not None and checkpoint.parent == Path(parent.output_dir)

    # who may resume what
    other = runs.ensure_user("mallory")
    with pytest.raises(NotFound):
        runs.resume(other, parent.id)
    root = runs.ensure_user("root_admin", is_admin=True)
    with pytest.raises(PortalError, match="only its owner"):
        runs.resume(root, parent.id)

    env = dict(os.environ, PORTAL_MLFLOW_TRACKING_URI=mlflow_server, PORTAL_GPUS="[]",
               PORTAL_DATA_ROOT=str(settings.data_root))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "portal.cli", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    out = cli("resume", str(parent.id))
    assert out.returncode == 0, out.stdout + out.stderr
    child_id = int(out.stdout.split()[1])
    assert f"resuming run {parent.id} from its last checkpoint" in out.stdout
    child = runs.get_run(local, child_id)
    assert child.parent_id == parent.id and child.name == "long_run_resume"
    assert f"resume_from_checkpoint: {checkpoint}" in child.config_yaml
    assert child.dataset_fingerprints == parent.dataset_fingerprints  # the parent's dataset versions
    tags = services.tracker.client.get_run(child.mlflow_run_id).data.tags
    assert tags["portal.parent_run_id"] == str(parent.id) and tags["portal.source"] == "resume"

    text = wait_for_resumed_log(runs, local, child_id)
    # the last checkpoint saved before the cancel landed: checkpoint-2 on a busy machine, a later one on a fast one
    step = int(checkpoint.name.removeprefix("checkpoint-"))
    assert f"Loading model from {checkpoint}" in text and f"global step {step}" in text

    from portal.cli import main  # `show` in this process (its output is what a user sees)

    for key in ("PORTAL_MLFLOW_TRACKING_URI", "PORTAL_GPUS", "PORTAL_DATA_ROOT"):
        monkeypatch.setenv(key, env[key])
    assert main(["show", str(child_id), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert main(["show", str(parent.id)]) == 0
    parent_shown = capsys.readouterr().out
    assert main(["show", "999999"]) == 1
    assert record["id"] == child_id and record["parent_id"] == parent.id
    assert record["events"][0]["status"] == "starting" and record["events"][-1]["status"] == "cancelled"
    assert f"{checkpoint.name}/" in parent_shown and "cancelled (requested by local)" in parent_shown
    assert "status history:" in parent_shown and "trainer_log.jsonl" in parent_shown

    # a second resume gets the next free name; cancelled at once, it saved no checkpoint: refused; so is a
    # run that has not ended
    again = runs.resume(local, parent.id)
    assert again.name == "long_run_resume2"
    runs.cancel(local, again.id)
    with pytest.raises(PortalError, match="saved no checkpoint"):
        runs.resume(local, again.id)
    with pytest.raises(PortalError, match="only a failed or cancelled run"):
        runs.resume(local, _running_stub(runs, local))


def _running_stub(runs, user) -> int:
    """A run row that is running (no job): resuming it is refused."""
    from portal.models import Run, RunStatus

    with runs.db.session() as s:
        row = Run(name="stub_running", owner_id=user.id, owner=user.username, status=RunStatus.running,
                  run_dir="/nonexistent")
        s.add(row)
        s.commit()
        s.refresh(row)
        return row.id
