"""Live curves: N concurrent viewers (default 50) of one running run, each refreshing every 2 s.

A real training runs through RunService and the local launcher (with the run supervisor on, as
in the web app) while N threads each call, every INTERVAL seconds, staggered evenly over the
interval like browsers opened at different moments:

  cached   -- RunService.metrics(user, run_id): what the Runs tab's timer calls for the curve
              (the shared MetricsCache: one MLflow read per run per metrics_refresh_seconds);
  uncached -- Tracker.history(mlflow_run_id) directly per viewer: the same without the cache
              (the comparison the cache is there to beat);
  refresh  -- the Runs tab's whole `refresh` function (portal/ui/runs.py), taken from
              build_runs_tab inside a gr.Blocks and called with a stand-in for gr.Request that
              carries only `username` (current_user reads nothing else): run list, run, curve,
              log tail, config -- everything the timer does except Gradio's own queue/HTTP.

  idle     -- no viewers (last): the MLflow server's CPU while only the trainer talks to it.

Figures per phase: metric-history fetches per second for the run (one fetch = Tracker.history =
one MLflow get-metric-history request per curve key, counted by Tracker.reads; for the cached
phases the rate is taken from the gaps between the cache's fetches, which a count over a short
window overstates by one at its edges; MetricsCache.fetches gives the count), the shortest gap
between two fetches (>= the TTL means "at most one read per interval"), viewer-refresh latency
p50/p95/p99/max, and the MLflow server's CPU seconds.
Budgets: fetches/s <= 1 per metrics_refresh_seconds (1 / 2 s) per run; p95 <= 200 ms.

usage: .venv/bin/python bench/bench_live_curves.py [--viewers 50] [--duration 20] [--interval 2] ...
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402  (bench/ is not a package)

NAME = "live_curves"
BUDGET_P95_MS = 200.0


def run_viewers(fn: Callable[[], Any], viewers: int, interval: float, duration: float) -> dict[str, Any]:
    """`viewers` threads call fn every `interval` s (phases spread over the interval) for `duration` s."""
    latencies: list[list[float]] = [[] for _ in range(viewers)]
    errors: list[str] = []
    barrier = threading.Barrier(viewers + 1)
    start_box: dict[str, float] = {}

    def viewer(i: int) -> None:
        barrier.wait()
        start = start_box["t"]
        end = start + duration
        nxt = start + interval * i / viewers
        mine = latencies[i]
        while True:
            now = time.monotonic()
            if nxt >= end:
                return
            if nxt > now:
                time.sleep(nxt - now)
            t0 = time.monotonic()
            try:
                fn()
            except Exception as err:  # noqa: BLE001 -- counted and reported, the viewer goes on
                errors.append(f"{type(err).__name__}: {err}"[:200])
            t1 = time.monotonic()
            mine.append(t1 - t0)
            nxt = max(nxt + interval, t1)  # a slow refresh delays the next tick, never piles up

    threads = [threading.Thread(target=viewer, args=(i,), daemon=True, name=f"viewer-{i}") for i in range(viewers)]
    for t in threads:
        t.start()
    start_box["t"] = time.monotonic()
    barrier.wait()
    if not viewers:  # the idle baseline: nobody watching
        time.sleep(duration)
    for t in threads:
        t.join(timeout=duration + 120)
    wall = time.monotonic() - start_box["t"]
    flat = [x for lst in latencies for x in lst]
    return {"calls": len(flat), "errors": len(errors), "error_samples": errors[:5], "wall_s": wall,
            "p50_ms": C.percentile(flat, 50) * 1000, "p95_ms": C.percentile(flat, 95) * 1000,
            "p99_ms": C.percentile(flat, 99) * 1000, "max_ms": (max(flat) * 1000) if flat else float("nan"),
            "mean_ms": (sum(flat) / len(flat) * 1000) if flat else float("nan")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--viewers", type=int, default=50)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per phase (default 20)")
    p.add_argument("--interval", type=float, default=2.0, help="each viewer's refresh period, s (the Runs tab timer: 2)")
    p.add_argument("--epochs", type=float, default=150.0, help="training epochs (the run is cancelled after the phases)")
    p.add_argument("--phases", default="cached,uncached,refresh,idle",
                   help="comma list of cached, uncached, refresh, idle (default all four, in that order)")
    p.add_argument("--start-timeout", type=float, default=180.0, help="s to wait for the run's first loss point")
    p.add_argument("--settle", type=float, default=5.0,
                   help="s to wait after the first loss point before measuring (the trainer's start-up burst)")
    p.add_argument("--keep", action="store_true", help="keep the temp data root")
    opts = p.parse_args(argv)
    phases = [x.strip() for x in opts.phases.split(",") if x.strip()]
    for ph in phases:
        if ph not in ("idle", "cached", "uncached", "refresh"):
            p.error(f"unknown phase {ph}")

    started = time.monotonic()
    C.log(f"{NAME}: {opts.viewers} viewers every {opts.interval} s, {opts.duration} s per phase: {', '.join(phases)}")
    results: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    with C.bench_env("curves", keep=opts.keep, metrics_refresh_seconds=2.0, cancel_grace_seconds=5,
                     dispatch_interval_seconds=1.0) as env:
        services = env["services"]
        runs, tracker = services.runs, services.tracker
        ttl = services.settings.metrics_refresh_seconds
        user = runs.ensure_user("bench")
        args = C.demo_args(env["demo_config"], num_train_epochs=float(opts.epochs), logging_steps=2, save_steps=100000)
        runs.start_supervisor()  # as create_app does: polls jobs every dispatch_interval_seconds
        try:
            t0 = time.monotonic()
            run = runs.submit_args(user, args, name=f"bench_curves_{time.strftime('%H%M%S')}", source="bench")
            mlflow_run_id = run.mlflow_run_id
            last_note = t0
            while True:  # until the trainer has logged its first loss point
                run = runs.get_run(user, run.id)
                if run.status.is_final:
                    raise RuntimeError(f"run ended before the viewers started: {run.status.value} {run.status_reason}\n"
                                       + runs.logs(user, run.id)[-3000:])
                h0 = time.monotonic()
                try:
                    points = tracker.history(mlflow_run_id)
                    seen = f"{len(points)} points"
                except Exception as err:  # noqa: BLE001 -- MLflow busy: say so and try again
                    points, seen = [], f"MLflow error {type(err).__name__}: {err}"[:200]
                took = time.monotonic() - h0
                if run.status.value == "running" and any(pt.key == "loss" for pt in points):
                    break
                if time.monotonic() - t0 > opts.start_timeout:
                    raise RuntimeError(f"no loss point within {opts.start_timeout:.0f} s (status {run.status.value}, "
                                       f"MLflow: {seen})\n" + runs.logs(user, run.id)[-3000:])
                if time.monotonic() - last_note > 15:
                    C.log(f"waiting for the first loss point: run {run.status.value}, MLflow {seen} "
                          f"(read took {took:.1f} s)")
                    last_note = time.monotonic()
                time.sleep(1.0)
            C.log(f"run {run.id} running, first loss point after {time.monotonic() - t0:.1f} s")
            job_pid = int(json.loads(run.launcher_state or "{}").get("pid", 0)) or None

            from portal.tracking import CURVE_KEYS  # one MLflow request per key and fetch

            refresh = None
            if "refresh" in phases:
                try:
                    import gradio as gr

                    from portal.ui.runs import build_runs_tab

                    with gr.Blocks(analytics_enabled=False):
                        refresh = build_runs_tab(runs)["refresh"]
                    request = types.SimpleNamespace(username=user.username)  # all current_user reads
                    refresh(run.id, "", [], "", "", request)  # a first call: imports and builds outside the timing
                except Exception as err:  # noqa: BLE001 -- say so; the other phases still count
                    notes.append(f"refresh phase skipped: the Runs tab's refresh could not be called ({err!r})")
                    C.log(notes[-1])
                    refresh = None

            # Time every fetch the shared cache makes (the bench's own instance; the code is unchanged):
            # a count over a short window is off by one at its edges, the gaps between fetches are not.
            fetch_starts: list[float] = []
            cache_fetch = runs.metrics_cache._fetch

            def timed_fetch(run_id: str):
                fetch_starts.append(time.monotonic())
                return cache_fetch(run_id)

            runs.metrics_cache._fetch = timed_fetch
            for _ in range(3):  # the first requests of each kind to a fresh MLflow server are slow: not timed
                tracker.history(mlflow_run_id)
            time.sleep(opts.settle)
            calls: dict[str, Callable[[], Any]] = {
                "cached": lambda: runs.metrics(user, run.id),
                "uncached": lambda: tracker.history(mlflow_run_id),
                "idle": lambda: None,
            }
            if refresh is not None:
                calls["refresh"] = lambda: refresh(run.id, "", [], "", "", request)

            for ph in phases:
                if ph not in calls:
                    continue
                points_before = len(tracker.history(mlflow_run_id))
                f0, r0 = runs.metrics_cache.fetches, tracker.reads
                C.log(f"phase {ph}: {0 if ph == 'idle' else opts.viewers} viewers for {opts.duration:.0f} s ...")
                n0 = len(fetch_starts)
                with C.CpuMeter(env["mlflow_pid"], job_pid) as meter:
                    r = run_viewers(calls[ph], 0 if ph == "idle" else opts.viewers, opts.interval, opts.duration)
                starts = fetch_starts[n0:]
                cpu0, cpu1 = 0.0, meter.tree_cpu_s
                f1, r1 = runs.metrics_cache.fetches, tracker.reads
                state = runs.get_run(user, run.id).status.value
                points_after = len(tracker.history(mlflow_run_id))
                if ph == "uncached":
                    fetches = r["calls"]  # every call is one fetch; Tracker.reads is not thread-safe, see below
                    steady = fetches / r["wall_s"]
                    min_gap = None
                else:
                    fetches = f1 - f0
                    gaps = [b - a for a, b in itertools.pairwise(starts)]
                    steady = (len(gaps) / (starts[-1] - starts[0])) if gaps and starts[-1] > starts[0] else fetches / r["wall_s"]
                    min_gap = min(gaps) if gaps else None
                reads = r1 - r0
                r.update({
                    "fetches": fetches, "fetches_per_s": steady, "fetches_per_s_raw": fetches / r["wall_s"],
                    "min_gap_between_fetches_s": min_gap,
                    "mlflow_reads": reads, "mlflow_reads_per_s": reads / r["wall_s"],
                    "mlflow_reads_expected": fetches * len(CURVE_KEYS), "mlflow_server_cpu_s": cpu1 - cpu0,
                    "calls_per_s": r["calls"] / r["wall_s"], "run_status_after": state,
                    "portal_process_cpu_s": meter.self_cpu_s, "other_processes_cores": meter.others_cpu_s / meter.wall_s,
                    "training_job_cores": meter.job_cpu_s / meter.wall_s,
                    "metric_points_before": points_before, "metric_points_after": points_after,
                })
                results[ph] = r
                if state != "running":
                    notes.append(f"phase {ph}: the run was '{state}' at the end (it should still be running; "
                                 "raise --epochs)")
                gap = "" if min_gap is None else f", min gap {min_gap:.2f} s"
                C.log(f"phase {ph}: {r['calls']} calls, {fetches} fetches ({r['fetches_per_s']:.2f}/s{gap}), "
                      f"{reads} MLflow reads, p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, "
                      f"errors {r['errors']}, MLflow CPU {cpu1 - cpu0:.1f} s, portal-process CPU "
                      f"{meter.self_cpu_s:.1f} s, training {r['training_job_cores']:.2f} cores, "
                      f"other processes {r['other_processes_cores']:.2f} cores, run {state}")
        finally:
            try:
                run_now = runs.get_run(user, run.id)
                if not run_now.status.is_final:
                    runs.cancel(user, run.id)
            except Exception as err:  # noqa: BLE001 -- bench_env stops what is left
                C.log(f"cancel failed: {err}")
            runs.stop_supervisor()

    budget_fps = 1.0 / ttl
    total = time.monotonic() - started
    print()
    print(f"== {NAME}: {opts.viewers} viewers of one running run, each every {opts.interval} s, "
          f"{opts.duration:.0f} s per phase (MetricsCache TTL {ttl} s) ==")
    print(f"  {'phase':<9} {'calls':>6} {'calls/s':>8} {'fetches':>7} {'fetches/s':>9} {'min gap s':>9} "
          f"{'MLflow req/s':>12} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>6} "
          f"{'MLflow CPU s':>12} {'portal CPU s':>12} {'job cores':>9} {'others cores':>12}")
    for ph, r in results.items():
        gap = "-" if r["min_gap_between_fetches_s"] is None else f"{r['min_gap_between_fetches_s']:.2f}"
        print(f"  {ph:<9} {r['calls']:>6} {r['calls_per_s']:>8.1f} {r['fetches']:>7} {r['fetches_per_s']:>9.2f} "
              f"{gap:>9} {r['mlflow_reads_per_s']:>12.1f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['max_ms']:>8.1f} {r['errors']:>6} {r['mlflow_server_cpu_s']:>12.1f} "
              f"{r['portal_process_cpu_s']:>12.1f} {r['training_job_cores']:>9.2f} {r['other_processes_cores']:>12.2f}")
    summary: dict[str, Any] = {}
    if "cached" in results:
        c = results["cached"]
        ok_f = c["fetches_per_s"] <= budget_fps + 1e-9
        ok_l = c["p95_ms"] <= BUDGET_P95_MS
        print(C.budget_line("cached: MLflow fetches/s for the run", f"{c['fetches_per_s']:.2f}/s",
                            f"<= {budget_fps:.2f}/s", ok_f))
        print(C.budget_line("cached: viewer refresh (runs.metrics) p95", f"{c['p95_ms']:.1f} ms",
                            f"<= {BUDGET_P95_MS:.0f} ms", ok_l))
        summary.update(cached_fetches_per_s=c["fetches_per_s"], cached_p50_ms=c["p50_ms"], cached_p95_ms=c["p95_ms"],
                       ok_fetches=ok_f, ok_p95=ok_l)
    if "refresh" in results:
        f = results["refresh"]
        ok_r = f["p95_ms"] <= BUDGET_P95_MS
        ok_rf = f["fetches_per_s"] <= budget_fps + 1e-9
        print(C.budget_line("refresh: MLflow fetches/s for the run", f"{f['fetches_per_s']:.2f}/s",
                            f"<= {budget_fps:.2f}/s", ok_rf))
        print(C.budget_line("refresh: whole Runs-tab refresh p95", f"{f['p95_ms']:.1f} ms",
                            f"<= {BUDGET_P95_MS:.0f} ms", ok_r))
        summary.update(refresh_fetches_per_s=f["fetches_per_s"], refresh_p50_ms=f["p50_ms"],
                       refresh_p95_ms=f["p95_ms"], ok_refresh_p95=ok_r, ok_refresh_fetches=ok_rf)
    if "uncached" in results:
        u = results["uncached"]
        ok_u = u["fetches_per_s"] <= budget_fps + 1e-9
        print(C.budget_line("uncached (no cache): fetches/s", f"{u['fetches_per_s']:.2f}/s",
                            f"<= {budget_fps:.2f}/s", ok_u))
        print(C.budget_line("uncached (no cache): p95", f"{u['p95_ms']:.1f} ms", f"<= {BUDGET_P95_MS:.0f} ms",
                            u["p95_ms"] <= BUDGET_P95_MS))
        summary.update(uncached_fetches_per_s=u["fetches_per_s"], uncached_p50_ms=u["p50_ms"],
                       uncached_p95_ms=u["p95_ms"])
        if u["mlflow_reads"] != u["mlflow_reads_expected"]:
            notes.append(f"uncached: Tracker.reads counted {u['mlflow_reads']} but {u['calls']} calls made "
                         f"{u['mlflow_reads_expected']} requests (its `reads += 1` is not atomic across threads)")
    if "cached" in results and "uncached" in results:
        c, u = results["cached"], results["uncached"]
        fetch_ratio = u["fetches_per_s"] / c["fetches_per_s"] if c["fetches_per_s"] else float("inf")
        p95_ratio = u["p95_ms"] / c["p95_ms"] if c["p95_ms"] else float("inf")
        print(f"  saving of the shared cache: {fetch_ratio:.0f}x fewer MLflow fetches, p95 {p95_ratio:.1f}x lower")
        summary.update(fetch_ratio_uncached_over_cached=fetch_ratio, p95_ratio_uncached_over_cached=p95_ratio)
        if "idle" in results:  # the MLflow server's CPU the viewers caused: the phase's minus the idle rate
            idle = results["idle"]
            rate = idle["mlflow_server_cpu_s"] / idle["wall_s"]
            extra = {ph: max(0.0, r["mlflow_server_cpu_s"] - rate * r["wall_s"]) for ph, r in results.items()}
            for ph, r in results.items():
                r["mlflow_cpu_over_idle_s"] = extra[ph]
            print(f"  MLflow server CPU caused by the viewers (phase minus idle rate {rate:.2f} cores): "
                  + ", ".join(f"{ph} {extra[ph]:.1f} s" for ph in results if ph != "idle"))
            summary.update(mlflow_cpu_over_idle_s={ph: v for ph, v in extra.items() if ph != "idle"})
        print(f"  portal-process CPU (viewer threads + supervisor): cached {c['portal_process_cpu_s']:.1f} s, "
              f"uncached {u['portal_process_cpu_s']:.1f} s")
    busy = [r["other_processes_cores"] for r in results.values()]
    if busy and max(busy) > 0.25:
        notes.append(f"other processes (not this benchmark, its MLflow server or its training) used "
                     f"{min(busy):.2f}-{max(busy):.2f} of the {os.cpu_count()} cores during the phases: "
                     "latencies are those of a busy machine")
    for note in notes:
        print(f"  note: {note}")
    print(f"  (wall time of this benchmark: {total:.0f} s)")
    result = {"params": vars(opts), "ttl_s": ttl, "budget_fetches_per_s": budget_fps, "budget_p95_ms": BUDGET_P95_MS,
              "phases": results, "summary": summary, "notes": notes, "wall_s": total}
    path = C.write_result(NAME, result)
    print(f"  results: {os.path.relpath(path, C.ROOT)}")
    return result


if __name__ == "__main__":
    main()
