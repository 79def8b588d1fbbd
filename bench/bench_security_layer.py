"""What the web security layer adds to a request: /healthz and Gradio's config, with and without it.

usage: .venv/bin/python bench/bench_security_layer.py [--requests 1000] [--block 50] [--warmup 100] [--no-oidc]

"The layer" is the `security_layer` ASGI middleware of portal/web.py: the hostile-request
refusals (disabled Gradio routes, cross-site writes), the stripping of Gradio's CORS headers and
the security headers on every response. Two apps are built from the same services with
`create_app(services, supervise=False)` in auth mode none (loopback):

  with     -- the app as the portal serves it;
  without  -- the same app with that one middleware taken out of `app.user_middleware` before its
              first request (Starlette builds the middleware stack lazily, at the first request).

Each is served by uvicorn in a thread on a free loopback port, and one `httpx.Client` (keep-alive)
sends GET /healthz and GET /ui/config (what a Gradio page asks for first) to both, in blocks of
--block requests that alternate between the variants, so that drift on the machine (it is shared)
falls on both alike. --requests are timed per route and variant, after --warmup untimed ones.

With OIDC (unless --no-oidc) a third variant takes part in the same rotation: the app with
`auth_mode: oidc` against oidc-provider-mock (the provider bench_login.py and the tests use), with
one signed-in session. Its extra cost over "with" is the login guard: the signed session cookie,
the user looked up in the database, the session_hash check, the Gradio auth_dependency.

No MLflow server is started: neither route reads MLflow, and the run supervisor is off.
"""

from __future__ import annotations

import argparse
import contextlib
import http.cookiejar
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (bench/ is not a package)

NAME = "security_layer"
LAYER = "security_layer"  # the middleware factory's name in portal/web.py
ROUTES = {"healthz": "/healthz", "config": "/ui/config"}


def remove_layer(app) -> None:
    """Take the security middleware out of a not yet started app (asserting it was there)."""
    assert app.middleware_stack is None, "the app has served a request: its middleware stack is built"
    found = [m for m in app.user_middleware if getattr(m.cls, "__name__", None) == LAYER]
    assert len(found) == 1, f"expected one '{LAYER}' middleware, found {len(found)} in {app.user_middleware}"
    app.user_middleware.remove(found[0])


def oidc_login(url: str, issuer: str) -> str:
    """One browser-like sign-in against oidc-provider-mock; returns the session cookie."""
    assert httpx.put(f"{issuer}/users/bench-sub", json={"preferred_username": "bench"}).status_code == 204
    with httpx.Client(base_url=url) as client:
        authorize = client.get("/login").headers["location"]
        back = httpx.post(authorize, data={"sub": "bench-sub"}).headers["location"]
        assert client.get(back).status_code == 303
        cookie = client.cookies.get("portal_session")
    assert cookie
    return cookie


