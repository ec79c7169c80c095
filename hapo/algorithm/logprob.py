"""Log-probs of taken tokens, a chunk of vocabulary logits at a time: at one temperature
from hidden states, with a backward pass that recomputes each chunk but the last instead of
keeping the ``[N, V]`` logits; and, without gradient, at each token's own adaptive sampling
temperature, as the rollout reports them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hapo.algorithm.entropy import chunk_logits, token_entropy
from hapo.algorithm.temperature import compute_entropy_based_temperature


class _TakenLogProb(torch.autograd.Function):
    """Log-prob of target tokens from hidden states, chunk by chunk, and its gradient.

    Autograd through a plain chunk loop would keep every chunk's logits for the backward
    pass, i.e. the whole ``[N, V]`` fp32 tensor after all. This saves the hidden states,
    the ``[N]`` log-normalisers and the last chunk's probabilities (``keep_last``: one
    chunk's memory, held from forward to backward), and recomputes the other chunks' logits
    in backward. A micro-batch's response tokens usually fit one chunk, so its backward
    usually skips the recomputation (a ``[c, H] x [H, V]`` product and an exp over
    ``[c, V]``) altogether.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        with_entropy: bool,
        keep_last: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = hidden.shape[0]
        log_prob = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        log_norm = torch.empty_like(log_prob)
        entropy = torch.empty_like(log_prob) if with_entropy else log_prob.new_empty(0)
        last_probs = log_prob.new_empty(0)
        for start in range(0, rows, chunk_size):
            end = start + chunk_size
            logits = chunk_logits(hidden[start:end], weight, temperature)
            log_norm[start:end] = logits.logsumexp(dim=-1)
            taken = logits.gather(-1, targets[start:end, None]).squeeze(-1)
            log_prob[start:end] = taken - log_norm[start:end]
            if with_entropy:
                entropy[start:end] = token_entropy(logits)
            if keep_last and end >= rows:
                last_probs = logits.sub_(log_norm[start:end, None]).exp_()
        ctx.save_for_backward(hidden, weight, targets, log_norm, last_probs)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(entropy)
        return log_prob, entropy

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_log_prob: torch.Tensor,
        grad_entropy: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None, None]:
        del grad_entropy  # entropy is a statistic, never differentiated
        hidden, weight, targets, log_norm, last_probs = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = None  # fp32 [V, H], the sum over chunks
        rows = hidden.shape[0]
        for start in range(0, rows, chunk_size):
            end = start + chunk_size
            chunk = hidden[start:end]
            grad = grad_log_prob[start:end, None].float()
            # d log_softmax(z)[target] / dz = onehot(target) - softmax(z), times 1/T for z/T.
            if end >= rows and last_probs.numel():
                # Not in place: a second backward (retain_graph) reads the kept ones again.
                grad_logits = last_probs.mul(-grad)
            else:
                probs = chunk_logits(chunk, weight, temperature).sub_(log_norm[start:end, None])
                grad_logits = probs.exp_().mul_(-grad)
            grad_logits.scatter_add_(-1, targets[start:end, None], grad)
            if temperature != 1.0:
                grad_logits.div_(temperature)
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight
            if needs_weight:
                # The first chunk's product is the sum so far: no [V, H] zeros to fill and add.
                product = (grad_logits.T @ chunk).float()
                grad_weight = product if grad_weight is None else grad_weight.add_(product)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def taken_log_probs_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(hidden @ weight.T / T)[target]`` per row, ``chunk_size`` rows at a time.

    The logits of one chunk (``chunk_size x V`` fp32) exist at a time, plus, when a
    backward pass will follow, the last chunk's probabilities from forward to backward
    (which then need not recompute them). Entropy, when asked for, is
    ``hapo.algorithm.token_entropy`` of the same chunk logits (what
    ``entropy_from_logits_chunked`` computes), so one vocabulary projection serves both.

    Args:
        hidden: ``[N, H]`` final hidden states, any float dtype; differentiable.
        weight: ``[V, H]`` output projection (``lm_head``); differentiable.
        targets: ``[N]`` int64 token ids.

    Returns:
        ``(log_prob, entropy)``: ``[N]`` fp32 log-probs (with gradient) and ``[N]`` fp32
        entropies without gradient, or ``None`` unless ``with_entropy``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # The last chunk's probabilities are kept only for a backward pass that will happen.
    keep_last = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    log_prob, entropy = _TakenLogProb.apply(
        hidden, weight, targets, temperature, chunk_size, with_entropy, keep_last
    )
    return log_prob, entropy if with_entropy else None


