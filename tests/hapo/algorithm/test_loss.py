"""ada_clip, ada_advantage and hapo_policy_loss."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hapo.algorithm import ada_advantage, ada_clip, hapo_policy_loss


def loop_ada_clip(low, high, h_hat, alpha):
    """The seed's masked-assignment form, one element at a time."""
    lows, highs = [], []
    for h in h_hat.flatten().tolist():
        lows.append(low * (1 - h * alpha) if h <= 0 else low)
        highs.append(high * (1 + h * alpha) if h > 0 else high)
    return torch.tensor(lows).reshape(h_hat.shape), torch.tensor(highs).reshape(h_hat.shape)


def loop_ada_advantage(adv, h_hat, ratio, low, high, beta):
    out = []
    for a, h, r, lo, hi in zip(
        *(t.flatten().tolist() for t in (adv, h_hat, ratio, low, high)), strict=True
    ):
        neutral = 1 - lo / 2 < r < 1 + hi / 2
        a_ent = a * (1 + beta * h)
        if h > 0:
            out.append(a if neutral else a_ent)
        else:
            out.append(a_ent if neutral else a)
    return torch.tensor(out).reshape(adv.shape)


def ppo_dual_clip_loss(log_prob, old_log_prob, adv, mask, low, high, clip_c):
    """verl's vanilla dual-clip PPO with token-mean aggregation."""
    ratio = torch.exp(log_prob - old_log_prob)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1 - low, 1 + high)
    clip1 = torch.maximum(loss1, loss2)
    clip2 = torch.min(-adv * clip_c, clip1)
    losses = torch.where(adv < 0, clip2, clip1)
    return (losses * mask).sum() / mask.sum()


def loop_weighted_ppo_loss(log_prob, old_log_prob, adv, mask, weights, low, high, clip_c):
    """Dual-clip PPO, each token's loss times its behaviour weight, one float at a time."""
    total, count = 0.0, 0
    for lp, old, a, valid, w in zip(
        *(t.flatten().tolist() for t in (log_prob, old_log_prob, adv, mask, weights)),
        strict=True,
    ):
        if not valid:
            continue
        ratio = math.exp(lp - old)
        clipped = max(-a * ratio, -a * min(max(ratio, 1 - low), 1 + high))
        token_loss = min(clipped, -a * clip_c) if a < 0 else clipped
        total += token_loss * w
        count += 1
    return total / count


def make_batch(seed: int, batch: int = 8, seq_len: int = 12):
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, seq_len, generator=generator) * 3
    log_prob = old + torch.randn(batch, seq_len, generator=generator) * 0.3
    adv = torch.randn(batch, seq_len, generator=generator)
    h_hat = torch.rand(batch, seq_len, generator=generator) * 2 - 1
    h_hat[0, :3] = 0.0
    mask = torch.rand(batch, seq_len, generator=generator) > 0.25
    mask[0, 0] = True
    return log_prob, old, adv, mask, h_hat


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 0.5), st.floats(0.0, 0.5), st.floats(0.0, 2.0))
def test_ada_clip_and_ada_advantage_match_loops(seed, low, high, coef) -> None:
    log_prob, old, adv, _, h_hat = make_batch(seed)
    ratio = torch.exp(log_prob - old)
    got_low, got_high = ada_clip(low, high, h_hat, coef)
    exp_low, exp_high = loop_ada_clip(low, high, h_hat, coef)
    torch.testing.assert_close(got_low, exp_low)
    torch.testing.assert_close(got_high, exp_high)
    got = ada_advantage(adv, h_hat, ratio, got_low, got_high, coef)
    torch.testing.assert_close(got, loop_ada_advantage(adv, h_hat, ratio, got_low, got_high, coef))


def test_h_hat_zero_changes_nothing() -> None:
    h_hat = torch.zeros(3, 4)
    low, high = ada_clip(0.2, 0.28, h_hat, 1.0)
    assert torch.equal(low, torch.full((3, 4), 0.2)) and torch.equal(high, torch.full((3, 4), 0.28))
    adv = torch.randn(3, 4)
    ratio = torch.rand(3, 4) + 0.5
    assert torch.equal(ada_advantage(adv, h_hat, ratio, low, high, 1.0), adv)


