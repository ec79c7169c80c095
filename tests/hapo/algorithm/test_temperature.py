"""Token entropy, norm_entropys, h_hat and the adaptive temperature."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hapo.algorithm import (
    compute_entropy_based_temperature,
    compute_norm_entropys,
    entropy_h_hat,
    token_entropy,
)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The seed's form: -(softmax * log_softmax).sum() in fp32."""
    logits = logits.float()
    return -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)


def seed_temperature(logits, temperature, tau, norm_entropys, eps=1e-6) -> torch.Tensor:
    """The seed's compute_entropy_based_temperature, written out."""
    median, std, scale_pos, scale_neg = norm_entropys
    entropy = torch.log(softmax_entropy(logits).clamp_min(eps))
    h = (entropy - median) / (std + eps)
    h_hat = torch.where(h > 0, h * scale_pos, torch.where(h <= 0, h * scale_neg, 0.0)).clamp(-1, 1)
    return temperature * (1.0 + h_hat * tau)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_entropy_matches_softmax_form(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(16, 1000) * 4).to(dtype)
    torch.testing.assert_close(token_entropy(logits), softmax_entropy(logits), atol=1e-4, rtol=1e-4)
    assert token_entropy(logits).dtype == torch.float32


def test_token_entropy_with_masked_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    masked = logits.clone()
    masked[:, 25:] = float("-inf")
    masked[3, :] = float("-inf")
    masked[3, 7] = 2.0  # a single allowed token: entropy 0
    entropy = token_entropy(masked)
    assert torch.isfinite(entropy).all()
    torch.testing.assert_close(entropy[:3], softmax_entropy(logits[:3, :25]))
    assert entropy[3] == 0
    assert token_entropy(torch.full((2, 5), float("-inf"))).eq(0).all()


