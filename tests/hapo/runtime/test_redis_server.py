"""Starting a local Redis when none answers (real redis-server)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from hapo.runtime.redis_server import (
    RedisUnavailableError,
    ensure_redis,
    redis_answers,
    server_command,
)
from hapo.transport.streams import connect
from tests.helpers import free_port, wait_for


def test_starts_redis_with_aof_when_none_answers(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert not redis_answers(url)
    try:
        assert ensure_redis(url, tmp_path) is True
        client = redis.Redis.from_url(url)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("maxmemory")["maxmemory"] == str(2 * 1024**3)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.xadd("hapo:test", {"k": "v"})
        assert ensure_redis(url, tmp_path) is False  # already answering: nothing started
    finally:
        redis.Redis.from_url(url).shutdown(nosave=True)


async def test_a_started_redis_requires_the_password_that_no_command_line_shows(
    tmp_path: Path,
) -> None:
    url, password = f"redis://127.0.0.1:{free_port()}/0", SecretStr('pass "word" \\ of 24 chars')
    try:
        assert ensure_redis(url, tmp_path, password=password) is True
        assert not redis_answers(url)  # NOAUTH
        assert redis_answers(url, password)
        client = connect(url, password)  # what every service uses
        try:
            assert await client.ping()
        finally:
            await client.aclose()
        command_lines = [path.read_bytes() for path in Path("/proc").glob("[0-9]*/cmdline")]
        assert any(b"redis-server" in line for line in command_lines)
        assert not any(b"of 24 chars" in line for line in command_lines)
        assert ensure_redis(url, tmp_path, password=password) is False
    finally:
        redis.Redis.from_url(url, password=password.get_secret_value()).shutdown(nosave=True)


def test_remote_url_is_not_started(tmp_path: Path) -> None:
    with pytest.raises(RedisUnavailableError, match="not local"):
        ensure_redis("redis://redis.invalid:6379/0", tmp_path, timeout_s=1)


def test_a_full_redis_refuses_writes_and_evicts_nothing(tmp_path: Path) -> None:
    """noeviction: past maxmemory a write is an error the services see; every stream
    entry written before is still there."""
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary is not None
    command = server_command(binary, "127.0.0.1", port, tmp_path, daemonize=False, maxmemory="8mb")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: redis_answers(url), 20, "redis-server")
        client = redis.Redis.from_url(url)
        written = 0
        with pytest.raises(
            redis.ResponseError, match="command not allowed when used memory > 'maxmemory'"
        ):
            for _ in range(10_000):  # 64 KiB each: 640 MB, far past 8 MB
                client.xadd("hapo:prompts", {"data": b"x" * 65536})
                written += 1
        assert 0 < written < 10_000
        assert client.xlen("hapo:prompts") == written
    finally:
        server.kill()
        server.wait()
