"""The FastAPI app: /healthz, and the Gradio UI mounted at /ui behind the portal's user check."""

from __future__ import annotations

import ipaddress
import logging
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from . import __version__
from .inference import aclose_http
from .models import User
from .ratelimit import RateLimits, too_many
from .recent import Recent
from .request_context import client_address
from .services import Services
from .tokens import TOKEN_PREFIX, bearer_token

log = logging.getLogger(__name__)
UI_PATH = "/ui"
LOCAL_USER_SECONDS = 5.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Gradio routes the portal never uses and that Gradio 5.50 leaves open or abusable
# (file=http... open redirect/SSRF, the proxy, monitoring, MCP, deep links to saved page states).
REFUSED_PREFIXES = (f"{UI_PATH}/gradio_api/file=http", f"{UI_PATH}/file=http", f"{UI_PATH}/gradio_api/file/http",
                    f"{UI_PATH}/file/http", f"{UI_PATH}/proxy=",
                    f"{UI_PATH}/gradio_api/proxy=", f"{UI_PATH}/monitoring", f"{UI_PATH}/gradio_api/mcp",
                    f"{UI_PATH}/gradio_api/upload_progress", f"{UI_PATH}/gradio_api/deep_link")
TOKEN_PATHS = ("/api/", "/v1/")  # where a personal access token signs in (never the browser UI)
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def route_path(conn: HTTPConnection) -> str:
    """The path inside the portal, without the sub-path (root_path) a reverse proxy serves it under:
    every check on paths reads this, so /llm/ui/... is checked as /ui/..."""
    path, root = conn.scope["path"], conn.scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


def hostile_request(request: HTTPConnection, public_url: str | None = None) -> str | None:
    """Why a request (HTTP or WebSocket handshake) is refused before any route sees it (None: let it through)."""
    path = route_path(request)
    if path.lower().startswith(REFUSED_PREFIXES):  # Gradio treats "HTTP://" as a URL too
        return "this route is disabled in the portal"
    if "deep_link" in request.query_params:  # loads a saved page state by its hash, whoever saved it
        return "deep links are disabled in the portal"
    # a WebSocket is not bound by the same-origin policy: a browser sends its page's Origin, check it always
    if request.scope["type"] == "websocket" or request.scope.get("method") in STATE_CHANGING:
        origin = request.headers.get("origin")
        scheme = {"ws": "http", "wss": "https"}.get(request.url.scheme, request.url.scheme)
        own = {f"{scheme}://{request.headers.get('host', '')}"}
        if public_url:  # behind a reverse proxy the browser's origin is the public one
            parts = urlsplit(public_url)
            own.add(f"{parts.scheme}://{parts.netloc}")
        if origin is not None and origin not in own:
            return "cross-site request refused (the Origin is not this portal)"
        if request.headers.get("sec-fetch-site") == "cross-site":
            return "cross-site request refused"
    return None


def refusal(conn: HTTPConnection, settings) -> str | None:  # noqa: ANN001 (portal.config.Settings)
    """Why the security layer refuses a request or WebSocket handshake (None: let it through)."""
    reason = hostile_request(conn, settings.public_url)
    if reason is None and settings.auth_mode == "none" and not loopback_host_header(conn.headers.get("host")):
        reason = "without login the portal answers only on a loopback address (localhost, 127.0.0.1, ::1)"
    return reason


def guard_websockets(app, settings):  # noqa: ANN001 (an ASGI app; portal.config.Settings)
    """The HTTP middleware never sees WebSocket handshakes: the same refusals (foreign Origin,
    disabled routes, a non-loopback Host without login) for them, in both auth modes."""

    async def guard(scope, receive, send):
        if scope["type"] == "websocket":
            reason = refusal(HTTPConnection(scope), settings)
            if reason is not None:
                log.warning("WebSocket refused (%s): %s", reason, scope.get("path"))
                await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
                return
        await app(scope, receive, send)

    return guard


