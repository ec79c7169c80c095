"""The learner's tensor code: one HAPO training step on a batch of scored trajectories.

Pure tensor code (no I/O, no Redis, no clocks other than step timing): the trainer service
feeds it complete groups and publishes what it returns. All HAPO maths comes from
``hapo.algorithm`` and the model's log-probs from ``hapo.training.policy``; this module orders the
calls. ``learner_step``: old log-probs and token entropy with the current weights (no
grad, except the first mini-batch's: with ``trainer.reuse_first_forward`` its training
forward runs first and serves as its ``pi_prox`` pass); ``norm_entropys`` of the whole step's
batch (docs/design.md, decision 1); the advantage;
then ``ppo_epochs`` passes over mini-batches, each an optimizer step accumulated over
micro-batches whose losses add up to the mini-batch's token-mean (decision 3), with
``h_hat`` from the current policy's entropy normalised by the step's statistics (decision
2; ``algorithm.reference_micro_batch_h_hat`` uses each micro-batch's own).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from hapo.algorithm import (
    NormEntropys,
    compute_grpo_outcome_advantage,
    compute_hapo_outcome_advantage,
    compute_norm_entropys,
    compute_rollout_correction,
    entropy_based_temperature,
    entropy_h_hat,
    hapo_policy_loss,
    log_entropy,
)
from hapo.config import AlgorithmConfig, HapoConfig, OptimConfig
from hapo.training.collectives import LOCAL, Collectives, check_shardable
from hapo.training.metric_means import MetricMeans
from hapo.training.policy import (
    TrainingBatch,
    compute_dtype,
    policy_log_probs,
    sampling_log_probs,
)


def compute_advantages(batch: TrainingBatch, algorithm: AlgorithmConfig) -> torch.Tensor:
    """``[B, R]`` advantages of the batch by ``algorithm.adv_estimator``."""
    if algorithm.adv_estimator == "hapo":
        advantages, _ = compute_hapo_outcome_advantage(
            batch.token_level_rewards,
            batch.response_mask,
            batch.group_index,
            norm_adv_by_std_in_grpo=algorithm.norm_adv_by_std_in_grpo,
            reference_padding_fallback=algorithm.reference_padding_fallback,
        )
    else:
        advantages, _ = compute_grpo_outcome_advantage(
            batch.token_level_rewards,
            batch.response_mask,
            batch.group_index,
            norm_adv_by_std_in_grpo=algorithm.norm_adv_by_std_in_grpo,
        )
    return advantages


@dataclass(frozen=True)
class StepTargets:
    """What a step's update is computed against, fixed before the first update.

    Attributes:
        old_log_prob: ``[B, R]`` log-probs under the weights at the start of the step.
        advantages: ``[B, R]`` advantages.
        norm_entropys: the step's entropy statistics (normalise ``h_hat`` with them).
        old_h_hat: ``[B, R]`` ``h_hat`` of the start-of-step entropies, used where the
            loss needs no current entropy (adaptive parts off) for the split metrics.
        rollout_is_weights: ``[B, R]`` behaviour correction ``pi_prox / mu`` of each token,
            truncated by ``algorithm.rollout_correction`` (1 with ``mode=off``).
        loss_mask: ``[B, R]`` float32, the response tokens the loss averages over: the
            valid ones, less sequences the correction drops and samples staler than
            ``trainer.max_staleness``.
        metrics: ``rollout_corr/`` and ``staleness/`` scalars of the whole batch.
    """

    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    norm_entropys: NormEntropys
    old_h_hat: torch.Tensor
    rollout_is_weights: torch.Tensor
    loss_mask: torch.Tensor
    metrics: dict[str, float]

    def select(self, rows: slice) -> StepTargets:
        """The targets of the samples ``rows``."""
        return replace(
            self,
            old_log_prob=self.old_log_prob[rows],
            advantages=self.advantages[rows],
            old_h_hat=self.old_h_hat[rows],
            rollout_is_weights=self.rollout_is_weights[rows],
            loss_mask=self.loss_mask[rows],
        )


def step_targets(
    batch: TrainingBatch,
    old_log_prob: torch.Tensor,
    entropy: torch.Tensor,
    config: HapoConfig,
    prox_log_prob_at_sampling_temperature: torch.Tensor | None = None,
) -> StepTargets:
    """A step's targets from the whole batch's start-of-step log-probs and entropies
    ``[B, R]``: ``norm_entropys`` (docs/design.md, decision 1), advantages, ``h_hat``, and
    the behaviour correction of each token (decision 5), ``pi_prox / mu`` with ``pi_prox``
    at the base temperature (``old_log_prob``) or, when given, at each token's sampling
    temperature (``rollout_correction.recompute_at_sampling_temperature``).

    Staleness is a bound: a sample started more than ``trainer.max_staleness`` versions
    before the weights being trained still counts in its group's advantage (its reward is
    a fair draw of the prompt) but leaves the loss; ``staleness/dropped_samples`` counts it.
    """
    actor, algorithm = config.actor_rollout_ref.actor, config.algorithm
    correction = algorithm.rollout_correction
    norm_entropys = compute_norm_entropys(
        entropy,
        batch.response_mask,
        actor.entropy_pivot,
        reference_scale_neg_sign=algorithm.reference_scale_neg_sign,
    )
    prox = old_log_prob
    if prox_log_prob_at_sampling_temperature is not None:
        prox = prox_log_prob_at_sampling_temperature
    weights, keep, metrics = compute_rollout_correction(
        prox,
        batch.rollout_log_prob,
        batch.response_mask,
        mode=correction.mode,
        rollout_is_threshold=correction.rollout_is_threshold,
        rollout_rs_threshold=correction.rollout_rs_threshold,
        rollout_rs_threshold_lower=correction.rollout_rs_threshold_lower,
    )
    fresh = batch.staleness <= config.trainer.max_staleness
    return StepTargets(
        old_log_prob=old_log_prob,
        advantages=compute_advantages(batch, algorithm),
        norm_entropys=norm_entropys,
        old_h_hat=entropy_h_hat(log_entropy(entropy), norm_entropys),
        rollout_is_weights=weights,
        loss_mask=(keep & fresh[:, None]).float(),
        metrics={
            **{name: value.item() for name, value in metrics.items()},
            **staleness_metrics(batch.staleness, config.trainer.max_staleness),
            **sampled_temperature_metrics(batch, entropy),
        },
    )


def sampled_temperature_metrics(batch: TrainingBatch, entropy: torch.Tensor) -> dict[str, float]:
    """``entropy/t_dyn_*``: the distribution of the temperatures the batch's tokens were
    sampled at, ``T * (1 + h_hat * tau)`` with each sample's own statistics, ``h_hat`` from
    the start-of-step entropies ``[B, R]`` (the sampler saw its own weights' entropies,
    up to ``max_staleness`` versions older, of the raw logits: equal at ``T = 1``)."""
    stats = tuple(column[:, None] for column in batch.sampling_norm_entropys.unbind(-1))
    t_dyn = entropy_based_temperature(
        entropy, batch.sampling_temperature[:, None], batch.sampling_tau[:, None], stats
    )
    valid = t_dyn[batch.response_mask.bool()]
    return {
        "entropy/t_dyn_mean": valid.mean().item(),
        "entropy/t_dyn_std": valid.std(correction=0).item(),
        "entropy/t_dyn_min": valid.min().item(),
        "entropy/t_dyn_max": valid.max().item(),
        "entropy/adaptive_samples_frac": (batch.sampling_tau > 0).float().mean().item(),
    }


def staleness_metrics(staleness: torch.Tensor, max_staleness: int) -> dict[str, float]:
    """``staleness/`` scalars of a batch's ``[B]`` sample staleness: mean, max, the number of
    samples at each staleness up to ``max_staleness`` and the number beyond it (dropped)."""
    counts = torch.bincount(staleness.clamp(0, max_staleness + 1), minlength=max_staleness + 2)
    return {
        "staleness/mean": staleness.float().mean().item(),
        "staleness/max": float(staleness.max()),
        **{f"staleness/samples_{k}": float(counts[k]) for k in range(max_staleness + 1)},
        "staleness/dropped_samples": float(counts[max_staleness + 1]),
    }


def _temperature(config: HapoConfig) -> float:
    """Log-probs are taken at the base sampling temperature (1 for greedy, T = 0)."""
    return config.actor_rollout_ref.rollout.temperature or 1.0


class PolicyForward(NamedTuple):
    """A micro-batch's policy forward, graphs attached: ``[B, R]`` log-probs and entropies
    (``None`` unless asked)."""

    log_prob: torch.Tensor
    entropy: torch.Tensor | None


def policy_forward(
    model: nn.Module, batch: TrainingBatch, config: HapoConfig, *, with_entropy: bool
) -> PolicyForward:
    """``policy_log_probs`` of ``batch`` with the trainer's temperature, chunk and dtype."""
    return PolicyForward(
        *policy_log_probs(
            model,
            batch,
            temperature=_temperature(config),
            chunk_size=config.trainer.logits_chunk_size,
            with_entropy=with_entropy,
            dtype=compute_dtype(config, batch.input_ids.device),
            pack=config.trainer.pack_responses,
        )
    )


