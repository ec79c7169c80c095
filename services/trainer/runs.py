"""The runs of one trainer process: at most one active at a time, each a ``TrainerService``
driven in this event loop, steered through its ``RunControl``."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from hapo.config import ConfigError, HapoConfig, load_config
from services.trainer.control import RunControl, RunState
from services.trainer.metrics import TrainerMetrics
from services.trainer.service import TrainerService

logger = logging.getLogger("hapo.trainer")


class RunConflict(Exception):
    """A run is already active, or the run id is taken."""


def config_with_overrides(base: HapoConfig, overrides: Sequence[str]) -> HapoConfig:
    """``base`` with dotted ``key=value`` overrides applied, validated like the command
    line (``hapo.config.load_config``; the environment is already in ``base``).

    ``api.*`` stays the process's: the server is bound and its token is fixed; so does
    ``redis.password``, a secret of the deployment.

    Raises:
        ConfigError: naming the bad key.
    """
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key == "api" or key.startswith("api."):
            raise ConfigError(f"{key}: the control API's settings are the process's own")
        if key in ("redis", "redis.password"):
            raise ConfigError(f"{key}: the Redis password is the process's own")
    tree = json.loads(base.model_dump_json())
    tree["api"]["token"] = tree["redis"]["password"] = None  # masked in the dump; put back
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "base.yaml"
        path.write_text(yaml.safe_dump(tree))
        config = load_config(path, overrides, environ={})
    redis = config.redis.model_copy(update={"password": base.redis.password})
    return config.model_copy(update={"api": base.api, "redis": redis})


@dataclass
class Run:
    run_id: str
    config: HapoConfig
    control: RunControl = field(default_factory=RunControl)
    service: TrainerService | None = None
    """While the run is live (None while its model loads and once it has ended)."""
    error: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    step: int = 0
    policy_version: int = 0
    last_step: dict[str, float] = field(default_factory=dict)
    """The last step's JSONL record (empty before the first step)."""
    checkpoint_step: int | None = None
    """Step of the newest checkpoint this run wrote."""

    @property
    def state(self) -> RunState:
        return self.control.state

    def refresh(self) -> Run:
        """Copy the live progress from the service; returns ``self``."""
        if self.service is not None:
            self.step, self.policy_version = self.service.step, self.service.policy_version
            self.last_step, self.checkpoint_step = self.service.last, self.service.checkpointed_step
        return self


class RunManager:
    """Starts runs (one active at a time) and keeps every run of this process."""

    def __init__(self, config: HapoConfig, metrics: TrainerMetrics) -> None:
        self.config = config
        """The process's config: runs apply their overrides on top of it."""
        self.metrics = metrics
        self.runs: dict[str, Run] = {}
        self.active: Run | None = None
        self._tasks: set[asyncio.Task] = set()

    def start(self, config: HapoConfig) -> Run:
        """Start a run of ``config`` in the background.

        Raises:
            RunConflict: a run is active, or ``trainer.run_id`` was used in this process.
        """
        if self.active is not None:
            raise RunConflict(f"run {self.active.run_id} is {self.active.state}; stop it first")
        run_id = config.trainer.run_id or f"run-{uuid.uuid4().hex[:8]}"
        if run_id in self.runs:
            raise RunConflict(f"run id {run_id} was already used by this trainer")
        run = self.runs[run_id] = self.active = Run(run_id, config)
        task = asyncio.create_task(self._drive(run), name=f"run-{run_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return run

    def get(self, run_id: str) -> Run | None:
        return self.runs.get(run_id)

    async def stop_all(self) -> None:
        """Stop the active run (it checkpoints) and wait until it has ended."""
        if self.active is not None:
            run = self.active
            run.control.request_stop()
            await run.ended.wait()

    def _load(self, run: Run) -> TrainerService:
        torch.manual_seed(run.config.seed)
        return TrainerService(run.config, run.control, self.metrics, run_id=run.run_id)

    async def _drive(self, run: Run) -> None:
        try:
            run.service = await asyncio.to_thread(self._load, run)
            if not run.control.stop.is_set():
                await run.service.run()
            total = run.config.trainer.total_steps
            done = run.refresh().step >= total
            run.control.state = RunState.FINISHED if done else RunState.STOPPED
        except Exception as exc:  # reported through GET /v1/runs/{id}
            logger.exception("run %s failed", run.run_id)
            run.error = f"{type(exc).__name__}: {exc}"
            run.control.state = RunState.FAILED
        finally:
            run.refresh().service = None  # the model and optimizer go with it
            self.metrics.runs.labels(run.state.value).inc()
            if self.active is run:
                self.active = None
            run.ended.set()
            logger.info("run %s %s after step %d", run.run_id, run.state, run.step)
