"""llamaboard-portal: serve the portal, make the demo, validate and submit configs, follow runs.

Exit codes: 0 ok (with `--wait`: the run succeeded), 1 invalid config / failed run / refused,
2 usage errors, 3 config rejected by the portal's rules (submit, clone, resume, eval, merge), 4 `--wait` timed out.
With `--server URL` the commands talk to a running portal over its HTTP API, signed in with the
token in the environment variable named by `--token-env` (default PORTAL_TOKEN).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED, EXIT_TIMEOUT = 0, 1, 2, 3, 4


def _settings(args: argparse.Namespace, **overrides: Any):
    from .config import Settings

    values = {k: v for k, v in overrides.items() if v is not None}
    if getattr(args, "data_root", None):
        values["data_root"] = args.data_root
    return Settings(**values)


def _services(args: argparse.Namespace, *, tracking: bool = True, **overrides: Any):
    from .services import build_services

    return build_services(_settings(args, **overrides), start_tracking=tracking)


def _local_user(services):
    return services.runs.ensure_user(services.settings.local_username, is_admin=True)


def _run_dict(services, run) -> dict[str, Any]:
    from .run_view import run_to_dict

    return run_to_dict(run, services.runs.mlflow_url(run))


def _client(args: argparse.Namespace):
    """A client of the portal at --server, signed in with the token from --token-env."""
    from .client import ClientError, PortalClient

    token = os.environ.get(args.token_env)
    if not token:
        print(f"error: --server needs a token: set {args.token_env} (or name another variable with --token-env)",
              file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    try:
        return PortalClient(args.server, token)
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def _remote(func):
    """Runs a remote command; a ClientError prints its message (and any problems) and exits."""
    from functools import wraps

    @wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        from .client import ClientError

        try:
            with _client(args) as client:
                return func(args, client)
        except ClientError as err:
            prefix = f"{args.file}: " if getattr(args, "file", None) else ""  # as here: `key: problem` for eval
            for key, problem in err.problems.items():
                print(f"{prefix}{key}: {problem}", file=sys.stderr)
            print(f"error: {err}", file=sys.stderr)
            return EXIT_REJECTED if err.status == 422 else EXIT_FAILED
    return wrapper


def _rejected(file: str, err) -> int:
    """Each key a config was rejected for, as `FILE: key: problem` lines; the exit code for it."""
    for key, problem in err.problems.items():
        print(f"{file}: {key}: {problem}", file=sys.stderr)
    return EXIT_REJECTED


def _read_config_file(file: str) -> str | None:
    try:
        return Path(file).read_bytes().decode("utf-8")
    except OSError as err:
        print(f"{file}: {err.strerror}", file=sys.stderr)
    except UnicodeDecodeError as err:
        print(f"{file}: yaml: the file is not UTF-8 text (byte {err.start}); save it as UTF-8", file=sys.stderr)
    return None


def _print_run_line(run: dict[str, Any]) -> None:
    reason = f": {run['status_reason']}" if run.get("status_reason") else ""
    link = f" ({run['mlflow_url']})" if run.get("mlflow_url") and run["status"] in ("succeeded", "failed") else ""
    print(f"run {run['id']} ({run['name']}) {run['status']}{reason}{link}", flush=True)


@_remote
def remote_validate(args: argparse.Namespace, client) -> int:
    bad = False
    for file in args.files:
        text = _read_config_file(file)
        if text is None:
            bad = True
            continue
        name = None if "output_dir" in text else _cli_name(Path(file).stem)
        result = client.validate(text, name)
        for key, problem in result["problems"].items():
            print(f"{file}: {key}: {problem}")
        if result["valid"]:
            print(f"{file}: ok")
        bad = bad or not result["valid"]
    return EXIT_FAILED if bad else EXIT_OK


@_remote
def remote_submit(args: argparse.Namespace, client) -> int:
    if args.dry_run:
        print("error: --dry-run prints the manifests on this machine: leave out --server", file=sys.stderr)
        return EXIT_USAGE
    text = _read_config_file(args.file)
    if text is None:
        return EXIT_USAGE
    name = args.name or (None if "output_dir" in text else _cli_name(Path(args.file).stem))
    run = client.submit(text, name, gpus=args.gpus, nodes=args.nodes)
    if not args.json:
        _print_run_line(run)
    if args.wait:
        ended = client.wait(run["id"], args.timeout)
        if ended is None:
            print(f"run {run['id']} still {client.run(run['id'])['status']} after {args.timeout:g} s "
                  "(it goes on; `cancel` stops it)", file=sys.stderr)
            return EXIT_TIMEOUT
        run = ended
    if args.json:
        print(json.dumps(run, indent=2))
    elif args.wait:
        _print_run_line(run)
    return EXIT_FAILED if args.wait and run["status"] != "succeeded" else EXIT_OK


@_remote
def remote_runs(args: argparse.Namespace, client) -> int:
    page = client.runs(status=args.status, model=args.model, dataset=args.dataset, stage=args.stage,
                       method=args.method, owner=args.owner, search=args.search, sort=args.sort, limit=args.limit,
                       offset=args.offset)
    if args.json:
        print(json.dumps(page["runs"], indent=2))
        return EXIT_OK
    print(f"{'ID':>5}  {'STATUS':<10} {'OWNER':<12} {'CREATED':<19}  {'LOSS':>8}  NAME")
    for r in page["runs"]:
        loss = "" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        print(f"{r['id']:>5}  {r['status']:<10} {r['owner']:<12} {(r['created_at'] or '')[:19]:<19}  {loss:>8}  "
              f"{r['name']}")
    if page["total"] > len(page["runs"]):
        print(f"({len(page['runs'])} of {page['total']}; --offset {args.offset + len(page['runs'])} for more)")
    return EXIT_OK


@_remote
def remote_logs(args: argparse.Namespace, client) -> int:
    if args.follow:
        for text in client.follow_logs(_run_id(args.run)):
            sys.stdout.write(text)
            sys.stdout.flush()
        return EXIT_OK
    sys.stdout.write(client.logs(_run_id(args.run), tail=args.tail)[0])
    return EXIT_OK


@_remote
def remote_cancel(args: argparse.Namespace, client) -> int:
    _print_run_line(client.cancel(_run_id(args.run)))
    return EXIT_OK


def _size_text(size: int) -> str:
    """portal.run_view.human_size, again: the --server commands import nothing but httpx."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


