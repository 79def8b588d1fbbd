"""The command line, run as a user runs it (a real process each time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="module")
def cli(tmp_path_factory, mlflow_server):
    data_root = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, PORTAL_MLFLOW_TRACKING_URI=mlflow_server, PORTAL_GPUS="[]", PORTAL_DATA_ROOT=str(data_root))

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "portal.cli", *args], capture_output=True, text=True, env=env,
                              timeout=timeout)

    run.data_root = data_root  # type: ignore[attr-defined]
    return run


@pytest.fixture(scope="module")
def demo_config(cli) -> Path:
    out = cli("demo", "--no-serve")
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])  # the config path is the last line
    assert path.is_file()
    again = cli("demo", "--no-serve")  # idempotent
    assert again.returncode == 0 and Path(again.stdout.strip().splitlines()[-1]) == path
    return path


def small(config_path: Path, tmp_path: Path, **changes) -> Path:
    config = yaml.safe_load(config_path.read_text())
    config.update({"num_train_epochs": 1.0, "max_samples": 48, "logging_steps": 2, "cutoff_len": 96})
    config.update(changes)
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_validate_exit_codes(cli, demo_config, tmp_path):
    ok = cli("validate", str(demo_config))
    assert ok.returncode == 0 and f"{demo_config}: ok" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\ndo_train: true\nmodel_name_or_path: /etc\ndataset: demo_alpaca\nlearning_rate: fast\n"
                   "hub_token: hf_x\n")
    out = cli("validate", str(demo_config), str(bad))
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert f"{demo_config}: ok" in lines
    assert any(line.startswith(f"{bad}: hub_token: not allowed") for line in lines), lines
    assert any(line.startswith(f"{bad}: model_name_or_path: ") for line in lines), lines
    assert "hf_x" not in out.stdout + out.stderr  # a secret is never echoed back
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage: [sft\n")
    out = cli("validate", str(broken))
    assert out.returncode == 1 and f"{broken}: yaml: invalid YAML at line" in out.stdout
    usage = cli("validate")
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_submit_wait_json_then_runs_logs_cancel(cli, demo_config, tmp_path):
    out = cli("submit", str(small(demo_config, tmp_path)), "--name", "cli_run", "--wait", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    run = json.loads(out.stdout)
    assert run["status"] == "succeeded" and run["name"] == "cli_run" and run["owner"] == "local"
    assert run["mlflow_run_id"] and run["final_loss"] is not None and run["finished_at"]

    listing = cli("runs", "--json")
    assert listing.returncode == 0
    rows = json.loads(listing.stdout)
    assert {"id", "name", "owner", "status", "created_at", "finished_at", "mlflow_run_id", "final_loss"} <= set(rows[0])
    assert run["id"] in [r["id"] for r in rows]
    table = cli("runs")
    assert "cli_run" in table.stdout and "succeeded" in table.stdout

    logs = cli("logs", str(run["id"]))
    assert logs.returncode == 0 and "train_loss" in logs.stdout

    cancel = cli("cancel", str(run["id"]))
    assert cancel.returncode == 1 and "already succeeded" in cancel.stderr
    # history: a note, a filtered search, and a clone on the same data that records its parent
    assert cli("note", str(run["id"]), "--note", "first CLI run", "--tags", "cli,smoke").returncode == 0
    found = json.loads(cli("runs", "--status", "succeeded", "--search", "smoke", "--json").stdout)
    assert [r["id"] for r in found] == [run["id"]] and found[0]["tags"] == ["cli", "smoke"]
    assert cli("runs", "--status", "done").returncode == 2  # a bad filter names the choices
    clone = cli("clone", str(run["id"]), "--name", "cli_clone", "--set", "learning_rate=5e-4", "--json")
    assert clone.returncode == 0, clone.stderr
    child = json.loads(clone.stdout)
    assert child["parent_id"] == run["id"] and child["dataset_fingerprints"] == run["dataset_fingerprints"]
    assert cli("cancel", str(child["id"])).returncode == 0
    missing = cli("logs", "999")
    assert missing.returncode == 1 and "run 999 not found" in missing.stderr
    assert cli("logs", "abc").returncode == 2


def test_submit_rejected_config_exits_3_and_names_the_key(cli, demo_config, tmp_path):
    out = cli("submit", str(small(demo_config, tmp_path, push_to_hub=True)))
    assert out.returncode == 3
    assert "push_to_hub: not allowed" in out.stderr


def test_serve_refuses_a_public_address_without_login(cli):
    out = cli("serve", "--host", "0.0.0.0", timeout=120)
    assert out.returncode == 2
    assert "refusing to serve on 0.0.0.0 without login" in out.stderr


def test_users_list_and_deactivate(cli):
    from portal.config import Settings
    from portal.services import build_services

    services = build_services(Settings(data_root=cli.data_root, gpus=[]), start_tracking=False)
    services.runs.ensure_user("henry")
    out = cli("users", "deactivate", "henry")
    assert out.returncode == 0 and "henry: deactivated" in out.stdout
    listing = json.loads(cli("users", "list", "--json").stdout)
    assert {"username": "henry", "is_active": False}.items() <= next(u for u in listing if u["username"] == "henry").items()
    assert cli("users", "deactivate", "nobody").returncode == 1
    assert cli("users", "activate", "henry").returncode == 0
    import socket

    from sqlmodel import select

    from portal.models import AuditEvent

    with services.db.session() as s:  # the audit log says the change came from the command line, and where
        event = s.exec(select(AuditEvent).where(AuditEvent.action == "deactivate_user",
                                                AuditEvent.target == "user:henry")).first()
    assert event is not None and event.client == f"cli@{socket.gethostname()}"


def test_datasets_add_list_and_check_failures(cli, tmp_path):
    from portal.demo import alpaca_rows

    good = tmp_path / "faq.jsonl"
    rows = alpaca_rows(30)
    good.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:2]))  # two duplicates: a warning
    out = cli("datasets", "add", str(good), "--name", "faq", "--format", "alpaca")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("faq v1: 32 rows, sha256 ")
    assert "warning: duplicates" in out.stderr
    listing = json.loads(cli("datasets", "list", "--json").stdout)
    faq = next(d for d in listing if d["name"] == "faq")
    import hashlib

    assert faq["version"] == 1 and faq["rows"] == 32 and faq["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()

    renamed = tmp_path / "renamed.csv"
    renamed.write_text("q,a\nWhat is 1+1?,2\nCapital of France?,Paris\n")
    out = cli("datasets", "add", str(renamed), "--name", "qa", "--format", "alpaca")
    assert out.returncode == 1 and "missing_columns" in out.stderr and "instruction" in out.stderr
    out = cli("datasets", "add", str(renamed), "--name", "qa", "--columns", "prompt=q,response=a,query=")
    assert out.returncode == 0, out.stderr

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c" "output": "d"}\n')
    out = cli("datasets", "add", str(broken), "--name", "broken")
    assert out.returncode == 1 and "line 2, column" in out.stderr.lower()
    assert "broken" not in [d["name"] for d in json.loads(cli("datasets", "list", "--json").stdout)]
    assert cli("datasets", "add", str(tmp_path / "missing.jsonl"), "--name", "x").returncode == 2
    out = cli("datasets", "delete", "qa")
    assert out.returncode == 0 and "qa: deleted (1 file(s) removed" in out.stdout


def test_submit_dry_run_prints_valid_kubernetes_manifests(cli, demo_config):
    from test_k8s_manifests import validate

    runs_before = json.loads(cli("runs", "--json").stdout)
    out = cli("submit", str(demo_config), "--launcher", "kubernetes", "--dry-run", "--gpus", "2")
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job"]
    for doc in docs:
        validate(doc)  # the official Kubernetes schemas
    job = docs[1]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "2"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FORCE_TORCHRUN"] == "1" and env["NPROC_PER_NODE"] == "2"
    config = yaml.safe_load(docs[0]["data"]["config.yaml"])
    assert config["dataset"] == "demo_alpaca" and "use_cpu" not in config  # the job has GPUs, this machine none

    nodes = cli("submit", str(demo_config), "--launcher", "kubernetes", "--dry-run", "--gpus", "1", "--nodes", "2")
    assert nodes.returncode == 0, nodes.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(nodes.stdout) if d]
    assert "JobSet" in kinds
    bad = cli("submit", str(demo_config), "--launcher", "kubernetes", "--dry-run", "--gpus", "0", "--nodes", "2")
    assert bad.returncode == 2 and "--gpus" in bad.stderr
    assert cli("submit", str(demo_config), "--dry-run").returncode == 2  # dry run of what? (no launcher named)
    assert json.loads(cli("runs", "--json").stdout) == runs_before  # a dry run creates no run
