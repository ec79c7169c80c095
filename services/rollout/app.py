"""The rollout service's HTTP surface: health, readiness, metrics, and the weight-update
routes the trainer drives (bearer token required)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, Field, SecretStr
from vllm.distributed.weight_transfer.base import (
    WeightTransferInitRequest,
    WeightTransferUpdateRequest,
)
from vllm.v1.engine.async_llm import AsyncLLM

from hapo.http import Readiness, add_probe_routes, bearer_auth, redis_answers


@dataclass
class RolloutMetrics:
    """Prometheus metrics of one rollout replica (its own registry)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        registry = self.registry
        self.generated_tokens = Counter(
            "hapo_rollout_generated_tokens", "Tokens generated", registry=registry
        )
        self.tokens_per_second = Gauge(
            "hapo_rollout_tokens_per_second", "Generated tokens/s over the last group",
            registry=registry,
        )  # fmt: skip
        self.groups_in_flight = Gauge(
            "hapo_rollout_groups_in_flight", "Prompt groups generating", registry=registry
        )
        self.queue_lag = Gauge(
            "hapo_rollout_queue_lag", "Prompt groups not yet read by any replica", registry=registry
        )
        self.policy_version = Gauge(
            "hapo_rollout_policy_version", "Policy version of the weights", registry=registry
        )
        self.weight_update_seconds = Histogram(
            "hapo_rollout_weight_update_seconds", "Generation paused for a weight update",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=registry,
        )  # fmt: skip
        self.dead_lettered = Counter(
            "hapo_rollout_dead_lettered", "Malformed prompt groups", registry=registry
        )


@dataclass
class RolloutState:
    """What the endpoints read and the weight routes change."""

    engine: AsyncLLM
    client: aioredis.Redis
    metrics: RolloutMetrics
    policy_version: int = 0
    update_started: float | None = None


class RolloutReadiness(Readiness):
    redis: bool
    engine: bool
    policy_version: int


class InitWeightsRequest(BaseModel):
    init_info: dict[str, Any]
    """Backend-specific rendezvous info (vLLM's ``init_weight_transfer_engine``)."""


class UpdateWeightsRequest(BaseModel):
    update_info: dict[str, Any] | list[dict[str, Any]]
    """Backend-specific parameter metadata (vLLM's ``update_weights``)."""


class FinishWeightsRequest(BaseModel):
    weight_version: str | None = Field(None, pattern=r"^\d{1,18}$")
    """The new policy version (an integer)."""


class WeightsResponse(BaseModel):
    policy_version: int
    paused_seconds: float | None = None


def _state(request: Request) -> RolloutState:
    return request.app.state.rollout


State = Annotated[RolloutState, Depends(_state)]


def create_app(state: RolloutState, token: SecretStr | None) -> FastAPI:
    app = FastAPI(title="HAPO-RL rollout")
    app.state.rollout = state
    admin = [Depends(bearer_auth(token))]

    async def readiness() -> RolloutReadiness:
        """The engine runs and Redis answers."""
        redis_ok = await redis_answers(state.client)
        engine_ok = not state.engine.errored
        return RolloutReadiness(
            ready=redis_ok and engine_ok, redis=redis_ok, engine=engine_ok,
            policy_version=state.policy_version,
        )  # fmt: skip

    add_probe_routes(app, state.metrics.registry, readiness, RolloutReadiness)

    @app.post("/v1/weights/init", dependencies=admin)
    async def init_weights(body: InitWeightsRequest, state: State) -> WeightsResponse:
        """Join the trainer's weight-transfer group (blocks until the trainer joins)."""
        await state.engine.init_weight_transfer_engine(WeightTransferInitRequest(body.init_info))
        return WeightsResponse(policy_version=state.policy_version)

    @app.post("/v1/weights/start", dependencies=admin)
    async def start_update(state: State) -> WeightsResponse:
        """Pause generation, keeping in-flight requests, and prepare to receive."""
        state.update_started = time.monotonic()
        await state.engine.pause_generation(mode="keep", clear_cache=True)
        await state.engine.start_weight_update()
        return WeightsResponse(policy_version=state.policy_version)

    @app.post("/v1/weights/update", dependencies=admin)
    async def update_weights(body: UpdateWeightsRequest, state: State) -> WeightsResponse:
        """Receive weights (runs while the trainer sends)."""
        await state.engine.update_weights(WeightTransferUpdateRequest(body.update_info))
        return WeightsResponse(policy_version=state.policy_version)

    @app.post("/v1/weights/finish", dependencies=admin)
    async def finish_update(body: FinishWeightsRequest, state: State) -> WeightsResponse:
        """Load what was received, adopt the new policy version, resume generation."""
        await state.engine.finish_weight_update(body.weight_version)
        if body.weight_version is not None:
            state.policy_version = int(body.weight_version)
            state.metrics.policy_version.set(state.policy_version)
        await state.engine.resume_generation()
        paused = None
        if state.update_started is not None:
            paused = time.monotonic() - state.update_started
            state.metrics.weight_update_seconds.observe(paused)
            state.update_started = None
        return WeightsResponse(policy_version=state.policy_version, paused_seconds=paused)

    return app
