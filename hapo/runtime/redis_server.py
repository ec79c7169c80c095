"""Start a local Redis when none answers, so one machine needs no set-up of its own."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import redis
from pydantic import SecretStr

from hapo.config import mask_url

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

MAXMEMORY = "2gb"
"""Memory limit of a Redis started here. With ``noeviction`` a full Redis refuses writes
(the services fail loudly) instead of evicting stream entries (silently losing work); the
services trim their streams, so a run stays far below it."""


class RedisUnavailableError(RuntimeError):
    """No Redis answers and none can be started here."""


def redis_answers(url: str, password: SecretStr | None = None) -> bool:
    """Whether a Redis server answers ``PING`` at ``url`` within a second (authenticated
    with ``password`` where the URL has none)."""
    client = redis.Redis.from_url(
        url,
        password=None if password is None else password.get_secret_value(),
        socket_connect_timeout=1.0,
        socket_timeout=1.0,
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):  # refused, timed out, or not Redis at all
        return False
    finally:
        client.close()


def server_command(
    binary: str,
    host: str,
    port: int,
    data_dir: Path,
    *,
    daemonize: bool = True,
    appendfsync: str = "everysec",
    maxmemory: str = MAXMEMORY,
) -> list[str]:
    """The ``redis-server`` command line of a local server: AOF persistence (fsync policy
    ``appendfsync``) and its log in ``data_dir`` (created), no RDB snapshots, at most
    ``maxmemory`` with ``noeviction``. Started again with the same ``data_dir`` it replays
    the AOF. ``daemonize=False`` keeps it in the foreground, as a child whose pid the
    caller holds (the fault tests kill it)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        binary, "--port", str(port), "--bind", host, "--daemonize", "yes" if daemonize else "no",
        "--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", appendfsync,
        "--save", "", "--logfile", str(data_dir / f"redis-{port}.log"),
        "--maxmemory", maxmemory, "--maxmemory-policy", "noeviction",
    ]  # fmt: skip


def ensure_redis(
    url: str, data_dir: Path, timeout_s: float = 10.0, password: SecretStr | None = None
) -> bool:
    """Make sure a Redis answers at ``url``; start ``redis-server`` there if it is local.

    The server is started daemonised, with AOF persistence in ``data_dir`` so that a
    restart loses nothing, and bounded memory (``MAXMEMORY``, ``noeviction``); with a
    ``password`` it requires it (``requirepass``, handed over on its standard input, never
    on a command line that ``ps`` shows). Returns whether a server was started.

    Raises:
        RedisUnavailableError: the URL is remote, ``redis-server`` is not installed, or the
            started server does not answer within ``timeout_s``.
    """
    if redis_answers(url, password):
        return False
    parsed = urlparse(url)
    if parsed.scheme != "redis" or parsed.hostname not in _LOCAL_HOSTS:
        raise RedisUnavailableError(
            f"no Redis answers at {mask_url(url)}, and it is not local to start"
        )
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailableError(
            f"no Redis answers at {mask_url(url)} and redis-server is not installed "
            "(Debian: apt-get install redis-server)"
        )
    port = parsed.port or 6379
    command, config = server_command(binary, parsed.hostname, port, data_dir), ""
    if password is not None:
        command.insert(1, "-")  # the rest of the config from stdin, then the arguments
        config = f"requirepass {_quoted(password.get_secret_value())}\n"
    subprocess.run(command, input=config, text=True, check=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if redis_answers(url, password):
            return True
        time.sleep(0.1)
    raise RedisUnavailableError(f"started redis-server on port {port}, but it does not answer")


def _quoted(value: str) -> str:
    """``value`` as a double-quoted string of a Redis config file."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
