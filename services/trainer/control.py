"""What the control API asks of a run, and the run's state as it reports it.

The API only records requests; the run's loop honours them between steps: it never stops
or pauses in the middle of a learner step or a weight push.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum


class RunState(enum.StrEnum):
    PENDING = "pending"
    """Accepted; loading the model."""
    RUNNING = "running"
    PAUSED = "paused"
    """Between steps, waiting for ``resume`` (or ``stop``)."""
    STOPPING = "stopping"
    """Stop requested: finishing the current step, then a checkpoint."""
    STOPPED = "stopped"
    FINISHED = "finished"
    """All ``trainer.total_steps`` steps done."""
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (RunState.STOPPED, RunState.FINISHED, RunState.FAILED)


class RunControl:
    """Pause, resume, stop and checkpoint requests for one run, plus its reported state."""

    def __init__(self) -> None:
        self.state = RunState.PENDING
        self.stop = asyncio.Event()
        """Set by ``request_stop`` (or the process's SIGTERM): end after the current step."""
        self.pause_requested = False
        self.checkpoint_requested = False

    def request_pause(self) -> None:
        if not self.stop.is_set():
            self.pause_requested = True

    def request_resume(self) -> None:
        self.pause_requested = False
        if self.state is RunState.PAUSED:
            self.state = RunState.RUNNING

    def request_stop(self) -> None:
        self.stop.set()
        self.pause_requested = False
        if not self.state.terminal:
            self.state = RunState.STOPPING

    def request_checkpoint(self) -> None:
        self.checkpoint_requested = True

    def take_checkpoint_request(self) -> bool:
        """Whether a checkpoint was requested since the last call."""
        requested, self.checkpoint_requested = self.checkpoint_requested, False
        return requested

    async def idle(self, seconds: float) -> None:
        """Wait ``seconds``, or less if a stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
