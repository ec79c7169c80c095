"""`hapo up`: the one-command stack on this machine."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from entrypoints import launcher
from hapo.runtime.cpus import format_cpu_list
from hapo.transport.streams import StreamNames
from tests.helpers import free_port, metrics_lines, wait_for

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
    cpus = os.sched_getaffinity(0)
    pinned = max(cpus)
    result = subprocess.run(
        [HAPO, "up", "--steps", "2", "--run-dir", str(tmp_path), "--pin", f"trainer={pinned}",
         *overrides],
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
    # Its output is a pipe, not a terminal: the session's token is not printed there.
    assert "token: not shown (not a terminal)" in result.stdout
    # --pin: the trainer ran on its CPU only, the others where the launcher may run.
    assert f"on CPUs {pinned}\n" in logs["trainer"]
    assert f"on CPUs {format_cpu_list(cpus)}\n" in logs["rollout"]


def _processes() -> dict[int, tuple[int, int, str]]:
    """Every live process now: pid -> (parent pid, process group, start time), from /proc
    (zombies left out: dead, only not yet reaped)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[19])
    return table


def _descendants(pid: int) -> dict[int, str]:
    """The processes below ``pid``: pid -> start time (to tell a reused pid apart)."""
    table, found, frontier = _processes(), {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _, started) in table.items():
            if ppid == parent and child not in found:
                found[child] = started
                frontier.append(child)
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "(gone)"


def _with_marker(marker: str) -> list[str]:
    """Command lines of the processes whose environment holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_sigterm_to_up_stops_every_service_and_leaves_no_process(
    tiny_model_dir: Path, stream_names: StreamNames, tmp_path: Path
) -> None:
    """SIGTERM to the launcher alone: it forwards it, waits for the services' clean stop
    (the trainer checkpoints its last step) and exits; nothing it started is left, vLLM's
    engine core included."""
    marker = f"up-test-{uuid.uuid4().hex}"  # in the environment of all it starts
    overrides = [
        f"model.path={tiny_model_dir}", f"redis.stream_prefix={stream_names.prefix}", "rollout.dtype=float32",
        "rollout.compile_entropy=false", "rollout.max_model_len=256", f"rollout.http_port={free_port()}",
        f"reward.http_port={free_port()}", f"api.port={free_port()}", f"trainer.weight_sync_port={free_port()}",
        "actor_rollout_ref.rollout.n=2", "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "data.max_response_length=8", "trainer.run_id=ghosts",
        "trainer.checkpoint_every=1000",
    ]  # fmt: skip
    out = (tmp_path / "up.out").open("w")
    launcher = subprocess.Popen(
        [HAPO, "up", "--steps", "1000", "--run-dir", str(tmp_path), *overrides],
        stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "UP_TEST_MARKER": marker},
        start_new_session=True,  # the test's own cleanup can kill all of it
    )  # fmt: skip
    run = tmp_path / "ghosts"
    started: dict[int, str] = {}
    try:
        # A trained step: every service, and the rollout's engine core, is up and working.
        wait_for(lambda: len(metrics_lines(run / "metrics.jsonl")) >= 1 or
                 launcher.poll() is not None, 300, "the first step")  # fmt: skip
        assert launcher.poll() is None, (tmp_path / "up.out").read_text()[-3000:]
        started.update(_descendants(launcher.pid))
        names = {pid: _command(pid) for pid in started}
        commands = _with_marker(marker)
        assert len([c for c in commands if " up " in c + " "]) == 1
        for service in ("rollout", "reward", "trainer"):
            assert any(f"hapo {service}" in c for c in commands), (service, commands)
        assert any("VLLM::EngineCore" in c for c in commands), commands
        assert len(started) >= 4  # three services and the engine core, at least

        launcher.send_signal(signal.SIGTERM)  # the launcher alone, not its group
        assert launcher.wait(timeout=300) == 128 + signal.SIGTERM
        now = _processes()
        left = [pid for pid, when in started.items() if pid in now and now[pid][2] == when]
        assert left == [], [(pid, names[pid], _command(pid)) for pid in left]
        assert _with_marker(marker) == []
        # The services stopped cleanly: the trainer checkpointed the step it was on.
        trainer_log = (run / "logs" / "trainer.log").read_text()
        assert "run ghosts stopped after step" in trainer_log, trainer_log[-3000:]
        assert (run / "checkpoints").is_dir()
    finally:  # should the launcher have failed: what is left of ours (start times match)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        now = _processes()
        for pid, when in started.items():
            if pid in now and now[pid][2] == when:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        launcher.wait()
        out.close()


_STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ignored, and by its child too
child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
subprocess.Popen([sys.executable, "-c", child])
print("ready", flush=True)
time.sleep(600)
"""


def test_a_second_signal_kills_the_process_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Services that ignore the forwarded SIGTERM (and their children) are SIGKILLed by
    their process group at the second signal; nothing else ends the wait."""
    monkeypatch.setattr(launcher, "_STOP_TIMEOUT_S", 1e9)
    monkeypatch.setattr(launcher, "_LEFTOVER_GRACE_S", 1e9)
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-c", _STUBBORN], stdout=subprocess.PIPE, start_new_session=True
        )
        for name in ("rollout", "trainer")
    }
    try:
        for process in processes.values():
            assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        started = {}
        for process in processes.values():
            started.update(_descendants(process.pid))
            started[process.pid] = _processes()[process.pid][2]
        assert len(started) == 4
        with launcher._Signals(processes).installed() as signals:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C ...
            assert signals.stop_requested and not signals.forced
            os.kill(os.getpid(), signal.SIGTERM)  # ... and then SIGTERM
            assert signals.forced
            launcher._stop(processes, signals)
        assert [p.returncode for p in processes.values()] == [-signal.SIGKILL] * 2
        now = _processes()
        assert [pid for pid, when in started.items() if now.get(pid, (0, 0, ""))[2] == when] == []
    finally:
        for process in processes.values():
            with contextlib.suppress(ProcessLookupError):
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
            process.wait()
