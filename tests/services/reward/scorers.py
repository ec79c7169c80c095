"""Scorers for the tests, importable by module path in the scorer child process."""

from __future__ import annotations

import os
import signal
import time

from hapo.scoring.rewards import Score


def slow(response: str, answer: str) -> float:
    """20 ms a score, so that a worker can be killed mid-batch."""
    time.sleep(0.02)
    return float(response.strip().endswith(answer))


def hang_interruptibly(response: str, answer: str) -> float:
    """Hangs (in Python) on 'hang'."""
    while response == "hang":
        time.sleep(0.01)
    return 1.0


def hang_uninterruptibly(response: str, answer: str) -> float:
    """Hangs on 'hang' with SIGALRM blocked, as C code that never returns would."""
    if response == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        while True:
            time.sleep(0.01)
    return 1.0


def crash(response: str, answer: str) -> float:
    """Kills its process on 'crash'."""
    if response == "crash":
        os._exit(3)
    return 1.0


def buggy(response: str, answer: str) -> float:
    """Raises on 'bug'."""
    if response == "bug":
        raise KeyError(response)
    return 1.0


def bad_score(response: str, answer: str) -> Score:
    """On 'bad score', a Score whose reward is no number, on 'nan score' one whose reward is
    NaN (scorer bugs the sandbox cannot see: it only turns exceptions, hangs and crashes
    into reward 0)."""
    if response == "bad score":
        return Score("lots", "custom")  # type: ignore[arg-type]
    if response == "nan score":
        return Score(float("nan"), "custom")
    return Score(1.0, "custom")
