"""Small helpers shared by tests that start real processes and servers."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hapo.runtime.redis_server import redis_answers, server_command
from hapo.transport.messages import ScoredTrajectory

_EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
_given_ports: set[int] = set()


def free_port() -> int:
    """A TCP port nothing listens on right now, and one that no process started later takes
    first: it lies below the kernel's ephemeral range, where binding port 0 (as vLLM and
    torch.distributed do for their own sockets) never lands. A port the kernel handed out
    (port 0) was taken by a rollout's engine before the trainer listened on it."""
    low = int(_EPHEMERAL_PORTS.read_text().split()[0]) if _EPHEMERAL_PORTS.exists() else 32768
    for _ in range(1000):
        port = random.randrange(max(1024, low - 10000), low)
        if port in _given_ports:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given_ports.add(port)
        return port
    raise RuntimeError(f"no free TCP port below {low}")


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str | Callable[[], str]
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s`` (a
    callable ``what`` is asked then, so that it can say what there was)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout_s} s waiting for {described}")
        time.sleep(0.1)


def scored_trajectories(
    groups: Sequence[Sequence[tuple[int, int, float]]], vocab: int, seed: int
) -> list[ScoredTrajectory]:
    """Scored samples with random tokens below ``vocab``: one inner list per group of
    ``(prompt length, response length, reward)``; a group shares its prompt."""
    rng = np.random.default_rng(seed)
    trajectories = []
    for group, samples in enumerate(groups):
        prompt = rng.integers(1, vocab, samples[0][0])
        for index, (_, length, reward) in enumerate(samples):
            trajectories.append(
                ScoredTrajectory(
                    run_id="run",
                    group_id=f"g{group}",
                    sample_idx=index,
                    n=len(samples),
                    policy_version=0,
                    policy_version_end=0,
                    prompt_ids=prompt,
                    response_ids=rng.integers(1, vocab, length),
                    logprobs=np.zeros(length),
                    finish_reason="stop",
                    answer="1",
                    reward=reward,
                    reward_reason="test",
                )
            )
    return trajectories


def metrics_lines(path: Path) -> list[dict]:
    """The complete lines of a run's ``metrics.jsonl`` (none if it does not exist yet; a
    line cut short by a kill is left out)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def trained_group_ids(lines: Sequence[dict]) -> list[str]:
    """The ``data/group_ids`` of every line, in training order."""
    return [group for line in lines for group in line["data/group_ids"]]


def assert_each_group_trained_once(lines: Sequence[dict], groups: int) -> None:
    """The lines train group ids ``1..groups`` (as the trainer issues them, ``%08d``), each
    exactly once: none lost, none trained twice."""
    trained = trained_group_ids(lines)
    twice = sorted({group for group in trained if trained.count(group) > 1})
    expected = [f"{n:08d}" for n in range(1, groups + 1)]
    missing = sorted(set(expected) - set(trained))
    assert not twice and not missing and sorted(trained) == expected, (
        f"trained twice: {twice}, never trained: {missing}, trained: {trained}"
    )


class RedisServer:
    """A private ``redis-server`` (AOF on, fsync on every write) on a free port, in the
    foreground as this process's child, so a test can SIGKILL it and start it again on
    the same port and directory."""

    def __init__(self, data_dir: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed (Debian: redis-server)"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.command = server_command(
            binary, "127.0.0.1", self.port, data_dir, daemonize=False, appendfsync="always"
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        wait_for(lambda: redis_answers(self.url), 20, f"redis-server on port {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what the AOF holds survives."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)


def tiny_llama(
    vocab: int = 128, pad: int | None = 0, seed: int = 0, **config: int
) -> LlamaForCausalLM:
    """A tiny random Llama with tied embeddings (2 layers of width 64 unless ``config``
    says otherwise), the same weights for the same arguments."""
    torch.manual_seed(seed)
    shape = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32,
    )  # fmt: skip
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab, pad_token_id=pad, tie_word_embeddings=True, **(shape | config)
        )
    )
