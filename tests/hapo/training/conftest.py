"""Fixtures of the learner's and the policy forward's tests (``common``)."""

from __future__ import annotations

import pytest
from transformers import LlamaForCausalLM

from hapo.training.policy import TrainingBatch, build_batch
from tests.hapo.training.common import PAD, VOCAB, two_groups
from tests.helpers import tiny_llama


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama(VOCAB, PAD)


@pytest.fixture
def batch() -> TrainingBatch:
    return build_batch(two_groups(), PAD)
