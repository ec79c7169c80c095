"""adaptive_temperature_log_probs: a token's log-prob at the temperature it was sampled at;
taken_log_probs_chunked: the taken tokens' log-probs a chunk of rows at a time."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hapo.algorithm import adaptive_temperature_log_probs, taken_log_probs_chunked
from hapo.algorithm import token_entropy as reference_entropy


def reference_log_probs(logits, token_ids, temperature, tau, norm_entropys, eps=1e-6):
    """HAPO's sampler one token at a time in fp64: the entropy of the raw logits, its
    ``h_hat``, ``T_dyn = T * (1 + h_hat * tau)`` and ``log_softmax(logits / T_dyn)``."""
    pivot, std, scale_pos, scale_neg = norm_entropys
    rows = logits.double().reshape(-1, logits.shape[-1])
    out = []
    for z, token in zip(rows, token_ids.flatten().tolist(), strict=True):
        probs = torch.softmax(z, dim=-1)
        entropy = -(probs * torch.log_softmax(z, dim=-1)).sum().item()
        h = (math.log(max(entropy, eps)) - pivot) / (std + eps)
        h_hat = min(max(h * scale_pos if h > 0 else h * scale_neg, -1.0), 1.0)
        t_dyn = temperature * (1 + h_hat * tau)
        out.append(torch.log_softmax(z / t_dyn, dim=-1)[token].item())
    return torch.tensor(out, dtype=torch.float32).reshape(token_ids.shape)


def make_logits(seed: int, batch: int = 3, seq_len: int = 5, vocab: int = 40, scale: float = 3):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq_len, vocab, generator=generator) * scale
    token_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    return logits, token_ids


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 200),
    st.floats(0.0, 0.99),
    st.floats(0.3, 2.0),
    st.floats(-3.0, 3.0),
    st.floats(0.01, 5.0),
    st.floats(0.05, 5.0),
    st.floats(0.05, 5.0),
    st.integers(1, 20),
)
def test_matches_reference(
    seed, vocab, tau, temperature, pivot, std, scale_pos, scale_neg, chunk_size
) -> None:
    logits, token_ids = make_logits(seed, vocab=vocab)
    stats = (pivot, std, scale_pos, scale_neg)
    got = adaptive_temperature_log_probs(
        logits,
        token_ids,
        temperature=temperature,
        temperature_tau=tau,
        norm_entropys=stats,
        chunk_size=chunk_size,
    )
    expected = reference_log_probs(logits, token_ids, temperature, tau, stats)
    # fp32 against an fp64 reference: a near-deterministic row's entropy (hence T_dyn)
    # carries a relative error ~1e-5 into log-probs as large as -26 at T_dyn 0.25 (CI found
    # 1.5e-5); a wrong temperature moves them by whole units.
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_hand_computed_value() -> None:
    # Raw logits (0, ln 3): p = (1/4, 3/4), entropy -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335,
    # log-entropy -0.575657. With pivot = that - 1 and std 1, h = 1 / (1 + 1e-6) ~ 1, and
    # scale_pos 0.5 gives h_hat = 0.5. tau 0.2 and T 0.8: T_dyn = 0.8 * (1 + 0.5 * 0.2)
    # = 0.88, so p(token 1) = 3^(1/0.88) / (1 + 3^(1/0.88)) = 3.484843 / 4.484843
    # = 0.777027, log -0.252280 (at T = 0.8 alone: 3^1.25 / (1 + 3^1.25), log -0.225763).
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    stats = (math.log(entropy) - 1.0, 1.0, 0.5, 1.0)
    got = adaptive_temperature_log_probs(
        torch.tensor([[0.0, math.log(3.0)]]),
        torch.tensor([1]),
        temperature=0.8,
        temperature_tau=0.2,
        norm_entropys=stats,
    )
    torch.testing.assert_close(got, torch.tensor([-0.252280]), atol=1e-5, rtol=0)


def test_without_norm_entropys_it_is_plain_log_softmax() -> None:
    logits, token_ids = make_logits(1)
    got = adaptive_temperature_log_probs(logits, token_ids, temperature=0.7, chunk_size=4)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, token_ids[..., None])
    torch.testing.assert_close(got, expected.squeeze(-1))


def test_hidden_states_through_lm_head() -> None:
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 16, generator=generator)
    weight = torch.randn(50, 16, generator=generator)
    token_ids = torch.randint(0, 50, (2, 6), generator=generator)
    kwargs = dict(temperature=0.9, temperature_tau=0.1, norm_entropys=(0.5, 0.8, 1.2, 0.7))
    got = adaptive_temperature_log_probs(hidden, token_ids, weight, chunk_size=5, **kwargs)
    expected = adaptive_temperature_log_probs(hidden @ weight.T, token_ids, **kwargs)
    torch.testing.assert_close(got, expected)


def test_per_sample_statistics_and_tau_zero() -> None:
    """Samples of different policy versions carry their own norm_entropys; a sample drawn
    at the plain temperature has tau 0 and gets exactly the plain log-prob."""
    logits, token_ids = make_logits(3, batch=3)
    per_sample = [(0.2, 0.9, 1.1, 0.6), (1.0, 0.5, 0.8, 1.4), (0.0, 1.0, 1.0, 1.0)]
    taus = [0.05, 0.3, 0.0]
    stacked = tuple(torch.tensor(column)[:, None] for column in zip(*per_sample, strict=True))
    got = adaptive_temperature_log_probs(
        logits,
        token_ids,
        temperature=0.8,
        temperature_tau=torch.tensor(taus)[:, None],
        norm_entropys=stacked,
        chunk_size=4,
    )
    for row, (stats, tau) in enumerate(zip(per_sample, taus, strict=True)):
        alone = adaptive_temperature_log_probs(
            logits[row], token_ids[row], temperature=0.8, temperature_tau=tau, norm_entropys=stats
        )
        assert torch.equal(got[row], alone)
    plain = adaptive_temperature_log_probs(logits[2], token_ids[2], temperature=0.8)
    assert torch.equal(got[2], plain)


def test_same_as_the_vllm_processor_and_temperature_division() -> None:
    """Bit for bit what the rollout computes: the processor divides the raw fp32 logits by
    its factor, vLLM divides by the temperature, processed_logprobs is log_softmax."""
    processor = pytest.importorskip("hapo.inference.logits_processor")
    logits, token_ids = make_logits(4, batch=4, seq_len=1, vocab=300)
    logits, token_ids = logits[:, 0], token_ids[:, 0]
    tau = torch.tensor([0.05, 0.2, 0.0, 0.5])
    stats = torch.tensor([[0.3, 1.1, 0.9, 0.7]] * 4).T  # [4 statistics, 4 rows]
    temperature = torch.full((4,), 0.9)
    factor = processor.temperature_factor(
        logits, torch.cat([tau[None], stats]), torch.ones(4, dtype=torch.bool)
    )
    sampler_logits = logits.clone().div_(factor.unsqueeze(-1)).div_(temperature.unsqueeze(1))
    expected = sampler_logits.log_softmax(dim=-1).gather(-1, token_ids[:, None]).squeeze(-1)
    got = adaptive_temperature_log_probs(
        logits,
        token_ids,
        temperature=temperature,
        temperature_tau=tau,
        norm_entropys=tuple(stats),
    )
    assert torch.equal(got, expected)


def test_input_untouched_no_graph_and_bad_arguments() -> None:
    logits, token_ids = make_logits(5)
    logits.requires_grad_()
    before = logits.detach().clone()
    got = adaptive_temperature_log_probs(
        logits, token_ids, temperature=0.5, norm_entropys=(0.0, 1.0, 1.0, 1.0)
    )
    assert torch.equal(logits.detach(), before) and not got.requires_grad
    with pytest.raises(ValueError, match="chunk_size"):
        adaptive_temperature_log_probs(logits, token_ids, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        adaptive_temperature_log_probs(logits, token_ids, temperature=0.0)
    with pytest.raises(ValueError, match="token_ids"):
        adaptive_temperature_log_probs(logits, token_ids[:, :2])


@settings(max_examples=25, deadline=None)
@given(
    chunk_size=st.integers(1, 40),
    temperature=st.sampled_from([1.0, 0.7]),
    with_entropy=st.booleans(),
)
def test_chunked_log_probs_equal_unchunked(
    chunk_size: int, temperature: float, with_entropy: bool
) -> None:
    generator = torch.Generator().manual_seed(chunk_size)
    hidden = torch.randn(23, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=generator)
    coefficients = torch.randn(23, generator=generator)

    log_prob, entropy = taken_log_probs_chunked(
        hidden, weight, targets, temperature=temperature, chunk_size=chunk_size,
        with_entropy=with_entropy,
    )  # fmt: skip
    (log_prob * coefficients).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logits = hidden @ weight.T / temperature
    expected = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    (expected * coefficients).sum().backward()
    torch.testing.assert_close(log_prob, expected.detach())
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)
    if with_entropy:
        torch.testing.assert_close(entropy, reference_entropy(logits.detach()))
        assert not entropy.requires_grad
    else:
        assert entropy is None


def test_chunked_log_probs_backward_twice_gives_the_same_gradients() -> None:
    """The last chunk's probabilities are kept for backward: a second backward through the
    same graph (``retain_graph``) must find them unchanged."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (7,), generator=generator)
    for chunk_size in (3, 7):  # the last of three chunks; one chunk
        log_prob, _ = taken_log_probs_chunked(hidden, weight, targets, chunk_size=chunk_size)
        log_prob.sum().backward(retain_graph=True)
        first = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        log_prob.sum().backward()
        torch.testing.assert_close(hidden.grad, first[0], rtol=0, atol=0)
        torch.testing.assert_close(weight.grad, first[1], rtol=0, atol=0)
        hidden.grad = weight.grad = None
