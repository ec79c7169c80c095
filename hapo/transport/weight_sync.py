"""Weight sync from the trainer to the rollout's vLLM workers, through vLLM's
weight-transfer machinery (``vllm/distributed/weight_transfer``).

- On GPU, vLLM's built-in ``nccl`` engine is used as it is.
- On CPU, vLLM's NCCL engine cannot run, so this module registers a gloo engine in both of
  vLLM's factories: the same handshake over a stateless gloo process group. Weights travel
  packed into ~32 MiB chunks (one broadcast each, not one per tensor), in the dtype the
  rollout runs in, and workers load each chunk while the next is on the wire.

Importing this module registers the engine; the rollout names it in
``worker_extension_cls`` so vLLM's spawned workers import (and register) it too.

``RolloutWeightSyncClient`` is the trainer's end of the control plane: it implements
vLLM's ``VLLMWeightSyncClient`` protocol over the rollout service's HTTP routes, with the
bearer token.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, ClassVar, Self

import httpx
import torch
from vllm.distributed.utils import stateless_init_torch_distributed_process_group
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import (
    WeightTransferEngineFactory,
    WeightTransferTrainerFactory,
)

from hapo.config import HapoConfig

# Not plain "gloo": a future vLLM built-in of that name must not be shadowed silently.
GLOO_BACKEND = "hapo_gloo"


def weight_transfer_backend(config: HapoConfig) -> str:
    """``rollout.weight_transfer`` with ``auto`` resolved for this machine: ``nccl`` where
    CUDA is available, else HAPO's gloo engine. The trainer and the rollout resolve it the
    same way, so both ends of a sync agree (both on GPU hosts, or both on CPU)."""
    choice = config.rollout.weight_transfer
    if choice == "auto":
        return "nccl" if torch.cuda.is_available() else GLOO_BACKEND
    return choice


def rollout_world_size(config: HapoConfig) -> int:
    """Ranks of one replica's weight-sync group: the trainer's sender and every vLLM
    worker of the replica (each receives the full weights and loads its shard)."""
    return 1 + config.rollout.tensor_parallel_size * config.rollout.data_parallel_size


@dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """Worker side of the rendezvous: the trainer is rank 0, workers follow."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 1800.0
    """Every operation of the group gives up after this: a peer that dies mid-broadcast
    would otherwise leave the other side waiting for gloo's default 30 minutes."""


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer side of the rendezvous (``world_size`` = 1 trainer + rollout workers)."""

    backend: ClassVar[str] = GLOO_BACKEND

    master_address: str
    master_port: int
    world_size: int
    timeout_s: float = 1800.0
    """Passed to the workers' side too (``GlooWeightTransferInitInfo.timeout_s``)."""


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    """Per-round parameter metadata, in send order."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


def _param_metas(info: GlooWeightTransferUpdateInfo) -> list[ParamMeta]:
    return [
        ParamMeta(name, getattr(torch, dtype), tuple(shape))
        for name, dtype, shape in zip(info.names, info.dtype_names, info.shapes, strict=True)
    ]


# Parameters travel in chunks of about this size, so that the workers load one chunk
# into the model while the next is on the wire.
CHUNK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class _Chunk:
    dtype: torch.dtype
    indices: list[int]
    numels: list[int]


def _chunk_plan(metas: list[ParamMeta]) -> list[_Chunk]:
    """Consecutive same-dtype parameters packed into chunks of ~``CHUNK_BYTES``; both ends
    derive the same plan from the same metadata."""
    chunks: list[_Chunk] = []
    nbytes = 0
    for index, meta in enumerate(metas):
        numel = torch.Size(meta.shape).numel()
        last = chunks[-1] if chunks else None
        if last is None or last.dtype != meta.dtype or nbytes >= CHUNK_BYTES:
            chunks.append(_Chunk(meta.dtype, [], []))
            nbytes = 0
        chunks[-1].indices.append(index)
        chunks[-1].numels.append(numel)
        nbytes += numel * meta.dtype.itemsize
    return chunks


def _broadcast(group: Any, buffer: torch.Tensor) -> None:
    group.broadcast(buffer, 0).wait()


class GlooWeightTransferEngine(
    WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]
):
    """Worker side: receive packed buffers over gloo and load them into the model."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: Any) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: Any = None

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        worker_rank = self.parallel_config.rank  # rank within this vLLM instance
        self.group = stateless_init_torch_distributed_process_group(
            init_info.master_address,
            init_info.master_port,
            init_info.rank_offset + worker_rank,
            init_info.world_size,
            backend="gloo",
            timeout=timedelta(seconds=init_info.timeout_s),
        )

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        self._retie_output_embeddings()

    def _retie_output_embeddings(self) -> None:
        """Point a tied ``lm_head`` at the reloaded embeddings and re-run its processing.

        Layerwise reload processes tied parameters through one owner only (vLLM's
        documented limitation), and on CPU the output projection keeps a pre-packed copy
        of its weight: without this the logits would still come from the old embeddings.
        """
        hf_config = self.model_config.hf_config
        lm_head = getattr(self.model, "lm_head", None)
        embed_tokens = getattr(getattr(self.model, "model", None), "embed_tokens", None)
        if not getattr(hf_config, "tie_word_embeddings", False) or lm_head is None:
            return
        if embed_tokens is None:
            raise RuntimeError("tied output embeddings, but no model.embed_tokens to tie to")
        lm_head.tie_weights(embed_tokens)
        lm_head.quant_method.process_weights_after_loading(lm_head)

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: call init first")
        metas = _param_metas(update_info)
        plan = _chunk_plan(metas)

        def receive(chunk: _Chunk) -> torch.Tensor:
            buffer = torch.empty(sum(chunk.numels), dtype=chunk.dtype)
            _broadcast(self.group, buffer)
            return buffer

        # Receive chunk k + 1 on a thread (gloo waits without the GIL) while chunk k loads.
        with ThreadPoolExecutor(max_workers=1) as pool:
            incoming = pool.submit(receive, plan[0])
            for position, chunk in enumerate(plan):
                buffer = incoming.result()
                if position + 1 < len(plan):
                    incoming = pool.submit(receive, plan[position + 1])
                self.model.load_weights(
                    (metas[i].name, tensor.view(metas[i].shape))
                    for i, tensor in zip(chunk.indices, buffer.split(chunk.numels), strict=True)
                )

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronises the accelerator; on CPU there is none.
        self.receive_weights(self.parse_update_info(update_info))

    def shutdown(self) -> None:
        self.group = None


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side: pack the source's tensors per dtype and broadcast them as rank 0."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, is_sender: bool):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.group: Any = None

    @classmethod
    def trainer_init(
        cls,
        init_info: GlooTrainerInitInfo,
        *,
        client: VLLMWeightSyncClient,
        source: WeightSource | None = None,
    ) -> Self:
        if source is None:
            raise ValueError("gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        if not engine.is_sender:
            return engine
        worker_info = GlooWeightTransferInitInfo(
            master_address=init_info.master_address,
            master_port=init_info.master_port,
            rank_offset=1,
            world_size=init_info.world_size,
            timeout_s=init_info.timeout_s,
        )
        # The workers block in the rendezvous; open ours while their RPC is in flight.
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine.group = stateless_init_torch_distributed_process_group(
                init_info.master_address, init_info.master_port, 0, init_info.world_size,
                backend="gloo", timeout=timedelta(seconds=init_info.timeout_s),
            )  # fmt: skip
            future.result()
        return engine

    def send_weights(self, weight_version: str | None = None) -> None:
        """Push every parameter: start, update (workers receive while we broadcast),
        finish with ``weight_version``."""
        assert self.source is not None
        metas = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # stay in the trainer-side collectives
                pass
            return
        info = GlooWeightTransferUpdateInfo(
            names=[m.name for m in metas],
            dtype_names=[str(m.dtype).removeprefix("torch.") for m in metas],
            shapes=[list(m.shape) for m in metas],
        )
        tensors = [tensor.detach().reshape(-1) for _, tensor in self.source]
        # Packed before generation pauses: the pause only covers the transfer itself.
        packed = [torch.cat([tensors[i] for i in chunk.indices]) for chunk in _chunk_plan(metas)]
        del tensors
        self.client.start_weight_update()
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self.client.update_weights, asdict(info))
            for flat in packed:
                _broadcast(self.group, flat)
            future.result()
        self.client.finish_weight_update(weight_version)

    def shutdown(self) -> None:
        self.group = None


