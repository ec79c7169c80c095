"""Cost of the adaptive temperature in vLLM, and of one weight update.

    hapo bench rollout [--prompts 64 --max-tokens 64 --repeats 5 --dtype bfloat16]

Same prompts and engine seed, on the default model (SmolLM2-135M, ``--dtype``,
``enforce_eager``):
plain vLLM and vLLM with the HAPO processor installed run side by side (both engines up at
once). Each round runs the variants back to back: plain; processor installed but every
request adaptive-off; adaptive on (tau 0.05). The overhead is the median of the per-round
slowdowns. Every request generates exactly ``--max-tokens`` tokens (EOS ignored), so the
variants do equal work. Then the whole model's weights are pushed over the HTTP routes and
gloo (in ``--dtype`` on the wire) ``1 + --repeats`` times: ``weight_update_s`` is the
median after the first, which also warms the transfer up.

Last line: {"bench": "rollout", "overhead_adaptive_vs_plain": X, "tokens_per_s_plain": A,
"tokens_per_s_adaptive": B, "weight_update_s": W, ...}; X is the fractional slowdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import statistics
import time

import torch
from pydantic import SecretStr
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm import SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM

from hapo.config import HapoConfig, load_config
from hapo.inference.engine import build_engine
from hapo.inference.logits_processor import to_extra_args
from hapo.runtime.lifecycle import serve_http
from hapo.transport.messages import AdaptiveTemperature
from hapo.transport.weight_sync import (
    CastModuleSource,
    GlooTrainerInitInfo,
    GlooTrainerWeightTransferEngine,
    RolloutWeightSyncClient,
)
from services.rollout.app import RolloutMetrics, RolloutState, create_app

# Typical statistics of a training step: log-entropy pivot, spread and scales.
NORM_ENTROPYS = (-0.5, 1.5, 0.4, 0.5)


def chat_prompts(config: HapoConfig, count: int, seed: int) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(config.model.local_path)
    rng = random.Random(seed)
    questions = [
        f"What is {rng.randint(0, 9)} + {rng.randint(0, 9)}? Answer with just the number."
        for _ in range(count)
    ]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
            return_dict=True,
        )["input_ids"]
        for q in questions
    ]  # fmt: skip


async def tokens_per_second(
    engine: AsyncLLM, prompts: list[list[int]], max_tokens: int, extra_args: dict | None, tag: str
) -> float:
    async def one(index: int, prompt: list[int]) -> int:
        params = SamplingParams(
            temperature=1.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args,
        )  # fmt: skip
        final = None
        async for output in engine.generate(
            {"prompt_token_ids": prompt}, params, request_id=f"{tag}-{index}"
        ):
            final = output
        return len(final.outputs[0].token_ids)

    started = time.perf_counter()
    generated = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return sum(generated) / (time.perf_counter() - started)


async def weight_update_seconds(
    engine: AsyncLLM, config: HapoConfig, port: int, updates: int
) -> list[float]:
    """Push the default model's weights (in ``rollout.dtype``) through the real HTTP routes
    and gloo, ``updates`` times; seconds of each ``send_weights``."""
    state = RolloutState(engine=engine, client=None, metrics=RolloutMetrics())  # type: ignore[arg-type]
    token = secrets.token_urlsafe(24)  # the routes refuse tokens under 16 characters
    stop = asyncio.Event()
    server = asyncio.create_task(
        serve_http(create_app(state, SecretStr(token)), "127.0.0.1", port, stop)
    )
    await asyncio.sleep(0.5)
    model = AutoModelForCausalLM.from_pretrained(config.model.local_path, dtype=torch.float32)

    def push() -> list[float]:
        client = RolloutWeightSyncClient(f"http://127.0.0.1:{port}", token)
        init = GlooTrainerInitInfo(
            master_address="127.0.0.1", master_port=port + 1, world_size=2, rank=0
        )
        sender = GlooTrainerWeightTransferEngine.trainer_init(
            init,
            client=client,
            source=CastModuleSource(model, getattr(torch, config.rollout.dtype)),
        )
        seconds = []
        for version in range(1, updates + 1):
            started = time.perf_counter()
            sender.send_weights(weight_version=str(version))
            seconds.append(time.perf_counter() - started)
        return seconds

    try:
        return await asyncio.to_thread(push)
    finally:
        stop.set()
        await server


async def run(args: argparse.Namespace) -> dict:
    config = load_config(overrides=[f"rollout.dtype={args.dtype}", "rollout.max_model_len=512"])
    prompts = chat_prompts(config, args.prompts, args.seed)
    adaptive = to_extra_args(AdaptiveTemperature(temperature_tau=0.05, norm_entropys=NORM_ENTROPYS))
    off = to_extra_args(AdaptiveTemperature(adaptive_temperature=False))
    rates: dict[str, list[float]] = {"plain": [], "installed_off": [], "adaptive": []}

    print("starting plain vLLM and vLLM with the HAPO processor ...", flush=True)
    plain_engine = build_engine(config, adaptive_processor=False)
    hapo_engine = build_engine(config)
    variants = {
        "plain": (plain_engine, None),
        "installed_off": (hapo_engine, off),
        "adaptive": (hapo_engine, adaptive),
    }
    try:
        for name, (engine, extra_args) in variants.items():  # warm up; compiles the entropy pass
            await tokens_per_second(engine, prompts[:4], 4, extra_args, f"warm-{name}")
        # Rounds alternate the variants, so slow drifts of a shared machine hit all alike.
        for repeat in range(args.repeats):
            for name, (engine, extra_args) in variants.items():
                rate = await tokens_per_second(
                    engine, prompts, args.max_tokens, extra_args, f"{name}{repeat}"
                )
                rates[name].append(rate)
                print(f"  round {repeat + 1} {name}: {rate:.1f} tokens/s", flush=True)
        plain_engine.shutdown()
        print("weight updates of the whole model ...", flush=True)
        update_s = await weight_update_seconds(hapo_engine, config, args.port, 1 + args.repeats)
        print("  " + ", ".join(f"{s:.2f} s" for s in update_s), flush=True)
    finally:
        plain_engine.shutdown()
        hapo_engine.shutdown()

    median = {name: statistics.median(values) for name, values in rates.items()}
    # Per-round ratios: each compares runs made back to back.
    slowdowns = [p / a - 1 for p, a in zip(rates["plain"], rates["adaptive"], strict=True)]
    return {
        "bench": "rollout",
        "overhead_adaptive_vs_plain": round(statistics.median(slowdowns), 4),
        "tokens_per_s_plain": round(median["plain"], 1),
        "tokens_per_s_adaptive": round(median["adaptive"], 1),
        "tokens_per_s_installed_off": round(median["installed_off"], 1),
        "overhead_installed_off_vs_plain": round(
            statistics.median(
                p / o - 1 for p, o in zip(rates["plain"], rates["installed_off"], strict=True)
            ),
            4,
        ),
        "weight_update_s": round(statistics.median(update_s[1:]), 3),
        "weight_update_first_s": round(update_s[0], 3),
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "dtype": args.dtype,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="hapo bench rollout", description=__doc__)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--port", type=int, default=18931, help="HTTP port (and +1 for gloo)")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
