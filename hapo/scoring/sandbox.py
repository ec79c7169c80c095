"""Scoring in a child process, under a time limit per item.

math-verify (sympy) can run for minutes on adversarial input, and C-level code (a regex,
a parser) cannot always be interrupted by a signal. The child interrupts a slow score
with ``SIGALRM``; if the child does not answer within a hard limit after that, the parent
kills it, records the item as timed out, and starts a new child for the rest.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from hapo.scoring.rewards import RewardFunction, Score

logger = logging.getLogger(__name__)

# Extra time the parent allows past the child's own alarm before killing it.
_HARD_LIMIT_GRACE_S = 2.0


@dataclass(frozen=True)
class ScoreItem:
    """One response to score."""

    response: str
    answer: str
    response_length: int


class _ScoreTimeout(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _ScoreTimeout


def _serve(connection: Connection, reward_fn: RewardFunction, timeout_s: float) -> None:
    """Child loop: receive ``[(i, item), ...]``, send ``(i, Score)`` back for each, in order."""
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    # math-verify warns that its own (signal-based) timeouts are off: this loop is the timeout.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    while True:
        try:
            batch = connection.recv()
        except EOFError:
            return
        for index, item in batch:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                score = reward_fn(item.response, item.answer, item.response_length)
            except _ScoreTimeout:
                score = Score(0.0, "timeout")
            except Exception as exc:  # a scorer bug must cost one item, not the worker
                score = Score(0.0, f"error: {type(exc).__name__}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            connection.send((index, score))


class ScoringSandbox:
    """Scores batches in a child process; hung or crashed children are replaced."""

    def __init__(self, reward_fn: RewardFunction, timeout_s: float) -> None:
        self._reward_fn = reward_fn
        self._timeout_s = timeout_s
        self._context = mp.get_context("spawn")  # no fork of a process with live threads
        self._process: mp.process.BaseProcess | None = None
        self._connection: Connection | None = None
        self.restarts = 0

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def start(self) -> None:
        parent_end, child_end = self._context.Pipe()
        self._process = self._context.Process(
            target=_serve,
            args=(child_end, self._reward_fn, self._timeout_s),
            name="hapo-reward-scorer",
            daemon=True,
        )
        self._process.start()
        child_end.close()
        self._connection = parent_end

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        if self._process is not None:
            self._process.kill()
            self._process.join()
        self._process = self._connection = None

    def _restart(self, why: str) -> None:
        logger.warning("restarting the scorer process: %s", why)
        self.close()
        self.restarts += 1
        self.start()

    def score(self, items: Sequence[ScoreItem]) -> list[Score]:
        """Scores of ``items`` in order. Blocking; call it from a worker thread."""
        scores: list[Score | None] = [None] * len(items)
        remaining = list(range(len(items)))
        while remaining:
            if not self.alive:
                self._restart("not running")
            assert self._connection is not None
            self._connection.send([(index, items[index]) for index in remaining])
            remaining = self._collect(remaining, scores)
        return [score for score in scores if score is not None]

    def _collect(self, remaining: list[int], scores: list[Score | None]) -> list[int]:
        """Receive scores for ``remaining`` (in order) until done or the child fails;
        returns what is left to send to a fresh child."""
        assert self._connection is not None
        hard_limit_s = self._timeout_s + _HARD_LIMIT_GRACE_S
        for position, index in enumerate(remaining):
            failure = None
            try:
                if self._connection.poll(hard_limit_s):
                    received_index, score = self._connection.recv()
                    if received_index != index:
                        raise RuntimeError(f"scorer answered item {received_index}, not {index}")
                    scores[index] = score
                    continue
                failure = Score(0.0, "timeout")
            except (EOFError, OSError):
                failure = Score(0.0, "error: scorer process died")
            scores[index] = failure
            self._restart(f"{failure.reason} on item {index}")
            return remaining[position + 1 :]
        return []
