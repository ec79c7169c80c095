"""``hapo up``: the whole stack on one machine, as local processes.

Starts a local Redis if none answers, installs the default model if needed, then runs
``hapo rollout``, ``hapo reward`` and ``hapo trainer`` with the same config, each logging
to ``<run dir>/<run id>/logs/<service>.log``, and shows the run's progress live. It returns
when the trainer's run ends, stopping the other services cleanly.

No ghosts: each service runs in a process group of its own (so vLLM's engine core is in
its rollout's group), and dies with the launcher (``PR_SET_PDEATHSIG``). SIGINT (Ctrl-C)
or SIGTERM to the launcher is forwarded to the services as SIGTERM; the launcher waits for
their clean stop (the trainer finishes its step and checkpoints), then kills whatever is
left in their groups and exits with 128 + the signal's number. A second signal, or
``_STOP_TIMEOUT_S`` without a stop, kills the groups at once.

``--pin SERVICE=CPUS`` (``pins``) runs a service, and all it starts, on those CPUs only
(``hapo.runtime.cpus``): on one machine, the way to give rollout and learner compute of
their own, as separate accelerators would.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.live import Live
from rich.table import Table

from hapo.config import MIN_API_TOKEN_CHARS, HapoConfig, env_var_name, mask_url, new_api_token
from hapo.runtime.cpus import allowed_cpus, format_cpu_list, parse_cpu_list
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
_STOP_TIMEOUT_S = 120.0
"""How long the services get to stop cleanly (the trainer finishes its step first)."""
_LEFTOVER_GRACE_S = 5.0
"""How long what a stopped service left in its process group gets before SIGKILL."""
_PR_SET_PDEATHSIG = 1
SERVICES = ("rollout", "reward", "trainer")
"""What ``hapo up`` starts, in this order."""


def parse_pins(values: list[str]) -> dict[str, frozenset[int]]:
    """``["rollout=0", "trainer=1-3"]`` -> each service's CPUs.

    Raises:
        ValueError: a value is not ``SERVICE=CPUS``, names no service of ``SERVICES`` or
            one twice, or a CPU this process may not use (the message names the value).
    """
    if values and not hasattr(os, "sched_setaffinity"):
        raise ValueError("--pin needs an OS that can pin processes to CPUs (Linux)")
    allowed = allowed_cpus()
    pins: dict[str, frozenset[int]] = {}
    for value in values:
        service, equals, cpus_text = value.partition("=")
        if not equals or service not in SERVICES:
            raise ValueError(f"--pin {value!r}: expected SERVICE=CPUS, SERVICE one of {SERVICES}")
        if service in pins:
            raise ValueError(f"--pin {value!r}: {service} is pinned twice")
        try:
            cpus = parse_cpu_list(cpus_text)
        except ValueError as exc:
            raise ValueError(f"--pin {value!r}: {exc}") from None
        if not cpus <= allowed:
            raise ValueError(
                f"--pin {value!r}: CPUs {format_cpu_list(cpus - allowed)} are not among "
                f"this process's CPUs ({format_cpu_list(allowed)})"
            )
        pins[service] = cpus
    return pins


def _progress(metrics_file: Path, run_id: str, total_steps: int) -> Table:
    table = Table(title=f"HAPO run {run_id}: {total_steps} steps")
    for title in _COLUMNS.values():
        table.add_column(title, justify="right")
    lines = metrics_file.read_text().splitlines() if metrics_file.exists() else []
    for line in lines[-10:]:
        row = json.loads(line)
        table.add_row(*(f"{row.get(key, float('nan')):.4g}" for key in _COLUMNS))
    return table


_FORWARDED = (signal.SIGINT, signal.SIGTERM)


class _Signals:
    """SIGINT and SIGTERM while installed: the first asks for a stop, the second kills the
    services' process groups there and then."""

    def __init__(self, processes: dict[str, subprocess.Popen]) -> None:
        self.processes = processes
        self.received: list[int] = []

    @property
    def stop_requested(self) -> bool:
        return bool(self.received)

    @property
    def forced(self) -> bool:
        return len(self.received) > 1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.forced:
            _kill_groups(self.processes)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Signals]:
        previous = {signum: signal.signal(signum, self._handle) for signum in _FORWARDED}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def service_preexec(launcher: int, cpus: frozenset[int] | None) -> None:
    """In the child before ``exec``: SIGTERM when the launcher dies, however it dies; and
    its CPUs, when pinned (inherited by all it starts)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != launcher:  # the launcher died before prctl took effect
        os._exit(1)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def _kill_groups(processes: dict[str, subprocess.Popen]) -> None:
    """SIGKILL every service's process group (the service and what it started)."""
    for process in processes.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def _alive_groups(processes: dict[str, subprocess.Popen]) -> list[int]:
    """The services' process groups that still have a member."""
    alive = []
    for process in processes.values():
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:  # a member we may not signal: it is there all the same
            pass
        alive.append(process.pid)
    return alive


