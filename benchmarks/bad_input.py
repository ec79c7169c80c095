"""Malformed and hostile stream entries, one of each kind for each stream a service reads:
what ``tests/e2e/test_faults.py`` injects into a running stack (and ``hapo bench soak``
into a long run), with the dead-letter reason each must end with.

Each ``BadEntry`` is the entry's fields as they go to ``XADD``, the stream it goes to
(``prompts``, ``trajectories``, or the run's ``scored``), a label for the report, and a
regular expression the dead letter's reason must match (``re.match``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import numpy as np

from hapo.transport.base import DATA_FIELD
from hapo.transport.messages import PromptGroup, ScoredTrajectory, Trajectory

Stream = Literal["prompts", "trajectories", "scored"]


@dataclass(frozen=True)
class BadEntry:
    stream: Stream
    label: str
    fields: dict[bytes, bytes]
    reason: str
    """A regular expression the dead letter's reason matches from its start."""


def _repacked(message: bytes, **changes: Any) -> bytes:
    """``message`` (msgpack of a map) with ``changes`` written over its fields, packed again
    without validation: how a buggy or hostile producer writes a schema violation."""
    fields = msgpack.unpackb(message, raw=False)
    fields.update(changes)
    return msgpack.packb(fields, use_bin_type=True)


def _ids(values: list[int]) -> Any:
    return np.asarray(values, dtype=np.int32)


def bad_entries(run_id: str, vocab_size: int, max_model_len: int, tag: str) -> list[BadEntry]:
    """Every kind of bad entry for each stream of run ``run_id`` (group ids start with
    ``bad-<tag>-`` so that a run never waits for them)."""
    prompt = PromptGroup(
        run_id=run_id, group_id=f"bad-{tag}-prompt", prompt_ids=_ids([1, 2, 3]), answer="1",
        n=2, policy_version=0,
    ).to_bytes()  # fmt: skip
    trajectory = Trajectory(
        run_id=run_id, group_id=f"bad-{tag}-trajectory", sample_idx=0, n=2, policy_version=0,
        policy_version_end=0, prompt_ids=_ids([1, 2, 3]), response_ids=_ids([4, 5]),
        logprobs=np.zeros(2), finish_reason="stop", answer="1",
    )  # fmt: skip
    scored = ScoredTrajectory.from_trajectory(trajectory, 1.0, "correct").to_bytes()
    outside = [vocab_size + 7, vocab_size + 8]  # two: a sample's logprobs have two
    entries: list[BadEntry] = []
    for stream in ("prompts", "trajectories", "scored"):
        entries += [
            BadEntry(stream, "no data field", {b"wrong": b"field"}, r"no 'data' field"),
            BadEntry(stream, "bad msgpack", {DATA_FIELD: b"\xc1 not msgpack"},
                     r"undecodable msgpack"),
            BadEntry(stream, "a list, not a map", {DATA_FIELD: msgpack.packb([1, 2, 3])},
                     r"payload is a list, not a map"),
        ]  # fmt: skip
    bad_n = _repacked(prompt, n=0)
    entries += [
        BadEntry("prompts", "schema: n = 0", {DATA_FIELD: bad_n}, r"invalid PromptGroup: n:"),
        BadEntry("prompts", "token id outside the vocabulary",
                 {DATA_FIELD: _repacked(prompt, prompt_ids=_ids(outside[:1]).tobytes())},
                 rf"rejected by the engine: Token id {outside[0]} is out of vocabulary"),
        BadEntry("prompts", f"prompt longer than the context ({max_model_len + 10} tokens)",
                 {DATA_FIELD: _repacked(
                     prompt, prompt_ids=_ids([5] * (max_model_len + 10)).tobytes())},
                 rf"prompt_ids: {max_model_len + 10} tokens, not below this replica's "
                 rf"rollout.max_model_len \({max_model_len}\)"),
        BadEntry("trajectories", "schema: sample_idx = -1",
                 {DATA_FIELD: _repacked(trajectory.to_bytes(), sample_idx=-1)},
                 r"invalid Trajectory: sample_idx:"),
        BadEntry("trajectories", "token id outside the vocabulary",
                 {DATA_FIELD: _repacked(trajectory.to_bytes(),
                                        response_ids=_ids(outside).tobytes())},
                 rf"cannot decode the response's tokens: ValueError: token id {outside[0]} "
                 r"is outside the tokenizer's vocabulary"),
        BadEntry("scored", "NaN reward", {DATA_FIELD: _repacked(scored, reward=float("nan"))},
                 r"invalid ScoredTrajectory: reward:"),
        BadEntry("scored", "token id outside the vocabulary",
                 {DATA_FIELD: _repacked(scored, response_ids=_ids(outside).tobytes())},
                 rf"response_ids: token id ({outside[0]}|{outside[1]}) is outside the model's "
                 rf"vocabulary \[0, {vocab_size}\)"),
    ]  # fmt: skip
    return entries