@pytest.mark.parametrize("seed", range(5))
def test_switches_off_equals_ppo_exactly(seed: int) -> None:
    log_prob, old, adv, mask, h_hat = make_batch(seed)
    loss, _ = hapo_policy_loss(
        log_prob,
        old,
        adv,
        mask,
        h_hat,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        adaptive_clip=False,
        adaptive_advantage=False,
    )
    expected = ppo_dual_clip_loss(log_prob, old, adv, mask.float(), 0.2, 0.28, 3.0)
    assert torch.equal(loss, expected)


def test_adaptive_switches_change_the_loss() -> None:
    log_prob, old, adv, mask, h_hat = make_batch(0)
    plain, _ = hapo_policy_loss(
        log_prob, old, adv, mask, h_hat, adaptive_clip=False, adaptive_advantage=False
    )
    clip_only, _ = hapo_policy_loss(log_prob, old, adv, mask, h_hat, adaptive_advantage=False)
    both, _ = hapo_policy_loss(log_prob, old, adv, mask, h_hat)
    assert len({plain.item(), clip_only.item(), both.item()}) == 3


def test_adaptive_clip_widens_upper_bound_for_high_entropy() -> None:
    ratio = torch.tensor([[1.3, 1.3]])
    log_prob, old = ratio.log(), torch.zeros(1, 2)
    adv, mask = torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool)
    h_hat = torch.tensor([[1.0, -1.0]])  # high entropy: eps_high 0.4; low entropy: 0.2
    kwargs = dict(adaptive_advantage=False, clip_ratio_low=0.2, clip_ratio_high=0.2)
    loss, metrics = hapo_policy_loss(log_prob.requires_grad_(), old, adv, mask, h_hat, **kwargs)
    loss.backward()
    # Only the low-entropy token is clipped (zero gradient).
    assert log_prob.grad[0, 0] != 0 and log_prob.grad[0, 1] == 0
    assert metrics["loss/clipfrac_high_entropy"] == 0 and metrics["loss/clipfrac_low_entropy"] == 1
    assert metrics["loss/clipfrac"] == 0.5
    torch.testing.assert_close(metrics["loss/clip_high_mean"], torch.tensor(0.3))
    torch.testing.assert_close(metrics["loss/clip_low_mean"], torch.tensor(0.3))


@pytest.mark.parametrize("adaptive", [False, True])
def test_micro_batches_sum_to_full_batch(adaptive: bool) -> None:
    log_prob, old, adv, mask, h_hat = make_batch(1, batch=8)
    kwargs = dict(adaptive_clip=adaptive, adaptive_advantage=adaptive)
    full_param = log_prob.clone().requires_grad_()
    full, _ = hapo_policy_loss(full_param, old, adv, mask, h_hat, **kwargs)
    full.backward()
    micro_param = log_prob.clone().requires_grad_()
    total_tokens = mask.sum()
    micro_total = torch.zeros(())
    for rows in torch.arange(8).split(2):
        loss, _ = hapo_policy_loss(
            micro_param[rows],
            old[rows],
            adv[rows],
            mask[rows],
            h_hat[rows],
            global_num_tokens=total_tokens,
            **kwargs,
        )
        loss.backward()
        micro_total += loss.detach()
    torch.testing.assert_close(micro_total, full.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(micro_param.grad, full_param.grad, atol=1e-7, rtol=1e-6)


def test_garbage_at_masked_positions_stays_finite() -> None:
    log_prob, old, adv, mask, h_hat = make_batch(2)
    log_prob = torch.where(mask, log_prob, torch.full_like(log_prob, 1e9)).requires_grad_()
    loss, metrics = hapo_policy_loss(log_prob, old, adv, mask, h_hat)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_prob.grad).all()
    assert torch.all(log_prob.grad[~mask] == 0)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_metrics_are_consistent() -> None:
    log_prob, old, adv, mask, h_hat = make_batch(3)
    _, metrics = hapo_policy_loss(log_prob, old, adv, mask, h_hat)
    high = (h_hat > 0) & mask
    weighted = (
        metrics["loss/clipfrac_high_entropy"] * high.sum()
        + metrics["loss/clipfrac_low_entropy"] * (mask & ~high).sum()
    ) / mask.sum()
    torch.testing.assert_close(weighted, metrics["loss/clipfrac"])
    assert metrics["loss/approx_kl"] >= 0
    assert metrics["loss/num_tokens"] == mask.sum()
    assert not any(v.requires_grad for v in metrics.values())


