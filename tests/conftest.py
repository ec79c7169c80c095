"""Fixtures shared by the suite: a real Redis with a private stream prefix per test, and a
tiny random Llama with SmolLM2's tokenizer that vLLM starts in seconds on CPU."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hapo.config import HapoConfig, load_config
from hapo.transport.streams import StreamNames


@pytest.fixture
def config() -> HapoConfig:
    """The effective default config (the environment's HAPO_* variables included)."""
    return load_config()


@pytest.fixture
def stream_names(config: HapoConfig) -> Iterator[StreamNames]:
    """Stream names under a prefix of this test's own; its keys are deleted afterwards."""
    names = StreamNames(f"test-{uuid.uuid4().hex[:12]}")
    yield names
    client = redis.Redis.from_url(config.redis.url)
    keys = list(client.scan_iter(match=f"{names.prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
async def redis_client(config: HapoConfig) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(config.redis.url)
    yield client
    await client.aclose()


def make_tiny_llama(directory: Path, source: Path, seed: int = 0) -> Path:
    """Random weights, SmolLM2's tokenizer and vocabulary. head_dim 64: vLLM's CPU
    attention rejects smaller heads."""
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        initializer_range=0.2,  # peaked next-token distributions: temperature matters
    )  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), load_config().model.local_path)
