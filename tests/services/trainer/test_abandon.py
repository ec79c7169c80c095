"""A prompt group that cannot complete (one of its samples never arrives, as when it is
dead-lettered on the way) is abandoned after ``trainer.group_timeout_s`` and replaced: the
run reaches its last step, the group is counted and never trained, even when its missing
sample turns up late (real Redis, the real trainer loop)."""

from __future__ import annotations

from pathlib import Path

import redis

from hapo.transport.base import DATA_FIELD
from hapo.transport.messages import PromptGroup
from hapo.transport.streams import TRAINER_GROUP, StreamNames
from tests.helpers import metrics_lines, trained_group_ids, wait_for
from tests.services.trainer.conftest import ScoredFeeder, TrainerServer


def test_a_group_that_cannot_complete_is_abandoned_and_replaced(
    trainer_api: TrainerServer, stream_names: StreamNames, tmp_path: Path
) -> None:
    url = trainer_api.config.redis.url
    # Group 2 lacks its sample 1; groups above 3 wait until the late sample is in.
    feeder = ScoredFeeder(url, stream_names, limit=3, drop={("00000002", 1)})
    client = redis.Redis.from_url(url)
    try:
        overrides = [
            "trainer.run_id=abandon", "trainer.total_steps=3", "trainer.max_staleness=0",
            "trainer.group_timeout_s=5",
        ]  # fmt: skip
        status, body = trainer_api.request("POST", "/v1/runs", {"overrides": overrides})
        assert status == 201, body
        run = lambda: trainer_api.request("GET", "/v1/runs/abandon")[1]  # noqa: E731
        wait_for(lambda: run()["step"] >= 1, 120, "step 1")
        assert trainer_api.request("POST", "/v1/runs/abandon/pause")[0] == 202
        wait_for(lambda: run()["state"] == "paused", 60, "the pause")
        metrics_path = tmp_path / "runs" / "abandon" / "metrics.jsonl"
        first = metrics_lines(metrics_path)[0]
        # Step 1 was issued groups 1 and 2; 2 was abandoned and 3 issued in its place.
        assert first["data/group_ids"] == ["00000001", "00000003"]
        assert first["data/abandoned_groups"] == 1

        group_2 = next(
            group
            for group in (PromptGroup.from_bytes(f[DATA_FIELD]) for _, f in client.xrange(
                stream_names.prompts))
            if group.group_id == "00000002"
        )  # fmt: skip
        late = ScoredFeeder.samples(group_2)[1]
        client.xadd(stream_names.scored("abandon"), {DATA_FIELD: late.to_bytes()})
        feeder.limit = None
        assert trainer_api.request("POST", "/v1/runs/abandon/resume")[0] == 202
        wait_for(lambda: run()["state"] in ("finished", "failed", "stopped"), 120, "the end")
        assert (run()["state"], run()["step"]) == ("finished", 3), run()

        lines = metrics_lines(metrics_path)
        trained = trained_group_ids(lines)
        assert sorted(trained) == [f"{k:08d}" for k in (1, 3, 4, 5, 6, 7)]  # each once
        assert lines[-1]["data/abandoned_groups"] == 1
        assert lines[-1]["data/duplicates"] >= 1  # the late sample, refused
        # Every entry, group 2's included, was acknowledged with the last checkpoint.
        assert client.xpending(stream_names.scored("abandon"), TRAINER_GROUP)["pending"] == 0
        status, text = trainer_api.request("GET", "/metrics", token=None)
        assert "hapo_trainer_abandoned_groups 1.0" in text
    finally:
        feeder.close()
        client.close()