def test_token_entropy_single_token_vocab_and_uniform() -> None:
    assert torch.equal(token_entropy(torch.randn(3, 1)), torch.zeros(3))
    torch.testing.assert_close(token_entropy(torch.zeros(2, 64)), torch.full((2,), math.log(64)))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 8),
    st.integers(1, 300),
    st.floats(0.0, 0.99),
    st.floats(-3.0, 3.0),
    st.floats(0.01, 5.0),
    st.floats(0.05, 5.0),
    st.floats(0.05, 5.0),
    st.integers(0, 2**31 - 1),
)
def test_temperature_matches_seed(rows, vocab, tau, pivot, std, scale_pos, scale_neg, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * 3
    temperature = torch.rand(rows, generator=generator) + 0.5
    stats = (pivot, std, scale_pos, scale_neg)
    got = compute_entropy_based_temperature(logits, temperature, True, tau, stats)
    torch.testing.assert_close(
        got, seed_temperature(logits, temperature, tau, stats), atol=2e-5, rtol=1e-5
    )
    assert torch.all(got >= temperature * (1 - tau) - 1e-6)
    assert torch.all(got <= temperature * (1 + tau) + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_temperature_any_dtype_and_masked_rows(dtype: torch.dtype) -> None:
    logits = torch.randn(4, 100).to(dtype)
    logits[1, 10:] = float("-inf")
    temperature = torch.ones(4)
    got = compute_entropy_based_temperature(logits, temperature, True, 0.05, (1.0, 1.0, 1.0, 1.0))
    assert torch.isfinite(got).all()
    assert got.dtype == torch.float32


def test_tau_zero_and_disabled_leave_temperature_unchanged() -> None:
    logits = torch.randn(8, 100) * 5
    temperature = torch.rand(8) + 0.3
    stats = (0.5, 0.7, 1.3, 0.9)
    assert torch.equal(
        compute_entropy_based_temperature(logits, temperature, True, 0.0, stats), temperature
    )
    assert compute_entropy_based_temperature(logits, temperature, False, 0.05, stats) is temperature
    assert compute_entropy_based_temperature(logits, temperature, True, 0.05, None) is temperature


def test_h_hat_zero_at_pivot() -> None:
    uniform = torch.zeros(1, 64)  # entropy log(64)
    pivot = math.log(math.log(64))
    log_entropy = torch.log(token_entropy(uniform))
    assert entropy_h_hat(log_entropy, (pivot, 1.0, 2.0, 2.0)).abs().max() < 1e-6
    h_hat = entropy_h_hat(
        torch.tensor([pivot, pivot + 1, pivot - 1, float("nan")]), (pivot, 1.0, 5.0, 0.5)
    )
    torch.testing.assert_close(h_hat[:3], torch.tensor([0.0, 1.0, -0.5]), atol=1e-5, rtol=0)
    assert h_hat[3] == 0  # NaN maps to 0, as in the seed


def loop_norm_entropys(entropys, mask, q, eps=1e-6):
    values = sorted(
        math.log(max(e, eps))
        for e, m in zip(entropys.flatten().tolist(), mask.flatten().tolist(), strict=True)
        if m
    )
    pivot = values[round(q * (len(values) - 1))]
    std = math.sqrt(sum((v - pivot) ** 2 for v in values) / len(values))
    h = [(v - pivot) / (std + eps) for v in values]
    pos = [x for x in h if x > 0]
    neg = [x for x in h if x < 0]
    return pivot, std, 1 / max(pos) if pos else 1.0, 1 / -min(neg) if neg else 1.0


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
@example(5, 10, 0.96875, 11161614)  # a scale of 12,400: CI found it
def test_norm_entropys_matches_loop(batch, seq_len, q, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    entropys = torch.rand(batch, seq_len, generator=generator) * 3
    entropys[entropys < 0.2] = 0.0  # exercise the eps clamp
    mask = torch.rand(batch, seq_len, generator=generator) > 0.3
    mask[0, 0] = True
    got = compute_norm_entropys(entropys, mask, q)
    expected = loop_norm_entropys(entropys, mask, q)
    for name, a, b in zip(got._fields[:2], got[:2], expected[:2], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), name
    # A scale is 1 / the largest normalised value on its side, which can be tiny (here
    # 8e-5 at batch 5, seq_len 10, q 0.96875, seed 11161614): float32's absolute error
    # there becomes a large relative one in its reciprocal, so compare the values.
    for name, a, b in zip(got._fields[2:], got[2:], expected[2:], strict=True):
        assert 1 / a == pytest.approx(1 / b, rel=1e-4, abs=1e-5), name
    h_hat = entropy_h_hat(torch.log(entropys.clamp_min(1e-6))[mask], got)
    if (h_hat > 0).any():
        assert h_hat.max().item() == pytest.approx(1.0, abs=1e-5)
    if (h_hat < 0).any():
        assert h_hat.min().item() == pytest.approx(-1.0, abs=1e-5)


def test_norm_entropys_reference_sign() -> None:
    torch.manual_seed(0)
    entropys = torch.rand(4, 32) * 2
    mask = torch.ones(4, 32, dtype=torch.bool)
    paper = compute_norm_entropys(entropys, mask, 0.8)
    released = compute_norm_entropys(entropys, mask, 0.8, reference_scale_neg_sign=True)
    assert released.scale_neg == -paper.scale_neg < 0
    h_hat = entropy_h_hat(torch.log(entropys.clamp_min(1e-6)), released)
    assert (h_hat >= 0).all()
    assert (entropy_h_hat(torch.log(entropys.clamp_min(1e-6)), paper) < 0).any()


def test_norm_entropys_constant_and_empty() -> None:
    stats = compute_norm_entropys(torch.ones(2, 3), torch.ones(2, 3))
    assert stats == (0.0, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="selects no token"):
        compute_norm_entropys(torch.ones(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="entropy_pivot"):
        compute_norm_entropys(torch.ones(2, 3), torch.ones(2, 3), entropy_pivot=1.5)


@pytest.mark.slow
def test_norm_entropys_beyond_quantile_limit() -> None:
    n = 2**24 + 1000  # torch.quantile refuses inputs above 2^24 elements
    entropys = torch.rand(1, n, generator=torch.Generator().manual_seed(0)) + 0.5
    stats = compute_norm_entropys(entropys, torch.ones(1, n, dtype=torch.bool), 0.8)
    values = torch.log(entropys.flatten())
    assert stats.pivot == values.sort().values[round(0.8 * (n - 1))].item()
