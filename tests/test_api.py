"""API tokens, the HTTP API and the CLI's --server mode, against the real portal behind OIDC login
(a real OIDC provider over HTTP), with real trainings of the tiny model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import _ServerThread, free_port, install_assets
from sqlmodel import select
from test_auth import idp, login  # noqa: F401  (idp is a fixture)

from portal.models import ApiToken, AuditEvent, utcnow
from portal.tokens import TokenError, token_digest


@pytest.fixture(scope="module")
def api_portal(tmp_path_factory, mlflow_server, demo_assets, idp):  # noqa: F811
    from portal.config import Settings
    from portal.services import build_services
    from portal.web import create_app

    settings = Settings(data_root=tmp_path_factory.mktemp("api"), mlflow_tracking_uri=mlflow_server, gpus=[],
                        auth_mode="oidc", oidc_issuer=idp, oidc_client_id="portal", oidc_client_secret="s3cret",
                        oidc_admin_group="ml-admins", dispatch_interval_seconds=0.5)
    model_dir = install_assets(settings, demo_assets)
    services = build_services(settings)
    app = create_app(services)  # supervised: submitted runs really train
    alice = services.runs.ensure_user("alice")
    carol = services.runs.ensure_user("carol")
    alice_token, _ = services.tokens.create(alice, "ci")
    carol_token, _ = services.tokens.create(carol, "laptop")
    with _ServerThread(app, free_port()) as server:
        yield {"url": server.url, "services": services, "model_dir": model_dir, "alice": alice, "carol": carol,
               "alice_token": alice_token, "carol_token": carol_token}
    services.runs.stop_supervisor()
    services.runs.stop_active_jobs(2)


def tiny_config(model_dir, name: str, **changes) -> str:
    config = {"stage": "sft", "do_train": True, "model_name_or_path": str(model_dir), "finetuning_type": "lora",
              "template": "default", "dataset": "demo_alpaca", "cutoff_len": 96, "max_samples": 48,
              "num_train_epochs": 1.0, "per_device_train_batch_size": 8, "learning_rate": 1.0e-3,
              "logging_steps": 2, "save_steps": 500, "lora_target": "all", "output_dir": name}
    config.update(changes)
    return yaml.safe_dump(config)


def api(portal, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=portal["url"] + "/api", headers=headers, timeout=120)


# ---- tokens ---------------------------------------------------------------------------------

def test_a_token_is_shown_once_and_kept_only_as_a_hash(api_portal):
    services, alice = api_portal["services"], api_portal["alice"]
    token, row = services.tokens.create(alice, "hash-check", expires_days=30)
    assert token.startswith("lbp_") and row.prefix == token[:10]
    with services.db.session() as s:
        stored = s.get(ApiToken, row.id)
        assert stored.token_sha256 == token_digest(token)
        assert all(token not in str(value) for value in stored.model_dump().values())
    assert services.tokens.authenticate(token).username == "alice"
    assert services.tokens.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    services.tokens.revoke(alice, row.id)
    assert services.tokens.authenticate(token) is None


def test_expired_tokens_and_deactivated_users_do_not_sign_in(api_portal):
    services = api_portal["services"]
    dave = services.runs.ensure_user("dave")
    token, row = services.tokens.create(dave, "short", expires_days=1)
    assert services.tokens.authenticate(token).username == "dave"
    with services.db.session() as s:
        stored = s.get(ApiToken, row.id)
        stored.expires_at = utcnow() - timedelta(seconds=1)
        s.add(stored)
        s.commit()
    assert services.tokens.authenticate(token) is None
    token2, _ = services.tokens.create(dave, "second")
    with services.db.session() as s:
        user = s.get(type(dave), dave.id)
        user.is_active = False
        s.add(user)
        s.commit()
    assert services.tokens.authenticate(token2) is None


def test_tokens_belong_to_their_user(api_portal):
    services, alice, carol = api_portal["services"], api_portal["alice"], api_portal["carol"]
    _, row = services.tokens.create(alice, "not-carols")
    with pytest.raises(TokenError, match="not found"):
        services.tokens.revoke(carol, row.id)
    with pytest.raises(PermissionError):
        services.tokens.create(alice, "made-by-carol", actor=carol)
    assert row.id not in [t.id for t in services.tokens.list(carol)]
    with pytest.raises(TokenError, match="token name"):
        services.tokens.create(alice, "  ")
    with services.db.session() as s:
        actions = [e.action for e in s.exec(select(AuditEvent).where(AuditEvent.username == "alice")).all()]
    assert "token_create" in actions


# ---- the HTTP API ----------------------------------------------------------------------------

def test_no_token_or_a_bad_one_gets_401_not_a_login_page(api_portal):
    for token in (None, "lbp_" + "x" * 43, "not-even-a-token"):
        r = api(api_portal, token).get("/runs")
        assert r.status_code == 401, (token, r.status_code)
        assert "set-cookie" not in {k.lower() for k in r.headers}
    bad = api(api_portal, "lbp_" + "x" * 43).get("/runs")
    assert "unknown, revoked or expired" in bad.json()["detail"] and bad.headers["www-authenticate"] == "Bearer"


def test_a_token_does_not_open_the_browser_ui(api_portal):
    r = httpx.get(api_portal["url"] + "/ui/", headers={"Authorization": f"Bearer {api_portal['alice_token']}",
                                                        "Accept": "text/html"})
    assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_validate_names_the_bad_keys(api_portal):
    client = api(api_portal, api_portal["alice_token"])
    ok = client.post("/validate", json={"yaml": tiny_config(api_portal["model_dir"], "valid_one")}).json()
    assert ok == {"valid": True, "problems": {}, "name": "valid_one"}
    bad = client.post("/validate", json={"yaml": tiny_config(api_portal["model_dir"], "x", learning_rate="fast")})
    assert bad.json()["valid"] is False and set(bad.json()["problems"]) == {"learning_rate"}
    secret = client.post("/validate", json={"yaml": tiny_config(api_portal["model_dir"], "x", hub_token="hf_secret")})
    assert "hub_token" in secret.json()["problems"] and "hf_secret" not in secret.text
    bomb = "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n"
    assert "anchors and aliases" in client.post("/validate", json={"yaml": bomb}).json()["problems"]["yaml"]
    huge = client.post("/validate", json={"yaml": "stage: sft\n" + "#" * 1_100_000})
    assert "limit" in huge.json()["problems"]["yaml"]


def test_submit_follow_and_isolation_over_http(api_portal):
    alice, carol = api(api_portal, api_portal["alice_token"]), api(api_portal, api_portal["carol_token"])
    created = alice.post("/runs", json={"yaml": tiny_config(api_portal["model_dir"], "api_run")})
    assert created.status_code == 201, created.text
    run = created.json()
    assert run["owner"] == "alice" and run["name"] == "api_run"
    rejected = alice.post("/runs", json={"yaml": tiny_config(api_portal["model_dir"], "api_run")})
    assert rejected.status_code == 422 and "already exists" in rejected.json()["problems"]["output_dir"]

    ended = api_portal["services"].runs.wait(api_portal["alice"], run["id"], timeout=300, interval=0.5)
    assert ended.status.value == "succeeded"
    got = alice.get(f"/runs/{run['id']}").json()
    assert got["status"] == "succeeded" and got["mlflow_url"] and got["final_loss"] is not None
    assert got["metrics"]["loss"]["points"] >= 1
    log = alice.get(f"/runs/{run['id']}/logs")
    assert log.status_code == 200 and int(log.headers["x-log-offset"]) > 0 and log.text
    rest = alice.get(f"/runs/{run['id']}/logs", params={"offset": log.headers["x-log-offset"]})
    assert rest.text == "" and rest.headers["x-log-offset"] == log.headers["x-log-offset"]
    assert [r["id"] for r in alice.get("/runs").json()["runs"]] == [run["id"]]

    # carol sees none of it, and cannot cancel it
    assert carol.get("/runs").json() == {"total": 0, "runs": []}
    for method, path in (("GET", f"/runs/{run['id']}"), ("GET", f"/runs/{run['id']}/logs"),
                         ("POST", f"/runs/{run['id']}/cancel")):
        assert carol.request(method, path).status_code == 404, path
    with api_portal["services"].db.session() as s:
        denied = s.exec(select(AuditEvent).where(AuditEvent.username == "carol", AuditEvent.action == "denied")).all()
    assert denied and all(e.client == "127.0.0.1" for e in denied)


def _alice_succeeded_run(api_portal):
    """A succeeded training run of alice's: the one an earlier test trained, or a new one."""
    from portal.run_query import RunQuery

    runs, alice = api_portal["services"].runs, api_portal["alice"]
    done = [r for r in runs.search_runs(alice, RunQuery(status=["succeeded"], limit=50))[0] if r.kind == "train"]
    if done:
        return done[0]
    run = runs.submit_yaml(alice, tiny_config(api_portal["model_dir"], "files_api_run"), source="api")
    run = runs.wait(alice, run.id, timeout=300, interval=0.5)
    assert run.status.value == "succeeded", runs.logs(alice, run.id)[-2000:]
    return run


