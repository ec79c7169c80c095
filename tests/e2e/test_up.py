"""`hapo up`: the one-command stack on this machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hapo.transport.streams import StreamNames
from tests.helpers import free_port

HAPO = str(Path(sys.executable).with_name("hapo"))


@pytest.mark.slow
def test_up_runs_exactly_the_requested_steps(
    tiny_model_dir: Path, stream_names: StreamNames, tmp_path: Path
) -> None:
    overrides = [
        f"model.path={tiny_model_dir}", f"redis.stream_prefix={stream_names.prefix}", "rollout.dtype=float32",
        "rollout.compile_entropy=false", "rollout.max_model_len=256", f"rollout.http_port={free_port()}",
        f"reward.http_port={free_port()}", f"api.port={free_port()}", f"trainer.weight_sync_port={free_port()}",
        "actor_rollout_ref.rollout.n=2", "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "data.max_response_length=8", "trainer.run_id=up",
    ]  # fmt: skip
    result = subprocess.run(
        [HAPO, "up", "--steps", "2", "--run-dir", str(tmp_path), *overrides],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    run = tmp_path / "up"
    logs = {
        name: (run / "logs" / f"{name}.log").read_text()
        for name in ("rollout", "reward", "trainer")
    }
    assert result.returncode == 0, result.stdout[-2000:] + logs["trainer"][-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert "trainer exited with 0" in result.stdout
    # `hapo up` made a token for the session; services log the config with it masked.
    assert '"token":"**********"' in logs["trainer"] and '"token":"**********"' in logs["rollout"]
