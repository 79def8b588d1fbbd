"""Issue 10's last items, over real HTTP against one real portal with OIDC (tests/test_auth.py's provider):
served under /llm behind a small reverse proxy, forwarded headers from that proxy only, rate limits on
sign-in and API tokens, WebSocket Origin/Host checks, and Gradio uploads bound to their uploader.

Clients get their own loopback addresses (127.0.0.x, all local on Linux), so each test's rate-limit
counters and audit rows are its own. The proxy connects from 127.0.0.2, the only trusted proxy."""

from __future__ import annotations

import asyncio
import threading
import uuid
from urllib.parse import urlencode

import httpx
import pytest
from conftest import ARTIFACTS, free_port, launch_chromium, wait_http
from sqlmodel import select
from test_auth import _fn_index, idp, login, serve_sso_portal  # noqa: F401 (idp: a fixture)

from portal.models import AuditEvent, Run, RunStatus, User

PREFIX = "/llm"
PROXY_HOST = "127.0.0.2"
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer",
              b"proxy-connection", b"host"}


class SubPathProxy:
    """nginx's `location /llm/ { proxy_pass http://portal/; }` with `proxy_set_header Host $http_host`,
    `X-Forwarded-For $proxy_add_x_forwarded_for` and `X-Forwarded-Proto $scheme`, unbuffered: strips
    the prefix and streams both ways (Gradio's queue is server-sent events)."""

    def __init__(self, upstream: str):
        import uvicorn

        self.upstream = upstream
        self.port = free_port()
        self.url = f"http://{PROXY_HOST}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self, host=PROXY_HOST, port=self.port, lifespan="off",
                                                    proxy_headers=False, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def __call__(self, scope, receive, send):
        assert scope["type"] == "http"
        if not scope["path"].startswith(PREFIX + "/"):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"not under the proxy's prefix"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k not in HOP_BY_HOP}
        forwarded = [h for h in (headers.pop("x-forwarded-for", None), scope["client"][0]) if h]
        headers.update({"host": dict(scope["headers"])[b"host"].decode(), "x-forwarded-for": ", ".join(forwarded),
                        "x-forwarded-proto": scope["scheme"]})
        path = scope["path"][len(PREFIX):] + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address=PROXY_HOST),
                                     timeout=httpx.Timeout(60, read=None)) as client:
            request = client.build_request(scope["method"], self.upstream + path, headers=headers, content=body)
            response = await client.send(request, stream=True)
            try:
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]})
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                await response.aclose()

    def __enter__(self):
        self.thread.start()
        wait_http(f"{self.url}{PREFIX}/healthz", timeout=60)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


LIMITS = {"rate_limit_window_seconds": 120, "rate_limit_login_starts": 20, "rate_limit_failed_logins": 3,
          "rate_limit_bad_tokens": 3}


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, mlflow_server, demo_assets, idp):  # noqa: F811 (the imported fixture)
    """The portal at /llm, trusting only the proxy's address, served the way `serve` serves it."""
    from portal.config import Settings
    from portal.web import uvicorn_proxy_options

    overrides = {"root_path": PREFIX, "trusted_proxies": [PROXY_HOST], **LIMITS}
    options = uvicorn_proxy_options(Settings(data_root=tmp_path_factory.mktemp("opts"), **overrides))
    with serve_sso_portal(tmp_path_factory, mlflow_server, demo_assets, idp, server_options=options,
                          **overrides) as portal:
        with SubPathProxy(portal["url"]) as proxy:
            yield {**portal, "proxy": proxy.url, "direct": portal["url"] + PREFIX}


def client_at(address: str, base_url: str) -> httpx.Client:
    """A client whose connections come from `address` (a loopback address of its own)."""
    return httpx.Client(base_url=base_url, transport=httpx.HTTPTransport(local_address=address), timeout=30)


def audit_rows(portal, **where) -> list[AuditEvent]:
    with portal["services"].db.session() as s:
        query = select(AuditEvent)
        for key, value in where.items():
            query = query.where(getattr(AuditEvent, key) == value)
        return list(s.exec(query.order_by(AuditEvent.id)))


