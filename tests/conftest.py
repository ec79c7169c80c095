"""Fixtures shared by the suite: a real Redis with a private stream prefix per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from hapo.config import HapoConfig, load_config
from hapo.streams import StreamNames


@pytest.fixture
def config() -> HapoConfig:
    """The effective default config (the environment's HAPO_* variables included)."""
    return load_config()


@pytest.fixture
def stream_names(config: HapoConfig) -> Iterator[StreamNames]:
    """Stream names under a prefix of this test's own; its keys are deleted afterwards."""
    names = StreamNames(f"test-{uuid.uuid4().hex[:12]}")
    yield names
    client = redis.Redis.from_url(config.redis.url)
    keys = list(client.scan_iter(match=f"{names.prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
async def redis_client(config: HapoConfig) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(config.redis.url)
    yield client
    await client.aclose()