def test_status_history_whole_log_and_files_over_http(api_portal):
    run = _alice_succeeded_run(api_portal)
    alice, carol = api(api_portal, api_portal["alice_token"]), api(api_portal, api_portal["carol_token"])
    got = alice.get(f"/runs/{run.id}").json()
    assert [e["status"] for e in got["events"]] == ["starting", "running", "succeeded"]
    assert got["events"][1]["reason"] == "running on the CPU" and got["events"][0]["at"] <= got["events"][2]["at"]
    assert all(r["events"] is None for r in alice.get("/runs").json()["runs"])  # lists leave the history out

    whole = alice.get(f"/runs/{run.id}/logs", params={"download": 1})
    on_disk = (Path(run.run_dir) / "job.log").read_bytes()
    assert whole.status_code == 200 and whole.content == on_disk and int(whole.headers["x-log-offset"]) == len(on_disk)
    assert whole.headers["content-type"].startswith("text/plain")
    assert whole.headers["content-disposition"].startswith(f'attachment; filename="run-{run.id}-{run.name}.log"')

    listed = alice.get(f"/runs/{run.id}/artifacts").json()
    by_path = {a["path"]: a for a in listed["artifacts"]}
    assert listed["truncated"] is False and by_path["adapter_config.json"]["downloadable"] is True
    assert {"trainer_log.jsonl", "all_results.json", "adapter_model.safetensors"} <= set(by_path)
    one = alice.get(f"/runs/{run.id}/artifacts/adapter_config.json")
    assert one.status_code == 200 and one.json()["peft_type"] == "LORA"
    assert one.headers["content-disposition"].startswith('attachment; filename="adapter_config.json"')
    for bad in ("%2E%2E/config.yaml", "%2Fetc%2Fpasswd", "..%2F..%2F..%2Fetc%2Fpasswd", "missing.json"):
        refused = alice.get(f"/runs/{run.id}/artifacts/{bad}")
        assert refused.status_code == 404 and "root:" not in refused.text, bad

    resumed = alice.post(f"/runs/{run.id}/resume")  # a succeeded run: nothing to resume
    assert resumed.status_code == 409 and "only a failed or cancelled run" in resumed.json()["detail"]

    # carol reaches none of it: 404, as for a run that does not exist
    for method, path in (("GET", f"/runs/{run.id}/logs?download=1"), ("GET", f"/runs/{run.id}/artifacts"),
                         ("GET", f"/runs/{run.id}/artifacts/adapter_config.json"),
                         ("POST", f"/runs/{run.id}/resume")):
        answer = carol.request(method, path)
        assert answer.status_code == 404 and "peft" not in answer.text, path
    paths = alice.get("/openapi.json").json()["paths"]
    assert {"/api/runs/{run_id}/artifacts", "/api/runs/{run_id}/artifacts/{path}", "/api/runs/{run_id}/resume"} <= set(
        paths)


