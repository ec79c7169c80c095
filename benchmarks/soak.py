"""A long run of the whole stack with bad input and SIGKILLs mixed in, and what it cost.

    hapo bench soak [--steps 100] [--kills 6] [--inject-every 20] [--seed 0]
                    [--model PATH] [--out runs/soak] [--base-port 18300]

Starts a private ``redis-server`` (AOF, fsync always) and ``hapo rollout``, ``hapo reward``
and ``hapo trainer`` as processes, each in a process group of its own, on a tiny
configuration (2 groups of 2 samples a step, 8 tokens, ``max_staleness`` 0, checkpoints
every 5 steps; the default model unless ``--model``), and trains run ``soak`` for
``--steps`` steps. Meanwhile:

- after step 1 and every ``--inject-every`` steps (the last excepted) it writes one entry
  of each kind of
  ``benchmarks.bad_input`` into the stream it targets;
- at ``--kills`` moments drawn with ``--seed`` it SIGKILLs the process group of a drawn
  service (rollout, reward or trainer) and starts it again at once (the trainer resumes
  its run from its checkpoint).

Reports the steps completed, prompt groups lost (issued ids that were neither trained nor
abandoned; with ``max_staleness`` 0 the run must train ids ``1..steps x 2``), groups
trained twice, groups abandoned, dead letters by stream and reason (the injected ones
must all be there), and Redis at the first and the last step: ``used_memory`` and the
length of each stream. Writes ``OUT/soak.json`` and ``OUT/logs/``; last line:
{"bench": "soak", "steps": N, "lost_groups": 0, "trained_twice": 0, ...}
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from benchmarks.bad_input import BadEntry, bad_entries
from hapo.config import load_config
from hapo.report import read_metrics
from hapo.runtime.redis_server import redis_answers, server_command
from hapo.transport.base import DATA_FIELD
from hapo.transport.messages import DeadLetter
from hapo.transport.streams import StreamNames

RUN_ID = "soak"
PREFIX = "soak"
BATCH, N = 2, 2
MAX_MODEL_LEN = 256
STEP_TIMEOUT_S = 300
"""Longest wait for one step (a killed rollout's vLLM engine restarts in under a minute)."""
SERVICES = ("rollout", "reward", "trainer")


class Stack:
    """The private Redis and the three services, as this process's children."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.out).resolve()  # redis-server chdirs to its dir
        self.logs = self.out / "logs"
        self.redis_port, self.rollout_port = args.base_port, args.base_port + 1
        self.api_port, self.sync_port = args.base_port + 2, args.base_port + 10
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.env = {**os.environ, "HAPO_API_TOKEN": secrets.token_urlsafe(24)}
        self.processes: dict[str, subprocess.Popen] = {}

    def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("hapo bench soak: redis-server is not installed")
        command = server_command(
            binary, "127.0.0.1", self.redis_port, self.out / "redis", daemonize=False,
            appendfsync="always",
        )  # fmt: skip
        self.processes["redis"] = subprocess.Popen(command, start_new_session=True)

    def command(self, name: str) -> list[str]:
        args = self.args
        common = [
            f"redis.url={self.redis_url}", f"redis.stream_prefix={PREFIX}",
            f"actor_rollout_ref.rollout.n={N}", f"data.train_batch_size={BATCH}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={BATCH}",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "data.max_response_length=8", "trainer.max_staleness=0", "rollout.dtype=float32",
            *([f"model.path={args.model}"] if args.model else []),
        ]  # fmt: skip
        if name == "rollout":
            return [name, *common, "rollout.compile_entropy=false",
                    f"rollout.max_model_len={MAX_MODEL_LEN}", "rollout.reclaim_idle_s=3",
                    f"rollout.http_port={self.rollout_port}"]  # fmt: skip
        if name == "reward":
            return [name, *common, "reward.http_port=0", "reward.reclaim_idle_s=2"]
        return [name, *common, f"trainer.total_steps={args.steps}", f"trainer.run_id={RUN_ID}",
                f"trainer.run_dir={self.out / 'runs'}", "trainer.checkpoint_every=5",
                "trainer.weight_sync_timeout_s=15",
                f"trainer.rollout_urls=[\"http://127.0.0.1:{self.rollout_port}\"]",
                f"trainer.weight_sync_port={self.sync_port}",
                f"api.port={self.api_port}"]  # fmt: skip

    def start(self, name: str) -> None:
        hapo = str(Path(sys.executable).with_name("hapo"))
        with (self.logs / f"{name}.log").open("a") as log:
            self.processes[name] = subprocess.Popen(
                [hapo, *self.command(name)], stdout=log, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True,
            )  # fmt: skip

    def kill(self, name: str) -> None:
        process = self.processes[name]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)

    def exited(self) -> list[str]:
        """Services that exited on their own (none should)."""
        return [name for name, p in self.processes.items() if p.poll() is not None]

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def metrics_lines(path: Path) -> list[dict]:
    """The run's step records so far (none before its first step)."""
    return read_metrics(path)[0] if path.is_file() else []


def redis_state(client: redis.Redis) -> dict:
    """``used_memory`` and the length of each of the prefix's streams."""
    streams = {}
    for key in sorted(client.scan_iter(match=f"{PREFIX}:*")):
        if client.type(key) == b"stream":
            streams[key.decode()] = client.xlen(key)
    return {"used_memory": client.info("memory")["used_memory"], "streams": streams}


def reason_kind(reason: str) -> str:
    """A dead letter's reason without its particulars (ids, values, field lists)."""
    return re.split(r" \(|: ", reason, maxsplit=1)[0]


def inject(client: redis.Redis, vocab: int, tag: str) -> dict[tuple[str, str], BadEntry]:
    names = StreamNames(PREFIX)
    streams = {"prompts": names.prompts, "trajectories": names.trajectories,
               "scored": names.scored(RUN_ID)}  # fmt: skip
    injected = {}
    for entry in bad_entries(RUN_ID, vocab, MAX_MODEL_LEN, tag):
        stream = streams[entry.stream]
        injected[stream, client.xadd(stream, entry.fields).decode()] = entry
    return injected


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="hapo bench soak", description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--inject-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model folder (default: model.path)")
    parser.add_argument("--out", default="runs/soak")
    parser.add_argument("--base-port", type=int, default=18300)
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3")

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True)
    rng = random.Random(args.seed)
    kill_at = sorted(rng.sample(range(2, args.steps), min(args.kills, args.steps - 2)))
    victims = [rng.choice(SERVICES) for _ in kill_at]
    model = Path(args.model) if args.model else load_config().model.local_path
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    metrics = out / "runs" / RUN_ID / "metrics.jsonl"

    stack = Stack(args)
    stack.start_redis()
    client = redis.Redis.from_url(stack.redis_url)
    injected: dict[tuple[str, str], BadEntry] = {}
    injected_after: set[int] = set()
    kills: list[dict] = []
    started = time.monotonic()
    try:
        deadline = time.monotonic() + 30
        while not redis_answers(stack.redis_url):
            if time.monotonic() > deadline:
                raise SystemExit("hapo bench soak: the private redis-server does not answer")
            time.sleep(0.1)
        for name in SERVICES:
            stack.start(name)
        step, state_first, last_progress = 0, None, time.monotonic()
        while step < args.steps:
            time.sleep(0.5)
            exited = stack.exited()  # the trainer exits (0) after the last step only
            if exited and (exited != ["trainer"] or stack.processes["trainer"].returncode):
                raise SystemExit(f"hapo bench soak: {exited} exited; see {out / 'logs'}")
            lines = metrics_lines(metrics)
            now_step = lines[-1]["step"] if lines else 0
            if now_step != step:
                step, last_progress = now_step, time.monotonic()
                print(f"step {step}/{args.steps}", flush=True)
                if state_first is None and step >= 1:
                    state_first = redis_state(client)
                due = step % args.inject_every == 0 or step == 1
                if due and step < args.steps and step not in injected_after:  # once: a
                    injected |= inject(client, vocab, tag=str(step))  # resume repeats steps
                    injected_after.add(step)
                while kill_at and step >= kill_at[0]:
                    victim = victims[len(kills)]
                    time.sleep(rng.uniform(0.0, 1.0))
                    stack.kill(victim)
                    stack.start(victim)
                    kills.append({"after_step": kill_at.pop(0), "service": victim})
                    print(f"SIGKILLed and restarted {victim}", flush=True)
            elif time.monotonic() - last_progress > STEP_TIMEOUT_S:
                raise SystemExit(f"hapo bench soak: no step for {STEP_TIMEOUT_S} s after {step}")
        stack.processes["trainer"].wait(120)
        state_last = redis_state(client)
        letters = [DeadLetter.from_bytes(f[DATA_FIELD]) for _, f in client.xrange(f"{PREFIX}:dead")]
    finally:
        stack.close()
        client.close()

    lines = metrics_lines(metrics)
    trained = [group for line in lines for group in line["data/group_ids"]]
    abandoned = lines[-1]["data/abandoned_groups"] if lines else 0
    highest = max((int(group) for group in trained), default=0)
    missing = sorted(set(range(1, highest + 1)) - {int(group) for group in trained})
    by_source = {(letter.source_stream, letter.source_id): letter for letter in letters}
    unmatched = [  # no dead letter, another reason, or fields not kept byte for byte
        (entry.stream, entry.label) for source, entry in injected.items()
        if source not in by_source or not re.match(entry.reason, by_source[source].reason)
        or by_source[source].fields != entry.fields
    ]  # fmt: skip
    dead = collections.Counter(
        f"{letter.source_stream.removeprefix(PREFIX + ':')}: {reason_kind(letter.reason)}"
        for letter in letters
    )
    result = {
        "bench": "soak", "steps": lines[-1]["step"] if lines else 0, "steps_asked": args.steps,
        "seed": args.seed, "wall_s": round(time.monotonic() - started, 1), "kills": kills,
        "groups_trained": len(trained), "lost_groups": len(missing) - abandoned,
        "trained_twice": len(trained) - len(set(trained)), "abandoned_groups": abandoned,
        "bad_entries_injected": len(injected), "bad_entries_not_dead_lettered": unmatched,
        "dead_letters": dict(sorted(dead.items())), "redis_first_step": state_first,
        "redis_last_step": state_last,
    }  # fmt: skip
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)
    return result
