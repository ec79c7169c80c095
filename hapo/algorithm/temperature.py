"""Entropy normalisation (``norm_entropys``, ``h_hat``) and adaptive-temperature sampling."""

from __future__ import annotations

from typing import NamedTuple

import torch

from hapo.algorithm.entropy import token_entropy


class NormEntropys(NamedTuple):
    """Statistics that map a token's log-entropy to ``h_hat`` in ``[-1, 1]``.

    Unpacks like the reference's ``(median, std, scale_pos, scale_neg)`` tuple; the first
    field is the ``entropy_pivot`` quantile, the median only when the pivot is 0.5.
    """

    pivot: float
    std: float
    scale_pos: float
    scale_neg: float


def log_entropy(entropy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``log(max(entropy, eps))``: HAPO normalises entropies on a log scale. Shape kept."""
    return torch.log(entropy.clamp_min(eps))


def entropy_h_hat(
    log_entropy: torch.Tensor,
    norm_entropys: tuple[float, float, float, float],
    eps: float = 1e-6,
) -> torch.Tensor:
    """Normalised entropy ``h_hat`` in ``[-1, 1]`` of each token.

    ``h = (log_entropy - pivot) / (std + eps)``, then ``h * scale_pos`` where ``h > 0``,
    ``h * scale_neg`` where ``h <= 0``, clamped to ``[-1, 1]``. A NaN ``h`` maps to 0
    (neither branch applies), as in the reference.

    Args:
        log_entropy: ``[...]`` log token entropies.
        norm_entropys: ``(pivot, std, scale_pos, scale_neg)``, see ``compute_norm_entropys``.

    Returns:
        ``[...]`` ``h_hat``, dtype of ``log_entropy``.
    """
    pivot, std, scale_pos, scale_neg = norm_entropys
    h = (log_entropy - pivot) / (std + eps)
    h_hat = torch.where(h > 0, h * scale_pos, torch.where(h <= 0, h * scale_neg, 0.0))
    return h_hat.clamp(-1.0, 1.0)


def compute_entropy_based_temperature(
    logits: torch.Tensor,
    input_temperature: torch.Tensor,
    adaptive_temperature: bool = False,
    temperature_tau: float = 0.05,
    norm_entropys: tuple[float, float, float, float] | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-token sampling temperature ``T * (1 + h_hat * tau)`` (HAPO part 1).

    High-entropy tokens (forks) are sampled hotter, low-entropy tokens colder. With
    ``adaptive_temperature`` off or no ``norm_entropys`` yet (the first step), the input
    temperature is returned unchanged.

    Args:
        logits: ``[N, V]`` next-token logits, any float dtype (fp32 math inside).
        input_temperature: ``[N]`` (or broadcastable) base temperatures.
        temperature_tau: relative range of the adjustment, in ``[0, 1)``.

    Returns:
        ``[N]`` temperatures.
    """
    if not adaptive_temperature or norm_entropys is None:
        return input_temperature
    return entropy_based_temperature(
        token_entropy(logits), input_temperature, temperature_tau, norm_entropys, eps
    )


def entropy_based_temperature(
    entropy: torch.Tensor,
    input_temperature: torch.Tensor | float,
    temperature_tau: torch.Tensor | float,
    norm_entropys: tuple[float | torch.Tensor, ...],
    eps: float = 1e-6,
) -> torch.Tensor:
    """``T * (1 + h_hat * tau)`` from token entropies (the formula of
    ``compute_entropy_based_temperature``, for callers that hold entropies, not logits).

    Args:
        entropy: ``[...]`` token entropies (nats).
        input_temperature, temperature_tau: floats or tensors broadcasting to ``[...]``.
        norm_entropys: ``(pivot, std, scale_pos, scale_neg)``, floats or tensors
            broadcasting to ``[...]`` (e.g. ``[B, 1]``: one set per sample).

    Returns:
        ``[...]`` temperatures.
    """
    h_hat = entropy_h_hat(log_entropy(entropy, eps), norm_entropys, eps)
    return input_temperature * (1.0 + h_hat * temperature_tau)


@torch.no_grad()
def compute_norm_entropys(
    entropys: torch.Tensor,
    response_mask: torch.Tensor,
    entropy_pivot: float = 0.8,
    eps: float = 1e-6,
    reference_scale_neg_sign: bool = False,
) -> NormEntropys:
    """Statistics of the batch's token log-entropies (docs/design.md, decision 1).

    - ``pivot``: the ``entropy_pivot`` quantile by nearest rank, i.e. the element of rank
      ``round(q * (n - 1))`` (round half to even) of the ``n`` valid log-entropies. Uses
      ``kthvalue``, which, unlike ``torch.quantile``, has no 2^24-element limit.
    - ``std``: root-mean-square of ``log_entropy - pivot``.
    - ``scale_pos = 1 / max(h[h > 0])`` and ``scale_neg = 1 / |min(h[h <= 0])|`` with
      ``h = (log_entropy - pivot) / (std + eps)``, so ``h_hat`` spans ``[-1, 1]``. A side
      with no nonzero ``h`` gets scale 1 (it scales nothing).

    Args:
        entropys: ``[B, T]`` token entropies in nats (not log).
        response_mask: ``[B, T]`` 1 for valid response tokens.
        entropy_pivot: quantile in ``[0, 1]`` used as the centre.
        reference_scale_neg_sign: return ``scale_neg = 1 / min(h)`` (negative) as the
            reference release does; this makes ``h_hat >= 0`` for almost every token.

    Raises:
        ValueError: no valid token, or ``entropy_pivot`` outside ``[0, 1]``.
    """
    if not 0.0 <= entropy_pivot <= 1.0:
        raise ValueError(f"entropy_pivot must be in [0, 1], got {entropy_pivot}")
    values = log_entropy(entropys.float(), eps).masked_select(response_mask.bool())
    n = values.numel()
    if n == 0:
        raise ValueError("compute_norm_entropys: response_mask selects no token")
    rank = round(entropy_pivot * (n - 1))
    pivot = values.kthvalue(rank + 1).values
    centred = values - pivot
    std = centred.square().mean().sqrt()
    h = centred / (std + eps)
    h_max, h_min = h.max(), h.min()
    scale_pos = 1.0 / h_max.item() if h_max > 0 else 1.0
    scale_neg = 1.0 / -h_min.item() if h_min < 0 else 1.0
    if reference_scale_neg_sign:
        scale_neg = -scale_neg
    return NormEntropys(pivot.item(), std.item(), scale_pos, scale_neg)
