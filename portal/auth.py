"""Login: OIDC (authorization code + PKCE, state, nonce; ID token checked by authlib against the
provider's JWKS, issuer, audience and expiry), signed session cookies with idle and absolute
lifetimes, and one middleware in front of every route that refuses requests without a session.

auth: none keeps the single local user (served on loopback only, checked by `serve`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from html import escape
from typing import Any
from urllib.parse import unquote, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy.exc import IntegrityError
from sqlmodel import select
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import HTTPConnection

from .config import Settings
from .models import User, utcnow
from .ratelimit import RateLimits, too_many
from .runs import RunService
from .storage import NAME_PATTERN
from .web import UI_PATH, route_path

log = logging.getLogger(__name__)

PUBLIC_PATHS = ("/login", "/auth/callback", "/logout", "/healthz")
# Gradio 5.50's routes that serve a file by its path (the upload and cache folders for anyone)
FILE_ROUTES = tuple(f"{UI_PATH}{p}" for p in ("/gradio_api/file=", "/gradio_api/file/", "/file=", "/file/"))
UPLOAD_ROUTE = f"{UI_PATH}/gradio_api/upload"
SESSION_COOKIE = "portal_session"
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class LoginRefused(Exception):
    """A login the portal will not accept; the message is shown to the person."""


def username_from_claims(claims: dict[str, Any], username_claim: str) -> str:
    """The first of the username claim, the email's local part and sub that makes a valid name."""
    candidates = [claims.get(username_claim), str(claims.get("email") or "").split("@")[0], claims.get("sub")]
    for raw in candidates:
        name = _NAME_CHARS.sub("_", str(raw or "")).replace("..", "_").strip("._-")[:64]
        if name and NAME_PATTERN.match(name):
            return name
    raise LoginRefused(f"the identity provider sent no usable user name ({username_claim}, email or sub)")


def groups_from_claims(claims: dict[str, Any], groups_claim: str) -> list[str]:
    value = claims.get(groups_claim) or []
    if isinstance(value, str):
        value = [value]
    return [str(g) for g in value]


def upsert_oidc_user(runs: RunService, settings: Settings, claims: dict[str, Any]) -> User:
    """Create the user on first login, refresh name, email and groups on each login."""
    subject = str(claims.get("sub") or "")
    if not subject:
        raise LoginRefused("the ID token has no subject (sub)")
    username = username_from_claims(claims, settings.oidc_username_claim)
    groups = groups_from_claims(claims, settings.oidc_groups_claim)
    is_admin = bool(settings.oidc_admin_group and settings.oidc_admin_group in groups)
    try:
        return _upsert(runs, subject, username, claims, groups, is_admin)
    except IntegrityError:  # two first sign-ins of the same person at once: the other one made the row
        return _upsert(runs, subject, username, claims, groups, is_admin)


def _upsert(runs: RunService, subject: str, username: str, claims: dict[str, Any], groups: list[str],
            is_admin: bool) -> User:
    with runs.db.session() as s:
        user = s.exec(select(User).where(User.subject == subject)).first()
        if user is None:
            same_name = s.exec(select(User).where(User.username == username)).first()
            if same_name is not None:
                raise LoginRefused(f"the user name '{username}' already belongs to another identity; ask an admin")
            user = User(username=username, subject=subject)
        if not user.is_active:
            raise LoginRefused(f"the account '{user.username}' is deactivated; ask an admin")
        user.email = claims.get("email") or user.email
        user.display_name = claims.get("name") or user.display_name
        user.groups = ",".join(groups)
        user.is_admin = is_admin
        user.last_login_at = utcnow()
        s.add(user)
        s.commit()
        s.refresh(user)
        return user


def _guard_websockets(app, runs: RunService, idle_s: int, max_s: int):  # noqa: ANN001 (an ASGI app)
    """WebSocket connections get the same session check (HTTP middleware never sees them)."""

    async def guard(scope, receive, send):
        if scope["type"] == "websocket" and route_path(HTTPConnection(scope)) not in PUBLIC_PATHS:
            session = scope.get("session") or {}
            if _session_user(runs, session, idle_s, max_s) is None:
                await send({"type": "websocket.close", "code": 1008})
                return
        await app(scope, receive, send)

    return guard


