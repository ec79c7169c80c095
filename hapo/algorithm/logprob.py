"""Log-probs of taken tokens from hidden states, a chunk of vocabulary logits at a time,
with a backward pass that recomputes each chunk instead of keeping the ``[N, V]`` logits."""

from __future__ import annotations

import torch

from hapo.algorithm.entropy import chunk_logits, token_entropy


class _TakenLogProb(torch.autograd.Function):
    """Log-prob of target tokens from hidden states, chunk by chunk, and its gradient.

    Autograd through a plain chunk loop would keep every chunk's logits for the backward
    pass, i.e. the whole ``[N, V]`` fp32 tensor after all. This saves only the hidden
    states and the ``[N]`` log-normalisers and recomputes each chunk's logits in backward.
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = hidden.shape[0]
        log_prob = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        log_norm = torch.empty_like(log_prob)
        entropy = torch.empty_like(log_prob) if with_entropy else log_prob.new_empty(0)
        for start in range(0, rows, chunk_size):
            end = start + chunk_size
            logits = chunk_logits(hidden[start:end], weight, temperature)
            log_norm[start:end] = logits.logsumexp(dim=-1)
            taken = logits.gather(-1, targets[start:end, None]).squeeze(-1)
            log_prob[start:end] = taken - log_norm[start:end]
            if with_entropy:
                entropy[start:end] = token_entropy(logits)
        ctx.save_for_backward(hidden, weight, targets, log_norm)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(entropy)
        return log_prob, entropy

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_log_prob: torch.Tensor,
        grad_entropy: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        del grad_entropy  # entropy is a statistic, never differentiated
        hidden, weight, targets, log_norm = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            chunk = hidden[start:end]
            grad = grad_log_prob[start:end, None].float()
            # d log_softmax(z)[target] / dz = onehot(target) - softmax(z), times 1/T for z/T.
            grad_logits = (
                chunk_logits(chunk, weight, temperature)
                .sub_(log_norm[start:end, None])
                .exp_()
                .mul_(-grad)
            )
            grad_logits.scatter_add_(-1, targets[start:end, None], grad)
            if temperature != 1.0:
                grad_logits.div_(temperature)
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ chunk).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


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

    The logits of one chunk (``chunk_size x V`` fp32) exist at a time, in forward and in
    backward. Entropy, when asked for, is ``hapo.algorithm.token_entropy`` of the same
    chunk logits (what ``entropy_from_logits_chunked`` computes), so one vocabulary
    projection serves both.

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
    log_prob, entropy = _TakenLogProb.apply(
        hidden, weight, targets, temperature, chunk_size, with_entropy
    )
    return log_prob, entropy if with_entropy else None
