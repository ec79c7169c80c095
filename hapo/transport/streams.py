"""The transport on Redis streams: names, consumer groups, at-least-once reading, the one
transaction that publishes and acknowledges, dead letters, trimming, and riding out a
Redis that goes away.

Each service kind reads its input stream in one consumer group, shared by its replicas,
and hands what a batch produced to ``StreamConsumer.commit``. This is where the run's
exactly-once training comes from (the whole argument, with the trainer's side, is in
``docs/design.md``):

1. Output and acknowledgement in one transaction. ``commit`` appends a batch's outputs
   (and dead letters) and ``XACK`` s its input entries in one ``MULTI``/``EXEC``: a
   consumer that dies before ``EXEC`` has published nothing and its entries stay pending;
   after it, both have happened. Nothing is lost, at worst something is done twice. The
   trainer issues prompt groups the same way (``StreamPublisher.publish``): the groups and
   the count of groups issued, or nothing.
2. Reclaiming. A restarted consumer under the same name replays its own pending entries
   first; the pending entries of a consumer that died for good are taken over with
   ``XAUTOCLAIM`` once idle for ``reclaim_idle_ms``.
3. Idempotency keys. Doing something twice happens (a slow consumer's entries reclaimed
   while it still works on them; a retried ``EXEC``, below), so every output carries its
   key, (run, group, sample index) plus the policy version, and downstream drops copies:
   the trainer's ``GroupAssembler`` keeps one sample per index and refuses samples of
   groups already trained; a prompt group queued twice is generated and scored twice and
   trained once; the reward worker scores a duplicate trajectory again, which only costs
   time.
4. A lost reply. Every client comes from ``connect``: a command whose connection breaks
   is retried on a new one with backoff (``CountingRetry``). Redis may have executed it
   and died, or the connection broke, before the reply arrived (with ``appendfsync
   always`` the effect is on disk before the reply is sent). A retried ``MULTI``/``EXEC``
   then runs again: its ``XADD`` s add a second copy of each output under new entry ids
   (dropped by their keys, 3.), its ``XACK`` s and ``SET`` s are no-ops the second time.
   A retried ``XREADGROUP`` or ``XAUTOCLAIM`` leaves the entries of the lost reply
   pending at this consumer without it knowing: ``StreamConsumer.read`` sees the retry
   (``CountingRetry.failures``) and replays its own pending entries next.
5. The trainer acknowledges last. Its scored entries are committed only once a
   checkpoint covering the steps that trained them is renamed into place; a trainer
   killed in between resumes from that checkpoint and replays its pending entries, so the
   groups it trained after the checkpoint are trained again, once.

When retries run out (Redis down for minutes), ``run_until_stopped`` logs, waits and starts
the service's loop over; uncommitted entries are still pending and come back. An entry
that cannot be decoded goes to the dead-letter stream with the reason. Streams are
trimmed only below the oldest entry some consumer group still needs (``trim_acknowledged``:
the rollout trims ``prompts``, the reward worker ``trajectories``, the trainer its run's
``scored`` stream); the
dead-letter stream, which no group reads, keeps about its newest ``dead_maxlen`` entries.

6. Poison entries. An entry that kills whoever processes it would come back for ever (a
   restart replays it, ``XAUTOCLAIM`` hands it to the next consumer). Redis counts each
   delivery; ``StreamConsumer`` dead-letters an entry at its delivery ``max_deliveries +
   1`` instead of returning it, with the reason ``delivered N times without being
   committed``. What counts is a delivery to a new holder (another consumer, a restarted
   process, or after the caller ``release`` d it): while a consumer holds an entry it was
   given (returned by ``read``, not yet committed), replays and ``XAUTOCLAIM`` s of it
   by the same consumer put its count back (``XCLAIM ... RETRYCOUNT``), so a trainer
   holding entries until its next checkpoint, or a Redis outage, counts nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from pydantic import SecretStr
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hapo.transport.base import DATA_FIELD, Consumer, Entry, Output, Publisher
from hapo.transport.messages import DeadLetter

logger = logging.getLogger("hapo.transport.streams")

ROLLOUT_GROUP = "rollout"
REWARD_GROUP = "reward"
TRAINER_GROUP = "trainer"


# Retry policy of every service's client: waits of 0.1, 0.2, 0.4, ... capped at 2 s. redis-py
# applies it twice over (to each command, and to the reconnect inside each attempt), so a
# dead server is retried for minutes before a command fails; ``run_until_stopped`` then
# logs and starts over, and a trainer that fails resumes from its checkpoint.
RETRY_BACKOFF_BASE_S = 0.05
RETRY_BACKOFF_CAP_S = 2.0
RETRIES = 20
# Pause of ``run_until_stopped`` before it starts a loop over that failed on Redis.
OUTAGE_PAUSE_S = 1.0


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


def connect(url: str, password: SecretStr | None = None) -> aioredis.Redis:
    """The asyncio client every service uses (``password`` authenticates it where ``url``
    carries none: ``redis.password``): commands that lose their connection
    (``ConnectionError``, ``TimeoutError``, and ``BusyLoadingError`` while a restarted
    server replays its AOF) are retried on a fresh connection with exponential backoff.

    A retried command may have run already, its reply lost: point 4 of the module
    docstring says what that does to a commit and to a read.
    """
    retry = CountingRetry(
        ExponentialBackoff(cap=RETRY_BACKOFF_CAP_S, base=RETRY_BACKOFF_BASE_S), RETRIES
    )
    return aioredis.from_url(
        url,
        password=None if password is None else password.get_secret_value(),
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

    def scored(self, run_id: str) -> str:
        """Run ``run_id``'s scored samples: each run reads its own stream, so that runs one
        after another (or a run resumed after another) never take each other's samples."""
        return f"{self.prefix}:scored:{run_id}"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"


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
class StreamConsumer(Consumer):
    """Reads one stream in a consumer group: its own pending entries first (after a
    restart under the same name), then entries idle too long at dead consumers, then new
    ones. ``commit`` acknowledges them in the transaction that publishes what they gave."""

    client: aioredis.Redis
    stream: str
    group: str
    consumer: str
    batch_size: int = 256
    block_ms: int = 1000
    reclaim_idle_ms: int = 30_000
    dead_stream: str | None = None
    """Where ``commit`` moves dead entries (e.g. ``StreamNames.dead``)."""
    max_deliveries: int | None = None
    """Deliveries an entry gets without being committed; the next one dead-letters it
    (needs ``dead_stream``). None: no limit."""
    on_dead_letter: Callable[[int], object] | None = None
    """Called with the number of entries the delivery limit dead-lettered (a metric)."""
    dead_maxlen: int | None = None
    """About how many dead letters ``dead_stream`` keeps (``XADD ... MAXLEN ~``): the
    oldest go first. None: all of them."""
    _held: dict[bytes, int] = field(default_factory=dict, init=False)
    """Entries ``read`` returned and no ``commit`` or ``release`` has let go of: id ->
    Redis's delivery count when this consumer took it."""
    _replaying_own: bool = field(default=True, init=False)
    _own_cursor: str = field(default="0", init=False)
    _claim_cursor: str = field(default="0-0", init=False)
    _next_claim_at: float = field(default=0.0, init=False)

    async def start(self) -> None:
        """Create the group (and the stream) if they do not exist yet."""
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
            own = await self._admit(await self._present(raw))
            if own:
                return own
        claimed = await self._admit(await self._reclaim())
        if claimed:
            return claimed
        new = await self._present(await self._read_raw(">", block_ms=self.block_ms))
        self._held.update((entry.id, 1) for entry in new)  # a first delivery
        return new

    def recover(self) -> None:
        """After a failed batch (e.g. Redis went away): re-read this consumer's own pending
        entries before anything new."""
        self._replaying_own = True
        self._own_cursor = "0"

    @contextlib.asynccontextmanager
    async def working_on(self, entries: Sequence[Entry]) -> AsyncIterator[None]:
        """While the block runs, ``XCLAIM`` s ``entries`` to this consumer again every third
        of ``reclaim_idle_ms`` (idle time back to 0, delivery count kept): however long the
        work takes (a reward batch behind a slow scorer, a long generation), no other
        consumer's ``XAUTOCLAIM`` takes it over, scoring it twice and counting a delivery
        that was no failure. A touch that fails on the connection is retried at the next."""

        async def touch() -> None:
            while True:
                await asyncio.sleep(self.reclaim_idle_ms / 3000)
                try:
                    await self._touch(entries)
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    logger.warning("%s: cannot mark entries in progress: %s", self.consumer, exc)

        task = asyncio.create_task(touch())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _touch(self, entries: Sequence[Entry]) -> None:
        pipe = self.client.pipeline(transaction=False)
        self._claim_held(pipe, entries)
        await pipe.execute()

    def _claim_held(self, pipe: Pipeline, entries: Sequence[Entry]) -> int:
        """Queue on ``pipe`` an ``XCLAIM`` to this consumer of the ``entries`` it holds
        (committed or released ones are not its any more), each with the delivery count
        it had when taken (``RETRYCOUNT``; idle time back to 0). Returns the commands
        queued."""
        by_count: dict[int, list[bytes]] = {}
        for entry in entries:
            if entry.id in self._held:
                by_count.setdefault(self._held[entry.id], []).append(entry.id)
        for count, ids in by_count.items():
            pipe.xclaim(
                self.stream, self.group, self.consumer, min_idle_time=0, message_ids=ids,
                justid=True, retrycount=count,
            )  # fmt: skip
        return len(by_count)

    def release(self, entries: Sequence[Entry]) -> None:
        """Give up ``entries`` without committing them: they stay pending, and their next
        delivery (after ``reclaim_idle_ms``) counts towards ``max_deliveries``."""
        for entry in entries:
            self._held.pop(entry.id, None)

    async def _admit(self, entries: list[Entry]) -> list[Entry]:
        """Entries delivered again (own replay, ``XAUTOCLAIM``), minus those past
        ``max_deliveries``, which go to the dead-letter stream.

        Entries this consumer holds get the delivery count they had when it took them back
        (holding is not failing); the others' counts are read with ``XPENDING``."""
        if not entries:
            return entries
        new = [entry for entry in entries if entry.id not in self._held]
        pipe = self.client.pipeline(transaction=False)
        claims = self._claim_held(pipe, entries)
        for entry in new:
            pipe.xpending_range(self.stream, self.group, entry.id, entry.id, 1)
        replies = (await pipe.execute())[claims:]
        limit, dead = self.max_deliveries, []
        for entry, pending in zip(new, replies, strict=True):
            count = pending[0]["times_delivered"] if pending else 1
            if limit is not None and count > limit:
                reason = f"delivered {count - 1} times without being committed"
                dead.append((entry, f"{reason} (max_deliveries {limit})"))
            else:
                self._held[entry.id] = count
        if dead:
            await self.commit(dead=dead)
            logger.warning(
                "%s: %d entries of %s dead-lettered after %d deliveries",
                self.consumer, len(dead), self.stream, limit,
            )  # fmt: skip
            if self.on_dead_letter is not None:
                self.on_dead_letter(len(dead))
            gone = {entry.id for entry, _ in dead}
            return [entry for entry in entries if entry.id not in gone]
        return entries

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

    async def commit(
        self,
        outputs: Sequence[Output] = (),
        acks: Sequence[Entry] = (),
        dead: Sequence[tuple[Entry, str]] = (),
    ) -> None:
        """One ``MULTI``/``EXEC``: ``XADD`` the outputs and a ``DeadLetter`` per dead entry
        (the reason and the entry byte for byte), ``XACK`` the acks and the dead entries.

        Raises:
            ValueError: dead entries, but no ``dead_stream``.
        """
        letters: list[Output] = []
        for entry, reason in dead:
            if self.dead_stream is None:
                raise ValueError(f"consumer {self.consumer} has no dead-letter stream")
            letters.append((self.dead_stream, self._dead_letter(entry, reason).to_bytes()))
        done = dict.fromkeys(entry.id for entry in [*acks, *(entry for entry, _ in dead)])
        capped = (
            {self.dead_stream: self.dead_maxlen} if self.dead_stream and self.dead_maxlen else {}
        )
        await _transaction(
            self.client, [*outputs, *letters], acks=(self.stream, self.group, list(done)),
            maxlen=capped,
        )  # fmt: skip
        for entry_id in done:
            self._held.pop(entry_id, None)

    def _dead_letter(self, entry: Entry, reason: str) -> DeadLetter:
        return DeadLetter(
            source_stream=self.stream,
            source_id=entry.id.decode(),
            consumer=self.consumer,
            reason=reason,
            fields=entry.fields,
        )


