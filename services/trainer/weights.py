"""Pushing the trainer's weights to the rollout replicas.

The backend is ``rollout.weight_transfer`` resolved as the rollout resolves it
(``hapo.transport.weight_sync.weight_transfer_backend``): vLLM's NCCL engine where CUDA is
available (the model is on the GPU, tensors go GPU to GPU), HAPO's gloo engine on CPU.
The weights travel in the dtype each replica reports (``GET /v1/weights``), so a replica
whose ``rollout.dtype=auto`` resolved otherwise than this machine would (another CPU kind)
still receives its own.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import nn
from vllm.distributed.weight_transfer.base import TrainerWeightTransferEngine

from hapo.config import HapoConfig
from hapo.transport.weight_sync import (
    GLOO_BACKEND,
    CastModuleSource,
    GlooTrainerInitInfo,
    GlooTrainerWeightTransferEngine,
    RolloutWeightSyncClient,
    rollout_world_size,
    weight_transfer_backend,
)

logger = logging.getLogger("hapo.trainer")

_HEALTH_TIMEOUT_S = 2.0


def rollout_replicas(
    urls: Sequence[str],
    discovery: str,
    resolve: Callable[..., list[tuple[Any, ...]]] = socket.getaddrinfo,
) -> list[str]:
    """The replicas' base URLs (``trainer.rollout_discovery``): ``urls`` themselves
    (``static``), or one URL per address each URL's host resolves to (``dns``; IPv6 in
    brackets). A name that does not resolve (no replica is ready) gives none. Duplicates
    are dropped, order kept."""
    if discovery == "static":
        return list(dict.fromkeys(urls))
    replicas = []
    for url in urls:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = resolve(parts.hostname, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            logger.warning("rollout replicas: %s does not resolve (%s)", parts.hostname, exc)
            continue
        for family, *_, address in addresses:
            host = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
            replicas.append(f"{parts.scheme}://{host}:{port}{parts.path}")
    return list(dict.fromkeys(replicas))


class WeightPusher:
    """Sends ``model``'s weights to every replica (``rollout_replicas`` of
    ``trainer.rollout_urls``, found again before each push; none: a no-op); a replica that
    fails or times out is logged and skipped for that push, and its transfer group is set
    up again at the next push; a replica that is gone has its group closed."""

    def __init__(self, config: HapoConfig, model: nn.Module) -> None:
        self.config, self.model = config, model
        self.backend = weight_transfer_backend(config)
        self.senders: dict[str, tuple[RolloutWeightSyncClient, TrainerWeightTransferEngine]] = {}
        self.ports: dict[str, int] = {}
        """The rendezvous port of each replica's open group (``trainer.weight_sync_port``
        and up, each held by one group)."""

    def _connect(
        self, client: RolloutWeightSyncClient, dtype: torch.dtype, port: int
    ) -> TrainerWeightTransferEngine:
        """Open the transfer group with one replica (the trainer is rank 0), sending the
        weights in ``dtype``, the replica's."""
        trainer = self.config.trainer
        world_size = rollout_world_size(self.config)
        if self.backend == GLOO_BACKEND:
            source = CastModuleSource(self.model, dtype, torch.device("cpu"))
            init = GlooTrainerInitInfo(
                master_address=trainer.weight_sync_host, master_port=port,
                world_size=world_size, rank=0, timeout_s=trainer.weight_sync_timeout_s,
            )  # fmt: skip
            return GlooTrainerWeightTransferEngine.trainer_init(init, client=client, source=source)
        # Imported here: vLLM's NCCL engine loads CUDA libraries.
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        source = CastModuleSource(self.model, dtype, torch.device("cuda"))
        init = NCCLTrainerInitInfo(
            master_address=trainer.weight_sync_host, master_port=port,
            world_size=world_size, rank=0,
        )  # fmt: skip
        return NCCLTrainerWeightTransferEngine.trainer_init(init, client=client, source=source)

    def _send(
        self,
        url: str,
        policy_version: int,
        norm_entropys: tuple[float, float, float, float] | None,
    ) -> None:
        """One push to one replica, over its open group or a new one."""
        if url not in self.senders:
            token = self.config.api.token
            client = RolloutWeightSyncClient(
                url,
                None if token is None else token.get_secret_value(),
                timeout_s=self.config.trainer.weight_sync_timeout_s,
            )
            try:
                # Opening a group waits for the replica's workers to join; one that is down
                # (restarting, not started yet) would hold the run for the whole timeout.
                dtype = client.weights_dtype(timeout_s=_HEALTH_TIMEOUT_S)
                taken, port = set(self.ports.values()), self.config.trainer.weight_sync_port
                while port in taken:
                    port += 1
                self.senders[url] = client, self._connect(client, dtype, port)
            except BaseException:
                client.close()
                raise
            self.ports[url] = port
        client, sender = self.senders[url]
        # vLLM's NCCL engine finishes without a version: the client sends this one.
        client.weight_version = str(policy_version)
        client.norm_entropys = norm_entropys
        sender.send_weights()

    def _drop(self, url: str) -> None:
        self.ports.pop(url, None)
        if failed := self.senders.pop(url, None):
            failed[0].close()

    def push(
        self,
        policy_version: int,
        norm_entropys: tuple[float, float, float, float] | None = None,
    ) -> float:
        """Push the weights as ``policy_version``, with the ``norm_entropys`` measured by
        the step that made them (the rollout samples these weights with them); returns
        the seconds it took.

        A replica whose open group fails (it restarted) gets one more try over a new
        group; one that still fails, or does not answer its health check, is logged and
        skipped until the next push."""
        trainer = self.config.trainer
        started = time.perf_counter()
        replicas = rollout_replicas(trainer.rollout_urls, trainer.rollout_discovery)
        for gone in set(self.senders) - set(replicas):
            logger.info("rollout replica %s is gone; closing its weight transfer group", gone)
            self._drop(gone)
        for url in replicas:
            try:
                try:
                    self._send(url, policy_version, norm_entropys)
                except Exception:
                    if url not in self.senders:
                        raise  # a new group failed: no retry
                    logger.warning("weight push to %s failed; retrying over a new group", url)
                    self._drop(url)
                    self._send(url, policy_version, norm_entropys)
            except Exception:  # a replica's failure must not stop the run
                logger.exception("weight push to %s failed; skipping it this step", url)
                self._drop(url)
        return time.perf_counter() - started
