"""Issue 10: the rows of docs/security.md that had no test, each as a hostile request over real HTTP
against a running portal with real sessions from the OIDC provider (tests/test_auth.py's), next to a
control that shows the legitimate request working (so a refusal can only come from the control).

Each test signs in users of its own (fresh subs, fresh user names): the module's portal is shared."""

from __future__ import annotations

import json
import time
import uuid
from base64 import b64decode, b64encode
from urllib.parse import quote

import httpx
import pytest
from sqlmodel import select
from test_auth import idp, login, serve_sso_portal  # noqa: F401 (idp: a fixture)

from portal.models import AuditEvent, User

DISABLED = {"detail": "this route is disabled in the portal"}


@pytest.fixture(scope="module")
def sso(tmp_path_factory, mlflow_server, demo_assets, idp):  # noqa: F811 (the imported fixture)
    with serve_sso_portal(tmp_path_factory, mlflow_server, demo_assets, idp) as portal:
        yield portal


def upload(client: httpx.Client, content: bytes, name: str = "data.csv") -> httpx.Response:
    return client.post("/ui/gradio_api/upload", files={"files": (name, content, "text/csv")})


# ---- unauthenticated access, disabled routes ----

def test_upload_without_a_session_is_refused(sso):
    content = f"instruction,output\nno session {uuid.uuid4().hex},x\n".encode()
    r = upload(httpx.Client(base_url=sso["url"]), content)
    assert r.status_code == 401 and r.json() == {"detail": "sign in first: no valid session"}
    client = login(sso["url"], "upl-sub")  # the control: the same upload with a session is taken
    r = upload(client, content)
    assert r.status_code == 200, r.text
    (path,) = r.json()
    assert client.get(f"/ui/gradio_api/file={path}").content == content


@pytest.mark.parametrize("path", ["/ui/gradio_api/proxy=https://evil.example/x", "/ui/proxy=https://evil.example/x",
                                  "/ui/gradio_api/proxy=http://127.0.0.1:1/x"])
def test_the_proxy_route_is_refused_with_and_without_a_session(sso, path):
    """403 from the portal itself (its detail, not Gradio's own refusal of non-Spaces URLs), before the
    session check (no 401 without a session); the session used is valid (the control)."""
    r = httpx.get(sso["url"] + path)
    assert r.status_code == 403 and r.json() == DISABLED
    client = login(sso["url"], "proxy-sub")
    assert client.get("/ui/config").status_code == 200
    r = client.get(path)
    assert r.status_code == 403 and r.json() == DISABLED


def test_server_files_are_not_served_through_file_routes_with_a_session(sso):
    """Signed in, ask Gradio's file routes for files of the machine and of the portal: /etc/passwd,
    portal.db, session.key, a file in another user's folder, and the same through `..` out of
    Gradio's upload folder (slashes sent as %2F so no client or proxy folds the `..` away)."""
    settings = sso["services"].settings
    client = login(sso["url"], "reader-sub")
    content = f"instruction,output\nmine {uuid.uuid4().hex},x\n".encode()
    (own,) = upload(client, content).json()
    r = client.get(f"/ui/gradio_api/file={own}")
    assert r.status_code == 200 and r.content == content  # the control: the route serves my own upload
    secret = f"other user's data {uuid.uuid4().hex}"
    other = settings.users_root / "victim" / "datasets" / "secret.csv"
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_text(secret)
    db, key = settings.data_root / "portal.db", settings.data_root / "session.key"
    assert db.is_file() and key.is_file()
    upload_dir = own.rsplit("/", 2)[0]  # <Gradio temp>/<hash>/<name>
    targets = {"/etc/passwd": "root:", str(db): "SQLite format", str(key): key.read_text().strip(),
               str(other): secret}
    for target, marker in targets.items():
        escapes = f"{upload_dir}/x/../" + "../" * upload_dir.count("/") + target.lstrip("/")
        for sent in (target, quote(target, safe=""), quote(escapes, safe="")):
            for route in ("/ui/gradio_api/file=", "/ui/gradio_api/file/"):
                r = client.get(route + sent)
                assert r.status_code in (403, 404), (route, sent, r.status_code)
                assert marker not in r.text, (route, sent)


# ---- headers and cookie flags ----

def test_referrer_policy_and_no_hsts_over_plain_http(sso):
    r = httpx.get(sso["url"] + "/healthz")
    assert r.headers["referrer-policy"] == "same-origin"
    assert "strict-transport-security" not in r.headers  # public_url is not https: no HSTS
    r = httpx.get(sso["url"] + "/login")
    assert r.status_code == 302 and "secure" not in r.headers["set-cookie"].lower()


