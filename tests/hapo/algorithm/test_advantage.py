"""GRPO and HAPO advantages against the seed's loop forms (benchmarks/spec_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.spec_reference import grpo_advantage_loop, hapo_advantage_loop
from hapo.algorithm import advantage as advantage_module
from hapo.algorithm import (
    compute_grpo_outcome_advantage,
    compute_hapo_outcome_advantage,
    group_ids,
)

# Dyadic rewards keep group sums exact in fp32, so loop and vectorised forms see the same
# ties (equal scores, std exactly 0).
REWARDS = [0.0, 1.0, 0.5, -1.0, 0.25]

# The seed's loop takes the std of an empty group (a sample set with no valid token).
EMPTY_GROUP_STD = pytest.mark.filterwarnings(r"ignore:std\(\)")


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, list]:
    group_sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=6))
    seq_len = draw(st.integers(1, 4))
    batch = sum(group_sizes)
    labels = [i for i, size in enumerate(group_sizes) for _ in range(size)]
    order = draw(st.permutations(range(batch)))
    index = [labels[i] for i in order]
    if draw(st.booleans()):
        index = [f"prompt-{label}" for label in index]
    lengths = draw(st.lists(st.integers(0, seq_len), min_size=batch, max_size=batch))
    mask = torch.arange(seq_len).expand(batch, seq_len) < torch.tensor(lengths).unsqueeze(-1)
    values = draw(
        st.lists(st.sampled_from(REWARDS), min_size=batch * seq_len, max_size=batch * seq_len)
    )
    rewards = torch.tensor(values).reshape(batch, seq_len)
    return rewards, mask.float(), index


@settings(max_examples=300, deadline=None)
@given(batches(), st.booleans())
def test_grpo_matches_loop(batch: tuple, norm_by_std: bool) -> None:
    rewards, mask, index = batch
    advantages, returns = compute_grpo_outcome_advantage(rewards, mask, index, 1e-6, norm_by_std)
    expected = grpo_advantage_loop(rewards, mask, index, 1e-6, norm_by_std)
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=1e-5)
    assert returns is advantages


@EMPTY_GROUP_STD
@settings(max_examples=300, deadline=None)
@given(batches(), st.booleans())
def test_hapo_reference_padding_fallback_matches_seed(batch: tuple, norm_by_std: bool) -> None:
    rewards, mask, index = batch
    advantages, _ = compute_hapo_outcome_advantage(
        rewards, mask, index, 1e-6, norm_by_std, reference_padding_fallback=True
    )
    expected = hapo_advantage_loop(rewards, mask, index, 1e-6, norm_by_std)
    valid = mask.bool()
    torch.testing.assert_close(advantages[valid], expected[valid], atol=1e-5, rtol=1e-5)
    assert torch.all(advantages[~valid] == 0)
    assert torch.isfinite(advantages).all()


@EMPTY_GROUP_STD
@settings(max_examples=300, deadline=None)
@given(batches(), st.booleans())
def test_hapo_default_decides_fallback_on_valid_tokens(batch: tuple, norm_by_std: bool) -> None:
    rewards, mask, index = batch
    advantages, _ = compute_hapo_outcome_advantage(rewards, mask, index, 1e-6, norm_by_std)
    expected = hapo_advantage_loop(
        rewards, mask, index, 1e-6, norm_by_std, valid_only_fallback=True
    )
    valid = mask.bool()
    torch.testing.assert_close(advantages[valid], expected[valid], atol=1e-5, rtol=1e-5)
    assert torch.all(advantages[~valid] == 0)


def test_hapo_weighs_tokens_not_samples() -> None:
    # Two samples, scores 1 (3 tokens) and 0 (1 token): token-level mean 0.75, std sqrt(3)/4.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    advantages, _ = compute_hapo_outcome_advantage(rewards, mask, [7, 7])
    std = 3**0.5 / 4
    expected = torch.tensor([[0.25, 0.25, 0.25], [-0.75, 0.0, 0.0]]) / (std + 1e-6)
    expected[1, 1:] = 0
    torch.testing.assert_close(advantages, expected)


def test_group_of_one() -> None:
    rewards = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    mask = torch.ones(2, 2)
    grpo, _ = compute_grpo_outcome_advantage(rewards, mask, ["a", "b"])
    torch.testing.assert_close(grpo, torch.tensor([[2.0, 2.0], [1.0, 1.0]]) / (1 + 1e-6))
    hapo, _ = compute_hapo_outcome_advantage(rewards, mask, ["a", "b"])
    assert torch.equal(hapo, torch.zeros(2, 2))


def test_all_equal_rewards_give_zero() -> None:
    # 0.3 is not dyadic: a float32 mean of it can carry rounding noise, which must not be
    # divided by eps into a nonzero advantage.
    torch.manual_seed(0)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1.0
    rewards = torch.zeros(6, 5)
    rewards[:, 0] = 0.3
    index = [0, 0, 0, 1, 1, 1]
    for estimator in (compute_grpo_outcome_advantage, compute_hapo_outcome_advantage):
        advantages, _ = estimator(rewards, mask, index)
        assert torch.equal(advantages, torch.zeros(6, 5)), estimator.__name__


def test_every_group_falls_back_to_grpo() -> None:
    # 30 one-token samples per group, one correct: |z| of the correct one is 5.39 >= 5.
    groups, size = 4, 30
    rewards = torch.zeros(groups * size, 1)
    rewards[::size] = 1.0
    mask = torch.ones_like(rewards)
    index = np.repeat(np.arange(groups), size)
    hapo, _ = compute_hapo_outcome_advantage(rewards, mask, index)
    grpo, _ = compute_grpo_outcome_advantage(rewards, mask, index)
    assert torch.equal(hapo, grpo)


def test_padding_fallback_switch_reproduces_seed_decision() -> None:
    # Scores 10 and 11: valid |z| = 1, but padding holds -mean/std = -21, so the seed falls
    # back to GRPO (unbiased std) while the default does not.
    rewards = torch.tensor([[10.0, 0.0], [11.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    default, _ = compute_hapo_outcome_advantage(rewards, mask, [0, 0])
    seed_like, _ = compute_hapo_outcome_advantage(
        rewards, mask, [0, 0], reference_padding_fallback=True
    )
    grpo, _ = compute_grpo_outcome_advantage(rewards, mask, [0, 0])
    torch.testing.assert_close(default[:, 0], torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)
    assert torch.equal(seed_like, grpo)
    assert not torch.allclose(default, grpo)


def test_sample_with_empty_mask_and_group_without_tokens() -> None:
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    advantages, _ = compute_hapo_outcome_advantage(rewards, mask, [0, 0, 1, 1])
    assert torch.isfinite(advantages).all()
    assert torch.equal(advantages[1:], torch.zeros(3, 2))


@pytest.mark.parametrize("index_kind", ["tensor", "numpy_str", "list_int"])
def test_index_label_types_agree(index_kind: str) -> None:
    torch.manual_seed(0)
    labels = [3, 1, 3, 2, 1, 2, 3, 1]
    rewards = torch.randint(0, 2, (8, 6)).float()
    mask = (torch.rand(8, 6) > 0.2).float()
    index = {
        "tensor": torch.tensor(labels),
        "numpy_str": np.array([f"uid-{x}" for x in labels], dtype=object),
        "list_int": labels,
    }[index_kind]
    got, _ = compute_hapo_outcome_advantage(rewards, mask, index)
    expected, _ = compute_hapo_outcome_advantage(rewards, mask, np.array(labels))
    assert torch.equal(got, expected)


def test_string_hash_collision_falls_back_to_sorting(monkeypatch: pytest.MonkeyPatch) -> None:
    labels = np.array(["b", "a", "b", "c", "a"])
    monkeypatch.setattr(advantage_module, "_HASH_BASE", np.uint64(0))  # every hash collides
    groups, num_groups = group_ids(labels, torch.device("cpu"))
    assert num_groups == 3
    assert groups.tolist() == [1, 0, 1, 2, 0]


def test_keeps_dtype_and_device() -> None:
    rewards = torch.tensor([[1.0], [0.0]], dtype=torch.bfloat16)
    mask = torch.ones(2, 1, dtype=torch.bool)
    advantages, _ = compute_hapo_outcome_advantage(rewards, mask, [0, 0])
    assert advantages.dtype == torch.bfloat16
    assert advantages[0, 0] > 0 > advantages[1, 0]
