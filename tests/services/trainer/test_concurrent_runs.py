"""Runs at the same time on one Redis: each on its own stream prefix trains exactly its own
groups; a second run's trainer on a prefix in use is refused, naming the key to change."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from hapo.config import HapoConfig
from hapo.transport.streams import StreamNames
from services.trainer.service import lease_key
from tests.helpers import wait_for
from tests.services.trainer.conftest import ScoredFeeder, TrainerServer, trainer_config


@pytest.fixture
def second_names(config: HapoConfig) -> Iterator[StreamNames]:
    """A second prefix of this test's own; its keys are deleted afterwards."""
    names = StreamNames(f"test-{uuid.uuid4().hex[:12]}")
    yield names
    client = redis.Redis.from_url(config.redis.url)
    if keys := list(client.scan_iter(match=f"{names.prefix}:*")):
        client.delete(*keys)
    client.close()


def _run(server: TrainerServer, run_id: str) -> dict:
    status, run = server.request("GET", f"/v1/runs/{run_id}")
    assert status == 200, run
    return run


def _start(server: TrainerServer, run_id: str, steps: int) -> None:
    overrides = [f"trainer.run_id={run_id}", f"trainer.total_steps={steps}"]
    status, body = server.request("POST", "/v1/runs", {"overrides": overrides})
    assert status == 201, body


def test_two_runs_at_once_on_their_own_prefixes_and_a_third_refused(
    tiny_model_dir: Path, stream_names: StreamNames, second_names: StreamNames, tmp_path: Path
) -> None:
    runs_dir = tmp_path / "runs"
    servers = [
        TrainerServer(trainer_config(tiny_model_dir, names, runs_dir)).start()
        for names in (stream_names, second_names, stream_names)
    ]
    feeders = [ScoredFeeder(servers[0].config.redis.url, n) for n in (stream_names, second_names)]
    client = redis.Redis.from_url(servers[0].config.redis.url)
    try:
        # "a" and "b" at once, then "c" on a's prefix. The models load one at a time: the
        # servers share this process, and transformers' loading is not thread-safe.
        _start(servers[0], "a", 1000)
        wait_for(lambda: _run(servers[0], "a")["step"] >= 1, 120, "run a to step 1")
        _start(servers[1], "b", 3)
        wait_for(lambda: _run(servers[1], "b")["step"] >= 1, 120, "run b to step 1")
        assert client.get(lease_key(stream_names.prefix)) == b"a"
        _start(servers[2], "c", 3)
        wait_for(lambda: _run(servers[2], "c")["state"] == "failed", 60, "run c refused")
        error = _run(servers[2], "c")["error"]
        assert error.startswith("StreamPrefixInUse: redis.stream_prefix")
        assert f"'{stream_names.prefix}' is in use by run a" in error
        wait_for(lambda: _run(servers[1], "b")["state"] == "finished", 120, "run b to finish")
        assert servers[0].request("POST", "/v1/runs/a/stop")[0] == 202
        wait_for(lambda: _run(servers[0], "a")["state"] == "stopped", 60, "run a to stop")
        assert client.get(lease_key(stream_names.prefix)) is None  # released: no wait

        for run_id in ("a", "b"):
            lines = (runs_dir / run_id / "metrics.jsonl").read_text().splitlines()
            groups = [group for line in lines for group in json.loads(line)["data/group_ids"]]
            assert groups and len(groups) == len(set(groups)), run_id  # each once
            assert all(json.loads(line)["data/duplicates"] == 0 for line in lines), run_id
        assert not (runs_dir / "c" / "metrics.jsonl").exists()
    finally:
        client.close()
        for feeder in feeders:
            feeder.close()
        for server in servers:
            server.close()