def require_session(app, runs: RunService, idle_s: int, max_s: int, root: str,  # noqa: ANN001 (ASGI)
                     session_hashes: SessionHashes, uploads: UploadOwners):
    """Every HTTP request but the public ones needs a live session (or a token, checked before):
    the signed-in user goes on ``request.state.user``, a page gets a redirect to the login, any
    other request 401. A Gradio session_hash or an uploaded file of another user is refused.

    Plain ASGI, not ``BaseHTTPMiddleware``: that one adds a task and a memory stream to every
    request and to every piece of a streamed answer (the /v1 gateway, Gradio's SSE)."""

    async def guard(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        request = Request(scope, receive)
        path = route_path(request)
        if path in PUBLIC_PATHS or getattr(request.state, "token_auth", False):  # a token stands for a session
            await app(scope, receive, send)
            return
        refusal = await _refusal(request, path)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if request.method == "POST" and "/gradio_api/" in path \
                and "json" in request.headers.get("content-type", "").lower():
            receive = _replaying(await request.body(), receive)  # read by the checks: given again downstream
        if path == UPLOAD_ROUTE and request.method == "POST":
            send = _recording_uploads(send, uploads, request.state.user.id)
        await app(scope, receive, send)

    async def _refusal(request: Request, path: str) -> Response | None:
        session = request.session
        now = int(time.time())
        user = _session_user(runs, session, idle_s, max_s)
        if user is None:
            session.clear()
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                target = path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"{root}/login?" + urlencode({"next": target}), status_code=303)
            return JSONResponse({"detail": "sign in first: no valid session"}, status_code=401)
        if now - int(session.get("seen_at", 0)) > 60:
            session["seen_at"] = now  # idle clock; written at most once a minute
        client = request.client.host if request.client else None
        hash_value = await _session_hash_of(request)
        if hash_value is not None and not session_hashes.claim(hash_value, user.id):
            runs.audit(user.username, "denied", "gradio_session", "another user's Gradio session_hash", client=client)
            return JSONResponse({"detail": "this Gradio session belongs to another user"}, status_code=403)
        named = [path[len(prefix):] for prefix in FILE_ROUTES if path.startswith(prefix)][:1]
        if not named and "/gradio_api/" in path:
            named = _file_paths(await _json_body(request), [])
        if any(uploads.foreign(name, user.id) for name in named):
            runs.audit(user.username, "denied", "gradio_upload", "another user's uploaded file", client=client)
            return JSONResponse({"detail": "this file was uploaded by another user"}, status_code=403)
        request.state.user = user
        return None

    return guard


def _replaying(body: bytes, receive):  # noqa: ANN001, ANN202 (ASGI receive)
    """``receive`` for the app behind a guard that has read the body: the body once, then the rest."""
    given = False

    async def replay():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _recording_uploads(send, uploads: UploadOwners, user_id: int):  # noqa: ANN001, ANN202 (ASGI send)
    """``send`` for Gradio's upload route: the answer (a JSON list of the saved paths) is held to
    its end, and its paths are recorded as this user's before it goes out."""
    start: dict | None = None
    parts: list[bytes] = []

    async def record(message):
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            await send(message)
            return
        parts.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(parts)
        if start["status"] == 200:
            try:
                saved = json.loads(body)
            except ValueError:
                saved = []
            uploads.record([p for p in saved if isinstance(p, str)] if isinstance(saved, list) else [], user_id)
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return record


def _session_user(runs: RunService, session: dict, idle_s: int, max_s: int) -> User | None:
    uid = session.get("uid")
    if uid is None:
        return None
    now = int(time.time())
    if now - int(session.get("seen_at", 0)) > idle_s or now - int(session.get("login_at", 0)) > max_s:
        return None
    with runs.db.session() as s:
        user = s.get(User, uid)
    if user is None or not user.is_active or user.username != session.get("username"):
        return None
    return user


class SessionHashes:
    """Gradio's session_hash is chosen by the browser and is the only key of queue results and
    gr.State: the first signed-in user to present one owns it; anyone else is refused."""

    def __init__(self, limit: int = 200_000):
        self._owners: OrderedDict[str, int] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def claim(self, session_hash: str, user_id: int) -> bool:
        with self._lock:
            owner = self._owners.get(session_hash)
            if owner is None:
                self._owners[session_hash] = user_id
                if len(self._owners) > self._limit:
                    self._owners.popitem(last=False)  # the oldest pages are long gone
                return True
            self._owners.move_to_end(session_hash)
            return owner == user_id


class UploadOwners:
    """Gradio 5.50 serves any file of its upload folder (`file=`) and accepts any of them in an
    event's payload, whoever uploaded it: each uploaded path is bound to the users who uploaded it
    (the folder is named by a hash of the content, so two users uploading the same file share it)."""

    def __init__(self, limit: int = 200_000):
        self._owners: OrderedDict[str, set[int]] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: str) -> str:
        return os.path.realpath(path)  # as Gradio resolves it (relative to the working directory)

    def record(self, paths: list[str], user_id: int) -> None:
        with self._lock:
            for path in paths:
                key = self._key(path)
                self._owners.setdefault(key, set()).add(user_id)
                self._owners.move_to_end(key)
            while len(self._owners) > self._limit:
                self._owners.popitem(last=False)  # Gradio deletes its cached files after hours anyway

    def foreign(self, path: str, user_id: int) -> bool:
        """The path is another user's upload (not this one's too)."""
        with self._lock:
            owners = self._owners.get(self._key(path))
        return owners is not None and user_id not in owners


