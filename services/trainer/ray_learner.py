"""The HAPO learner, data-parallel over Ray Train workers (``trainer.backend=ray``).

``RayLearner`` keeps one ``ray.train.torch.TorchTrainer.fit()`` running for the whole run
(in a driver thread; starting one costs ~12 s on CPU) and feeds it steps: the driver puts
a command on a Ray queue, rank 0 takes it and broadcasts it to the other ranks, every rank
runs ``data_parallel_learner_step`` on its shard, and rank 0 answers with the step's
result and the new weights (an object reference), which the driver loads into its own
copy of the model: the copy the trainer service checkpoints and pushes to the rollout.
Optimizer and scheduler states travel only when the driver asks (before a checkpoint).

The update is that of ``hapo.training.learner.learner_step`` on the same batch
(``tests/services/trainer/test_ray_learner.py``), because every rank:

1. computes old log-probs and token entropy on its contiguous shard of the step's batch
   and all-gathers them, so ``norm_entropys`` and ``h_hat`` come from the WHOLE step's
   batch (docs/design.md, decisions 1 and 2);
2. computes the advantage on the whole batch (groups are never split for it), a few
   flops duplicated on each rank;
3. takes a contiguous shard of every mini-batch and accumulates its micro-batches'
   gradients with each loss divided by the whole MINI-BATCH's valid token count
   (``accumulate_gradients(global_num_tokens=...)``), so the ranks' gradients *sum* to
   the mini-batch's token-mean gradient;
4. all-reduces the gradients with a SUM, once per mini-batch (one flat buffer), then
   clips and steps the optimizer; every rank holds the same gradient, so the replicas stay
   identical (checked whenever the driver asks for the optimizer state).

Gradients are summed by hand rather than by wrapping the model in
``DistributedDataParallel``: the learner calls ``model.get_decoder()`` and the
``lm_head`` weight directly (the chunked vocabulary projection), which bypasses
``DDP.forward``, so DDP's reducer would never be armed. Summing explicitly is what DDP
with ``no_sync()`` over the micro-batches would do, without its averaging (no
``world_size`` rescaling to get wrong). The process group is the one TorchTrainer sets
up: gloo on CPU, NCCL with one GPU per worker (``trainer.device``). Parameters are
replicated on every rank (no FSDP sharding).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue
from torch import nn

from hapo.config import HapoConfig
from hapo.training.learner import (
    LearnerStepResult,
    MetricMeans,
    _temperature,
    accumulate_gradients,
    clipped_optimizer_step,
    make_optimizer,
    step_result,
    step_targets,
)
from hapo.training.policy import (
    TrainingBatch,
    compute_dtype,
    learner_device,
    old_log_probs_and_entropy,
)

logger = logging.getLogger("hapo.trainer")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
"""Builds the optimizer from the parameters (e.g. ``functools.partial(torch.optim.SGD,
lr=1.0)``); with it the learning rate is constant. ``None``: ``make_optimizer``."""


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


def _all_reduce_means(means: MetricMeans, device: torch.device) -> None:
    """Sum the weighted metric sums and weights over the ranks (same names, same order on
    every rank: each rank runs the same loops)."""
    names = list(means._sums)
    if not names:
        return
    values = [means._sums[n] for n in names] + [means._weights[n] for n in names]
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
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
    """``hapo.training.learner.learner_step`` for rank ``rank`` of ``world_size`` (module
    docstring).

    Mirrors ``learner_step`` line for line; the differences are the shards and the three
    collectives. Every rank gets the same result. Needs an initialised process group.
    """
    check_shardable(batch.size, config, world_size)
    start = time.perf_counter()
    actor = config.actor_rollout_ref.actor
    device = next(model.parameters()).device
    batch = batch.to(device)
    own = batch.select(shard_rows(0, batch.size, rank, world_size))
    old_log_prob, entropy = old_log_probs_and_entropy(
        model,
        own,
        actor.ppo_micro_batch_size_per_gpu,
        temperature=_temperature(config),
        chunk_size=config.trainer.logits_chunk_size,
        dtype=compute_dtype(config, device),
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
    _all_reduce_means(means, device)
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


def _on_cpu(state: Any) -> Any:
    """``state`` (nested dicts/lists of tensors) with every tensor copied to the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {key: _on_cpu(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_on_cpu(value) for value in state)
    return state


def _train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: run the driver's commands until ``stop``.

    Rank 0 reads each command from the driver's queue and broadcasts it, so every rank
    runs the same collectives in the same order; rank 0 answers.
    """
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    config: HapoConfig = loop_config["config"]
    device = ray.train.torch.get_device() if config.trainer.device != "cpu" else None
    model: nn.Module = ray.get(loop_config["model"]).to(device or "cpu")
    factory: OptimizerFactory | None = loop_config["optimizer_factory"]
    if factory is None:
        optimizer, scheduler = make_optimizer(model, config.actor_rollout_ref.actor.optim)
    else:
        optimizer = factory(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if loop_config["optimizer_state"] is not None:
        optimizer.load_state_dict(loop_config["optimizer_state"])
        scheduler.load_state_dict(loop_config["scheduler_state"])
    commands: Queue = loop_config["commands"]
    replies: Queue = loop_config["replies"]
    while True:
        message = [commands.get() if rank == 0 else None]
        dist.broadcast_object_list(message, src=0)
        kind, batch = message[0]
        if kind == "stop":
            return
        if kind == "step":
            result = data_parallel_learner_step(
                model, optimizer, scheduler, batch, config, rank, world_size
            )
            if rank == 0:
                replies.put(("step", result, ray.put(_on_cpu(model.state_dict()))))
        elif kind == "state":
            _check_replicas_equal(model, world_size)
            if rank == 0:
                state = (_on_cpu(optimizer.state_dict()), scheduler.state_dict())
                replies.put(("state", ray.put(state)))


class RayLearner:
    """The learner of a run over ``trainer.num_workers`` Ray Train workers.

    Holds the driver's ``model``, ``optimizer`` and ``scheduler`` (the trainer service's,
    on the CPU): the workers start from their states, ``step`` loads each step's weights
    back into ``model``, ``pull_state`` the optimizer and scheduler states. Starts Ray
    (``ray.init()``: a local instance, or the cluster of ``RAY_ADDRESS``) if it is not
    running, and then shuts it down in ``close``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        config: HapoConfig,
        *,
        optimizer_factory: OptimizerFactory | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config = config
        self.num_workers = config.trainer.num_workers
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(log_to_driver=False)
        # No CPU reserved: the queues are idle actors, and the workers need every core.
        self._commands = Queue(actor_options={"num_cpus": 0})
        self._replies = Queue(actor_options={"num_cpus": 0})
        self._storage = Path(tempfile.mkdtemp(prefix="hapo-ray-learner-"))
        use_gpu = learner_device(config).type == "cuda"
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "model": ray.put(model),
                "config": config,
                "optimizer_factory": optimizer_factory,
                "optimizer_state": optimizer.state_dict(),
                "scheduler_state": scheduler.state_dict(),
                "commands": self._commands,
                "replies": self._replies,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=self.num_workers,
                use_gpu=use_gpu,
                resources_per_worker={"GPU": 1} if use_gpu else {"CPU": 1},
            ),
            run_config=ray.train.RunConfig(storage_path=str(self._storage), name="learner"),
        )
        self._error: BaseException | None = None
        self._fit = threading.Thread(target=self._run, args=(trainer,), daemon=True)
        self._fit.start()

    def _run(self, trainer: TorchTrainer) -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # reported to the caller waiting in _reply
            self._error = exc

    def _reply(self, kind: str) -> tuple[Any, ...]:
        """The workers' answer to the last command; raises if the workers died."""
        while True:
            try:
                reply = self._replies.get(timeout=0.5)
            except Empty:
                if not self._fit.is_alive():
                    raise RuntimeError(f"the Ray learner stopped: {self._error!r}") from None
                continue
            if reply[0] != kind:
                raise RuntimeError(f"the Ray learner answered {reply[0]!r} to {kind!r}")
            return reply[1:]

    def step(self, batch: TrainingBatch) -> LearnerStepResult:
        """One data-parallel training step; ``model`` then holds the new weights.

        Raises:
            ValueError: the batch or a mini-batch does not split evenly over the workers.
        """
        check_shardable(batch.size, self.config, self.num_workers)
        self._commands.put(("step", batch))
        result, state = self._reply("step")
        self.model.load_state_dict(ray.get(state))
        return result

    def pull_state(self) -> None:
        """Load the workers' optimizer and scheduler states into the driver's (for a
        checkpoint); checks that the replicas have not diverged."""
        self._commands.put(("state", None))
        (state,) = self._reply("state")
        optimizer_state, scheduler_state = ray.get(state)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(scheduler_state)

    def close(self) -> None:
        """Stop the workers (after the step in progress) and release Ray."""
        if self._fit.is_alive():
            self._commands.put(("stop", None))
            self._fit.join(timeout=60)
        for queue in (self._commands, self._replies):
            queue.shutdown()
        shutil.rmtree(self._storage, ignore_errors=True)
        if self._owns_ray:
            ray.shutdown()
