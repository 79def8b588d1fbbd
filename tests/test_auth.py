"""OIDC login against a real OIDC provider over HTTP (oidc-provider-mock), and the session guard."""

from __future__ import annotations

from contextlib import contextmanager
from urllib.parse import parse_qs, quote, urlencode, urlparse, urlunparse

import httpx
import pytest
from conftest import ARTIFACTS, _ServerThread, free_port, install_assets, launch_chromium
from sqlmodel import select

from portal.models import AuditEvent, User


@pytest.fixture(scope="module")
def idp():
    import oidc_provider_mock

    with oidc_provider_mock.run_server_in_thread() as server:
        url = f"http://localhost:{server.server_port}"
        for sub, claims in {
            "alice-sub": {"preferred_username": "alice", "email": "alice@bank.example", "name": "Alice",
                          "groups": ["ml-users"]},
            "bob-sub": {"preferred_username": "bob", "email": "bob@bank.example", "groups": ["ml-admins"]},
        }.items():
            assert httpx.put(f"{url}/users/{quote(sub)}", json=claims).status_code == 204
        yield url


@contextmanager
def serve_sso_portal(tmp_path_factory, mlflow_server, demo_assets, idp, *, server_options: dict | None = None,
                     **overrides):
    """A real portal with OIDC against `idp`, served by uvicorn (`server_options`: extra uvicorn settings, as
    `serve` passes them); `overrides`: settings."""
    import threading

    import uvicorn

    from portal.config import Settings
    from portal.services import build_services
    from portal.web import create_app

    settings = Settings(**{"data_root": tmp_path_factory.mktemp("sso"), "mlflow_tracking_uri": mlflow_server,
                           "gpus": [], "auth_mode": "oidc", "oidc_issuer": idp, "oidc_client_id": "portal",
                           "oidc_client_secret": "s3cret", "oidc_admin_group": "ml-admins", **overrides})
    install_assets(settings, demo_assets)
    services = build_services(settings)
    app = create_app(services, supervise=False)
    port = free_port()
    server = _ServerThread(app, port)
    if server_options:
        server.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                      **server_options))
        server.thread = threading.Thread(target=server.server.run, daemon=True)
    with server:
        yield {"url": server.url, "services": services, "app": app}


@pytest.fixture(scope="module")
def sso_portal(tmp_path_factory, mlflow_server, demo_assets, idp):
    with serve_sso_portal(tmp_path_factory, mlflow_server, demo_assets, idp) as portal:
        yield portal


def login(portal_url: str, sub: str, next_path: str | None = None) -> httpx.Client:
    """A browser-like login: the portal sends us to the provider, we approve, the provider sends us back."""
    client = httpx.Client(base_url=portal_url)
    r = client.get("/login" + (f"?{urlencode({'next': next_path})}" if next_path else ""))
    assert r.status_code in (302, 303), r.text
    authorize = r.headers["location"]
    query = parse_qs(urlparse(authorize).query)
    assert query["code_challenge_method"] == ["S256"] and query["nonce"][0] and query["state"][0]
    approved = httpx.post(authorize, data={"sub": sub})
    assert approved.status_code in (302, 303)
    r = client.get(approved.headers["location"])
    client.last_response = r  # type: ignore[attr-defined]
    return client


def test_login_creates_the_user_and_opens_the_ui(sso_portal):
    client = login(sso_portal["url"], "alice-sub")
    assert client.last_response.status_code == 303 and client.last_response.headers["location"] == "/ui/"
    cookie = client.cookies.get("portal_session")
    assert cookie
    assert client.get("/ui/").status_code == 200
    assert client.get("/ui/config").status_code == 200
    with sso_portal["services"].db.session() as s:
        alice = s.exec(select(User).where(User.username == "alice")).one()
        assert alice.subject == "alice-sub" and alice.email == "alice@bank.example" and not alice.is_admin
        assert "login" in [e.action for e in s.exec(select(AuditEvent).where(AuditEvent.username == "alice"))]
    bob = login(sso_portal["url"], "bob-sub")
    with sso_portal["services"].db.session() as s:
        assert s.exec(select(User).where(User.username == "bob")).one().is_admin  # from the admin group
    set_cookie = client.last_response.headers.get("set-cookie", "") or bob.last_response.headers.get("set-cookie", "")
    assert "httponly" in set_cookie.lower() and "samesite=lax" in set_cookie.lower()