def serve_under_root_path(app, root_path: str):  # noqa: ANN001 (an ASGI app)
    """Sub-path deployment (decision 0017): the proxy strips /llm (or keeps it; both work), the
    portal puts it back as the ASGI root_path, so routing strips it and every URL it makes has it.
    X-Forwarded-Host is dropped: URLs are built from Host (which the proxy must pass on), so a
    client cannot choose the host Gradio writes into its pages."""

    async def asgi(scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"x-forwarded-host"])
            if root_path:
                path = scope["path"]
                if not (path == root_path or path.startswith(root_path + "/")):
                    scope["path"] = root_path + path
                    scope["raw_path"] = root_path.encode() + (scope.get("raw_path") or path.encode())
                scope["root_path"] = root_path
        await app(scope, receive, send)

    return asgi


def uvicorn_proxy_options(settings) -> dict:  # noqa: ANN001 (portal.config.Settings)
    """X-Forwarded-For/-Proto are believed only from the configured proxies (none by default:
    the client address in the audit log and the rate limits is the TCP peer's)."""
    return {"proxy_headers": bool(settings.trusted_proxies), "forwarded_allow_ips": list(settings.trusted_proxies)}


def security_layer(app, settings):  # noqa: ANN001 (an ASGI app; portal.config.Settings)
    """The refusals of ``refusal`` before any route, and the security headers on every response
    (refusals included); Gradio's ``Access-Control-*`` headers removed. Plain ASGI: Starlette's
    BaseHTTPMiddleware adds a task and a memory stream per request and per piece of a streamed
    answer, measured as milliseconds on the chat's time to first token."""
    extra = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"),
             (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin")]
    if (settings.public_url or "").startswith("https://"):
        extra.append((b"strict-transport-security", b"max-age=31536000"))

    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        client_address.set(conn.client.host if conn.client else None)  # for the audit log

        async def send_secured(message):
            if message["type"] == "http.response.start":
                # Gradio echoes any Origin with credentials allowed: never cross-site
                headers = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
                present = {k.lower() for k, _ in headers}
                message = {**message, "headers": headers + [(k, v) for k, v in extra if k not in present]}
            await send(message)

        reason = refusal(conn, settings)
        if reason is not None:
            await JSONResponse({"detail": reason}, status_code=403)(scope, receive, send_secured)
            return
        await app(scope, receive, send_secured)

    return asgi


def token_layer(app, settings, services, limits):  # noqa: ANN001 (an ASGI app and the portal's parts)
    """A personal access token (``Authorization: Bearer lbp_...``) signs in on /api and /v1:
    ``request.state.user`` is its user. Unknown tokens: 401, and a lock-out per client address
    after ``rate_limit_bad_tokens`` of them. Plain ASGI, like ``security_layer``."""

    async def asgi(scope, receive, send):
        if scope["type"] == "http":
            conn = HTTPConnection(scope)
            token = bearer_token(conn.headers.get("authorization"))
            if token is not None and settings.auth_mode == "none" and not token.startswith(TOKEN_PREFIX):
                token = None  # loopback, no login: an OpenAI client's placeholder key ("EMPTY") is no token
            if token is not None and route_path(conn).startswith(TOKEN_PATHS):
                client = conn.client.host if conn.client else None
                wait = limits.bad_tokens.retry_after(client)
                if wait is not None:  # locked out after too many bad tokens: not even looked up
                    await too_many(wait, "unknown API tokens")(scope, receive, send)
                    return
                user = await run_in_threadpool(services.tokens.authenticate, token, client)
                if user is None:
                    if limits.bad_tokens.hit(client):
                        await run_in_threadpool(services.runs.audit, "-", "rate_limited", "api_token",
                                                f"{limits.bad_tokens.limit} unknown API tokens within "
                                                f"{settings.rate_limit_window_seconds} s", client=client)
                    refused = JSONResponse({"detail": "the API token is unknown, revoked or expired: make a new one "
                                                      "(Account tab, or `llamaboard-portal tokens create USER` on the "
                                                      "portal's machine)"},
                                           status_code=401, headers={"WWW-Authenticate": "Bearer"})
                    await refused(scope, receive, send)
                    return
                conn.state.user = user  # scope["state"]: what request.state reads downstream
                conn.state.token_auth = True
        await app(scope, receive, send)

    return asgi


def loopback_host_header(host_header: str | None) -> bool:
    """The Host header names this machine's loopback (any port): without login the portal answers
    nothing else, so a page on another site cannot reach it by DNS rebinding."""
    host = (host_header or "").strip().lower()
    if host.startswith("["):
        host = host[1:].split("]")[0]
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return is_loopback(host)


def create_app(services: Services, *, supervise: bool = True) -> FastAPI:
    settings = services.settings
    runs = services.runs

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if supervise:
            if settings.launcher == "local":
                runs.poll_active()  # re-attach to jobs that ran on while the portal was down
            # a cluster's API may be slow or down: the supervisor's first tick re-attaches, in its
            # thread, so the portal still starts (and answers its health probe)
            runs.start_supervisor()
        yield
        # jobs are never stopped here: local ones and Kubernetes Jobs outlive the portal
        services.chat.close()  # no model server outlives the portal, no adapter stays loaded
        await aclose_http()  # the gateway's connections to model servers
        if supervise:
            runs.stop_supervisor()

    # the API's description lives beside it, so a token can read it too
    app = FastAPI(title="LLaMA Board Portal", version=__version__, lifespan=lifespan, openapi_url="/api/openapi.json",
                  docs_url="/api/docs", redoc_url=None)

    @app.get("/healthz")
    def healthz():
        checks = {}
        try:
            with services.db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as err:  # report, do not crash the probe
            checks["database"] = f"error: {err.__class__.__name__}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "version": __version__, "launcher": settings.launcher,
                             "auth": settings.auth_mode, **checks}, status_code=200 if ok else 503)

    @app.get("/")
    def root():
        return RedirectResponse(f"{settings.root_path}{UI_PATH}/")

    limits = RateLimits.from_settings(settings)
    app.state.rate_limits = limits
    if settings.auth_mode == "oidc":
        from .auth import install_oidc, session_username

        install_oidc(app, runs, settings, limits)
        current_username = session_username
        if settings.launcher == "local":
            log.warning("OIDC login with the local launcher: every job runs as this portal's OS user and can read "
                        "all users' files; use it for one trusted team only (see docs/admin-guide.md)")
    else:
        local_user = runs.ensure_user(settings.local_username, is_admin=True)

        def current_username(request: Request) -> str | None:
            # auth: none: one local user; only ever served on loopback (checked by `serve`).
            return local_user.username

    # without login the one local user is read at most every LOCAL_USER_SECONDS (decision 0024); with
    # login the guard has put the signed-in user, read for this request, on request.state
    local_read: Recent[str, User] | None = Recent(LOCAL_USER_SECONDS, 1) if settings.auth_mode == "none" else None

    def request_user(request: Request) -> User | None:
        """Who calls /api and /v1: a token's user, else the signed-in (or local) user."""
        user = getattr(request.state, "user", None)
        if user is not None:
            return user
        name = current_username(request)
        if not name:
            return None
        user = local_read.get(name) if local_read is not None else None
        if user is None:
            try:
                user = runs.user(name)
            except PermissionError:  # deactivated meanwhile
                return None
            if local_read is not None:
                local_read.put(name, user)
        return user

    from .api import build_api
    from .gateway import build_gateway

    app.include_router(build_api(runs, request_user))  # /api: JSON for scripts and CI
    app.include_router(build_gateway(services.chat, request_user))  # /v1: OpenAI-compatible, behind the same login

    # added after the login guard: it runs first, so a valid token stands for a session
    app.add_middleware(token_layer, settings=settings, services=services, limits=limits)
    # added after the login guard: outside it, so refusals get the headers too
    app.add_middleware(security_layer, settings=settings)

    from .ui.app import build_ui

    blocks = build_ui(runs, services.chat, sign_out=settings.auth_mode == "oidc")
    blocks.queue(default_concurrency_limit=8)
    app.add_middleware(guard_websockets, settings=settings)  # outer to the HTTP layer: WebSockets pass it
    app.add_middleware(serve_under_root_path, root_path=settings.root_path)  # outermost: paths first
    # Gradio writes its own URLs (assets, API) from root_path: behind a sub-path it must name it
    app = gr.mount_gradio_app(app, blocks, path=UI_PATH, auth_dependency=current_username,
                              max_file_size=f"{settings.max_upload_mb}mb", show_api=False,
                              root_path=f"{settings.root_path}{UI_PATH}" if settings.root_path else None)
    app.state.blocks = blocks
    return app