@torch.no_grad()
def adaptive_temperature_log_probs(
    logits_or_hidden: torch.Tensor,
    token_ids: torch.Tensor,
    lm_head_weight: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 1.0,
    temperature_tau: float | torch.Tensor = 0.05,
    norm_entropys: Sequence[float | torch.Tensor] | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Log-prob of each taken token at the temperature it was sampled at (``T_dyn``).

    The behaviour log-prob the rollout reports (vLLM's ``processed_logprobs`` under
    ``hapo.inference.logits_processor``), recomputed from these logits by the sampler's
    operations in the sampler's order: the raw fp32 logits ``z`` are divided by
    ``1 + h_hat * tau`` from ``compute_entropy_based_temperature``, ``h_hat`` being that of
    the entropy of the raw ``z``, then by the base temperature ``T``, and ``log_softmax``
    gives the taken token's log-prob: ``log softmax(z / T_dyn)[token]`` with
    ``T_dyn = T * (1 + h_hat * tau)``. Without ``norm_entropys`` (adaptive temperature off,
    or the first step) it is ``log softmax(z / T)[token]``. Top-k, top-p (the default is
    1) and penalties are not modelled.

    One chunk of ``chunk_size x V`` fp32 logits (and its temporaries) exists at a time.
    Computed without gradient: it measures (``pi_prox`` at ``T_dyn``, to compare with the
    behaviour log-probs), it is not a loss input.

    Args:
        logits_or_hidden: ``[..., V]`` logits, or ``[..., H]`` final hidden states when
            ``lm_head_weight`` ``[V, H]`` is given; any float dtype.
        token_ids: ``[...]`` int64 ids of the taken tokens.
        temperature: base temperature ``T`` (> 0).
        temperature_tau: relative range ``tau`` of the adaptive temperature; 0 for a row
            sampled at the plain temperature.
        norm_entropys: ``(pivot, std, scale_pos, scale_neg)`` the tokens were sampled with.
            This, ``temperature`` and ``temperature_tau`` take floats or tensors that
            broadcast to ``[...]``, e.g. ``[B, 1]``: one value per sample of a ``[B, T]``
            batch whose samples come from different policy versions.
        chunk_size: rows of the flattened ``[...]`` per chunk.

    Returns:
        ``[...]`` fp32 log-probs.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if (torch.as_tensor(temperature) <= 0).any():
        raise ValueError(f"temperature must be > 0, got {temperature}")
    *lead, width = logits_or_hidden.shape
    if token_ids.shape != tuple(lead):
        raise ValueError(f"token_ids {tuple(token_ids.shape)} must have shape {tuple(lead)}")
    rows = logits_or_hidden.reshape(-1, width)
    targets = token_ids.reshape(-1, 1)
    device = rows.device

    def per_row(value: float | torch.Tensor) -> torch.Tensor:
        """``[N]`` fp32: the sampler's per-row statistics are fp32 tensors as well."""
        values = torch.as_tensor(value, dtype=torch.float32, device=device)
        return values.expand(lead).reshape(-1)

    base_temperature = per_row(temperature)
    if norm_entropys is not None:
        tau, stats = per_row(temperature_tau), [per_row(value) for value in norm_entropys]
    log_prob = torch.empty(rows.shape[0], dtype=torch.float32, device=device)
    for start in range(0, rows.shape[0], chunk_size):
        end = start + chunk_size
        # Out of place: for fp32 logits, chunk_logits returns a view of the caller's tensor.
        logits = chunk_logits(rows[start:end], lm_head_weight)
        if norm_entropys is not None:
            ones = torch.ones_like(tau[start:end])
            chunk_stats = tuple(value[start:end] for value in stats)
            factor = compute_entropy_based_temperature(
                logits, ones, True, tau[start:end], chunk_stats
            )
            logits = logits / factor.unsqueeze(-1)
        logits = logits / base_temperature[start:end, None]
        log_prob[start:end] = logits.log_softmax(dim=-1).gather(-1, targets[start:end]).squeeze(-1)
    return log_prob.reshape(lead)