@pytest.mark.parametrize("method, path", [
    ("GET", "/ui/config"), ("GET", "/ui/gradio_api/info"), ("GET", "/ui/gradio_api/heartbeat/abc"),
    ("GET", "/ui/gradio_api/startup-events"), ("POST", "/ui/gradio_api/cancel"), ("GET", "/ui/monitoring/summary"),
    ("POST", "/ui/gradio_api/queue/join"), ("GET", "/ui/gradio_api/file=/etc/passwd"),
])
def test_no_session_no_data(sso_portal, method, path):
    r = httpx.request(method, sso_portal["url"] + path)
    if path.startswith("/ui/monitoring"):
        assert r.status_code == 403  # disabled for everyone, session or not
        return
    assert r.status_code == 401
    assert r.json() == {"detail": "sign in first: no valid session"}


def test_pages_redirect_to_login_and_health_stays_open(sso_portal):
    r = httpx.get(sso_portal["url"] + "/ui/", headers={"accept": "text/html"})
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=%2Fui%2F")
    assert httpx.get(sso_portal["url"] + "/healthz").status_code == 200


def test_tampered_session_cookie_is_refused(sso_portal):
    client = login(sso_portal["url"], "alice-sub")
    value = client.cookies.get("portal_session")
    forged = value[:-4] + ("AAAA" if not value.endswith("AAAA") else "BBBB")
    client.cookies.clear()
    client.cookies.set("portal_session", forged)
    assert client.get("/ui/config").status_code == 401


def test_state_mismatch_is_refused_and_audited(sso_portal):
    client = httpx.Client(base_url=sso_portal["url"])
    authorize = client.get("/login").headers["location"]
    back = httpx.post(authorize, data={"sub": "alice-sub"}).headers["location"]
    parts = urlparse(back)
    query = parse_qs(parts.query)
    query["state"] = ["forged-state"]
    r = client.get(urlunparse(parts._replace(query=urlencode({k: v[0] for k, v in query.items()}))))
    assert r.status_code == 400 and "Sign-in failed" in r.text
    assert client.get("/ui/config").status_code == 401
    with sso_portal["services"].db.session() as s:
        assert s.exec(select(AuditEvent).where(AuditEvent.action == "login_refused")).first() is not None


def test_open_redirect_after_login_is_refused(sso_portal):
    for target in ("https://evil.example/x", "//evil.example", "/\\evil.example"):
        client = login(sso_portal["url"], "alice-sub", next_path=target)
        assert client.last_response.headers["location"] == "/ui/"
    client = login(sso_portal["url"], "alice-sub", next_path="/ui/?tab=runs")
    assert client.last_response.headers["location"] == "/ui/?tab=runs"


def test_deactivated_user_is_out_at_the_next_request(sso_portal):
    services = sso_portal["services"]
    client = login(sso_portal["url"], "bob-sub")
    assert client.get("/ui/config").status_code == 200
    with services.db.session() as s:
        bob = s.exec(select(User).where(User.username == "bob")).one()
        bob.is_active = False
        s.add(bob)
        s.commit()
    try:
        assert client.get("/ui/config").status_code == 401
        again = login(sso_portal["url"], "bob-sub")
        assert again.last_response.status_code == 400 and "deactivated" in again.last_response.text
    finally:
        with services.db.session() as s:
            bob = s.exec(select(User).where(User.username == "bob")).one()
            bob.is_active = True
            s.add(bob)
            s.commit()


def test_logout_takes_a_same_site_post(sso_portal):
    client = login(sso_portal["url"], "alice-sub")
    page = client.get("/logout")  # a link only shows the button
    assert page.status_code == 200 and "method='post'" in page.text
    assert client.get("/ui/config").status_code == 200
    r = client.post("/logout", headers={"origin": "https://evil.example"})
    assert r.status_code == 403  # another site cannot sign the user out
    assert client.get("/ui/config").status_code == 200
    r = client.post("/logout", headers={"origin": sso_portal["url"]})
    assert r.status_code in (200, 303)
    assert client.get("/ui/config").status_code == 401
    with sso_portal["services"].db.session() as s:
        event = s.exec(select(AuditEvent).where(AuditEvent.action == "logout").order_by(AuditEvent.id.desc())).first()
    assert event.username == "alice" and event.client == "127.0.0.1"


