"""What the learner's and the policy forward's tests share: two groups of four samples on
a tiny random Llama, and gradient helpers."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from hapo.transport.messages import ScoredTrajectory
from tests.helpers import scored_trajectories

VOCAB, PAD = 128, 0
# (prompt length, response length, reward) of two groups of four samples.
SAMPLES = [
    [(3, 5, 1.0), (3, 9, 0.0), (3, 2, 1.0), (3, 12, 0.0)],
    [(7, 4, 0.0), (7, 11, 0.0), (7, 6, 1.0), (7, 1, 0.0)],
]


def two_groups() -> list[ScoredTrajectory]:
    """The samples of ``SAMPLES``: random tokens, one group per prompt."""
    return scored_trajectories(SAMPLES, VOCAB, seed=0)


def gradients(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_gradients_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)
