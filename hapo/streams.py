"""Redis streams: names, consumer groups, at-least-once reading, dead letters, trimming.

Delivery contract shared by every service:

- Each service kind reads its input stream in one consumer group; several replicas share it.
- An entry is acknowledged in the same ``MULTI`` transaction that publishes its output, so
  output and acknowledgement happen together or not at all.
- Entries left pending by a consumer that died are taken over with ``XAUTOCLAIM`` once idle
  for ``reclaim_idle_ms``; outputs carry an idempotency key so a rare double delivery (a
  slow consumer, not a dead one) can be dropped downstream.
- An entry that cannot be decoded goes to the dead-letter stream with the reason.
- Streams are trimmed only below the oldest entry some consumer group still needs.
- Every service makes its client with ``connect``: a command that loses its connection
  (Redis restarting, a network blip) is retried on a new one with backoff instead of
  failing the service. See ``connect`` for what a retry after a lost reply does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hapo.messages import DeadLetter

logger = logging.getLogger("hapo.streams")

ROLLOUT_GROUP = "rollout"
REWARD_GROUP = "reward"
TRAINER_GROUP = "trainer"


# Retry policy of every service's client: waits of 0.1, 0.2, 0.4, ... capped at 2 s. redis-py
# applies it twice over (to each command, and to the reconnect inside each attempt), so a
# dead server is retried for minutes before a command fails; the services' loops then log
# and start over, and a trainer that fails resumes from its checkpoint.
RETRY_BACKOFF_BASE_S = 0.05
RETRY_BACKOFF_CAP_S = 2.0
RETRIES = 20


class CountingRetry(Retry):
    """redis-py's ``Retry`` that counts the failures it has retried (``failures``).

    One object serves every connection of a client (redis-py deep-copies a policy into
    each connection; this one copies as itself), so ``failures`` tells a consumer whether
    any command failed while its read was in flight: the read may then have been retried
    after Redis delivered entries whose reply was lost.
    """

    def __init__(self, backoff: ExponentialBackoff, retries: int) -> None:
        super().__init__(backoff, retries, (RedisConnectionError, RedisTimeoutError))
        self.failures = 0

    def __deepcopy__(self, memo: dict) -> CountingRetry:
        return self

    async def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        first = True

        async def counted_fail(error, *count):
            nonlocal first
            self.failures += 1
            if first:  # once per command (the reconnects inside it log their own)
                reason = str(error) or type(error).__name__
                logger.warning("Redis: %s; retrying with backoff", reason)
                first = False
            return await fail(error, *count)

        return await super().call_with_retry(do, counted_fail, is_retryable, with_failure_count)


def connect(url: str) -> aioredis.Redis:
    """The asyncio client every service uses: commands that lose their connection
    (``ConnectionError``, ``TimeoutError``, and ``BusyLoadingError`` while a restarted
    server replays its AOF) are retried on a fresh connection with exponential backoff.

    What a retry after a lost reply does (Redis executed the command, then died or the
    connection broke before the reply arrived; with ``appendfsync always`` the effect is
    on disk before the reply is sent):

    - a ``MULTI``/``EXEC`` that publishes and acknowledges runs again: the ``XADD`` s add a
      second copy of each output under new entry ids, the ``XACK`` s and ``SET`` s are
      no-ops the second time. Every output carries its key (run, group, sample index), so
      the copies are dropped downstream: the trainer's ``GroupAssembler`` keeps one sample
      per index and refuses samples of groups already trained; a prompt group queued
      twice is generated and scored twice and trained once; the reward worker scores a
      duplicate trajectory again, which only costs time.
    - an ``XREADGROUP`` or ``XAUTOCLAIM`` runs again: the entries of the lost reply are
      pending at this consumer without it knowing. ``StreamConsumer`` sees the retry
      (``CountingRetry.failures``) and replays its own pending entries next.
    """
    retry = CountingRetry(
        ExponentialBackoff(cap=RETRY_BACKOFF_CAP_S, base=RETRY_BACKOFF_BASE_S), RETRIES
    )
    return aioredis.from_url(
        url,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_connect_timeout=5.0,
    )


def _retried_failures(client: aioredis.Redis) -> int:
    """Failures the client's retry policy has retried so far (0 if it does not count)."""
    return getattr(client.get_retry(), "failures", 0)


@dataclass(frozen=True)
class StreamNames:
    """Names of the streams under one prefix (``hapo`` by default; tests use their own)."""

    prefix: str = "hapo"

    @property
    def prompts(self) -> str:
        return f"{self.prefix}:prompts"

    @property
    def trajectories(self) -> str:
        return f"{self.prefix}:trajectories"

    @property
    def scored(self) -> str:
        return f"{self.prefix}:scored"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"


