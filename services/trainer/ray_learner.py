"""The HAPO learner, data-parallel over Ray Train workers (``trainer.backend=ray``).

``RayLearner`` keeps one ``ray.train.torch.TorchTrainer.fit()`` running for the whole run
(in a driver thread; starting one costs ~12 s on CPU) and feeds it steps: the driver puts
a command on a Ray queue, rank 0 takes it and broadcasts it to the other ranks, every rank
runs ``hapo.training.learner.learner_step`` on its shards with its ``DataParallel``
collectives, and rank 0 answers with the step's result and the new weights (an object
reference), which the driver loads into its own copy of the model: the copy the trainer
service checkpoints and pushes to the rollout. Optimizer and scheduler states travel only
when the driver asks (before a checkpoint), and then the replicas are checked to be equal.

Why the update equals the local one on the same batch is written next to the collectives
(``hapo.training.collectives``); ``tests/services/trainer/test_ray_learner.py`` checks it.
The process group is the one TorchTrainer sets up: gloo on CPU, NCCL with one GPU per
worker (``trainer.device``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
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
from hapo.training.collectives import DataParallel, check_shardable
from hapo.training.learner import LearnerStepResult, learner_step, make_optimizer
from hapo.training.policy import TrainingBatch, learner_device

logger = logging.getLogger("hapo.trainer")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
"""Builds the optimizer from the parameters (e.g. ``functools.partial(torch.optim.SGD,
lr=1.0)``); with it the learning rate is constant. ``None``: ``make_optimizer``."""


def _check_replicas_equal(model: nn.Module, collectives: DataParallel) -> None:
    """Raise unless every rank holds bit-identical parameters (a cheap fingerprint)."""
    with torch.no_grad():
        fingerprint = torch.stack([p.double().sum() for p in model.parameters()])
    gathered = collectives.gather_rows(fingerprint[None])
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
    collectives = DataParallel(rank, world_size, next(model.parameters()).device)
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
            result = learner_step(model, optimizer, scheduler, batch, config, collectives)
            if rank == 0:
                replies.put(("step", result, ray.put(_on_cpu(model.state_dict()))))
        elif kind == "state":
            _check_replicas_equal(model, collectives)
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
