"""Start a local Redis when none answers, so one machine needs no set-up of its own."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import redis

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class RedisUnavailableError(RuntimeError):
    """No Redis answers and none can be started here."""


def redis_answers(url: str) -> bool:
    """Whether a Redis server answers ``PING`` at ``url`` within a second."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):  # refused, timed out, or not Redis at all
        return False
    finally:
        client.close()


def ensure_redis(url: str, data_dir: Path, timeout_s: float = 10.0) -> bool:
    """Make sure a Redis answers at ``url``; start ``redis-server`` there if it is local.

    The server is started daemonised, with AOF persistence in ``data_dir`` so that a
    restart loses nothing. Returns whether a server was started.

    Raises:
        RedisUnavailableError: the URL is remote, ``redis-server`` is not installed, or the
            started server does not answer within ``timeout_s``.
    """
    if redis_answers(url):
        return False
    parsed = urlparse(url)
    if parsed.scheme != "redis" or parsed.hostname not in _LOCAL_HOSTS:
        raise RedisUnavailableError(f"no Redis answers at {url}, and it is not local to start")
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailableError(
            f"no Redis answers at {url} and redis-server is not installed "
            "(Debian: apt-get install redis-server)"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    port = parsed.port or 6379
    subprocess.run(
        [binary, "--port", str(port), "--bind", parsed.hostname, "--daemonize", "yes",
         "--dir", str(data_dir), "--appendonly", "yes", "--save", "",
         "--logfile", str(data_dir / f"redis-{port}.log")],
        check=True,
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if redis_answers(url):
            return True
        time.sleep(0.1)
    raise RedisUnavailableError(f"started redis-server on port {port}, but it does not answer")
