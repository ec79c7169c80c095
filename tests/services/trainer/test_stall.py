"""The trainer's ``/readyz`` reports a stalled run (the real API and trainer loop, a feeder
of scored samples through the real Redis): not ready once the running run has made no step
for ``trainer.stall_factor`` times its median step time; ready again while paused and once
the run ends; ``/healthz`` answers all along."""

from __future__ import annotations

from hapo.transport.streams import StreamNames
from tests.helpers import wait_for
from tests.services.trainer.conftest import ScoredFeeder, TrainerServer


def test_readyz_reports_a_stalled_run(
    trainer_api: TrainerServer, stream_names: StreamNames
) -> None:
    # Steps 1 and 2 get their groups (1-4); step 3's (5, 6) are held back: the run stalls.
    feeder = ScoredFeeder(trainer_api.config.redis.url, stream_names, limit=4)
    try:
        overrides = ["trainer.run_id=stall", "trainer.total_steps=3", "trainer.stall_factor=1"]
        status, body = trainer_api.request("POST", "/v1/runs", {"overrides": overrides})
        assert status == 201, body
        run = lambda: trainer_api.request("GET", "/v1/runs/stall")[1]  # noqa: E731
        readyz = lambda: trainer_api.request("GET", "/readyz", token=None)  # noqa: E731
        wait_for(lambda: run()["step"] == 2, 120, "step 2")
        wait_for(lambda: readyz()[0] == 503, 120, "/readyz to report the stall")
        status, body = readyz()
        assert (status, body["ready"], body["stalled"], body["redis"]) == (503, False, True, True)
        assert body["active_run"] == "stall"
        assert trainer_api.request("GET", "/healthz", token=None)[0] == 200
        assert run()["step"] == 2 and run()["state"] == "running"

        assert trainer_api.request("POST", "/v1/runs/stall/pause")[0] == 202
        wait_for(lambda: run()["state"] == "paused", 60, "the pause")
        status, body = readyz()
        assert (status, body["stalled"]) == (200, False)  # a paused run is not stalled

        feeder.limit = None
        assert trainer_api.request("POST", "/v1/runs/stall/resume")[0] == 202
        wait_for(lambda: run()["state"] in ("finished", "failed", "stopped"), 120, "the end")
        assert (run()["state"], run()["step"]) == ("finished", 3), run()
        status, body = readyz()
        assert (status, body["stalled"]) == (200, False)
    finally:
        feeder.close()
