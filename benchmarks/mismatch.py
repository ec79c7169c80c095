"""Rollout/learner mismatch at equal weights, exact for the adaptive temperature.

    hapo bench mismatch [--prompts 16 --n 4 --max-tokens 48 --tau 0.05]

For each rollout dtype (float32, then bfloat16): the rollout's vLLM engine (HAPO processor
installed) on the default model samples ``--prompts x --n`` at the plain temperature; the
learner (transformers, fp32, the same weights) computes that batch's ``norm_entropys`` as a
training step does; the engine samples again with the adaptive temperature and those
statistics (``--tau``); the learner recomputes each sampled token's log-prob at the
temperature it was drawn at (``hapo.training.policy.sampling_log_probs``). Reported over
the valid response tokens of the second round: ``mean_abs_logprob_diff`` and
``max_abs_logprob_diff`` of ``log mu - log pi``, and ``kl``, KL(mu || pi) by the k3
estimator ``mean(w - 1 - log w)`` with ``w = pi / mu``; ``kl_at_base_temperature`` is the
same KL for a learner that ignores the adaptive temperature (what the recompute removes).

Last line: {"bench": "mismatch", "rollout_float32": {"mean_abs_logprob_diff": ..., ...},
"rollout_bfloat16": {...}, ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import Sequence
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm import SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM

from hapo.algorithm import NormEntropys, compute_norm_entropys
from hapo.config import HapoConfig, load_config
from hapo.data import chat_prompt_ids, problem_stream
from hapo.inference.engine import build_engine, sampled_token_logprobs
from hapo.inference.logits_processor import to_extra_args
from hapo.training.policy import (
    TrainingBatch,
    build_batch,
    old_log_probs_and_entropy,
    sampling_log_probs,
)
from hapo.transport.messages import AdaptiveTemperature, ScoredTrajectory

# Any id: padded positions are masked out of attention and of every average.
PAD = 0


async def sample(
    engine: AsyncLLM,
    prompts: Sequence[list[int]],
    n: int,
    max_tokens: int,
    temperature: float,
    adaptive: AdaptiveTemperature | None,
) -> list[ScoredTrajectory]:
    """``n`` samples of each prompt with the engine's processed (behaviour) log-probs."""
    params = SamplingParams(
        temperature=temperature,
        max_tokens=max_tokens,
        logprobs=0,
        extra_args=to_extra_args(adaptive) if adaptive is not None else None,
    )

    async def one(prompt: list[int], group: int, index: int) -> ScoredTrajectory:
        final = None
        request = {"prompt_token_ids": prompt}
        async for output in engine.generate(request, params, request_id=uuid.uuid4().hex):
            final = output
        completion = final.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = sampled_token_logprobs(completion)
        return ScoredTrajectory(
            run_id="mismatch", group_id=f"g{group}", sample_idx=index, n=n, policy_version=0,
            policy_version_end=0, prompt_ids=prompt, response_ids=tokens, logprobs=logprobs,
            finish_reason="length" if completion.finish_reason == "length" else "stop",
            answer="", reward=0.0, reward_reason="unscored", temperature=temperature,
            temperature_tau=0.0 if adaptive is None else adaptive.temperature_tau,
            norm_entropys=None if adaptive is None else adaptive.norm_entropys,
        )  # fmt: skip

    samples = await asyncio.gather(
        *(one(prompt, group, i) for group, prompt in enumerate(prompts) for i in range(n))
    )
    return [s for s in samples if len(s.response_ids)]


def batch_norm_entropys(model: torch.nn.Module, batch: TrainingBatch, pivot: float) -> NormEntropys:
    """The statistics a training step on ``batch`` hands to the rollout."""
    _, entropy = old_log_probs_and_entropy(model, batch, batch.size)
    return compute_norm_entropys(entropy, batch.response_mask, pivot)


def mismatch(model: torch.nn.Module, batch: TrainingBatch) -> dict[str, float]:
    """Rollout (``batch.rollout_log_prob``) vs learner log-probs of the sampled tokens, at
    each token's sampling temperature and at the base temperature."""
    at_sampling_temperature = sampling_log_probs(model, batch)
    at_base_temperature = sampling_log_probs(
        model, replace(batch, sampling_tau=torch.zeros_like(batch.sampling_tau))
    )
    valid = batch.response_mask.bool()
    mu = batch.rollout_log_prob[valid]

    def k3(log_pi: torch.Tensor) -> float:
        log_w = log_pi[valid] - mu
        return (log_w.exp() - 1 - log_w).mean().item()

    diff = (at_sampling_temperature[valid] - mu).abs()
    return {
        "mean_abs_logprob_diff": diff.mean().item(),
        "max_abs_logprob_diff": diff.max().item(),
        "kl": k3(at_sampling_temperature),
        "kl_at_base_temperature": k3(at_base_temperature),
        "mean_abs_logprob_diff_at_base_temperature": (
            (at_base_temperature[valid] - mu).abs().mean().item()
        ),
        "tokens": int(valid.sum()),
    }


def prompts_of(config: HapoConfig, count: int, seed: int) -> list[list[int]]:
    """Chat-templated prompts of the training task."""
    tokenizer = AutoTokenizer.from_pretrained(config.model.local_path)
    problems = problem_stream(config.data.train_files, seed)
    return [
        chat_prompt_ids(tokenizer, next(problems)[0], config.data.max_prompt_length)
        for _ in range(count)
    ]


async def measure(config: HapoConfig, args: argparse.Namespace) -> dict[str, float]:
    """One rollout dtype: two sampling rounds and the learner's recompute."""
    model = AutoModelForCausalLM.from_pretrained(config.model.local_path, dtype=torch.float32)
    prompts = prompts_of(config, args.prompts, args.seed)
    pivot = config.actor_rollout_ref.actor.entropy_pivot
    engine = build_engine(config)
    try:
        plain = await sample(engine, prompts, args.n, args.max_tokens, args.temperature, None)
        stats = batch_norm_entropys(model, build_batch(plain, PAD), pivot)
        adaptive = AdaptiveTemperature(
            temperature_tau=args.tau, norm_entropys=tuple(float(v) for v in stats)
        )
        samples = await sample(engine, prompts, args.n, args.max_tokens, args.temperature, adaptive)
    finally:
        engine.shutdown()
    return mismatch(model, build_batch(samples, PAD))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="hapo bench mismatch", description=__doc__)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--tau", type=float, default=0.05, help="adaptive temperature range")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result: dict = {"bench": "mismatch"}
    for dtype in ("float32", "bfloat16"):
        config = load_config(
            overrides=[f"rollout.dtype={dtype}", "rollout.max_model_len=512",
                       "rollout.kv_cache_space_gib=1"]
        )  # fmt: skip
        print(f"rollout in {dtype} ...", flush=True)
        result[f"rollout_{dtype}"] = figures = asyncio.run(measure(config, args))
        print(f"  {figures}", flush=True)
    result.update(prompts=args.prompts, n=args.n, max_tokens=args.max_tokens, tau=args.tau)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