def test_the_openai_gateway_takes_tokens_too(api_portal):
    r = httpx.get(api_portal["url"] + "/v1/models", headers={"Authorization": f"Bearer {api_portal['carol_token']}"})
    assert r.status_code == 200 and r.json()["data"] == []
    assert httpx.get(api_portal["url"] + "/v1/models").status_code == 401


def test_openapi_documents_the_api(api_portal):
    paths = httpx.get(api_portal["url"] + "/api/openapi.json", headers={
        "Authorization": f"Bearer {api_portal['alice_token']}"}).json()["paths"]
    assert {"/api/runs", "/api/runs/{run_id}", "/api/runs/{run_id}/logs", "/api/runs/{run_id}/cancel",
            "/api/validate"} <= set(paths)


def test_a_session_still_works_on_the_api(api_portal):
    browser = login(api_portal["url"], "bob-sub")  # alice here was made by the fixture, not by a sign-in
    me = browser.get("/api/me")
    assert me.status_code == 200 and me.json()["username"] == "bob", me.text


# ---- the CLI against the portal ------------------------------------------------------------

def cli(portal, *args: str, token_env: str = "CI_PORTAL_TOKEN", token: str | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PORTAL_DATA_ROOT", None)  # remote commands need no local portal at all
    if token is not None:
        env[token_env] = token
    return subprocess.run([sys.executable, "-m", "portal.cli", *args, "--server", portal["url"],
                           "--token-env", token_env], capture_output=True, text=True, env=env, timeout=timeout)


def test_cli_submit_wait_succeeds_with_exit_0(api_portal, tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text(tiny_config(api_portal["model_dir"], "from_ci"))
    out = cli(api_portal, "submit", str(config), "--wait", "--timeout", "280", token=api_portal["alice_token"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "from_ci) succeeded" in out.stdout and "http" in out.stdout.splitlines()[-1]  # the MLflow link
    assert api_portal["alice_token"] not in out.stdout + out.stderr
    listed = cli(api_portal, "runs", token=api_portal["alice_token"])
    assert listed.returncode == 0 and "from_ci" in listed.stdout
    run_id = [line.split()[0] for line in listed.stdout.splitlines() if "from_ci" in line][0]
    follow = cli(api_portal, "logs", run_id, "--follow", token=api_portal["alice_token"])
    whole_log = api_portal["services"].runs.log_since(api_portal["alice"], int(run_id), 0)[0]
    # (text mode reads progress bars' carriage returns as line ends)
    assert follow.returncode == 0 and follow.stdout == whole_log.replace("\r\n", "\n").replace("\r", "\n")


def test_cli_rejected_config_exits_3_naming_the_key(api_portal, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(tiny_config(api_portal["model_dir"], "bad_ci", learning_rate="fast"))
    out = cli(api_portal, "submit", str(config), token=api_portal["alice_token"])
    assert out.returncode == 3, out.stdout + out.stderr
    assert f"{config}: learning_rate:" in out.stderr
    valid = cli(api_portal, "validate", str(config), token=api_portal["alice_token"])
    assert valid.returncode == 1 and f"{config}: learning_rate:" in valid.stdout


def test_cli_timeout_exits_4_and_cancel_stops_the_run(api_portal, tmp_path):
    config = tmp_path / "slow.yaml"
    config.write_text(tiny_config(api_portal["model_dir"], "slow_ci", num_train_epochs=50.0, max_samples=200))
    out = cli(api_portal, "submit", str(config), "--wait", "--timeout", "2", token=api_portal["alice_token"])
    assert out.returncode == 4, out.stdout + out.stderr
    run_id = out.stdout.split()[1]
    cancelled = cli(api_portal, "cancel", run_id, token=api_portal["alice_token"])
    assert cancelled.returncode == 0 and "cancel" in cancelled.stdout
    assert api_portal["services"].runs.get_run(api_portal["alice"], int(run_id)).status.value in ("cancelled",)


def test_cli_without_a_token_or_with_a_wrong_one(api_portal, tmp_path):
    config = tmp_path / "any.yaml"
    config.write_text(tiny_config(api_portal["model_dir"], "any_ci"))
    missing = cli(api_portal, "submit", str(config), token_env="NO_SUCH_VARIABLE_SET")
    assert missing.returncode == 2 and "NO_SUCH_VARIABLE_SET" in missing.stderr
    wrong = cli(api_portal, "submit", str(config), token="lbp_" + "y" * 43)
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr and "y" * 43 not in wrong.stderr


def test_admin_makes_a_token_from_the_command_line(api_portal):
    root = str(api_portal["services"].settings.data_root)
    env = dict(os.environ, PORTAL_DATA_ROOT=root, PORTAL_MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    made = subprocess.run([sys.executable, "-m", "portal.cli", "tokens", "create", "carol", "--name", "jenkins"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    r = httpx.get(api_portal["url"] + "/api/me", headers={"Authorization": f"Bearer {token}"})
    assert r.json()["username"] == "carol"
    listed = subprocess.run([sys.executable, "-m", "portal.cli", "tokens", "list", "carol"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert "jenkins" in listed.stdout and token not in listed.stdout


# ---- evaluate, merge, resume, show and registry aliases from scripts ---------------------------

def _admin_token(api_portal) -> str:
    services = api_portal["services"]
    if "admin_token" not in api_portal:
        root = services.runs.ensure_user("registry_root", is_admin=True)
        api_portal["admin_token"] = services.tokens.create(root, "release-pipeline")[0]
    return api_portal["admin_token"]


def test_evaluate_merge_resume_and_alias_refusals_over_http(api_portal):
    run = _alice_succeeded_run(api_portal)
    alice, carol = api(api_portal, api_portal["alice_token"]), api(api_portal, api_portal["carol_token"])
    admin = api(api_portal, _admin_token(api_portal))
    before = {r.id for r in api_portal["services"].runs.list_runs(api_portal["alice"])}

    # another user's run is not found, whatever the verb
    for method, path, body in (("POST", f"/runs/{run.id}/evaluate", {"datasets": ["demo_alpaca"], "max_samples": 4}),
                               ("POST", f"/runs/{run.id}/merge", {"name": "carols-copy"}),
                               ("GET", f"/runs/{run.id}/evaluations", None),
                               ("POST", f"/runs/{run.id}/resume", None)):
        answer = carol.request(method, path, json=body)
        assert answer.status_code == 404 and answer.json()["detail"] == f"run {run.id} not found", path
    # refusals name the reason: a bad value (422, per key), a run in the wrong state (409)
    bad = alice.post(f"/runs/{run.id}/evaluate", json={"datasets": ["demo_alpaca"], "max_samples": 0,
                                                       "max_new_tokens": 99999})
    assert bad.status_code == 422 and set(bad.json()["problems"]) == {"max_samples", "max_new_tokens"}
    bad_name = alice.post(f"/runs/{run.id}/evaluate", json={"name": "../escape"})
    assert bad_name.status_code == 422 and "not allowed" in bad_name.json()["problems"]["name"]
    unknown = alice.post(f"/runs/{run.id}/evaluate", json={"datasets": ["no_such_dataset"], "max_samples": 4})
    assert unknown.status_code == 422 and "no_such_dataset" in unknown.text
    assert alice.post(f"/runs/{run.id}/merge", json={"name": "no spaces"}).status_code == 422
    resumed = alice.post(f"/runs/{run.id}/resume", json={"name": "again"})
    assert resumed.status_code == 409 and "only a failed or cancelled run" in resumed.json()["detail"]
    assert alice.get(f"/runs/{run.id}/evaluations").json() == {"evaluations": []}
    assert {r.id for r in api_portal["services"].runs.list_runs(api_portal["alice"])} == before  # nothing made

    # aliases: admins only (403 before anything else), a version that exists, a known alias
    for client in (alice, carol):
        denied = client.post("/models/anything/versions/1/alias", json={"alias": "production"})
        assert denied.status_code == 403 and "only admins" in denied.json()["detail"]
    assert admin.post("/models/no-such-model/versions/1/alias", json={"alias": "candidate"}).status_code == 404
    assert admin.post("/models/no-such-model/versions/1/alias", json={"alias": "latest"}).status_code == 422

    schema = alice.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"/api/runs/{run_id}/evaluate", "/api/runs/{run_id}/merge", "/api/runs/{run_id}/evaluations",
            "/api/models/{name}/versions/{version}/alias"} <= set(paths)
    evaluate = paths["/api/runs/{run_id}/evaluate"]["post"]
    assert {"201", "404", "409", "422"} <= set(evaluate["responses"])
    assert evaluate["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith("/RunOut")
    assert {"datasets", "max_samples", "max_new_tokens", "predict_with_generate"} <= set(
        schema["components"]["schemas"]["EvaluateIn"]["properties"])
    assert schema["components"]["schemas"]["AliasIn"]["properties"]["alias"]["enum"] == ["candidate", "production"]
    assert {"403", "404"} <= set(paths["/api/models/{name}/versions/{version}/alias"]["post"]["responses"])

    # the same through the CLI's --server mode, with the same exit codes as here
    rid = str(run.id)
    out = cli(api_portal, "eval", rid, "--dataset", "demo_alpaca", token=api_portal["carol_token"])
    assert out.returncode == 1 and f"run {run.id} not found (HTTP 404)" in out.stderr
    out = cli(api_portal, "merge", rid, token=api_portal["carol_token"])
    assert out.returncode == 1 and "HTTP 404" in out.stderr
    out = cli(api_portal, "eval", rid, "--max-samples", "0", token=api_portal["alice_token"])
    assert out.returncode == 3 and "max_samples: choose 1 to" in out.stderr
    out = cli(api_portal, "resume", rid, token=api_portal["alice_token"])
    assert out.returncode == 1 and "only a failed or cancelled run" in out.stderr and "HTTP 409" in out.stderr
    out = cli(api_portal, "models", "alias", "anything", "1", "production", token=api_portal["carol_token"])
    assert out.returncode == 1 and "only admins set registry aliases (HTTP 403)" in out.stderr
    shown = cli(api_portal, "show", rid, token=api_portal["alice_token"])
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"run {run.id} ({run.name}) succeeded\n") and "status history:" in shown.stdout
    assert "adapter_model.safetensors" in shown.stdout and "running on the CPU" in shown.stdout
    as_json = json.loads(cli(api_portal, "show", rid, "--json", token=api_portal["alice_token"]).stdout)
    assert as_json["kind"] == "train" and [e["status"] for e in as_json["events"]][-1] == "succeeded"
    assert "adapter_config.json" in [a["path"] for a in as_json["artifacts"]]
    assert cli(api_portal, "show", rid, token=api_portal["carol_token"]).returncode == 1


def test_cli_eval_and_merge_wait_then_an_admin_sets_the_alias(api_portal):
    run = _alice_succeeded_run(api_portal)
    alice, carol = api(api_portal, api_portal["alice_token"]), api(api_portal, api_portal["carol_token"])
    rid, token = str(run.id), api_portal["alice_token"]

    out = cli(api_portal, "eval", rid, "--dataset", "demo_alpaca", "--max-samples", "4", "--max-new-tokens", "4",
              "--wait", "--timeout", "280", token=token)
    assert out.returncode == 0, out.stdout + out.stderr
    first, *rest = out.stdout.splitlines()
    assert first.endswith(f"evaluating run {run.id} on demo_alpaca") and "succeeded" in rest[0]
    assert any(line.split()[0] == "predict_bleu-4" for line in rest[1:]), out.stdout
    assert any(line.strip().startswith("predictions: ") and line.endswith("/generated_predictions.jsonl")
               for line in rest), out.stdout
    eval_id = int(first.split()[1])
    listed = alice.get(f"/runs/{run.id}/evaluations").json()["evaluations"]
    assert [e["run"]["id"] for e in listed] == [eval_id] and listed[0]["run"]["kind"] == "eval"
    assert listed[0]["run"]["parent_id"] == run.id and "predict_rouge-l" in listed[0]["metrics"]
    assert listed[0]["predictions"] == "generated_predictions.jsonl"
    assert carol.get(f"/runs/{run.id}/evaluations").status_code == 404
    shown = json.loads(cli(api_portal, "show", str(eval_id), "--json", token=token).stdout)
    assert shown["kind"] == "eval" and "generated_predictions.jsonl" in [a["path"] for a in shown["artifacts"]]
    refused = alice.post(f"/runs/{eval_id}/merge", json={})
    assert refused.status_code == 409 and "is an eval run" in refused.json()["detail"]

    out = cli(api_portal, "merge", rid, "--name", "alice-api-ci", "--wait", "--timeout", "280", "--json",
              token=token)
    assert out.returncode == 0, out.stdout + out.stderr
    merged = json.loads(out.stdout)
    assert merged["kind"] == "export" and merged["status"] == "succeeded" and merged["parent_id"] == run.id
    assert merged["registered_model"] == "alice-api-ci" and merged["registered_version"] == "1"

    admin_token = _admin_token(api_portal)
    out = cli(api_portal, "models", "alias", "alice-api-ci", "1", "candidate", token=token)
    assert out.returncode == 1 and "HTTP 403" in out.stderr  # the model's owner is not an admin
    out = cli(api_portal, "models", "alias", "alice-api-ci", "1", "candidate", token=admin_token)
    assert out.returncode == 0 and out.stdout.strip() == "alice-api-ci@candidate -> version 1", out.stderr
    client = api_portal["services"].runs.tracker.client
    assert client.get_model_version_by_alias("alice-api-ci", "candidate").version == "1"
    assert admin_token not in out.stdout + out.stderr


# ---- the Account tab -----------------------------------------------------------------------

@pytest.mark.browser
def test_account_tab_makes_and_revokes_a_token(portal):
    from conftest import ARTIFACTS, launch_chromium
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        try:
            page.goto(portal["url"] + "/ui/")
            page.get_by_role("tab", name="Account").click()
            expect(page.locator("#token-usage")).to_contain_text(f"{portal['url']}/api/runs", timeout=30_000)
            page.locator("#token-name input, #token-name textarea").first.fill("browser-made")
            page.locator("#token-create").click()
            shown = page.locator("#new-token textarea, #new-token input").first
            expect(shown).to_have_value(re.compile(r"^lbp_"), timeout=30_000)
            token = shown.input_value()
            table = page.locator("#token-list")
            expect(table).to_contain_text("browser-made")
            expect(table).to_contain_text(token[:10])
            expect(table).not_to_contain_text(token)  # the list shows only its start
            page.screenshot(path=str(ARTIFACTS / "account-tab.png"), full_page=True)

            me = httpx.get(portal["url"] + "/api/me", headers={"Authorization": f"Bearer {token}"})
            assert me.status_code == 200 and me.json()["username"] == "local"

            row = [t for t in portal["services"].tokens.list(portal["services"].runs.user("local"))
                   if t.name == "browser-made"][0]
            page.locator("#token-revoke-id input").fill(str(row.id))
            page.locator("#token-revoke").click()
            expect(table).to_contain_text("revoked", timeout=30_000)
            expect(page.locator("#new-token")).to_be_hidden()
        finally:
            browser.close()
    assert httpx.get(portal["url"] + "/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_loopback_without_login_checks_only_portal_tokens(portal):
    services = portal["services"]
    local = services.runs.user("local")
    token, row = services.tokens.create(local, "to-revoke")
    url = portal["url"] + "/v1/models"
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert httpx.get(url, headers={"Authorization": "Bearer EMPTY"}).status_code == 200  # an OpenAI placeholder
    services.tokens.revoke(local, row.id)
    revoked = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
    assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]