def _wait_groups(processes: dict[str, subprocess.Popen], seconds: float, signals: _Signals) -> None:
    deadline = time.monotonic() + seconds
    while _alive_groups(processes) and time.monotonic() < deadline and not signals.forced:
        time.sleep(0.1)


def _stop(processes: dict[str, subprocess.Popen], signals: _Signals) -> None:
    """SIGTERM each running service and wait for all of them to exit (a second signal or
    ``_STOP_TIMEOUT_S`` kills them); give what they leave in their process groups a moment
    to finish (multiprocessing's resource tracker cleans up after its parent), then kill
    it, and return once the groups are empty."""
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    # Poll once a round: a service may exit between two looks at it.
    while running := next((p for p in processes.values() if p.poll() is None), None):
        if signals.forced or time.monotonic() > deadline:
            _kill_groups(processes)
        with contextlib.suppress(subprocess.TimeoutExpired):
            running.wait(timeout=0.2)
    _wait_groups(processes, _LEFTOVER_GRACE_S, signals)
    _kill_groups(processes)  # e.g. an engine core its service left behind
    deadline = time.monotonic() + _LEFTOVER_GRACE_S
    while _alive_groups(processes) and time.monotonic() < deadline:
        time.sleep(0.1)


def up(
    config: HapoConfig,
    config_file: Path | None,
    overrides: list[str],
    pins: dict[str, frozenset[int]] | None = None,
) -> int:
    """Run the stack until the trainer finishes; returns the trainer's exit code (1 if
    another service failed, 128 + the signal's number if SIGINT or SIGTERM stopped it).
    ``pins``: CPUs of the services named (``parse_pins``); the others run anywhere."""
    console = Console()
    if ensure_redis(
        config.redis.url,
        config.model.cache_dir.expanduser() / "redis",
        password=config.redis.password,
    ):
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
    processes: dict[str, subprocess.Popen] = {}
    pins = pins or {}
    for name, cpus in pins.items():
        console.print(f"{name} pinned to CPUs {format_cpu_list(cpus)}")
    with _Signals(processes).installed() as signals:
        try:
            _start(commands, env, logs, processes, signals, pins)
            console.print(f"run {run_id}: logs in {logs}")
            host = "127.0.0.1" if config.api.host in ("0.0.0.0", "::") else config.api.host
            if config.api.token is not None:
                token = "your api.token"
            elif console.is_terminal:
                token = env[env_var_name("api.token")]
            else:  # output to a file is a log, and secrets stay out of logs
                token = f"not shown (not a terminal); set {env_var_name('api.token')}"
            console.print(f"run page: http://{host}:{config.api.port}/  token: {token}")
            metrics_file = run_dir / "metrics.jsonl"
            total = config.trainer.total_steps
            with Live(
                _progress(metrics_file, run_id, total), console=console, refresh_per_second=1
            ) as live:
                while not signals.stop_requested and processes["trainer"].poll() is None:
                    for name in ("rollout", "reward"):
                        if processes[name].poll() is not None:
                            code = processes[name].returncode
                            console.print(f"[red]{name} exited ({code}); see {logs}")
                            return 1
                    time.sleep(1.0)  # the loop sees a signal within a second
                    live.update(_progress(metrics_file, run_id, total))
            if signals.stop_requested:
                return 128 + signals.received[0]
            code = processes["trainer"].returncode
            console.print(f"trainer exited with {code}; metrics in {metrics_file}")
            return code
        finally:
            if signals.stop_requested:
                console.print("stopping the services (a second Ctrl-C kills them) ...")
            _stop(processes, signals)


def _start(
    commands: dict[str, list[str]],
    env: dict[str, str],
    logs: Path,
    processes: dict[str, subprocess.Popen],
    signals: _Signals,
    pins: dict[str, frozenset[int]],
) -> None:
    """Start each service in a session (and process group) of its own; all of them, unless
    a signal asks for a stop first (then the stop returns before the loop)."""
    hapo = str(Path(sys.executable).with_name("hapo"))
    linux = sys.platform == "linux"
    for name, arguments in commands.items():
        if signals.stop_requested:
            return
        preexec = functools.partial(service_preexec, os.getpid(), pins.get(name))
        with (logs / f"{name}.log").open("w") as log:
            processes[name] = subprocess.Popen(
                [hapo, *arguments], stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=preexec if linux else None,
            )  # fmt: skip