def _sign_in(browser, portal_url: str, sub: str):
    from playwright.sync_api import expect

    context = browser.new_context()
    page = context.new_page()
    page.goto(portal_url + "/ui/")
    page.get_by_placeholder("sub").fill(sub)  # the provider's own sign-in page
    page.get_by_role("button", name="Authorize").click()
    expect(page.locator("#portal-header")).to_contain_text("Signed in as", timeout=60_000)
    return page


@pytest.mark.browser
def test_two_users_sign_in_through_the_browser_and_see_only_their_own_runs(sso_portal):
    """Alice and Carol sign in through the provider's page in two browser sessions: each sees their
    own name and runs, Carol typing Alice's run id gets "not found", and Sign out ends Carol's session."""
    from playwright.sync_api import expect, sync_playwright

    from portal.models import Run, RunStatus

    services = sso_portal["services"]
    assert httpx.put(f"{services.settings.oidc_issuer}/users/carol-sub",
                     json={"preferred_username": "carol", "groups": ["ml-users"]}).status_code == 204
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            alice = _sign_in(browser, sso_portal["url"], "alice-sub")
            carol = _sign_in(browser, sso_portal["url"], "carol-sub")
            expect(alice.locator("#portal-header")).to_contain_text("Signed in as alice")
            expect(carol.locator("#portal-header")).to_contain_text("Signed in as carol")
            with services.db.session() as s:
                owner = s.exec(select(User).where(User.username == "alice")).one()
                run = Run(name="alices_browser_run", owner_id=owner.id, owner="alice", status=RunStatus.succeeded,
                          run_dir="/nonexistent", output_dir="/nonexistent", config_yaml="dataset: alice_only\n")
                s.add(run)
                s.commit()
                s.refresh(run)
            for page in (alice, carol):
                page.get_by_role("tab", name="Runs").click()
                page.locator("#runs-refresh").click()
            expect(alice.locator("#runs-table")).to_contain_text("alices_browser_run", timeout=30_000)
            expect(carol.locator("#run-details")).to_contain_text("No runs yet", timeout=30_000)
            carol.locator("#run-select input").fill(str(run.id))
            carol.locator("#run-select input").press("Enter")
            expect(carol.locator("#run-details")).to_contain_text(f"run {run.id} not found", timeout=30_000)
            expect(carol.locator("#runs-table")).not_to_contain_text("alices_browser_run")
            expect(carol.locator("#run-config")).not_to_contain_text("alice_only")
            carol.screenshot(path=str(ARTIFACTS / "two-users-carol.png"), full_page=True)
            carol.locator("#sign-out").click()
            carol.wait_for_url("**/oauth2/end_session?*", timeout=30_000)  # the provider's logout too
            assert "id_token_hint=" in carol.url and "post_logout_redirect_uri=" in carol.url
            carol.goto(sso_portal["url"] + "/ui/")
            expect(carol.get_by_placeholder("sub")).to_be_visible(timeout=30_000)  # back at the sign-in page
            alice.locator("#runs-refresh").click()  # Alice's session is untouched
            expect(alice.locator("#runs-table")).to_contain_text("alices_browser_run")
        finally:
            browser.close()
    with services.db.session() as s:
        denied = s.exec(select(AuditEvent).where(AuditEvent.action == "denied", AuditEvent.username == "carol",
                                                 AuditEvent.target == f"run:{run.id}")).all()
    assert denied and denied[0].client == "127.0.0.1"