def _file_paths(value: Any, found: list[str]) -> list[str]:
    """The files an event's payload names: FileData `path`, and `url`s of the file= route."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "path" and isinstance(item, str):
                found.append(item)
            elif key == "url" and isinstance(item, str) and ("/file=" in item or "/file/" in item):
                found.append(unquote(item.split("/file=", 1)[-1] if "/file=" in item else item.split("/file/", 1)[1]))
            else:
                _file_paths(item, found)
    elif isinstance(value, list):
        for item in value:
            _file_paths(item, found)
    return found


async def _json_body(request: Request) -> Any:
    """The body of a POST FastAPI would parse as JSON (it ignores the content type's case); None otherwise."""
    if request.method != "POST" or "json" not in request.headers.get("content-type", "").lower():
        return None
    try:
        return json.loads(await request.body() or b"{}")
    except ValueError:
        return None


async def _session_hash_of(request: Request) -> str | None:
    """The session_hash a Gradio API request carries: query, heartbeat path or JSON body."""
    path = route_path(request)
    if "/gradio_api/" not in path:
        return None
    value = request.query_params.get("session_hash")
    if value is None and "/heartbeat/" in path:
        value = path.rsplit("/heartbeat/", 1)[1].split("/")[0]
    if value is None:
        body = await _json_body(request)
        value = body.get("session_hash") if isinstance(body, dict) else None
    return str(value) if value else None


def _safe_next(target: str | None) -> str:
    """Only paths of this portal: no scheme, no host, no '//' or backslash tricks."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target or "://" in target:
        return "/ui/"
    return target


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    """A small page of the portal's own (links in `body` must carry the root path)."""
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title></head>"
            f"<body style='font-family:sans-serif;max-width:40em;margin:4em auto'><h2>{escape(title)}</h2>{body}"
            f"</body></html>")
    return HTMLResponse(html, status_code=status)