def accumulate_gradients(
    model: nn.Module,
    mini_batch: TrainingBatch,
    targets: StepTargets,
    config: HapoConfig,
    means: MetricMeans | None = None,
    global_num_tokens: torch.Tensor | float | None = None,
    forwards: Sequence[PolicyForward] | None = None,
) -> torch.Tensor:
    """Backward the HAPO loss of one mini-batch, micro-batch by micro-batch, into ``.grad``.

    Each micro-batch's loss is divided by the mini-batch's valid token count, so the
    accumulated gradient is that of the mini-batch's token-mean loss whatever the
    micro-batch size (with ``reference_micro_batch_h_hat`` off).

    ``global_num_tokens`` overrides that count: a data-parallel rank holding one shard of a
    mini-batch passes the whole mini-batch's count, so that the ranks' gradients *sum* to
    the mini-batch's token-mean gradient (``hapo.training.collectives``).

    ``forwards`` are the micro-batches' policy forwards already run, graphs attached (one
    per micro-batch, in order, each with its entropy): they are used instead of running
    the model again (``learner_step``'s first mini-batch).

    Returns:
        The mini-batch's loss (a detached scalar), the sum of its micro-batches' losses.
    """
    actor, algorithm = config.actor_rollout_ref.actor, config.algorithm
    current_entropy = actor.adaptive_clip or actor.adaptive_advantage
    if global_num_tokens is None:
        global_num_tokens = targets.loss_mask.sum().clamp_min(1)
    micro = actor.ppo_micro_batch_size_per_gpu
    total_loss = torch.zeros(())
    for index, start in enumerate(range(0, mini_batch.size, micro)):
        rows = slice(start, start + micro)
        batch, micro_targets = mini_batch.select(rows), targets.select(rows)
        if forwards is None:
            log_prob, entropy = policy_forward(model, batch, config, with_entropy=current_entropy)
        else:
            log_prob, entropy = forwards[index]
            entropy = entropy if current_entropy else None
        if entropy is None:
            h_hat = micro_targets.old_h_hat
        else:
            norm_entropys = targets.norm_entropys
            if algorithm.reference_micro_batch_h_hat:
                norm_entropys = compute_norm_entropys(
                    entropy,
                    batch.response_mask,
                    actor.entropy_pivot,
                    reference_scale_neg_sign=algorithm.reference_scale_neg_sign,
                )
            h_hat = entropy_h_hat(log_entropy(entropy), norm_entropys)
        loss, metrics = hapo_policy_loss(
            log_prob,
            micro_targets.old_log_prob,
            micro_targets.advantages,
            micro_targets.loss_mask,
            h_hat,
            clip_ratio_low=actor.clip_ratio_low,
            clip_ratio_high=actor.clip_ratio_high,
            clip_ratio_c=actor.clip_ratio_c,
            adaptive_clip=actor.adaptive_clip,
            clip_alpha=actor.clip_alpha,
            adaptive_advantage=actor.adaptive_advantage,
            adv_beta=actor.adv_beta,
            global_num_tokens=global_num_tokens,
            rollout_is_weights=micro_targets.rollout_is_weights,
        )
        loss.backward()
        total_loss += loss.detach().cpu()
        if means is not None:
            high = micro_targets.loss_mask * (h_hat > 0)
            weights = {
                "loss/clipfrac_high_entropy": high.sum(),
                "loss/clipfrac_low_entropy": (micro_targets.loss_mask - high).sum(),
            }
            num_tokens = metrics.pop("loss/num_tokens")
            for name, value in metrics.items():
                means.add(name, value, weights.get(name, num_tokens))
            means.add("entropy/h_hat_pos_frac", high.sum() / num_tokens.clamp_min(1), num_tokens)
    return total_loss


