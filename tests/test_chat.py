"""Chat with a run: the portal's service, its OpenAI-compatible /v1 gateway (with the openai
client) and the Chat tab in headless Chromium, against a real `llamafactory-cli api` serving the
trained run's adapter."""

from __future__ import annotations

import pytest
from conftest import ARTIFACTS, _ServerThread, free_port, launch_chromium
from sqlmodel import select

from portal.models import AuditEvent
from portal.runs import NotFound


@pytest.fixture(scope="module")
def chat_portal(trained):
    from portal.web import create_app

    services = trained["services"]
    app = create_app(services, supervise=False)
    with _ServerThread(app, free_port()) as server:
        yield {"url": server.url, **trained}
    services.chat.close()


def test_service_streams_and_keeps_runs_private(chat_portal):
    runs, chat, alice, run = (chat_portal["services"].runs, chat_portal["services"].chat, chat_portal["user"],
                              chat_portal["run"])
    assert run.id in [r.id for r in chat.runs_to_chat(alice)]
    deltas = list(chat.stream_run(alice, run.id, [{"role": "user", "content": "hello"}], max_tokens=8))
    assert deltas and "".join(deltas)
    bob = runs.ensure_user("bob_chat")
    assert run.id not in [r.id for r in chat.runs_to_chat(bob)]
    with pytest.raises(NotFound):
        next(iter(chat.stream_run(bob, run.id, [{"role": "user", "content": "hi"}])))
    with pytest.raises(NotFound):
        next(iter(chat.stream(bob, f"run-{run.id}", [{"role": "user", "content": "hi"}])))
    with chat_portal["services"].db.session() as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.target == f"run:{run.id}")).all()
    assert any(e.action == "chat_load" and e.username == "alice" for e in events)
    assert any(e.action == "denied" and e.username == "bob_chat" for e in events)


def test_gateway_speaks_openai(chat_portal):
    from openai import NotFoundError, OpenAI

    run = chat_portal["run"]
    client = OpenAI(base_url=chat_portal["url"] + "/v1", api_key="unused-on-loopback")
    assert f"run-{run.id}" in [m.id for m in client.models.list().data]
    stream = client.chat.completions.create(model=f"run-{run.id}", stream=True, max_tokens=8,
                                            messages=[{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"},
                                                      {"role": "user", "content": "again"}])
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces)
    reply = client.chat.completions.create(model=f"run-{run.id}", max_tokens=8,
                                           messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="run-999999", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_a_client_that_leaves_mid_answer_frees_the_model(chat_portal):
    """The gateway streams on the event loop; a client gone mid-answer closes the portal's stream
    to the server at once, so the server is no longer counted busy (it may be stopped when idle,
    or make room) and the next message is answered."""
    import time

    import httpx

    servers, run = chat_portal["services"].chat.local_servers, chat_portal["run"]
    request = {"model": f"run-{run.id}", "stream": True, "max_tokens": 3000, "temperature": 0, "top_p": 1.0,
               "messages": [{"role": "user", "content": "Tell a long story."}]}
    with httpx.Client(base_url=chat_portal["url"], timeout=120) as client:
        with client.stream("POST", "/v1/chat/completions", json=request) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert '"role": "assistant"' in next(line for line in lines if line.startswith("data:"))
            assert '"content": "' in next(line for line in lines if line.startswith("data:"))  # the first token
            assert servers.info(run.id).busy == 1
            left = time.monotonic()
        # freed when the client left, not when the answer would have ended (3000 tokens: ~6 s here)
        while servers.info(run.id).busy and time.monotonic() < left + 1.0:
            time.sleep(0.02)
        assert servers.info(run.id).busy == 0, f"still answering {time.monotonic() - left:.1f} s after the client left"
        again = client.post("/v1/chat/completions", json={**request, "stream": False, "max_tokens": 4})
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"]


@pytest.mark.browser
def test_chat_tab_streams_an_answer(chat_portal):
    from playwright.sync_api import expect, sync_playwright

    run = chat_portal["run"]
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        try:
            page.goto(chat_portal["url"] + "/ui/")
            page.get_by_role("tab", name="Chat").click()
            box = page.locator("#chat-target input")
            box.click()
            page.get_by_role("option", name=f"run-{run.id} · {run.name}", exact=False).first.click()
            page.locator("#chat-max-tokens input[type=number]").fill("8")
            page.locator("#chat-message textarea").fill("Hello there")
            page.locator("#chat-message textarea").press("Enter")
            history = page.locator("#chat-history")
            expect(history).to_contain_text("Hello there", timeout=30_000)
            expect(history.locator("[data-testid=bot]").first).not_to_be_empty(timeout=120_000)
            page.screenshot(path=str(ARTIFACTS / "chat-tab.png"), full_page=True)
        finally:
            browser.close()


def test_the_gateway_starts_a_server_killed_between_two_messages_again(chat_portal):
    """Killed as the OOM killer would, between two messages to a server the portal trusts without
    asking (it answered a moment ago): the next message through the gateway gets an answer from a
    new server, not an error (found dead when routed, or refused at connect and asked once more:
    the test below)."""
    import time

    import psutil
    from openai import OpenAI

    servers, run = chat_portal["services"].chat.local_servers, chat_portal["run"]
    client = OpenAI(base_url=chat_portal["url"] + "/v1", api_key="unused-on-loopback", max_retries=0)

    def ask() -> str:
        stream = client.chat.completions.create(model=f"run-{run.id}", stream=True, max_tokens=4,
                                                messages=[{"role": "user", "content": "hi"}])
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert ask()
    leader = psutil.Process(servers.info(run.id).pid)
    for child in leader.children():
        child.kill()
    deadline = time.monotonic() + 10
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in leader.children()):
        assert time.monotonic() < deadline, "the killed server did not go"
        time.sleep(0.1)
    assert ask()
    assert servers.info(run.id).pid != leader.pid