def test_bad_dual_clip_bound() -> None:
    log_prob, old, adv, mask, h_hat = make_batch(0)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        hapo_policy_loss(log_prob, old, adv, mask, h_hat, clip_ratio_c=1.0)


PLAIN = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.booleans())
def test_unit_weights_are_bit_identical_to_none(seed: int, adaptive: bool) -> None:
    """What ``rollout_correction.mode=off`` gives the loss changes nothing, to the bit."""
    log_prob, old, adv, mask, h_hat = make_batch(seed)
    kwargs = dict(adaptive_clip=adaptive, adaptive_advantage=adaptive)
    losses, grads = [], []
    for weights in (None, mask.float()):
        param = log_prob.clone().requires_grad_()
        loss, metrics = hapo_policy_loss(
            param, old, adv, mask, h_hat, rollout_is_weights=weights, **kwargs
        )
        loss.backward()
        losses.append((loss, metrics))
        grads.append(param.grad)
    assert torch.equal(losses[0][0], losses[1][0]) and torch.equal(grads[0], grads[1])
    assert all(torch.equal(losses[0][1][k], losses[1][1][k]) for k in losses[0][1])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 2.0))
def test_weights_multiply_each_token_loss(seed: int, scale: float) -> None:
    log_prob, old, adv, mask, h_hat = make_batch(seed)
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(old.shape, generator=generator) * scale
    loss, _ = hapo_policy_loss(
        log_prob,
        old,
        adv,
        mask,
        h_hat,
        adaptive_clip=False,
        adaptive_advantage=False,
        rollout_is_weights=weights,
        **PLAIN,
    )
    expected = loop_weighted_ppo_loss(log_prob, old, adv, mask, weights, 0.2, 0.28, 3.0)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5, abs_tol=1e-6)


def test_hand_computed_weighted_loss() -> None:
    # Two tokens, ratio e^0 = 1 (unclipped), advantages (1, -2), weights (2, 0.5):
    # token losses -A * ratio = (-1, 2), weighted (-2, 1), token mean (-2 + 1) / 2 = -0.5.
    zeros = torch.zeros(1, 2)
    loss, metrics = hapo_policy_loss(
        zeros,
        zeros,
        torch.tensor([[1.0, -2.0]]),
        torch.ones(1, 2, dtype=torch.bool),
        zeros,
        rollout_is_weights=torch.tensor([[2.0, 0.5]]),
    )
    assert loss.item() == -0.5 and metrics["loss/pg_loss"].item() == -0.5


def test_weights_scale_the_gradient_and_get_none() -> None:
    log_prob, old, adv, mask, h_hat = make_batch(5)
    weights = torch.rand(old.shape, generator=torch.Generator().manual_seed(5)) * 2
    weights.requires_grad_()
    grads = []
    for rollout_is_weights in (None, weights):
        param = log_prob.clone().requires_grad_()
        loss, _ = hapo_policy_loss(
            param, old, adv, mask, h_hat, rollout_is_weights=rollout_is_weights
        )
        loss.backward()
        grads.append(param.grad)
    torch.testing.assert_close(grads[1], grads[0] * weights.detach())
    assert weights.grad is None  # the weights are constants of the gradient
