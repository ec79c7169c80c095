"""Issuing a run's prompt groups: ids ``00000001``, ``00000002``, ... in order, each batch of
groups published with the run's count of groups issued in one transaction, and the
deterministic problem stream fast-forwarded past what the run issued before a restart
(``services.trainer.resume``)."""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from transformers import PreTrainedTokenizerBase

from hapo.config import HapoConfig
from hapo.data import chat_prompt_ids, problem_stream
from hapo.transport.messages import AdaptiveTemperature, PromptGroup, SamplingSettings
from hapo.transport.streams import StreamNames, StreamPublisher
from services.trainer.groups import GroupAssembler
from services.trainer.resume import issued_key


def group_id_range(first: int, last: int) -> list[str]:
    """The ids of groups ``first..last`` (1-based, both included)."""
    return [f"{k:08d}" for k in range(first, last + 1)]


class PromptIssuer:
    """The prompt groups of run ``run_id``; ``issued`` is how many it issued before (its
    checkpoint's count; ``fast_forward`` takes Redis's if that is further)."""

    def __init__(
        self,
        config: HapoConfig,
        run_id: str,
        tokenizer: PreTrainedTokenizerBase,
        client: aioredis.Redis,
        groups: GroupAssembler,
        issued: int,
    ) -> None:
        self.config, self.run_id, self.tokenizer = config, run_id, tokenizer
        self.client, self.groups = client, groups
        self.names = StreamNames(config.redis.stream_prefix)
        self.publisher = StreamPublisher(client)
        self.problems = problem_stream(config.data.train_files, config.seed)
        self.issued = issued
        """Groups issued so far: the last id."""

    async def fast_forward(self) -> None:
        """Skip the problems of the groups this run already issued (per Redis or the
        checkpoint, whichever is further): the problem stream is deterministic."""
        issued = await self.client.get(issued_key(self.names.prefix, self.run_id))
        self.issued = max(self.issued, int(issued or 0))
        for _ in range(self.issued):
            next(self.problems)

    async def top_up(self, step: int, policy_version: int) -> None:
        """Issue groups so that steps up to ``step + max_staleness`` have theirs, plus one
        replacement for each group abandoned; each new group is watched from now."""
        per_step = self.config.data.train_batch_size
        wanted = (step + 1 + self.config.trainer.max_staleness) * per_step
        wanted += self.groups.abandoned
        if self.issued >= wanted:
            return
        first, outputs = self.issued + 1, []
        while self.issued < wanted:
            outputs.append((self.names.prompts, self._next_group(policy_version).to_bytes()))
        # The groups and their count, or nothing.
        count = {issued_key(self.names.prefix, self.run_id): self.issued}
        await self.publisher.publish(outputs, values=count)
        self.groups.watch(group_id_range(first, self.issued), time.monotonic())

    def _next_group(self, policy_version: int) -> PromptGroup:
        data, rollout = self.config.data, self.config.actor_rollout_ref.rollout
        question, answer = next(self.problems)
        self.issued += 1  # the ids are 1, 2, ...: resume depends on it
        # No statistics: the rollout samples with those of the weights it holds (decision 6).
        adaptive = AdaptiveTemperature(
            adaptive_temperature=rollout.adaptive_temperature,
            temperature_tau=rollout.temperature_tau,
        )
        return PromptGroup(
            run_id=self.run_id, group_id=f"{self.issued:08d}",
            prompt_ids=chat_prompt_ids(self.tokenizer, question, data.max_prompt_length),
            answer=answer, n=rollout.n, policy_version=policy_version,
            sampling=SamplingSettings(temperature=rollout.temperature, top_p=rollout.top_p,
                                      max_tokens=data.max_response_length, adaptive=adaptive),
        )  # fmt: skip