@dataclass(frozen=True)
class StreamPublisher(Publisher):
    """Appends messages to streams through ``client``."""

    client: aioredis.Redis

    async def publish(
        self, outputs: Sequence[Output], values: Mapping[str, bytes | str | int] | None = None
    ) -> None:
        """One ``MULTI``/``EXEC``: ``XADD`` each output, ``SET`` each value."""
        await _transaction(self.client, outputs, values=values)


async def _transaction(
    client: aioredis.Redis,
    outputs: Sequence[Output],
    *,
    values: Mapping[str, bytes | str | int] | None = None,
    acks: tuple[str, str, Sequence[bytes]] | None = None,
    maxlen: Mapping[str, int] | None = None,
) -> None:
    """Append ``outputs`` (each payload in field ``data``; a stream in ``maxlen`` is
    trimmed to about that many entries as it is appended to), set ``values`` and
    acknowledge ``acks`` (stream, group, entry ids) in one ``MULTI``/``EXEC``, the only
    Redis transaction of the services. Nothing to do costs no round trip."""
    pipe = client.pipeline(transaction=True)
    for stream, payload in outputs:
        cap = (maxlen or {}).get(stream)
        pipe.xadd(stream, {DATA_FIELD: payload}, maxlen=cap, approximate=True)
    for key, value in (values or {}).items():
        pipe.set(key, value)
    if acks is not None and acks[2]:
        stream, group, ids = acks
        pipe.xack(stream, group, *ids)
    await pipe.execute()


async def run_until_stopped(
    stop: asyncio.Event,
    consumer: Consumer,
    turn: Callable[[], Awaitable[None]],
    pause_s: float = OUTAGE_PAUSE_S,
) -> None:
    """Await ``turn`` (one pass of a service's loop) until ``stop`` is set, riding out an
    unreachable Redis.

    A turn that fails with ``ConnectionError`` or ``TimeoutError`` (``connect``'s client
    retried for minutes before giving up) committed nothing: its entries are still
    pending. It is logged, ``consumer`` replays its own pending entries next, and after
    ``pause_s`` the loop goes on. Any other error propagates.
    """
    while not stop.is_set():
        try:
            await turn()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            logger.warning("Redis unavailable (%s); retrying in %.0f s", exc, pause_s)
            consumer.recover()
            await asyncio.sleep(pause_s)


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
