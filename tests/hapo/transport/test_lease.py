"""``hapo.transport.lease`` against a real Redis: one owner at a time, a claim taken back
by its owner, lapsing, and ``held`` releasing at the end of its body whatever happens."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from hapo.transport.lease import Lease, LeaseHeld
from hapo.transport.streams import StreamNames


async def test_one_owner_at_a_time_and_the_owner_takes_it_back(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    key = f"{stream_names.prefix}:lease"
    a, b = Lease(redis_client, key, "a"), Lease(redis_client, key, "b")
    assert await a.acquire() is None
    assert await b.acquire() == "a"
    assert await a.acquire() is None  # a restart of the same owner
    assert 0 < await redis_client.pttl(key) <= 30_000
    await b.release()  # not b's: nothing happens
    assert await redis_client.get(key) == b"a"
    await a.release()
    assert await b.acquire() is None


async def test_a_claim_lapses_after_its_ttl(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    key = f"{stream_names.prefix}:lease"
    assert await Lease(redis_client, key, "a", ttl_s=0.2).acquire() is None
    assert await Lease(redis_client, key, "b").acquire() == "a"
    await asyncio.sleep(0.3)
    assert await Lease(redis_client, key, "b").acquire() is None


async def test_held_renews_and_releases_even_when_the_body_fails(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    key = f"{stream_names.prefix}:lease"
    lost: list[bool] = []
    lease = Lease(redis_client, key, "a", ttl_s=0.3)
    with pytest.raises(RuntimeError, match="the body failed"):
        async with lease.held(lambda: lost.append(True)):
            await asyncio.sleep(0.5)  # longer than the TTL: only renewals keep it
            assert await redis_client.get(key) == b"a"
            raise RuntimeError("the body failed")
    assert await redis_client.get(key) is None and lost == []


async def test_held_refuses_while_another_owner_holds_it_and_reports_a_lost_claim(
    redis_client: aioredis.Redis, stream_names: StreamNames
) -> None:
    key = f"{stream_names.prefix}:lease"
    assert await Lease(redis_client, key, "b").acquire() is None
    body_ran = False
    with pytest.raises(LeaseHeld) as refused:
        async with Lease(redis_client, key, "a").held(lambda: None):
            body_ran = True
    assert (refused.value.holder, body_ran) == ("b", False)
    await redis_client.delete(key)

    # Taken by another owner while held (as after a Redis outage longer than the TTL).
    lost = asyncio.Event()
    async with Lease(redis_client, key, "a", ttl_s=0.3).held(lost.set):
        await redis_client.set(key, "b")
        await asyncio.wait_for(lost.wait(), timeout=5)
    assert await redis_client.get(key) == b"b"  # a's release leaves b's claim alone
