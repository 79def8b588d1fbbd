"""Chat through a shared inference endpoint (vLLM with runtime LoRA): the portal loads a run's
adapter under run-<id>, chats with it, loads it again after a restart, unloads it when idle,
and never lets another user reach it. The endpoint is tests/vllm_fake.py (vLLM needs a GPU);
the run is the session's real trained run, its adapter folder the real one."""

from __future__ import annotations

import dataclasses
import time

import pytest
from conftest import ARTIFACTS, _ServerThread, free_port, launch_chromium
from sqlmodel import select
from vllm_fake import FakeVllm

from portal.chat import ChatService
from portal.endpoint import EndpointError, InferenceEndpoint
from portal.inference import InferenceError
from portal.models import AuditEvent
from portal.runs import NotFound
from portal.serving import ChatServerError

KEY = "endpoint-key-never-shown"
SERVED = "tiny-llama-served"
MOUNT = "/srv/portal-data"  # where the (fake) vLLM pod mounts the portal's data root
HELLO = [{"role": "user", "content": "hello"}]


def make_endpoint(trained, fake: FakeVllm, **options) -> InferenceEndpoint:
    settings = trained["services"].settings
    return InferenceEndpoint(fake.url, KEY, data_root=settings.data_root, adapter_root=MOUNT, **options)


