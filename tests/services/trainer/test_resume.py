"""Exact resume: the real ``hapo trainer`` process is SIGKILLed between two checkpoints and
started again under the same run id; every issued prompt group is trained exactly once in
the surviving history, and none is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from hapo.config import HapoConfig
from hapo.transport.base import DATA_FIELD
from hapo.transport.messages import PromptGroup, ScoredTrajectory
from hapo.transport.streams import TRAINER_GROUP, StreamNames
from services.trainer.checkpoint import latest_checkpoint
from services.trainer.resume import issued_key
from tests.helpers import free_port, wait_for
from tests.services.trainer.conftest import ScoredFeeder

HAPO = str(Path(sys.executable).with_name("hapo"))
RUN_ID = "resume"


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _trainer(tiny_model_dir: Path, names: StreamNames, run_dir: Path, log: Path):
    command = [
        HAPO, "trainer", f"model.path={tiny_model_dir}", f"redis.stream_prefix={names.prefix}",
        "actor_rollout_ref.rollout.n=2", "data.train_batch_size=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "data.max_response_length=8", "trainer.rollout_urls=[]", f"trainer.run_dir={run_dir}",
        f"trainer.run_id={RUN_ID}", "trainer.total_steps=5", "trainer.checkpoint_every=2",
        f"api.port={free_port()}", f"trainer.weight_sync_port={free_port()}",
    ]  # fmt: skip
    env = {**os.environ, "HAPO_API_TOKEN": "resume-test-token"}
    with log.open("a") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_restart_trains_each_group_once(
    tiny_model_dir: Path, stream_names: StreamNames, config: HapoConfig, tmp_path: Path
) -> None:
    run_dir, log = tmp_path / "runs", tmp_path / "trainer.log"
    metrics = run_dir / RUN_ID / "metrics.jsonl"
    client = redis.Redis.from_url(config.redis.url)
    names = stream_names

    def pending() -> list[dict]:
        return client.xpending_range(names.scored(RUN_ID), TRAINER_GROUP, "-", "+", 10_000)

    # Groups 1-7 are answered: steps 1-3 train groups 1-6, step 4 waits for group 8 while
    # holding group 7. Checkpoint at step 2; step 3 is trained but not checkpointed.
    feeder = ScoredFeeder(config.redis.url, names, limit=7)
    trainer = _trainer(tiny_model_dir, names, run_dir, log)
    try:
        wait_for(lambda: len(_lines(metrics)) >= 3 or trainer.poll() is not None, 80, "step 3")
        assert trainer.poll() is None, log.read_text()[-3000:]
        wait_for(lambda: len(pending()) == 6, 20, "groups 5-7 pending at the trainer")
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        before = _lines(metrics)
        assert [line["step"] for line in before] == [1, 2, 3]
        assert latest_checkpoint(run_dir / RUN_ID / "checkpoints").name == "step_00000002"
        assert int(client.get(issued_key(names.prefix, RUN_ID))) == 10  # issued up to step 5

        feeder.limit = None
        trainer = _trainer(tiny_model_dir, names, run_dir, log)
        assert trainer.wait(80) == 0, log.read_text()[-3000:]
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(10)
        feeder.close()

    after = _lines(metrics)
    assert [line["step"] for line in after] == [1, 2, 3, 4, 5]
    assert after[:2] == before[:2]  # the checkpointed history survives as it was
    trained = [group for line in after for group in line["data/group_ids"]]
    assert len(trained) == len(set(trained)) == 10  # each group trained once
    lost = before[2]["data/group_ids"]
    assert [g for line in after[2:] for g in line["data/group_ids"] if g in lost] == lost
    assert latest_checkpoint(run_dir / RUN_ID / "checkpoints").name == "step_00000005"

    # Every group was issued once, ids 1..N; those not trained still wait in the pipeline.
    issued = int(client.get(issued_key(names.prefix, RUN_ID)))
    prompts = [
        PromptGroup.from_bytes(fields[DATA_FIELD]).group_id
        for _, fields in client.xrange(names.prompts)
    ]
    assert prompts == [f"{n:08d}" for n in range(1, issued + 1)] and issued == 12
    assert set(trained) == {f"{n:08d}" for n in range(1, 11)}
    group_of = {
        entry_id: ScoredTrajectory.from_bytes(fields[DATA_FIELD]).group_id
        for entry_id, fields in client.xrange(names.scored(RUN_ID))
    }
    waiting = {entry["message_id"] for entry in pending()}
    (info,) = client.xinfo_groups(names.scored(RUN_ID))
    last_delivered = _id(info["last-delivered-id"])
    assert not {group_of[i] for i in waiting} & set(trained)  # no trained group pending
    # The last checkpoint acknowledged the trained groups and trimmed the run's stream below
    # what it still needs: the oldest entry pending, or the first one not yet read.
    keep_from = min((_id(i) for i in waiting), default=(last_delivered[0], last_delivered[1] + 1))
    assert all(_id(i) >= keep_from for i in group_of)
    assert set(trained) - {group_of[i] for i in group_of}  # trained groups' entries are gone
    delivered = {i for i in group_of if _id(i) <= last_delivered}
    assert {group_of[i] for i in delivered - waiting} <= set(trained)
    client.close()


def _id(entry_id: bytes) -> tuple[int, int]:
    millis, sequence = entry_id.split(b"-")
    return int(millis), int(sequence)