@_remote
def remote_show(args: argparse.Namespace, client) -> int:
    """`show` against --server: GET /api/runs/{id} (with its status history) and its output files."""
    run_id = _run_id(args.run)
    run = client.run(run_id)
    listing = client.artifacts(run_id)
    if args.json:
        print(json.dumps({**run, "artifacts": listing["artifacts"]}, indent=2))
        return EXIT_OK
    print(f"run {run['id']} ({run['name']}) {run['status']}" + (f": {run['status_reason']}" if run["status_reason"] else ""))
    print(f"  owner {run['owner']}, model {run['model']}, datasets {run['datasets']}, "
          f"{run['stage']}/{run['finetuning_type']}" + (f", cloned from run {run['parent_id']}" if run["parent_id"] else ""))
    print("status history:")
    for e in run.get("events") or []:
        print(f"  {(e['at'] or '')[:19].replace('T', ' ')}  {e['status']:<10} {e['reason'] or ''}".rstrip())
    if not run.get("events"):
        print("  no history recorded (the run is older than the status history)")
    print(f"output files ({run['output_dir']}):")
    for a in listing["artifacts"]:
        extra = f" ({a['files']} files)" if a["folder"] else ""
        print(f"  {_size_text(a['size']):>10}  {(a['modified'] or '')[:19].replace('T', ' ')}  {a['path']}{extra}")
    if listing["truncated"]:
        print("  … (more files: the list is cut here)")
    return EXIT_OK


def _remote_job(client, run: dict[str, Any], args: argparse.Namespace, what: str) -> int:
    """--wait / --json for resume, eval and merge against --server (as _wait_and_print does here)."""
    if not args.json:
        print(f"run {run['id']} ({run['name']}) {run['status']}, {what}", flush=True)
    if args.wait:
        ended = client.wait(run["id"], args.timeout)
        if ended is None:
            print(f"run {run['id']} still {client.run(run['id'])['status']} after {args.timeout:g} s "
                  "(it goes on; `cancel` stops it)", file=sys.stderr)
            return EXIT_TIMEOUT
        run = ended
    evaluation = None
    if args.wait and run.get("kind") == "eval" and run.get("parent_id"):
        evaluation = next((e for e in client.evaluations(run["parent_id"]) if e["run"]["id"] == run["id"]), None)
    if args.json:
        out = dict(run)
        if args.wait and run.get("kind") == "eval":
            out["eval_metrics"] = evaluation["metrics"] if evaluation else {}
        print(json.dumps(out, indent=2))
    elif args.wait:
        _print_run_line(run)
        if evaluation and run["status"] == "succeeded":
            for key, value in sorted(evaluation["metrics"].items()):
                print(f"  {key:<36} {value:.4f}")
            if evaluation["predictions"]:
                print(f"  predictions: {run['output_dir']}/{evaluation['predictions']}")
        if run.get("kind") == "export" and run.get("registered_version"):
            print(f"registered model {run['registered_model']} version {run['registered_version']} "
                  f"({run['output_dir']})")
    return EXIT_OK if not args.wait or run["status"] == "succeeded" else EXIT_FAILED


@_remote
def remote_resume(args: argparse.Namespace, client) -> int:
    run = client.resume(_run_id(args.run), args.name)
    return _remote_job(client, run, args, f"resuming run {run['parent_id']} from its last checkpoint")


@_remote
def remote_eval(args: argparse.Namespace, client) -> int:
    datasets = [d.strip() for item in (args.dataset or []) for d in item.split(",") if d.strip()]
    run = client.evaluate(_run_id(args.run), datasets or None, args.max_samples, max_new_tokens=args.max_new_tokens,
                          predict_with_generate=not args.no_generate, batch_size=args.batch_size, name=args.name)
    return _remote_job(client, run, args, f"evaluating run {run['parent_id']} on {run['datasets']}")


@_remote
def remote_merge(args: argparse.Namespace, client) -> int:
    run = client.merge(_run_id(args.run), args.name)
    return _remote_job(client, run, args, f"merging run {run['parent_id']} into {run['output_dir']} "
                                          f"(model {run['registered_model']})")


@_remote
def remote_model_alias(args: argparse.Namespace, client) -> int:
    done = client.set_alias(args.name, args.version, args.alias)
    print(f"{done['name']}@{done['alias']} -> version {done['version']}")
    return EXIT_OK


def _with_server(local, remote):
    """The command runs here, or against the portal at --server."""
    def run(args: argparse.Namespace) -> int:
        return remote(args) if getattr(args, "server", None) else local(args)
    return run


# ---- commands ----------------------------------------------------------------------------

def private_temp_dir(settings) -> Path:
    """Gradio's upload/temp folder, private to the portal (0700) instead of one shared /tmp folder."""
    path = Path(os.environ.get("GRADIO_TEMP_DIR") or settings.data_root / "tmp" / "gradio")
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    os.environ["GRADIO_TEMP_DIR"] = str(path)
    return path


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args, host=args.host, port=args.port)
    private_temp_dir(settings)  # before Gradio is imported: it reads GRADIO_TEMP_DIR at import time
    import uvicorn

    from .web import create_app, is_loopback, uvicorn_proxy_options

    if settings.auth_mode == "none" and not is_loopback(settings.host):
        print(f"error: refusing to serve on {settings.host} without login (auth: none lets anyone who reaches the "
              "port act as the local admin). Serve on 127.0.0.1, or turn on OIDC login: PORTAL_AUTH_MODE=oidc, "
              "PORTAL_OIDC_ISSUER, PORTAL_OIDC_CLIENT_ID, PORTAL_OIDC_CLIENT_SECRET (see docs/admin-guide.md).",
              file=sys.stderr)
        return EXIT_USAGE
    from .services import build_services

    logging.getLogger("portal").setLevel(logging.INFO)
    services = build_services(settings)
    app = create_app(services)
    print(f"LLaMA Board Portal on http://{settings.host}:{settings.port}  (data root: {settings.data_root}; "
          f"MLflow: {settings.tracking_uri})", flush=True)
    # X-Forwarded-For/-Proto only from trusted_proxies; the sub-path is put back by the app itself
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", **uvicorn_proxy_options(settings))
    return EXIT_OK


