"""The HAPO learner step, data-parallel over Ray Train workers (``trainer.backend=ray``).

``run_ray_learner_steps`` runs ``k`` training steps of ``hapo.learner`` under a
``ray.train.torch.TorchTrainer`` with ``num_workers`` CPU workers (a gloo process group)
and hands back the updated weights, optimizer and scheduler states and one
``LearnerStepResult`` per step. The update is that of ``hapo.learner.learner_step`` on the
same batch (``tests/services/trainer/test_ray_learner.py``), because every rank:

1. computes old log-probs and token entropy on its contiguous shard of the step's batch
   and all-gathers them, so ``norm_entropys`` and ``h_hat`` come from the WHOLE step's
   batch (DESIGN.md decisions 1 and 2);
2. computes the advantage on the whole batch (groups are never split for it), a few
   flops duplicated on each rank;
3. takes a contiguous shard of every mini-batch and accumulates its micro-batches'
   gradients with each loss divided by the whole MINI-BATCH's valid token count
   (``accumulate_gradients(global_num_tokens=...)``), so the ranks' gradients *sum* to
   the mini-batch's token-mean gradient;
4. all-reduces the gradients with a SUM, once per mini-batch (one flat buffer), then
   clips and steps the optimizer; every rank holds the same gradient, so the replicas stay
   identical (checked at the end of the run).

Gradients are summed by hand rather than by wrapping the model in
``DistributedDataParallel``: the learner calls ``model.get_decoder()`` and the
``lm_head`` weight directly (the chunked vocabulary projection), which bypasses
``DDP.forward``, so DDP's reducer would never be armed. Summing explicitly is what DDP
with ``no_sync()`` over the micro-batches would do, without its averaging (no
``world_size`` rescaling to get wrong). The process group is the one TorchTrainer sets
up: gloo on CPU.

Weights in: the driver ``ray.put``s the model (a CPU ``nn.Module``); each worker gets its
own copy. Weights out: rank 0 saves ``{model, optimizer, scheduler, results}`` with
``torch.save`` in a temporary directory and reports it as a ``ray.train.Checkpoint``;
the driver loads it from ``Result.checkpoint`` (the only channel from workers to driver
that ``TorchTrainer.fit`` has), under a temporary ``storage_path`` that is deleted after.

``fit()`` starts Ray itself when it is not running (the caller then owns
``ray.shutdown()``) and costs ~12 s to the first step on CPU, so a service should run
several steps per call or keep one ``fit()`` alive and feed it batches (not done here).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer
from torch import nn

from hapo.config import HapoConfig
from hapo.learner import (
    LearnerStepResult,
    MetricMeans,
    TrainingBatch,
    _temperature,
    accumulate_gradients,
    clipped_optimizer_step,
    make_optimizer,
    old_log_probs_and_entropy,
    step_result,
    step_targets,
)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
"""Builds the optimizer from the parameters (e.g. ``functools.partial(torch.optim.SGD,
lr=1.0)``); with it the learning rate is constant. ``None``: ``make_optimizer``."""

_STATE_FILE = "state.pt"


class RayLearnerOutput(NamedTuple):
    """What ``run_ray_learner_steps`` hands back (rank 0's, on CPU)."""

    state_dict: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    results: list[LearnerStepResult]


def shard_rows(first: int, size: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of the rows ``[first, first + size)``.

    Raises:
        ValueError: ``size`` is not a multiple of ``world_size``.
    """
    if size % world_size:
        raise ValueError(f"{size} rows do not split evenly over {world_size} ranks")
    share = size // world_size
    return slice(first + rank * share, first + (rank + 1) * share)


def check_shardable(batch_size: int, config: HapoConfig, world_size: int) -> None:
    """Raise ``ValueError`` unless the batch and each of its mini-batches split evenly."""
    mini = config.actor_rollout_ref.actor.ppo_mini_batch_size * config.actor_rollout_ref.rollout.n
    shard_rows(0, batch_size, 0, world_size)
    for first in range(0, batch_size, mini):
        shard_rows(first, min(mini, batch_size - first), 0, world_size)


def _all_gather_rows(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """The ranks' equal-shaped ``tensor``s concatenated along dim 0, in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _all_reduce_gradients(model: nn.Module) -> None:
    """Sum every parameter's ``.grad`` over the ranks (missing gradients count as 0)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def _all_reduce_means(means: MetricMeans) -> None:
    """Sum the weighted metric sums and weights over the ranks (same names, same order on
    every rank: each rank runs the same loops)."""
    names = list(means._sums)
    if not names:
        return
    stacked = torch.stack(
        [torch.as_tensor(means._sums[n], dtype=torch.float64) for n in names]
        + [torch.as_tensor(means._weights[n], dtype=torch.float64) for n in names]
    )
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    for index, name in enumerate(names):
        means._sums[name] = stacked[index]
        means._weights[name] = stacked[len(names) + index]


def data_parallel_learner_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: TrainingBatch,
    config: HapoConfig,
    rank: int,
    world_size: int,
) -> LearnerStepResult:
    """``hapo.learner.learner_step`` for rank ``rank`` of ``world_size`` (module docstring).

    Mirrors ``learner_step`` line for line; the differences are the shards and the three
    collectives. Every rank gets the same result. Needs an initialised process group.
    """
    check_shardable(batch.size, config, world_size)
    start = time.perf_counter()
    actor = config.actor_rollout_ref.actor
    own = batch.select(shard_rows(0, batch.size, rank, world_size))
    old_log_prob, entropy = old_log_probs_and_entropy(
        model,
        own,
        actor.ppo_micro_batch_size_per_gpu,
        temperature=_temperature(config),
        chunk_size=config.trainer.logits_chunk_size,
    )
    old_log_prob = _all_gather_rows(old_log_prob, world_size)
    entropy = _all_gather_rows(entropy, world_size)
    targets = step_targets(batch, old_log_prob, entropy, config)
    old_pass_s = time.perf_counter() - start

    means = MetricMeans()
    mini = actor.ppo_mini_batch_size * config.actor_rollout_ref.rollout.n
    lr = scheduler.get_last_lr()[0]
    skipped = 0
    for _ in range(actor.ppo_epochs):
        for first in range(0, batch.size, mini):
            mini_rows = slice(first, first + mini)
            mini_tokens = batch.response_mask[mini_rows].sum()
            rows = shard_rows(first, min(mini, batch.size - first), rank, world_size)
            optimizer.zero_grad(set_to_none=True)
            loss = accumulate_gradients(
                model,
                batch.select(rows),
                targets.select(rows),
                config,
                means,
                global_num_tokens=mini_tokens,
            )
            _all_reduce_gradients(model)
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            # Recorded on every rank; the weights sum to world_size like the values.
            skipped += not clipped_optimizer_step(model, optimizer, actor.grad_clip, loss, means)
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    _all_reduce_means(means)
    result = step_result(batch, targets, entropy, means, lr, skipped, start, old_pass_s)
    result.metrics["perf/data_parallel_ranks"] = float(world_size)
    return result


def _check_replicas_equal(model: nn.Module, world_size: int) -> None:
    """Raise unless every rank holds bit-identical parameters (a cheap fingerprint)."""
    with torch.no_grad():
        fingerprint = torch.stack([p.double().sum() for p in model.parameters()])
    gathered = _all_gather_rows(fingerprint[None], world_size)
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError("data-parallel replicas diverged")


def _train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: ``len(batches)`` data-parallel steps, rank 0 reports state."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    model: nn.Module = ray.get(loop_config["model"])
    config: HapoConfig = loop_config["config"]
    batches: list[TrainingBatch] = ray.get(loop_config["batches"])
    factory: OptimizerFactory | None = loop_config["optimizer_factory"]
    if factory is None:
        optimizer, scheduler = make_optimizer(model, config.actor_rollout_ref.actor.optim)
    else:
        optimizer = factory(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if loop_config["optimizer_state"] is not None:
        optimizer.load_state_dict(loop_config["optimizer_state"])
    if loop_config["scheduler_state"] is not None:
        scheduler.load_state_dict(loop_config["scheduler_state"])

    results = [
        data_parallel_learner_step(model, optimizer, scheduler, batch, config, rank, world_size)
        for batch in batches
    ]
    _check_replicas_equal(model, world_size)
    metrics = {"steps": len(results)}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "results": results,
        }
        torch.save(state, Path(directory) / _STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def run_ray_learner_steps(
    model: nn.Module,
    batches: Sequence[TrainingBatch],
    config: HapoConfig,
    *,
    num_workers: int = 2,
    optimizer_factory: OptimizerFactory | None = None,
    optimizer_state: dict[str, Any] | None = None,
    scheduler_state: dict[str, Any] | None = None,
) -> RayLearnerOutput:
    """Run one data-parallel learner step per batch on ``num_workers`` Ray CPU workers.

    Args:
        model: the policy on CPU (fp32); not modified (load the returned state into it).
        batches: the steps' batches, in order; each batch and each of its mini-batches
            must split evenly over the workers.
        config: the run's config (``learner_step``'s).
        num_workers: data-parallel ranks, one CPU each.
        optimizer_factory: see ``OptimizerFactory``.
        optimizer_state, scheduler_state: resume these (``state_dict()``s) if given.

    Returns:
        Rank 0's state after the last step and one result per step.

    Raises:
        ValueError: a batch that does not shard evenly (before Ray is touched).
    """
    for batch in batches:
        check_shardable(batch.size, config, num_workers)
    storage = Path(tempfile.mkdtemp(prefix="hapo-ray-learner-"))
    try:
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "model": ray.put(model),
                "batches": ray.put(list(batches)),
                "config": config,
                "optimizer_factory": optimizer_factory,
                "optimizer_state": optimizer_state,
                "scheduler_state": scheduler_state,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=num_workers, use_gpu=False, resources_per_worker={"CPU": 1}
            ),
            run_config=ray.train.RunConfig(storage_path=str(storage), name="learner"),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("the Ray learner reported no checkpoint")
        with result.checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / _STATE_FILE, weights_only=False)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return RayLearnerOutput(
        state["model"], state["optimizer"], state["scheduler"], state["results"]
    )