def make_optimizer(
    model: nn.Module, optim: OptimConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over all parameters and a linear warm-up, stepped once per training step.

    Step ``k`` (from 0) uses ``lr * min(1, (k + 1) / lr_warmup_steps)``: unlike
    transformers' ``get_constant_schedule_with_warmup`` the first step does not run at
    learning rate 0.

    The fused implementation (CPU and CUDA): torch's default on CPU is a loop over the
    parameters, 4.7x slower on the 135M default model (0.39 vs 0.08 s a step, measured on a
    2-core CPU), and an optimizer step comes with every mini-batch.
    """
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay, fused=True
    )
    warmup = optim.lr_warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    return optimizer, scheduler


class LearnerStepResult(NamedTuple):
    """What a training step hands back to the trainer service."""

    metrics: dict[str, float]
    """Scalars grouped by prefix: ``loss/``, ``reward/``, ``entropy/``, ``perf/``."""
    norm_entropys: NormEntropys
    """Entropy statistics of this step's batch, for the rollout's next samples."""
    h_hat: torch.Tensor | None = None
    """``h_hat`` of the batch's response tokens at the start of the step (1-D, on CPU),
    for the trainer's histogram."""


def _batch_metrics(
    batch: TrainingBatch, advantages: torch.Tensor, entropy: torch.Tensor
) -> dict[str, float]:
    """Reward, advantage, length and entropy statistics of the step's batch."""
    mask = batch.response_mask
    scores = batch.token_level_rewards.sum(dim=-1)
    lengths = mask.sum(dim=-1)
    valid_advantages = advantages.masked_select(mask.bool())
    return {
        "reward/mean": scores.mean().item(),
        "reward/std": scores.std(correction=0).item(),
        "reward/advantage_mean": valid_advantages.mean().item(),
        "reward/advantage_std": valid_advantages.std(correction=0).item(),
        "reward/advantage_min": valid_advantages.min().item(),
        "reward/advantage_max": valid_advantages.max().item(),
        "reward/response_length_mean": lengths.mean().item(),
        "reward/response_length_max": lengths.max().item(),
        "entropy/mean": ((entropy * mask).sum() / mask.sum()).item(),
    }


def learner_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: TrainingBatch,
    config: HapoConfig,
    collectives: Collectives = LOCAL,
) -> LearnerStepResult:
    """One training step on a batch of complete groups (module docstring, steps 1-2).

    Mini-batches are ``ppo_mini_batch_size x rollout.n`` consecutive samples (keep groups
    contiguous); each is one optimizer step with gradient clipping at ``actor.grad_clip``.
    An update whose gradient norm is not finite is skipped (counted in
    ``loss/skipped_updates``). The scheduler steps once per call. The batch moves to the
    model's device; ``trainer.precision`` picks the compute dtype there. ``pi_prox`` and the
    step's entropy statistics come first (``start_of_step_pass``: with
    ``trainer.reuse_first_forward``, the first mini-batch's training forward is its share).

    ``collectives`` is ``LOCAL`` in one process; a data-parallel rank passes its
    ``DataParallel`` and works on its shards, and every rank gets the same result
    (``hapo.training.collectives``). Needs an initialised process group then.

    Raises:
        ValueError: the batch or a mini-batch does not split evenly over the ranks.
    """
    check_shardable(batch.size, config, collectives.world_size)
    start, cpu_start = time.perf_counter(), time.process_time()
    actor = config.actor_rollout_ref.actor
    batch = batch.to(next(model.parameters()).device)
    own, micro = batch.select(collectives.shard(0, batch.size)), actor.ppo_micro_batch_size_per_gpu
    dtype = compute_dtype(config, batch.input_ids.device)
    chunk_size = config.trainer.logits_chunk_size
    mini = actor.ppo_mini_batch_size * config.actor_rollout_ref.rollout.n
    first_forwards, old_log_prob, entropy = start_of_step_pass(
        model, batch, config, mini, collectives
    )
    prox_at_sampling_temperature = None
    if config.algorithm.rollout_correction.recompute_at_sampling_temperature:
        prox_at_sampling_temperature = collectives.gather_rows(
            torch.cat([
                sampling_log_probs(
                    model, own.select(slice(first, first + micro)), chunk_size=chunk_size,
                    dtype=dtype, pack=config.trainer.pack_responses,
                )
                for first in range(0, own.size, micro)
            ])
        )  # fmt: skip
    targets = step_targets(batch, old_log_prob, entropy, config, prox_at_sampling_temperature)
    old_pass_s = time.perf_counter() - start

    means = MetricMeans()
    lr = scheduler.get_last_lr()[0]
    skipped = 0
    for _ in range(actor.ppo_epochs):
        for first in range(0, batch.size, mini):
            size = min(mini, batch.size - first)
            rows = collectives.shard(first, size)
            optimizer.zero_grad(set_to_none=True)
            loss = accumulate_gradients(
                model,
                batch.select(rows),
                targets.select(rows),
                config,
                means,
                # At least 1: a mini-batch whose every sample is too stale has loss 0, not
                # 0 / 0.
                global_num_tokens=targets.loss_mask[first : first + size].sum().clamp_min(1),
                forwards=first_forwards,
            )
            first_forwards = None  # their graphs are spent: free them
            collectives.sum_gradients(model)
            # Recorded on every rank; the weights sum to world_size like the values.
            loss = collectives.sum_(loss)
            skipped += not clipped_optimizer_step(model, optimizer, actor.grad_clip, loss, means)
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    collectives.sum_means(means)
    result = step_result(batch, targets, entropy, means, lr, skipped, start, old_pass_s)
    result.metrics["perf/data_parallel_ranks"] = float(collectives.world_size)
    if batch.input_ids.device.type == "cpu":
        # CPU seconds of this process over what its threads could have had: near 1 with
        # the cores to itself, lower where another process (vLLM beside it) takes them.
        threads_s = result.metrics["perf/step_s"] * torch.get_num_threads()
        result.metrics["perf/cpu_share"] = (time.process_time() - cpu_start) / threads_s
    return result