def eventually(condition, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


@pytest.fixture
def vllm(trained):
    data_root = trained["services"].settings.data_root
    with FakeVllm(SERVED, f"{MOUNT}/shared/models/tiny-llama", api_key=KEY, mounts={MOUNT: data_root}) as fake:
        yield fake


@pytest.fixture
def chat(trained, vllm):
    service = ChatService(trained["services"].runs, endpoint=make_endpoint(trained, vllm))
    yield service
    service.close()


def test_a_run_chats_through_its_adapter_loaded_once(trained, vllm, chat):
    runs, alice, run = trained["services"].runs, trained["user"], trained["run"]
    name = f"run-{run.id}"
    assert [t.model for t in chat.targets(alice)][:1] == [name] and SERVED in [t.model for t in chat.targets(alice)]
    text = "".join(chat.stream_run(alice, run.id, HELLO))
    assert text == f"[{name}] you said: hello"  # the adapter answered, not the base model
    # the path vLLM was given is the run's own adapter folder, where the endpoint mounts the data root
    relative = run.output_dir[len(str(trained["services"].settings.data_root.resolve())):]
    assert vllm.adapters[name] == MOUNT + relative
    assert "".join(chat.stream(alice, name, HELLO)) == text
    assert vllm.count("load", name) == 1  # the second message reused it
    assert chat.served_models() == [SERVED]  # loaded adapters (anyone's) are never listed as models
    with runs.db.session() as s:
        loads = s.exec(select(AuditEvent).where(AuditEvent.action == "chat_load",
                                                AuditEvent.target == f"run:{run.id}")).all()
    assert any("inference endpoint" in (e.detail or "") for e in loads)
    bob = runs.ensure_user("bob_endpoint")
    with pytest.raises(NotFound):
        chat.release(bob, name)
    assert chat.release(alice, name) == f"{name}: its adapter is unloaded"  # the Chat tab's "Unload model"
    assert name not in vllm.adapters and vllm.count("unload", name) == 1
    assert "".join(chat.stream_run(alice, run.id, HELLO)) == text  # loaded again on the next message
    chat.close()  # portal shutdown: what it loaded is unloaded
    assert name not in vllm.adapters and vllm.count("unload", name) == 2


def test_a_restarted_endpoint_gets_the_adapter_again(trained, vllm, chat):
    alice, run = trained["user"], trained["run"]
    assert "".join(chat.stream_run(alice, run.id, HELLO))
    vllm.restart()  # vLLM restarted: runtime-loaded adapters are gone
    assert "".join(chat.stream_run(alice, run.id, HELLO)) == f"[run-{run.id}] you said: hello"
    assert vllm.count("load", f"run-{run.id}") == 2


def test_idle_adapters_are_unloaded_and_the_least_recently_used_makes_room(trained, vllm):
    run = trained["run"]
    endpoint = make_endpoint(trained, vllm, idle_seconds=0.5)
    try:
        endpoint.ensure_adapter(run)
        assert eventually(lambda: f"run-{run.id}" not in vllm.adapters, within=10)
        assert endpoint.loaded() == []
    finally:
        endpoint.close()
    endpoint = make_endpoint(trained, vllm, max_adapters=1)
    try:
        twin = run.model_copy(update={"id": run.id + 5000})  # another run on the same adapter files
        endpoint.ensure_adapter(run)
        endpoint.ensure_adapter(twin)
        assert sorted(vllm.adapters) == [f"run-{twin.id}"] and endpoint.loaded() == [twin.id]
    finally:
        endpoint.close()


def test_a_name_taken_by_another_portals_adapter_is_refused(trained, vllm, chat):
    run = trained["run"]
    vllm.adapters[f"run-{run.id}"] = "/other-portal/users/eve/runs/x/output"
    with pytest.raises(EndpointError, match="another adapter loaded under the name .*inference_adapter_prefix"):
        list(chat.stream_run(trained["user"], run.id, HELLO))
    # the same adapter, loaded by another process of this portal (or before a restart), is used as is
    vllm.adapters[f"run-{run.id}"] = make_endpoint(trained, vllm).endpoint_path(run.output_dir)
    assert "".join(chat.stream_run(trained["user"], run.id, HELLO)).startswith(f"[run-{run.id}]")


def test_another_user_never_reaches_a_loaded_adapter(trained, vllm, chat):
    runs, alice, run = trained["services"].runs, trained["user"], trained["run"]
    assert "".join(chat.stream_run(alice, run.id, HELLO))  # loaded now
    bob = runs.ensure_user("bob_endpoint")
    assert [t.model for t in chat.targets(bob)] == [SERVED]
    for attempt in (lambda: chat.stream(bob, f"run-{run.id}", HELLO),
                    lambda: chat.stream_run(bob, run.id, HELLO, base=True),
                    lambda: chat.side_by_side(bob, run.id, HELLO, HELLO)):
        with pytest.raises(NotFound):
            list(attempt())
    with pytest.raises(NotFound):  # not a served model either, although the endpoint has it
        chat.stream(bob, f"run-{run.id}x", HELLO)


def test_side_by_side_streams_the_run_and_its_base_model(trained, vllm, chat):
    alice, run = trained["user"], trained["run"]
    pairs = list(chat.side_by_side(alice, run.id, HELLO, [{"role": "user", "content": "hi"}]))
    assert len(pairs) > 2
    assert pairs[-1] == (f"[run-{run.id}] you said: hello", f"[{SERVED}] you said: hi")


def test_endpoint_without_runtime_lora_and_cluster_rules(trained, vllm):
    runs, alice, run = trained["services"].runs, trained["user"], trained["run"]
    vllm.runtime_lora = False  # vLLM started without VLLM_ALLOW_RUNTIME_LORA_UPDATING
    chat = ChatService(runs, endpoint=make_endpoint(trained, vllm))
    with pytest.raises(InferenceError, match="does not load adapters at run time.*VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        list(chat.stream_run(alice, run.id, HELLO))
    launcher = runs.launcher
    launcher.on_cluster = True  # as the Kubernetes launcher: the portal starts no model servers itself
    try:
        with pytest.raises(ChatServerError, match="on a cluster.*PORTAL_INFERENCE_BASE_URL"):
            list(ChatService(runs, endpoint=None).stream_run(alice, run.id, HELLO))
        oft = run.model_copy(update={"finetuning_type": "oft"})  # vLLM serves LoRA only
        with pytest.raises(ChatServerError, match="vLLM serves LoRA adapters only, and this run trained 'oft'"):
            ChatService(runs, endpoint=make_endpoint(trained, vllm))._on_endpoint(oft)
        with FakeVllm("another-model", "/models/other", api_key=KEY) as other:
            elsewhere = ChatService(runs, endpoint=make_endpoint(trained, other))
            with pytest.raises(ChatServerError, match="does not serve this run's base model.*another-model"):
                list(elsewhere.stream_run(alice, run.id, HELLO))
    finally:
        del launcher.on_cluster


def test_gateway_serves_runs_and_endpoint_models_and_keeps_the_key(trained, vllm, chat):
    from openai import NotFoundError, OpenAI

    from portal.web import create_app

    run = trained["run"]
    services = dataclasses.replace(trained["services"], chat=chat)
    app = create_app(services, supervise=False)
    with _ServerThread(app, free_port()) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="EMPTY")
        assert {f"run-{run.id}", SERVED} <= {m.id for m in client.models.list().data}
        streamed = client.chat.completions.create(model=SERVED, messages=HELLO, stream=True, max_tokens=8)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == f"[{SERVED}] you said: hello"
        reply = client.chat.completions.create(model=f"run-{run.id}", messages=HELLO, max_tokens=8)
        assert reply.choices[0].message.content == f"[run-{run.id}] you said: hello"
        with pytest.raises(NotFoundError) as missing:
            client.chat.completions.create(model="gpt-4", messages=HELLO)
        assert KEY not in str(missing.value)
        import httpx

        assert KEY not in httpx.get(server.url + "/v1/models").text


@pytest.mark.browser
def test_chat_tab_side_by_side_in_the_browser(trained, vllm, chat):
    from playwright.sync_api import expect, sync_playwright

    from portal.web import create_app

    run = trained["run"]
    app = create_app(dataclasses.replace(trained["services"], chat=chat), supervise=False)
    with _ServerThread(app, free_port()) as server, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        try:
            page.goto(server.url + "/ui/")
            page.get_by_role("tab", name="Chat").click()
            page.locator("#chat-target input").click()
            expect(page.get_by_role("option", name=f"{SERVED} (served)")).to_be_visible()
            page.get_by_role("option", name=f"run-{run.id} · {run.name}", exact=False).first.click()
            page.locator("#chat-side-by-side input").check()
            page.locator("#chat-message textarea").fill("compare us")
            page.locator("#chat-message textarea").press("Enter")
            expect(page.locator("#chat-history")).to_contain_text(f"[run-{run.id}] you said: compare us",
                                                                  timeout=30_000)
            expect(page.locator("#chat-base-history")).to_contain_text(f"[{SERVED}] you said: compare us",
                                                                       timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "chat-side-by-side.png"), full_page=True)
        finally:
            browser.close()