def test_the_async_stream_asks_once_more_when_the_server_took_nothing(chat_portal, monkeypatch):
    """The gateway's stream (LocalChatServers.open_stream) handed a server that refuses the
    connection: it routes again (one more _ensure, in a worker thread) and answers from there."""
    import asyncio

    from portal.serving import Endpoint

    servers, run = chat_portal["services"].chat.local_servers, chat_portal["run"]
    key, live = servers._ensure(run, None, False)
    gone = Endpoint(f"http://127.0.0.1:{free_port()}/v1", live.model_name, live.api_key)  # nothing listens
    routed = []
    real_ensure = servers._ensure

    def ensure(*args):
        routed.append(args)
        return real_ensure(*args)

    monkeypatch.setattr(servers, "_ensure", ensure)

    async def read() -> list[str]:
        return [piece async for piece in servers._astream(run, (key, gone), [{"role": "user", "content": "hi"}],
                                                          None, False, {"max_tokens": 4})]

    pieces = asyncio.run(read())
    assert pieces[0] == "" and "".join(pieces)  # "": the live server took the request
    assert len(routed) == 1


def test_unload_stops_the_runs_server_and_only_for_its_owner(chat_portal):
    chat, alice, run = chat_portal["services"].chat, chat_portal["user"], chat_portal["run"]
    assert chat.local_servers.info(run.id) is not None  # started by the tests above
    bob = chat_portal["services"].runs.ensure_user("bob_chat")
    with pytest.raises(NotFound):
        chat.release(bob, f"run-{run.id}")
    assert chat.local_servers.info(run.id) is not None
    assert chat.release(alice, f"run-{run.id}") == f"run-{run.id}: its model server is stopped"
    assert chat.local_servers.info(run.id) is None
    assert chat.release(alice, f"run-{run.id}") == f"run-{run.id} has no model loaded"


def test_chat_reads_a_run_once_per_interval_and_checks_its_adapter_every_message(trained, monkeypatch):
    """Decision 0024: a run one may chat with is read from the database once per
    CHAT_RUN_SECONDS, per user; ownership is decided by that read, the adapter checked each time."""
    from pathlib import Path

    from portal import chat as chat_module
    from portal.chat import ChatService
    from portal.recent import Recent
    from portal.serving import ChatServerError

    runs, alice, run = trained["services"].runs, trained["user"], trained["run"]
    chat = ChatService(runs)  # its own cache; it starts no server here
    clock = [0.0]  # the cache's clock, moved by hand
    chat._chat_runs = Recent(chat_module.CHAT_RUN_SECONDS, chat_module.CHAT_RUNS_KEPT, timer=lambda: clock[0])
    reads: list[tuple[str, int]] = []
    real_get_run = runs.get_run

    def counted(user, run_id, purpose="view"):
        reads.append((user.username, run_id))
        return real_get_run(user, run_id, purpose)

    monkeypatch.setattr(runs, "get_run", counted)
    assert [chat._chat_run(alice, run.id).id for _ in range(3)] == [run.id] * 3
    assert reads == [("alice", run.id)]
    bob = runs.ensure_user("bob_chat_cache")
    for _ in range(2):  # alice's read is not bob's, and a refusal is not kept: read (and audited) each time
        with pytest.raises(NotFound):
            chat._chat_run(bob, run.id)
    assert reads.count(("bob_chat_cache", run.id)) == 2
    adapter = Path(run.output_dir) / "adapter_config.json"
    moved = adapter.with_name("adapter_config.json.moved")
    adapter.rename(moved)
    try:
        with pytest.raises(ChatServerError, match="adapter .* is missing"):
            chat._chat_run(alice, run.id)  # kept, but its adapter is gone: refused at once
    finally:
        moved.rename(adapter)
    clock[0] += chat_module.CHAT_RUN_SECONDS - 0.5
    chat._chat_run(alice, run.id)
    assert reads.count(("alice", run.id)) == 1
    clock[0] += 0.5  # the row is CHAT_RUN_SECONDS old: read again
    chat._chat_run(alice, run.id)
    assert reads.count(("alice", run.id)) == 2


