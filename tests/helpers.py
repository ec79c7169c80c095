"""Small helpers shared by tests that start real processes and servers."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence

import numpy as np

from hapo.messages import ScoredTrajectory


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def scored_trajectories(
    groups: Sequence[Sequence[tuple[int, int, float]]], vocab: int, seed: int
) -> list[ScoredTrajectory]:
    """Scored samples with random tokens below ``vocab``: one inner list per group of
    ``(prompt length, response length, reward)``; a group shares its prompt."""
    rng = np.random.default_rng(seed)
    trajectories = []
    for group, samples in enumerate(groups):
        prompt = rng.integers(1, vocab, samples[0][0])
        for index, (_, length, reward) in enumerate(samples):
            trajectories.append(
                ScoredTrajectory(
                    run_id="run",
                    group_id=f"g{group}",
                    sample_idx=index,
                    n=len(samples),
                    policy_version=0,
                    policy_version_end=0,
                    prompt_ids=prompt,
                    response_ids=rng.integers(1, vocab, length),
                    logprobs=np.zeros(length),
                    finish_reason="stop",
                    answer="1",
                    reward=reward,
                    reward_reason="test",
                )
            )
    return trajectories
