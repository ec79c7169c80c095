"""Reward worker: trajectories in, scored trajectories out.

    hapo reward [--config FILE] [key=value ...]

Reads ``<prefix>:trajectories`` in the ``reward`` consumer group, decodes each response
with the model's tokenizer, scores it in a child process under a time limit, and
publishes to its run's ``<prefix>:scored:<run id>`` in the same transaction that
acknowledges the input.
Malformed entries go to ``<prefix>:dead`` with the reason. Several workers share the
group; a dead worker's pending entries are taken over after ``reward.reclaim_idle_s``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

from hapo.config import HapoConfig
from hapo.runtime.lifecycle import serve_http, setup_logging, stop_event_on_signals
from hapo.runtime.model_store import load_tokenizer
from hapo.scoring.rewards import RewardFunction, load_score_fn
from hapo.scoring.sandbox import ScoreItem, ScoringSandbox
from hapo.transport.messages import MalformedMessage, ScoredTrajectory, Trajectory
from hapo.transport.streams import (
    REWARD_GROUP,
    Entry,
    StreamConsumer,
    StreamNames,
    connect,
    run_until_stopped,
    trim_acknowledged,
)
from services.reward.app import RewardMetrics, WorkerState, create_app


def _failure(what: str, exc: BaseException) -> str:
    """A dead letter's reason: what failed, and the exception (its text cut at 500)."""
    text = str(exc)
    return f"{what}: {type(exc).__name__}" + (f": {text[:500]}" if text else "")


def _check_vocabulary(ids: list[int], vocab: int) -> None:
    """Raises ValueError naming the first id outside ``[0, vocab)``."""
    if ids and not 0 <= min(ids) <= max(ids) < vocab:
        bad = next(i for i in ids if not 0 <= i < vocab)
        raise ValueError(f"token id {bad} is outside the tokenizer's vocabulary [0, {vocab})")


def reward_function(config: HapoConfig) -> RewardFunction:
    """The configured reward, as the scorer child process will run it."""
    reward, overlong = config.reward, config.reward.overlong_buffer
    return RewardFunction(
        scorer=reward.scorer,
        format_reward=reward.format_reward,
        max_scored_chars=reward.max_scored_chars,
        overlong_enable=overlong.enable,
        overlong_len=overlong.len,
        overlong_penalty_factor=overlong.penalty_factor,
        max_response_length=config.data.max_response_length,
    )


