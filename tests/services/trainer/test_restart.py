"""A deployed trainer restarted (its container or pod) continues its run: the deployments
fix ``trainer.run_id`` and keep serving after the run (``trainer.exit_after_run`` false),
so that a restart neither starts a fresh run from base weights nor loops on a finished one."""

from __future__ import annotations

import json
from pathlib import Path

from hapo.transport.streams import StreamNames
from tests.helpers import wait_for
from tests.services.trainer.conftest import ScoredFeeder, TrainerServer, trainer_config


def _finished(server: TrainerServer) -> bool:
    status, run = server.request("GET", "/v1/runs/deployed")
    return status == 200 and run["state"] == "finished"


def test_a_restarted_deployed_trainer_continues_its_run_and_keeps_serving(
    tiny_model_dir: Path, stream_names: StreamNames, tmp_path: Path
) -> None:
    base = trainer_config(tiny_model_dir, stream_names, tmp_path / "runs")
    overrides = {"run_id": "deployed", "total_steps": 2, "exit_after_run": False,
                 "checkpoint_every": 1}  # fmt: skip
    config = base.model_copy(update={"trainer": base.trainer.model_copy(update=overrides)})
    metrics = tmp_path / "runs" / "deployed" / "metrics.jsonl"
    feeder = ScoredFeeder(config.redis.url, stream_names)
    try:
        for start in ("first", "restart"):
            server = TrainerServer(config, start_run=True).start()
            try:
                wait_for(lambda s=server: _finished(s), 120, f"the run to finish ({start})")
                run = server.request("GET", "/v1/runs/deployed")[1]
                assert run["step"] == 2, start
                steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
                assert steps == [1, 2], start  # the restart trained nothing again
                assert server.request("GET", "/healthz")[0] == 200  # still serving
                assert server.exit_code is None
            finally:
                server.close()
            assert server.exit_code == 0
    finally:
        feeder.close()
