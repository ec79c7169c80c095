"""Reward workers on GSM8K-style trajectories through a real Redis.

    hapo bench reward [--count 10000 --workers 2]

Starts ``--workers`` reward worker processes (``hapo reward``) on a private stream prefix,
then runs two phases over the same trajectories:

1. burst: all ``--count`` at once; throughput = count / (last score - first enqueue).
2. paced: the same count again at about 75% of the burst throughput; end-to-end latency
   (end of generation -> reward published) of each trajectory.

One in ten answers is a decimal in ``\\boxed{}``, which goes to math-verify; the rest are
GSM8K's ``#### <integer>``. Last line:
{"bench": "reward", "scored_per_s": X, "p99_latency_ms": Y, ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import redis
from tokenizers import Tokenizer

from hapo.config import load_config
from hapo.transport.base import DATA_FIELD, Publisher
from hapo.transport.messages import ScoredTrajectory, Trajectory
from hapo.transport.streams import StreamNames, StreamPublisher, connect


def gsm8k_style(rng: random.Random, index: int) -> tuple[str, str]:
    """A worked solution and its gold answer; about half the solutions are right."""
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    total = a * b
    claimed = total if rng.random() < 0.5 else total + rng.randint(1, 9)
    if index % 10 == 0:
        gold = f"{total / 4:g}"
        text = f"Each of {a} boxes holds {b} apples, shared by 4 friends: {a} * {b} / 4.\n"
        return text + f"So each friend gets \\boxed{{{claimed / 4:g}}}.", gold
    text = (
        f"Tom has {a} bags with {b} marbles each. He has {a} * {b} = {claimed} marbles.\n"
        f"#### {claimed}"
    )
    return text, str(total)


RUN_ID = "bench"
"""Run id of the benchmark's trajectories: its scores go to ``<prefix>:scored:bench``."""


def make_trajectories(tokenizer: Tokenizer, count: int, seed: int) -> list[Trajectory]:
    rng = random.Random(seed)
    cases = [gsm8k_style(rng, i) for i in range(count)]
    encodings = tokenizer.encode_batch([text for text, _ in cases])
    return [
        Trajectory(
            run_id=RUN_ID,
            group_id=f"g{i // 16}",
            sample_idx=i % 16,
            n=16,
            policy_version=0,
            policy_version_end=0,
            prompt_ids=np.arange(64),
            response_ids=np.array(enc.ids),
            logprobs=np.full(len(enc.ids), -0.7),
            finish_reason="stop",
            answer=answer,
        )
        for i, (enc, (_, answer)) in enumerate(zip(encodings, cases, strict=True))
    ]


def _publish(
    runner: asyncio.Runner, publisher: Publisher, stream: str, trajectories: list[Trajectory]
) -> None:
    # created_at is the moment it enters the stream: latency starts here.
    outputs = [
        (stream, trajectory.model_copy(update={"created_at": time.time()}).to_bytes())
        for trajectory in trajectories
    ]
    runner.run(publisher.publish(outputs))


def _wait_scored(client: redis.Redis, stream: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while client.xlen(stream) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {client.xlen(stream)} of {count} scored in {timeout_s} s")
        time.sleep(0.02)


def _scored(client: redis.Redis, stream: str) -> list[ScoredTrajectory]:
    return [ScoredTrajectory.from_bytes(fields[DATA_FIELD]) for _, fields in client.xrange(stream)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="hapo bench reward", description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = load_config()
    names = StreamNames(f"bench-{uuid.uuid4().hex[:8]}")
    password = config.redis.password
    client = redis.Redis.from_url(
        config.redis.url, password=None if password is None else password.get_secret_value()
    )
    # One event loop for the whole run: the publisher's asyncio client lives on it.
    runner = asyncio.Runner()
    publisher = StreamPublisher(connect(config.redis.url, config.redis.password))
    tokenizer = Tokenizer.from_file(str(config.model.local_path / "tokenizer.json"))
    trajectories = make_trajectories(tokenizer, args.count, args.seed)
    hapo = str(Path(sys.executable).with_name("hapo"))
    workers = [
        subprocess.Popen(
            [
                hapo,
                "reward",
                f"redis.stream_prefix={names.prefix}",
                "reward.http_port=0",
                "--consumer",
                f"bench-{i}",
            ],
            stderr=subprocess.DEVNULL,
        )
        for i in range(args.workers)
    ]
    try:
        print(f"{args.workers} workers starting; {args.count} trajectories ready", flush=True)
        warm = make_trajectories(tokenizer, 64 * args.workers, args.seed + 1)
        _publish(runner, publisher, names.trajectories, warm)  # spawn scorers, import math-verify
        _wait_scored(client, names.scored(RUN_ID), len(warm), 120)
        client.delete(names.scored(RUN_ID))

        started = time.time()
        _publish(runner, publisher, names.trajectories, trajectories)
        _wait_scored(client, names.scored(RUN_ID), args.count, 600)
        burst = _scored(client, names.scored(RUN_ID))
        scored_per_s = args.count / (max(m.scored_at for m in burst) - started)
        print(f"burst: {scored_per_s:.0f} scored/s", flush=True)
        client.delete(names.scored(RUN_ID))

        chunk = 50
        for start in range(0, args.count, chunk):
            _publish(runner, publisher, names.trajectories, trajectories[start : start + chunk])
            time.sleep(chunk / (0.75 * scored_per_s))
        _wait_scored(client, names.scored(RUN_ID), args.count, 600)
        paced = _scored(client, names.scored(RUN_ID))
        latencies_ms = [(m.scored_at - m.created_at) * 1e3 for m in paced]
        p50, p99 = np.percentile(latencies_ms, [50, 99])
        created = [m.created_at for m in paced]
        rate = args.count / (max(created) - min(created))
        print(f"paced at {rate:.0f}/s: latency p50 {p50:.0f} ms, p99 {p99:.0f} ms", flush=True)
        reasons: dict[str, int] = {}
        for message in burst:
            reasons[message.reward_reason] = reasons.get(message.reward_reason, 0) + 1
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)
        client.delete(*client.keys(f"{names.prefix}:*"))
        client.close()
        runner.run(publisher.client.aclose())
        runner.close()
    result = {
        "bench": "reward",
        "scored_per_s": round(scored_per_s),
        "p99_latency_ms": round(float(p99), 1),
        "p50_latency_ms": round(float(p50), 1),
        "paced_rate_per_s": round(rate),
        "count": args.count,
        "workers": args.workers,
        "reasons": reasons,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
