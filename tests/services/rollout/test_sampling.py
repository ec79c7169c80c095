"""Prompt-group settings to vLLM sampling parameters (no engine needed)."""

from __future__ import annotations

import numpy as np
import pytest

from hapo.inference.logits_processor import EXTRA_ARGS_KEY, parse_args
from hapo.transport.messages import AdaptiveTemperature, PromptGroup, SamplingSettings
from services.rollout.service import sampling_params


def group(**settings) -> PromptGroup:
    return PromptGroup(
        run_id="r", group_id="g", prompt_ids=np.array([1, 2]), answer="3", n=4, policy_version=2,
        sampling=SamplingSettings(**settings),
    )  # fmt: skip


def test_settings_reach_vllm() -> None:
    adaptive = AdaptiveTemperature(temperature_tau=0.1, norm_entropys=(0.5, 1.0, 2.0, 3.0))
    params = sampling_params(
        group(temperature=0.8, top_p=0.9, max_tokens=32, seed=10),
        3,
        adaptive,
        seeds_allowed=True,
    )
    assert (params.n, params.temperature, params.top_p, params.max_tokens, params.seed) == (
        1,
        0.8,
        0.9,
        32,
        13,
    )
    assert params.logprobs == 0
    assert parse_args(params) == adaptive
    assert params.extra_args[EXTRA_ARGS_KEY]["temperature_tau"] == 0.1


def test_first_step_and_greedy_run_without_the_processor() -> None:
    assert (
        parse_args(sampling_params(group(), 0, AdaptiveTemperature(), seeds_allowed=False)) is None
    )  # no norm_entropys yet
    adaptive = AdaptiveTemperature(norm_entropys=(0.0, 1.0, 1.0, 1.0))
    assert (
        parse_args(sampling_params(group(temperature=0.0), 0, adaptive, seeds_allowed=False))
        is None
    )


def test_seeds_refused_where_they_crash_vllm_cpu() -> None:
    with pytest.raises(ValueError, match=r"sampling\.seed"):
        sampling_params(group(seed=1), 0, AdaptiveTemperature(), seeds_allowed=False)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(temperature_tau=1.0), "temperature_tau"),
        (dict(norm_entropys=(0.0, -1.0, 1.0, 1.0)), "std must be >= 0"),
        (dict(norm_entropys=(float("nan"), 1.0, 1.0, 1.0)), "must be finite"),
    ],
)
def test_bad_adaptive_settings_name_the_field(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptiveTemperature(**settings)
