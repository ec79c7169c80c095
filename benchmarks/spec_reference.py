"""The seed's loop forms of the GRPO and HAPO advantages, kept only as a yardstick.

``hapo bench advantage`` times the vectorised library against these, and the tests check
the library against them. They follow ``shared/spec/hapo-seed.md`` and verl step by step
(a Python loop over samples and groups); the library never imports this module.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch


def grpo_advantage_loop(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
) -> torch.Tensor:
    """verl's GRPO outcome advantage as the reference release ships it. Returns ``[B, T]``."""
    scores = token_level_rewards.sum(dim=-1)
    id2score: dict = defaultdict(list)
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    mean, std = {}, {}
    for label, members in id2score.items():
        if len(members) == 1:
            mean[label], std[label] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            mean[label] = torch.mean(torch.tensor(members))
            std[label] = torch.std(torch.tensor([members]))
    out = scores.clone()
    for i in range(scores.shape[0]):
        centred = scores[i] - mean[index[i]]
        out[i] = centred / (std[index[i]] + epsilon) if norm_adv_by_std_in_grpo else centred
    return out.unsqueeze(-1) * response_mask


def hapo_advantage_loop(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    *,
    valid_only_fallback: bool = False,
) -> torch.Tensor:
    """The seed's token-level group average with per-group GRPO fallback. Returns ``[B, T]``.

    As in the seed, padding positions hold ``-mean / (std + eps)`` when a group does not
    fall back, and the fallback test sees them unless ``valid_only_fallback``.
    """
    grpo = grpo_advantage_loop(
        token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo
    )
    scores = token_level_rewards.sum(dim=-1).unsqueeze(-1) * response_mask
    id2score: dict = defaultdict(list)
    id2mask: dict = defaultdict(list)
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
        id2mask[index[i]].append(response_mask[i])
    out = scores.clone()
    for label in id2score:
        group_scores, group_mask = torch.stack(id2score[label]), torch.stack(id2mask[label]).bool()
        valid_values = group_scores.masked_select(group_mask)
        mean, std = valid_values.mean(), valid_values.std(unbiased=False)
        # As the seed: the group's rows are found by a scan of the whole index.
        rows = [i for i, x in enumerate(index) if x == label]
        normed = scores[rows] - mean
        if norm_adv_by_std_in_grpo:
            normed = normed / (std + epsilon)
        tested = normed[group_mask] if valid_only_fallback else normed
        out[rows] = grpo[rows] if torch.any(tested.abs() >= 5) else normed
    return out
