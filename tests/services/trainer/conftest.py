"""A real trainer control API (uvicorn on a free port, in a thread of this process) and a
stand-in for rollout + reward that answers every queued prompt group with scored samples
through the real Redis streams."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from hapo.config import HapoConfig, load_config
from hapo.transport.base import DATA_FIELD
from hapo.transport.messages import PromptGroup, ScoredTrajectory
from hapo.transport.streams import StreamNames
from services.trainer.api import serve
from tests.helpers import free_port, wait_for

TOKEN = "trainer-test-token"


class TrainerServer:
    """``services.trainer.api.serve`` in a background thread with its own event loop (with
    ``start_run``, as ``hapo trainer`` runs it: a run of its config starts at once)."""

    def __init__(self, config: HapoConfig, start_run: bool = False) -> None:
        self.config, self.start_run = config, start_run
        self.url = f"http://{config.api.host}:{config.api.port}"
        self.exit_code: int | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
            self._started.set()
            self.exit_code = await serve(self.config, self.stop, start_run=self.start_run)

        asyncio.run(main())

    def start(self) -> TrainerServer:
        self._thread.start()
        self._started.wait(10)
        wait_for(lambda: self.request("GET", "/healthz")[0] == 200, 30, "the trainer API")
        return self

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self._thread.join(120)
        assert not self._thread.is_alive(), "trainer API did not shut down"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = TOKEN,
        data: bytes | None = None,
    ) -> tuple[int, Any]:
        """``(status, decoded JSON or text)``; connection errors count as status 0."""
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except OSError:
            return 0, None
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()


def trainer_config(tiny_model_dir: Path, names: StreamNames, run_dir: Path) -> HapoConfig:
    overrides = [
        f"model.path={tiny_model_dir}", f"redis.stream_prefix={names.prefix}",
        "actor_rollout_ref.rollout.n=2", "data.train_batch_size=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "data.max_response_length=8", "trainer.rollout_urls=[]", f"trainer.run_dir={run_dir}",
        "trainer.checkpoint_every=1000", f"api.port={free_port()}", f"api.token={TOKEN}",
    ]  # fmt: skip
    return load_config(overrides=overrides)


@pytest.fixture
def trainer_api(
    tiny_model_dir: Path, stream_names: StreamNames, tmp_path: Path
) -> Iterator[TrainerServer]:
    server = TrainerServer(trainer_config(tiny_model_dir, stream_names, tmp_path / "runs"))
    yield server.start()
    server.close()


class ScoredFeeder:
    """Answers each prompt group on ``<prefix>:prompts`` with ``n`` scored samples of random
    tokens (rewards alternate 0/1; the tokens depend only on the group id): the trainer's
    real input, without vLLM. Groups numbered above ``limit`` are held back until it is
    raised (None: no limit). Samples ``(group id, sample index)`` in ``drop`` are never
    sent (as if dead-lettered on the way)."""

    def __init__(
        self,
        url: str,
        names: StreamNames,
        limit: int | None = None,
        drop: set[tuple[str, int]] | None = None,
    ) -> None:
        self.client = redis.Redis.from_url(url)
        self.names = names
        self.limit = limit
        self.drop = drop or set()
        self.running = True
        self._held: list[PromptGroup] = []
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        last = "0"
        while self.running:
            for _, entries in self.client.xread({self.names.prompts: last}, block=100) or []:
                for entry_id, fields in entries:
                    last = entry_id
                    self._held.append(PromptGroup.from_bytes(fields[DATA_FIELD]))
            limit, held, self._held = self.limit, self._held, []
            for group in held:
                if limit is not None and int(group.group_id) > limit:
                    self._held.append(group)
                else:
                    self._answer(group)

    def _answer(self, group: PromptGroup) -> None:
        pipe = self.client.pipeline()
        for sample in self.samples(group):
            if (group.group_id, sample.sample_idx) not in self.drop:
                pipe.xadd(self.names.scored(group.run_id), {DATA_FIELD: sample.to_bytes()})
        pipe.execute()

    @staticmethod
    def samples(group: PromptGroup) -> list[ScoredTrajectory]:
        """The ``n`` samples the feeder answers ``group`` with."""
        rng = np.random.default_rng(int(group.group_id))
        samples = []
        for index in range(group.n):
            length = int(rng.integers(2, group.sampling.max_tokens + 1))
            samples.append(ScoredTrajectory(
                run_id=group.run_id, group_id=group.group_id, sample_idx=index, n=group.n,
                policy_version=group.policy_version, policy_version_end=group.policy_version,
                prompt_ids=group.prompt_ids, response_ids=rng.integers(3, 1000, length),
                logprobs=np.full(length, -2.0), finish_reason="length", answer=group.answer,
                reward=float(index % 2), reward_reason="correct" if index % 2 else "wrong",
            ))  # fmt: skip
        return samples

    def close(self) -> None:
        self.running = False
        self._thread.join(10)
        self.client.close()


@pytest.fixture
def feeder(trainer_api: TrainerServer, stream_names: StreamNames) -> Iterator[ScoredFeeder]:
    feeder = ScoredFeeder(trainer_api.config.redis.url, stream_names)
    yield feeder
    feeder.close()
