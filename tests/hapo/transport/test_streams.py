"""The Redis transport against a real Redis: groups, reading, reclaiming, the commit
transaction, dead letters, trimming, and the loop that rides out an outage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from hapo.transport.base import DATA_FIELD, Entry
from hapo.transport.messages import DeadLetter, MalformedMessage
from hapo.transport.streams import (
    StreamConsumer,
    StreamNames,
    StreamPublisher,
    ensure_group,
    run_until_stopped,
    trim_acknowledged,
)
from tests.helpers import RedisServer


async def _fill(client: aioredis.Redis, stream: str, count: int) -> list[bytes]:
    return [await client.xadd(stream, {DATA_FIELD: b"%d" % i}) for i in range(count)]


async def _payloads(client: aioredis.Redis, stream: str) -> list[bytes]:
    return [fields[DATA_FIELD] for _, fields in await client.xrange(stream)]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (AOF, fsync on every write): killed, ACLs changed."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


def test_entry_payload_is_its_data_field() -> None:
    assert Entry(b"1-0", {DATA_FIELD: b"x", b"other": b"y"}).payload == b"x"
    with pytest.raises(MalformedMessage, match=r"no 'data' field \(fields: \[b'wrong'\]\)"):
        Entry(b"1-0", {b"wrong": b"field"}).payload  # noqa: B018


async def test_ensure_group_is_idempotent(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    await ensure_group(redis_client, stream_names.trajectories, "reward")
    await ensure_group(redis_client, stream_names.trajectories, "reward")
    groups = await redis_client.xinfo_groups(stream_names.trajectories)
    assert [g["name"] for g in groups] == [b"reward"]


async def test_commit_publishes_acknowledges_and_dead_letters(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    consumer = StreamConsumer(
        redis_client, stream_names.trajectories, "reward", "c1", batch_size=3, block_ms=100,
        dead_stream=stream_names.dead,
    )  # fmt: skip
    await consumer.start()
    ids = await _fill(redis_client, stream_names.trajectories, 5)
    first = await consumer.read()
    assert [e.id for e in first] == ids[:3]
    outputs = [
        (stream_names.scored("run-1"), b"out-1"),
        (stream_names.scored("run-1"), b"out-2"),
    ]
    await consumer.commit(outputs=outputs, acks=first[1:], dead=[(first[0], "bad payload")])
    assert await _payloads(redis_client, stream_names.scored("run-1")) == [
        b"out-1",
        b"out-2",
    ]
    second = await consumer.read()
    assert [e.id for e in second] == ids[3:]
    assert await consumer.read() == []  # blocks 100 ms, nothing new
    pending = await redis_client.xpending_range(stream_names.trajectories, "reward", "-", "+", 10)
    assert [entry["message_id"] for entry in pending] == ids[3:]  # the dead one is acknowledged
    ((_, fields),) = await redis_client.xrange(stream_names.dead)
    letter = DeadLetter.from_bytes(fields[DATA_FIELD])
    assert (letter.reason, letter.source_id, letter.consumer, letter.fields) == (
        "bad payload",
        ids[0].decode(),
        "c1",
        {DATA_FIELD: b"0"},
    )
    with pytest.raises(ValueError, match="no dead-letter stream"):
        await StreamConsumer(redis_client, stream_names.prompts, "g", "c").commit(
            dead=[(second[0], "bad")]
        )


async def test_a_failed_commit_publishes_and_acknowledges_nothing(
    private_redis: RedisServer, stream_names: StreamNames
) -> None:
    """The outputs, dead letters and acknowledgements are one transaction: a user that may
    not ``XACK`` gets the whole ``EXEC`` refused, its ``XADD`` s included."""
    admin = aioredis.from_url(private_redis.url)
    await admin.acl_setuser(
        "no-ack", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
        commands=["+@all", "-xack"],
    )  # fmt: skip
    port = private_redis.port
    limited = aioredis.from_url(f"redis://no-ack:pw@127.0.0.1:{port}/0")
    stream, names = stream_names.trajectories, stream_names
    try:
        ids = await _fill(admin, stream, 2)
        consumer = StreamConsumer(limited, stream, "reward", "c", dead_stream=names.dead)
        await consumer.start()
        entries = await consumer.read()
        assert [e.id for e in entries] == ids
        commit = dict(
            outputs=[(names.scored("run-1"), b"out")], acks=entries[1:], dead=[(entries[0], "bad")]
        )
        with pytest.raises(ResponseError):
            await consumer.commit(**commit)
        assert await admin.exists(names.scored("run-1"), names.dead) == 0
        assert (await admin.xpending(stream, "reward"))["pending"] == 2

        # The same commit by a user that may acknowledge goes through, all of it.
        await StreamConsumer(admin, stream, "reward", "c", dead_stream=names.dead).commit(**commit)
        assert await _payloads(admin, names.scored("run-1")) == [b"out"]
        assert await admin.xlen(names.dead) == 1
        assert (await admin.xpending(stream, "reward"))["pending"] == 0
    finally:
        await limited.aclose()
        await admin.aclose()


async def test_publish_appends_outputs_and_sets_values(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    publisher = StreamPublisher(redis_client)
    counter = f"{stream_names.prefix}:issued"
    outputs = [(stream_names.prompts, b"p1"), (stream_names.prompts, b"p2")]
    await publisher.publish(outputs, values={counter: 2})
    assert await _payloads(redis_client, stream_names.prompts) == [b"p1", b"p2"]
    assert await redis_client.get(counter) == b"2"
    await publisher.publish([])  # nothing to do
    assert await redis_client.xlen(stream_names.prompts) == 2


async def test_run_until_stopped_rides_out_a_redis_restart(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis dies between reading a batch and committing it; the loop logs the failed
    turns, and once Redis is back the consumer replays the batch it still holds pending
    (without ``recover`` it would wait an hour for ``XAUTOCLAIM``)."""
    # No retries in the client: the failure reaches the loop at once.
    client = aioredis.from_url(private_redis.url, retry=Retry(NoBackoff(), 0))
    consumer = StreamConsumer(client, "in", "g", "c", block_ms=50, reclaim_idle_ms=3_600_000)
    await consumer.start()
    ids = await _fill(client, "in", 3)
    stop = asyncio.Event()
    batches: list[list[bytes]] = []
    restarts: list[asyncio.Task] = []

    async def turn() -> None:
        entries = await consumer.read()
        if not entries:
            return
        batches.append([entry.id for entry in entries])
        if len(batches) == 1:  # read, not committed: Redis goes away now
            private_redis.kill()
            restarts.append(asyncio.create_task(asyncio.to_thread(private_redis.start)))
        else:
            await consumer.commit(acks=entries)
            stop.set()

    try:
        with caplog.at_level(logging.WARNING, logger="hapo.transport.streams"):
            await asyncio.wait_for(run_until_stopped(stop, consumer, turn, pause_s=0.1), 30)
        await asyncio.gather(*restarts)
        assert batches == [ids, ids]
        assert any("Redis unavailable" in record.message for record in caplog.records)
        assert (await client.xpending("in", "g"))["pending"] == 0
    finally:
        await client.aclose()


