"""Trainer service (local backend): the controller and the learner of one run.

    hapo trainer [--config FILE] [key=value ...]

Per step: make sure the prompt groups of the steps up to ``max_staleness`` ahead are
queued on ``<prefix>:prompts``; read the run's own ``<prefix>:scored:<run id>`` until
``data.train_batch_size`` complete groups are in; run
``hapo.training.learner.learner_step`` (behaviour correction and the staleness bound
included, docs/design.md decision 5); push the new weights with the step's
``norm_entropys`` to every rollout replica, which samples those weights with those
statistics (decision 6); append one JSON line to ``run_dir/<run id>/metrics.jsonl``
(with the ids of the groups trained) and update the Prometheus metrics; checkpoint every
``trainer.checkpoint_every`` steps. A group that cannot complete (its prompt or a sample
dead-lettered on the way) is abandoned after ``trainer.group_timeout_s`` and a
replacement issued (docs/design.md section 4, "Abandoned groups"). When the run ends, plots and
``summary.md`` go next to the metrics (``hapo.report``).

Resume is exact (details in ``services.trainer.resume``): a step's scored entries are
acknowledged only once a checkpoint covering it is renamed into place. Started again under
the same run id (``hapo trainer trainer.run_id=<id>`` or ``POST /v1/runs``), a run loads
its newest checkpoint, drops the metrics lines after it, pushes its weights to the rollout
and continues to ``trainer.total_steps``; its consumer ``trainer-<id>`` re-reads its own
pending entries first, so groups trained after the checkpoint are trained again, once.

Between steps the loop honours the control API's requests (``control.RunControl``):
pause, resume, checkpoint, stop (a stopped run checkpoints its last step). The API and the
runs of one process live in ``services.trainer.api`` and ``services.trainer.runs``; the
entry point, ``services.trainer.main``, sits above them.

The learner is ``trainer.backend``'s (``services.trainer.learners``): this process, on
``trainer.device`` in ``trainer.precision``, or data-parallel Ray Train workers.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import statistics
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hapo.config import HapoConfig
from hapo.report import write_report
from hapo.training.learner import LearnerStepResult, make_optimizer
from hapo.training.policy import build_batch, learner_device
from hapo.transport.lease import Lease, LeaseHeld
from hapo.transport.messages import (
    MalformedMessage,
    ScoredTrajectory,
)
from hapo.transport.streams import (
    ROLLOUT_GROUP,
    TRAINER_GROUP,
    Entry,
    StreamConsumer,
    StreamNames,
    connect,
    ensure_group,
    trim_acknowledged,
)
from services.trainer import resume
from services.trainer.checkpoint import prune_other_runs, save_checkpoint
from services.trainer.control import RunControl, RunState
from services.trainer.groups import GroupAssembler
from services.trainer.learners import Learner, make_learner
from services.trainer.metrics import TrainerMetrics, h_hat_summary
from services.trainer.prompts import PromptIssuer, group_id_range
from services.trainer.trackers import Trackers
from services.trainer.weights import WeightPusher

logger = logging.getLogger("hapo.trainer")


LEASE_TTL_S = 30.0
"""A trainer's claim on its stream prefix lapses this long after it died."""


def lease_key(prefix: str) -> str:
    """Redis key of the claim a run's trainer holds on the stream prefix."""
    return f"{prefix}:trainer:lease"


class StreamPrefixInUse(RuntimeError):
    """Another run's trainer holds the stream prefix."""


