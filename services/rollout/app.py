"""The rollout service's HTTP surface: health, readiness, metrics, and the weight-update
routes the trainer drives (bearer token required)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, HTTPException, Request, status
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, Field
from vllm.distributed.weight_transfer.base import (
    WeightTransferInitRequest,
    WeightTransferUpdateRequest,
)
from vllm.v1.engine.async_llm import AsyncLLM

from hapo.config import ApiConfig
from hapo.runtime.http import (
    BodySizeLimit,
    Readiness,
    add_probe_routes,
    bearer_auth,
    redis_answers,
)
from hapo.transport.messages import NormEntropysValue

logger = logging.getLogger("hapo.rollout")


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
            "hapo_rollout_dead_lettered",
            "Prompt groups dead-lettered for any reason: malformed, over the service's bounds,"
            " rejected by the engine, or past the delivery limit",
            registry=registry,
        )


@dataclass
class RolloutState:
    """What the endpoints read, and the weight update the routes drive.

    An update is ``begin`` (pause generation, vLLM's ``start_weight_update``), ``receive``
    (any number), ``finish``. Generation must never stay paused because the trainer went
    away mid-update (killed, or this replica restarted under it): an update whose
    receiving fails, one not finished within ``update_timeout_s``, and one still open when
    the next begins are rolled back (``_roll_back``) and generation resumes.
    """

    engine: AsyncLLM
    client: aioredis.Redis
    metrics: RolloutMetrics
    policy_version: int = 0
    norm_entropys: tuple[float, float, float, float] | None = None
    """Statistics measured by the training step that made these weights (None for the
    base weights), applied to every request sampled with them (decision 6)."""
    stats_version: int | None = None
    """``policy_version`` when the last update brought statistics; None until a trainer
    pushes weights (then each prompt's own statistics apply)."""
    update_started: float | None = None
    """When the open update paused generation; None while no update is open."""
    update_timeout_s: float = 120.0
    _session: bool = field(default=False, init=False)
    """Whether vLLM's update session is open (it closes it itself when receiving fails)."""
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    _expiry: asyncio.Task | None = field(default=None, init=False)

    async def begin(self) -> None:
        async with self._lock:
            if self.update_started is not None:
                await self._roll_back("a new update began before the last one finished")
            self.update_started = time.monotonic()
            await self.engine.pause_generation(mode="keep", clear_cache=True)
            try:
                await self.engine.start_weight_update()
            except BaseException:
                await self._end(resume=True)
                raise
            self._session = True
            started = self.update_started
            self._expiry = asyncio.create_task(self._expire(started))

    async def receive(self, request: WeightTransferUpdateRequest) -> None:
        async with self._lock:
            self._require_open()
            try:
                await self.engine.update_weights(request)
            except BaseException:
                self._session = False  # vLLM ended the session when its worker raised
                await self._roll_back("receiving the weights failed")
                raise

    async def finish(
        self,
        weight_version: str | None,
        norm_entropys: tuple[float, float, float, float] | None = None,
    ) -> float:
        """Load what was received, adopt ``weight_version`` and the ``norm_entropys``
        measured with those weights, resume; the seconds paused."""
        async with self._lock:
            self._require_open()
            started = self.update_started
            try:
                await self.engine.finish_weight_update(weight_version)
            except BaseException:
                self._session = False
                await self._roll_back("finishing the update failed")
                raise
            self._session = False
            if weight_version is not None:
                self.policy_version = int(weight_version)
                self.metrics.policy_version.set(self.policy_version)
                # Adopted with the weights, before generation resumes: no request samples
                # new weights with old statistics.
                self.norm_entropys, self.stats_version = norm_entropys, self.policy_version
            await self._end(resume=True)
            paused = time.monotonic() - started
            self.metrics.weight_update_seconds.observe(paused)
            return paused

    def _require_open(self) -> None:
        if self.update_started is None:
            raise HTTPException(status.HTTP_409_CONFLICT, "no weight update is open: start one")

    async def _expire(self, started: float) -> None:
        await asyncio.sleep(self.update_timeout_s)
        async with self._lock:
            if self.update_started == started:
                self._expiry = None  # this task: not to be cancelled by _end
                await self._roll_back(f"not finished within {self.update_timeout_s:.0f} s")

    async def _roll_back(self, why: str) -> None:
        """Close the open update keeping the weights this replica has, and resume.

        vLLM has moved every layer aside for loading; a session finished without new
        weights for a layer puts its previous weights back (after a transfer that failed
        midway, the layers it completed keep their new weights). ``policy_version`` and
        the statistics stay: trajectories still record their true behaviour log-probs,
        which the trainer's behaviour correction reads (decision 5), so it holds either
        way.
        """
        logger.warning("weight update abandoned (%s): keeping the weights, resuming", why)
        try:
            if not self._session:
                await self.engine.start_weight_update()
            self._session = False
            await self.engine.finish_weight_update(None)
        finally:
            self._session = False
            await self._end(resume=True)

    async def _end(self, *, resume: bool) -> None:
        self.update_started = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if resume:
            await self.engine.resume_generation()


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
    norm_entropys: NormEntropysValue | None = None
    """Statistics of the training step that made these weights (None: base weights)."""


class WeightsResponse(BaseModel):
    policy_version: int
    paused_seconds: float | None = None


class WeightsInfo(BaseModel):
    policy_version: int
    dtype: str
    """The dtype this replica's engine holds its weights in (``float32``, ``bfloat16``,
    ``float16``): a trainer sends them in it, whatever its own ``rollout.dtype`` says."""


def _state(request: Request) -> RolloutState:
    return request.app.state.rollout


State = Annotated[RolloutState, Depends(_state)]


def create_app(state: RolloutState, api: ApiConfig) -> FastAPI:
    app = FastAPI(title="HAPO-RL rollout")
    app.state.rollout = state
    app.add_middleware(BodySizeLimit, max_bytes=api.max_request_bytes)
    admin = [Depends(bearer_auth(api.token))]

    async def readiness() -> RolloutReadiness:
        """The engine runs and Redis answers."""
        redis_ok = await redis_answers(state.client)
        engine_ok = not state.engine.errored
        return RolloutReadiness(
            ready=redis_ok and engine_ok, redis=redis_ok, engine=engine_ok,
            policy_version=state.policy_version,
        )  # fmt: skip

    add_probe_routes(app, state.metrics.registry, readiness, RolloutReadiness)

    @app.get("/v1/weights", dependencies=admin)
    async def weights_info(state: State) -> WeightsInfo:
        """The policy version this replica samples and the dtype of its weights."""
        dtype = str(state.engine.model_config.dtype).removeprefix("torch.")
        return WeightsInfo(policy_version=state.policy_version, dtype=dtype)

    @app.post("/v1/weights/init", dependencies=admin)
    async def init_weights(body: InitWeightsRequest, state: State) -> WeightsResponse:
        """Join the trainer's weight-transfer group (blocks until the trainer joins)."""
        await state.engine.init_weight_transfer_engine(WeightTransferInitRequest(body.init_info))
        return WeightsResponse(policy_version=state.policy_version)

    @app.post("/v1/weights/start", dependencies=admin)
    async def start_update(state: State) -> WeightsResponse:
        """Pause generation, keeping in-flight requests, and prepare to receive. An update
        left open by a trainer that went away is rolled back first."""
        await state.begin()
        return WeightsResponse(policy_version=state.policy_version)

    @app.post("/v1/weights/update", dependencies=admin)
    async def update_weights(body: UpdateWeightsRequest, state: State) -> WeightsResponse:
        """Receive weights (runs while the trainer sends). On failure the update is rolled
        back and generation resumes; 409 if no update is open."""
        await state.receive(WeightTransferUpdateRequest(body.update_info))
        return WeightsResponse(policy_version=state.policy_version)

    @app.post("/v1/weights/finish", dependencies=admin)
    async def finish_update(body: FinishWeightsRequest, state: State) -> WeightsResponse:
        """Load what was received, adopt the new policy version, resume generation; 409 if
        no update is open."""
        paused = await state.finish(body.weight_version, body.norm_entropys)
        return WeightsResponse(policy_version=state.policy_version, paused_seconds=paused)

    return app