def _gradio_call(client: httpx.Client, fn_index: int, data: list) -> dict:
    """Call one of the portal's Gradio handlers the way the page does (queue join + event stream)."""
    import json
    import uuid

    session_hash = uuid.uuid4().hex[:11]
    r = client.post("/ui/gradio_api/queue/join", json={"data": data, "event_data": None, "fn_index": fn_index,
                                                         "trigger_id": None, "session_hash": session_hash})
    assert r.status_code == 200, r.text
    with client.stream("GET", f"/ui/gradio_api/queue/data?session_hash={session_hash}", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("no result from the Gradio queue")


def _fn_index(app, qualname_end: str) -> int:
    for index, block_fn in app.state.blocks.fns.items():
        fn = getattr(block_fn, "fn", None)
        if fn is not None and getattr(fn, "__qualname__", "").endswith(qualname_end):
            return index
    raise AssertionError(f"no handler {qualname_end}")


def test_another_users_run_is_out_of_reach_through_the_gradio_api(sso_portal):
    """Carol, signed in, calls the Runs tab's handlers with Alice's run id: nothing of it comes back,
    the cancel is refused, and both attempts are audited."""
    from portal.models import Run, RunStatus

    services = sso_portal["services"]
    login(sso_portal["url"], "alice-sub")
    with services.db.session() as s:
        alice = s.exec(select(User).where(User.username == "alice")).one()
        run = Run(name="alice_secret_run", owner_id=alice.id, owner="alice", status=RunStatus.running,
                  run_dir="/nonexistent", output_dir="/nonexistent", config_yaml="dataset: alice_private_data\n")
        s.add(run)
        s.commit()
        s.refresh(run)
    # carol: a signed-in user who is not an admin
    assert httpx.put(f"{services.settings.oidc_issuer}/users/carol-sub",
                     json={"preferred_username": "carol", "groups": ["ml-users"]}).status_code == 204
    client = login(sso_portal["url"], "carol-sub")
    refresh = _fn_index(sso_portal["app"], "build_runs_tab.<locals>.refresh")
    result = _gradio_call(client, refresh, [run.id, "", [], "", ""])  # the run and empty filters
    text = str(result)
    assert f"run {run.id} not found" in text
    assert "alice_secret_run" not in text and "alice_private_data" not in text
    cancel = _fn_index(sso_portal["app"], "build_runs_tab.<locals>.cancel")
    result = _gradio_call(client, cancel, [run.id])
    assert result.get("success") is False and f"run {run.id} not found" in str(result)
    with services.db.session() as s:
        assert s.get(Run, run.id).status == RunStatus.running  # untouched
        denied = s.exec(select(AuditEvent).where(AuditEvent.action == "denied",
                                                 AuditEvent.target == f"run:{run.id}")).all()
    assert len(denied) >= 2 and all(e.username == "carol" for e in denied)


def test_only_admins_administer(sso_portal):
    from portal.users import UserAdmin

    services = sso_portal["services"]
    admin = UserAdmin(services.db)
    login(sso_portal["url"], "alice-sub")
    login(sso_portal["url"], "bob-sub")
    with services.db.session() as s:
        alice = s.exec(select(User).where(User.username == "alice")).one()
        bob = s.exec(select(User).where(User.username == "bob")).one()
    with pytest.raises(PermissionError):
        admin.list_users(alice)
    with pytest.raises(PermissionError):
        admin.set_active(alice, "bob", False)
    client = login(sso_portal["url"], "alice-sub")
    assert client.get("/ui/config").status_code == 200
    admin.set_active(bob, "alice", False)  # bob is an admin through the ml-admins group
    try:
        assert client.get("/ui/config").status_code == 401
        events = admin.audit_events(bob, action="deactivate_user")
        assert events and events[0].target == "user:alice" and events[0].username == "bob"
    finally:
        admin.set_active(bob, "alice", True)


def test_websocket_without_session_is_refused(sso_portal):
    import asyncio

    import websockets

    async def attempt():
        url = sso_portal["url"].replace("http://", "ws://") + "/ui/gradio_api/stream/some-event"
        try:
            async with websockets.connect(url, open_timeout=10):
                return "open"
        except websockets.exceptions.InvalidStatus as err:
            return err.response.status_code

    assert asyncio.run(attempt()) == 403


def test_refusals_carry_the_security_headers(sso_portal):
    r = httpx.get(sso_portal["url"] + "/ui/config")
    assert r.status_code == 401 and r.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize("claims, expected", [
    ({"preferred_username": "j..doe", "sub": "s1"}, "j_doe"),
    ({"preferred_username": "张三", "email": "zhang.san@bank.example", "sub": "s2"}, "zhang.san"),
    ({"preferred_username": "Ann Lee", "sub": "s3"}, "Ann_Lee"),
    ({"sub": "auth0|123"}, "auth0_123"),
])
def test_usernames_from_claims(claims, expected):
    from portal.auth import username_from_claims

    assert username_from_claims(claims, "preferred_username") == expected


def test_no_usable_username_is_refused():
    from portal.auth import LoginRefused, username_from_claims

    with pytest.raises(LoginRefused):
        username_from_claims({"preferred_username": "张三", "sub": "..."}, "preferred_username")


def test_settings_keep_secrets_out_of_files_and_errors(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from portal.config import Settings

    with pytest.raises(ValidationError) as info:
        Settings(data_root=tmp_path, auth_mode="oidc", oidc_client_secret="TOPSECRET-123")
    assert "TOPSECRET" not in str(info.value) and "PORTAL_OIDC_ISSUER" in str(info.value)
    config = tmp_path / "portal.yaml"
    config.write_text("auth_mode: oidc\noidc_client_secret: TOPSECRET-123\n")
    monkeypatch.setenv("PORTAL_CONFIG_FILE", str(config))
    with pytest.raises(ValueError) as info:
        Settings(data_root=tmp_path)
    assert "must not be in the config file" in str(info.value) and "TOPSECRET" not in str(info.value)
    monkeypatch.delenv("PORTAL_CONFIG_FILE")
    with pytest.raises(ValueError):
        Settings(data_root=tmp_path, session_secret="short").session_key()
    key_file = tmp_path / "session.key"
    key_file.write_text("")  # a crash left it empty
    key = Settings(data_root=tmp_path).session_key()
    assert len(key) >= 32 and oct(key_file.stat().st_mode & 0o777) == "0o600"


def test_cross_site_requests_and_disabled_routes_are_refused(sso_portal):
    """With a valid session: Gradio's CORS echo is stripped, cross-site writes and the routes the
    portal never uses are refused (open redirect / SSRF / monitoring / MCP)."""
    client = login(sso_portal["url"], "alice-sub")
    evil = {"origin": "https://evil.example"}
    r = client.get("/ui/config", headers=evil)
    assert r.status_code == 200
    assert not [h for h in r.headers if h.lower().startswith("access-control-")]
    r = client.post("/ui/gradio_api/queue/join", headers=evil, json={"data": [], "fn_index": 0, "session_hash": "x"})
    assert r.status_code == 403 and "cross-site" in r.json()["detail"]
    r = client.post("/ui/gradio_api/queue/join", headers={"sec-fetch-site": "cross-site"}, json={})
    assert r.status_code == 403
    for path in ("/ui/gradio_api/file=http://evil.example/x", "/ui/gradio_api/file/http://evil.example/x",
                 "/ui/gradio_api/file=HTTPS://evil.example/x", "/ui/monitoring/summary", "/ui/gradio_api/mcp/sse",
                 "/ui/gradio_api/upload_progress?upload_id=1", "/ui/gradio_api/deep_link?session_hash=x",
                 "/ui/?deep_link=abc", "/ui/config?deep_link=abc"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 403, path
    # the portal's own page still works, with its headers
    r = client.get("/ui/")
    assert r.status_code == 200 and "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_a_gradio_session_hash_belongs_to_its_first_user(sso_portal):
    """Bob presents the session_hash of Alice's page: refused (queue results and gr.State are keyed
    by it alone), and audited."""
    import uuid

    alice = login(sso_portal["url"], "alice-sub")
    bob = login(sso_portal["url"], "bob-sub")
    alices_hash = uuid.uuid4().hex[:11]
    refresh = _fn_index(sso_portal["app"], "build_runs_tab.<locals>.refresh")
    r = alice.post("/ui/gradio_api/queue/join", json={"data": [None, "", [], "", ""], "event_data": None, "fn_index": refresh,
                                                       "trigger_id": None, "session_hash": alices_hash})
    assert r.status_code == 200
    assert bob.get(f"/ui/gradio_api/queue/data?session_hash={alices_hash}").status_code == 403
    assert bob.get(f"/ui/gradio_api/heartbeat/{alices_hash}").status_code == 403
    r = bob.post("/ui/gradio_api/queue/join", json={"data": [None, "", [], "", ""], "event_data": None, "fn_index": refresh,
                                                     "trigger_id": None, "session_hash": alices_hash})
    assert r.status_code == 403 and "another user" in r.json()["detail"]
    r = bob.post("/ui/gradio_api/queue/join", headers={"content-type": "Application/JSON"},
                 content=json.dumps({"data": [None, "", [], "", ""], "event_data": None, "fn_index": refresh, "trigger_id": None,
                                     "session_hash": alices_hash}))
    assert r.status_code == 403  # the content type's case does not hide the session_hash
    with alice.stream("GET", f"/ui/gradio_api/queue/data?session_hash={alices_hash}", timeout=30) as stream:
        assert stream.status_code == 200  # Alice still reads her own results
    with sso_portal["services"].db.session() as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.username == "bob",
                                                 AuditEvent.target == "gradio_session")).all()
    assert len(events) >= 3


# ---- a man in the middle of the provider: the ID token checks must refuse what it changes ----

RESIGNING_MODES = ("resign", "wrong_audience", "expired", "other_issuer")


class _TamperingProxy:
    """Forwards to the real OIDC provider and can change what it answers: the discovery document's
    issuer, the ID token's signature, or replay an older token response (another login's nonce).

    It also holds a key of its own, published in the provider's JWKS while it re-signs, to re-sign ID tokens whose
    claims it changed (audience, expiry): the signature is then valid and only the claim check can
    refuse the token. Mode "resign" re-signs without changing anything — the control that proves it."""

    def __init__(self, upstream: str):
        import http.server
        import threading

        from joserfc.jwk import RSAKey

        self.upstream, self.mode, self.last_token_response = upstream, None, None
        self.key = RSAKey.generate_key(2048, parameters={"kid": "mitm-key", "use": "sig", "alg": "RS256"})
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, method):
                body = self.rfile.read(int(self.headers.get("content-length") or 0)) if method == "POST" else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("content-length",)}
                r = httpx.request(method, proxy.upstream + self.path, content=body, headers=headers)
                content = r.content
                if self.path.startswith("/.well-known/openid-configuration") and proxy.mode == "wrong_issuer":
                    doc = r.json()
                    doc["issuer"] = "http://wrong-issuer.example"
                    content = json.dumps(doc).encode()
                # published only while re-signing: the provider's tokens carry no kid, and with two
                # keys in the set a client could not pick (clients re-fetch the set on a kid miss)
                if self.path.startswith("/jwks") and r.status_code == 200 and proxy.mode in RESIGNING_MODES:
                    keys = r.json()
                    keys["keys"].append(proxy.key.as_dict(private=False))
                    content = json.dumps(keys).encode()
                if self.path.startswith("/oauth2/token") and r.status_code == 200:
                    token = r.json()
                    if proxy.mode == "replay" and proxy.last_token_response is not None:
                        content = proxy.last_token_response
                    else:
                        proxy.last_token_response = content
                        if proxy.mode == "garbled_token_response":  # a value no int() takes, quoting the token
                            proxy.leaked = token["access_token"]
                            token.pop("expires_at", None)
                            token["expires_in"] = f"never-{token['access_token']}"
                            content = json.dumps(token).encode()
                        elif proxy.mode == "tamper_signature":
                            head, payload, sig = token["id_token"].split(".")
                            token["id_token"] = ".".join([head, payload, ("A" if sig[0] != "A" else "B") + sig[1:]])
                            content = json.dumps(token).encode()
                        elif proxy.mode in RESIGNING_MODES:
                            token["id_token"] = proxy.resign(token["id_token"])
                            content = json.dumps(token).encode()
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.proxy = self
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


    def resign(self, id_token: str) -> str:
        """The provider's ID token with the claim of this mode changed, signed with the proxy's key."""
        import base64
        import time

        from joserfc import jwt

        payload = id_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        if self.mode == "wrong_audience":
            # azp naming the portal: Authlib's default checks (audience only through azp) would accept it
            claims.update(aud="some-other-client", azp=claims["aud"] if isinstance(claims["aud"], str) else "portal")
        elif self.mode == "expired":
            now = int(time.time())
            claims.update(iat=now - 7200, exp=now - 3600)  # an hour past: beyond any clock-skew leeway
        elif self.mode == "other_issuer":  # signature, audience, expiry, nonce all good: only iss differs
            claims["iss"] = "http://other-issuer.example"
        return jwt.encode({"alg": "RS256", "kid": "mitm-key"}, claims, self.key)


