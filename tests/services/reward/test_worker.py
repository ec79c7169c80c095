"""Reward workers as real processes (`hapo reward`) against a real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from tokenizers import Tokenizer

from hapo.config import HapoConfig
from hapo.scoring.rewards import math_reward
from hapo.transport.base import DATA_FIELD
from hapo.transport.messages import DeadLetter, ScoredTrajectory, Trajectory
from hapo.transport.streams import StreamNames
from tests.helpers import free_port, wait_for

HAPO = str(Path(sys.executable).with_name("hapo"))
RUN_ID = "test"


@pytest.fixture
def client(config: HapoConfig) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(config.redis.url)
    yield client
    client.close()


@pytest.fixture
def tokenizer(config: HapoConfig) -> Tokenizer:
    return Tokenizer.from_file(str(config.model.local_path / "tokenizer.json"))


@pytest.fixture
def start_worker(
    stream_names: StreamNames, tmp_path: Path
) -> Iterator[Callable[..., subprocess.Popen]]:
    processes: list[subprocess.Popen] = []

    def start(consumer: str, *overrides: str) -> subprocess.Popen:
        log = (tmp_path / f"{consumer}.log").open("w")
        command = [
            HAPO,
            "reward",
            f"redis.stream_prefix={stream_names.prefix}",
            "--consumer",
            consumer,
            *overrides,
        ]
        # The test scorers live in tests/: put the repository on the workers' path.
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def consumer_names(client: redis.Redis, stream: str) -> set[str]:
    try:
        return {c["name"].decode() for c in client.xinfo_consumers(stream, "reward")}
    except redis.ResponseError:
        return set()


def trajectory(tokenizer: Tokenizer, group: int, sample: int, text: str, answer: str) -> Trajectory:
    ids = np.array(tokenizer.encode(text).ids, dtype=np.int32)
    return Trajectory(
        run_id=RUN_ID, group_id=f"g{group}", sample_idx=sample, n=8, policy_version=0, policy_version_end=0,
        prompt_ids=np.arange(4), response_ids=ids, logprobs=np.full(len(ids), -0.5), finish_reason="stop",
        answer=answer,
    )  # fmt: skip


def scored(client: redis.Redis, names: StreamNames) -> list[ScoredTrajectory]:
    return [
        ScoredTrajectory.from_bytes(fields[DATA_FIELD])
        for _, fields in client.xrange(names.scored(RUN_ID))
    ]


def test_scores_dead_letters_and_reports(client, tokenizer, start_worker, stream_names) -> None:
    port = free_port()
    worker = start_worker("w1", f"reward.http_port={port}")
    cases = [(f"We add them: {i} + 2 = {i + 2}.", str(i + 2 if i % 3 else i)) for i in range(20)]
    sent = [
        trajectory(tokenizer, i // 8, i % 8, text, answer) for i, (text, answer) in enumerate(cases)
    ]
    for message in sent:
        client.xadd(stream_names.trajectories, {DATA_FIELD: message.to_bytes()})
    long_text = "Let me think. " * 70_000 + "The answer is 5."  # ~1 MB of text
    long_one = trajectory(tokenizer, 9, 0, long_text, "5")
    client.xadd(stream_names.trajectories, {DATA_FIELD: long_one.to_bytes()})
    client.xadd(stream_names.trajectories, {DATA_FIELD: b"\xc1 not msgpack"})
    client.xadd(stream_names.trajectories, {b"wrong": b"field"})

    wait_for(
        lambda: (
            client.xlen(stream_names.scored(RUN_ID)) >= 21 and client.xlen(stream_names.dead) >= 2
        ),
        60,
        "scores",
    )
    results = {message.key: message for message in scored(client, stream_names)}
    assert len(results) == 21
    assert (results[long_one.key].reward, results[long_one.key].reward_reason) == (1.0, "correct")
    for message, (_text, answer) in zip(sent, cases, strict=True):
        expected = math_reward(tokenizer.decode(message.response_ids.tolist()), answer)
        assert (results[message.key].reward, results[message.key].reward_reason) == expected
        np.testing.assert_array_equal(results[message.key].logprobs, message.logprobs)
    reasons = sorted(
        DeadLetter.from_bytes(fields[DATA_FIELD]).reason
        for _, fields in client.xrange(stream_names.dead)
    )
    assert reasons[0].startswith("no 'data' field") and reasons[1].startswith("undecodable msgpack")
    assert client.xpending(stream_names.trajectories, "reward")["pending"] == 0

    base = f"http://127.0.0.1:{port}"
    assert json.loads(urllib.request.urlopen(f"{base}/healthz").read()) == {"status": "ok"}
    assert json.loads(urllib.request.urlopen(f"{base}/readyz").read())["ready"] is True
    metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
    assert "hapo_reward_dead_lettered_total 2.0" in metrics
    assert 'hapo_reward_scored_total{reason="correct"}' in metrics
    assert "hapo_reward_latency_seconds_count 21.0" in metrics

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0


@pytest.mark.slow
def test_unimportable_scorer_fails_at_start(start_worker, tmp_path) -> None:
    worker = start_worker("bad", "reward.scorer=no_such_module:score", "reward.http_port=0")
    assert worker.wait(timeout=60) != 0
    assert "No module named 'no_such_module'" in (tmp_path / "bad.log").read_text()


@pytest.mark.slow
def test_sigkill_mid_batch_loses_nothing(client, tokenizer, start_worker, stream_names) -> None:
    settings = ["reward.scorer=tests.services.reward.scorers:slow", "reward.batch_size=16",
                "reward.reclaim_idle_s=1.5", "reward.http_port=0"]  # fmt: skip
    victim = start_worker("victim", *settings)
    survivor = start_worker("survivor", *settings)
    wait_for(
        lambda: {"victim", "survivor"} <= consumer_names(client, stream_names.trajectories),
        60,
        "workers",
    )
    sent = [trajectory(tokenizer, i // 8, i % 8, f"so {i}", str(i)) for i in range(320)]
    pipe = client.pipeline()
    for message in sent:
        pipe.xadd(stream_names.trajectories, {DATA_FIELD: message.to_bytes()})
    pipe.execute()

    def victim_mid_batch() -> bool:
        pending = {
            c["name"]: c["pending"]
            for c in client.xinfo_consumers(stream_names.trajectories, "reward")
        }
        return pending[b"victim"] > 0 and client.xlen(stream_names.scored(RUN_ID)) > 32

    wait_for(victim_mid_batch, 60, "the victim to hold a batch")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    wait_for(
        lambda: len({m.key for m in scored(client, stream_names)}) == len(sent),
        120,
        "every trajectory",
    )

    copies: dict = defaultdict(list)
    for message in scored(client, stream_names):
        copies[message.key].append(message)
    assert set(copies) == {message.key for message in sent}  # none lost
    for key, messages in copies.items():  # redelivered duplicates are the same sample
        assert {(m.reward, m.response_ids.tobytes()) for m in messages} == {
            (messages[0].reward, messages[0].response_ids.tobytes())
        }, key
    assert all(m.reward == 1.0 for messages in copies.values() for m in messages)
    assert client.xpending(stream_names.trajectories, "reward")["pending"] == 0
    assert survivor.poll() is None


@pytest.mark.slow
def test_one_bad_trajectory_is_dead_lettered_and_the_worker_goes_on(
    client, tokenizer, start_worker, stream_names
) -> None:
    """A trajectory whose tokens do not decode (a negative id fails the tokenizer for the
    whole batch) and ones whose score cannot be published (not a number, NaN) each go to the
    dead letters with the reason; the rest of their batch is scored, and so are later batches."""
    worker = start_worker(
        "w", "reward.scorer=tests.services.reward.scorers:bad_score", "reward.http_port=0"
    )
    good = [trajectory(tokenizer, 0, i, f"fine {i}", "1") for i in range(3)]
    undecodable = trajectory(tokenizer, 0, 3, "x", "1").model_copy(
        update={"response_ids": np.array([-7, 5], dtype=np.int32), "logprobs": np.zeros(2)}
    )
    unpublishable = trajectory(tokenizer, 0, 4, "bad score", "1")
    not_finite = trajectory(tokenizer, 0, 5, "nan score", "1")
    batch = [good[0], undecodable, good[1], unpublishable, not_finite, good[2]]
    pipe = client.pipeline()  # one batch
    ids = {}
    for message in batch:
        pipe.xadd(stream_names.trajectories, {DATA_FIELD: message.to_bytes()})
    for message, entry_id in zip(batch, pipe.execute(), strict=True):
        ids[message.sample_idx] = entry_id.decode()
    wait_for(lambda: client.xlen(stream_names.dead) >= 3, 60, "the dead letters")
    letters = {
        letter.source_id: letter.reason
        for letter in (
            DeadLetter.from_bytes(fields[DATA_FIELD])
            for _, fields in client.xrange(stream_names.dead)
        )
    }
    assert letters.keys() == {ids[3], ids[4], ids[5]}
    assert letters[ids[3]] == (
        "cannot decode the response's tokens: ValueError: token id -7 is outside the "
        f"tokenizer's vocabulary [0, {tokenizer.get_vocab_size(with_added_tokens=True)})"
    )
    assert letters[ids[4]].startswith("scoring failed: ValidationError")
    assert "reward" in letters[ids[4]]
    assert letters[ids[5]].startswith("scoring failed: ValidationError")
    assert "reward" in letters[ids[5]] and "finite" in letters[ids[5]]
    wait_for(lambda: client.xlen(stream_names.scored(RUN_ID)) >= 3, 60, "the good ones")
    assert {m.sample_idx for m in scored(client, stream_names)} == {0, 1, 2}

    later = trajectory(tokenizer, 1, 0, "later", "1")  # the worker is still at work
    client.xadd(stream_names.trajectories, {DATA_FIELD: later.to_bytes()})
    wait_for(lambda: client.xlen(stream_names.scored(RUN_ID)) >= 4, 60, "a later batch")
    assert worker.poll() is None
    assert client.xpending(stream_names.trajectories, "reward")["pending"] == 0


@pytest.mark.slow
def test_input_is_trimmed_and_each_runs_scores_go_to_its_own_stream(
    client, tokenizer, start_worker, stream_names
) -> None:
    """The worker trims its input once scored (a run of days keeps Redis's memory bounded)
    and publishes each score to its run's stream, which that run's trainer reads and trims
    (tests/services/trainer/test_resume.py): runs never see each other's samples."""
    start_worker("w", "reward.http_port=0")
    for i in range(4):
        message = trajectory(tokenizer, 0, i, f"so {i}", str(i))
        if i == 3:
            message = message.model_copy(update={"run_id": "other-run"})
        client.xadd(stream_names.trajectories, {DATA_FIELD: message.to_bytes()})
    wait_for(lambda: client.xlen(stream_names.scored(RUN_ID)) == 3, 60, "the scores")
    wait_for(lambda: client.xlen(stream_names.trajectories) == 0, 60, "the input trimmed")
    assert {m.sample_idx for m in scored(client, stream_names)} == {0, 1, 2}
    ((_, fields),) = client.xrange(stream_names.scored("other-run"))
    assert ScoredTrajectory.from_bytes(fields[DATA_FIELD]).sample_idx == 3
