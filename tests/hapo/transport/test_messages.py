"""Wire schema: round trips, binary arrays, and decoding of hostile input."""

from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hapo.transport.messages import (
    MalformedMessage,
    PromptGroup,
    ScoredTrajectory,
    Trajectory,
)


def make_trajectory(**overrides) -> Trajectory:
    fields = dict(
        run_id="run", group_id="g1", sample_idx=2, n=4, policy_version=3, policy_version_end=4,
        prompt_ids=np.arange(5), response_ids=np.array([7, 8, 9]), logprobs=np.array([-0.1, -0.2, -0.3]),
        finish_reason="stop", answer="42",
    )  # fmt: skip
    return Trajectory(**{**fields, **overrides})


def test_round_trip_keeps_arrays_binary() -> None:
    trajectory = make_trajectory()
    data = trajectory.to_bytes()
    raw = msgpack.unpackb(data)
    assert raw["response_ids"] == np.array([7, 8, 9], dtype="<i4").tobytes()
    decoded = Trajectory.from_bytes(data)
    assert decoded.response_ids.dtype == np.dtype("<i4")
    np.testing.assert_array_equal(decoded.logprobs, np.array([-0.1, -0.2, -0.3], dtype=np.float32))
    assert decoded.key == trajectory.key
    scored = ScoredTrajectory.from_trajectory(decoded, 1.0, "correct")
    again = ScoredTrajectory.from_bytes(scored.to_bytes())
    assert (again.reward, again.reward_reason, again.key) == (1.0, "correct", trajectory.key)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(logprobs=np.zeros(2)), "logprobs has 2 entries for 3 tokens"),
        (dict(sample_idx=4), "sample_idx 4 is not below n=4"),
        (dict(policy_version_end=1), "policy_version_end is below"),
        (dict(finish_reason="eos"), "finish_reason"),
        (dict(response_ids=np.array([1.5, 2.5, 3.5])), "cannot hold float64 values as <i4"),
    ],
)
def test_invalid_trajectories_name_the_problem(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_trajectory(**overrides)


def test_token_ids_outside_the_vocabulary_are_refused_by_name() -> None:
    make_trajectory().check_vocabulary(10)  # ids 0-9 all embed
    with pytest.raises(
        MalformedMessage, match=r"^response_ids: token id 9 is outside .* \[0, 9\)$"
    ):
        make_trajectory().check_vocabulary(9)
    with pytest.raises(MalformedMessage, match=r"^prompt_ids: token id -1 is outside"):
        make_trajectory(prompt_ids=np.array([3, -1])).check_vocabulary(10)
    make_trajectory(response_ids=np.array([], dtype=int), logprobs=np.array([])).check_vocabulary(5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xc1", "undecodable msgpack"),
        (msgpack.packb([1, 2]), "payload is a list, not a map"),
        (msgpack.packb({"run_id": "r"}), "group_id: Field required"),
        (msgpack.packb({**msgpack.unpackb(make_trajectory().to_bytes()), "response_ids": b"\x00" * 5}),
         "not a whole number of <i4 items"),
        (msgpack.packb({**msgpack.unpackb(make_trajectory().to_bytes()), "answer": b"\xff\xfe"}),
         "answer"),
    ],
)  # fmt: skip
def test_malformed_messages(data: bytes, message: str) -> None:
    with pytest.raises(MalformedMessage, match=message):
        Trajectory.from_bytes(data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), msgpack_values.map(msgpack.packb)))
def test_decoding_hostile_bytes_raises_only_malformed(payload: bytes) -> None:
    for schema in (Trajectory, ScoredTrajectory, PromptGroup):
        with contextlib.suppress(MalformedMessage):
            schema.from_bytes(payload)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=50), st.text(max_size=50))
def test_arbitrary_tokens_and_answers_round_trip(tokens: list[int], answer: str) -> None:
    trajectory = make_trajectory(
        response_ids=np.array(tokens, dtype=np.int64), logprobs=np.zeros(len(tokens)), answer=answer
    )
    decoded = Trajectory.from_bytes(trajectory.to_bytes())
    assert decoded.response_ids.tolist() == tokens
    assert decoded.answer == answer


@pytest.mark.parametrize("reward", [float("nan"), float("inf"), float("-inf")])
def test_scored_reward_must_be_finite(reward: float) -> None:
    trajectory = make_trajectory()
    with pytest.raises(ValueError, match="reward"):
        ScoredTrajectory.from_trajectory(trajectory, reward, "custom")
    fields = msgpack.unpackb(ScoredTrajectory.from_trajectory(trajectory, 1.0, "x").to_bytes())
    with pytest.raises(MalformedMessage, match="reward"):
        ScoredTrajectory.from_bytes(msgpack.packb({**fields, "reward": reward}))
