"""The reward worker's HTTP surface: health, readiness and Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as aioredis
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from hapo.config import ApiConfig
from hapo.runtime.http import BodySizeLimit, Readiness, add_probe_routes, redis_answers


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


class WorkerReadiness(Readiness):
    redis: bool
    scorer: bool


def create_app(state: WorkerState, api: ApiConfig) -> FastAPI:
    app = FastAPI(title="HAPO-RL reward worker")
    app.add_middleware(BodySizeLimit, max_bytes=api.max_request_bytes)

    async def readiness() -> WorkerReadiness:
        """Redis answers and the scorer process runs."""
        redis_ok = await redis_answers(state.client)
        return WorkerReadiness(
            ready=redis_ok and state.scorer_alive, redis=redis_ok, scorer=state.scorer_alive
        )

    add_probe_routes(app, state.metrics.registry, readiness, WorkerReadiness)
    return app
