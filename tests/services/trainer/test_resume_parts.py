"""The pieces of exact resume that need no process: the trained-groups record, the metrics
file cut back to a checkpoint, and abandoning a group that cannot complete."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hapo.transport.base import Entry
from hapo.transport.messages import ScoredTrajectory
from services.trainer.groups import GroupAssembler, TrainedGroups
from services.trainer.resume import Progress, truncate_metrics


def test_trained_groups_are_compact_and_round_trip() -> None:
    trained = TrainedGroups()
    for group_id in ["00000002", "00000001", "00000005", "x", "00000003"]:
        trained.add(group_id)
    assert trained.to_json() == {"below": 3, "above": [5], "other": ["x"]}
    again = Progress.from_json(json.loads(json.dumps(Progress(trained=trained).to_json())))
    assert [g in again.trained for g in ["00000003", "00000004", "00000005", "x", "y", 3]] == [
        True, False, True, True, False, False,
    ]  # fmt: skip


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4')
    assert truncate_metrics(path, 2) == 2  # step 3 and the line cut short by the kill
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert truncate_metrics(path, 2) == 0
    assert truncate_metrics(tmp_path / "none.jsonl", 0) == 0


def _sample(group_id: str, index: int, n: int = 2) -> ScoredTrajectory:
    return ScoredTrajectory(
        run_id="r", group_id=group_id, sample_idx=index, n=n, policy_version=0,
        policy_version_end=0, prompt_ids=np.array([1, 2]), response_ids=np.array([3]),
        logprobs=np.zeros(1), finish_reason="stop", answer="1", reward=1.0, reward_reason="x",
    )  # fmt: skip


def test_an_overdue_group_is_abandoned_and_its_late_samples_refused() -> None:
    groups = GroupAssembler("r")
    groups.watch(["00000001", "00000002", "00000003"], now=0.0)
    for group_id, index in [("00000001", 0), ("00000001", 1), ("00000002", 0)]:
        assert groups.add(Entry(f"{group_id}-{index}".encode(), {}), _sample(group_id, index))
    assert groups.overdue(now=10.0, timeout_s=10.0) == []  # not past the timeout yet
    # Group 1 is complete (it waits for its step), 2 has one sample of 2, 3 none.
    assert groups.overdue(now=10.5, timeout_s=10.0) == ["00000002", "00000003"]
    groups.restart_clocks(now=10.5)  # e.g. after a pause
    assert groups.overdue(now=11.0, timeout_s=10.0) == []
    held, entries = groups.abandon("00000002")
    assert (held, [e.id for e in entries], groups.abandoned) == (1, [b"00000002-0"], 1)
    assert groups.add(Entry(b"late", {}), _sample("00000002", 1)) == "trained"  # refused
    assert groups.complete() == ["00000001"]
    assert groups.overdue(now=100.0, timeout_s=10.0) == ["00000003"]
    groups.pop("00000001")  # trained: no longer watched
    groups.abandon("00000003")
    assert groups.overdue(now=1000.0, timeout_s=10.0) == []
    again = Progress.from_json(
        json.loads(json.dumps(Progress(trained=groups.trained, abandoned=2).to_json()))
    )
    assert again.abandoned == 2 and all(g in again.trained for g in ["00000002", "00000003"])
    assert Progress.from_json({"policy_version": 0, "groups_queued": 0}).abandoned == 0
