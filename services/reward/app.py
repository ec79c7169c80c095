"""The reward worker's HTTP surface: health, readiness and Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel


@dataclass
class RewardMetrics:
    """Prometheus metrics of one worker (its own registry: no global state)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.scored = Counter(
            "hapo_reward_scored",
            "Trajectories scored, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.timeouts = Counter(
            "hapo_reward_timeouts", "Scores that hit the time limit", registry=self.registry
        )
        self.dead_lettered = Counter(
            "hapo_reward_dead_lettered", "Malformed messages sent to the dead-letter stream",
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "hapo_reward_latency_seconds", "From end of generation to reward published",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )  # fmt: skip
        self.reward_mean = Gauge(
            "hapo_reward_mean", "Mean reward of the last batch", registry=self.registry
        )
        self.scored_per_second = Gauge(
            "hapo_reward_scored_per_second", "Throughput of the last batch", registry=self.registry
        )
        self.scorer_restarts = Gauge(
            "hapo_reward_scorer_restarts", "Scorer processes replaced", registry=self.registry
        )


@dataclass
class WorkerState:
    """What the HTTP endpoints report on; the worker loop keeps it current."""

    client: aioredis.Redis
    metrics: RewardMetrics
    scorer_alive: bool = False


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    redis: bool
    scorer: bool


def _state(request: Request) -> WorkerState:
    return request.app.state.worker


State = Annotated[WorkerState, Depends(_state)]


def create_app(state: WorkerState) -> FastAPI:
    app = FastAPI(title="HAPO-RL reward worker")
    app.state.worker = state

    @app.get("/healthz")
    async def healthz() -> Health:
        """The process is up."""
        return Health(status="ok")

    @app.get("/readyz", responses={503: {"model": Readiness}})
    async def readyz(state: State, response: Response) -> Readiness:
        """Redis answers and the scorer process runs."""
        try:
            redis_ok = bool(await state.client.ping())
        except (aioredis.RedisError, OSError):
            redis_ok = False
        readiness = Readiness(
            ready=redis_ok and state.scorer_alive, redis=redis_ok, scorer=state.scorer_alive
        )
        if not readiness.ready:
            response.status_code = 503
        return readiness

    @app.get("/metrics")
    async def metrics(state: State) -> Response:
        """Prometheus text format."""
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
