"""Stream helpers against a real Redis: groups, reading, reclaiming, dead letters, trimming."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from hapo.transport.messages import DeadLetter
from hapo.transport.streams import StreamConsumer, StreamNames, ensure_group, trim_acknowledged


async def _fill(client: aioredis.Redis, stream: str, count: int) -> list[bytes]:
    return [await client.xadd(stream, {b"data": b"%d" % i}) for i in range(count)]


async def test_ensure_group_is_idempotent(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    await ensure_group(redis_client, stream_names.trajectories, "reward")
    await ensure_group(redis_client, stream_names.trajectories, "reward")
    groups = await redis_client.xinfo_groups(stream_names.trajectories)
    assert [g["name"] for g in groups] == [b"reward"]


async def test_read_ack_and_dead_letter(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    consumer = StreamConsumer(
        redis_client, stream_names.trajectories, "reward", "c1", batch_size=3, block_ms=100
    )
    await consumer.start()
    ids = await _fill(redis_client, stream_names.trajectories, 5)
    first = await consumer.read()
    assert [e.id for e in first] == ids[:3]
    pipe = redis_client.pipeline(transaction=True)
    consumer.dead_letter(pipe, stream_names.dead, first[0], "bad payload")
    consumer.ack(pipe, first)
    await pipe.execute()
    second = await consumer.read()
    assert [e.id for e in second] == ids[3:]
    assert await consumer.read() == []  # blocks 100 ms, nothing new
    pending = await redis_client.xpending(stream_names.trajectories, "reward")
    assert pending["pending"] == 2
    ((_, fields),) = await redis_client.xrange(stream_names.dead)
    letter = DeadLetter.decode(fields)
    assert (letter.reason, letter.source_id, letter.fields) == (
        "bad payload",
        ids[0].decode(),
        {b"data": b"0"},
    )


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
    pipe = redis_client.pipeline()
    fast.ack(pipe, await fast.read())
    await pipe.execute()
    assert await trim_acknowledged(redis_client, stream) == 0  # "slow" has read nothing
    slow_batch = await slow.read()
    pipe = redis_client.pipeline()
    slow.ack(pipe, slow_batch[:2])  # the third stays pending
    await pipe.execute()
    assert await trim_acknowledged(redis_client, stream) == 2
    assert [entry_id for entry_id, _ in await redis_client.xrange(stream)] == ids[2:]


async def test_own_replay_pages_forward_while_entries_stay_pending(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    first = StreamConsumer(
        redis_client, stream_names.scored, "trainer", "run-1", batch_size=2, block_ms=100
    )
    await first.start()
    ids = await _fill(redis_client, stream_names.scored, 5)
    seen = []
    while len(seen) < 5:
        seen += [e.id for e in await first.read()]
    # Restarted, it holds everything pending (acknowledges nothing) and still gets each entry once.
    restarted = StreamConsumer(
        redis_client, stream_names.scored, "trainer", "run-1", batch_size=2, block_ms=100
    )
    replayed = [e.id for _ in range(3) for e in await restarted.read()]
    assert replayed == ids
    assert await restarted.read() == []  # replay over; nothing new
    restarted.recover()
    assert [e.id for e in await restarted.read()] == ids[:2]