def forged_callback(client: httpx.Client) -> httpx.Response:
    return client.get("/auth/callback?" + urlencode({"state": uuid.uuid4().hex, "code": "x"}))


# ---- 1. sub-path deployment and forwarded headers ----

def test_every_route_works_under_the_sub_path_through_the_proxy(proxied):
    services = proxied["services"]
    proxy = httpx.Client(base_url=proxied["proxy"] + PREFIX)
    assert proxy.get("/healthz").json()["status"] == "ok"
    r = proxy.get("/ui/?tab=runs", headers={"accept": "text/html"})  # no session: to the login, under /llm
    assert r.status_code == 303 and r.headers["location"] == f"{PREFIX}/login?next=%2Fui%2F%3Ftab%3Druns"
    r = proxy.get("/login?next=/ui/?tab=runs")
    assert r.status_code == 302 and f"redirect_uri={proxied['proxy'].replace(':', '%3A').replace('/', '%2F')}"\
        f"%2Fllm%2Fauth%2Fcallback" in r.headers["location"]
    # the path checks read the path inside the portal: a disabled Gradio route stays disabled under /llm
    assert proxy.get("/ui/gradio_api/file=http://evil.example/x").status_code == 403
    assert proxy.get("/ui/config").status_code == 401
    # /api and /v1 with a token, through the proxy
    login(proxied["direct"], "alice-sub")
    with services.db.session() as s:
        alice = s.exec(select(User).where(User.username == "alice")).one()
    token, _ = services.tokens.create(alice, "proxy-test")
    auth = {"authorization": f"Bearer {token}"}
    assert proxy.get("/api/runs", headers=auth).status_code == 200
    assert proxy.get("/v1/models", headers=auth).status_code == 200
    assert proxy.get("/api/openapi.json", headers=auth).status_code == 200
    # signed in through the proxy: the callback lands back under /llm, and the cookie is the sub-path's only
    client = login(proxied["proxy"] + PREFIX, "alice-sub", next_path="/ui/?tab=runs")
    assert client.last_response.status_code == 303
    assert client.last_response.headers["location"] == f"{PREFIX}/ui/?tab=runs"
    assert f"path={PREFIX}" in client.last_response.headers["set-cookie"].lower()
    assert client.get("/ui/config").status_code == 200
    r = client.get("/")
    assert r.status_code == 307 and r.headers["location"] == f"{PREFIX}/ui/"
    page = client.get("/logout")
    assert f"action='{PREFIX}/logout'" in page.text
    r = client.post("/logout", headers={"origin": proxied["proxy"]})  # the browser's origin, via the proxy
    assert r.status_code == 303 and "post_logout_redirect_uri=" + httpx.URL(
        f"{proxied['proxy']}{PREFIX}/login").__str__().replace(":", "%3A").replace("/", "%2F") in r.headers["location"]


def test_forwarded_for_counts_only_from_the_trusted_proxy(proxied):
    """Direct from 127.0.0.7 with X-Forwarded-For: the audit log keeps the peer. Through the proxy
    (trusted), the address it saw (127.0.0.8) is the client, whatever the client claimed before it."""
    spoof = {"x-forwarded-for": "203.0.113.9", "x-forwarded-proto": "https"}
    with client_at("127.0.0.7", proxied["direct"]) as direct:
        assert forged_callback_with(direct, spoof).status_code == 400
    with client_at("127.0.0.8", proxied["proxy"] + PREFIX) as via_proxy:
        assert forged_callback_with(via_proxy, spoof).status_code == 400
    clients = [e.client for e in audit_rows(proxied, action="login_refused")]
    assert "127.0.0.7" in clients and "127.0.0.8" in clients
    assert "203.0.113.9" not in clients and PROXY_HOST not in clients


def forged_callback_with(client: httpx.Client, headers: dict) -> httpx.Response:
    return client.get("/auth/callback?" + urlencode({"state": uuid.uuid4().hex, "code": "x"}), headers=headers)


