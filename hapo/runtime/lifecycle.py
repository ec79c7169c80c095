"""What every service process does the same way: logging, signals, its HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from hapo.config import HapoConfig
from hapo.runtime.cpus import allowed_cpus, format_cpu_list


def setup_logging(service: str, config: HapoConfig, level: int = logging.INFO) -> logging.Logger:
    """Log to stderr with the service name; log the effective config once, as JSON
    (secrets masked), and the CPUs the process may run on (``hapo up --pin``)."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
    logger = logging.getLogger(f"hapo.{service}")
    logger.info("config %s", config.to_json())
    logger.info("pid %d on CPUs %s", os.getpid(), format_cpu_list(allowed_cpus()))
    return logger


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: services finish the batch in hand, then exit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_http(app: FastAPI, host: str, port: int, stop: asyncio.Event) -> None:
    """Run ``app`` with uvicorn in this event loop until ``stop`` is set."""
    server = _Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    )
    task = asyncio.create_task(server.serve())
    await stop.wait()
    server.should_exit = True
    await task