import json  # noqa: E402


@pytest.fixture(scope="module")
def mitm_portal(tmp_path_factory, mlflow_server, demo_assets, idp):
    from portal.config import Settings
    from portal.services import build_services
    from portal.web import create_app

    proxy = _TamperingProxy(idp)
    settings = Settings(data_root=tmp_path_factory.mktemp("mitm"), mlflow_tracking_uri=mlflow_server, gpus=[],
                        auth_mode="oidc", oidc_issuer=proxy.url, oidc_client_id="portal", oidc_client_secret="s3cret")
    install_assets(settings, demo_assets)
    services = build_services(settings)
    with _ServerThread(create_app(services, supervise=False), free_port()) as server:
        yield {"url": server.url, "services": services, "proxy": proxy}
    proxy.server.shutdown()


def test_a_validly_signed_token_from_the_proxy_passes(mitm_portal):
    """The control for the audience and expiry tests: a token re-signed with a published key and
    unchanged claims is accepted, so a refusal there can only come from the claim."""
    mitm_portal["proxy"].mode = "resign"
    try:
        client = login(mitm_portal["url"], "alice-sub")
    finally:
        mitm_portal["proxy"].mode = None
    assert client.last_response.status_code == 303, client.last_response.text
    assert client.get("/ui/config").status_code == 200


