"""The trainer's intake of scored samples (real Redis, the real loop): what it cannot use
goes to the dead letters with the reason, and the run goes on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import redis

from hapo.transport.base import DATA_FIELD
from hapo.transport.messages import DeadLetter, ScoredTrajectory
from hapo.transport.streams import TRAINER_GROUP
from tests.helpers import metrics_lines, trained_group_ids, wait_for
from tests.services.trainer.conftest import ScoredFeeder, TrainerServer


def test_unusable_scored_entries_are_dead_lettered(
    trainer_api: TrainerServer, feeder: ScoredFeeder, tmp_path: Path
) -> None:
    names, client = feeder.names, redis.Redis.from_url(trainer_api.config.redis.url)
    vocab = 49152  # the tiny model's
    outside = ScoredTrajectory(
        run_id="intake", group_id="00000001", sample_idx=0, n=2, policy_version=0,
        policy_version_end=0, prompt_ids=np.array([1, 2, 3]), response_ids=np.array([5, vocab]),
        logprobs=np.zeros(2), finish_reason="stop", answer="1", reward=1.0, reward_reason="x",
    )  # fmt: skip
    # Before the run starts, so that they come before group 1's real samples.
    garbage = client.xadd(names.scored("intake"), {DATA_FIELD: b"\xc1 not msgpack"}).decode()
    unknown_token = client.xadd(names.scored("intake"), {DATA_FIELD: outside.to_bytes()}).decode()
    try:
        overrides = ["trainer.run_id=intake", "trainer.total_steps=2"]
        status, body = trainer_api.request("POST", "/v1/runs", {"overrides": overrides})
        assert status == 201, body
        ended = ("finished", "failed", "stopped")
        run = lambda: trainer_api.request("GET", "/v1/runs/intake")[1]  # noqa: E731
        wait_for(lambda: run()["state"] in ended, 120, "the run to end")
        assert (run()["state"], run()["step"]) == ("finished", 2), run()
        letters = {
            letter.source_id: letter
            for letter in (
                DeadLetter.from_bytes(fields[DATA_FIELD]) for _, fields in client.xrange(names.dead)
            )
        }
        assert letters.keys() == {garbage, unknown_token}
        assert letters[garbage].reason.startswith("undecodable msgpack")
        assert letters[unknown_token].reason == (
            f"response_ids: token id {vocab} is outside the model's vocabulary [0, {vocab})"
        )
        assert {letter.consumer for letter in letters.values()} == {"trainer-intake"}
        # Acknowledged with their dead letters; group 1 was trained on its real samples.
        pending = client.xpending_range(names.scored("intake"), TRAINER_GROUP, "-", "+", 1000)
        assert not {p["message_id"].decode() for p in pending} & {garbage, unknown_token}
        lines = metrics_lines(tmp_path / "runs" / "intake" / "metrics.jsonl")
        assert "00000001" in trained_group_ids(lines)
    finally:
        client.close()
