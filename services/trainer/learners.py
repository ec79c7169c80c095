"""The trainer service's learner, by ``trainer.backend``: this process, or Ray Train.

Both update the service's ``model`` in place at each ``step`` (the copy it checkpoints and
pushes to the rollout) and keep its ``optimizer`` and ``scheduler`` current for a
checkpoint after ``pull_state``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from hapo.config import HapoConfig
from hapo.training.learner import LearnerStepResult, learner_step
from hapo.training.policy import TrainingBatch


class Learner(Protocol):
    def step(self, batch: TrainingBatch) -> LearnerStepResult:
        """One training step on the batch's complete groups."""
        ...

    def pull_state(self) -> None:
        """Make the optimizer and scheduler states current (before a checkpoint)."""
        ...

    def close(self) -> None: ...


class LocalLearner:
    """``hapo.training.learner.learner_step`` in this process, on the model's device."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        config: HapoConfig,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config = config

    def step(self, batch: TrainingBatch) -> LearnerStepResult:
        return learner_step(self.model, self.optimizer, self.scheduler, batch, self.config)

    def pull_state(self) -> None:
        """Nothing to do: the optimizer is this process's."""

    def close(self) -> None:
        """Nothing to release."""


def make_learner(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: HapoConfig,
) -> Learner:
    """The learner of ``trainer.backend`` (Ray is imported only when asked for)."""
    if config.trainer.backend == "ray":
        from services.trainer.ray_learner import RayLearner

        return RayLearner(model, optimizer, scheduler, config)
    return LocalLearner(model, optimizer, scheduler, config)