def make_demo(settings) -> Path:
    """The tiny model and toy dataset in the shared catalog, and a ready-to-submit config."""
    from llamaboard_ext.compile import args_to_yaml

    from .demo import DEMO_DATASET_NAME, DEMO_MODEL_NAME, DEMO_TEMPLATE, make_demo_dataset, make_tiny_model

    settings.ensure_dirs()
    model = make_tiny_model(settings.shared_models_root / DEMO_MODEL_NAME)
    make_demo_dataset(settings.shared_datasets_root)
    config = {
        "stage": "sft", "do_train": True, "model_name_or_path": str(model), "finetuning_type": "lora",
        "template": DEMO_TEMPLATE, "dataset": DEMO_DATASET_NAME, "cutoff_len": 128, "learning_rate": 1.0e-3,
        "num_train_epochs": 2.0, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "cosine", "logging_steps": 5, "save_steps": 100, "lora_rank": 8, "lora_target": "all",
        "plot_loss": True, "report_to": "mlflow",
    }
    path = settings.data_root / "demo" / "demo_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(args_to_yaml(config, header="Demo: LoRA SFT of the tiny local LLaMA on the toy alpaca set"),
                    encoding="utf-8")
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    settings = _settings(args)
    path = make_demo(settings)
    print(f"demo model:   {settings.shared_models_root / 'tiny-llama'}")
    print(f"demo dataset: demo_alpaca in {settings.shared_datasets_root}")
    print("demo config (submit it with `llamaboard-portal submit` or load it in the Train tab):")
    print(path, flush=True)
    if args.no_serve:
        return EXIT_OK
    args.host, args.port = None, None
    return cmd_serve(args)


def cmd_validate(args: argparse.Namespace) -> int:
    from llamaboard_ext.compile import YamlError, yaml_to_args

    from .runs import ConfigRejected

    services = _services(args, tracking=False)
    user = _local_user(services)
    bad = False
    for file in args.files:
        try:
            raw = Path(file).read_bytes()
            config = yaml_to_args(raw)
            name = Path(file).stem if not config.get("output_dir") else None
            services.runs.prepare(user, config, name=_cli_name(name) if name else None, for_submit=False)
        except OSError as err:
            print(f"{file}: file: {err.strerror}", file=sys.stderr)
            bad = True
        except YamlError as err:
            print(f"{file}: yaml: {err}")
            bad = True
        except ConfigRejected as err:
            for key, problem in err.problems.items():
                print(f"{file}: {key}: {problem}")
            bad = True
        else:
            print(f"{file}: ok")
    return EXIT_FAILED if bad else EXIT_OK


def _safe_name(stem: str) -> str:
    return ("".join(c if c.isalnum() or c in "._-" else "_" for c in stem).strip("._-") or "run")[:70]


def _cli_name(stem: str) -> str:
    return f"{_safe_name(stem)}_{datetime.now().strftime('%Y-%m-%d-%H-%M-%S')}"


def dry_run_manifests(args: argparse.Namespace) -> int:
    """The Kubernetes objects `submit` would create for FILE, as multi-document YAML; no cluster needed."""
    import hashlib

    from llamaboard_ext import compile as lbc

    from .launchers import JobSpec, LaunchError
    from .launchers.kubernetes import KubernetesLauncher
    from .launchers.k8s_manifests import to_yaml
    from .runs import LOG_FILE, ConfigRejected, RunService

    if args.gpus is not None and args.gpus < 0 or args.nodes < 1:
        print("error: --gpus must be 0 or more (per node) and --nodes 1 or more", file=sys.stderr)
        return EXIT_USAGE
    text = _read_config_file(args.file)
    if text is None:
        return EXIT_USAGE
    overrides = {"launcher": "kubernetes"}
    if args.gpus is not None:
        overrides["gpus_per_run"] = args.gpus
    services = _services(args, tracking=False, **overrides)
    settings, user = services.settings, _local_user(services)
    try:
        config = RunService.parse_config(text)
        name = args.name or (None if config.get("output_dir") else _cli_name(Path(args.file).stem))
        prepared = services.runs.prepare(user, config, name, for_submit=False)
    except ConfigRejected as err:
        return _rejected(args.file, err)
    gpus_per_node = settings.gpus_per_run if args.gpus is None else args.gpus
    env = {"MLFLOW_TRACKING_URI": settings.tracking_uri, "MLFLOW_RUN_ID": "<made at submit>",
           "MLFLOW_EXPERIMENT_NAME": settings.mlflow_experiment}
    spec = JobSpec(run_id=0, name=prepared.name, owner=user.username, argv=[], workdir=prepared.run_dir,
                   log_path=prepared.run_dir / LOG_FILE, env=env, gpus=gpus_per_node * args.nodes, nodes=args.nodes,
                   config_yaml=prepared.yaml,  # the sha as a submit records it: of the keys, not the header
                   config_sha256=hashlib.sha256(lbc.args_to_yaml(prepared.args).encode("utf-8")).hexdigest(),
                   experiment=settings.mlflow_experiment)
    try:
        manifests = KubernetesLauncher(settings).build(spec)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(to_yaml(manifests))
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from .runs import ConfigRejected, PortalError

    if args.dry_run:
        if args.launcher != "kubernetes":
            print("error: --dry-run prints Kubernetes manifests: add --launcher kubernetes", file=sys.stderr)
            return EXIT_USAGE
        return dry_run_manifests(args)
    services = _services(args, launcher=args.launcher)
    user = _local_user(services)
    try:
        raw = Path(args.file).read_bytes()
    except OSError as err:
        print(f"{args.file}: {err.strerror}", file=sys.stderr)
        return EXIT_USAGE
    from llamaboard_ext.compile import YamlError, yaml_to_args

    try:
        config = yaml_to_args(raw)
    except YamlError as err:
        print(f"{args.file}: yaml: {err}", file=sys.stderr)
        return EXIT_REJECTED
    name = args.name or (None if config.get("output_dir") else _cli_name(Path(args.file).stem))
    try:
        run = services.runs.submit_args(user, config, name=name, source="cli", gpus_per_node=args.gpus,
                                        nodes=args.nodes)
    except ConfigRejected as err:
        return _rejected(args.file, err)
    except PortalError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    if not args.json:
        print(f"run {run.id} ({run.name}) {run.status.value}", flush=True)
    if args.wait:
        run = services.runs.wait(user, run.id, timeout=args.timeout)
        if not run.status.is_final:
            print(f"run {run.id} still {run.status.value} after {args.timeout:g} s (it goes on; `cancel` stops it)",
                  file=sys.stderr)
            return EXIT_TIMEOUT
    if args.json:
        print(json.dumps(_run_dict(services, run), indent=2))
    elif args.wait:
        print(f"run {run.id} ({run.name}) {run.status.value}" + (f": {run.status_reason}" if run.status_reason else ""))
    if args.wait and run.status.value != "succeeded":
        return EXIT_FAILED
    return EXIT_OK


