"""The pieces of exact resume that need no process: the trained-groups record and the
metrics file cut back to a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from services.trainer.groups import TrainedGroups
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
