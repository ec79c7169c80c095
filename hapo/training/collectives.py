"""What a learner step needs from its peers: identity in one process, collectives across
data-parallel ranks.

``hapo.training.learner.learner_step`` is written once against ``Collectives``; the local
trainer passes ``LOCAL`` (the whole batch, nothing to exchange), each Ray Train worker a
``DataParallel`` over the process group TorchTrainer set up (gloo on CPU, NCCL on GPUs).
With ``DataParallel`` the update equals the local one on the same batch because every rank:

1. computes old log-probs and token entropy on its contiguous shard of the step's batch and
   all-gathers them, so ``norm_entropys`` and ``h_hat`` come from the WHOLE step's batch
   (docs/design.md, decisions 1 and 2), and the advantage on the whole batch;
2. takes a contiguous shard of every mini-batch and accumulates its micro-batches'
   gradients with each loss divided by the whole MINI-BATCH's valid token count, so the
   ranks' gradients *sum* to the mini-batch's token-mean gradient;
3. all-reduces the gradients with a SUM, once per mini-batch (one flat buffer), then clips
   and steps the optimizer: every rank holds the same gradient, so the replicas stay equal.

Gradients are summed by hand rather than by wrapping the model in
``DistributedDataParallel``: the learner calls ``model.get_decoder()`` and the ``lm_head``
weight directly (the chunked vocabulary projection), which bypasses ``DDP.forward``, so
DDP's reducer would never be armed. Summing explicitly is what DDP with ``no_sync()`` over
the micro-batches would do, without its averaging (no ``world_size`` rescaling to get
wrong). Parameters are replicated on every rank (no FSDP sharding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from hapo.training.metric_means import MetricMeans

if TYPE_CHECKING:
    from hapo.config import HapoConfig


class Collectives:
    """One process holds the whole batch: shards are the whole range, exchanges are no-ops."""

    rank = 0
    world_size = 1

    def shard(self, first: int, size: int) -> slice:
        """This rank's contiguous share of the rows ``[first, first + size)``."""
        return slice(first, first + size)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ranks' equal-shaped ``tensor``s concatenated along dim 0, in rank order."""
        return tensor

    def sum_gradients(self, model: nn.Module) -> None:
        """Sum every parameter's ``.grad`` over the ranks."""

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        return tensor

    def sum_means(self, means: MetricMeans) -> None:
        """Sum the weighted metric sums and their weights over the ranks."""


LOCAL = Collectives()


class DataParallel(Collectives):
    """Rank ``rank`` of ``world_size`` in the default ``torch.distributed`` process group."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device

    def shard(self, first: int, size: int) -> slice:
        """Raises:
        ValueError: ``size`` is not a multiple of ``world_size``."""
        return shard_rows(first, size, self.rank, self.world_size)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def sum_gradients(self, model: nn.Module) -> None:
        """One flat all-reduce; a parameter without a gradient counts as 0."""
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

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_means(self, means: MetricMeans) -> None:
        """Every rank runs the same loops, so the names come in the same order on each."""
        names = list(means._sums)
        if not names:
            return
        values = [means._sums[n] for n in names] + [means._weights[n] for n in names]
        stacked = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values]
        )
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        for index, name in enumerate(names):
            means._sums[name] = stacked[index]
            means._weights[name] = stacked[len(names) + index]


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