def test_without_login_the_local_user_is_read_once_per_interval(chat_portal, monkeypatch):
    """auth_mode none: the one local user is not read from the database for every request
    (decision 0024); the login case reads per request (tests/test_auth.py). A fresh app: its
    kept row starts empty, so exactly one read is expected."""
    from starlette.testclient import TestClient

    from portal.web import create_app

    services = chat_portal["services"]
    runs = services.runs
    reads: list[str] = []
    real_user = runs.user

    def counted(name):
        reads.append(name)
        return real_user(name)

    monkeypatch.setattr(runs, "user", counted)
    client = TestClient(create_app(services, supervise=False), base_url="http://127.0.0.1")
    for _ in range(4):
        assert client.get("/api/runs").status_code == 200
    assert reads == [services.settings.local_username]


def test_a_chat_in_progress_goes_on_without_a_worker_thread(chat_portal, monkeypatch):
    """Decision 0026: the gateway hands a message to a worker thread only when something must be
    read, asked or started; the next message of a chat in progress streams at once. Bob's run id,
    an untrusted server and a missing adapter never take that path."""
    from pathlib import Path

    import httpx

    chat, run = chat_portal["services"].chat, chat_portal["run"]
    servers = chat.local_servers
    routed: list[str] = []
    real_open = chat.open_stream

    def counted(user, model, messages, **params):
        routed.append(user.username)
        return real_open(user, model, messages, **params)

    monkeypatch.setattr(chat, "open_stream", counted)
    request = {"model": f"run-{run.id}", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}

    def ask(client: httpx.Client) -> httpx.Response:
        return client.post("/v1/chat/completions", json=request)

    with httpx.Client(base_url=chat_portal["url"], timeout=120) as client:
        chat._chat_runs.clear()  # the run's row not read yet: the worker thread reads it
        first = ask(client)
        assert first.status_code == 200 and first.json()["choices"][0]["message"]["content"]
        assert len(routed) == 1
        second = ask(client)  # row kept, server answered a moment ago: on the event loop
        assert second.status_code == 200 and second.json()["choices"][0]["message"]["content"]
        assert len(routed) == 1
        servers._servers[f"run-{run.id}"].answered_at = 0.0  # not trusted any more: asked first, in the thread
        assert ask(client).status_code == 200
        assert len(routed) == 2
        adapter = Path(run.output_dir) / "adapter_config.json"
        moved = adapter.with_name("adapter_config.json.moved")
        adapter.rename(moved)
        try:
            gone = ask(client)  # kept and trusted, but the adapter is gone: refused on the fast path too
        finally:
            moved.rename(adapter)
        assert gone.status_code == 503 and "adapter" in gone.json()["error"]["message"]
        assert len(routed) == 2


def test_the_gateway_says_so_when_an_answer_ends_before_it_began(chat_portal, monkeypatch):
    """A stream that ends before the model server took the request (no ""): 503 with the reason,
    not a 500. No real server does this; the stream is replaced to reach the branch."""
    import httpx

    chat, run = chat_portal["services"].chat, chat_portal["run"]

    async def nothing():
        return
        yield ""  # noqa: B901 (an async generator that ends at once)

    monkeypatch.setattr(chat, "open_stream_now", lambda *args, **kwargs: nothing())
    response = httpx.post(chat_portal["url"] + "/v1/chat/completions", timeout=30,
                          json={"model": f"run-{run.id}", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    assert response.json()["error"] == {"message": "the model server ended the answer before it began",
                                        "type": "server_error"}
