"""What a trainer needs to resume a run exactly after a crash or a SIGKILL.

- The newest checkpoint (``checkpoint.latest_checkpoint``) holds model, optimizer,
  scheduler, RNG states, the step, and a progress record (``Progress``: policy version,
  data cursor, ``norm_entropys``, the groups trained so far in compact form).
- Scored entries of trained groups are acknowledged only right after a checkpoint covering
  the step that trained them is renamed into place. The entries of steps lost with the
  process stay pending for the run's consumer ``trainer-<run id>`` and come back first
  after the restart (a ``StreamConsumer`` replays its own pending entries first): those
  groups are trained again, once. An entry of a group the checkpoint already counts as
  trained (the process died between the rename and the acknowledgement; a duplicate; its
  own entry reclaimed by ``XAUTOCLAIM``) is refused and acknowledged with the next
  checkpoint.
- Prompt groups get ids ``f"{n:08d}"`` for n = 1, 2, ...; the count issued is kept in
  Redis (``issued_key``) in the same ``MULTI`` as the ``XADD`` s, and the deterministic
  problem stream is fast-forwarded past it, so a restart neither issues a group twice nor
  skips one, even when groups were issued after the last checkpoint (they are still on
  their way through rollout and reward).
- ``metrics.jsonl`` loses the lines of the steps after the checkpoint; they are trained and
  logged again, each line naming its groups (``data/group_ids``).

Each run reads its own scored stream (``<prefix>:scored:<run id>``): a run started while
this one is down never sees, claims or acknowledges its entries, so resume stays exact
whatever ran in between.

A run id names one run (``claim_run_id``). Its first start writes a random token to
``<run dir>/incarnation`` and to Redis; a restart finds the two equal. A new run under an
id whose Redis state is another run's (started from another ``run_dir``, or whose folder
was deleted) is refused: it would continue that run's group count and train the samples
that run left in flight, sampled by another model, as its own.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import torch
from torch import nn

from services.trainer.checkpoint import latest_checkpoint, load_checkpoint
from services.trainer.groups import TrainedGroups

logger = logging.getLogger("hapo.trainer")


def issued_key(prefix: str, run_id: str) -> str:
    """Redis key holding how many prompt groups run ``run_id`` has issued."""
    return f"{prefix}:trainer:{run_id}:groups_queued"


def incarnation_key(prefix: str, run_id: str) -> str:
    """Redis key holding the token of the run whose state ``run_id``'s keys hold."""
    return f"{prefix}:trainer:{run_id}:incarnation"


INCARNATION_FILE = "incarnation"
"""The run's token, in its run folder."""


class RunIdTaken(RuntimeError):
    """Redis holds another run's state under this run id."""


async def claim_run_id(client: aioredis.Redis, prefix: str, run_id: str, run_dir: Path) -> None:
    """Bind ``run_id``'s state in Redis to the run in ``run_dir``: a first start there
    takes the id, a restart finds its own token (module docstring). Call it holding the
    prefix's lease, before anything of the run touches Redis.

    Raises:
        RunIdTaken: Redis holds the state of another run with this id.
    """
    token_file, key = run_dir / INCARNATION_FILE, incarnation_key(prefix, run_id)
    ours = token_file.read_text().strip() if token_file.is_file() else None
    theirs = await client.get(key)
    theirs = theirs.decode() if theirs is not None else None
    # A group count without a token is from a version that wrote none (the count is
    # written with a run's first groups, so every run that issued any has one): this
    # run's own if its folder holds checkpoints (it resumes), another's if not.
    legacy = (run_dir / "checkpoints").is_dir() or not await client.exists(
        issued_key(prefix, run_id)
    )
    if ours is None and theirs is None and legacy:
        ours = uuid.uuid4().hex
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = token_file.with_name(token_file.name + ".tmp")
        tmp.write_text(ours + "\n")
        os.replace(tmp, token_file)
    if ours is not None and theirs in (None, ours):
        await client.set(key, ours)  # again if Redis lost it: the state there is this run's
        return
    raise RunIdTaken(
        f"trainer.run_id {run_id!r}: Redis (redis.stream_prefix {prefix!r}) holds the state "
        f"of another run with this id, one started from another trainer.run_dir or whose "
        f"folder {run_dir} was deleted since; this run would train the samples that run "
        "left in flight as its own. Choose a new trainer.run_id, or resume that run from "
        "its own folder."
    )


@dataclass
class Progress:
    """A checkpoint's ``extra`` record."""

    policy_version: int = 0
    groups_queued: int = 0
    """Prompt groups issued when the checkpoint was taken (the data cursor)."""
    norm_entropys: tuple[float, float, float, float] | None = None
    trained: TrainedGroups = field(default_factory=TrainedGroups)
    """Groups trained (or abandoned) up to the checkpoint: a sample of one of them that
    comes back (its entry not yet acknowledged when the process died) is dropped."""
    abandoned: int = 0
    """Groups abandoned up to the checkpoint (each got a replacement group issued)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "policy_version": self.policy_version, "groups_queued": self.groups_queued,
            "norm_entropys": self.norm_entropys, "trained_groups": self.trained.to_json(),
            "abandoned_groups": self.abandoned,
        }  # fmt: skip

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Progress:
        entropys = record.get("norm_entropys")
        trained = record.get("trained_groups")
        return cls(
            policy_version=record["policy_version"],
            groups_queued=record["groups_queued"],
            norm_entropys=None if entropys is None else tuple(entropys),
            trained=TrainedGroups() if trained is None else TrainedGroups.from_json(trained),
            abandoned=record.get("abandoned_groups", 0),
        )


def load_progress(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int | None, Progress]:
    """Load the newest checkpoint in ``directory`` into the model, optimizer, scheduler and
    RNGs; returns its step and progress record (``None`` and a fresh record if none)."""
    checkpoint = latest_checkpoint(directory)
    if checkpoint is None:
        return None, Progress()
    meta = load_checkpoint(checkpoint, model, optimizer, scheduler)
    logger.info("resuming from %s", checkpoint)
    return meta.step, Progress.from_json(meta.extra)


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the lines of steps after ``step`` from the JSONL file at ``path`` (steps whose
    training was lost: they are trained and logged again); returns how many were dropped.
    A line cut short by the kill is dropped too. Atomic: the file is rewritten under a
    temporary name and renamed."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line.rstrip("\n") + "\n" for line in lines if _step_of(line) <= step]
    if kept == lines:
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
