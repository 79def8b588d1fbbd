"""The portal's HTTP API (JSON, described at /api/openapi.json and /api/docs): validate a config, submit a run,
follow it, cancel or resume it, evaluate or merge it, set a registry alias. It calls the same services, with the
same checks, as the UI and the CLI.

Callers sign in with a personal access token (``Authorization: Bearer lbp_...``) or, from a
browser, with their session.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from . import __version__
from .client import API_PREFIX
from .models import Run, User
from .run_query import RunQuery
from .run_view import artifact_to_dict, event_to_dict, metrics_summary, run_to_dict
from .runs import ConfigRejected, NotFound, PortalError, RunService


class ConfigIn(BaseModel):
    yaml: str = Field(description="the LLaMA-Factory config, as YAML text")
    name: str | None = Field(default=None, description="run name (default: the config's output_dir)")
    gpus: int | None = Field(default=None, description="GPUs per node (default: the portal's gpus_per_run); "
                                                       "Kubernetes launcher only")
    nodes: int = Field(default=1, description="nodes the run trains on, each with `gpus` GPUs; more than 1 needs "
                                              "the Kubernetes launcher and 1 or more GPUs per node")


class ValidationOut(BaseModel):
    valid: bool
    problems: dict[str, str] = Field(description="each bad key and what to do about it")
    name: str | None = None


class RunOut(BaseModel):
    id: int
    name: str
    owner: str
    status: str
    status_reason: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    exit_code: int | None
    mlflow_run_id: str | None
    mlflow_url: str | None
    final_loss: float | None
    model: str
    datasets: str
    stage: str
    finetuning_type: str
    output_dir: str
    gpus: int = Field(description="all the run's GPUs (per node x nodes)")
    nodes: int
    config_sha256: str
    parent_id: int | None
    note: str
    tags: list[str]
    dataset_fingerprints: list[dict[str, Any]]
    metrics: dict[str, Any] | None = Field(default=None, description="last value and step of each metric")
    events: list[EventOut] | None = Field(default=None, description="the run's status changes, oldest first "
                                                                    "(GET /api/runs/{id} only; empty for runs "
                                                                    "made before the status history existed)")
    kind: str = Field(default="train", description="train; eval (an evaluation of its parent); export (its "
                                                   "parent merged into a model folder and registered in MLflow)")
    registered_model: str | None = Field(default=None, description="export runs: the MLflow registered model name")
    registered_version: str | None = Field(default=None, description="export runs: the model version registered "
                                                                     "once the run succeeded")
    git_commit: str | None = Field(default=None, description="the commit holding the run's config, once exported "
                                                             "to Git (Runs tab, `git-export --run`)")
    git_branch: str | None = None
    git_path: str | None = None
    git_commit_url: str | None = Field(default=None, description="link to that commit (git_commit_url_template)")


class EventOut(BaseModel):
    at: str | None
    status: str
    reason: str | None


class ArtifactOut(BaseModel):
    path: str = Field(description="relative to the run's output folder; a checkpoint folder ends with '/'")
    size: int = Field(description="bytes (a checkpoint folder: all its files)")
    modified: str | None
    files: int = Field(description="files in a checkpoint folder (1 for a file)")
    folder: bool
    downloadable: bool = Field(description="a file small enough for GET /api/runs/{id}/artifacts/{path}")


class ArtifactList(BaseModel):
    artifacts: list[ArtifactOut]
    truncated: bool = Field(description="the folder holds more entries than listed")


def _attachment(filename: str) -> str:
    from urllib.parse import quote

    ascii_name = "".join(c if c.isalnum() or c in "._-" else "_" for c in filename) or "file"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"


class RunPage(BaseModel):
    total: int
    runs: list[RunOut]


class ResumeIn(BaseModel):
    name: str | None = Field(default=None, description="the new run's name (default: <run name>_resume)")


class EvaluateIn(BaseModel):
    datasets: list[str] | None = Field(default=None, description="datasets to evaluate on (default: the run's "
                                                                 "eval_dataset, else its dataset)")
    max_samples: int | None = Field(default=None, description="rows per dataset (default: all)")
    max_new_tokens: int = Field(default=128, description="longest generated answer")
    predict_with_generate: bool = Field(default=True, description="generate answers and score them (BLEU-4, "
                                                                  "ROUGE); false: the eval loss only")
    batch_size: int = Field(default=4, description="per-device eval batch size")
    name: str | None = Field(default=None, description="the eval run's name (default: <run name>_eval)")


class MergeIn(BaseModel):
    name: str | None = Field(default=None, description="registered model name (default: <user>-<run name>)")


class EvaluationOut(BaseModel):
    run: RunOut = Field(description="the eval run")
    metrics: dict[str, float] = Field(description="what it measured (e.g. predict_bleu-4, predict_rouge-l); "
                                                  "empty until it succeeded")
    predictions: str | None = Field(description="the generated answers, a file of the eval run's "
                                                "(GET /api/runs/{eval run id}/artifacts/{predictions})")


class EvaluationList(BaseModel):
    evaluations: list[EvaluationOut] = Field(description="newest first")


class AliasIn(BaseModel):
    alias: Literal["candidate", "production"]


class AliasOut(BaseModel):
    name: str
    version: str
    alias: str


def _rejected(err: ConfigRejected) -> JSONResponse:
    return JSONResponse({"detail": "the config was rejected", "problems": err.problems}, status_code=422)


def build_api(runs: RunService, request_user: Callable[[Request], User | None]) -> APIRouter:
    def user_of(request: Request) -> User:
        user = request_user(request)
        if user is None:
            raise HTTPException(401, "sign in first: send 'Authorization: Bearer <token>' (make a token in the "
                                     "Account tab or with `llamaboard-portal tokens create`)")
        return user

    router = APIRouter(prefix=API_PREFIX, tags=["runs"])
    you = Depends(user_of)

    def as_out(run, with_metrics: bool = False, user: User | None = None) -> dict[str, Any]:
        out = run_to_dict(run, runs.mlflow_url(run))
        for key in ("kind", "registered_model", "registered_version"):
            out.setdefault(key, getattr(run, key))
        if with_metrics and user is not None:
            try:
                out["metrics"] = metrics_summary(runs.metrics(user, run.id))
            except Exception:  # MLflow down: the run itself still answers
                out["metrics"] = None
        return out

    @router.get("/me")
    def me(user: User = you) -> dict[str, Any]:
        return {"username": user.username, "is_admin": user.is_admin, "portal_version": __version__}

    @router.post("/validate", response_model=ValidationOut)
    def validate(body: ConfigIn, user: User = you):
        try:
            prepared = runs.validate_yaml(user, body.yaml, body.name, gpus_per_node=body.gpus, nodes=body.nodes)
        except ConfigRejected as err:
            return {"valid": False, "problems": err.problems, "name": body.name}
        return {"valid": True, "problems": {}, "name": prepared.name}

    @router.post("/runs", response_model=RunOut, status_code=201,
                 responses={422: {"description": "the config was rejected: `problems` names each bad key"}})
    def submit(body: ConfigIn, user: User = you):
        try:
            run = runs.submit_yaml(user, body.yaml, body.name, source="api", gpus_per_node=body.gpus,
                                   nodes=body.nodes)
        except ConfigRejected as err:
            return _rejected(err)
        except PortalError as err:
            raise HTTPException(409, str(err)) from err
        return as_out(run)

    @router.get("/runs", response_model=RunPage)
    def list_runs(user: User = you, status: list[str] | None = Query(default=None), search: str | None = None,
                  model: str | None = None, dataset: str | None = None, stage: str | None = None,
                  method: str | None = None, owner: str | None = None, sort: str = "newest",
                  limit: int = Query(default=50, ge=1, le=500), offset: int = Query(default=0, ge=0)):
        query = RunQuery(status=status, model=model, dataset=dataset, stage=stage, method=method, owner=owner,
                         search=search, sort=sort, limit=limit, offset=offset)
        try:
            page, total = runs.search_runs(user, query)
        except ValueError as err:
            raise HTTPException(400, str(err)) from err
        return {"total": total, "runs": [as_out(r) for r in page]}

    @router.get("/runs/{run_id}", response_model=RunOut)
    def get_run(run_id: int, user: User = you):
        try:
            out = as_out(runs.get_run(user, run_id), with_metrics=True, user=user)
            out["events"] = [event_to_dict(e) for e in runs.status_events(user, run_id)]
            return out
        except NotFound as err:
            raise HTTPException(404, str(err)) from err

    @router.get("/runs/{run_id}/logs", response_class=PlainTextResponse,
                responses={200: {"description": "log text; header X-Log-Offset: where to continue with ?offset=; "
                                                "with ?download=1 the whole log file as an attachment"}})
    def logs(run_id: int, user: User = you, offset: int | None = Query(default=None, ge=0),
             tail: int = Query(default=64_000, ge=1, le=10_000_000),
             download: bool = Query(default=False, description="the whole log file, as an attachment")):
        if download:
            return whole_log(run_id, user)
        try:
            if offset is None:
                text = runs.logs(user, run_id, tail_bytes=tail)
                _, end = runs.log_since(user, run_id, 1 << 62)  # past the end: just the log's size
            else:
                text, end = runs.log_since(user, run_id, offset)
        except NotFound as err:
            raise HTTPException(404, str(err)) from err
        return PlainTextResponse(text, headers={"X-Log-Offset": str(end)})

    def whole_log(run_id: int, user: User) -> StreamingResponse:
        try:
            run, handle, size = runs.open_log(user, run_id)
        except NotFound as err:
            raise HTTPException(404, str(err)) from err

        def chunks():  # the log as long as it was when asked (a running job's log grows)
            with handle:
                left = size
                while left > 0:
                    data = handle.read(min(left, 1 << 20))
                    if not data:
                        break
                    left -= len(data)
                    yield data

        return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8", headers={
            "Content-Disposition": _attachment(f"run-{run.id}-{run.name}.log"), "X-Log-Offset": str(size)})

    def new_run(submit: Callable[[], Run]):
        """A run made from another (resume, evaluate, merge): 404 for another user's run, 422 with
        `problems` for a refused config, 409 for a run in the wrong state."""
        try:
            run = submit()
        except NotFound as err:
            raise HTTPException(404, str(err)) from err
        except ConfigRejected as err:
            return _rejected(err)
        except PortalError as err:
            raise HTTPException(409, str(err)) from err
        return as_out(run)

    @router.get("/runs/{run_id}/artifacts", response_model=ArtifactList)
    def artifacts(run_id: int, user: User = you):
        try:
            found, cut = runs.artifacts(user, run_id)
        except NotFound as err:
            raise HTTPException(404, str(err)) from err
        return {"artifacts": [artifact_to_dict(a) for a in found], "truncated": cut}

    @router.get("/runs/{run_id}/artifacts/{path:path}", response_class=Response,
                responses={200: {"description": "the file, as an attachment"},
                           404: {"description": "no such file in the run's output folder (links are not served)"},
                           409: {"description": "the file is over the download limit"}})
    def artifact(run_id: int, path: str, user: User = you):
        try:
            name, data = runs.artifact_bytes(user, run_id, path)
        except NotFound as err:
            raise HTTPException(404, str(err)) from err
        except PortalError as err:
            raise HTTPException(409, str(err)) from err
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": _attachment(name)})

    @router.post("/runs/{run_id}/resume", response_model=RunOut, status_code=201,
                 responses={404: {"description": "no such run, or another user's"},
                            409: {"description": "the run cannot be resumed (not failed or cancelled, not yours, "
                                                 "no checkpoint)"},
                            422: {"description": "the new run was rejected: `problems` names each bad key"}})
    def resume(run_id: int, body: ResumeIn | None = None, user: User = you,
               name: str | None = Query(default=None, description="the new run's name (or `name` in the body)")):
        return new_run(lambda: runs.resume(user, run_id, (body.name if body else None) or name))

    @router.post("/runs/{run_id}/evaluate", response_model=RunOut, status_code=201,
                 responses={404: {"description": "no such run, or another user's"},
                            409: {"description": "the run cannot be evaluated: not a succeeded training run of "
                                                 "yours, or its model is missing (`detail` says which)"},
                            422: {"description": "refused: `problems` names each bad value (datasets, max_samples, "
                                                 "max_new_tokens, ...)"}})
    def evaluate(run_id: int, body: EvaluateIn | None = None, user: User = you):
        """Submit an eval job of a succeeded run (a run of kind `eval`, its `parent_id` the run); when it
        succeeds its metrics are on GET /api/runs/{run_id}/evaluations and on both MLflow runs."""
        body = body or EvaluateIn()
        return new_run(lambda: runs.evaluate(user, run_id, body.datasets or None, body.max_samples,
                                             predict_with_generate=body.predict_with_generate,
                                             max_new_tokens=body.max_new_tokens, batch_size=body.batch_size,
                                             name=body.name))

    @router.get("/runs/{run_id}/evaluations", response_model=EvaluationList,
                responses={404: {"description": "no such run, or another user's"}})
    def evaluations(run_id: int, user: User = you):
        """The eval runs made of a run, newest first, with their metrics."""
        try:
            found = runs.evaluations(user, run_id)
        except NotFound as err:
            raise HTTPException(404, str(err)) from err
        return {"evaluations": [{"run": as_out(e.run), "metrics": e.metrics, "predictions": e.predictions}
                                for e in found]}

    @router.post("/runs/{run_id}/merge", response_model=RunOut, status_code=201,
                 responses={404: {"description": "no such run, or another user's"},
                            409: {"description": "the run cannot be merged (not a succeeded training run of yours), "
                                               "or the model name is another user's"},
                            422: {"description": "refused: `problems` names each bad value (name, ...)"}})
    def merge(run_id: int, body: MergeIn | None = None, user: User = you):
        """Submit an export job of a succeeded run (a run of kind `export`): the merged model, registered in
        MLflow's Model Registry as `registered_model` once it succeeds (then `registered_version` is set)."""
        return new_run(lambda: runs.merge(user, run_id, body.name if body else None))

    @router.post("/models/{name}/versions/{version}/alias", response_model=AliasOut, tags=["models"],
                 responses={403: {"description": "only admins set registry aliases"},
                            404: {"description": "no such registered model version"}})
    def set_alias(name: str, version: str, body: AliasIn, user: User = you):
        """Point a Model Registry alias (candidate, production) at a version of a merged model (admins)."""
        try:
            runs.set_alias(user, name, version, body.alias)
        except PermissionError as err:
            raise HTTPException(403, str(err)) from err
        except NotFound as err:
            raise HTTPException(404, str(err)) from err
        except PortalError as err:
            raise HTTPException(422, str(err)) from err
        return {"name": name, "version": version, "alias": body.alias}

    @router.post("/runs/{run_id}/cancel", response_model=RunOut)
    async def cancel(run_id: int, user: User = you):
        try:  # waits for the job to stop (seconds): off the event loop
            run = await run_in_threadpool(runs.cancel, user, run_id)
        except NotFound as err:
            raise HTTPException(404, str(err)) from err
        except PortalError as err:
            raise HTTPException(409, str(err)) from err
        return as_out(run)

    return router