class RewardWorker:
    """One worker: the loop over batches, and the state its HTTP endpoints report."""

    def __init__(self, config: HapoConfig, consumer_name: str | None = None) -> None:
        self.config = config
        self.names = StreamNames(config.redis.stream_prefix)
        self.client = connect(config.redis.url, config.redis.password)
        self.consumer = StreamConsumer(
            self.client,
            self.names.trajectories,
            REWARD_GROUP,
            consumer_name or f"reward-{socket.gethostname()}-{os.getpid()}",
            batch_size=config.reward.batch_size,
            reclaim_idle_ms=int(config.reward.reclaim_idle_s * 1000),
            dead_stream=self.names.dead,
            max_deliveries=config.reward.max_deliveries,
            dead_maxlen=config.redis.dead_maxlen,
        )
        self.tokenizer = load_tokenizer(config)
        load_score_fn(config.reward.scorer)  # fail at start-up, not with every score
        self.sandbox = ScoringSandbox(reward_function(config), config.reward.timeout_s)
        self.metrics = RewardMetrics()
        self.consumer.on_dead_letter = self.metrics.dead_lettered.inc
        self.state = WorkerState(client=self.client, metrics=self.metrics)

    async def run(self, stop: asyncio.Event) -> None:
        """Score batches until ``stop`` is set; the batch in hand is finished first."""
        await self.consumer.start()
        self.sandbox.start()
        try:
            await run_until_stopped(stop, self.consumer, self._turn)
        finally:
            self.sandbox.close()
            self.state.scorer_alive = False
            await self.client.aclose()

    async def _turn(self) -> None:
        """One pass of the loop: score a batch, then trim the stream it came from."""
        self.state.scorer_alive = self.sandbox.alive
        entries = await self.consumer.read()
        if entries:
            await self.process(entries)
            # Trim its input after every batch, so the stream stays within what the group
            # has in hand however fast trajectories come (each trainer trims its run's
            # scored stream, which it acknowledges at checkpoints).
            await trim_acknowledged(self.client, self.names.trajectories)

    async def process(self, entries: list[Entry]) -> None:
        """Score ``entries`` and publish the results; acknowledge all of them at once.

        Whatever goes wrong with one entry (it does not decode, its tokens do not, its
        score cannot be published) sends that entry to the dead letters with the reason;
        the others are scored and the worker goes on."""
        started = time.perf_counter()
        decoded: list[tuple[Entry, Trajectory]] = []
        rejected: list[tuple[Entry, str]] = []
        for entry in entries:
            try:
                decoded.append((entry, Trajectory.from_bytes(entry.payload)))
            except MalformedMessage as exc:
                rejected.append((entry, str(exc)))
            except Exception as exc:
                rejected.append((entry, _failure("cannot decode the trajectory", exc)))
        texts = self._decode([trajectory for _, trajectory in decoded])
        ready = []
        for (entry, trajectory), text in zip(decoded, texts, strict=True):
            if isinstance(text, Exception):
                rejected.append((entry, _failure("cannot decode the response's tokens", text)))
            else:
                item = ScoreItem(text, trajectory.answer, len(trajectory.response_ids))
                ready.append((entry, trajectory, item))
        # The sandbox turns a scorer's exception, hang or crash into reward 0 with the
        # reason; what it raises itself (its child cannot be started) is no entry's fault:
        # it propagates, and the batch stays pending.
        async with self.consumer.working_on(entries):  # a slow scorer's batch is not reclaimed
            scores = await asyncio.to_thread(self.sandbox.score, [item for _, _, item in ready])
        scored, outputs = [], []
        for (entry, trajectory, _), score in zip(ready, scores, strict=True):
            try:  # e.g. a custom scorer's Score whose reward is not a number
                message = ScoredTrajectory.from_trajectory(trajectory, score.reward, score.reason)
                outputs.append((self.names.scored(message.run_id), message.to_bytes()))
                scored.append(message)
            except Exception as exc:
                rejected.append((entry, _failure("scoring failed", exc)))
        await self.consumer.commit(outputs=outputs, acks=entries, dead=rejected)
        self._record(scored, len(rejected), time.perf_counter() - started)

    def _decode(self, trajectories: list[Trajectory]) -> list[str | Exception]:
        """The response texts; a batch that fails is decoded one by one, so that only the
        trajectory at fault gets its exception instead of a text. Ids outside the
        tokenizer's vocabulary are an error too (it would decode them to nothing, and the
        sample would be scored on text it does not hold)."""
        vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        batch = [trajectory.response_ids.tolist() for trajectory in trajectories]
        try:
            for ids in batch:
                _check_vocabulary(ids, vocab)
            return list(self.tokenizer.decode_batch(batch, skip_special_tokens=True))
        except Exception:
            texts: list[str | Exception] = []
            for ids in batch:
                try:
                    _check_vocabulary(ids, vocab)
                    texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
                except Exception as exc:
                    texts.append(exc)
            return texts

    def _record(self, scored: list[ScoredTrajectory], rejected: int, seconds: float) -> None:
        metrics = self.metrics
        now = time.time()
        for message in scored:
            metrics.scored.labels(reason=message.reward_reason).inc()
            metrics.latency.observe(max(now - message.created_at, 0.0))
        metrics.timeouts.inc(sum(message.reward_reason == "timeout" for message in scored))
        metrics.dead_lettered.inc(rejected)
        if scored:
            metrics.reward_mean.set(sum(message.reward for message in scored) / len(scored))
        metrics.scored_per_second.set(len(scored) / max(seconds, 1e-9))
        metrics.scorer_restarts.set(self.sandbox.restarts)


async def _main(config: HapoConfig, consumer_name: str | None) -> None:
    stop = stop_event_on_signals()
    worker = RewardWorker(config, consumer_name)
    tasks = [asyncio.create_task(worker.run(stop))]
    if config.reward.http_port:
        app = create_app(worker.state, config.api)
        tasks.append(
            asyncio.create_task(serve_http(app, config.api.host, config.reward.http_port, stop))
        )
    await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    stop.set()
    await asyncio.gather(*tasks)


def run(config: HapoConfig, consumer_name: str | None = None) -> None:
    """Entry point of ``hapo reward``: run one worker until SIGINT/SIGTERM."""
    setup_logging("reward", config)
    asyncio.run(_main(config, consumer_name))
