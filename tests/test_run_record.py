"""A run's record: the Git commit of its config (export to a real bare repository), the
reproducibility record (run page, `show --json`), the Train form's validation defaults, and the
compare view by tokens seen — on the session's real trained run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from test_git_configs import bare_repo
from test_git_export import refs

from portal.git_configs import GitConfigs
from portal.git_export import GitExporter
from portal.models import Run, RunStatus
from portal.run_view import run_to_dict
from portal.runs import TOKENS_KEY, NotFound, PortalError

COMMIT_URL = "https://git.example/configs/-/commit/{sha}"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return bare_repo(tmp_path_factory.mktemp("record-git"))


def test_export_records_the_commit_on_the_run(trained, repo, tmp_path_factory):
    from portal.reproducibility import record_markdown
    from portal.ui.runs import run_details

    services, alice, run = trained["services"], trained["user"], trained["run"]
    runs = services.runs
    settings = services.settings.model_copy(update={"git_url": str(repo), "git_commit_url_template": COMMIT_URL})
    git = GitConfigs(runs, GitExporter(settings, tmp_path_factory.mktemp("record-cache")))
    mallory = runs.ensure_user("mallory_record")
    before = runs.get_run(alice, run.id).git_commit
    with pytest.raises(NotFound):
        git.export_run(mallory, run.id)
    with pytest.raises(NotFound):
        runs.record_git_commit(mallory, run.id, "0" * 40, "main", "x.yaml", None)
    assert runs.get_run(alice, run.id).git_commit == before  # nothing recorded by another user

    result = git.export_run(alice, run.id)
    row = runs.get_run(alice, run.id)
    assert row.git_commit == result.sha == refs(repo)[f"refs/heads/{result.branch}"]
    assert (row.git_branch, row.git_path) == (result.branch, result.path)
    assert row.git_commit_url == COMMIT_URL.format(sha=result.sha)
    out = run_to_dict(row, None)  # GET /api/runs/{id} and --json
    assert out["git_commit"] == result.sha and out["git_commit_url"] == row.git_commit_url
    assert out["git_path"] == result.path and out["git_branch"] == result.branch
    page = run_details(row, None)
    assert f"[`{result.sha[:12]}`]({row.git_commit_url})" in page and result.path in page
    rec = runs.reproducibility(alice, run.id)
    assert rec["git"] == {"commit": result.sha, "branch": result.branch, "path": result.path,
                          "url": row.git_commit_url}
    assert f"]({row.git_commit_url})" in record_markdown(rec)
    # exported again unchanged: the same commit stays recorded
    again = git.export_run(alice, run.id)
    assert again.unchanged and runs.get_run(alice, run.id).git_commit == result.sha
    with pytest.raises(NotFound):
        runs.reproducibility(mallory, run.id)


def test_reproducibility_record_of_a_trained_run(trained):
    import portal.reproducibility as reproducibility
    from portal.reproducibility import record_markdown, record_rows

    services, alice, run = trained["services"], trained["user"], trained["run"]
    runs = services.runs
    rec = runs.reproducibility(alice, run.id)
    assert rec["seed"] == 42 and "seed: 42" in run.config_yaml  # the form's default, written in the config
    assert rec["config_sha256"] == run.config_sha256 and len(rec["config_sha256"]) == 64
    [data] = rec["datasets"]
    assert data["name"] == "demo_alpaca" and len(data["sha256"]) == 64  # a shared dataset: no version, no row count
    software = rec["software"]
    assert rec["software_source"] == "run" and software["llamafactory"] == "0.9.5"
    assert software["torch"].startswith("2.") and software["transformers"] and software["peft"]
    assert rec["job_environment"] == f"Python environment {sys.prefix} (Python {sys.version.split()[0]})"
    assert rec["parent"] is None and rec["launcher"] == "local"
    # the same versions as the MLflow params logged at submit
    params = services.tracker.client.get_run(run.mlflow_run_id).data.params
    assert all(params[f"env.{name}"] == software[name] for name in ("llamafactory", "transformers", "torch", "peft"))
    rows = dict(record_rows(rec))
    assert rows["Seed"] == "42" and "llamafactory 0.9.5" in rows["Software"] and "sha256 " in rows["Dataset demo_alpaca"]
    assert record_markdown(rec).startswith("#### Reproducibility")

    # a run made before migration 0011 (no environment on its row): read back from its MLflow params
    with services.db.session() as s:
        old = Run(name="old_env", owner_id=alice.id, owner="alice", status=RunStatus.succeeded, run_dir="/nonexistent",
                  mlflow_run_id=run.mlflow_run_id, config_yaml="stage: sft\nseed: 7\n", parent_id=run.id,
                  kind="eval")
        s.add(old)
        s.commit()
        s.refresh(old)
    reproducibility._mlflow_params.clear()
    rec = runs.reproducibility(alice, old.id)
    assert rec["software_source"] == "mlflow" and rec["software"]["llamafactory"] == "0.9.5"
    assert rec["seed"] == 7 and rec["parent"] == {"id": run.id, "relation": "evaluates"}
    assert "(from the MLflow params)" in dict(record_rows(rec))["Software"]


def test_record_relations_and_kubernetes_image(make_services):
    services = make_services()
    runs = services.runs
    ann = runs.ensure_user("ann_record")
    made = {}
    with services.db.session() as s:
        for name, kind, config, launcher in [
            ("clone", "train", "stage: sft\n", "local"),
            ("resumed", "train", "stage: sft\nresume_from_checkpoint: /x/output/checkpoint-4\n", "local"),
            ("merged", "export", "", "local"), ("on_k8s", "train", "stage: sft\n", "kubernetes"),
        ]:
            row = Run(name=name, owner_id=ann.id, owner=ann.username, kind=kind, config_yaml=config, parent_id=1,
                      launcher=launcher, run_dir="/nonexistent")
            s.add(row)
            s.commit()
            s.refresh(row)
            made[name] = row.id
    relation = {name: runs.reproducibility(ann, rid)["parent"]["relation"] for name, rid in made.items()}
    assert relation == {"clone": "cloned from", "resumed": "resumed from", "merged": "merged from",
                        "on_k8s": "cloned from"}
    k8s = runs.reproducibility(ann, made["on_k8s"])
    assert k8s["job_environment"].startswith(f"image {services.settings.kubernetes.image}")
    assert k8s["software_source"] is None and k8s["seed"] == 42
    assert runs.reproducibility(ann, made["clone"])["job_environment"] is None


def test_cli_git_export_run_and_show_json(trained, repo, mlflow_server):
    services, run = trained["services"], trained["run"]
    env = dict(os.environ, PORTAL_DATA_ROOT=str(services.settings.data_root), PORTAL_MLFLOW_TRACKING_URI=mlflow_server,
               PORTAL_GPUS="[]", PORTAL_GIT_URL=str(repo), PORTAL_GIT_COMMIT_URL_TEMPLATE=COMMIT_URL)
    out = subprocess.run([sys.executable, "-m", "portal.cli", "git-export", "--run", str(run.id)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    sha = out.stdout.strip()
    assert sha in refs(repo).values()
    shown = subprocess.run([sys.executable, "-m", "portal.cli", "show", str(run.id), "--json"], capture_output=True,
                           text=True, env=env, timeout=300)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["git_commit"] == sha and data["git_commit_url"] == COMMIT_URL.format(sha=sha)
    rec = data["reproducibility"]
    assert rec["git"]["commit"] == sha and rec["seed"] == 42 and rec["software"]["llamafactory"] == "0.9.5"
    assert rec["datasets"][0]["name"] == "demo_alpaca"
    usage = subprocess.run([sys.executable, "-m", "portal.cli", "git-export"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert usage.returncode == 2 and "FILE or --run" in usage.stderr


# ---- the Train form's validation defaults -------------------------------------------------------

def test_form_defaults_hold_out_data_and_log_eval_loss(trained):
    from llamaboard_ext.compile import args_to_form, form_to_args, yaml_to_args
    from llamaboard_ext.form import form_defaults

    defaults = form_defaults()
    assert defaults["train.val_size"] == 0.1 and json.loads(defaults["train.extra_args"])["seed"] == 42
    services, alice, run = trained["services"], trained["user"], trained["run"]
    config = yaml.safe_load(run.config_yaml)
    assert (config["val_size"], config["eval_strategy"], config["seed"]) == (0.1, "steps", 42)
    assert config["include_num_input_tokens_seen"] is True
    keys = {p.key for p in services.runs.metrics(alice, run.id)}
    assert {"loss", "eval_loss"} <= keys  # the default run is evaluated

    # a file without val_size keeps holding out nothing when loaded into the form
    base = {"stage": "sft", "do_train": True, "model_name_or_path": "/m", "dataset": "d", "output_dir": "o",
            "finetuning_type": "lora"}
    loaded = args_to_form(yaml_to_args(yaml.safe_dump(base)))
    assert loaded.values["train.val_size"] == 0
    assert "val_size" not in form_to_args(loaded.values, defaults)
    # extra args naming an eval_dataset: the default share steps aside (LLaMA-Factory refuses both)
    values = {"top.model_path": "/m", "train.dataset": ["d"], "train.output_dir": "o",
              "train.extra_args": '{"eval_dataset": "held_out"}'}
    args = form_to_args(values, defaults)
    assert "val_size" not in args and args["eval_dataset"] == "held_out" and args["eval_strategy"] == "steps"
    args = form_to_args({**values, "train.extra_args": '{"streaming": true, "max_steps": 10}'}, defaults)
    assert not {"val_size", "eval_strategy", "eval_steps"} & set(args)


# ---- compare by tokens ---------------------------------------------------------------------------

def test_compare_by_tokens_seen(trained):
    from portal.ui.runs import compare_curves

    services, alice, run = trained["services"], trained["user"], trained["run"]
    runs = services.runs
    counts = runs.token_counts(alice, run.id)
    assert counts and all(v > 0 for v in counts.values()), f"the trainer logged no {TOKENS_KEY}"
    steps = sorted(counts)
    assert [counts[s] for s in steps] == sorted(counts[s] for s in steps)  # grows with the steps
    with services.db.session() as s:
        # a second row over the same MLflow run (one real training is all the session has), and one without
        twin = Run(name="twin", owner_id=alice.id, owner="alice", status=RunStatus.succeeded, run_dir="/nonexistent",
                   mlflow_run_id=run.mlflow_run_id, config_yaml=run.config_yaml)
        bare = Run(name="no_mlflow", owner_id=alice.id, owner="alice", status=RunStatus.failed, run_dir="/nonexistent")
        s.add(twin)
        s.add(bare)
        s.commit()
        s.refresh(twin)
        s.refresh(bare)

    by_tokens = runs.compare(alice, [run.id, twin.id], x_axis="tokens")
    assert by_tokens.x_axis == "tokens" and not by_tokens.notes
    points = by_tokens.points(run.id)
    losses = [p for p in runs.metrics(alice, run.id) if p.key in ("loss", "eval_loss")]
    assert len(points) == len(losses)
    for (key, x, value), p in zip(points, losses):
        assert key == p.key and value == p.value
        if p.step in counts:
            assert x == counts[p.step]
    frame = compare_curves(by_tokens)
    assert list(frame.columns) == ["x", "loss", "series"] and frame["x"].max() == pytest.approx(max(
        x for _, x, _ in points))

    by_step = runs.compare(alice, [run.id, twin.id])
    assert by_step.x_axis == "step" and [x for _, x, _ in by_step.points(run.id)] == [float(p.step) for p in losses]

    fallback = runs.compare(alice, [run.id, bare.id], x_axis="tokens")
    assert fallback.x_axis == "step" and f"#{bare.id}" in fallback.notes[0] and "by step" in fallback.notes[0]
    with pytest.raises(PortalError, match="x axis"):
        runs.compare(alice, [run.id, twin.id], x_axis="time")
    bob = runs.ensure_user("bob_tokens")
    with pytest.raises(NotFound):
        runs.compare(bob, [run.id, twin.id], x_axis="tokens")
    with pytest.raises(NotFound):
        runs.token_counts(bob, run.id)
