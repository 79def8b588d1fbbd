"""API token sign-in, Git export and Kubernetes manifests: what each costs per call.

usage: .venv/bin/python bench/bench_api_git.py [--quick] [--requests 300] [--runs 200] [--exports 30]
                                               [--configs 200] [--cold 3] [--k8s-repeats 200] [--keep]

1. API tokens. The real web app, `create_app(services, supervise=False)` in auth mode none on a
   temp data root (no MLflow server: these routes do not read it), under uvicorn in a thread on a
   free loopback port. One keep-alive `httpx.Client` sends GET /api/me with
   `Authorization: Bearer <token>` (a token from `services.tokens.create` for the local user) and
   the same request without the header (the local user of auth mode none), --requests each,
   interleaved one by one (which goes first alternates). Then GET /api/runs?limit=50 the same two
   ways, with --runs Run rows of that user inserted through the DB session.
2. Git export. `portal.git_export.GitExporter` against a local bare repository (git init --bare,
   one seed commit on main holding a README and --configs configs under experiments/). Timed:
   the first export with a cold cache (a fresh cache folder: init + fetch of the whole
   repository), --cold times; --exports exports of a small config with new content each time
   (each makes a commit and pushes it); the same number of unchanged re-exports (fetch, compare,
   no commit); and as many `list_configs()` of main (the --configs files).
3. Kubernetes manifests. `build_manifests` + `to_yaml` for one node (a Job) and for two nodes
   (a JobSet), --k8s-repeats each, interleaved; the settings and JobSpec of tests/test_k8s_manifests.py.

No budgets: the figures are printed for the record (medians, p95, and ratios of the same run).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (bench/ is not a package)

NAME = "api_git"
QUICK = {"requests": 40, "exports": 5, "cold": 1, "k8s_repeats": 30}
FULL = {"requests": 300, "exports": 30, "cold": 3, "k8s_repeats": 200}


def stats(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": C.median(values), "p95_ms": C.percentile(values, 95),
            "min_ms": min(values), "max_ms": max(values)}


def cpu_line(cpu: dict[str, float], children: str) -> str:
    wall = cpu["wall_s"] or float("nan")
    return (f"CPU: this process {cpu['cpu_self_s'] / wall:.2f} cores, {children} "
            f"{cpu['cpu_children_s'] / wall:.2f}, other processes {cpu['cpu_other_processes_s'] / wall:.2f} cores "
            f"over {cpu['wall_s']:.0f} s (load average {cpu['loadavg_1m_before']:.1f} -> {cpu['loadavg_1m_after']:.1f} "
            f"on {os.cpu_count()} CPUs)")


def busy(cpu: dict[str, float]) -> bool:
    """Other processes took over a quarter of a core, or the load average was near the CPU count."""
    wall = cpu.get("wall_s", 0.0)
    others = cpu["cpu_other_processes_s"] / wall if wall else 0.0
    load = max(cpu["loadavg_1m_before"], cpu["loadavg_1m_after"])
    return others > 0.25 or load > 0.8 * (os.cpu_count() or 1)


# ---- 1. API token sign-in ---------------------------------------------------------------------

def insert_runs(services, user, count: int) -> None:
    """`count` finished runs of `user`, straight into the database (one session, one commit)."""
    from portal.models import Run, RunStatus, utcnow

    start = utcnow() - timedelta(days=30)
    statuses = [RunStatus.succeeded] * 6 + [RunStatus.failed, RunStatus.cancelled]
    with services.db.session() as s:
        s.add_all([Run(name=f"bench-run-{i:04d}", owner_id=user.id, owner=user.username,
                       status=statuses[i % len(statuses)],
                       created_at=start + timedelta(minutes=10 * i), started_at=start + timedelta(minutes=10 * i + 1),
                       finished_at=start + timedelta(minutes=10 * i + 9), stage="sft", finetuning_type="lora",
                       model_name_or_path="/shared/models/qwen2.5-7b", datasets="faq_2025,support_chat",
                       config_sha256=hashlib.sha256(str(i).encode()).hexdigest(), run_dir=f"/data/runs/{i}",
                       output_dir=f"/data/users/{user.username}/runs/bench-run-{i:04d}/output", exit_code=0,
                       final_loss=1.0 + (i % 17) / 10, note="benchmark row" if i % 10 == 0 else "",
                       tags="bench,q3" if i % 10 == 0 else "",
                       dataset_fingerprints='[{"name": "faq_2025", "version": 1, "rows": 1200}]')
                   for i in range(count)])
        s.commit()


def measure_pairs(client: httpx.Client, url: str, token: str, n: int, warmup: int) -> dict[str, list[float]]:
    """Latencies in ms of `url` with the token and without a header, interleaved one by one."""
    variants = {"token": {"authorization": f"Bearer {token}"}, "none": {}}
    for headers in variants.values():
        for _ in range(warmup):
            assert client.get(url, headers=headers).status_code == 200
    times: dict[str, list[float]] = {v: [] for v in variants}
    order = list(variants)
    for i in range(n):
        for variant in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            r = client.get(url, headers=variants[variant])
            times[variant].append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                raise RuntimeError(f"{variant} {url}: {r.status_code} {r.text[:200]}")
    return times


def bench_api(tmp: Path, opts) -> dict[str, Any]:
    from portal.config import Settings
    from portal.services import build_services
    from portal.web import create_app

    nowhere = f"http://127.0.0.1:{C.free_port()}"  # MLflow: never asked by these routes
    settings = Settings(data_root=tmp / "portal", mlflow_tracking_uri=nowhere, gpus=[])
    services = build_services(settings)
    user = services.runs.ensure_user(settings.local_username, is_admin=True)  # the local user of auth mode none
    token, _row = services.tokens.create(user, "bench")
    insert_runs(services, user, opts.runs)  # mlflow_run_id stays None: an MLflow link would ask the (absent) server
    t0 = time.monotonic()
    app = create_app(services, supervise=False)
    C.log(f"app built ({time.monotonic() - t0:.1f} s); {opts.runs} runs inserted, token {token[:10]}...")
    with C.Served(app) as served, httpx.Client(base_url=served.url, timeout=30) as client:
        # the variants differ as meant: the token is what signs in (a wrong one is refused), both are the same user
        bad = client.get("/api/me", headers={"authorization": "Bearer lbp_" + "x" * 43})
        assert bad.status_code == 401, bad.text
        me_token = client.get("/api/me", headers={"authorization": f"Bearer {token}"}).json()
        assert me_token == client.get("/api/me").json() and me_token["username"] == user.username, me_token
        page = client.get("/api/runs?limit=50", headers={"authorization": f"Bearer {token}"}).json()
        assert page["total"] == opts.runs and len(page["runs"]) == min(50, opts.runs), page.get("total")
        with C.CpuMeter() as cpu:
            me = measure_pairs(client, "/api/me", token, opts.requests, warmup=30)
            runs = measure_pairs(client, "/api/runs?limit=50", token, opts.requests, warmup=10)
    services.db.engine.dispose()
    out: dict[str, Any] = {"cpu": {**cpu.as_dict(), "wall_s": cpu.wall_s}}
    for route, times in (("me", me), ("runs", runs)):
        t, n = stats(times["token"]), stats(times["none"])
        out[route] = {"token": t, "none": n, "added_p50_ms": t["p50_ms"] - n["p50_ms"],
                      "added_p95_ms": t["p95_ms"] - n["p95_ms"], "ratio_p50": t["p50_ms"] / n["p50_ms"],
                      "ratio_p95": t["p95_ms"] / n["p95_ms"]}
    return out


# ---- 2. Git export ------------------------------------------------------------------------------

def git(*args: str, cwd: Path | None = None) -> str:
    """git as someone at another desk (own identity, no user or system config)."""
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd or "/nonexistent"), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_NAME": "Seed", "GIT_AUTHOR_EMAIL": "seed@bench.invalid",
           "GIT_COMMITTER_NAME": "Seed", "GIT_COMMITTER_EMAIL": "seed@bench.invalid"}
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def seed_remote(root: Path, configs: int) -> Path:
    """A bare repository; main has one commit: a README and `configs` YAML files under experiments/."""
    remote, seed = root / "remote.git", root / "seed"
    git("init", "-q", "--bare", "-b", "main", str(remote))
    git("init", "-q", "-b", "main", str(seed))
    (seed / "README.md").write_text("training configs\n")
    for i in range(configs):
        folder = seed / "experiments" / f"dataset_{i % 10}" / f"model_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"config_{i:04d}.yaml").write_text(
            f"model_name_or_path: /shared/models/model_{i % 4}\nstage: sft\nfinetuning_type: lora\n"
            f"dataset: dataset_{i % 10}\nlearning_rate: {1e-4 * (1 + i % 5):g}\nnum_train_epochs: 3\n")
    git("add", "--all", cwd=seed)
    git("commit", "-q", "-m", "seed", cwd=seed)
    git("push", "-q", str(remote), "main", cwd=seed)
    return remote


def config_yaml(i: int) -> str:
    return (f"### exported by the bench ({i})\nmodel_name_or_path: /shared/models/Qwen2-0.5B\nstage: sft\n"
            f"do_train: true\nfinetuning_type: lora\nlora_target: all\ndataset: alpaca_en,identity\n"
            f"template: qwen\ncutoff_len: 1024\nlearning_rate: {1e-4 + i * 1e-7:.7f}\nnum_train_epochs: 3.0\n"
            f"per_device_train_batch_size: 2\ngradient_accumulation_steps: 8\nseed: {i}\n"
            f"output_dir: /data/users/bench/runs/bench-config/output\n")


EXPORT = {"name": "bench-config", "dataset": "alpaca_en,identity", "model": "/shared/models/Qwen2-0.5B",
          "stage": "sft", "finetuning_type": "lora", "username": "bench", "author_name": "Bench User",
          "author_email": "bench@bank.example"}


def bench_git(tmp: Path, opts) -> dict[str, Any]:
    from portal.config import Settings
    from portal.git_export import GitExporter

    remote = seed_remote(tmp / "git", opts.configs)
    settings = Settings(data_root=tmp / "git-portal", git_url=str(remote), gpus=[])
    counter = iter(range(10**6))

    def export(exporter: GitExporter, i: int):
        return exporter.export(config_yaml(i), run_id=i, **EXPORT)

    with C.CpuMeter() as cpu:
        cold: list[float] = []
        for k in range(opts.cold):  # a fresh cache each: init the bare clone, fetch everything, commit, push
            exporter = GitExporter(settings, tmp / f"git-cache-{k}")
            t0 = time.perf_counter()
            result = export(exporter, next(counter))
            cold.append((time.perf_counter() - t0) * 1000)
            assert not result.unchanged
        for _ in range(2):  # untimed warm-up of the last cache
            export(exporter, next(counter))
        changed: list[float] = []
        for _ in range(opts.exports):
            i = next(counter)
            t0 = time.perf_counter()
            result = export(exporter, i)
            changed.append((time.perf_counter() - t0) * 1000)
            assert not result.unchanged
        unchanged: list[float] = []
        for _ in range(opts.exports):  # the last config again (a later run of it): fetch, compare, no commit
            t0 = time.perf_counter()
            again = exporter.export(config_yaml(i), run_id=i + 1, **EXPORT)
            unchanged.append((time.perf_counter() - t0) * 1000)
            assert again.unchanged and again.sha == result.sha
        listing: list[float] = []
        for _ in range(opts.exports):
            t0 = time.perf_counter()
            paths = exporter.list_configs()
            listing.append((time.perf_counter() - t0) * 1000)
            assert len(paths) == opts.configs, len(paths)
    commits = int(git("--git-dir", str(remote), "rev-list", "--count", f"refs/heads/{result.branch}"))
    expected = 1 + opts.cold + 2 + opts.exports  # the seed and one per changed export
    assert commits == expected, f"{commits} commits on {result.branch}, expected {expected}"
    return {"cold_ms": cold, "cold": stats(cold), "export": stats(changed), "unchanged": stats(unchanged),
            "list_configs": stats(listing), "branch": result.branch, "commits_on_branch": commits,
            "cpu": {**cpu.as_dict(), "wall_s": cpu.wall_s}}


# ---- 3. Kubernetes manifests --------------------------------------------------------------------

def bench_k8s(opts) -> dict[str, Any]:
    from portal.launchers import k8s_manifests as km
    from portal.launchers.base import JobSpec
    from portal.launchers.k8s_settings import KubernetesSettings, SecretRef

    data_root = Path("/data")
    run_dir = data_root / "users" / "alice" / "runs" / "sft-1"
    spec = JobSpec(run_id=42, name="sft-1", owner="alice", argv=["/venv/bin/llamafactory-cli", "train", "x.yaml"],
                   workdir=run_dir, log_path=run_dir / "job.log",
                   env={"MLFLOW_TRACKING_URI": "https://mlflow.example.com", "MLFLOW_RUN_ID": "0123abcd",
                        "MLFLOW_EXPERIMENT_NAME": "llamaboard-portal"})
    base = {
        "env": {"HF_HUB_DISABLE_TELEMETRY": "1"},
        "env_secrets": {
            "HF_TOKEN": SecretRef(secret="llamaboard-hf", key="HF_TOKEN", optional=True),
            "HF_ENDPOINT": SecretRef(secret="llamaboard-hf", key="HF_ENDPOINT", optional=True),
            "MLFLOW_TRACKING_PASSWORD": SecretRef(secret="llamaboard-mlflow", key="MLFLOW_TRACKING_PASSWORD"),
        },
        "service_account": "llamaboard-job",
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priority_class": "llamaboard-training",
        "image_pull_secrets": ["registry"],
    }
    config = "### portal header\n" + config_yaml(0).replace("/shared/models", "/data/shared/models")
    sha = hashlib.sha256(config.encode()).hexdigest()
    shapes = {"1 node (Job)": (KubernetesSettings(**base), 1, 1),
              "2 nodes (JobSet)": (KubernetesSettings(**base, multi_node="jobset"), 8, 2)}

    def once(k8s, gpus: int, nodes: int) -> tuple[float, float, list[dict], str]:
        t0 = time.perf_counter()
        manifests = km.build_manifests(spec, k8s, data_root=data_root, config_yaml=config, config_sha256=sha,
                                       gpus_per_node=gpus, nodes=nodes, experiment="llamaboard-portal",
                                       portal_url="https://llm.example.com/ui/?run=42")
        t1 = time.perf_counter()
        text = km.to_yaml(manifests)
        t2 = time.perf_counter()
        return (t1 - t0) * 1000, (t2 - t1) * 1000, manifests, text

    kinds, sizes = {}, {}
    for shape, args in shapes.items():
        for _ in range(20):  # warm-up
            _, _, manifests, text = once(*args)
        kinds[shape], sizes[shape] = [d["kind"] for d in manifests], len(text)
    assert "JobSet" in kinds["2 nodes (JobSet)"] and "Job" in kinds["1 node (Job)"], kinds
    build: dict[str, list[float]] = {s: [] for s in shapes}
    dump: dict[str, list[float]] = {s: [] for s in shapes}
    total: dict[str, list[float]] = {s: [] for s in shapes}
    order = list(shapes)
    for i in range(opts.k8s_repeats):
        for shape in (order if i % 2 == 0 else order[::-1]):
            b, d, _, _ = once(*shapes[shape])
            build[shape].append(b)
            dump[shape].append(d)
            total[shape].append(b + d)
    return {shape: {"kinds": kinds[shape], "yaml_bytes": sizes[shape], "total": stats(total[shape]),
                    "build_p50_ms": C.median(build[shape]), "to_yaml_p50_ms": C.median(dump[shape])}
            for shape in shapes}


def report(result: dict[str, Any]) -> None:
    """Print the figures (from the result dict alone, so a saved JSON can be printed again)."""
    o, api, gx, k8s = result["params"], result["api"], result["git"], result["k8s"]
    print()
    print(f"== {NAME}: API token sign-in, keep-alive client, {o['requests']} requests per variant, interleaved; "
          f"{o['runs']} runs in the database ==")
    print(f"  {'route':<26} {'variant':<22} {'p50 ms':>8} {'p95 ms':>8} {'min ms':>8} {'max ms':>8}")
    routes = {"me": "GET /api/me", "runs": "GET /api/runs?limit=50"}
    for route, label in routes.items():
        for variant, what in (("token", "Bearer token"), ("none", "no header (local user)")):
            f = api[route][variant]
            print(f"  {label:<26} {what:<22} {f['p50_ms']:>8.2f} {f['p95_ms']:>8.2f} {f['min_ms']:>8.2f} "
                  f"{f['max_ms']:>8.2f}")
        c = api[route]
        print(f"  {'':<26} token / no header: p50 x{c['ratio_p50']:.2f} ({c['added_p50_ms']:+.2f} ms), "
              f"p95 x{c['ratio_p95']:.2f} ({c['added_p95_ms']:+.2f} ms)")
    print(f"  {cpu_line(api['cpu'], 'its children')}")
    print()
    print(f"== {NAME}: Git export to a local bare repository ({o['configs']} configs on main) ==")
    print(f"  {'operation':<44} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'min ms':>8} {'max ms':>8}")
    for key, label in (("cold", "first export, cold cache (init + fetch)"),
                       ("export", "export, new content (commit + push)"),
                       ("unchanged", "export, unchanged (no commit)"),
                       ("list_configs", f"list_configs() ({o['configs']} configs)")):
        f = gx[key]
        print(f"  {label:<44} {f['n']:>4} {f['p50_ms']:>8.1f} {f['p95_ms']:>8.1f} {f['min_ms']:>8.1f} "
              f"{f['max_ms']:>8.1f}")
    print(f"  cold exports: {', '.join(f'{v:.0f}' for v in gx['cold_ms'])} ms; warm export / unchanged p50: "
          f"x{gx['export']['p50_ms'] / gx['unchanged']['p50_ms']:.2f}; {gx['commits_on_branch']} commits on "
          f"{gx['branch']} (as expected)")
    print(f"  {cpu_line(gx['cpu'], 'its git processes')}")
    print()
    print(f"== {NAME}: Kubernetes manifests, build_manifests + to_yaml, {o['k8s_repeats']} per shape, interleaved ==")
    print(f"  {'shape':<18} {'objects':<34} {'YAML':>7} {'p50 ms':>8} {'p95 ms':>8} {'build p50':>10} {'yaml p50':>9}")
    for shape, f in k8s.items():
        print(f"  {shape:<18} {', '.join(f['kinds']):<34} {f['yaml_bytes']:>6}B {f['total']['p50_ms']:>8.2f} "
              f"{f['total']['p95_ms']:>8.2f} {f['build_p50_ms']:>10.3f} {f['to_yaml_p50_ms']:>9.3f}")
    one, two = k8s["1 node (Job)"], k8s["2 nodes (JobSet)"]
    print(f"  2 nodes / 1 node p50: x{two['total']['p50_ms'] / one['total']['p50_ms']:.2f}; to_yaml is "
          f"{one['to_yaml_p50_ms'] / one['total']['p50_ms']:.0%} of the 1-node total")
    if any(busy(section["cpu"]) for section in (api, gx)):
        print("  note: the machine was busy (see the CPU lines): p95 and max carry other processes' interference; "
              "the variants were interleaved, so the p50 differences are the figures to read")
    print(f"  (wall time of this benchmark: {result['wall_s']:.0f} s)")


# ---- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 40 requests, 5 exports, 1 cold export, 30 builds")
    p.add_argument("--requests", type=int, help="timed requests per route and variant (300; --quick 40)")
    p.add_argument("--runs", type=int, default=200, help="runs in the database for /api/runs (200)")
    p.add_argument("--exports", type=int, help="timed exports, unchanged re-exports and listings each (30; --quick 5)")
    p.add_argument("--configs", type=int, default=200, help="configs on main for list_configs (200)")
    p.add_argument("--cold", type=int, help="first exports with a cold cache (3; --quick 1)")
    p.add_argument("--k8s-repeats", type=int, help="manifest builds per shape (200; --quick 30)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    opts = p.parse_args(argv)
    for key, value in (QUICK if opts.quick else FULL).items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="lbp-bench-api-git-"))
    try:
        C.log(f"{NAME}: API tokens ({opts.requests} requests per route and variant, {opts.runs} runs)")
        api = bench_api(tmp, opts)
        C.log(f"{NAME}: Git export ({opts.cold} cold, {opts.exports} exports / re-exports / listings, "
              f"{opts.configs} configs)")
        gx = bench_git(tmp, opts)
        C.log(f"{NAME}: Kubernetes manifests ({opts.k8s_repeats} per shape)")
        k8s = bench_k8s(opts)
    finally:
        if opts.keep:
            C.log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.monotonic() - started

    result = {"params": vars(opts), "api": api, "git": gx, "k8s": k8s, "wall_s": total}
    report(result)
    path = C.write_result(NAME, result)
    print(f"  results: {os.path.relpath(path, C.ROOT)}")
    return result


if __name__ == "__main__":
    main()
