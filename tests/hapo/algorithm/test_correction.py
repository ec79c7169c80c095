"""compute_rollout_correction against a plain-Python reference, and its properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hapo.algorithm import ROLLOUT_CORRECTION_MODES, compute_rollout_correction, hapo_policy_loss

BOUND = 20.0  # the log-ratio clamp


def reference_correction(old, mu, mask, has, mode, cap, low, high):
    """The behaviour correction one float at a time (lists of lists in, lists out)."""
    weights, keep, truncated = [], [], []
    kl, kl_k1, seq_diffs, measured_weights = [], [], [], []
    for old_row, mu_row, mask_row, measured in zip(old, mu, mask, has, strict=True):
        log_w = [
            min(max(o - m, -BOUND), BOUND) if (valid and measured) else 0.0
            for o, m, valid in zip(old_row, mu_row, mask_row, strict=True)
        ]
        n = sum(1 for valid in mask_row if valid) if measured else 0
        seq_log_w = sum(log_w)
        seq_w = math.exp(min(max(seq_log_w, -BOUND), BOUND))
        if mode == "token_tis":
            row_w = [min(math.exp(x), cap) for x in log_w]
            row_truncated = [math.exp(x) > cap for x in log_w]
        elif mode == "seq_tis":
            row_w = [min(seq_w, cap)] * len(log_w)
            row_truncated = [seq_w > cap] * len(log_w)
        else:
            row_w, row_truncated = [1.0] * len(log_w), [False] * len(log_w)
        statistic = {"seq_mask": seq_log_w, "geo_mask": seq_log_w / max(n, 1)}.get(mode)
        kept = statistic is None or not measured or math.log(low) <= statistic <= math.log(high)
        row_keep = [bool(valid) and kept for valid in mask_row]
        weights.append([w if k else 0.0 for w, k in zip(row_w, row_keep, strict=True)])
        keep.append(row_keep)
        for x, w, k, t, valid in zip(log_w, row_w, row_keep, row_truncated, mask_row, strict=True):
            if valid and measured:
                kl.append(math.exp(x) - 1 - x)
                kl_k1.append(-x)
                measured_weights.append(w if k else 0.0)
                truncated.append(t)
        if n:
            seq_diffs.append(-seq_log_w / n)

    def mean(values):
        return sum(values) / len(values) if values else 0.0

    dropped = [
        not k
        for keep_row, mask_row, measured in zip(keep, mask, has, strict=True)
        for k, valid in zip(keep_row, mask_row, strict=True)
        if valid and measured
    ]
    metrics = {
        "rollout_corr/weight_mean": mean(measured_weights),
        "rollout_corr/weight_max": max(measured_weights, default=0.0),
        "rollout_corr/truncated_frac": mean([float(t) for t in truncated]),
        "rollout_corr/masked_frac": mean([float(d) for d in dropped]),
        "rollout_corr/kl": mean(kl),
        "rollout_corr/kl_k1": mean(kl_k1),
        "rollout_corr/log_ppl_diff": mean(seq_diffs),
    }
    return weights, keep, metrics


def make_batch(seed: int, batch: int = 6, seq_len: int = 7, mismatch: float = 0.5):
    """``(old_log_prob, rollout_log_prob, response_mask, has_rollout_log_prob)``."""
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, seq_len, generator=generator) * 3
    mu = old + torch.randn(batch, seq_len, generator=generator) * mismatch
    lengths = torch.randint(0, seq_len + 1, (batch,), generator=generator)
    mask = torch.arange(seq_len) < lengths[:, None]
    has = torch.rand(batch, generator=generator) > 0.2
    return old, mu, mask, has


def test_hand_computed_example() -> None:
    # pi_prox = (0.5, 0.2, 0.9), mu = (0.25, 0.4, 0.3): w = (2, 0.5, 3), prod w = 3.
    old = torch.tensor([[0.5, 0.2, 0.9]]).log()
    mu = torch.tensor([[0.25, 0.4, 0.3]]).log()
    mask = torch.ones(1, 3, dtype=torch.bool)

    weights, keep, metrics = compute_rollout_correction(old, mu, mask, mode="token_tis")
    # min(w, 2) = (2, 0.5, 2); only 3 > 2 is truncated (2 is not above the cap): 1/3.
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 2.0]]))
    assert keep.all()
    torch.testing.assert_close(metrics["rollout_corr/weight_mean"], torch.tensor(1.5))
    torch.testing.assert_close(metrics["rollout_corr/truncated_frac"], torch.tensor(1 / 3))
    # k3 = mean(w - 1 - ln w) = ((2 - 1 - ln 2) + (0.5 - 1 - ln 0.5) + (3 - 1 - ln 3)) / 3
    #    = (0.306853 + 0.193147 + 0.901388) / 3 = 0.467129
    torch.testing.assert_close(metrics["rollout_corr/kl"], torch.tensor(0.467129))
    # k1 = mean(ln mu - ln pi_prox) = -(ln 2 + ln 0.5 + ln 3) / 3 = -ln 3 / 3 = -0.366204,
    # and with one sequence log_ppl_diff is the same.
    torch.testing.assert_close(metrics["rollout_corr/kl_k1"], torch.tensor(-0.366204))
    torch.testing.assert_close(metrics["rollout_corr/log_ppl_diff"], torch.tensor(-0.366204))

    # seq_tis: min(2 * 0.5 * 3, 2) = 2 on every token, all three truncated.
    weights, _, metrics = compute_rollout_correction(old, mu, mask, mode="seq_tis")
    torch.testing.assert_close(weights, torch.full((1, 3), 2.0))
    assert metrics["rollout_corr/truncated_frac"] == 1.0

    # seq_mask [0.5, 2]: 3 > 2, the sequence is dropped.
    weights, keep, metrics = compute_rollout_correction(old, mu, mask, mode="seq_mask")
    assert not keep.any() and not weights.any() and metrics["rollout_corr/masked_frac"] == 1.0

    # geo_mask: 3 ** (1/3) = 1.442 is inside [0.5, 2] (kept, weight 1) but not [0.8, 1.25].
    weights, keep, _ = compute_rollout_correction(old, mu, mask, mode="geo_mask")
    assert keep.all() and torch.equal(weights, torch.ones(1, 3))
    _, keep, _ = compute_rollout_correction(
        old, mu, mask, mode="geo_mask", rollout_rs_threshold=1.25, rollout_rs_threshold_lower=0.8
    )
    assert not keep.any()


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(ROLLOUT_CORRECTION_MODES),
    st.floats(1.01, 5.0),
    st.floats(0.05, 0.99),
    st.floats(1.01, 5.0),
    st.floats(0.0, 2.0),
    st.integers(1, 6),
    st.integers(1, 9),
)
def test_matches_reference(seed, mode, cap, low, high, mismatch, batch, seq_len) -> None:
    old, mu, mask, has = make_batch(seed, batch, seq_len, mismatch)
    weights, keep, metrics = compute_rollout_correction(
        old,
        mu,
        mask.float(),
        mode=mode,
        rollout_is_threshold=cap,
        rollout_rs_threshold=high,
        rollout_rs_threshold_lower=low,
        has_rollout_log_prob=has,
    )
    exp_weights, exp_keep, exp_metrics = reference_correction(
        old.tolist(), mu.tolist(), mask.tolist(), has.tolist(), mode, cap, low, high
    )
    torch.testing.assert_close(weights, torch.tensor(exp_weights), rtol=1e-5, atol=1e-6)
    assert keep.tolist() == exp_keep
    assert metrics.keys() == exp_metrics.keys()
    for name, value in metrics.items():
        assert value.ndim == 0 and not value.requires_grad, name
        torch.testing.assert_close(
            value, torch.tensor(exp_metrics[name]), rtol=1e-5, atol=1e-5, msg=name
        )


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1.01, 5.0), st.floats(0.0, 3.0))
def test_weights_properties(seed, cap, mismatch) -> None:
    old, mu, mask, has = make_batch(seed, mismatch=mismatch)
    for mode in ROLLOUT_CORRECTION_MODES:
        weights, keep, _ = compute_rollout_correction(
            old, mu, mask, mode=mode, rollout_is_threshold=cap, has_rollout_log_prob=has
        )
        assert torch.all((weights >= 0) & (weights <= cap))
        assert not (keep & ~mask).any() and not weights[~keep].any()
        assert torch.all(weights[keep & ~has[:, None]] == 1)  # no behaviour log-prob: as is
        for row in range(old.shape[0]):
            row_keep, row_weights = keep[row][mask[row]], weights[row][mask[row]]
            assert row_keep.all() or not row_keep.any()  # sequences are kept or dropped whole
            if mode == "seq_tis":
                assert torch.all(row_weights == row_weights[:1])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(ROLLOUT_CORRECTION_MODES))
def test_on_policy_changes_nothing(seed, mode) -> None:
    old, _, mask, has = make_batch(seed)
    weights, keep, metrics = compute_rollout_correction(
        old, old.clone(), mask, mode=mode, has_rollout_log_prob=has
    )
    assert torch.equal(weights, mask.float()) and torch.equal(keep, mask)
    for name in ("kl", "kl_k1", "log_ppl_diff", "truncated_frac", "masked_frac"):
        assert metrics[f"rollout_corr/{name}"] == 0, name


def test_off_is_all_ones_whatever_the_mismatch() -> None:
    old, mu, mask, _ = make_batch(0, mismatch=5.0)
    weights, keep, metrics = compute_rollout_correction(old, mu, mask, mode="off")
    assert torch.equal(weights, mask.float()) and torch.equal(keep, mask)
    assert metrics["rollout_corr/kl"] > 0  # the mismatch is still measured


@pytest.mark.parametrize("mode", ["seq_mask", "geo_mask"])
def test_dropped_sequences_get_no_gradient(mode: str) -> None:
    old, mu, mask, has = make_batch(3, batch=8, mismatch=1.0)
    weights, keep, _ = compute_rollout_correction(
        old, mu, mask, mode=mode, rollout_rs_threshold=1.5, has_rollout_log_prob=has
    )
    dropped = (mask & ~keep).any(dim=-1)
    assert dropped.any() and (keep.any(dim=-1)).any()  # the example drops some, keeps some
    log_prob = (old + 0.1).requires_grad_()
    advantages = torch.randn(old.shape, generator=torch.Generator().manual_seed(0))
    loss, _ = hapo_policy_loss(
        log_prob, old, advantages, keep, torch.zeros_like(old), rollout_is_weights=weights
    )
    loss.backward()
    assert torch.all(log_prob.grad[dropped] == 0)
    assert torch.all(log_prob.grad[keep] != 0)


def test_rows_without_behaviour_log_probs_are_left_out() -> None:
    old, mu, mask, _ = make_batch(4, mismatch=1.0)
    has = torch.tensor([True, False, True, True, False, True])
    garbage = torch.where(has[:, None], mu, torch.full_like(mu, float("nan")))
    weights, keep, metrics = compute_rollout_correction(
        old, garbage, mask, mode="token_tis", has_rollout_log_prob=has
    )
    assert torch.equal(weights[~has], mask[~has].float()) and torch.equal(keep, mask)
    _, _, measured_only = compute_rollout_correction(old[has], mu[has], mask[has], mode="token_tis")
    for name, value in measured_only.items():
        torch.testing.assert_close(metrics[name], value, msg=name)


def test_extreme_log_ratios_stay_finite() -> None:
    old = torch.tensor([[-0.1, -0.2, -0.3], [-0.1, -0.2, -0.3]])
    mu = torch.tensor([[float("-inf"), -0.2, -0.3], [-1e9, -0.2, -0.3]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    for mode in ROLLOUT_CORRECTION_MODES:
        weights, _, metrics = compute_rollout_correction(old, mu, mask, mode=mode)
        assert torch.isfinite(weights).all(), mode
        assert all(torch.isfinite(v) for v in metrics.values()), mode


def test_no_gradient_and_no_valid_token() -> None:
    old = torch.randn(2, 3, requires_grad=True)
    weights, _, metrics = compute_rollout_correction(
        old, old.detach() - 1, torch.ones(2, 3), mode="token_tis"
    )
    assert not weights.requires_grad and not any(v.requires_grad for v in metrics.values())
    weights, keep, metrics = compute_rollout_correction(
        old, old.detach(), torch.zeros(2, 3), mode="seq_mask"
    )
    assert not weights.any() and not keep.any()
    assert all(v == 0 for v in metrics.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "sequence"}, "mode must be one of"),
        ({"mode": "token_tis", "rollout_is_threshold": 1.0}, "rollout_is_threshold must be > 1"),
        ({"mode": "seq_mask", "rollout_rs_threshold": 1.0}, "rollout_rs_threshold_lower"),
        (
            {"mode": "geo_mask", "rollout_rs_threshold": 2.0, "rollout_rs_threshold_lower": 3.0},
            "rollout_rs_threshold_lower",
        ),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    old, mu, mask, _ = make_batch(0)
    with pytest.raises(ValueError, match=message):
        compute_rollout_correction(old, mu, mask, **kwargs)
