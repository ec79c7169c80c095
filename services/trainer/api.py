"""The trainer's control API: start and steer runs, read the config, probes and metrics.

Every ``/v1`` route needs ``Authorization: Bearer <api.token>`` (401 otherwise); request
bodies over ``api.max_request_bytes`` get 413. The OpenAPI schema is at ``/openapi.json``.
Control requests (pause, resume, stop, checkpoint) are answered at once (202) and take
effect between training steps; poll ``GET /v1/runs/{run_id}`` for the new state.

``/`` is the run page (static files in ``services/trainer/static/``, no build step): the
runs, live charts of the selected run's metrics and its control buttons. The page holds
no data and is served without auth; it asks for the token and keeps it in its script's
memory only, sending it with every ``/v1`` call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from hapo.config import ConfigError, HapoConfig, require_api_token
from hapo.runtime.http import (
    BodySizeLimit,
    Readiness,
    add_probe_routes,
    bearer_auth,
    redis_answers,
)
from hapo.runtime.lifecycle import serve_http
from hapo.transport.streams import connect
from services.trainer.control import RunState
from services.trainer.metrics import TrainerMetrics
from services.trainer.runs import Run, RunConflict, RunManager, config_with_overrides
from services.trainer.trackers import check_available

logger = logging.getLogger("hapo.trainer")

STATIC_DIR = Path(__file__).with_name("static")
"""The run page's files."""
PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
"""Headers of the run page and its files: only its own script, styles and API calls (no
inline code, no other origin, no form posting anywhere), never framed."""


class ErrorDetail(BaseModel):
    detail: str


class StartRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overrides: list[Annotated[str, Field(max_length=4096, pattern=r"^\s*[A-Za-z_][\w.]*\s*=")]] = (
        Field([], max_length=512)
    )
    """Dotted ``key=value`` overrides on top of the trainer's config, as on the command
    line (``trainer.total_steps=50``); ``api.*`` cannot be changed."""


class RunStatus(BaseModel):
    run_id: str
    state: RunState
    step: int
    """Training steps completed."""
    total_steps: int
    policy_version: int
    reward_mean: float | None
    """Mean sequence reward of the last step's batch."""
    entropy_mean: float | None
    """Mean token entropy (nats) of the last step's batch."""
    tokens_per_s: float | None
    """Learner throughput of the last step."""
    checkpoint_step: int | None
    """Step of the newest checkpoint this run wrote."""
    error: str | None
    """Why the run failed."""


class TrainerReadiness(Readiness):
    redis: bool
    active_run: str | None
    stalled: bool = False
    """The active run is running but has made no step for ``trainer.stall_factor`` times
    its median step time: not ready, so that an orchestrator restarts the trainer."""


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def run_status(run: Run) -> RunStatus:
    last = run.refresh().last_step
    return RunStatus(
        run_id=run.run_id, state=run.state, step=run.step,
        total_steps=run.config.trainer.total_steps, policy_version=run.policy_version,
        reward_mean=_finite(last.get("reward/mean")),
        entropy_mean=_finite(last.get("entropy/mean")),
        tokens_per_s=_finite(last.get("perf/tokens_per_s")), checkpoint_step=run.checkpoint_step,
        error=run.error,
    )  # fmt: skip


class RunMetrics(BaseModel):
    run_id: str
    lines: list[dict[str, Any]]
    """The run's ``metrics.jsonl`` lines of the steps after ``since``, oldest first (at
    most ``limit``); numbers that are not finite are null."""
    last_step: int
    """Step of the last line returned (``since`` when none): the next call's ``since``."""


_STEP_PREFIX = re.compile(r'^\{"step": (\d+),')
"""How ``TrainerService._record`` starts a line: lines up to ``since`` are skipped unparsed."""


