"""Launcher overhead: the same tiny training through the portal vs bare `llamafactory-cli train`.

(a) portal: RunService.submit_args(...) then RunService.wait(..., interval=INTERVAL), timed from
    the submit call to the final status (policy, DB rows, MLflow run + config artifact, the job
    wrapper process, polling, closing the run all count);
(b) bare:   `llamafactory-cli train X.yaml`, X = the config.yaml the portal wrote for its run with
    only output_dir changed to a fresh temp folder, with the job's environment (MLFLOW_TRACKING_URI,
    MLFLOW_RUN_ID of a freshly created MLflow run, CUDA_VISIBLE_DEVICES=""), timed with
    time.monotonic around subprocess.run.

The two alternate (portal first on even repeats, bare first on odd ones) after an uncounted
warm-up run, so caches and drift hit both alike. Budget: median(portal) / median(bare) <= 1.05.

usage: .venv/bin/python bench/bench_launcher_overhead.py [--repeats 5] [--interval 0.2] ...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

NAME = "launcher_overhead"
BUDGET_RATIO = 1.05


def portal_once(services, user, args: dict[str, Any], name: str, interval: float, timeout: float,
                mlflow_pid: int | None = None) -> dict[str, Any]:
    runs = services.runs
    with C.CpuMeter(mlflow_pid) as cpu:
        wall0 = time.time()
        t0 = time.monotonic()
        run = runs.submit_args(user, dict(args), name=name, source="bench")
        t_submitted = time.monotonic()
        run = runs.wait(user, run.id, timeout=timeout, interval=interval)
        t1 = time.monotonic()
        wall1 = time.time()
    exit_file = Path(run.run_dir) / "exit_code"
    try:  # when the job wrapper recorded the exit code: the rest is polling/bookkeeping lag
        exit_at = exit_file.stat().st_mtime
        detect_lag = wall1 - exit_at
        job_s = exit_at - wall0
    except OSError:
        detect_lag = job_s = None
    if run.status.value != "succeeded":
        raise RuntimeError(f"portal run {run.id} {run.status.value}: {run.status_reason}\n"
                           + runs.logs(user, run.id)[-3000:])
    points = runs.tracker.history(run.mlflow_run_id)
    return {"name": name, "run_id": run.id, "seconds": t1 - t0, "submit_call_s": t_submitted - t0,
            "submit_to_exit_file_s": job_s, "exit_detect_lag_s": detect_lag, "final_loss": run.final_loss,
            "mlflow_points": len(points), "config_yaml": str(Path(run.run_dir) / "config.yaml"),
            "cpu_s": cpu.self_cpu_s + cpu.children_cpu_s, **cpu.as_dict()}


def bare_once(services, portal_yaml: Path, work: Path, idx: int, timeout: float,
              mlflow_pid: int | None = None) -> dict[str, Any]:
    import yaml

    tracker = services.tracker
    args = yaml.safe_load(portal_yaml.read_text(encoding="utf-8"))
    run_dir = work / f"bare_{idx}"
    run_dir.mkdir(parents=True)
    args["output_dir"] = str(run_dir / "output")
    config = run_dir / "config.yaml"
    config.write_text(yaml.safe_dump(args, sort_keys=False, allow_unicode=True), encoding="utf-8")
    mlflow_run_id = tracker.create_run(f"bare_{idx}", {"portal.source": "bench-bare"})
    env = C.job_env(tracker.tracking_uri, mlflow_run_id, tracker.experiment_name)
    argv = [C.llamafactory_cli(), "train", str(config)]
    with open(run_dir / "job.log", "wb") as logf, C.CpuMeter(mlflow_pid) as cpu:  # the portal's job logs to a file too
        t0 = time.monotonic()
        proc = subprocess.run(argv, cwd=run_dir, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                              stderr=subprocess.STDOUT, timeout=timeout, check=False)
        t1 = time.monotonic()
    tracker.finish_run(mlflow_run_id, "FINISHED" if proc.returncode == 0 else "FAILED")  # not timed
    if proc.returncode != 0:
        raise RuntimeError(f"bare run {idx} exited {proc.returncode}:\n"
                           + (run_dir / "job.log").read_text(errors="replace")[-3000:])
    points = tracker.history(mlflow_run_id)
    return {"name": f"bare_{idx}", "seconds": t1 - t0, "mlflow_points": len(points), "config_yaml": str(config),
            "cpu_s": cpu.self_cpu_s + cpu.children_cpu_s, **cpu.as_dict()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="portal/bare pairs measured (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted portal runs first (default 1)")
    p.add_argument("--interval", type=float, default=0.2, help="RunService.wait polling interval, s (default 0.2)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-samples", type=int, default=64)
    p.add_argument("--cutoff-len", type=int, default=96)
    p.add_argument("--timeout", type=float, default=300, help="per training, s")
    p.add_argument("--keep", action="store_true", help="keep the temp data root")
    opts = p.parse_args(argv)

    started = time.monotonic()
    C.log(f"{NAME}: {opts.repeats} pairs (+{opts.warmup} warm-up), wait interval {opts.interval} s, "
          f"epochs {opts.epochs}, max_samples {opts.max_samples}, cutoff_len {opts.cutoff_len}")
    portal: list[dict[str, Any]] = []
    bare: list[dict[str, Any]] = []
    with C.bench_env("launcher", keep=opts.keep) as env:
        services = env["services"]
        user = services.runs.ensure_user("bench")
        args = C.demo_args(env["demo_config"], num_train_epochs=float(opts.epochs), max_samples=opts.max_samples,
                           cutoff_len=opts.cutoff_len)
        work = Path(tempfile.mkdtemp(prefix="bare-", dir=env["tmp"]))
        stamp = time.strftime("%H%M%S")
        last_yaml: Path | None = None
        for w in range(opts.warmup):
            r = portal_once(services, user, args, f"bench_warmup_{stamp}_{w}", opts.interval, opts.timeout,
                            env["mlflow_pid"])
            last_yaml = Path(r["config_yaml"])
            C.log(f"warm-up portal run: {r['seconds']:.2f} s (not counted)")
        for i in range(opts.repeats):
            order = ("portal", "bare") if i % 2 == 0 else ("bare", "portal")
            for mode in order:
                if mode == "portal":
                    r = portal_once(services, user, args, f"bench_{stamp}_{i}", opts.interval, opts.timeout,
                                    env["mlflow_pid"])
                    last_yaml = Path(r["config_yaml"])
                    portal.append(r)
                    lag = r["exit_detect_lag_s"]
                    C.log(f"repeat {i + 1}/{opts.repeats} portal: {r['seconds']:.2f} s (submit call "
                          f"{r['submit_call_s'] * 1000:.0f} ms, exit noticed after "
                          f"{'?' if lag is None else f'{lag * 1000:.0f} ms'}, {r['mlflow_points']} MLflow points; "
                          f"CPU {r['cpu_s']:.1f} s, other processes {r['cpu_other_processes_s']:.1f} CPU s)")
                else:
                    if last_yaml is None:  # bare first without a warm-up: make the portal's YAML first
                        last_yaml = services.runs.prepare(user, dict(args), f"bench_yaml_{stamp}", for_submit=False).yaml
                        path = work / "portal_config.yaml"
                        path.write_text(last_yaml, encoding="utf-8")
                        last_yaml = path
                    r = bare_once(services, last_yaml, work, i, opts.timeout, env["mlflow_pid"])
                    bare.append(r)
                    C.log(f"repeat {i + 1}/{opts.repeats} bare:   {r['seconds']:.2f} s "
                          f"({r['mlflow_points']} MLflow points; CPU {r['cpu_s']:.1f} s, "
                          f"other processes {r['cpu_other_processes_s']:.1f} CPU s)")

    p_med = C.median([r["seconds"] for r in portal])
    b_med = C.median([r["seconds"] for r in bare])
    ratio = p_med / b_med if b_med else float("nan")
    lags = [r["exit_detect_lag_s"] for r in portal if r["exit_detect_lag_s"] is not None]
    submit_ms = C.median([r["submit_call_s"] * 1000 for r in portal])
    ok = ratio <= BUDGET_RATIO
    pair_ratios = [a["seconds"] / b["seconds"] for a, b in zip(portal, bare)]
    p_cpu = C.median([r["cpu_s"] for r in portal])
    b_cpu = C.median([r["cpu_s"] for r in bare])
    cpu_ratio = p_cpu / b_cpu if b_cpu else float("nan")
    side_cpu = C.median([r["cpu_self_s"] for r in portal])
    others = [r["cpu_other_processes_s"] / r["seconds"] for r in portal + bare]
    total = time.monotonic() - started

    print()
    print(f"== {NAME}: portal (submit -> final status) vs bare llamafactory-cli train, {opts.repeats} pairs ==")
    fmt = lambda rows: ", ".join(f"{r['seconds']:.2f}" for r in rows)
    print(f"  portal runs (s): {fmt(portal)}")
    print(f"  bare runs   (s): {fmt(bare)}")
    print(f"  median portal {p_med:.2f} s, median bare {b_med:.2f} s, difference {p_med - b_med:+.2f} s; "
          f"median of the per-pair ratios {C.median(pair_ratios):.3f}")
    print(f"  CPU seconds (the job and all it started + this process): median portal {p_cpu:.1f}, bare {b_cpu:.1f}, "
          f"ratio {cpu_ratio:.3f}; the portal's own side (submit, polling, bookkeeping): median {side_cpu:.2f} CPU s")
    print(f"  other processes on the machine took {C.median(others):.2f} CPU cores on average (median over runs; "
          f"max {max(others) if others else float('nan'):.2f}) -- figures taken on a busy machine are noisy")
    print(f"  portal submit_args call: median {submit_ms:.0f} ms; exit noticed by wait() after the job's exit "
          f"file: median {C.median(lags) * 1000:.0f} ms (polling granularity: wait interval {opts.interval} s)")
    own = (submit_ms / 1000 + C.median(lags)) if lags else float("nan")
    print(f"  the portal's own share, less sensitive to a busy machine: submit call + exit noticed = {own:.2f} s wall "
          f"and {side_cpu:.2f} CPU s, i.e. {(b_med + own) / b_med:.3f}x the median bare run in wall time")
    print(C.budget_line("ratio median(portal)/median(bare)", f"{ratio:.3f}", f"<= {BUDGET_RATIO}", ok))
    print(f"  (wall time of this benchmark: {total:.0f} s)")

    result = {
        "params": vars(opts), "portal_runs": portal, "bare_runs": bare,
        "median_portal_s": p_med, "median_bare_s": b_med, "ratio": ratio, "budget_ratio": BUDGET_RATIO,
        "ok": ok, "wait_interval_s": opts.interval, "median_submit_call_ms": submit_ms,
        "median_exit_detect_lag_ms": C.median(lags) * 1000, "wall_s": total,
        "median_pair_ratio": C.median(pair_ratios), "median_portal_cpu_s": p_cpu, "median_bare_cpu_s": b_cpu,
        "cpu_ratio": cpu_ratio, "median_portal_side_cpu_s": side_cpu,
        "median_other_processes_cores": C.median(others),
        "portal_own_wall_s": own, "portal_own_ratio": (b_med + own) / b_med,
    }
    path = C.write_result(NAME, result)
    print(f"  results: {os.path.relpath(path, C.ROOT)}")
    return result


if __name__ == "__main__":
    main()
