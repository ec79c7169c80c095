"""Chunked entropy over [B, T, V] logits or hidden states."""

from __future__ import annotations

import pytest
import torch

from hapo.algorithm import entropy_from_logits_chunked, token_entropy


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_equals_whole(chunk_size: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 11, 257) * 2
    got = entropy_from_logits_chunked(logits, chunk_size=chunk_size)
    assert got.shape == (3, 11)
    torch.testing.assert_close(got, token_entropy(logits))


def test_hidden_states_with_lm_head_and_temperature() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 32, dtype=torch.bfloat16)
    weight = torch.randn(300, 32, dtype=torch.bfloat16)
    got = entropy_from_logits_chunked(hidden, weight, temperature=0.7, chunk_size=5)
    expected = token_entropy((hidden @ weight.T).float() / 0.7)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


def test_no_graph_and_bad_arguments() -> None:
    logits = torch.randn(1, 2, 10, requires_grad=True)
    assert not entropy_from_logits_chunked(logits).requires_grad
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits_chunked(logits, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits_chunked(logits, temperature=0.0)


def test_chunked_entropy_leaves_the_callers_logits_alone() -> None:
    logits = torch.randn(3, 5, 11)
    before = logits.clone()
    entropy_from_logits_chunked(logits, temperature=0.7, chunk_size=4)
    assert torch.equal(logits, before)
