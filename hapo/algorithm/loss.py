"""HAPO policy loss: PPO clipped surrogate with asymmetric adaptive clipping (part 4) and
differential advantage redistribution (part 3), dual-clip, token-mean aggregation, each
token's loss optionally weighted by the behaviour correction (``correction.py``)."""

from __future__ import annotations

import torch

# Log-ratios are clamped before exp so that a garbage log-prob (e.g. at a padding position)
# cannot produce inf, whose gradient through the mask would be NaN (as in current verl).
_LOG_RATIO_BOUND = 20.0


def ada_clip(
    cliprange_low: float = 0.2,
    cliprange_high: float = 0.2,
    h_hat: torch.Tensor | None = None,
    clip_alpha: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clip ranges (asymmetric adaptive clipping).

    Low-entropy tokens (``h_hat <= 0``) get a wider lower range
    ``eps_low * (1 - alpha * h_hat)``; high-entropy tokens (``h_hat > 0``) a wider upper
    range ``eps_high * (1 + alpha * h_hat)``; the other side keeps its base value.

    Args:
        h_hat: ``[B, T]`` normalised entropies in ``[-1, 1]``.

    Returns:
        ``(cliprange_low, cliprange_high)``, each ``[B, T]`` like ``h_hat``.
    """
    if h_hat is None:
        raise ValueError("ada_clip needs h_hat")
    low = torch.where(h_hat <= 0, cliprange_low * (1 - h_hat * clip_alpha), cliprange_low)
    high = torch.where(h_hat > 0, cliprange_high * (1 + h_hat * clip_alpha), cliprange_high)
    return low, high


def ada_advantage(
    advantages: torch.Tensor,
    h_hat: torch.Tensor,
    ratio: torch.Tensor,
    cliprange_low: torch.Tensor | float,
    cliprange_high: torch.Tensor | float,
    adv_beta: float = 1.0,
) -> torch.Tensor:
    """Differential advantage redistribution.

    ``A_ent = A * (1 + beta * h_hat)``. Inside the neutral zone
    ``1 - eps_low / 2 < ratio < 1 + eps_high / 2`` low-entropy tokens use ``A_ent``
    (damped) and high-entropy tokens keep ``A``; outside it, the other way round.

    Args:
        advantages, h_hat, ratio: ``[B, T]``.
        cliprange_low, cliprange_high: ``[B, T]`` (from ``ada_clip``) or floats.

    Returns:
        ``[B, T]`` redistributed advantages.
    """
    advantages_ent = advantages * (1 + adv_beta * h_hat)
    neutral_left, neutral_right = 1.0 - cliprange_low / 2, 1.0 + cliprange_high / 2
    neutral = (ratio > neutral_left) & (ratio < neutral_right)
    pos_adv = torch.where(neutral, advantages, advantages_ent)
    neg_adv = torch.where(neutral, advantages_ent, advantages)
    return torch.where(h_hat > 0, pos_adv, neg_adv)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 when the mask is empty. Shapes ``[B, T]``."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def _per_token(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a float or ``[B, T]`` tensor) broadcast to ``like``'s shape and device."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).expand_as(like)


def hapo_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    h_hat: torch.Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 10.0,
    adaptive_clip: bool = True,
    clip_alpha: float = 1.0,
    adaptive_advantage: bool = True,
    adv_beta: float = 1.0,
    global_num_tokens: int | float | torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HAPO clipped policy-gradient loss.

    Args:
        log_prob: ``[B, T]`` log-probs of the taken tokens under the policy being trained.
        old_log_prob: ``[B, T]`` log-probs under the policy that is being improved upon.
        advantages: ``[B, T]`` advantages.
        response_mask: ``[B, T]`` 1 for valid response tokens.
        h_hat: ``[B, T]`` normalised entropy of each token, without gradient.
        clip_ratio_c: dual-clip bound (> 1) on the loss of negative-advantage tokens.
        global_num_tokens: valid tokens of the whole batch that this micro-batch is part
            of. The loss is ``sum(token losses) / global_num_tokens``, so the losses (and
            gradients) of micro-batches add up to the full batch's token-mean. Defaults to
            this micro-batch's own count.
        rollout_is_weights: ``[B, T]`` behaviour-correction weights ``pi_prox / mu``
            (``compute_rollout_correction``) multiplying each token's loss after the dual
            clip, as verl does; no gradient flows into them. Dropping tokens is the
            caller's ``response_mask``. ``None``: the loss is exactly the uncorrected one.

    Returns:
        ``(loss, metrics)``. Metrics are detached scalars, token-means over this
        micro-batch (``loss/num_tokens`` gives the weight to average them by).
        With ``adaptive_clip`` and ``adaptive_advantage`` off this is exactly verl's
        vanilla dual-clip PPO loss.
    """
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
    mask = response_mask.bool()
    log_ratio = (log_prob - old_log_prob).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = log_ratio.exp()

    with torch.no_grad():
        if adaptive_clip:
            cliprange_low, cliprange_high = ada_clip(
                clip_ratio_low, clip_ratio_high, h_hat, clip_alpha
            )
        else:
            cliprange_low, cliprange_high = clip_ratio_low, clip_ratio_high
        if adaptive_advantage:
            advantages = ada_advantage(
                advantages, h_hat, ratio, cliprange_low, cliprange_high, adv_beta
            )

    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clipped_loss = torch.maximum(pg_loss1, pg_loss2)
    pg_loss3 = -advantages * clip_ratio_c
    pg_losses = torch.where(advantages < 0, torch.minimum(clipped_loss, pg_loss3), clipped_loss)
    if rollout_is_weights is not None:
        # The weights change the measure the expectation is taken under (mu's samples for
        # pi_prox's), not the objective: they are constants of the gradient.
        pg_losses = pg_losses * rollout_is_weights.detach()

    num_tokens = mask.sum()
    denominator = num_tokens.clamp_min(1) if global_num_tokens is None else global_num_tokens
    loss = torch.where(mask, pg_losses, 0.0).sum() / denominator

    with torch.no_grad():
        clipped = pg_loss2 > pg_loss1
        high_entropy = h_hat > 0
        metrics = {
            "loss/pg_loss": _masked_mean(pg_losses, mask),
            "loss/approx_kl": _masked_mean(ratio - 1 - log_ratio, mask),
            "loss/clipfrac": _masked_mean(clipped.float(), mask),
            "loss/clipfrac_high_entropy": _masked_mean(clipped.float(), mask & high_entropy),
            "loss/clipfrac_low_entropy": _masked_mean(clipped.float(), mask & ~high_entropy),
            "loss/clipfrac_dual": _masked_mean(
                ((clipped_loss > pg_loss3) & (advantages < 0)).float(), mask
            ),
            "loss/clip_low_mean": _masked_mean(_per_token(cliprange_low, ratio), mask),
            "loss/clip_high_mean": _masked_mean(_per_token(cliprange_high, ratio), mask),
            "loss/num_tokens": num_tokens.float(),
        }
    return loss, metrics