@pytest.mark.parametrize("mode", ["tamper_signature", "replay", "wrong_audience", "expired", "other_issuer"])
def test_forged_id_tokens_are_refused(mitm_portal, mode):
    proxy = mitm_portal["proxy"]
    proxy.mode = None
    assert login(mitm_portal["url"], "alice-sub").last_response.status_code == 303  # the honest path works
    proxy.mode = mode
    try:
        client = login(mitm_portal["url"], "alice-sub")
    finally:
        proxy.mode = None
    assert client.last_response.status_code == 400 and "Sign-in failed" in client.last_response.text
    assert client.get("/ui/config").status_code == 401
    with mitm_portal["services"].db.session() as s:
        refused = s.exec(select(AuditEvent).where(AuditEvent.action == "login_refused")
                         .order_by(AuditEvent.id.desc())).first()
    expected = {"tamper_signature": "BadSignatureError", "replay": "InvalidClaimError",  # nonce of another login
                "wrong_audience": "InvalidClaimError", "expired": "ExpiredTokenError",
                "other_issuer": "InvalidClaimError"}[mode]
    assert refused is not None and refused.detail.startswith(expected)


def test_a_provider_claiming_another_issuer_is_refused(mitm_portal, tmp_path_factory, mlflow_server, demo_assets):
    """The discovery document names an issuer other than the one configured: no login."""
    from portal.config import Settings
    from portal.services import build_services
    from portal.web import create_app

    proxy = mitm_portal["proxy"]
    proxy.mode = "wrong_issuer"
    try:
        settings = Settings(data_root=tmp_path_factory.mktemp("mitm2"), mlflow_tracking_uri=mlflow_server, gpus=[],
                            auth_mode="oidc", oidc_issuer=proxy.url, oidc_client_id="portal",
                            oidc_client_secret="s3cret")
        install_assets(settings, demo_assets)
        with _ServerThread(create_app(build_services(settings), supervise=False), free_port()) as server:
            client = httpx.Client(base_url=server.url)
            r = client.get("/login")
            if r.status_code in (302, 303):
                back = httpx.post(r.headers["location"], data={"sub": "alice-sub"}).headers["location"]
                r = client.get(back)
            assert r.status_code == 400 and "Sign-in failed" in r.text, r.text
            assert client.get("/ui/config").status_code == 401
    finally:
        proxy.mode = None


