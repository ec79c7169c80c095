"""Rollout test configuration on the tiny model (``tiny_model_dir``, tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from hapo.config import HapoConfig, load_config


def tiny_config(model_dir: Path, *overrides: str) -> HapoConfig:
    """Config of a rollout on the tiny model (fp32, so transformers can check it exactly)."""
    return load_config(
        overrides=[
            f"model.path={model_dir}", "rollout.dtype=float32", "rollout.max_model_len=256",
            "rollout.kv_cache_space_gib=1", *overrides,
        ]
    )  # fmt: skip
