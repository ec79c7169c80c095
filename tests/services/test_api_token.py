"""Services whose HTTP routes need ``api.token`` refuse to start without one (or with a
short one), naming the key and how to make a token; the reward worker needs none."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hapo.config import MAKE_API_TOKEN

HAPO = str(Path(sys.executable).with_name("hapo"))


def _start(command: list[str], token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HAPO_API_TOKEN"}
    if token is not None:
        env["HAPO_API_TOKEN"] = token
    return subprocess.run([HAPO, *command], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    "command",
    [
        ["trainer", "trainer.rollout_urls=[]"],
        ["rollout", "rollout.http_port=1"],  # refused before the engine or the port
    ],
    ids=["trainer", "rollout"],
)
@pytest.mark.parametrize("token", [None, "", "hunter2"], ids=["unset", "empty", "short"])
def test_refuses_to_start_without_a_long_token(
    tiny_model_dir: Path, command: list[str], token: str | None
) -> None:
    result = _start([*command, f"model.path={tiny_model_dir}"], token)
    assert result.returncode != 0
    assert "api.token" in result.stderr and "HAPO_API_TOKEN" in result.stderr
    assert MAKE_API_TOKEN in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    if token:
        assert token not in result.stderr
