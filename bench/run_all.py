"""Run every benchmark in sequence (each in its own process) and print one summary table.

usage: .venv/bin/python bench/run_all.py [--quick] [--only launcher|curves|login|security|datasets|history|chat|api]
                                          [--repeats N] [--viewers N] [--duration S]
(`make bench` runs it with the defaults.) Exit status 0 when every benchmark ran, whatever its
figures: budgets are reported as OK / OVER BUDGET, never failed on; 1 when a benchmark broke.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import _common as C


def run(script: str, extra: list[str]) -> tuple[int, float]:
    C.log(f"running {script} {' '.join(extra)}".rstrip())
    t0 = time.monotonic()
    code = subprocess.call([sys.executable, str(BENCH / script), *extra], cwd=C.ROOT)
    return code, time.monotonic() - t0


def load(name: str, since: float) -> dict | None:
    path = C.RESULTS_DIR / f"{name}.json"
    if not path.is_file() or path.stat().st_mtime < since:
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2 launcher pairs, curves phases of 8 s (figures are noisier)")
    p.add_argument("--only", choices=["launcher", "curves", "login", "security", "datasets", "history", "chat",
                                      "api"])
    p.add_argument("--repeats", type=int, help="launcher-overhead pairs (default 5, --quick 2)")
    p.add_argument("--viewers", type=int, help="live-curves viewers (default 50)")
    p.add_argument("--duration", type=float, help="live-curves seconds per phase (default 20, --quick 8)")
    opts = p.parse_args()

    since = time.time() - 1
    rows: list[tuple[str, str, str, str, str]] = []
    broken: list[str] = []
    times: dict[str, float] = {}

    if opts.only in (None, "launcher"):
        extra = []
        repeats = opts.repeats if opts.repeats is not None else (2 if opts.quick else None)
        if repeats is not None:
            extra += ["--repeats", str(repeats)]
        code, times["launcher_overhead"] = run("bench_launcher_overhead.py", extra)
        r = load("launcher_overhead", since) if code == 0 else None
        if r is None:
            broken.append(f"bench_launcher_overhead.py (exit {code})")
        else:
            n = len(r["portal_runs"])
            rows.append(("launcher overhead", f"median portal / bare ({n} pairs)", f"{r['ratio']:.3f}",
                         f"<= {r['budget_ratio']}", C.verdict(r["ok"])))
            rows.append(("", "median portal, bare (s)", f"{r['median_portal_s']:.2f}, {r['median_bare_s']:.2f}", "", ""))
            rows.append(("", f"exit noticed after (wait interval {r['wait_interval_s']} s)",
                         f"{r['median_exit_detect_lag_ms']:.0f} ms", "", ""))

    if opts.only in (None, "curves"):
        extra = []
        duration = opts.duration if opts.duration is not None else (8 if opts.quick else None)
        if duration is not None:
            extra += ["--duration", str(duration)]
        if opts.viewers is not None:
            extra += ["--viewers", str(opts.viewers)]
        code, times["live_curves"] = run("bench_live_curves.py", extra)
        r = load("live_curves", since) if code == 0 else None
        if r is None:
            broken.append(f"bench_live_curves.py (exit {code})")
        else:
            ph, v = r["phases"], r["params"]["viewers"]
            fb, lb = f"<= {r['budget_fetches_per_s']:.2f}/s", f"<= {r['budget_p95_ms']:.0f} ms"
            if "cached" in ph:
                c = ph["cached"]
                rows.append(("live curves", f"{v} viewers: MLflow fetches/s (cached)", f"{c['fetches_per_s']:.2f}/s", fb,
                             C.verdict(c["fetches_per_s"] <= r["budget_fetches_per_s"] + 1e-9)))
                rows.append(("", f"{v} viewers: runs.metrics p50 / p95", f"{c['p50_ms']:.1f} / {c['p95_ms']:.1f} ms", lb,
                             C.verdict(c["p95_ms"] <= r["budget_p95_ms"])))
            if "refresh" in ph:
                f = ph["refresh"]
                rows.append(("", f"{v} viewers: Runs-tab refresh p50 / p95", f"{f['p50_ms']:.1f} / {f['p95_ms']:.1f} ms",
                             lb, C.verdict(f["p95_ms"] <= r["budget_p95_ms"])))
            if "uncached" in ph:
                u = ph["uncached"]
                rows.append(("", "without the cache: fetches/s, p95",
                             f"{u['fetches_per_s']:.2f}/s, {u['p95_ms']:.1f} ms", "(comparison)", ""))
            s = r.get("summary", {})
            if "fetch_ratio_uncached_over_cached" in s:
                rows.append(("", "cache saving: fetches, p95 (uncached/cached)",
                             f"{s['fetch_ratio_uncached_over_cached']:.0f}x, {s['p95_ratio_uncached_over_cached']:.1f}x",
                             "", ""))

    if opts.only in (None, "login"):
        since = time.time()
        code, times["login"] = run("bench_login.py", ["--logins", "10"] if opts.quick else [])
        r = load("login", since)
        if code != 0 or r is None:
            broken.append(f"bench_login.py (exit {code})")
        else:
            rows.append(("login", "OIDC login round trip p50 / p95",
                         f"{r['login_ms']['p50']:.0f} / {r['login_ms']['p95']:.0f} ms", "(recorded)", ""))
            rows.append(("", f"memory per idle session ({r['sessions']} sessions)",
                         f"{r['memory_per_session_kb']:.1f} KB", "(recorded)", ""))

    if opts.only in (None, "security"):
        since = time.time()
        code, times["security_layer"] = run("bench_security_layer.py", ["--requests", "200"] if opts.quick else [])
        r = load("security_layer", since)
        if code != 0 or r is None:
            broken.append(f"bench_security_layer.py (exit {code})")
        else:
            n = r["params"]["requests"]
            for key, c in r["comparisons"].items():
                label, route = key.split(":")
                what = "security layer" if label == "layer" else "login guard (OIDC)"
                rows.append(("security layer" if key == "layer:healthz" else "",
                             f"{what}: GET {r['routes'][route]} p50 / p95 added ({n} req.)",
                             f"{c['added_p50_ms']:+.2f} / {c['added_p95_ms']:+.2f} ms "
                             f"(x{c['ratio_p50']:.2f} / x{c['ratio_p95']:.2f})", "(recorded)", ""))

    if opts.only in (None, "datasets"):
        since = time.time()
        code, times["dataset_check"] = run("bench_dataset_check.py", ["--formats", "jsonl"] if opts.quick else [])
        r = load("dataset_check", since)
        if code != 0 or r is None:
            broken.append(f"bench_dataset_check.py (exit {code})")
        else:
            big = max((f for f in r["files"] if f["format"] == "jsonl"), key=lambda f: f["size_mb"])
            rows.append(("dataset upload", f"jsonl {big['size_mb']:.0f} MB: check / whole upload",
                         f"{big['wall_s']:.2f} / {big['upload_wall_s']:.2f} s", "(recorded)", ""))
            s = r["summary"].get("jsonl")
            if s:
                rows.append(("", "added peak memory per million rows (jsonl)", f"{s['mb_per_million_rows']:.1f} MB",
                             f"<= {r['budget_mb_per_million_rows']:.0f} MB", "OK" if r["ok"] else "OVER BUDGET"))

    if opts.only in (None, "history"):
        since = time.time()
        code, times["history"] = run("bench_history.py", ["--runs", "20000", "--repeats", "10"] if opts.quick else [])
        r = load("history", since)
        if code != 0 or r is None:
            broken.append(f"bench_history.py (exit {code})")
        else:
            for backend, results in r["results"].items():
                worst = max(results, key=lambda x: x["p95_ms"])
                rows.append(("history" if backend == "sqlite" else "",
                             f"{backend}, {r['params']['runs']:,} runs: worst query p95 ({worst['query']})",
                             f"{worst['p95_ms']:.1f} ms", f"<= {r['budget_p95_ms']:.0f} ms",
                             "OK" if worst["p95_ms"] <= r["budget_p95_ms"] else "OVER BUDGET"))

    if opts.only in (None, "chat"):
        since = time.time()
        code, times["chat_ttft"] = run("bench_chat_ttft.py", ["--pairs", "5", "--sets", "1"] if opts.quick else [])
        r = load("chat_ttft", since)
        if code != 0 or r is None:
            broken.append(f"bench_chat_ttft.py (exit {code})")
        else:
            sets = r.get("set_ratios") or [r["ratio"]]
            rows.append(("chat", f"first token: median portal / direct, median of {len(sets)} sets of "
                                 f"{len(r['portal']) // len(sets)} pairs", f"{r['ratio']:.3f}",
                         f"<= {r['budget_ratio']}", C.verdict(r["ok"])))
            rows.append(("", "first token median portal, direct (ms)",
                         f"{r['portal_ttft_ms']['median']:.1f}, {r['direct_ttft_ms']['median']:.1f}", "", ""))
            rows.append(("", "first chat of a run (starts its server)", f"{r['first_chat_ttft_s']:.2f} s",
                         "(recorded)", ""))

    if opts.only in (None, "api"):
        since = time.time()
        code, times["api_git"] = run("bench_api_git.py", ["--quick"] if opts.quick else [])
        r = load("api_git", since)
        if code != 0 or r is None:
            broken.append(f"bench_api_git.py (exit {code})")
        else:
            n, me, lst = r["params"]["requests"], r["api"]["me"], r["api"]["runs"]
            rows.append(("API tokens", f"GET /api/me p50 token / no header ({n} req.)",
                         f"{me['token']['p50_ms']:.2f} / {me['none']['p50_ms']:.2f} ms ({me['added_p50_ms']:+.2f})",
                         "(recorded)", ""))
            rows.append(("", f"GET /api/runs?limit=50 p50 / p95, token ({r['params']['runs']} runs)",
                         f"{lst['token']['p50_ms']:.1f} / {lst['token']['p95_ms']:.1f} ms", "(recorded)", ""))
            g = r["git"]
            rows.append(("git export", f"export p50 / p95 ({g['export']['n']} commits)",
                         f"{g['export']['p50_ms']:.0f} / {g['export']['p95_ms']:.0f} ms", "(recorded)", ""))
            rows.append(("", "unchanged re-export, list_configs p50",
                         f"{g['unchanged']['p50_ms']:.0f}, {g['list_configs']['p50_ms']:.0f} ms", "(recorded)", ""))
            rows.append(("", "first export, cold cache (median)", f"{g['cold']['p50_ms']:.0f} ms", "(recorded)", ""))
            one, two = r["k8s"]["1 node (Job)"]["total"], r["k8s"]["2 nodes (JobSet)"]["total"]
            rows.append(("k8s manifests", "build + to_yaml p50: 1 node, 2 nodes (JobSet)",
                         f"{one['p50_ms']:.2f}, {two['p50_ms']:.2f} ms", "(recorded)", ""))

    print()
    print(f"== summary ({time.strftime('%Y-%m-%d %H:%M')}, {C.machine()['cpus']} CPUs) ==")
    widths = [max(len(row[i]) for row in rows + [("benchmark", "figure", "value", "budget", "")]) for i in range(5)]
    head = ("benchmark", "figure", "value", "budget", "")
    for row in [head, *rows]:
        print("  " + "  ".join(cell.ljust(widths[i]) if i != 2 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
    for name, secs in times.items():
        print(f"  ({name}: {secs:.0f} s)")
    for b in broken:
        print(f"  BROKEN: {b}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