@pytest.mark.browser
def test_browser_signs_in_through_the_proxy_and_the_ui_works(proxied):
    """Chromium at http://127.0.0.2:<port>/llm/ui/: the provider's sign-in page, back to the UI, the
    Runs tab loads Alice's run from its handler; every request to the proxy's host stays under /llm."""
    from playwright.sync_api import expect, sync_playwright

    services = proxied["services"]
    login(proxied["direct"], "alice-sub")
    with services.db.session() as s:
        alice = s.exec(select(User).where(User.username == "alice")).one()
        run = Run(name="run_behind_the_proxy", owner_id=alice.id, owner="alice", status=RunStatus.succeeded,
                  run_dir="/nonexistent", output_dir="/nonexistent", config_yaml="dataset: x\n")
        s.add(run)
        s.commit()
    seen: list[str] = []
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_context().new_page()
            page.on("request", lambda request: seen.append(request.url))
            page.goto(proxied["proxy"] + PREFIX + "/ui/")
            page.get_by_placeholder("sub").fill("alice-sub")
            page.get_by_role("button", name="Authorize").click()
            expect(page.locator("#portal-header")).to_contain_text("Signed in as alice", timeout=60_000)
            assert page.url.startswith(proxied["proxy"] + PREFIX + "/ui/")
            page.get_by_role("tab", name="Runs").click()
            page.locator("#runs-refresh").click()
            expect(page.locator("#runs-table")).to_contain_text("run_behind_the_proxy", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "sub-path-proxy.png"), full_page=True)
            page.locator("#sign-out").click()  # the form posts to ../logout: /llm/logout
            page.wait_for_url("**/oauth2/end_session?*", timeout=30_000)
        finally:
            browser.close()
    mine = [u for u in seen if u.startswith(proxied["proxy"])]
    assert any("/gradio_api/" in u for u in mine)  # the page called its handlers through the proxy
    assert mine and all(u.startswith(proxied["proxy"] + PREFIX + "/") for u in mine), \
        [u for u in mine if not u.startswith(proxied["proxy"] + PREFIX + "/")]


# ---- 2. rate limits ----

def test_failed_sign_ins_are_locked_out_with_retry_after_and_audited_once(proxied):
    with client_at("127.0.0.4", proxied["direct"]) as client:
        assert [forged_callback(client).status_code for _ in range(3)] == [400, 400, 400]
        for _ in range(2):
            r = forged_callback(client)
            assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 120
            assert "Too many sign-in attempts" in r.text
        assert client.get("/login").status_code == 429  # a new start waits too
    with client_at("127.0.0.14", proxied["direct"]) as other:  # another address is not affected
        assert forged_callback(other).status_code == 400
    assert len(audit_rows(proxied, action="login_refused", client="127.0.0.4")) == 3  # no row while locked
    locked = audit_rows(proxied, action="rate_limited", client="127.0.0.4")
    assert [e.target for e in locked] == ["auth_callback"]


def test_login_starts_are_limited(proxied):
    with client_at("127.0.0.5", proxied["direct"]) as client:
        codes = [client.get("/login").status_code for _ in range(LIMITS["rate_limit_login_starts"] + 2)]
    assert codes[:LIMITS["rate_limit_login_starts"]] == [302] * LIMITS["rate_limit_login_starts"]
    assert codes[-2:] == [429, 429]
    assert [e.target for e in audit_rows(proxied, action="rate_limited", client="127.0.0.5")] == ["login"]


