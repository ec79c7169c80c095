"""Behaviour correction of asynchronous rollouts (decoupled PPO).

Samples are drawn by an older policy ``mu`` (the rollout replica's weights, at the adaptive
temperature ``T_dyn``); the learner recomputes ``pi_prox`` (``old_log_prob``) with its
current weights, and PPO's ratio is ``pi_theta / pi_prox``. Each token's loss is then
weighted by ``w = pi_prox / mu`` (no gradient), truncated or masked, so that an average
over ``mu``'s samples estimates one over ``pi_prox``'s (Hilton et al. 2021, AReaL's
decoupled PPO, verl's rollout correction).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

RolloutCorrectionMode = Literal["off", "token_tis", "seq_tis", "seq_mask", "geo_mask"]
ROLLOUT_CORRECTION_MODES: tuple[str, ...] = get_args(RolloutCorrectionMode)

# Log-ratios are clamped before exp, as in loss.py: a garbage or -inf behaviour log-prob
# gives a huge but finite weight (then truncated) instead of inf or NaN.
_LOG_RATIO_BOUND = 20.0


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 when the mask is empty."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


@torch.no_grad()
def compute_rollout_correction(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mode: RolloutCorrectionMode,
    rollout_is_threshold: float = 2.0,
    rollout_rs_threshold: float = 2.0,
    rollout_rs_threshold_lower: float | None = None,
    has_rollout_log_prob: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token behaviour-correction weights ``w = pi_prox / mu`` and the tokens to keep.

    Modes (``log w`` is clamped to ``[-20, 20]`` per token, and a sequence's sum again,
    before ``exp``):

    - ``off``: weight 1, nothing dropped (the reference release).
    - ``token_tis``: ``min(w_t, rollout_is_threshold)`` per token.
    - ``seq_tis``: ``min(prod_t w_t, rollout_is_threshold)`` of the sequence, the product
      taken as ``exp(sum log w_t)`` over its valid tokens, on each of them.
    - ``seq_mask``: drop whole sequences whose ``prod_t w_t`` is outside
      ``[rollout_rs_threshold_lower, rollout_rs_threshold]``.
    - ``geo_mask``: the same with the geometric mean ``exp(mean_t log w_t)``.

    The masking modes weight the sequences they keep by 1, not by their token IS weights
    (verl's rejection-only presets): a kept sequence's ratio is near 1 by construction, so
    reweighting would add variance for little bias, and each mode stays one mechanism
    whose effect its metrics show.

    Use ``keep_mask`` as the loss's ``response_mask`` (and count the token-mean's
    denominator from it), and ``weights`` as ``hapo_policy_loss(rollout_is_weights=...)``.

    Args:
        old_log_prob: ``[B, T]`` ``log pi_prox`` of the taken tokens, as the learner
            recomputes them with the weights of the step's start.
        rollout_log_prob: ``[B, T]`` ``log mu``, the behaviour log-probs the rollout sent.
        response_mask: ``[B, T]`` 1 for valid response tokens.
        mode: one of ``ROLLOUT_CORRECTION_MODES``.
        rollout_is_threshold: truncation cap (> 1) of ``token_tis`` and ``seq_tis``.
        rollout_rs_threshold: upper bound of the ratio ``seq_mask``/``geo_mask`` keep.
        rollout_rs_threshold_lower: lower bound; ``None`` is ``1 / rollout_rs_threshold``.
        has_rollout_log_prob: ``[B]`` bool, False for samples without behaviour log-probs
            (their ``rollout_log_prob`` row is ignored): weight 1, never dropped, and left
            out of the metrics. ``None``: every sample has them.

    Returns:
        ``(weights, keep_mask, metrics)``: ``weights`` ``[B, T]`` fp32 without gradient,
        0 where ``keep_mask`` is False; ``keep_mask`` ``[B, T]`` bool, ``response_mask``
        less the dropped sequences; ``metrics``, detached scalars over the valid tokens
        that have a behaviour log-prob (0 when there are none):

        - ``rollout_corr/weight_mean``, ``rollout_corr/weight_max``: of ``weights``
          (dropped tokens count as 0).
        - ``rollout_corr/truncated_frac``: share of tokens whose weight was capped.
        - ``rollout_corr/masked_frac``: share of tokens dropped.
        - ``rollout_corr/kl``: ``KL(mu || pi_prox)`` by the k3 estimator
          ``mean(w - 1 - log w)`` over tokens sampled from ``mu`` (>= 0, untruncated ``w``).
        - ``rollout_corr/kl_k1``: the k1 estimator ``mean(log mu - log pi_prox)``.
        - ``rollout_corr/log_ppl_diff``: mean over sequences of
          ``mean_t(log mu - log pi_prox)``, the log of ``pi_prox``'s perplexity over ``mu``'s.

    Raises:
        ValueError: unknown ``mode``, ``rollout_is_threshold <= 1``, or rejection bounds
            that are not ``0 < lower < upper``.
    """
    if mode not in ROLLOUT_CORRECTION_MODES:
        raise ValueError(f"mode must be one of {ROLLOUT_CORRECTION_MODES}, got {mode!r}")
    if rollout_is_threshold <= 1.0:
        raise ValueError(f"rollout_is_threshold must be > 1, got {rollout_is_threshold}")
    upper = rollout_rs_threshold
    lower = 1.0 / upper if rollout_rs_threshold_lower is None else rollout_rs_threshold_lower
    if not 0.0 < lower < upper:
        raise ValueError(
            f"rollout_rs_threshold_lower ({lower}) must be in (0, rollout_rs_threshold = {upper})"
        )

    valid = response_mask.bool()
    if has_rollout_log_prob is None:
        has_rollout_log_prob = torch.ones(valid.shape[0], dtype=torch.bool, device=valid.device)
    row_measured = has_rollout_log_prob.bool()[:, None]
    measured = valid & row_measured
    log_ratio = torch.where(measured, old_log_prob.float() - rollout_log_prob.float(), 0.0)
    log_ratio = log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    token_ratio = log_ratio.exp()
    seq_log_ratio = log_ratio.sum(dim=-1, keepdim=True)
    tokens_per_seq = measured.sum(dim=-1, keepdim=True)

    weights = torch.ones_like(log_ratio)
    truncated = torch.zeros_like(valid)
    keep = valid
    if mode == "token_tis":
        weights = token_ratio.clamp(max=rollout_is_threshold)
        truncated = measured & (token_ratio > rollout_is_threshold)
    elif mode == "seq_tis":
        seq_ratio = seq_log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND).exp()
        weights = seq_ratio.clamp(max=rollout_is_threshold).expand_as(log_ratio)
        truncated = measured & (seq_ratio > rollout_is_threshold)
    elif mode in ("seq_mask", "geo_mask"):
        # Compared in log space, where no clamp is needed and none can move a bound.
        statistic = seq_log_ratio
        if mode == "geo_mask":
            statistic = seq_log_ratio / tokens_per_seq.clamp_min(1)
        inside = (statistic >= math.log(lower)) & (statistic <= math.log(upper))
        keep = valid & (inside | ~row_measured)
    weights = torch.where(keep, weights, 0.0)

    seq_measured = tokens_per_seq.squeeze(-1) > 0
    seq_log_ppl_diff = -seq_log_ratio.squeeze(-1) / tokens_per_seq.squeeze(-1).clamp_min(1)
    metrics = {
        "rollout_corr/weight_mean": _masked_mean(weights, measured),
        "rollout_corr/weight_max": torch.where(measured, weights, 0.0).amax(),
        "rollout_corr/truncated_frac": _masked_mean(truncated.float(), measured),
        "rollout_corr/masked_frac": _masked_mean((measured & ~keep).float(), measured),
        "rollout_corr/kl": _masked_mean(token_ratio - 1.0 - log_ratio, measured),
        "rollout_corr/kl_k1": _masked_mean(-log_ratio, measured),
        "rollout_corr/log_ppl_diff": _masked_mean(seq_log_ppl_diff, seq_measured),
    }
    return weights, keep, metrics
