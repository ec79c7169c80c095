"""``resume.claim_run_id`` against a real Redis: a run id names one run, so a new run under
an id whose state is another run's is refused, and a restart of the same run is not."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from hapo.transport.streams import StreamNames
from services.trainer.resume import (
    INCARNATION_FILE,
    RunIdTaken,
    claim_run_id,
    incarnation_key,
    issued_key,
)


async def test_a_restart_keeps_the_id_and_another_folder_is_refused(
    redis_client: aioredis.Redis, stream_names: StreamNames, tmp_path: Path
) -> None:
    prefix, first = stream_names.prefix, tmp_path / "a" / "run"
    await claim_run_id(redis_client, prefix, "run", first)
    token = (first / INCARNATION_FILE).read_text().strip()
    assert len(token) == 32 and await redis_client.get(incarnation_key(prefix, "run")) == (
        token.encode()
    )
    await claim_run_id(redis_client, prefix, "run", first)  # a restart: the same run
    assert (first / INCARNATION_FILE).read_text().strip() == token

    with pytest.raises(RunIdTaken, match=r"^trainer\.run_id 'run': Redis .* holds the state"):
        await claim_run_id(redis_client, prefix, "run", tmp_path / "b" / "run")
    assert not (tmp_path / "b").exists()
    # The folder deleted, the same path is a new run too.
    (first / INCARNATION_FILE).unlink()
    with pytest.raises(RunIdTaken):
        await claim_run_id(redis_client, prefix, "run", first)
    # Other ids and other prefixes are free.
    await claim_run_id(redis_client, prefix, "other", tmp_path / "b" / "other")
    await claim_run_id(redis_client, f"{prefix}-2", "run", tmp_path / "c" / "run")
    await redis_client.delete(incarnation_key(f"{prefix}-2", "run"))


async def test_a_group_count_without_a_token_is_another_runs(
    redis_client: aioredis.Redis, stream_names: StreamNames, tmp_path: Path
) -> None:
    """A trainer that wrote no token (an older version) left its group count: a new run
    is refused, that run's own folder resumes."""
    prefix = stream_names.prefix
    await redis_client.set(issued_key(prefix, "counted"), 80)
    with pytest.raises(RunIdTaken):
        await claim_run_id(redis_client, prefix, "counted", tmp_path / "counted")
    assert await redis_client.get(incarnation_key(prefix, "counted")) is None
    # Its own folder, holding its checkpoints, resumes it (and takes the id from now on).
    (tmp_path / "own" / "checkpoints").mkdir(parents=True)
    await claim_run_id(redis_client, prefix, "counted", tmp_path / "own")
    token = (tmp_path / "own" / INCARNATION_FILE).read_text().strip()
    assert await redis_client.get(incarnation_key(prefix, "counted")) == token.encode()


async def test_a_run_whose_token_redis_lost_keeps_its_state(
    redis_client: aioredis.Redis, stream_names: StreamNames, tmp_path: Path
) -> None:
    prefix, folder = stream_names.prefix, tmp_path / "run"
    await claim_run_id(redis_client, prefix, "run", folder)
    await redis_client.set(issued_key(prefix, "run"), 16)
    await redis_client.delete(incarnation_key(prefix, "run"))  # e.g. Redis restarted bare
    await claim_run_id(redis_client, prefix, "run", folder)
    token = (folder / INCARNATION_FILE).read_text().strip()
    assert await redis_client.get(incarnation_key(prefix, "run")) == token.encode()