def start_of_step_pass(
    model: nn.Module,
    batch: TrainingBatch,
    config: HapoConfig,
    mini_batch_size: int,
    collectives: Collectives = LOCAL,
) -> tuple[list[PolicyForward] | None, torch.Tensor, torch.Tensor]:
    """``pi_prox``'s log-probs and the token entropies of the whole batch with the weights
    the step starts from, ``[B, R]`` each, gathered over the ranks.

    With ``trainer.reuse_first_forward`` the first mini-batch's share (``mini_batch_size``
    rows) runs with graphs, as its training forward: the first update is taken with these
    same weights, so its log-probs are ``pi_prox``'s (its ratios are exactly 1) and no
    separate no-grad pass of it is needed, only of the rest of the batch. Those forwards
    come back, one per micro-batch, for ``accumulate_gradients``; ``None`` without the
    switch, where every row takes the no-grad pass.
    """
    micro = config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu
    first_size = min(mini_batch_size, batch.size) if config.trainer.reuse_first_forward else 0
    passes = [(0, first_size, True), (first_size, batch.size - first_size, False)]
    forwards: list[PolicyForward] | None = None
    log_probs, entropys = [], []
    for start, size, with_graph in passes:
        if not size:
            continue
        rows = batch.select(collectives.shard(start, size))
        with torch.set_grad_enabled(with_graph):
            part = [
                policy_forward(
                    model, rows.select(slice(row, row + micro)), config, with_entropy=True
                )
                for row in range(0, rows.size, micro)
            ]
        if with_graph:
            forwards = part
        log_probs.append(collectives.gather_rows(torch.cat([f.log_prob.detach() for f in part])))
        entropys.append(collectives.gather_rows(torch.cat([f.entropy.detach() for f in part])))
    return forwards, torch.cat(log_probs), torch.cat(entropys)