def read_metrics(path: Path, since: int, limit: int) -> list[dict[str, Any]]:
    """The lines of ``path`` with ``step > since`` (at most ``limit``); a line still being
    written (no newline yet) is left for the next call."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = []
    for raw in text.splitlines(keepends=True):
        if not raw.endswith("\n") or len(lines) >= limit:
            break
        match = _STEP_PREFIX.match(raw)
        if match and int(match.group(1)) <= since:
            continue
        line = json.loads(raw)
        if line.get("step", 0) > since:
            lines.append({
                key: None if isinstance(value, float) and not math.isfinite(value) else value
                for key, value in line.items()
            })  # fmt: skip
    return lines


def _manager(request: Request) -> RunManager:
    return request.app.state.runs


Manager = Annotated[RunManager, Depends(_manager)]


def _run(run_id: str, manager: Manager) -> Run:
    run = manager.get(run_id)
    if run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no run {run_id!r} in this trainer")
    return run


KnownRun = Annotated[Run, Depends(_run)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "Missing or wrong bearer token"},
    413: {"model": ErrorDetail, "description": "Request body too large"},
}
_RUN_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "Unknown run"},
    409: {"model": ErrorDetail, "description": "The run has ended"},
}


def create_app(config: HapoConfig, manager: RunManager, client: aioredis.Redis) -> FastAPI:
    app = FastAPI(
        title="HAPO-RL trainer",
        description=__doc__,
        version="1",
    )
    app.state.runs = manager
    app.add_middleware(BodySizeLimit, max_bytes=config.api.max_request_bytes)
    # HTTPBearer only documents the scheme in the OpenAPI schema; bearer_auth checks it.
    auth = [Depends(HTTPBearer(auto_error=False)), Depends(bearer_auth(config.api.token))]
    v1 = APIRouter(prefix="/v1", dependencies=auth, responses=_ERRORS)

    async def readiness() -> TrainerReadiness:
        """Redis answers, and the active run (if any) is not stalled."""
        redis_ok = await redis_answers(client)
        run = manager.active
        service = run.service if run is not None else None
        stalled = service is not None and service.stalled(time.monotonic())
        return TrainerReadiness(
            ready=redis_ok and not stalled, redis=redis_ok, stalled=stalled,
            active_run=run.run_id if run is not None else None,
        )  # fmt: skip

    add_probe_routes(app, manager.metrics.registry, readiness, TrainerReadiness)

    @v1.post(
        "/runs",
        status_code=status.HTTP_201_CREATED,
        responses={
            400: {"model": ErrorDetail, "description": "Body is not UTF-8 / parseable"},
            409: {"model": ErrorDetail, "description": "A run is already active"},
        },
    )
    async def start_run(body: StartRunRequest, manager: Manager) -> RunStatus:
        """Start a run with the trainer's config and ``overrides`` (one active run at a
        time). A bad key or value is a 422 naming it."""
        try:
            run_config = config_with_overrides(manager.config, body.overrides)
            check_available(run_config.trainer.logger)
        except ConfigError as exc:
            raise RequestValidationError(
                [{"loc": ("body", "overrides"), "msg": str(exc), "type": "config_error"}]
            ) from None
        try:
            run = manager.start(run_config)
        except RunConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return run_status(run)

    @v1.get("/runs")
    async def list_runs(manager: Manager) -> list[RunStatus]:
        """The runs this trainer process has started, oldest first."""
        return [run_status(run) for run in manager.runs.values()]

    @v1.get("/runs/{run_id}", responses={404: _RUN_ERRORS[404]})
    async def get_run(run: KnownRun) -> RunStatus:
        """A run's state and progress; ``reward_mean``, ``entropy_mean`` and
        ``tokens_per_s`` are the last step's."""
        return run_status(run)

    @v1.get("/runs/{run_id}/metrics", responses={404: _RUN_ERRORS[404]})
    async def get_metrics(
        run: KnownRun,
        since: Annotated[int, Query(ge=0, description="Only the steps after this one.")] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000, description="At most this many.")] = 1000,
    ) -> RunMetrics:
        """A run's metrics lines (one per step, as in ``metrics.jsonl``) after step
        ``since``: poll with the last ``last_step`` to follow the run."""
        path = Path(run.config.trainer.run_dir).expanduser() / run.run_id / "metrics.jsonl"
        lines = await asyncio.to_thread(read_metrics, path, since, limit)
        return RunMetrics(
            run_id=run.run_id, lines=lines, last_step=lines[-1]["step"] if lines else since
        )

    def _live(run: Run, action: str) -> None:
        if run.state.terminal:
            raise HTTPException(status.HTTP_409_CONFLICT, f"cannot {action}: run is {run.state}")

    control = {"status_code": status.HTTP_202_ACCEPTED, "responses": _RUN_ERRORS}

    @v1.post("/runs/{run_id}/pause", **control)
    async def pause_run(run: KnownRun) -> RunStatus:
        """Pause after the current step (state ``paused`` once it has taken effect)."""
        _live(run, "pause")
        run.control.request_pause()
        return run_status(run)

    @v1.post("/runs/{run_id}/resume", **control)
    async def resume_run(run: KnownRun) -> RunStatus:
        """Resume a paused run."""
        _live(run, "resume")
        run.control.request_resume()
        return run_status(run)

    @v1.post("/runs/{run_id}/stop", **control)
    async def stop_run(run: KnownRun) -> RunStatus:
        """Finish the current step, checkpoint it and end the run (state ``stopped``)."""
        _live(run, "stop")
        run.control.request_stop()
        return run_status(run)

    @v1.post("/runs/{run_id}/checkpoint", **control)
    async def checkpoint_run(run: KnownRun) -> RunStatus:
        """Save a checkpoint after the current step (``checkpoint_step`` tells when)."""
        _live(run, "checkpoint")
        run.control.request_checkpoint()
        return run_status(run)

    @v1.get("/config")
    async def get_config() -> dict[str, Any]:
        """The trainer process's effective config (secrets masked)."""
        return json.loads(config.to_json())

    app.include_router(v1)

    @app.get("/", include_in_schema=False)
    async def run_page() -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", _PageFiles(directory=STATIC_DIR), name="static")
    return app


class _PageFiles(StaticFiles):
    """The page's script and styles, with the page's headers."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


async def serve(config: HapoConfig, stop: asyncio.Event, *, start_run: bool) -> int:
    """Serve the control API until ``stop``; with ``start_run`` first start a run of
    ``config`` and, if ``trainer.exit_after_run``, return once it has ended.

    Returns:
        The process exit status: 1 if the run started here failed, else 0.

    Raises:
        SystemExit: no ``api.token`` (the error names the key and how to make one), or a
            ``trainer.logger`` whose package is missing (naming the pip extra).
    """
    try:
        require_api_token(config, "hapo trainer (its control API and the weight push)")
        check_available(config.trainer.logger)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    metrics = TrainerMetrics()
    manager = RunManager(config, metrics)
    client = connect(config.redis.url, config.redis.password)
    app = create_app(config, manager, client)
    server_stop = asyncio.Event()
    server = asyncio.create_task(serve_http(app, config.api.host, config.api.port, server_stop))
    logger.info("control API on http://%s:%d", config.api.host, config.api.port)
    first = manager.start(config) if start_run else None
    try:
        if first is not None and config.trainer.exit_after_run:
            ended = asyncio.create_task(first.ended.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({ended, stopped}, return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            stopped.cancel()
        else:
            await stop.wait()
    finally:
        await manager.stop_all()
        server_stop.set()
        await server
        await client.aclose()
    return 1 if first is not None and first.state is RunState.FAILED else 0