def measure(client: httpx.Client, targets: dict[str, dict[str, Any]], requests: int, block: int,
            warmup: int) -> dict[str, dict[str, list[float]]]:
    """Latencies in ms per variant and route; variants alternate every `block` requests."""
    for t in targets.values():  # untimed: first Gradio config, connection set-up, caches
        for path in ROUTES.values():
            for _ in range(warmup):
                assert client.get(t["url"] + path, headers=t["headers"]).status_code == 200
    times: dict[str, dict[str, list[float]]] = {v: {r: [] for r in ROUTES} for v in targets}
    order = list(targets)
    rounds = -(-requests // block)
    for i in range(rounds):
        n = min(block, requests - i * block)
        turn = order[i % len(order):] + order[: i % len(order)]  # who goes first rotates too
        for variant in turn:
            t = targets[variant]
            for route, path in ROUTES.items():
                url, headers, lst = t["url"] + path, t["headers"], times[variant][route]
                for _ in range(n):
                    t0 = time.perf_counter()
                    r = client.get(url, headers=headers)
                    lst.append((time.perf_counter() - t0) * 1000)
                    if r.status_code != 200:
                        raise RuntimeError(f"{variant} {path}: {r.status_code} {r.text[:200]}")
    return times


def check_variants(client: httpx.Client, targets: dict[str, dict[str, Any]]) -> None:
    """The variants differ as intended: the layer's header and refusal only where it is on."""
    for variant, t in targets.items():
        r = client.get(t["url"] + "/healthz", headers=t["headers"])
        refused = client.get(t["url"] + "/ui/monitoring/summary", headers=t["headers"]).status_code == 403
        has_layer = r.headers.get("x-frame-options") == "DENY" and refused
        assert has_layer == (variant != "without"), f"{variant}: security layer {'on' if has_layer else 'off'}"
        if variant == "oidc":  # and the guard is on: no cookie, no config
            assert client.get(t["url"] + "/ui/config").status_code == 401


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000, help="timed requests per route and variant (1000)")
    p.add_argument("--block", type=int, default=50, help="requests in a row before the next variant (50)")
    p.add_argument("--warmup", type=int, default=100, help="untimed requests per route and variant first (100)")
    p.add_argument("--no-oidc", action="store_true", help="skip the OIDC variant (the login guard's cost)")
    opts = p.parse_args(argv)

    from portal.config import Settings
    from portal.services import build_services
    from portal.web import create_app

    started = time.monotonic()
    variants = "with, without" + ("" if opts.no_oidc else ", oidc")
    C.log(f"{NAME}: {opts.requests} timed requests per route and variant ({variants}), blocks of {opts.block}")
    nowhere = f"http://127.0.0.1:{C.free_port()}"  # MLflow: never asked by these routes
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="lbp-bench-security-"))
        settings = Settings(data_root=Path(tmp) / "portal", mlflow_tracking_uri=nowhere, gpus=[])
        services = build_services(settings)
        t0 = time.monotonic()
        app_with = create_app(services, supervise=False)
        app_without = create_app(services, supervise=False)
        remove_layer(app_without)
        apps = {"with": app_with, "without": app_without}
        if not opts.no_oidc:
            import oidc_provider_mock

            idp_server = stack.enter_context(oidc_provider_mock.run_server_in_thread())
            issuer = f"http://localhost:{idp_server.server_port}"
            oidc_settings = Settings(data_root=Path(tmp) / "portal-oidc", mlflow_tracking_uri=nowhere, gpus=[],
                                     auth_mode="oidc", oidc_issuer=issuer, oidc_client_id="portal",
                                     oidc_client_secret="bench-secret")
            apps["oidc"] = create_app(build_services(oidc_settings), supervise=False)
        C.log(f"{len(apps)} apps built ({time.monotonic() - t0:.1f} s)")
        servers = {v: stack.enter_context(C.Served(app)) for v, app in apps.items()}
        targets = {v: {"url": s.url, "headers": {}} for v, s in servers.items()}
        if "oidc" in targets:  # the session goes in a header: the client stores no cookie (all apps are 127.0.0.1)
            targets["oidc"]["headers"] = {"cookie": f"portal_session={oidc_login(servers['oidc'].url, issuer)}"}
        no_cookies = http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        client = stack.enter_context(httpx.Client(timeout=30, cookies=no_cookies))
        check_variants(client, targets)
        load_before = os.getloadavg()[0]
        with C.CpuMeter() as cpu:
            times = measure(client, targets, opts.requests, opts.block, opts.warmup)
        load_after = os.getloadavg()[0]

    figures: dict[str, dict[str, dict[str, float]]] = {}
    for variant, per_route in times.items():
        figures[variant] = {route: {"n": len(v), "p50_ms": C.median(v), "p95_ms": C.percentile(v, 95),
                                    "p99_ms": C.percentile(v, 99), "mean_ms": sum(v) / len(v)}
                            for route, v in per_route.items()}
    comparisons: dict[str, dict[str, float]] = {}
    pairs = [("layer", "with", "without")] + ([("login_guard", "oidc", "with")] if "oidc" in figures else [])
    for label, a, b in pairs:
        for route in ROUTES:
            fa, fb = figures[a][route], figures[b][route]
            comparisons[f"{label}:{route}"] = {
                "added_p50_ms": fa["p50_ms"] - fb["p50_ms"], "added_p95_ms": fa["p95_ms"] - fb["p95_ms"],
                "ratio_p50": fa["p50_ms"] / fb["p50_ms"], "ratio_p95": fa["p95_ms"] / fb["p95_ms"]}
    total = time.monotonic() - started

    print()
    print(f"== {NAME}: {opts.requests} requests per route and variant, keep-alive, blocks of {opts.block} "
          f"alternating; load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} CPUs ==")
    print(f"  {'variant':<9} {'route':<22} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for variant, per_route in figures.items():
        for route, f in per_route.items():
            print(f"  {variant:<9} {'GET ' + ROUTES[route]:<22} {f['p50_ms']:>8.2f} {f['p95_ms']:>8.2f} "
                  f"{f['p99_ms']:>8.2f} {f['mean_ms']:>8.2f}")
    names = {"layer": "security layer (with / without)", "login_guard": "login guard (oidc / with)"}
    for key, c in comparisons.items():
        label, route = key.split(":")
        print(f"  {names[label]:<32} GET {ROUTES[route]:<12} adds {c['added_p50_ms']:+.2f} ms p50 "
              f"(x{c['ratio_p50']:.2f}), {c['added_p95_ms']:+.2f} ms p95 (x{c['ratio_p95']:.2f})")
    others = cpu.others_cpu_s / cpu.wall_s if cpu.wall_s else 0.0
    print(f"  CPU while measuring: this process {cpu.self_cpu_s / cpu.wall_s:.2f} cores (client and servers), "
          f"other processes {others:.2f} cores, over {cpu.wall_s:.0f} s")
    notes = []
    if others > 0.25 or max(load_before, load_after) > 0.8 * (os.cpu_count() or 1):
        notes.append(f"the machine was busy (other processes {others:.2f} cores, load average {load_before:.1f} -> "
                     f"{load_after:.1f} on {os.cpu_count()} CPUs): p95 and p99 carry their interference; the "
                     "variants alternated in blocks, so the p50 differences are the figures to read")
    for note in notes:
        print(f"  note: {note}")
    print(f"  (wall time of this benchmark: {total:.0f} s)")
    result = {"params": vars(opts), "routes": ROUTES, "figures": figures, "comparisons": comparisons,
              "cpu": cpu.as_dict(), "loadavg_1m": [load_before, load_after], "notes": notes, "wall_s": total}
    path = C.write_result(NAME, result)
    print(f"  results: {os.path.relpath(path, C.ROOT)}")
    return result


if __name__ == "__main__":
    main()
