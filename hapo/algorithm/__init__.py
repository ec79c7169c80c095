"""The HAPO algorithm as pure tensor functions (no I/O, no global state).

HAPO (arXiv 2509.16591) has four parts, each importable here under the reference
release's name and signature so verl users can port:

1. Adaptive temperature sampling: ``compute_entropy_based_temperature``.
2. Token-level group average advantage: ``compute_hapo_outcome_advantage``
   (with ``compute_grpo_outcome_advantage`` as its fallback).
3. Differential advantage redistribution: ``ada_advantage``.
4. Asymmetric adaptive clipping: ``ada_clip``.

``hapo_policy_loss`` puts 3 and 4 into the dual-clip PPO loss; ``compute_norm_entropys``
and ``entropy_h_hat`` turn token entropies into the normalised ``h_hat`` all parts use.
``compute_rollout_correction`` weights each token's loss by the behaviour correction of
asynchronous rollouts; ``adaptive_temperature_log_probs`` recomputes a token's log-prob at
the adaptive temperature it was sampled at.

Where we depart from the reference release (``starriver030515/HAPO``), and why:

- ``scale_neg`` is positive (``1 / |min h|``), as in the paper and the seed. The release
  computes ``1 / min h`` (negative), which makes ``h_hat >= 0`` for nearly every token and
  silently disables the low-entropy branches of ``ada_clip``/``ada_advantage`` and any
  temperature decrease. ``reference_scale_neg_sign=True`` reproduces the release.
- The entropy pivot is the ``entropy_pivot`` quantile by nearest rank via ``kthvalue``;
  the release's ``torch.quantile`` path fails above 2^24 tokens. The training-time
  ``h_hat`` and the sampler's use the same ``(x - pivot) / (std + eps)`` formula (the
  release divides by ``sqrt(max(var, eps))`` in one place and ``std + eps`` in the other).
- The HAPO advantage's GRPO fallback is decided on valid tokens only. The seed's test also
  sees padding positions (value ``-mean / (std + eps)``), so whether a group falls back
  depends on how much padding its batch has. ``reference_padding_fallback=True``
  reproduces the seed. A group of equal scores gets advantage 0 (the seed divides
  rounding noise by ``eps``); masked positions are always 0 (the seed leaves
  ``-mean / (std + eps)`` there).
- Group statistics are vectorised segment reductions in fp64, not a Python loop.
- Log-ratios are clamped to ``[-20, 20]`` before ``exp`` (as current verl does), so a
  garbage log-prob at a masked position cannot turn the gradient into NaN.
- Entropy is computed in one ``logsumexp``-style pass with masked (``-inf``) logits
  handled, and in chunks for ``[B, T, V]`` inputs (``entropy_from_logits_chunked``).
- Rollouts are asynchronous: a sample's behaviour policy ``mu`` (an older policy version,
  at the adaptive temperature) is not ``pi_prox``, the learner's recomputed
  ``old_log_prob``. As in decoupled PPO (AReaL, verl's rollout correction) the ratio stays
  ``pi_theta / pi_prox`` and each token's loss is weighted by ``w = pi_prox / mu``,
  truncated at 2 by default, or whole sequences are dropped (``compute_rollout_correction``,
  ``hapo_policy_loss(rollout_is_weights=...)``). The release assumes ``mu = pi_prox``;
  ``algorithm.rollout_correction.mode=off`` reproduces it.
"""

from hapo.algorithm.advantage import (
    FALLBACK_THRESHOLD,
    compute_grpo_outcome_advantage,
    compute_hapo_outcome_advantage,
    group_ids,
)
from hapo.algorithm.correction import (
    ROLLOUT_CORRECTION_MODES,
    RolloutCorrectionMode,
    compute_rollout_correction,
)
from hapo.algorithm.entropy import chunk_logits, entropy_from_logits_chunked, token_entropy
from hapo.algorithm.logprob import adaptive_temperature_log_probs, taken_log_probs_chunked
from hapo.algorithm.loss import ada_advantage, ada_clip, hapo_policy_loss
from hapo.algorithm.temperature import (
    NormEntropys,
    compute_entropy_based_temperature,
    compute_norm_entropys,
    entropy_based_temperature,
    entropy_h_hat,
    log_entropy,
)

__all__ = [
    "FALLBACK_THRESHOLD",
    "ROLLOUT_CORRECTION_MODES",
    "NormEntropys",
    "RolloutCorrectionMode",
    "ada_advantage",
    "ada_clip",
    "adaptive_temperature_log_probs",
    "chunk_logits",
    "compute_entropy_based_temperature",
    "compute_grpo_outcome_advantage",
    "compute_hapo_outcome_advantage",
    "compute_norm_entropys",
    "compute_rollout_correction",
    "entropy_based_temperature",
    "entropy_from_logits_chunked",
    "entropy_h_hat",
    "group_ids",
    "hapo_policy_loss",
    "log_entropy",
    "taken_log_probs_chunked",
    "token_entropy",
]
