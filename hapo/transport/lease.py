"""A claim on a Redis key that lapses unless renewed: one live owner at a time.

A trainer claims its stream prefix for its run (``<prefix>:trainer:lease``): the prompts
and trajectories streams and the rollout and reward replicas behind them serve one run at
a time (a replica holds one run's weights), so a second trainer on the same prefix is
refused instead of mixing two runs' samples and weights. A killed owner's claim lapses
``ttl_s`` after its last renewal; the same owner (a restart of the same run) takes its
claim back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger("hapo.transport.lease")

# Each runs atomically in Redis. Claim: nil if the claim is now the owner's (taken, taken
# back after it lapsed, or extended), else the holder. Release: 1 if the owner held it.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseHeld(RuntimeError):
    """Another owner holds the claim."""

    def __init__(self, key: str, holder: str) -> None:
        super().__init__(f"{key} is held by {holder}")
        self.holder = holder


class Lease:
    """``owner``'s claim on ``key``, lapsing ``ttl_s`` after its last renewal."""

    def __init__(self, client: aioredis.Redis, key: str, owner: str, ttl_s: float = 30.0) -> None:
        self.client, self.key, self.owner = client, key, owner
        self.ttl_ms = int(ttl_s * 1000)

    async def acquire(self) -> str | None:
        """Claim the key; returns None on success, else the owner holding it."""
        holder = await self.client.eval(_CLAIM, 1, self.key, self.owner, self.ttl_ms)
        return None if holder is None else holder.decode()

    async def renew(self) -> bool:
        """Extend the claim (or take it back if it lapsed and nobody took it); False if
        another owner holds it now."""
        return await self.acquire() is None

    async def release(self) -> None:
        """Give the claim up (if still held), so that another owner need not wait."""
        await self.client.eval(_RELEASE, 1, self.key, self.owner)

    async def keep(self, on_lost: Callable[[], object]) -> None:
        """Renew every third of ``ttl_s`` until cancelled; call ``on_lost`` and return if
        the claim was lost (it lapsed while Redis was unreachable and another owner took
        it). A renewal that fails on the connection is retried at the next period."""
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                held = await self.renew()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                logger.warning("cannot renew the claim on %s: %s", self.key, exc)
                continue
            if not held:
                on_lost()
                return

    @contextlib.asynccontextmanager
    async def held(self, on_lost: Callable[[], object]) -> AsyncIterator[None]:
        """Hold the claim for the body of the ``async with``: take it, renew it meanwhile
        (``keep``, which calls ``on_lost`` if it is lost), give it up at the end. A release
        that fails on the connection is logged: the claim then lapses by itself.

        Raises:
            LeaseHeld: another owner holds the claim (the body does not run).
        """
        if (holder := await self.acquire()) is not None:
            raise LeaseHeld(self.key, holder)
        keeper = asyncio.create_task(self.keep(on_lost))
        try:
            yield
        finally:
            keeper.cancel()
            try:
                await self.release()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                logger.warning("claim on %s not released (it lapses by itself): %s", self.key,
                               exc)  # fmt: skip