async def test_run_until_stopped_lets_other_errors_through(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    consumer = StreamConsumer(redis_client, stream_names.prompts, "g", "c")

    async def turn() -> None:
        raise KeyError("not a Redis outage")

    with pytest.raises(KeyError):
        await run_until_stopped(asyncio.Event(), consumer, turn)


async def test_restarted_consumer_replays_its_own_pending(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    first = StreamConsumer(
        redis_client, stream_names.trajectories, "reward", "same-name", block_ms=100
    )
    await first.start()
    ids = await _fill(redis_client, stream_names.trajectories, 2)
    assert [e.id for e in await first.read()] == ids  # read, never acknowledged: "crashed"
    restarted = StreamConsumer(
        redis_client, stream_names.trajectories, "reward", "same-name", block_ms=100
    )
    assert [e.id for e in await restarted.read()] == ids


async def test_dead_consumers_entries_are_reclaimed(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    dead = StreamConsumer(redis_client, stream_names.trajectories, "reward", "dead", block_ms=100)
    alive = StreamConsumer(
        redis_client,
        stream_names.trajectories,
        "reward",
        "alive",
        block_ms=100,
        reclaim_idle_ms=200,
    )
    await dead.start()
    ids = await _fill(redis_client, stream_names.trajectories, 4)
    assert len(await dead.read()) == 4
    assert await alive.read() == []  # not idle long enough yet
    await asyncio.sleep(0.3)
    alive._next_claim_at = 0.0
    assert [e.id for e in await alive.read()] == ids
    consumers = {
        c["name"]: c["pending"]
        for c in await redis_client.xinfo_consumers(stream_names.trajectories, "reward")
    }
    assert consumers == {b"dead": 0, b"alive": 4}


async def test_entries_worked_on_are_not_taken_over_however_long_it_takes(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    """A live consumer marks the entries it works on (``working_on``): another consumer's
    ``XAUTOCLAIM`` does not take them over while the work lasts many reclaim periods, and
    no delivery is counted; once the work stops without a commit, they are taken over."""
    stream = stream_names.trajectories
    slow, other = (
        StreamConsumer(redis_client, stream, "reward", name, block_ms=50, reclaim_idle_ms=200,
                       dead_stream=stream_names.dead, max_deliveries=1)
        for name in ("slow", "other")
    )  # fmt: skip
    await slow.start()
    ids = await _fill(redis_client, stream, 3)
    batch = await slow.read()
    async with slow.working_on(batch):
        for _ in range(8):  # 1.6 s: eight reclaim periods
            await asyncio.sleep(0.2)
            other._next_claim_at = 0.0
            assert await other.read() == []
    assert await _delivery_counts(redis_client, stream, "reward") == [1, 1, 1]
    await asyncio.sleep(0.3)  # no longer marked: idle past reclaim_idle_ms
    other._next_claim_at = 0.0
    assert [entry.id for entry in await other.read()] == []  # a second delivery: past the limit
    assert await redis_client.xlen(stream_names.dead) == 3  # max_deliveries 1: dead-lettered
    assert ids == [entry.id for entry in batch]


async def test_trim_keeps_what_any_group_still_needs(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    stream = stream_names.trajectories
    assert await trim_acknowledged(redis_client, stream) == 0  # no stream: nothing to do
    fast = StreamConsumer(redis_client, stream, "fast", "f", batch_size=10, block_ms=100)
    slow = StreamConsumer(redis_client, stream, "slow", "s", batch_size=3, block_ms=100)
    await fast.start()
    await slow.start()
    ids = await _fill(redis_client, stream, 10)
    await fast.commit(acks=await fast.read())
    assert await trim_acknowledged(redis_client, stream) == 0  # "slow" has read nothing
    slow_batch = await slow.read()
    await slow.commit(acks=slow_batch[:2])  # the third stays pending
    assert await trim_acknowledged(redis_client, stream) == 2
    assert [entry_id for entry_id, _ in await redis_client.xrange(stream)] == ids[2:]


async def test_own_replay_pages_forward_while_entries_stay_pending(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    stream = stream_names.scored("run-1")

    def consumer() -> StreamConsumer:
        return StreamConsumer(redis_client, stream, "trainer", "run-1", batch_size=2, block_ms=100)

    first = consumer()
    await first.start()
    ids = await _fill(redis_client, stream, 5)
    seen = []
    while len(seen) < 5:
        seen += [e.id for e in await first.read()]
    # Restarted, it holds everything pending (acknowledges nothing) and still gets each entry once.
    restarted = consumer()
    replayed = [e.id for _ in range(3) for e in await restarted.read()]
    assert replayed == ids
    assert await restarted.read() == []  # replay over; nothing new
    restarted.recover()
    assert [e.id for e in await restarted.read()] == ids[:2]


async def _delivery_counts(client: aioredis.Redis, stream: str, group: str) -> list[int]:
    return [p["times_delivered"] for p in await client.xpending_range(stream, group, "-", "+", 10)]


async def _reclaim_after_idle(consumer: StreamConsumer) -> list[Entry]:
    await asyncio.sleep(consumer.reclaim_idle_ms / 1000 + 0.05)
    consumer._next_claim_at = 0.0  # no rest between passes over the pending list
    return await consumer.read()


async def test_an_entry_delivered_past_max_deliveries_is_dead_lettered(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    """A poison entry: every consumer that takes it dies before committing. Its fourth
    delivery (max_deliveries 3) goes to the dead letters, acknowledged, instead."""
    stream, dead = stream_names.prompts, stream_names.dead
    (poison,) = await _fill(redis_client, stream, 1)
    seen = []
    metric = []
    for attempt in range(5):  # consumer i is a new process each time: the last one died
        consumer = StreamConsumer(
            redis_client, stream, "rollout", f"replica-{attempt}", block_ms=100,
            reclaim_idle_ms=50, dead_stream=dead, max_deliveries=3,
            on_dead_letter=metric.append,
        )  # fmt: skip
        await consumer.start()
        read = await (consumer.read() if attempt == 0 else _reclaim_after_idle(consumer))
        seen.append([entry.id for entry in read])
    assert seen == [[poison], [poison], [poison], [], []]
    assert metric == [1]
    assert (await redis_client.xpending(stream, "rollout"))["pending"] == 0  # acknowledged
    ((_, fields),) = await redis_client.xrange(dead)
    letter = DeadLetter.from_bytes(fields[DATA_FIELD])
    assert letter.reason == "delivered 3 times without being committed (max_deliveries 3)"
    assert (letter.source_id, letter.consumer) == (poison.decode(), "replica-3")
    assert letter.fields == {DATA_FIELD: b"0"}


async def test_a_restarted_consumer_counts_its_own_replays(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    stream, dead = stream_names.trajectories, stream_names.dead
    ids = await _fill(redis_client, stream, 2)
    reads = []
    for _ in range(3):  # the same consumer name, restarted (killed by the entries) each time
        consumer = StreamConsumer(
            redis_client, stream, "reward", "worker", block_ms=100, dead_stream=dead,
            max_deliveries=2,
        )  # fmt: skip
        await consumer.start()
        reads.append([entry.id for entry in await consumer.read()])
    assert reads == [ids, ids, []]
    assert await redis_client.xlen(dead) == 2
    assert (await redis_client.xpending(stream, "reward"))["pending"] == 0


async def test_holding_an_entry_counts_no_delivery(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    """An entry the consumer keeps (the trainer until a checkpoint) comes back to it by
    XAUTOCLAIM once idle, and by replays after a Redis failure: neither is a failed
    delivery, however often, and its count stays what it was."""
    stream, dead = stream_names.scored("run-1"), stream_names.dead
    consumer = StreamConsumer(
        redis_client, stream, "trainer", "trainer-run", block_ms=100, reclaim_idle_ms=50,
        dead_stream=dead, max_deliveries=1,
    )  # fmt: skip
    await consumer.start()
    ids = await _fill(redis_client, stream, 2)
    assert [entry.id for entry in await consumer.read()] == ids
    for _ in range(3):
        assert [entry.id for entry in await _reclaim_after_idle(consumer)] == ids
        consumer.recover()
        assert [entry.id for entry in await consumer.read()] == ids
    assert await _delivery_counts(redis_client, stream, "trainer") == [1, 1]
    assert await redis_client.exists(dead) == 0
    entries = await consumer.read()  # the replay is over: nothing new
    assert entries == []
    await consumer.commit(acks=[Entry(ids[0], {})])
    assert await _delivery_counts(redis_client, stream, "trainer") == [1]


async def test_a_released_entry_counts_its_next_delivery(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    """A caller whose processing of an entry failed releases it: it comes back after the
    reclaim time, and after max_deliveries it is dead-lettered."""
    stream, dead = stream_names.prompts, stream_names.dead
    consumer = StreamConsumer(
        redis_client, stream, "rollout", "replica", block_ms=100, reclaim_idle_ms=50,
        dead_stream=dead, max_deliveries=2,
    )  # fmt: skip
    await consumer.start()
    (entry_id,) = await _fill(redis_client, stream, 1)
    (entry,) = await consumer.read()
    consumer.release([entry])
    assert [e.id for e in await _reclaim_after_idle(consumer)] == [entry_id]  # delivery 2
    consumer.release([entry])
    assert await _reclaim_after_idle(consumer) == []  # delivery 3: dead
    ((_, fields),) = await redis_client.xrange(dead)
    assert DeadLetter.from_bytes(fields[DATA_FIELD]).reason.startswith("delivered 2 times")
    assert (await redis_client.xpending(stream, "rollout"))["pending"] == 0


async def test_the_dead_letter_stream_keeps_about_dead_maxlen(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    """No group reads the dead letters: they are capped as they are written (MAXLEN ~,
    whole stream nodes of 100 entries at a time), the newest kept."""
    stream, dead = stream_names.trajectories, stream_names.dead
    consumer = StreamConsumer(
        redis_client, stream, "reward", "w", batch_size=50, block_ms=100, dead_stream=dead,
        dead_maxlen=100,
    )  # fmt: skip
    await consumer.start()
    ids = await _fill(redis_client, stream, 500)
    for _ in range(10):
        await consumer.commit(dead=[(entry, "bad") for entry in await consumer.read()])
    assert (await redis_client.xpending(stream, "reward"))["pending"] == 0
    assert 100 <= await redis_client.xlen(dead) < 300  # not 500
    ((_, fields),) = await redis_client.xrevrange(dead, count=1)
    assert DeadLetter.from_bytes(fields[DATA_FIELD]).source_id == ids[-1].decode()
