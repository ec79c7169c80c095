"""The run page of the trainer's control API: its files served without auth under a
Content-Security-Policy, the metrics endpoint it polls, and the page itself driven in
headless Chromium (Debian's, through playwright) against a real trainer."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

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


def _chromium() -> str:
    """Debian's chromium (``make setup`` installs it, scripts/install-chromium.sh):
    playwright drives it and downloads no browser of its own."""
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium")
    assert path, "chromium is not installed: run scripts/install-chromium.sh (make setup)"
    return path


@pytest.fixture
def browser_page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        context.close()
        browser.close()


def test_log_in_follow_and_steer_a_run_in_chromium(
    trainer_api: TrainerServer, feeder: ScoredFeeder, browser_page: Page, tmp_path: Path
) -> None:
    page, problems = browser_page, []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on(
        "console",
        lambda message: problems.append(message.text) if "Security" in message.text else None,
    )
    overrides = ["trainer.run_id=page", "trainer.total_steps=1000"]
    assert trainer_api.request("POST", "/v1/runs", {"overrides": overrides})[0] == 201
    page.goto(trainer_api.url + "/")

    page.fill("#token", "a-wrong-token-of-many-chars")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("Wrong token")
    expect(page.locator("#dashboard")).to_be_hidden()

    page.fill("#token", TOKEN)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#runs li[data-run-id=page]")).to_be_visible()
    expect(page.locator("#run-title")).to_have_text("page")
    at_least_3 = re.compile(r"^([3-9]|[1-9][0-9]+)$")
    expect(page.locator("#charts")).to_have_attribute("data-steps", at_least_3)
    reward = page.locator('figure[data-chart=reward] [data-key="reward/mean"] .latest')
    expect(reward).to_have_text("0.5")  # the feeder's rewards alternate 0 and 1
    for chart in ("h_hat", "clipfrac", "rollout_corr", "staleness", "tokens"):
        assert page.locator(f"figure[data-chart={chart}] figcaption [data-key]").count() >= 1

    page.click("#controls button[data-action=pause]")
    expect(page.locator("#run-state")).to_have_text("paused")
    assert trainer_api.request("GET", "/v1/runs/page")[1]["state"] == "paused"
    expect(page.locator("#controls button[data-action=pause]")).to_be_disabled()
    paused_at = trainer_api.request("GET", "/v1/runs/page")[1]["step"]
    page.click("#controls button[data-action=checkpoint]")
    expect(page.locator("#run-checkpoint")).to_have_text(f"step {paused_at}")
    if shot := os.environ.get("RUN_PAGE_SCREENSHOT"):
        page.screenshot(path=shot, full_page=True)

    # The token is in the script's memory only.
    assert TOKEN not in page.url
    assert TOKEN not in page.evaluate("JSON.stringify([localStorage, sessionStorage])")
    assert page.context.cookies() == []
    assert page.locator("#token").input_value() == ""

    page.click("#controls button[data-action=resume]")
    expect(page.locator("#run-state")).to_have_text("running")
    page.click("#controls button[data-action=stop]")
    expect(page.locator("#run-state")).to_have_text("stopped")
    expect(page.locator("#controls button[data-action=stop]")).to_be_disabled()
    assert trainer_api.request("GET", "/v1/runs/page")[1]["state"] == "stopped"

    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()
    assert problems == []  # no script error, nothing the CSP blocked


def test_the_screenshot_script(
    trainer_api: TrainerServer, feeder: ScoredFeeder, tmp_path: Path
) -> None:
    overrides = ["trainer.run_id=shot", "trainer.total_steps=1000"]
    assert trainer_api.request("POST", "/v1/runs", {"overrides": overrides})[0] == 201
    script = Path(__file__).parents[3] / "scripts" / "screenshot_run_page.py"
    env = {**os.environ, "HAPO_API_TOKEN": TOKEN, "CHROMIUM_PATH": _chromium()}

    def shoot(token: str, out: Path) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(script), trainer_api.url + "/", token, str(out)]
        return subprocess.run(
            [*command, "--run", "shot", "--steps", "2"], env=env, capture_output=True,
            text=True, timeout=600,
        )  # fmt: skip

    done = shoot("-", tmp_path / "page.png")  # the token from HAPO_API_TOKEN
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refused = shoot("a-wrong-token-of-many-chars", tmp_path / "no.png")
    assert refused.returncode == 1 and "Wrong token" in refused.stderr
    assert not (tmp_path / "no.png").exists()