@dataclass(frozen=True)
class Entry:
    """One stream entry as read."""

    id: bytes
    fields: dict[bytes, bytes]


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` (and the stream) reading from the start; idempotent.

    Producers call it for their consumers' group too, so that nothing published before a
    consumer first starts can be trimmed away.
    """
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


@dataclass
class StreamConsumer:
    """Reads one stream in a consumer group: its own pending entries first (after a
    restart under the same name), then entries idle too long at dead consumers, then new
    ones. Acknowledging is left to the caller's publishing transaction."""

    client: aioredis.Redis
    stream: str
    group: str
    consumer: str
    batch_size: int = 256
    block_ms: int = 1000
    reclaim_idle_ms: int = 30_000
    _replaying_own: bool = field(default=True, init=False)
    _own_cursor: str = field(default="0", init=False)
    _claim_cursor: str = field(default="0-0", init=False)
    _next_claim_at: float = field(default=0.0, init=False)

    async def start(self) -> None:
        await ensure_group(self.client, self.stream, self.group)

    async def read(self) -> list[Entry]:
        """The next batch (possibly empty after ``block_ms``).

        Entries this consumer holds pending may come again (after ``recover``, or when a
        read was retried on a new connection): callers skip those they still work on."""
        failures = _retried_failures(self.client)
        try:
            return await self._read()
        finally:
            if _retried_failures(self.client) != failures:
                # A command failed and was retried while this read was in flight: entries
                # delivered in a lost reply are pending here. Replay them next.
                self.recover()

    async def _read(self) -> list[Entry]:
        while self._replaying_own:
            # Page forward through our own pending entries: a caller may keep them pending
            # across reads (the trainer does, until a checkpoint), so re-reading from "0"
            # would return the same page forever.
            raw = await self._read_raw(self._own_cursor, block_ms=None)
            if not raw:
                self._replaying_own = False
                break
            self._own_cursor = raw[-1][0].decode()
            own = await self._present(raw)
            if own:
                return own
        claimed = await self._reclaim()
        if claimed:
            return claimed
        return await self._present(await self._read_raw(">", block_ms=self.block_ms))

    def recover(self) -> None:
        """After a failed batch (e.g. Redis went away): re-read this consumer's own pending
        entries before anything new."""
        self._replaying_own = True
        self._own_cursor = "0"

    async def _read_raw(self, start: str, block_ms: int | None) -> list[tuple[bytes, dict]]:
        try:
            response = await self.client.xreadgroup(
                self.group, self.consumer, {self.stream: start}, count=self.batch_size,
                block=block_ms,
            )  # fmt: skip
        except ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no longer exists" not in str(exc):
                raise
            await ensure_group(self.client, self.stream, self.group)  # the stream was deleted
            return []
        return response[0][1] if response else []

    async def _present(self, raw: list[tuple[bytes, dict]]) -> list[Entry]:
        """The entries that still have their fields. One trimmed while pending comes back
        without them: nothing is left to process, so only its pending record is cleared."""
        gone = [entry_id for entry_id, fields in raw if not fields]
        if gone:
            await self.client.xack(self.stream, self.group, *gone)
        return [Entry(entry_id, fields) for entry_id, fields in raw if fields]

    async def _reclaim(self) -> list[Entry]:
        now = time.monotonic()
        if now < self._next_claim_at:
            return []
        next_cursor, entries, *_ = await self.client.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.reclaim_idle_ms,
            start_id=self._claim_cursor,
            count=self.batch_size,
        )
        self._claim_cursor = next_cursor.decode() if isinstance(next_cursor, bytes) else next_cursor
        if self._claim_cursor == "0-0":  # a full pass over the pending list: rest a while
            self._next_claim_at = now + self.reclaim_idle_ms / 2000
        return [Entry(entry_id, fields) for entry_id, fields in entries if fields]

    def dead_letter(
        self, pipe: aioredis.client.Pipeline, dead_stream: str, entry: Entry, reason: str
    ) -> None:
        """Queue on ``pipe``: copy ``entry`` to the dead-letter stream with ``reason``."""
        letter = DeadLetter(
            source_stream=self.stream,
            source_id=entry.id.decode(),
            consumer=self.consumer,
            reason=reason,
            fields=entry.fields,
        )
        pipe.xadd(dead_stream, letter.encode())

    def ack(self, pipe: aioredis.client.Pipeline, entries: list[Entry]) -> None:
        """Queue on ``pipe``: acknowledge ``entries``."""
        if entries:
            pipe.xack(self.stream, self.group, *(entry.id for entry in entries))


def _next_id(entry_id: bytes) -> bytes:
    millis, sequence = entry_id.split(b"-")
    return b"%s-%d" % (millis, int(sequence) + 1)


async def trim_acknowledged(client: aioredis.Redis, stream: str) -> int:
    """Drop entries every consumer group of ``stream`` has acknowledged.

    Keeps everything from the oldest entry that some group still has pending or has not
    yet read; a stream without groups is left alone. Returns the number of entries removed.
    """
    try:
        groups = await client.xinfo_groups(stream)
    except ResponseError:  # no such stream
        return 0
    if not groups:
        return 0
    keep_from: list[bytes] = []
    for group in groups:
        pending = await client.xpending(stream, group["name"])
        if pending["pending"]:
            min_id = pending["min"]
            keep_from.append(min_id if isinstance(min_id, bytes) else min_id.encode())
        else:
            last = group["last-delivered-id"]
            keep_from.append(_next_id(last if isinstance(last, bytes) else last.encode()))
    oldest = min(keep_from, key=lambda entry_id: tuple(int(p) for p in entry_id.split(b"-")))
    return await client.xtrim(stream, minid=oldest, approximate=False)
