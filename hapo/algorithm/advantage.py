"""Outcome advantages: GRPO (verl semantics) and HAPO's token-level group average.

Both are vectorised with segment reductions (``index_add_``) over a group id per sample:
no Python loop over samples or groups. Group statistics are accumulated in fp64 on
``[B]``-sized vectors, where the mean of equal fp32 scores is exact, so a group of equal
scores has a standard deviation of exactly 0 rather than rounding noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# |normalised advantage| at or above which a group falls back to GRPO (the seed's value).
FALLBACK_THRESHOLD = 5.0


# Odd 64-bit multiplier (2^64 / golden ratio) of the polynomial hash of string labels.
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)


def _string_group_ids(labels: np.ndarray) -> torch.Tensor:
    """Dense ids ``[B]`` of fixed-width unicode labels (e.g. verl's uuid ``uid`` strings).

    Sorting strings (``np.unique``) would dominate the advantage's run time, so each label
    is hashed to an int64 in one vectorised pass (a polynomial over its 8-byte words in
    wrapping integer arithmetic, so equal labels always get equal hashes) and the hashes
    are grouped instead. Each group is then checked against the code points; on a hash
    collision the strings are sorted after all.
    """
    if labels.dtype.itemsize % 8:  # pad to whole 8-byte words (an even number of chars)
        labels = labels.astype(f"<U{labels.dtype.itemsize // 4 + 1}")
    codes = torch.from_numpy(labels.view(np.int64).reshape(len(labels), -1))
    powers = np.cumprod(np.full(codes.shape[1], _HASH_BASE, dtype=np.uint64)).view(np.int64)
    hashes = (codes * torch.from_numpy(powers)).sum(dim=-1)
    unique_hashes, inverse = torch.unique(hashes, return_inverse=True)
    rows = torch.arange(len(labels))
    first = rows.new_full((len(unique_hashes),), len(labels)).scatter_reduce(
        0, inverse, rows, "amin"
    )
    if not torch.equal(codes.index_select(0, first[inverse]), codes):
        inverse = torch.from_numpy(np.unique(labels, return_inverse=True)[1].reshape(-1))
    return inverse


def group_ids(
    index: Sequence | np.ndarray | torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Dense group ids ``[B]`` (int64, in ``[0, G)``) and ``G`` for arbitrary labels.

    ``index`` holds one label per sample: ints, or strings (as verl's ``uid``).
    """
    if isinstance(index, torch.Tensor):
        labels, inverse = torch.unique(index, return_inverse=True)
        return inverse.to(device), labels.numel()
    labels = np.asarray(index)
    if labels.dtype == object:
        labels = labels.astype(str)
    if labels.dtype.kind == "U" and len(labels):
        inverse = _string_group_ids(labels)
    else:
        inverse = torch.from_numpy(np.unique(labels, return_inverse=True)[1].reshape(-1))
    return inverse.to(device), int(inverse.max()) + 1 if len(inverse) else 0


def _segment_sum(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-group sums of ``values`` ``[B, ...]`` -> ``[G, ...]``."""
    return values.new_zeros((num_groups, *values.shape[1:])).index_add_(0, groups, values)


def _grpo_from_moments(
    scores: torch.Tensor,
    groups: torch.Tensor,
    count: torch.Tensor,
    mean: torch.Tensor,
    sq_dev_sum: torch.Tensor,
    epsilon: float,
    norm_adv_by_std_in_grpo: bool,
) -> torch.Tensor:
    """GRPO advantage ``[B]`` from per-group sample count, mean and summed squared deviation
    ``[G]`` (verl: unbiased std; a group of one uses mean 0 and std 1)."""
    singleton = count == 1
    mean = torch.where(singleton, 0.0, mean)
    advantage = scores - mean[groups]
    if norm_adv_by_std_in_grpo:
        std = torch.where(singleton, 1.0, (sq_dev_sum / (count - 1)).sqrt())
        advantage = advantage / (std[groups] + epsilon)
    return advantage


def _float_mask(response_mask: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """The mask ``[B, T]`` as fp32 (fp64 for fp64 rewards).

    Torch's CPU reductions over bool and int masks are 5-20x slower than over floats, and
    a bf16 sum cannot count past 256, so masks are converted once up front.
    """
    return response_mask.to(torch.promote_types(rewards.dtype, torch.float32))


def _broadcast_to_tokens(
    advantage: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Per-sample advantages ``[B]`` onto valid tokens ``[B, T]``: one pass over the mask."""
    return (advantage.to(mask.dtype).unsqueeze(-1) * mask).to(dtype)


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
        response_mask: ``[B, T]`` 1 (or True) for valid response tokens, else 0.
        index: ``[B]`` group label of each sample.

    Returns:
        ``(advantages, returns)``, both the same ``[B, T]`` tensor, 0 at masked positions.
    """
    scores = token_level_rewards.sum(dim=-1).double()
    groups, num_groups = group_ids(index, scores.device)
    moments = _segment_sum(torch.stack([torch.ones_like(scores), scores], -1), groups, num_groups)
    count, mean = moments[:, 0], moments[:, 1] / moments[:, 0]
    sq_dev_sum = _segment_sum((scores - mean[groups]).square(), groups, num_groups)
    advantage = _grpo_from_moments(
        scores, groups, count, mean, sq_dev_sum, epsilon, norm_adv_by_std_in_grpo
    )
    mask = _float_mask(response_mask, token_level_rewards)
    advantages = _broadcast_to_tokens(advantage, mask, token_level_rewards.dtype)
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
    computed from ``[B]`` vectors: the ``[B, T]`` tensors are read once and written once.

    A group whose normalised advantage reaches ``|A| >= 5`` on any valid token falls back
    to its GRPO advantage (the seed's smoothing). With ``reference_padding_fallback`` the
    test also sees padding positions, whose value in the seed is ``-mean / (std + eps)``,
    reproducing the seed's decision exactly. A group whose valid scores are all equal
    (std 0), or which has no valid token, gets advantage 0.

    Args:
        token_level_rewards: ``[B, T]`` rewards.
        response_mask: ``[B, T]`` 1 (or True) for valid response tokens, else 0.
        index: ``[B]`` group label of each sample (ints or strings).
        entropys: accepted for signature compatibility with the reference; unused there
            and here.

    Returns:
        ``(advantages, returns)``, both the same ``[B, T]`` tensor, 0 at masked positions.
    """
    del entropys
    scores = token_level_rewards.sum(dim=-1).double()
    mask = _float_mask(response_mask, token_level_rewards)
    lengths = mask.sum(dim=-1).double()
    groups, num_groups = group_ids(index, scores.device)

    # Sample-level (GRPO) and token-level (HAPO) first moments in one segment reduction.
    ones = torch.ones_like(scores)
    moments = _segment_sum(
        torch.stack([ones, scores, lengths, lengths * scores], -1), groups, num_groups
    )
    count, grpo_mean = moments[:, 0], moments[:, 1] / moments[:, 0]
    group_tokens, mean = moments[:, 2], moments[:, 3] / moments[:, 2]
    grpo_dev, dev = scores - grpo_mean[groups], scores - mean[groups]
    sq_devs = _segment_sum(
        torch.stack([grpo_dev.square(), lengths * dev.square()], -1), groups, num_groups
    )
    denominator = (sq_devs[:, 1] / group_tokens).sqrt() + epsilon
    if not norm_adv_by_std_in_grpo:
        denominator = torch.ones_like(denominator)

    # Equal fp32 scores have an exact fp64 mean, so a group of equal scores gets deviation
    # (and advantage) exactly 0, not rounding noise / eps; a group with no valid token
    # has a NaN mean and gets 0 too.
    has_tokens = lengths > 0
    normed = torch.where(has_tokens, dev / denominator[groups], 0.0)

    outlier = has_tokens & (normed.abs() >= FALLBACK_THRESHOLD)
    if reference_padding_fallback:
        padding_outlier = (mean / denominator).abs() >= FALLBACK_THRESHOLD
        outlier |= (lengths < mask.shape[-1]) & padding_outlier[groups]
    fallback = _segment_sum(outlier.double(), groups, num_groups) > 0

    grpo = _grpo_from_moments(
        scores, groups, count, grpo_mean, sq_devs[:, 0], epsilon, norm_adv_by_std_in_grpo
    )
    advantage = torch.where(fallback[groups], grpo, normed)
    advantages = _broadcast_to_tokens(advantage, mask, token_level_rewards.dtype)
    return advantages, advantages
