"""The run page of the trainer's control API: its files served without auth under a
Content-Security-Policy, and the metrics endpoint it polls, against a real trainer."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from services.trainer.api import read_metrics
from tests.helpers import wait_for
from tests.services.trainer.conftest import TOKEN, ScoredFeeder, TrainerServer


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, dict(response.headers), response.read()


def test_the_page_is_served_without_auth_under_a_csp(trainer_api: TrainerServer) -> None:
    status, headers, body = _get(trainer_api.url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'<script src="static/app.js" defer>' in body
    assert b'type="password"' in body
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self'" in csp and "form-action 'none'" in csp
    assert "unsafe" not in csp  # no inline script or style, no eval
    assert headers["x-content-type-options"] == "nosniff"
    for path, kind in [("static/app.js", "javascript"), ("static/style.css", "text/css")]:
        status, headers, body = _get(f"{trainer_api.url}/{path}")
        assert status == 200 and kind in headers["content-type"] and body
        assert headers["content-security-policy"] == csp
    _, _, script = _get(trainer_api.url + "/static/app.js")
    for keeps_the_token in (b"localStorage", b"sessionStorage", b"document.cookie", b"?token"):
        assert keeps_the_token not in script
    status, schema = trainer_api.request("GET", "/openapi.json", token=None)
    assert "/" not in schema["paths"]  # the page is not part of the API
    assert {"/v1/runs/{run_id}/metrics"} <= set(schema["paths"])


def test_read_metrics_leaves_a_partial_line_and_nulls_nan(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "reward/mean": s / 10, "loss/x": float("nan")} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 4, "rew')
    assert [line["step"] for line in read_metrics(path, 0, 100)] == [1, 2, 3]
    assert read_metrics(path, 1, 100)[0] == {"step": 2, "reward/mean": 0.2, "loss/x": None}
    assert [line["step"] for line in read_metrics(path, 0, 2)] == [1, 2]
    assert read_metrics(path, 3, 100) == []
    assert read_metrics(tmp_path / "missing.jsonl", 0, 100) == []


def test_metrics_of_a_run_since_a_step(
    trainer_api: TrainerServer, feeder: ScoredFeeder, tmp_path: Path
) -> None:
    overrides = ["trainer.run_id=m", "trainer.total_steps=3"]
    status, body = trainer_api.request("POST", "/v1/runs", {"overrides": overrides})
    assert status == 201, body
    run = lambda: trainer_api.request("GET", "/v1/runs/m")[1]  # noqa: E731
    wait_for(lambda: run()["state"] in ("finished", "failed"), 120, "the run to end")
    assert run()["state"] == "finished", run()["error"]

    written = (tmp_path / "runs" / "m" / "metrics.jsonl").read_text().splitlines()
    status, page = trainer_api.request("GET", "/v1/runs/m/metrics")
    assert status == 200
    assert page == {"run_id": "m", "lines": [json.loads(line) for line in written], "last_step": 3}
    status, page = trainer_api.request("GET", "/v1/runs/m/metrics?since=2")
    assert [line["step"] for line in page["lines"]] == [3] and page["last_step"] == 3
    status, page = trainer_api.request("GET", "/v1/runs/m/metrics?since=0&limit=2")
    assert [line["step"] for line in page["lines"]] == [1, 2] and page["last_step"] == 2
    status, page = trainer_api.request("GET", "/v1/runs/m/metrics?since=3")
    assert (page["lines"], page["last_step"]) == ([], 3)
    assert trainer_api.request("GET", "/v1/runs/m/metrics?since=-1")[0] == 422
    assert trainer_api.request("GET", "/v1/runs/nope/metrics")[0] == 404
    assert trainer_api.request("GET", "/v1/runs/m/metrics", token=None)[0] == 401
    assert trainer_api.request("GET", "/v1/runs/m/metrics", token=TOKEN[:-1] + "x")[0] == 401

    status, runs = trainer_api.request("GET", "/v1/runs")
    assert status == 200 and [r["run_id"] for r in runs] == ["m"]
    assert runs[0]["state"] == "finished" and runs[0]["step"] == 3
    assert trainer_api.request("GET", "/v1/runs", token=None)[0] == 401
