"""Docker HEALTHCHECK of the hapo images: GET /healthz of whichever service PID 1 runs.

The port is not baked into the image: this reads PID 1's command line (``hapo rollout``,
``hapo reward`` or ``hapo trainer`` with its ``--config`` and ``key=value`` overrides, behind
an init such as ``docker-init --`` or not), loads the config the same way the service did
(file, ``HAPO_*`` environment, overrides) and asks ``127.0.0.1:<its port>/healthz``.
Other commands (``hapo model install``) and services without HTTP (port 0) pass.
"""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from hapo.config import HapoConfig, load_config

SERVICES = ("rollout", "reward", "trainer")


def service_args(argv: Sequence[str]) -> tuple[str | None, str | None, list[str]]:
    """(service, config file, overrides) of a ``hapo SERVICE [args]`` command line."""
    for index, word in enumerate(argv):
        if word in SERVICES and index > 0 and Path(argv[index - 1]).name == "hapo":
            break
    else:
        return None, None, []
    config_file, overrides = None, []
    rest = list(argv[index + 1 :])
    while rest:
        word = rest.pop(0)
        if word in ("--config", "-c") and rest:
            config_file = rest.pop(0)
        elif word == "--consumer" and rest:
            rest.pop(0)
        elif word.startswith("--config="):
            config_file = word.partition("=")[2]
        elif "=" in word and not word.startswith("-"):
            overrides.append(word)
    return argv[index], config_file, overrides


def health_port(service: str, config: HapoConfig) -> int:
    return {
        "rollout": config.rollout.http_port,
        "reward": config.reward.http_port,
        "trainer": config.api.port,
    }[service]


def health_url(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The /healthz URL to probe for this command line, or None when there is none."""
    service, config_file, overrides = service_args(argv)
    if service is None:
        return None
    config_file = config_file or environ.get("HAPO_CONFIG")
    port = health_port(service, load_config(config_file, overrides, environ))
    return f"http://127.0.0.1:{port}/healthz" if port else None


def main() -> int:
    import os

    argv = Path("/proc/1/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
    url = health_url(argv, os.environ)
    if url is None:
        return 0
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