def test_https_public_url_sends_hsts_and_a_secure_cookie(tmp_path_factory, mlflow_server, demo_assets, idp):  # noqa: F811
    with serve_sso_portal(tmp_path_factory, mlflow_server, demo_assets, idp,
                          public_url="https://portal.example") as portal:
        for path in ("/healthz", "/ui/config"):
            r = httpx.get(portal["url"] + path)
            assert r.headers["strict-transport-security"] == "max-age=31536000", path
            assert r.headers["referrer-policy"] == "same-origin", path
        r = httpx.get(portal["url"] + "/login")
        assert r.status_code == 302 and "redirect_uri=https%3A%2F%2Fportal.example%2Fauth%2Fcallback" in \
            r.headers["location"]
        flags = [f.strip().lower() for f in r.headers["set-cookie"].split(";")]
        assert "secure" in flags and "httponly" in flags and "samesite=lax" in flags


# ---- session lifetimes ----

def _session_of(cookie: str) -> dict:
    """What Starlette's SessionMiddleware keeps in the cookie: base64 JSON, then itsdangerous's
    TimestampSigner (`<data>.<timestamp>.<signature>`)."""
    return json.loads(b64decode(cookie.rsplit(".", 2)[0]))


def _signed(session: dict, key: str) -> str:
    """A cookie signed now with the portal's key, the way SessionMiddleware signs it."""
    from itsdangerous import TimestampSigner

    return TimestampSigner(key).sign(b64encode(json.dumps(session).encode())).decode()


def test_sessions_end_at_the_idle_and_the_absolute_limit(sso):
    """Cookies signed with the portal's own key (so the signature is good and only the times inside
    can refuse them): past the idle limit (seen_at) or the absolute limit (login_at) the portal
    wants a new sign-in; just inside both it serves the page and renews seen_at."""
    settings = sso["services"].settings
    client = login(sso["url"], "idle-sub")
    set_cookie = client.last_response.headers["set-cookie"]
    assert f"max-age={settings.session_max_hours * 3600}" in set_cookie.lower()  # the browser drops it then too
    session = _session_of(client.cookies.get("portal_session"))
    assert session["username"] == "idle-sub" and {"login_at", "seen_at", "uid"} <= set(session)
    key, now = settings.session_key(), int(time.time())
    idle, most = settings.session_idle_minutes * 60, settings.session_max_hours * 3600
    margin = 120

    def get(path: str, **times) -> httpx.Response:  # /ui/ as a browser asks for a page; the rest as the API
        headers = {"cookie": f"portal_session={_signed({**session, **times}, key)}"}
        return httpx.get(sso["url"] + path, headers={**headers, "accept": "text/html"} if path == "/ui/" else headers)

    # controls: just inside both limits the crafted cookie works, and the idle clock is renewed
    r = get("/ui/config", login_at=now - most + margin, seen_at=now - idle + margin)
    assert r.status_code == 200
    renewed = _session_of(r.headers["set-cookie"].split("portal_session=", 1)[1].split(";", 1)[0])
    assert renewed["seen_at"] >= now and renewed["login_at"] == now - most + margin
    # idle too long: refused; a page goes to the login, the API gets 401, and the cookie is emptied
    r = get("/ui/", login_at=now - 60, seen_at=now - idle - margin)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    r = get("/ui/config", login_at=now - 60, seen_at=now - idle - margin)
    assert r.status_code == 401 and "portal_session=null" in r.headers.get("set-cookie", "")
    # in use all along (seen a moment ago) but signed in too long ago: refused
    r = get("/ui/config", login_at=now - most - margin, seen_at=now)
    assert r.status_code == 401
    r = get("/ui/", login_at=now - most - margin, seen_at=now)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")


# ---- account takeover through a second identity ----

def test_a_second_identity_cannot_take_over_a_user_name(sso):
    """`victim` signs in; then two other identities whose claims derive the same user name (the
    username claim, the email's local part) are refused, audited, and the account keeps its subject."""
    services = sso["services"]
    issuer = services.settings.oidc_issuer
    assert httpx.put(f"{issuer}/users/victim-sub", json={"preferred_username": "victim"}).status_code == 204
    assert login(sso["url"], "victim-sub").last_response.status_code == 303
    assert httpx.put(f"{issuer}/users/mallory-sub", json={"preferred_username": "victim"}).status_code == 204
    assert httpx.put(f"{issuer}/users/trudy-sub", json={"email": "victim@elsewhere.example"}).status_code == 204
    for sub in ("mallory-sub", "trudy-sub"):
        client = login(sso["url"], sub)
        r = client.last_response
        assert r.status_code == 400 and "already belongs to another identity; ask an admin" in r.text, sub
        assert client.get("/ui/config").status_code == 401
    with services.db.session() as s:
        users = s.exec(select(User).where(User.username == "victim")).all()
        refused = s.exec(select(AuditEvent).where(AuditEvent.action == "login_refused")).all()
    assert [u.subject for u in users] == ["victim-sub"]
    assert len([e for e in refused if e.detail.startswith("LoginRefused: the user name 'victim' already")]) == 2
    victim = login(sso["url"], "victim-sub")  # the control: the owner still signs in
    assert victim.last_response.status_code == 303 and victim.get("/ui/config").status_code == 200
