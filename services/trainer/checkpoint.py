"""Trainer checkpoints: model, optimizer, scheduler, RNG states and progress, atomically.

A checkpoint is a folder ``<directory>/step_<step:08d>/`` that is also a Hugging Face model
folder (vLLM, transformers and ``hapo eval`` load it as it is), holding

- ``config.json``, ``generation_config.json``, ``model.safetensors``: the model as
  ``save_pretrained`` writes it (one file, tied tensors stored once),
- the tokenizer's files, when the caller passes the tokenizer,
- ``trainer_state.pt``: optimizer, scheduler and RNG states (loaded with
  ``weights_only=True``: a checkpoint cannot run code),
- ``meta.json``: the step and the caller's progress record (``extra``: data cursor, policy
  version, stream positions, ...).

It is written under a temporary name in the same folder, fsynced, and renamed into place:
a folder named ``step_*`` is always complete, and a crash mid-save leaves only a
``.tmp-*`` folder that the next save removes. After each save only the newest
``keep_last`` checkpoints are kept; across runs, ``prune_other_runs`` keeps the checkpoints
of the newest few runs only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"
_MODEL_FILE = "model.safetensors"
_STATE_FILE = "trainer_state.pt"
_META_FILE = "meta.json"


class CheckpointMeta(BaseModel):
    """What ``meta.json`` holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: int = Field(ge=0)
    """Training steps completed when the checkpoint was taken."""
    extra: dict[str, Any] = {}
    """The caller's progress record (JSON values)."""
    created_at: float
    """Unix time of the save."""


def _rng_states() -> dict[str, Any]:
    """Every random generator the trainer draws from, in ``weights_only``-loadable types."""
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk (a folder's fsync persists the names in it)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest step first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(_PREFIX)))


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or ``None``."""
    found = checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(
    directory: Path,
    step: int,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    keep_last: int,
    extra: Mapping[str, Any] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write a checkpoint of ``step`` atomically and prune to the newest ``keep_last``.

    Saving a step that already has a checkpoint replaces it.

    Returns:
        The checkpoint's folder.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{_TMP_PREFIX}*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)

    tmp = directory / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    # One file whatever the size, so that ``load_checkpoint`` and resume read one file.
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="100000GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_states(),
    }
    torch.save(state, tmp / _STATE_FILE)
    meta = CheckpointMeta(step=step, extra=dict(extra or {}), created_at=time.time())
    (tmp / _META_FILE).write_text(meta.model_dump_json())
    for path in [*tmp.iterdir(), tmp]:
        _fsync(path)

    final = directory / f"{_PREFIX}{step:08d}"
    if final.exists():  # rename cannot replace a non-empty folder: move the old one aside
        old = directory / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        final.rename(old)
        shutil.rmtree(old)
    tmp.rename(final)
    _fsync(directory)

    for expired in checkpoints(directory)[:-keep_last]:
        shutil.rmtree(expired)
    return final


def prune_other_runs(run_root: Path, current: str, keep_runs: int) -> list[Path]:
    """Delete the checkpoints of every run under ``run_root`` (``<run id>/checkpoints/``)
    but ``current`` and the ``keep_runs - 1`` others whose newest checkpoint is the most
    recent; their metrics, logs and plots stay. A volume that many runs share in turn
    (a deployment restarting into new runs) stays bounded.

    Returns:
        The checkpoint folders deleted.
    """
    if keep_runs < 1:
        raise ValueError(f"keep_runs must be >= 1, got {keep_runs}")
    others = []
    for run in run_root.iterdir() if run_root.is_dir() else ():
        newest = latest_checkpoint(run / "checkpoints")
        if run.name != current and newest is not None:
            others.append((newest.stat().st_mtime, run / "checkpoints"))
    others.sort(reverse=True)
    expired = [folder for _, folder in others[keep_runs - 1 :]]
    for folder in expired:
        for checkpoint in checkpoints(folder):
            shutil.rmtree(checkpoint)
    return expired


def load_checkpoint(
    path: Path,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> CheckpointMeta:
    """Restore a checkpoint into ``model``, ``optimizer`` and ``scheduler``, and set every
    random generator's state, so training continues as if never interrupted.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint.
    """
    for name in (_MODEL_FILE, _STATE_FILE, _META_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint: no {name}")
    load_model(model, str(path / _MODEL_FILE), strict=True)
    # On the CPU: RNG states must stay there; the optimizer moves its state to each
    # parameter's device itself.
    state = torch.load(path / _STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_states(state["rng"])
    return CheckpointMeta.model_validate(json.loads((path / _META_FILE).read_text()))
