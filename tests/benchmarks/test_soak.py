"""``hapo bench soak`` at a small scale: the stack trains 10 steps with bad input written
into every stream twice and the trainer SIGKILLed once, loses no group, trains none twice,
dead-letters every bad entry with its reason and its fields kept byte for byte, and Redis
stays flat. (The stack's faults one at a time, each service and Redis SIGKILLed:
``tests/e2e/test_faults.py``.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import soak
from tests.helpers import free_port


@pytest.mark.slow
def test_soak_loses_nothing_and_redis_stays_flat(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = soak.main([
        "--steps", "10", "--kills", "1", "--inject-every", "5", "--seed", "34",
        "--model", str(tiny_model_dir), "--out", str(tmp_path / "soak"),
        "--base-port", str(free_port()),
    ])  # fmt: skip
    # Seed 34 kills the trainer after step 7: it resumes from its step-5 checkpoint.
    assert result["steps"] == 10 and result["kills"] == [{"after_step": 7, "service": "trainer"}]
    assert (result["lost_groups"], result["trained_twice"]) == (0, 0)
    assert result["groups_trained"] == 10 * soak.BATCH
    assert result["bad_entries_injected"] == 2 * 16  # after steps 1 and 5, 16 kinds
    assert result["bad_entries_not_dead_lettered"] == []
    first, last = result["redis_first_step"], result["redis_last_step"]
    # Bounded: every stream but the dead letters is trimmed below what its readers need
    # (at most a few steps of groups), whatever the number of steps.
    for stream, length in last["streams"].items():
        if not stream.endswith(":dead"):
            assert length <= 4 * soak.BATCH * soak.N + 16, (stream, length)
    assert last["used_memory"] < first["used_memory"] + (1 << 20)
