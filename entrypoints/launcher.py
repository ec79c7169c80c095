"""``hapo up``: the whole stack on one machine, as local processes.

Starts a local Redis if none answers, installs the default model if needed, then runs
``hapo rollout``, ``hapo reward`` and ``hapo trainer`` with the same config, each logging
to ``<run dir>/<run id>/logs/<service>.log``, and shows the run's progress live. It returns
when the trainer's run ends (or on Ctrl-C), stopping the other services cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from hapo.config import MIN_API_TOKEN_CHARS, HapoConfig, env_var_name, mask_url, new_api_token
from hapo.runtime.model_store import install_default_model, is_installed
from hapo.runtime.redis_server import ensure_redis

_COLUMNS = {
    "step": "step",
    "policy_version": "policy",
    "reward/mean": "reward",
    "entropy/mean": "entropy",
    "loss/clipfrac": "clip frac",
    "perf/tokens_per_s": "tokens/s",
    "perf/step_s": "step s",
}
_STOP_TIMEOUT_S = 30.0


def _progress(metrics_file: Path, run_id: str, total_steps: int) -> Table:
    table = Table(title=f"HAPO run {run_id}: {total_steps} steps")
    for title in _COLUMNS.values():
        table.add_column(title, justify="right")
    lines = metrics_file.read_text().splitlines() if metrics_file.exists() else []
    for line in lines[-10:]:
        row = json.loads(line)
        table.add_row(*(f"{row.get(key, float('nan')):.4g}" for key in _COLUMNS))
    return table


def _stop(processes: dict[str, subprocess.Popen]) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for process in processes.values():
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def up(config: HapoConfig, config_file: Path | None, overrides: list[str]) -> int:
    """Run the stack until the trainer finishes; returns the trainer's exit code."""
    console = Console()
    if ensure_redis(config.redis.url, config.model.cache_dir.expanduser() / "redis"):
        console.print(f"started a local Redis at {mask_url(config.redis.url)}")
    if config.model.path is None and not is_installed(config.model.local_path):
        console.print("installing the default model (once) ...")
        install_default_model(config.model.local_path)

    run_id = config.trainer.run_id or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    run_dir = Path(config.trainer.run_dir).expanduser() / run_id
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if config.api.token is None:  # a fresh token for this session's services only
        token = new_api_token()
        assert len(token) >= MIN_API_TOKEN_CHARS
        env[env_var_name("api.token")] = token
    common = [*(["--config", str(config_file)] if config_file else []), *overrides]
    rollout_url = f"http://127.0.0.1:{config.rollout.http_port}"
    commands = {
        "rollout": ["rollout", *common],
        "reward": ["reward", *common],
        "trainer": ["trainer", *common, f"trainer.run_id={run_id}",
                    f"trainer.rollout_urls=[{rollout_url}]"],
    }  # fmt: skip
    hapo = str(Path(sys.executable).with_name("hapo"))
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name, arguments in commands.items():
            log = (logs / f"{name}.log").open("w")
            processes[name] = subprocess.Popen(
                [hapo, *arguments], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        console.print(f"run {run_id}: logs in {logs}")
        metrics_file = run_dir / "metrics.jsonl"
        total = config.trainer.total_steps
        with Live(
            _progress(metrics_file, run_id, total), console=console, refresh_per_second=1
        ) as live:
            while processes["trainer"].poll() is None:
                for name in ("rollout", "reward"):
                    if processes[name].poll() is not None:
                        console.print(
                            f"[red]{name} exited ({processes[name].returncode}); see {logs}"
                        )
                        return 1
                time.sleep(1.0)
                live.update(_progress(metrics_file, run_id, total))
        code = processes["trainer"].returncode
        console.print(f"trainer exited with {code}; metrics in {metrics_file}")
        return code
    except KeyboardInterrupt:
        console.print("stopping ...")
        return 130
    finally:
        _stop(processes)