def test_the_sign_in_error_page_shows_no_details(mitm_portal, caplog):
    """An error that is not the provider's (OAuthError) nor the portal's (LoginRefused): the token
    response's `expires_in` is no number and quotes the access token, so authlib's ValueError names
    it. The page and the audit row name the class only; the details go to the server log."""
    import logging

    proxy = mitm_portal["proxy"]
    proxy.mode = None
    assert login(mitm_portal["url"], "alice-sub").last_response.status_code == 303  # the control
    proxy.mode = "garbled_token_response"
    try:
        with caplog.at_level(logging.WARNING, logger="portal.auth"):
            client = login(mitm_portal["url"], "alice-sub")
    finally:
        proxy.mode = None
    page, leaked = client.last_response, proxy.leaked
    assert page.status_code == 400 and "Sign-in failed" in page.text and "(ValueError)" in page.text
    assert leaked not in page.text and "invalid literal" not in page.text
    assert client.get("/ui/config").status_code == 401
    with mitm_portal["services"].db.session() as s:
        refused = s.exec(select(AuditEvent).where(AuditEvent.action == "login_refused")
                         .order_by(AuditEvent.id.desc())).first()
    assert refused.detail.startswith("ValueError") and leaked not in refused.detail
    assert any(leaked in record.getMessage() for record in caplog.records)  # the admin still sees why
