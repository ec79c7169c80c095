"""Pushing the trainer's weights to the rollout replicas."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from hapo.config import HapoConfig
from hapo.weight_sync import (
    CastModuleSource,
    GlooTrainerInitInfo,
    GlooTrainerWeightTransferEngine,
    RolloutWeightSyncClient,
)

logger = logging.getLogger("hapo.trainer")

_ROLLOUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class WeightPusher:
    """Sends ``model``'s weights to every replica of ``trainer.rollout_urls`` (none: a
    no-op); a replica that fails or times out is logged and skipped for that push."""

    def __init__(self, config: HapoConfig, model: nn.Module) -> None:
        self.config, self.model = config, model
        self.senders: dict[str, GlooTrainerWeightTransferEngine] = {}

    def push(self, policy_version: int) -> float:
        """Push the weights as ``policy_version``; returns the seconds it took."""
        trainer = self.config.trainer
        dtype = _ROLLOUT_DTYPES.get(self.config.rollout.dtype, torch.bfloat16)
        token = self.config.api.token
        token = None if token is None else token.get_secret_value()
        started = time.perf_counter()
        for index, url in enumerate(trainer.rollout_urls):
            try:
                if url not in self.senders:
                    client = RolloutWeightSyncClient(
                        url, token, timeout_s=trainer.weight_sync_timeout_s
                    )
                    init = GlooTrainerInitInfo(
                        master_address=trainer.weight_sync_host,
                        master_port=trainer.weight_sync_port + index,
                        world_size=2, rank=0,
                    )  # fmt: skip
                    self.senders[url] = GlooTrainerWeightTransferEngine.trainer_init(
                        init, client=client, source=CastModuleSource(self.model, dtype)
                    )
                self.senders[url].send_weights(weight_version=str(policy_version))
            except Exception:  # a replica's failure must not stop the run
                logger.exception("weight push to %s failed; skipping it this step", url)
                self.senders.pop(url, None)
        return time.perf_counter() - started