def clipped_optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    loss: torch.Tensor,
    means: MetricMeans,
) -> bool:
    """Clip the accumulated gradients and step, unless their norm is not finite; record the
    mini-batch's loss and gradient norm. Returns whether the optimizer stepped."""
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    stepped = bool(torch.isfinite(grad_norm))
    if stepped:
        optimizer.step()
    one = torch.ones(())
    means.add("loss/policy_loss", loss, one)
    means.add("loss/grad_norm", grad_norm.cpu(), one)
    return stepped


def step_result(
    batch: TrainingBatch,
    targets: StepTargets,
    entropy: torch.Tensor,
    means: MetricMeans,
    lr: float,
    skipped: int,
    start: float,
    old_pass_s: float,
) -> LearnerStepResult:
    """The step's metrics (by prefix), ``norm_entropys`` and start-of-step ``h_hat``."""
    step_s = time.perf_counter() - start
    norm_entropys = targets.norm_entropys
    metrics = {
        **means.means(),
        "loss/lr": lr,
        "loss/skipped_updates": float(skipped),
        **_batch_metrics(batch, targets.advantages, entropy),
        **{f"entropy/{name}": float(value) for name, value in norm_entropys._asdict().items()},
        **targets.metrics,
        "perf/step_s": step_s,
        "perf/old_log_prob_s": old_pass_s,
        "perf/tokens_per_s": batch.attention_mask.sum().item() / step_s,
        "perf/samples": float(batch.size),
    }
    h_hat = targets.old_h_hat.masked_select(batch.response_mask.bool()).detach().cpu()
    return LearnerStepResult(metrics, norm_entropys, h_hat)