def test_bad_api_tokens_are_locked_out_even_a_good_one_after(proxied):
    services = proxied["services"]
    login(proxied["direct"], "bob-sub")
    with services.db.session() as s:
        bob = s.exec(select(User).where(User.username == "bob")).one()
    good, _ = services.tokens.create(bob, "after-the-lockout")
    with client_at("127.0.0.3", proxied["direct"]) as client:
        codes = [client.get(path, headers={"authorization": f"Bearer lbp_wrong{i}"}).status_code
                 for i, path in enumerate(["/api/runs", "/v1/models", "/api/runs"])]
        assert codes == [401, 401, 401]
        r = client.get("/v1/models", headers={"authorization": f"Bearer {good}"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0 and "API tokens" in r.json()["detail"]
    with client_at("127.0.0.13", proxied["direct"]) as other:
        assert other.get("/api/runs", headers={"authorization": f"Bearer {good}"}).status_code == 200
    assert [e.target for e in audit_rows(proxied, action="rate_limited", client="127.0.0.3")] == ["api_token"]


# ---- 3. WebSockets: Origin and Host, in both auth modes ----

async def _handshake(url: str, headers: dict) -> int | str:
    import websockets

    try:
        async with websockets.connect(url, additional_headers=headers, open_timeout=10):
            return "open"
    except websockets.exceptions.InvalidStatus as err:
        return err.response.status_code


def test_websockets_get_the_origin_and_host_checks_without_login(portal):
    url = portal["url"].replace("http://", "ws://") + "/ui/gradio_api/stream/some-event"
    own = portal["url"]
    assert asyncio.run(_handshake(url, {"origin": own})) == "open"  # the control: the page's own origin
    assert asyncio.run(_handshake(url, {"origin": "https://evil.example"})) == 403
    rebound = {"host": "attacker.example", "origin": "http://attacker.example"}  # DNS rebinding: both match
    assert asyncio.run(_handshake(url, rebound)) == 403


def test_websockets_get_the_origin_check_with_login(proxied):
    client = login(proxied["direct"], "alice-sub")
    cookie = {"cookie": f"portal_session={client.cookies.get('portal_session')}"}
    url = proxied["direct"].replace("http://", "ws://") + "/ui/gradio_api/stream/some-event"
    own = proxied["url"]
    assert asyncio.run(_handshake(url, {**cookie, "origin": own})) == "open"
    assert asyncio.run(_handshake(url, {**cookie, "origin": "https://evil.example"})) == 403


# ---- 4. Gradio uploads belong to their uploader ----

def test_an_upload_is_out_of_reach_of_another_user(proxied):
    alice = login(proxied["direct"], "alice-sub")
    bob = login(proxied["direct"], "bob-sub")
    content = f"instruction,output\nsecret {uuid.uuid4().hex},x\n".encode()
    r = alice.post("/ui/gradio_api/upload", files={"files": ("alice.csv", content, "text/csv")})
    assert r.status_code == 200, r.text
    (path,) = r.json()
    assert alice.get(f"/ui/gradio_api/file={path}").content == content  # the control: Alice reads her own
    for route in (f"/ui/gradio_api/file={path}", f"/ui/gradio_api/file/{path}"):
        r = bob.get(route)
        assert r.status_code == 403 and "another user" in r.json()["detail"], route
    refresh = _fn_index(proxied["app"], "build_runs_tab.<locals>.refresh")
    file_data = {"path": path, "orig_name": "alice.csv", "meta": {"_type": "gradio.FileData"}}

    def join(client, payload):
        return client.post("/ui/gradio_api/queue/join", json={
            "data": [None, "", [], "", payload], "event_data": None, "fn_index": refresh, "trigger_id": None,
            "session_hash": uuid.uuid4().hex[:11]})

    assert join(bob, file_data).status_code == 403
    assert join(bob, {"url": f"{proxied['direct']}/ui/gradio_api/file={path}"}).status_code == 403
    assert join(alice, file_data).status_code == 200
    denied = audit_rows(proxied, action="denied", target="gradio_upload")
    assert len(denied) >= 4 and {e.username for e in denied} == {"bob"}
    # the same content uploaded by Bob lands on the same path (Gradio names it by content): his too now
    r = bob.post("/ui/gradio_api/upload", files={"files": ("alice.csv", content, "text/csv")})
    assert r.json() == [path] and bob.get(f"/ui/gradio_api/file={path}").status_code == 200
