"""Outcome advantages: GRPO (verl semantics) and HAPO's token-level group average.

Both are vectorised with segment reductions over a group id per sample (``index_add_`` /
``scatter_reduce``): no Python loop over samples or groups. Group statistics are
accumulated in fp64 on ``[B]``-sized vectors, so a group of equal scores has a standard
deviation of exactly 0 rather than rounding noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# |normalised advantage| at or above which a group falls back to GRPO (the seed's value).
FALLBACK_THRESHOLD = 5.0


def group_ids(
    index: Sequence | np.ndarray | torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Dense group ids ``[B]`` (int64, in ``[0, G)``) and ``G`` for arbitrary labels.

    ``index`` holds one hashable, sortable label per sample (ints, strings, UUID strings).
    """
    if isinstance(index, torch.Tensor):
        labels, inverse = torch.unique(index, return_inverse=True)
        return inverse.to(device), labels.numel()
    labels, inverse = np.unique(np.asarray(index), return_inverse=True)
    return torch.from_numpy(inverse.reshape(-1)).to(device), len(labels)


def _segment_sum(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    return values.new_zeros(num_groups).index_add_(0, groups, values)


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence | np.ndarray | torch.Tensor,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantage: each sample's score normalised within its prompt group (verl).

    ``score_i = sum_t rewards[i, t]``; ``A_i = (score_i - mean_g) / (std_g + epsilon)`` with
    the group's mean and unbiased std (``A_i = score_i - mean_g`` without std
    normalisation). A group of one sample uses mean 0 and std 1, as verl does.

    Args:
        token_level_rewards: ``[B, T]`` rewards (the outcome reward sits on one token).
        response_mask: ``[B, T]`` 1 for valid response tokens.
        index: ``[B]`` group label of each sample.

    Returns:
        ``(advantages, returns)``, both the same ``[B, T]`` tensor, 0 at masked positions.
    """
    scores = token_level_rewards.sum(dim=-1).double()
    groups, num_groups = group_ids(index, scores.device)
    count = _segment_sum(torch.ones_like(scores), groups, num_groups)
    mean = _segment_sum(scores, groups, num_groups) / count
    sq_dev = (scores - mean[groups]).square()
    std = (_segment_sum(sq_dev, groups, num_groups) / (count - 1)).sqrt()
    singleton = count == 1
    mean = torch.where(singleton, 0.0, mean)
    std = torch.where(singleton, 1.0, std)
    advantage = scores - mean[groups]
    if norm_adv_by_std_in_grpo:
        advantage = advantage / (std[groups] + epsilon)
    mask = response_mask.to(token_level_rewards.dtype)
    advantages = advantage.to(token_level_rewards.dtype).unsqueeze(-1) * mask
    return advantages, advantages


def compute_hapo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence | np.ndarray | torch.Tensor,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    entropys: torch.Tensor | None = None,
    *,
    reference_padding_fallback: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HAPO token-level group average (``adv_estimator=hapo``, HAPO part 2).

    The group's mean and (biased) std are taken over its valid *tokens*, each carrying
    its sample's score, so long responses weigh more:
    ``mean_g = sum_i L_i s_i / sum_i L_i``, ``var_g = sum_i L_i (s_i - mean_g)^2 / sum_i L_i``
    with ``L_i`` the valid length. Since the score is constant along a sample, these are
    computed from ``[B]`` vectors, never by expanding to ``[B, T]``.

    A group whose normalised advantage reaches ``|A| >= 5`` on any valid token falls back
    to its GRPO advantage (the seed's smoothing). With ``reference_padding_fallback`` the
    test also sees padding positions, whose value in the seed is ``-mean / (std + eps)``,
    reproducing the seed's decision exactly. A group whose valid scores are all equal
    (std 0), or which has no valid token, gets advantage 0.

    Args:
        token_level_rewards: ``[B, T]`` rewards.
        response_mask: ``[B, T]`` 1 for valid response tokens.
        index: ``[B]`` group label of each sample (ints or strings).
        entropys: accepted for signature compatibility with the reference; unused there
            and here.

    Returns:
        ``(advantages, returns)``, both the same ``[B, T]`` tensor, 0 at masked positions.
    """
    del entropys
    grpo_advantages, _ = compute_grpo_outcome_advantage(
        token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo
    )
    valid = response_mask.bool()
    scores = token_level_rewards.sum(dim=-1).double()
    lengths = valid.sum(dim=-1).double()
    groups, num_groups = group_ids(index, scores.device)

    group_tokens = _segment_sum(lengths, groups, num_groups)
    mean = _segment_sum(lengths * scores, groups, num_groups) / group_tokens
    var = (
        _segment_sum(lengths * (scores - mean[groups]).square(), groups, num_groups) / group_tokens
    )
    denominator = var.sqrt() + epsilon if norm_adv_by_std_in_grpo else torch.ones_like(var)

    has_tokens = lengths > 0
    inf = torch.full_like(mean, float("inf"))
    group_max = (-inf).scatter_reduce(0, groups, torch.where(has_tokens, scores, -inf[0]), "amax")
    group_min = inf.scatter_reduce(0, groups, torch.where(has_tokens, scores, inf[0]), "amin")
    constant = ~(group_max > group_min)

    normed = (scores - mean[groups]) / denominator[groups]
    normed = torch.where(constant[groups], 0.0, normed)

    outlier = has_tokens & (normed.abs() >= FALLBACK_THRESHOLD)
    if reference_padding_fallback:
        padding_value = -mean / denominator
        has_padding = lengths < valid.shape[-1]
        outlier |= has_padding & (padding_value.abs() >= FALLBACK_THRESHOLD)[groups]
    fallback = _segment_sum(outlier.double(), groups, num_groups) > 0

    mask = valid.to(token_level_rewards.dtype)
    hapo_advantages = normed.to(token_level_rewards.dtype).unsqueeze(-1) * mask
    advantages = torch.where(fallback[groups].unsqueeze(-1), grpo_advantages, hapo_advantages)
    return advantages, advantages
