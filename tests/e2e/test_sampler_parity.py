"""Step-0 parity: with the same weights, the learner's log-prob of each sampled token at the
temperature it was drawn at equals vLLM's behaviour log-prob (the HAPO processor's ``T_dyn``
included), on the default model's real weights, fp32 rollout."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks.mismatch import PAD, batch_norm_entropys, prompts_of, sample
from hapo.config import load_config
from hapo.inference.engine import build_engine
from hapo.training.policy import build_batch, sampling_log_probs
from hapo.transport.messages import AdaptiveTemperature

# vLLM's CPU fp32 kernels vs transformers' eager fp32 forward (measured: 2e-5 at most).
TOLERANCE = 1e-3
TAU = 0.3  # wide, so the adaptive temperature moves log-probs far beyond the tolerance


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_learner_log_probs_at_t_dyn_equal_vllm_behaviour_log_probs() -> None:
    config = load_config(
        overrides=["rollout.dtype=float32", "rollout.max_model_len=512",
                   "rollout.kv_cache_space_gib=1"]
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(config.model.local_path, dtype=torch.float32)
    prompts = prompts_of(config, 4, seed=0)

    async def rounds() -> tuple[AdaptiveTemperature, list]:
        engine = build_engine(config)
        try:
            plain = await sample(engine, prompts, 2, 24, 1.0, None)
            stats = batch_norm_entropys(model, build_batch(plain, PAD), 0.8)
            adaptive = AdaptiveTemperature(
                temperature_tau=TAU, norm_entropys=tuple(float(v) for v in stats)
            )
            return adaptive, await sample(engine, prompts, 2, 24, 1.0, adaptive)
        finally:
            engine.shutdown()

    _, samples = asyncio.run(rounds())
    batch = build_batch(samples, PAD)
    assert (batch.sampling_tau == TAU).all()  # each sample records how it was drawn
    valid = batch.response_mask.bool()
    behaviour = batch.rollout_log_prob[valid]
    learner = sampling_log_probs(model, batch)[valid]
    torch.testing.assert_close(learner, behaviour, atol=TOLERANCE, rtol=0)
    # The check can see the temperature: at the base temperature the learner is far off.
    plain = replace(batch, sampling_tau=torch.zeros_like(batch.sampling_tau))
    assert (sampling_log_probs(model, plain)[valid] - behaviour).abs().max() > 20 * TOLERANCE
