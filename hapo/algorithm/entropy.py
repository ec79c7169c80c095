"""Token entropy: the quantity every HAPO part is driven by.

All functions here return fp32 entropies in nats, whatever the dtype of the logits.
"""

from __future__ import annotations

import torch

_FP32_MIN = torch.finfo(torch.float32).min


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution of each row of ``logits``.

    Args:
        logits: ``[..., V]`` in any float dtype; ``-inf`` marks masked-out tokens.

    Returns:
        ``[...]`` fp32 entropies in nats. A row whose logits are all ``-inf`` has no
        distribution; it gets entropy 0 rather than NaN.

    Uses ``H = log(s) - sum(e * z) / s`` with ``z = logits - max`` and ``e = exp(z)``,
    ``s = sum(e)``: two full-size temporaries (``z`` and ``e``; one more if the input is
    not fp32) instead of the four of the softmax / log-softmax form. ``z`` is clamped to
    the smallest finite fp32 so that masked tokens contribute ``0 * finite = 0``, never
    ``0 * -inf = NaN``.
    """
    logits = logits.float()
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    shifted = (logits - row_max).clamp_min_(_FP32_MIN)
    exp_shifted = shifted.exp()
    total = exp_shifted.sum(dim=-1)
    entropy = total.log() - torch.linalg.vecdot(exp_shifted, shifted) / total
    return torch.where(total > 0, entropy, torch.zeros_like(entropy))


@torch.no_grad()
def entropy_from_logits_chunked(
    logits_or_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Token entropy of ``[B, T, V]`` logits, ``chunk_size`` rows at a time.

    Never materialises an fp32 copy of the whole ``B*T*V`` tensor: only one chunk of
    ``chunk_size * V`` fp32 values (and its two temporaries) exists at a time.

    Args:
        logits_or_hidden: ``[B, T, V]`` logits, or ``[B, T, H]`` final hidden states when
            ``lm_head_weight`` is given; any float dtype.
        lm_head_weight: optional ``[V, H]`` output projection. With it, logits are
            computed chunk by chunk and the full logits never exist at all.
        temperature: logits are divided by it first (as the sampler does).
        chunk_size: rows of ``B*T`` per chunk.

    Returns:
        ``[B, T]`` fp32 entropies. Computed without gradient: HAPO uses the entropy as a
        statistic (``h_hat``), never as a loss term.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    *lead, width = logits_or_hidden.shape
    rows = logits_or_hidden.reshape(-1, width)
    entropy = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], chunk_size):
        chunk = rows[start : start + chunk_size]
        entropy[start : start + chunk_size] = token_entropy(
            chunk_logits(chunk, lm_head_weight, temperature)
        )
    return entropy.reshape(lead)


def chunk_logits(
    chunk: torch.Tensor, lm_head_weight: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """fp32 logits ``[c, V]`` of one chunk: ``[c, V]`` logits as they are, or ``[c, H]``
    hidden states through ``lm_head_weight`` ``[V, H]``; divided by ``temperature``."""
    logits = chunk if lm_head_weight is None else chunk @ lm_head_weight.T
    logits = logits.float()
    if temperature == 1.0:
        return logits
    # In place only on a tensor of our own: fp32 logits passed in are the caller's.
    return logits / temperature if logits is chunk else logits.div_(temperature)
