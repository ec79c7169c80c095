"""Starting a local Redis when none answers (real redis-server)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from hapo.runtime.redis_server import RedisUnavailableError, ensure_redis, redis_answers
from tests.helpers import free_port


def test_starts_redis_with_aof_when_none_answers(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert not redis_answers(url)
    try:
        assert ensure_redis(url, tmp_path) is True
        client = redis.Redis.from_url(url)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        client.xadd("hapo:test", {"k": "v"})
        assert ensure_redis(url, tmp_path) is False  # already answering: nothing started
    finally:
        redis.Redis.from_url(url).shutdown(nosave=True)


def test_remote_url_is_not_started(tmp_path: Path) -> None:
    with pytest.raises(RedisUnavailableError, match="not local"):
        ensure_redis("redis://redis.invalid:6379/0", tmp_path, timeout_s=1)
