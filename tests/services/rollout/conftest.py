"""A tiny random Llama with SmolLM2's tokenizer: vLLM starts it in seconds on CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hapo.config import HapoConfig, load_config


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


def tiny_config(model_dir: Path, *overrides: str) -> HapoConfig:
    """Config of a rollout on the tiny model (fp32, so transformers can check it exactly)."""
    return load_config(
        overrides=[
            f"model.path={model_dir}", "rollout.dtype=float32", "rollout.max_model_len=256",
            "rollout.kv_cache_space_gib=1", *overrides,
        ]
    )  # fmt: skip
