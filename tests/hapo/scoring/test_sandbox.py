"""The scorer child process: time limits, crashes and bugs cost one item each."""

from __future__ import annotations

import time

import pytest

from hapo.scoring.rewards import RewardFunction, Score
from hapo.scoring.sandbox import ScoreItem, ScoringSandbox

SCORERS = "tests.services.reward.scorers"


def run(
    scorer: str, responses: list[str], timeout_s: float = 0.5
) -> tuple[list[Score], ScoringSandbox]:
    sandbox = ScoringSandbox(RewardFunction(scorer=f"{SCORERS}:{scorer}"), timeout_s)
    sandbox.start()
    try:
        return sandbox.score([ScoreItem(r, "1", 1) for r in responses]), sandbox
    finally:
        sandbox.close()


def test_scores_in_order() -> None:
    sandbox = ScoringSandbox(RewardFunction(), 5.0)
    sandbox.start()
    try:
        scores = sandbox.score(
            [ScoreItem("so 4", "4", 2), ScoreItem("\\boxed{5}", "4", 3), ScoreItem("x", "4", 1)]
        )
    finally:
        sandbox.close()
    assert scores == [Score(1.0, "correct"), Score(0.0, "wrong"), Score(0.0, "no_answer")]


def test_interruptible_hang_times_out_without_restart() -> None:
    started = time.monotonic()
    scores, sandbox = run("hang_interruptibly", ["a", "hang", "b"])
    assert scores == [Score(1.0, "custom"), Score(0.0, "timeout"), Score(1.0, "custom")]
    assert sandbox.restarts == 0
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_uninterruptible_hang_kills_and_replaces_the_child() -> None:
    scores, sandbox = run("hang_uninterruptibly", ["a", "hang", "b", "hang", "c"], timeout_s=0.3)
    assert scores == [Score(1.0, "custom"), Score(0.0, "timeout"), Score(1.0, "custom"),
                      Score(0.0, "timeout"), Score(1.0, "custom")]  # fmt: skip
    assert sandbox.restarts == 2


def test_crash_costs_one_item() -> None:
    scores, sandbox = run("crash", ["a", "crash", "b"])
    assert scores == [
        Score(1.0, "custom"),
        Score(0.0, "error: scorer process died"),
        Score(1.0, "custom"),
    ]
    assert sandbox.restarts == 1


def test_scorer_exception_costs_one_item() -> None:
    scores, sandbox = run("buggy", ["bug", "fine"])
    assert scores == [Score(0.0, "error: KeyError"), Score(1.0, "custom")]
    assert sandbox.restarts == 0
