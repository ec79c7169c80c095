"""Entry point of ``hapo trainer``: the control API over the run manager over the loop.

Imports go one way, ``main`` -> ``api`` -> ``runs`` -> ``service`` (the loop of one run).
"""

from __future__ import annotations

import asyncio

from hapo.config import HapoConfig
from hapo.runtime.lifecycle import setup_logging, stop_event_on_signals
from services.trainer.api import serve


def run(config: HapoConfig) -> None:
    """Start a run of ``trainer.total_steps`` steps from ``config`` and serve the control API
    on ``api.host:api.port``; exit when the run ends if ``trainer.exit_after_run`` (exit
    status 1 if it failed), else on SIGINT/SIGTERM."""
    setup_logging("trainer", config)

    async def main() -> int:
        return await serve(config, stop_event_on_signals(), start_run=True)

    raise SystemExit(asyncio.run(main()))