class CastModuleSource(WeightSource):
    """``module.named_parameters()`` cast to the rollout's dtype (e.g. bf16 halves the
    bytes sent), on ``device`` if given (NCCL sends from the GPU whatever the module's)."""

    def __init__(
        self, module: torch.nn.Module, dtype: torch.dtype, device: torch.device | None = None
    ) -> None:
        self._module = module
        self._dtype = dtype
        self._device = device

    def metadata(self) -> list[ParamMeta]:
        return [
            ParamMeta(name, self._dtype, tuple(p.shape))
            for name, p in self._module.named_parameters()
        ]

    def __iter__(self):
        for name, parameter in self._module.named_parameters():
            yield name, parameter.detach().to(self._device, self._dtype)


class GlooWorkerExtension:
    """Named in vLLM's ``worker_extension_cls`` only so workers import this module."""


class RolloutWeightSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` over the rollout service's HTTP routes.

    ``weight_version`` is sent with ``finish_weight_update`` when the engine passes none:
    vLLM's NCCL engine finishes without a version, and the rollout tags trajectories with it.
    ``norm_entropys`` travel in the same request, so a replica adopts weights and their
    statistics together.
    """

    def __init__(self, base_url: str, token: str | None, timeout_s: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s)
        self.weight_version: str | None = None
        self.norm_entropys: tuple[float, float, float, float] | None = None
        """Sent with ``finish_weight_update``: the statistics measured with these weights."""

    def _post(self, path: str, body: dict[str, Any] | None = None) -> None:
        self._http.post(path, json=body).raise_for_status()

    def weights_dtype(self, timeout_s: float) -> torch.dtype:
        """The dtype the replica's engine holds its weights in (``GET /v1/weights``): the
        one to send them in. Answering within ``timeout_s`` is the replica's health check.

        Raises:
            httpx.HTTPError: the replica did not answer, or refused.
            ValueError: it reported a dtype that is not a floating-point torch dtype.
        """
        response = self._http.get("/v1/weights", timeout=timeout_s)
        response.raise_for_status()
        name = response.json()["dtype"]
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"rollout replica reported weights dtype {name!r}")
        return dtype

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._post("/v1/weights/init", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self._post("/v1/weights/start")

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._post("/v1/weights/update", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = self.weight_version if weight_version is None else weight_version
        self._post(
            "/v1/weights/finish", {"weight_version": version, "norm_entropys": self.norm_entropys}
        )

    def close(self) -> None:
        self._http.close()


def _register() -> None:
    """Register the gloo engine in both factories, once per process."""
    registrations = [
        (WeightTransferEngineFactory, GlooWeightTransferEngine),
        (WeightTransferTrainerFactory, GlooTrainerWeightTransferEngine),
    ]
    for factory, engine in registrations:
        if GLOO_BACKEND not in factory._registry:  # once per process
            factory.register_engine(GLOO_BACKEND, engine)


_register()

__all__ = [
    "GLOO_BACKEND",
    "CastModuleSource",
    "GlooTrainerInitInfo",
    "GlooTrainerWeightTransferEngine",
    "GlooWeightTransferEngine",
    "GlooWorkerExtension",
    "RolloutWeightSyncClient",
    "rollout_world_size",
    "weight_transfer_backend",
]