def cmd_runs(args: argparse.Namespace) -> int:
    from .run_query import RunQuery, total_text

    services = _services(args)  # the MLflow links need the tracking server
    query = RunQuery(status=args.status, model=args.model, dataset=args.dataset, stage=args.stage, method=args.method,
                     owner=args.owner, search=args.search, sort=args.sort, limit=args.limit, offset=args.offset)
    try:
        runs, total = services.runs.search_runs(_local_user(services), query)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps([_run_dict(services, r) for r in runs], indent=2))
        return EXIT_OK
    print(f"{'ID':>5}  {'STATUS':<10} {'OWNER':<12} {'CREATED':<19}  {'LOSS':>8}  NAME")
    for r in runs:
        loss = "" if r.final_loss is None else f"{r.final_loss:.4f}"
        created = r.created_at.strftime("%Y-%m-%d %H:%M:%S") if r.created_at else ""
        print(f"{r.id:>5}  {r.status.value:<10} {r.owner:<12} {created:<19}  {loss:>8}  {r.name}")
    if total > len(runs):
        print(f"({len(runs)} of {total_text(total)}; --offset {args.offset + len(runs)} for more)")
    return EXIT_OK


def cmd_clone(args: argparse.Namespace) -> int:
    from llamaboard_ext.compile import YamlError, yaml_to_args

    from .runs import ConfigRejected, NotFound, PortalError

    services = _services(args)
    user = _local_user(services)
    changes = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            print(f"error: --set {item}: write KEY=VALUE (VALUE in YAML, e.g. learning_rate=5e-5)", file=sys.stderr)
            return EXIT_USAGE
        try:
            changes.update(yaml_to_args(f"{key.strip()}: {value}"))
        except YamlError as err:
            print(f"error: --set {item}: {err}", file=sys.stderr)
            return EXIT_USAGE
    try:
        run = services.runs.clone(user, _run_id(args.run), args.name, changes)
    except ConfigRejected as err:
        for key, problem in err.problems.items():
            print(f"{key}: {problem}", file=sys.stderr)
        return EXIT_REJECTED
    except (NotFound, PortalError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    if args.wait:
        run = services.runs.wait(user, run.id, timeout=args.timeout)
    if args.json:
        print(json.dumps(_run_dict(services, run), indent=2))
    else:
        print(f"run {run.id} ({run.name}) {run.status.value}, cloned from run {run.parent_id}")
    return EXIT_OK if not args.wait or run.status.value == "succeeded" else EXIT_FAILED


def cmd_note(args: argparse.Namespace) -> int:
    from .runs import NotFound, PortalError

    services = _services(args, tracking=False)
    tags = [t for t in args.tags.split(",")] if args.tags is not None else None
    try:
        run = services.runs.annotate(_local_user(services), _run_id(args.run), note=args.note, tags=tags)
    except (NotFound, PortalError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"run {run.id}: note {run.note!r}, tags {run.tags!r}")
    return EXIT_OK


def _run_id(value: str) -> int:
    try:
        return int(value.lstrip("#"))
    except ValueError:
        print(f"error: RUN must be a run id (a number), got '{value}'", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def cmd_logs(args: argparse.Namespace) -> int:
    import time

    from .runs import NotFound

    services = _services(args)
    user, run_id = _local_user(services), _run_id(args.run)
    try:
        if not args.follow:
            sys.stdout.write(services.runs.logs(user, run_id, tail_bytes=args.tail))
            return EXIT_OK
        offset = 0
        while True:
            services.runs.poll_active()
            ended = services.runs.get_run(user, run_id).status.is_final
            text, offset = services.runs.log_since(user, run_id, offset)
            sys.stdout.write(text)
            sys.stdout.flush()
            if ended and not text:
                return EXIT_OK
            if not ended:
                time.sleep(1.0)
    except NotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED


def cmd_cancel(args: argparse.Namespace) -> int:
    from .runs import NotFound, PortalError

    services = _services(args)
    try:
        run = services.runs.cancel(_local_user(services), _run_id(args.run))
    except (NotFound, PortalError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"run {run.id} ({run.name}) {run.status.value}")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    """One run: its fields, status history and output files (run_to_dict + events + artifacts)."""
    from .run_view import artifact_to_dict, event_to_dict, human_size
    from .runs import NotFound

    services = _services(args)  # the MLflow link needs the tracking server's address only
    user, run_id = _local_user(services), _run_id(args.run)
    try:
        run = services.runs.get_run(user, run_id)
        events = services.runs.status_events(user, run_id)
        artifacts, cut = services.runs.artifacts(user, run_id)
    except NotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        out = _run_dict(services, run)
        out["events"] = [event_to_dict(e) for e in events]
        out["artifacts"] = [artifact_to_dict(a) for a in artifacts]
        out["reproducibility"] = services.runs.reproducibility(user, run_id)
        print(json.dumps(out, indent=2))
        return EXIT_OK
    print(f"run {run.id} ({run.name}) {run.status.value}" + (f": {run.status_reason}" if run.status_reason else ""))
    if run.git_commit:
        print(f"  config in Git: {run.git_commit} {run.git_path} on {run.git_branch}"
              + (f" ({run.git_commit_url})" if run.git_commit_url else ""))
    print(f"  owner {run.owner}, model {run.model_name_or_path}, datasets {run.datasets}, "
          f"{run.stage}/{run.finetuning_type}" + (f", cloned from run {run.parent_id}" if run.parent_id else ""))
    print("status history:")
    for e in events:
        print(f"  {e.at.strftime('%Y-%m-%d %H:%M:%S')}  {e.status.value:<10} {e.reason or ''}".rstrip())
    if not events:
        print("  no history recorded (the run is older than the status history)")
    print(f"output files ({run.output_dir}):")
    for a in artifacts:
        extra = f" ({a.files} files)" if a.path.endswith("/") else ""
        print(f"  {human_size(a.size):>10}  {a.modified.strftime('%Y-%m-%d %H:%M:%S')}  {a.path}{extra}")
    if cut:
        print("  … (more files: the list is cut here)")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    from .runs import ConfigRejected, NotFound, PortalError

    services = _services(args)
    user = _local_user(services)
    try:
        run = services.runs.resume(user, _run_id(args.run), args.name)
    except ConfigRejected as err:
        for key, problem in err.problems.items():
            print(f"{key}: {problem}", file=sys.stderr)
        return EXIT_REJECTED
    except (NotFound, PortalError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    if not args.json:
        print(f"run {run.id} ({run.name}) {run.status.value}, resuming run {run.parent_id} from its last checkpoint",
              flush=True)
    if args.wait:
        run = services.runs.wait(user, run.id, timeout=args.timeout)
        if not run.status.is_final:
            print(f"run {run.id} still {run.status.value} after {args.timeout:g} s (it goes on; `cancel` stops it)",
                  file=sys.stderr)
            return EXIT_TIMEOUT
    if args.json:
        print(json.dumps(_run_dict(services, run), indent=2))
    elif args.wait:
        print(f"run {run.id} ({run.name}) {run.status.value}" + (f": {run.status_reason}" if run.status_reason else ""))
    return EXIT_OK if not args.wait or run.status.value == "succeeded" else EXIT_FAILED


def _wait_and_print(services, user, run, args, what: str) -> int:
    """--wait / --json for eval and merge (as for resume)."""
    if not args.json:
        print(f"run {run.id} ({run.name}) {run.status.value}, {what}", flush=True)
    if args.wait:
        run = services.runs.wait(user, run.id, timeout=args.timeout)
        if not run.status.is_final:
            print(f"run {run.id} still {run.status.value} after {args.timeout:g} s (it goes on; `cancel` stops it)",
                  file=sys.stderr)
            return EXIT_TIMEOUT
    if args.json:
        out = _run_dict(services, run)
        out.update(kind=run.kind, registered_model=run.registered_model, registered_version=run.registered_version)
        if args.wait and run.kind == "eval" and run.parent_id:
            found = [e for e in services.runs.evaluations(user, run.parent_id) if e.run.id == run.id]
            out["eval_metrics"] = found[0].metrics if found else {}
        print(json.dumps(out, indent=2))
    elif args.wait:
        print(f"run {run.id} ({run.name}) {run.status.value}" + (f": {run.status_reason}" if run.status_reason else ""))
        if run.kind == "eval" and run.status.value == "succeeded" and run.parent_id:
            for e in services.runs.evaluations(user, run.parent_id):
                if e.run.id == run.id:
                    for key, value in sorted(e.metrics.items()):
                        print(f"  {key:<36} {value:.4f}")
                    if e.predictions:
                        print(f"  predictions: {run.output_dir}/{e.predictions}")
        if run.kind == "export" and run.registered_version:
            print(f"registered model {run.registered_model} version {run.registered_version} ({run.output_dir})")
    return EXIT_OK if not args.wait or run.status.value == "succeeded" else EXIT_FAILED


def cmd_eval(args: argparse.Namespace) -> int:
    """An eval job of a succeeded run: predictions scored (BLEU-4, ROUGE), metrics onto the run."""
    from .runs import ConfigRejected, NotFound, PortalError

    services = _services(args)
    user = _local_user(services)
    datasets = [d.strip() for item in (args.dataset or []) for d in item.split(",") if d.strip()]
    try:
        run = services.runs.evaluate(user, _run_id(args.run), datasets or None, args.max_samples,
                                     predict_with_generate=not args.no_generate,
                                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, name=args.name)
    except ConfigRejected as err:
        for key, problem in err.problems.items():
            print(f"{key}: {problem}", file=sys.stderr)
        return EXIT_REJECTED
    except (NotFound, PortalError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    return _wait_and_print(services, user, run, args, f"evaluating run {run.parent_id} on {run.datasets}")


def cmd_merge(args: argparse.Namespace) -> int:
    """An export job of a succeeded run: the merged model, registered in MLflow's Model Registry."""
    from .runs import ConfigRejected, NotFound, PortalError

    services = _services(args)
    user = _local_user(services)
    try:
        run = services.runs.merge(user, _run_id(args.run), args.name)
    except ConfigRejected as err:
        for key, problem in err.problems.items():
            print(f"{key}: {problem}", file=sys.stderr)
        return EXIT_REJECTED
    except (NotFound, PortalError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    return _wait_and_print(services, user, run, args,
                           f"merging run {run.parent_id} into {run.output_dir} (model {run.registered_model})")


def cmd_model_alias(args: argparse.Namespace) -> int:
    """Point a registry alias (candidate, production) at a registered model's version (admins)."""
    from .runs import NotFound, PortalError

    services = _services(args)
    try:
        services.runs.set_alias(_local_user(services), args.name, args.version, args.alias)
    except (NotFound, PortalError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.name}@{args.alias} -> version {args.version}")
    return EXIT_OK


def cmd_users(args: argparse.Namespace) -> int:
    """Admin commands from the portal's machine (whoever can run them owns the data root anyway)."""
    from .users import UserAdmin

    services = _services(args, tracking=False)
    actor = _local_user(services)
    admin = UserAdmin(services.db)
    try:
        if args.action == "list":
            users = admin.list_users(actor)
            if args.json:
                print(json.dumps([{"username": u.username, "email": u.email, "is_admin": u.is_admin,
                                   "is_active": u.is_active, "groups": u.groups} for u in users], indent=2))
            else:
                for u in users:
                    flags = ",".join(f for f, on in (("admin", u.is_admin), ("inactive", not u.is_active)) if on)
                    print(f"{u.username:<24} {u.email or '':<32} {flags}")
            return EXIT_OK
        if not args.name:
            print("error: give the user name", file=sys.stderr)
            return EXIT_USAGE
        user = admin.set_active(actor, args.name, args.action == "activate")
    except (PermissionError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{user.username}: {'active' if user.is_active else 'deactivated'}")
    return EXIT_OK


def _pairs(text: str | None, what: str) -> dict[str, str | None]:
    """'prompt=question,response=answer,query=' -> {'prompt': 'question', 'response': 'answer', 'query': None}"""
    out: dict[str, str | None] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{what}: '{item}' is not KEY=VALUE (an empty VALUE removes a default column)")
        out[key.strip()] = value.strip() or None
    return out


def dataset_spec_for(path: Path, formatting: str, columns: str | None, tags: str | None):
    """The file's own shape where it matches the format asked for, then the overrides given."""
    from dataclasses import replace

    from .dataset_checks import DatasetSpec, guess_spec_for_file

    guessed = guess_spec_for_file(path)
    spec = guessed if guessed is not None and guessed.formatting == formatting else DatasetSpec(formatting)
    return replace(spec, columns={**spec.columns, **_pairs(columns, "--columns")},
                   tags={**spec.tags, **_pairs(tags, "--tags")})


def _print_problems(report, name: str) -> None:
    for problem in report.problems:
        level = "error" if problem.blocking else "warning"
        print(f"{name}: {level}: {problem.kind}: {problem.message}", file=sys.stderr)


def cmd_datasets(args: argparse.Namespace) -> int:
    from .datasets import DatasetRejected

    if args.action == "add" and not Path(args.file).is_file():
        print(f"error: {args.file}: no such file", file=sys.stderr)
        return EXIT_USAGE
    services = _services(args, tracking=False)
    user = _local_user(services)
    datasets = services.datasets
    try:
        if args.action == "list":
            items = datasets.list(user)
            if args.json:
                print(json.dumps([d.as_dict() for d in items], indent=2))
            else:
                print(f"{'NAME':<32} {'VER':>4} {'ROWS':>9}  {'SHA256':<12}  {'FORMAT':<9} WHERE")
                for d in items:
                    print(f"{d.name:<32} {d.version or '':>4} {d.rows if d.rows is not None else '':>9}  "
                          f"{(d.sha256 or '')[:12]:<12}  {d.formatting:<9} {'shared' if d.shared else 'mine'}")
            return EXIT_OK
        if args.action == "add":
            path = Path(args.file)
            spec = dataset_spec_for(path, args.format, args.columns, args.tags)
            try:
                version, report = datasets.add(user, path, args.name, spec, source_name=path.name,
                                               cutoff_len=args.cutoff_len)
            except DatasetRejected as err:
                if err.report is not None:
                    _print_problems(err.report, args.file)
                else:
                    print(f"{args.file}: error: {err}", file=sys.stderr)
                return EXIT_FAILED
            _print_problems(report, args.file)  # warnings only: it was saved
            print(f"{version.name} v{version.version}: {version.rows} rows, sha256 {version.sha256}")
            return EXIT_OK
        if args.action == "rename":
            datasets.rename(user, args.name, args.new_name)
            print(f"{args.name} -> {args.new_name}")
            return EXIT_OK
        removed = datasets.delete(user, args.name)
        print(f"{args.name}: deleted ({len(removed)} file(s) removed; files used by runs are kept)")
        return EXIT_OK
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED


def cmd_models(args: argparse.Namespace) -> int:
    """The model catalog: list the entries, download a hub entry to the shared volume, verify it."""
    from .model_download import (
        DownloadError,
        catalog_entry,
        download_model,
        hub_entry,
        model_rows,
        target_for,
        verify_model,
    )

    settings = _settings(args)
    try:
        if args.action == "list":
            rows = model_rows(settings)
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print(f"{'NAME':<32} {'SOURCE':<40} {'TEMPLATE':<12} {'DOWNLOADED':<10} LICENSE")
                for r in rows:
                    print(f"{r['name']:<32} {r['hub_id'] or r['path']:<40} {r['template'] or '':<12} "
                          f"{'yes' if r['downloaded'] else 'no':<10} {r['license'] or ''}")
            return EXIT_OK
        if args.action == "download":
            entry = hub_entry(settings, args.name)
            settings.ensure_dirs()
            manifest = download_model(entry, target_for(settings, entry), revision=args.revision,
                                      progress=lambda line: print(line, flush=True))
            print(f"{args.name}: {manifest.repo}@{manifest.commit} in {manifest.target} "
                  f"(checksums in {manifest.target}/checksums.sha256)")
            return EXIT_OK
        entry = catalog_entry(settings, args.name)  # verify
        folder = entry.path if entry.path is not None else target_for(settings, entry)
        bad = verify_model(folder)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    for rel in bad:
        print(f"{rel}: FAILED")
    if bad:
        print(f"error: {args.name}: {len(bad)} file(s) differ from {folder}/checksums.sha256 or are missing",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.name}: all files match {folder}/checksums.sha256")
    return EXIT_OK


def cmd_git_export(args: argparse.Namespace) -> int:
    """Export a config file to the configured repository as the local user; prints the commit SHA."""
    from .git_configs import GitConfigs
    from .git_export import GitExportError
    from .runs import ConfigRejected

    if (args.file is None) == (args.run is None):
        print("error: give a config FILE or --run RUN (one of them)", file=sys.stderr)
        return EXIT_USAGE
    if args.run is not None:  # a run's config; the commit is recorded on the run
        from .runs import NotFound

        services = _services(args, tracking=False)
        try:
            result = GitConfigs(services.runs).export_run(_local_user(services), _run_id(args.run))
        except ConfigRejected as err:
            return _rejected(f"run {args.run}", err)
        except (GitExportError, NotFound) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_FAILED
        return _print_export(result)
    text = _read_config_file(args.file)
    if text is None:
        return EXIT_USAGE
    services = _services(args, tracking=False)
    git = GitConfigs(services.runs)
    # a stable name (no time stamp): Git keeps the history
    name = args.name or (None if "output_dir" in text else _safe_name(Path(args.file).stem))
    try:
        result = git.export_yaml(_local_user(services), text, name)
    except ConfigRejected as err:
        return _rejected(args.file, err)
    except GitExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    return _print_export(result)


def _print_export(result) -> int:
    state = "unchanged" if result.unchanged else "committed"
    print(f"{state} {result.path} on {result.branch}" + (f" ({result.url})" if result.url else ""), file=sys.stderr)
    if result.merge_request_url:
        print(f"merge request: {result.merge_request_url}", file=sys.stderr)
    if result.merge_request_error:
        print(f"warning: no merge request: {result.merge_request_error}", file=sys.stderr)
    print(result.sha)
    return EXIT_OK


def cmd_tokens(args: argparse.Namespace) -> int:
    """Admin commands on the portal's machine: make, list and revoke users' API tokens."""
    from .tokens import TokenError, TokenService

    services = _services(args, tracking=False)
    tokens, admin = TokenService(services.db), _local_user(services)
    try:
        if args.action == "create":
            user = services.runs.user(args.user)
            token, row = tokens.create(user, args.name, expires_days=args.expires_days, actor=admin)
            print(f"token {row.id} '{row.name}' for {user.username}"
                  + (f", expires {row.expires_at:%Y-%m-%d}" if row.expires_at else "") + " (shown once):", file=sys.stderr)
            print(token)
        elif args.action == "list":
            user = services.runs.user(args.user)
            print(f"{'ID':>4}  {'NAME':<24} {'PREFIX':<12} {'CREATED':<16}  {'LAST USED':<16}  STATE")
            for row in tokens.list(user):
                state = "revoked" if row.revoked_at else "active"
                used = f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "never"
                print(f"{row.id:>4}  {row.name:<24} {row.prefix + '…':<12} {row.created_at:%Y-%m-%d %H:%M}  "
                      f"{used:<16}  {state}")
        else:
            row = tokens.revoke(admin, args.id)
            print(f"token {row.id} '{row.name}' revoked")
    except (TokenError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaboard-portal", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-root", help="where the portal keeps its files (default: $PORTAL_DATA_ROOT or "
                                            "~/.local/share/llamaboard-portal)")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--server", metavar="URL", help="run against the portal at URL (its HTTP API) instead of here")
    remote.add_argument("--token-env", metavar="VAR", default="PORTAL_TOKEN",
                        help="with --server: the environment variable holding your API token (default PORTAL_TOKEN)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common], help="run the portal")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 7860)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", parents=[common], help="make the tiny demo model, dataset and config, then serve")
    p.add_argument("--no-serve", action="store_true", help="only make the demo files")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("validate", parents=[common, remote], help="check config files (exit 1 when one is invalid)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=_with_server(cmd_validate, remote_validate))

    p = sub.add_parser("submit", parents=[common, remote], help="submit a config file as a run")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--name", help="run name (default: the config's output_dir, else the file name and the time)")
    p.add_argument("--wait", action="store_true", help="wait until the run ends; exit 1 unless it succeeded")
    p.add_argument("--timeout", type=float, help="with --wait: stop waiting after this many seconds (then exit 4)")
    p.add_argument("--json", action="store_true", help="print the run as JSON")
    p.add_argument("--launcher", choices=["local", "kubernetes"],
                   help="where the run goes (default: the portal's launcher setting)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --launcher kubernetes: print the manifests it would create, create nothing")
    p.add_argument("--gpus", type=int, help="Kubernetes launcher: GPUs per node (default: gpus_per_run)")
    p.add_argument("--nodes", type=int, default=1,
                   help="Kubernetes launcher: nodes, each with --gpus GPUs (several: a JobSet or an Indexed Job)")
    p.set_defaults(func=_with_server(cmd_submit, remote_submit))

    p = sub.add_parser("runs", parents=[common, remote], help="list runs: filters, search, sort and paging")
    p.add_argument("--json", action="store_true")
    p.add_argument("--status", action="append", help="queued, starting, running, succeeded, failed, cancelled (repeatable)")
    p.add_argument("--model", help="part of the base model's path or hub id")
    p.add_argument("--dataset", help="part of a dataset name")
    p.add_argument("--stage", help="sft, pt, rm, ppo, dpo, kto")
    p.add_argument("--method", help="lora, full, freeze, oft")
    p.add_argument("--owner", help="one user's runs (admins)")
    p.add_argument("--search", help="part of the name, note or tags")
    p.add_argument("--sort", default="newest", help="newest, oldest, loss, name")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p.set_defaults(func=_with_server(cmd_runs, remote_runs))

    p = sub.add_parser("clone", parents=[common], help="run a run's config again (same dataset versions), with changes")
    p.add_argument("run")
    p.add_argument("--name", required=True, help="the new run's name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="change one key, e.g. learning_rate=5e-5")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_clone)

    p = sub.add_parser("note", parents=[common], help="set a run's note and tags")
    p.add_argument("run")
    p.add_argument("--note")
    p.add_argument("--tags", help="comma separated; empty clears them")
    p.set_defaults(func=cmd_note)

    p = sub.add_parser("logs", parents=[common, remote], help="print the end of a run's log")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--tail", type=int, default=64_000, help="bytes from the end (default 64000)")
    p.add_argument("--follow", "-f", action="store_true", help="the whole log, as it grows, until the run ends")
    p.set_defaults(func=_with_server(cmd_logs, remote_logs))

    p = sub.add_parser("cancel", parents=[common, remote], help="cancel a queued or running run")
    p.add_argument("run", metavar="RUN")
    p.set_defaults(func=_with_server(cmd_cancel, remote_cancel))

    p = sub.add_parser("show", parents=[common, remote], help="one run: its fields, status history and output files")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--json", action="store_true", help="the run as JSON, with `events` and `artifacts`")
    p.set_defaults(func=_with_server(cmd_show, remote_show))

    p = sub.add_parser("resume", parents=[common, remote],
                       help="a failed or cancelled run again, from its last checkpoint (same config and data)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--name", help="the new run's name (default: <run name>_resume)")
    p.add_argument("--wait", action="store_true", help="wait until the new run ends; exit 1 unless it succeeded")
    p.add_argument("--timeout", type=float, help="with --wait: stop waiting after this many seconds (then exit 4)")
    p.add_argument("--json", action="store_true", help="print the new run as JSON")
    p.set_defaults(func=_with_server(cmd_resume, remote_resume))

    p = sub.add_parser("eval", parents=[common, remote],
                       help="evaluate a succeeded run in a job: its answers on a dataset scored (BLEU-4, ROUGE)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--dataset", action="append", metavar="D",
                   help="dataset to evaluate on (repeatable; default: the run's eval_dataset, else its dataset)")
    p.add_argument("--max-samples", type=int, help="rows per dataset (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest generated answer (default 128)")
    p.add_argument("--batch-size", type=int, default=4, help="per-device eval batch size (default 4)")
    p.add_argument("--no-generate", action="store_true", help="the eval loss only, no generated answers")
    p.add_argument("--name", help="the eval run's name (default: <run name>_eval)")
    p.add_argument("--wait", action="store_true", help="wait until it ends and print the metrics; exit 1 unless it succeeded")
    p.add_argument("--timeout", type=float, help="with --wait: stop waiting after this many seconds (then exit 4)")
    p.add_argument("--json", action="store_true", help="print the eval run as JSON (with --wait: its metrics)")
    p.set_defaults(func=_with_server(cmd_eval, remote_eval))

    p = sub.add_parser("merge", parents=[common, remote],
                       help="merge a succeeded run into a model folder and register it in MLflow's Model Registry")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--name", help="registered model name (default: <user>-<run name>)")
    p.add_argument("--wait", action="store_true",
                   help="wait until it ends and print the registered model and version; exit 1 unless it succeeded")
    p.add_argument("--timeout", type=float, help="with --wait: stop waiting after this many seconds (then exit 4)")
    p.add_argument("--json", action="store_true", help="print the export run as JSON")
    p.set_defaults(func=_with_server(cmd_merge, remote_merge))

    p = sub.add_parser("git-export", parents=[common],
                       help="commit a config file, or a run's config (--run), to the configured Git repository "
                            "(PORTAL_GIT_URL); prints the SHA")
    p.add_argument("file", metavar="FILE", nargs="?")
    p.add_argument("--run", metavar="RUN", help="export this run's config instead of a file; the commit is noted "
                                                "on the run (`show RUN`)")
    p.add_argument("--name", help="run name in the path template (default: the config's output_dir, else the file name)")
    p.set_defaults(func=cmd_git_export)

    p = sub.add_parser("tokens", parents=[common], help="API tokens (admins, on the portal's machine)")
    tsub = p.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("create", parents=[common], help="make a token for USER and print it (shown once)")
    t.add_argument("user", metavar="USER")
    t.add_argument("--name", default="cli", help="what uses it, e.g. gitlab-ci (default: cli)")
    t.add_argument("--expires-days", type=int, help="days until it stops working (default: never)")
    t.set_defaults(func=cmd_tokens)
    t = tsub.add_parser("list", parents=[common], help="USER's tokens (never the tokens themselves)")
    t.add_argument("user", metavar="USER")
    t.set_defaults(func=cmd_tokens)
    t = tsub.add_parser("revoke", parents=[common], help="revoke a token by its id")
    t.add_argument("id", type=int, metavar="ID")
    t.set_defaults(func=cmd_tokens)

    p = sub.add_parser("datasets", parents=[common], help="add, list, rename or delete your datasets")
    dsub = p.add_subparsers(dest="action", required=True)
    d = dsub.add_parser("add", parents=[common], help="check a file and save it as a dataset (exit 1 when a check fails)")
    d.add_argument("file", help="a .json, .jsonl, .csv or .parquet file")
    d.add_argument("--name", required=True, help="the dataset's name (a new upload under a taken name is a new version)")
    d.add_argument("--format", choices=["alpaca", "sharegpt"], default="alpaca")
    d.add_argument("--columns", help="column names, e.g. prompt=question,response=answer,query= (empty: none)")
    d.add_argument("--tags", help="sharegpt tags, e.g. role_tag=role,content_tag=content,user_tag=user")
    d.add_argument("--cutoff-len", type=int, help="warn about rows longer than this many tokens (estimated)")
    d.set_defaults(func=cmd_datasets)
    d = dsub.add_parser("list", parents=[common], help="your datasets and the shared ones")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_datasets)
    d = dsub.add_parser("rename", parents=[common], help="rename one of your datasets")
    d.add_argument("name")
    d.add_argument("new_name")
    d.set_defaults(func=cmd_datasets)
    d = dsub.add_parser("delete", parents=[common], help="delete one of your datasets (files a run used are kept)")
    d.add_argument("name")
    d.set_defaults(func=cmd_datasets)

    p = sub.add_parser("users", parents=[common], help="list users; deactivate (ends their sessions) or activate one")
    p.add_argument("action", choices=["list", "deactivate", "activate"])
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_users)

    p = sub.add_parser("models", parents=[common],
                       help="the model catalog: list, download to the shared volume, verify")
    msub = p.add_subparsers(dest="action", required=True)
    m = msub.add_parser("list", parents=[common], help="catalog entries and whether their files are there")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)
    m = msub.add_parser("download", parents=[common],
                        help="download a hub_id entry to <data root>/shared/models/NAME with checksums "
                             "(HF_ENDPOINT, HF_TOKEN from the environment)")
    m.add_argument("name", metavar="NAME")
    m.add_argument("--revision", help="branch, tag or commit (default: the repository's default branch)")
    m.set_defaults(func=cmd_models)
    m = msub.add_parser("verify", parents=[common], help="re-hash a downloaded model (exit 1 listing bad files)")
    m.add_argument("name", metavar="NAME")
    m.set_defaults(func=cmd_models)
    m = msub.add_parser("alias", parents=[common, remote],
                        help="point a Model Registry alias (candidate, production) at a version of a merged model (admins)")
    m.add_argument("name", metavar="NAME", help="registered model name (as `merge` printed it)")
    m.add_argument("version", metavar="VERSION")
    m.add_argument("alias", metavar="ALIAS", choices=["candidate", "production"])
    m.set_defaults(func=_with_server(cmd_model_alias, remote_model_alias))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("PORTAL_LOG_LEVEL", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command not in ("serve", "demo"):  # a server's requests carry their own address
        from .request_context import client_address

        client_address.set(f"cli@{socket.gethostname()}")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