def test_the_endpoint_key_may_not_be_in_the_config_file(tmp_path, monkeypatch):
    from portal.config import Settings

    config = tmp_path / "portal.yaml"
    config.write_text(f"inference_base_url: http://vllm:8000/v1\ninference_api_key: {KEY}\n")
    monkeypatch.setenv("PORTAL_CONFIG_FILE", str(config))
    with pytest.raises(ValueError, match="inference_api_key must not be in the config file.*"
                                         r"PORTAL_INFERENCE_API_KEY\(_FILE\)") as refused:
        Settings(data_root=tmp_path)
    assert KEY not in str(refused.value)
    monkeypatch.delenv("PORTAL_CONFIG_FILE")
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    assert Settings(data_root=tmp_path, inference_api_key_file=key_file).inference_key() == KEY


def test_an_endpoint_that_cannot_read_the_adapter_says_where_to_look(trained):
    settings, alice, run = trained["services"].settings, trained["user"], trained["run"]
    # vLLM serves the base model under its path (same mount), but an admin set inference_adapter_root
    # wrong: vLLM answers 404 "No adapter found for <path>" (vLLM 0.25.1)
    with FakeVllm(run.model_name_or_path, run.model_name_or_path, api_key=KEY) as vllm:
        endpoint = InferenceEndpoint(vllm.url, KEY, data_root=settings.data_root, adapter_root="/mnt/elsewhere")
        chat = ChatService(trained["services"].runs, endpoint=endpoint)
        with pytest.raises(InferenceError, match="cannot read the run's adapter at /mnt/elsewhere/.*"
                                                 "inference_adapter_root"):
            list(chat.stream_run(alice, run.id, HELLO))
        assert endpoint.loaded() == [] and not vllm.adapters
