"""The trainer's control API over HTTP (uvicorn on a free port, real Redis): auth,
validation, limits, and a real run steered through pause, checkpoint, resume and stop."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import wait_for
from tests.services.trainer.conftest import TOKEN, ScoredFeeder, TrainerServer


def test_v1_routes_need_the_bearer_token(trainer_api: TrainerServer) -> None:
    for method, path in [("GET", "/v1/config"), ("GET", "/v1/runs/x"), ("POST", "/v1/runs")]:
        body = {"overrides": []} if method == "POST" else None
        assert trainer_api.request(method, path, body, token=None)[0] == 401
        assert trainer_api.request(method, path, body, token=TOKEN + "x")[0] == 401
        assert trainer_api.request(method, path, body, token="")[0] == 401
    assert trainer_api.request("GET", "/v1/runs/x")[0] == 404  # the right token gets in
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert trainer_api.request("GET", probe, token=None)[0] == 200


def test_config_probes_and_schema(trainer_api: TrainerServer) -> None:
    status, config = trainer_api.request("GET", "/v1/config")
    assert status == 200
    assert config["api"]["token"] == "**********"  # masked
    assert config["trainer"]["exit_after_run"] is True
    assert TOKEN not in json.dumps(config)
    status, readiness = trainer_api.request("GET", "/readyz")
    assert (status, readiness) == (
        200,
        {
            "ready": True,
            "redis": True,
            "active_run": None,
            "stalled": False,
        },
    )
    status, schema = trainer_api.request("GET", "/openapi.json", token=None)
    assert status == 200
    assert {"/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/pause", "/v1/config"} <= set(
        schema["paths"]
    )
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_bad_requests_are_named(trainer_api: TrainerServer) -> None:
    status, body = trainer_api.request("POST", "/v1/runs", {"overrides": ["trainer.totl_steps=3"]})
    assert status == 422
    message = body["detail"][0]["msg"]
    assert "trainer.totl_steps" in message and "trainer.total_steps" in message  # suggestion
    status, body = trainer_api.request("POST", "/v1/runs", {"overrides": ["trainer.total_steps=0"]})
    assert status == 422 and "trainer.total_steps" in body["detail"][0]["msg"]
    status, body = trainer_api.request("POST", "/v1/runs", {"overrides": ["api.token=mine"]})
    assert status == 422 and "api.token" in body["detail"][0]["msg"]
    status, body = trainer_api.request("POST", "/v1/runs", {"overrides": "trainer.total_steps=3"})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "overrides"]
    status, body = trainer_api.request("POST", "/v1/runs", {"overides": []})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "overides"]
    status, body = trainer_api.request("POST", "/v1/runs", data=b"{not json")
    assert status == 422 and body["detail"][0]["type"] == "json_invalid"
    assert trainer_api.request("POST", "/v1/runs/nope/stop")[0] == 404
    huge = {"overrides": ["x" * 4000] * 300}  # ~1.2 MB, over api.max_request_bytes
    status, body = trainer_api.request("POST", "/v1/runs", huge)
    assert status == 413 and str(1 << 20) in body["detail"]
    assert trainer_api.request("GET", "/readyz")[1]["active_run"] is None  # nothing started


def test_run_lifecycle(trainer_api: TrainerServer, feeder: ScoredFeeder, tmp_path: Path) -> None:
    def run() -> dict:
        status, body = trainer_api.request("GET", "/v1/runs/life")
        assert status == 200, body
        return body

    overrides = ["trainer.run_id=life", "trainer.total_steps=1000"]
    status, started = trainer_api.request("POST", "/v1/runs", {"overrides": overrides})
    assert status == 201, started
    assert started["run_id"] == "life" and started["state"] in ("pending", "running")
    assert started["total_steps"] == 1000
    status, body = trainer_api.request("POST", "/v1/runs", {"overrides": []})
    assert status == 409 and "life" in body["detail"]  # one active run per trainer

    wait_for(lambda: run()["step"] >= 1, 60, "the first step")
    first = run()
    assert first["state"] == "running" and first["policy_version"] == first["step"]
    assert first["reward_mean"] == 0.5 and first["tokens_per_s"] > 0
    assert first["entropy_mean"] > 0 and first["error"] is None

    assert trainer_api.request("POST", "/v1/runs/life/pause")[0] == 202
    wait_for(lambda: run()["state"] == "paused", 30, "the pause to take effect")
    paused_at = run()["step"]
    assert trainer_api.request("POST", "/v1/runs/life/checkpoint")[0] == 202
    wait_for(lambda: run()["checkpoint_step"] == paused_at, 30, "the checkpoint")
    assert run()["step"] == paused_at and run()["state"] == "paused"  # no step while paused
    checkpoints = tmp_path / "runs" / "life" / "checkpoints"
    assert (checkpoints / f"step_{paused_at:08d}" / "model.safetensors").is_file()

    assert trainer_api.request("POST", "/v1/runs/life/resume")[0] == 202
    wait_for(lambda: run()["step"] > paused_at, 60, "a step after resuming")
    status, body = trainer_api.request("POST", "/v1/runs/life/stop")
    assert status == 202 and body["state"] in ("stopping", "stopped")
    wait_for(lambda: run()["state"] == "stopped", 60, "the run to stop")
    stopped = run()
    assert stopped["checkpoint_step"] == stopped["step"] > paused_at  # stop checkpoints
    assert (checkpoints / f"step_{stopped['step']:08d}").is_dir()
    assert trainer_api.request("POST", "/v1/runs/life/pause")[0] == 409  # it has ended

    lines = (tmp_path / "runs" / "life" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines]
    assert [line["step"] for line in steps] == list(range(1, stopped["step"] + 1))
    assert -1 <= steps[-1]["entropy/h_hat_p10"] <= steps[-1]["entropy/h_hat_p90"] <= 1

    status, text = trainer_api.request("GET", "/metrics", token=None)
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples["hapo_trainer_step"] == stopped["step"]
    assert samples["hapo_trainer_steps_total"] == stopped["step"]
    assert samples['hapo_trainer_runs_total{state="stopped"}'] == 1
    assert samples['hapo_trainer_reward{stat="mean"}'] == 0.5
    assert samples["hapo_trainer_step_seconds_count"] == stopped["step"]
    tokens = samples['hapo_trainer_h_hat_bucket{le="+Inf"}']
    assert tokens > 0
    assert samples['hapo_trainer_h_hat_bucket{le="1.0"}'] == tokens  # h_hat <= 1
    for label in ("all", "high", "low"):
        assert 0 <= samples[f'hapo_trainer_clip_fraction{{entropy="{label}"}}'] <= 1
    assert samples['hapo_trainer_clip_bound_mean{side="high"}'] > 0

    # A new run may start once the first has ended; stopping it before any step is clean.
    status, second = trainer_api.request("POST", "/v1/runs", {"overrides": ["trainer.run_id=b"]})
    assert status == 201, second
    assert trainer_api.request("POST", "/v1/runs/b/stop")[0] == 202
    wait_for(lambda: trainer_api.request("GET", "/v1/runs/b")[1]["state"] == "stopped", 60, "b")
    assert trainer_api.request("POST", "/v1/runs", {"overrides": ["trainer.run_id=b"]})[0] == 409