def install_oidc(app: FastAPI, runs: RunService, settings: Settings, limits: RateLimits | None = None) -> None:
    """Login routes, the session middleware and the guard in front of everything else."""
    limits = limits or RateLimits.from_settings(settings)
    root = settings.root_path  # "" or the sub-path behind a reverse proxy: every URL the browser gets has it
    from authlib.integrations.starlette_client import OAuth, OAuthError

    oauth = OAuth()
    oauth.register(
        name="idp",
        server_metadata_url=settings.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration",
        client_id=settings.oidc_client_id,
        client_secret=settings.oidc_secret(),
        client_kwargs={"scope": settings.oidc_scopes, "code_challenge_method": "S256"},
    )
    # Authlib by default checks the audience only through azp, and the issuer against the discovery
    # document: a token for another client that names this one in azp would pass. Check both here.
    issuer = settings.oidc_issuer
    id_token_rules = {"iss": {"essential": True, "values": sorted({issuer, issuer.rstrip("/")})},
                      "aud": {"essential": True, "values": [settings.oidc_client_id]},
                      "sub": {"essential": True}, "exp": {"essential": True}}
    session_hashes = SessionHashes()
    uploads = UploadOwners()
    idle_s = settings.session_idle_minutes * 60
    max_s = settings.session_max_hours * 3600

    def public_base(request: Request) -> str:
        """The portal's address in the browser: public_url (it ends with the root path), else the
        request's own (base_url carries the root path)."""
        return settings.public_url.rstrip("/") if settings.public_url else str(request.base_url).rstrip("/")

    def callback_url(request: Request) -> str:
        return f"{public_base(request)}/auth/callback"

    def limited(limiter, client: str | None, what: str) -> None:
        if limiter.hit(client):  # once per lock-out: a locked-out client writes no more rows
            runs.audit("-", "rate_limited", what, f"{limiter.limit} {limiter.name.replace('_', ' ')} within "
                       f"{settings.rate_limit_window_seconds} s: refused for as long", client=client)

    def too_many_page(wait: int) -> Response:
        return too_many(wait, "sign-in attempts", _page(
            "Too many sign-in attempts", f"<p>Too many sign-in attempts from your address. Try again in {wait} "
            "seconds; if it persists, tell your portal admin.</p>", 429))

    @app.get("/login")
    async def login(request: Request, next: str | None = None):
        client = request.client.host if request.client else None
        wait = max(limits.login_starts.retry_after(client) or 0, limits.failed_logins.retry_after(client) or 0)
        if wait:
            return too_many_page(wait)
        limited(limits.login_starts, client, "login")
        if next and root and next.startswith(root + "/"):
            next = next[len(root):]  # a next with the sub-path in it: the portal adds it itself
        request.session.clear()
        request.session["next"] = _safe_next(next)
        try:
            return await oauth.idp.authorize_redirect(request, callback_url(request))
        except Exception as err:  # the provider is unreachable or its discovery document is broken
            log.error("OIDC provider unreachable at login: %s", err)
            return _page("Sign-in unavailable", "<p>The company sign-in service cannot be reached. Try again "
                         "in a minute; if it persists, tell your portal admin.</p>", 503)

    @app.get("/auth/callback")
    async def auth_callback(request: Request):
        client = request.client.host if request.client else None
        wait = limits.failed_logins.retry_after(client)
        if wait is not None:
            return too_many_page(wait)
        try:
            named = (await oauth.idp.load_server_metadata()).get("issuer")
            if named not in id_token_rules["iss"]["values"]:  # OIDC Discovery: it must be the configured one
                raise LoginRefused(f"the sign-in service names itself '{named}', not the configured issuer; "
                                   "tell your portal admin")
            token = await oauth.idp.authorize_access_token(request, claims_options=id_token_rules)
            claims = dict(token.get("userinfo") or {})
            user = upsert_oidc_user(runs, settings, claims)
        except Exception as err:  # state, token exchange, ID token (signature, iss, aud, exp, nonce), network
            if isinstance(err, (OAuthError, LoginRefused)):
                reason = getattr(err, "description", None) or str(err) or err.__class__.__name__
            else:  # details (which may quote tokens or SQL) go to the log, not to the page
                log.warning("login refused: %s: %s", err.__class__.__name__, err)
                reason = f"the sign-in could not be completed ({err.__class__.__name__}); try again"
            runs.audit("-", "login_refused", None, f"{err.__class__.__name__}: {reason}"[:500], client=client)
            limited(limits.failed_logins, client, "auth_callback")
            request.session.clear()
            return _page("Sign-in failed", f"<p>{escape(reason)}</p><p><a href='{root}/login'>Try again</a></p>", 400)
        target = _safe_next(request.session.get("next"))
        now = int(time.time())
        request.session.clear()
        id_token = token.get("id_token", "")
        request.session.update({"uid": user.id, "username": user.username, "login_at": now, "seen_at": now,
                                # kept for the provider's logout only when it fits in a cookie
                                "id_token": id_token if len(id_token) <= 2500 else ""})
        runs.audit(user.username, "login", None, f"groups: {user.groups}"[:500], client=client)
        return RedirectResponse(root + target, status_code=303)

    @app.get("/logout")
    async def logout_page(request: Request):
        """A link only shows the button: signing out changes state, so it takes a POST (CSRF-checked)."""
        if not request.session.get("username"):
            return _page("Signed out", f"<p><a href='{root}/login'>Sign in</a></p>")
        return _page("Sign out", f"<form method='post' action='{root}/logout'><button type='submit'>Sign out of the "
                     f"portal</button></form><p><a href='{root}{UI_PATH}/'>Back to the portal</a></p>")

    @app.post("/logout")
    async def logout(request: Request):
        username = request.session.get("username")
        id_token = request.session.get("id_token")
        request.session.clear()
        if username:
            runs.audit(username, "logout", client=request.client.host if request.client else None)
        try:
            metadata = await oauth.idp.load_server_metadata()
        except Exception:  # the provider is down: the portal's own session is gone anyway
            metadata = {}
        end = metadata.get("end_session_endpoint")
        if end and id_token:
            query = urlencode({"id_token_hint": id_token, "post_logout_redirect_uri": f"{public_base(request)}/login"})
            return RedirectResponse(f"{end}?{query}", status_code=303)
        return _page("Signed out", f"<p><a href='{root}/login'>Sign in again</a></p>")

    app.add_middleware(require_session, runs=runs, idle_s=idle_s, max_s=max_s, root=root,
                       session_hashes=session_hashes, uploads=uploads)
    app.add_middleware(_guard_websockets, runs=runs, idle_s=idle_s, max_s=max_s)
    # added last = outermost: the session is decoded before the guards run
    app.add_middleware(SessionMiddleware, secret_key=settings.session_key(), session_cookie=SESSION_COOKIE,
                       max_age=max_s, same_site="lax", path=root or "/",  # not sent to other apps on the host
                       https_only=bool(settings.public_url and settings.public_url.startswith("https://")))


def session_username(request: Request) -> str | None:
    """Gradio's auth_dependency (synchronous on purpose: an async one is never awaited)."""
    user = getattr(request.state, "user", None)
    return user.username if user is not None else None