class TrainerService:
    """One run: queues prompts, trains on complete groups, pushes weights."""

    def __init__(
        self,
        config: HapoConfig,
        control: RunControl | None = None,
        metrics: TrainerMetrics | None = None,
        run_id: str | None = None,
    ) -> None:
        self.config = config
        self.control = control or RunControl()
        self.metrics = metrics or TrainerMetrics()
        self.run_id = run_id or config.trainer.run_id or f"run-{uuid.uuid4().hex[:8]}"
        self.run_dir = Path(config.trainer.run_dir).expanduser() / self.run_id
        self.trackers = Trackers(config, self.run_id, self.run_dir)
        """``trainer.logger``'s (a missing package fails here, before the model loads)."""
        path = config.model.local_path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if config.trainer.backend == "local":  # Ray workers place their own replicas
            self.model.to(learner_device(config))
        self.optimizer, self.scheduler = make_optimizer(
            self.model, config.actor_rollout_ref.actor.optim
        )
        self.names = StreamNames(config.redis.stream_prefix)
        self.client = connect(config.redis.url, config.redis.password)
        self.consumer = StreamConsumer(
            self.client, self.names.scored(self.run_id), TRAINER_GROUP,
            f"trainer-{self.run_id}",
            dead_stream=self.names.dead, max_deliveries=config.trainer.max_deliveries,
            dead_maxlen=config.redis.dead_maxlen,
        )  # fmt: skip
        self.step = self.policy_version = 0
        self.last: dict[str, Any] = {}
        """The last step's JSONL record."""
        self.unacked: dict[bytes, Entry] = {}
        """Scored entries of trained groups, by id: acknowledged with the next checkpoint."""
        self.checkpointed_step, progress = resume.load_progress(
            self.run_dir / "checkpoints", self.model, self.optimizer, self.scheduler
        )
        self.step = self.checkpointed_step or 0
        self.policy_version = progress.policy_version
        self.norm_entropys = progress.norm_entropys
        self.groups = GroupAssembler(
            self.run_id, trained=progress.trained, abandoned=progress.abandoned
        )
        self.prompts = PromptIssuer(
            config, self.run_id, self.tokenizer, self.client, self.groups, progress.groups_queued
        )
        self.weights = WeightPusher(config, self.model)
        self.learner: Learner | None = None
        """Started by ``run`` (Ray workers take a while), closed when it returns."""
        self.last_step_end = 0.0
        """``time.monotonic()`` when the last step was recorded (or the learner started):
        ``perf/wall_step_s`` is the whole step as the run sees it, waiting included."""
        self.step_times: collections.deque[float] = collections.deque(maxlen=100)
        """``perf/wall_step_s`` of the last 100 steps this process made (``stalled``)."""
        self.last_progress = 0.0
        """``time.monotonic()`` of the last step, or of the end of the last pause."""

    async def _between_steps(self) -> bool:
        """Honour checkpoint and pause requests (parking while paused); False once the run
        should stop."""
        control = self.control
        while True:
            if control.take_checkpoint_request():
                await self._checkpoint()
            if control.stop.is_set():
                return False
            if not control.pause_requested:
                if control.state is RunState.PAUSED:
                    control.state = RunState.RUNNING
                    self.last_progress = time.monotonic()  # a pause is no stall
                    self.groups.restart_clocks(self.last_progress)
                return True
            control.state = RunState.PAUSED
            await control.idle(0.2)

    async def _collect(self) -> tuple[list[ScoredTrajectory], list[Entry], list[str]] | None:
        """The next ``train_batch_size`` complete groups: samples, the entries that carried
        them, and the group ids; None once the run should stop."""
        wanted = self.config.data.train_batch_size
        while len(self.groups.complete()) < wanted:
            if not await self._between_steps():
                return None
            strangers, dead = [], []
            entries = await self.consumer.read()
            if not entries:  # everything there is has been read
                await self._abandon_overdue()
            for entry in entries:
                try:
                    sample = ScoredTrajectory.from_bytes(entry.payload)
                    sample.check_vocabulary(self.model.config.vocab_size)
                except MalformedMessage as exc:
                    logger.warning("dead-lettering a malformed scored entry: %s", exc)
                    dead.append((entry, str(exc)))
                    continue
                fate = self.groups.add(entry, sample)
                if fate == "trained":  # a copy, or back after a restart, or reclaimed
                    self.unacked[entry.id] = entry
                elif fate != "held":
                    strangers.append(entry)
            await self.consumer.commit(acks=strangers, dead=dead)
        samples, entries, group_ids = [], [], self.groups.complete()[:wanted]
        for group_id in group_ids:
            group_samples, group_entries = self.groups.pop(group_id)
            samples += [s for s in group_samples if len(s.response_ids)]
            entries += group_entries
        return samples, entries, group_ids

    async def _abandon_overdue(self) -> None:
        """Abandon the groups incomplete past ``trainer.group_timeout_s`` (a prompt or a
        sample of theirs was dead-lettered: they cannot complete) and issue a replacement
        for each, so that the run goes on. Their samples that arrived are acknowledged with
        the next checkpoint, like a trained group's; any arriving later are refused."""
        timeout = self.config.trainer.group_timeout_s
        overdue = self.groups.overdue(time.monotonic(), timeout)
        for group_id in overdue:
            held, entries = self.groups.abandon(group_id)
            self.unacked.update((entry.id, entry) for entry in entries)
            logger.warning(
                "run %s: group %s abandoned after %g s: %d of %d samples",
                self.run_id, group_id, timeout, held,
                self.config.actor_rollout_ref.rollout.n,
            )  # fmt: skip
        if overdue:
            await self.prompts.top_up(self.step, self.policy_version)

    def stalled(self, now: float) -> bool:
        """Whether the run is running but has made no step for ``trainer.stall_factor``
        times its median step time (never before its first step, nor while paused)."""
        if self.control.state is not RunState.RUNNING or not self.step_times:
            return False
        limit = self.config.trainer.stall_factor * statistics.median(self.step_times)
        return now - self.last_progress > limit

    async def run(self) -> None:
        """Train until ``trainer.total_steps`` or a stop request (then checkpoint), holding
        the claim on the stream prefix throughout.

        Raises:
            StreamPrefixInUse: another run's trainer holds the prefix.
            resume.RunIdTaken: Redis holds another run's state under this run id.
        """
        lease = Lease(self.client, lease_key(self.names.prefix), self.run_id, LEASE_TTL_S)
        try:
            async with lease.held(self._lease_lost):
                await self._train()
        except LeaseHeld as exc:
            raise StreamPrefixInUse(
                f"redis.stream_prefix {self.names.prefix!r} is in use by run {exc.holder} (a "
                f"live trainer, or one that died less than {LEASE_TTL_S:.0f} s ago): runs at "
                "the same time need their own redis.stream_prefix, and their own rollout and "
                "reward replicas"
            ) from None
        finally:
            await self.client.aclose()

    def _lease_lost(self) -> None:
        logger.error("run %s: another trainer took stream prefix %r while Redis was away; "
                     "stopping", self.run_id, self.names.prefix)  # fmt: skip
        self.control.request_stop()

    async def _train(self) -> None:
        await resume.claim_run_id(self.client, self.names.prefix, self.run_id, self.run_dir)
        await self.consumer.start()
        await ensure_group(self.client, self.names.prompts, ROLLOUT_GROUP)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        await self.prompts.fast_forward()
        # Issued groups not trained: their clocks start now (those in flight before a
        # restart included).
        self.groups.watch(group_id_range(1, self.prompts.issued), time.monotonic())
        metrics_path = self.run_dir / "metrics.jsonl"
        if dropped := resume.truncate_metrics(metrics_path, self.step):
            logger.info("run %s: %d metrics lines after step %d dropped", self.run_id, dropped,
                        self.step)  # fmt: skip
        # The rollout may hold weights of steps lost with a killed trainer, or of another
        # run: it gets this run's before the first prompt group is queued.
        await asyncio.to_thread(self.weights.push, self.policy_version, self.norm_entropys)
        self.learner = await asyncio.to_thread(
            make_learner, self.model, self.optimizer, self.scheduler, self.config
        )
        self.last_step_end = time.monotonic()
        metrics_file = metrics_path.open("a")
        total = self.config.trainer.total_steps
        logger.info("run %s: steps %d-%d into %s", self.run_id, self.step + 1, total,
                    self.run_dir)  # fmt: skip
        if self.control.state is RunState.PENDING:
            self.control.state = RunState.RUNNING
        try:
            await asyncio.to_thread(self.trackers.open)
            for step in range(self.step + 1, total + 1):
                if not await self._between_steps():
                    break
                await self.prompts.top_up(step - 1, self.policy_version)
                collected = await self._collect()
                if collected is None:
                    break
                samples, entries, group_ids = collected
                batch = build_batch(samples, pad, policy_version=self.policy_version)
                result = await asyncio.to_thread(self.learner.step, batch)
                self.step = self.policy_version = step
                self.norm_entropys = tuple(result.norm_entropys)
                sync_s = await asyncio.to_thread(
                    self.weights.push, self.policy_version, self.norm_entropys
                )
                self.unacked.update((entry.id, entry) for entry in entries)
                self._record(group_ids, result, sync_s, metrics_file)
                if step % self.config.trainer.checkpoint_every == 0 or step == total:
                    await self._checkpoint()
            if self.step < total:
                logger.info("run %s stopped after step %d", self.run_id, self.step)
                if self.checkpointed_step != self.step and self.step > 0:
                    await self._checkpoint()
        finally:
            metrics_file.close()
            await asyncio.to_thread(self.trackers.close)
            await asyncio.to_thread(self.learner.close)
            try:
                await asyncio.to_thread(write_report, self.run_dir)
            except Exception:  # a plot must not fail the run
                logger.exception("run %s: report not written", self.run_id)

    def _record(
        self,
        group_ids: list[str],
        result: LearnerStepResult,
        sync_s: float,
        file: TextIO,
    ) -> None:
        """The step's JSONL line, Prometheus metrics and trackers (the log line: console)."""
        now = time.monotonic()
        wall_s, self.last_step_end = now - self.last_step_end, now
        self.step_times.append(wall_s)
        self.last_progress = now
        line = {
            "step": self.step, "time": time.time(), "policy_version": self.policy_version,
            **result.metrics, "perf/wall_step_s": wall_s,
            **h_hat_summary(result.h_hat), "perf/weight_sync_s": sync_s,
            "data/duplicates": self.groups.duplicates,
            "data/abandoned_groups": self.groups.abandoned, "data/group_ids": group_ids,
        }  # fmt: skip
        file.write(json.dumps(line) + "\n")
        file.flush()
        self.last = line
        self.metrics.record_step(line, result.h_hat)
        self.trackers.log(line)

    async def _checkpoint(self) -> None:
        """Save the state after the last completed step, then acknowledge the scored
        entries of the steps it covers."""
        if self.checkpointed_step == self.step:
            return
        if self.learner is not None:
            await asyncio.to_thread(self.learner.pull_state)
        progress = resume.Progress(
            self.policy_version, self.prompts.issued, self.norm_entropys, self.groups.trained,
            self.groups.abandoned,
        )  # fmt: skip
        await asyncio.to_thread(
            save_checkpoint, self.run_dir / "checkpoints", self.step, self.model,
            self.optimizer, self.scheduler, keep_last=self.config.trainer.checkpoint_keep_last,
            extra=progress.to_json(), tokenizer=self.tokenizer,
        )  # fmt: skip
        self.checkpointed_step = self.step
        await self.consumer.commit(acks=list(self.unacked.values()))
        self.unacked = {}
        await trim_acknowledged(self.client, self.consumer.stream)  # Redis stays bounded
        if (keep_runs := self.config.trainer.checkpoint_keep_runs) is not None:
            root = self.run_dir.parent
            for folder in await asyncio.to_thread(prune_other_runs, root, self.run_id, keep_runs):
                logger.info("checkpoints of run %s deleted (trainer.checkpoint_keep_runs %d)",
                            folder.parent.name, keep_runs)  # fmt: skip
