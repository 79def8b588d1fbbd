"""OIDC login against a real OIDC provider over HTTP (oidc-provider-mock), and the session guard."""

from __future__ import annotations

from urllib.parse import parse_qs, quote, urlencode, urlparse, urlunparse

import httpx
import pytest
from conftest import _ServerThread, free_port, install_assets, launch_chromium
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


@pytest.fixture(scope="module")
def sso_portal(tmp_path_factory, mlflow_server, demo_assets, idp):
    from portal.config import Settings
    from portal.services import build_services
    from portal.web import create_app

    settings = Settings(data_root=tmp_path_factory.mktemp("sso"), mlflow_tracking_uri=mlflow_server, gpus=[],
                        auth_mode="oidc", oidc_issuer=idp, oidc_client_id="portal", oidc_client_secret="s3cret",
                        oidc_admin_group="ml-admins")
    install_assets(settings, demo_assets)
    services = build_services(settings)
    app = create_app(services, supervise=False)
    with _ServerThread(app, free_port()) as server:
        yield {"url": server.url, "services": services}


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


def test_logout_ends_the_session(sso_portal):
    client = login(sso_portal["url"], "alice-sub")
    r = client.get("/logout")
    assert r.status_code in (200, 303)
    assert client.get("/ui/config").status_code == 401


@pytest.mark.browser
def test_browser_login_shows_the_users_name(sso_portal):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        try:
            page.goto(sso_portal["url"] + "/ui/")
            page.get_by_placeholder("sub").fill("alice-sub")
            page.get_by_role("button", name="Authorize").click()
            expect(page.locator("#portal-header")).to_contain_text("Signed in as alice", timeout=60_000)
            expect(page.locator("#portal-header")).to_contain_text("Sign out")
        finally:
            browser.close()
