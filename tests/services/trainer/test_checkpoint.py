"""Checkpoints: exact resume of weights, optimizer, scheduler and RNG; atomic writes;
keep-last-k; a checkpoint folder is a model folder that transformers and vLLM load."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from vllm import SamplingParams

from hapo.config import load_config
from hapo.inference.engine import build_engine
from hapo.training.learner import make_optimizer
from services.trainer import checkpoint
from services.trainer.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_other_runs,
    save_checkpoint,
)
from tests.helpers import tiny_llama
from tests.services.rollout.conftest import tiny_config


def _trainer() -> tuple[LlamaForCausalLM, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """A tiny Llama with tied embeddings (stored once by safetensors) and its optimizer."""
    model = tiny_llama(
        vocab=64, pad=None, hidden_size=32, intermediate_size=64, num_hidden_layers=1, head_dim=16
    )
    optim = load_config(
        overrides=["actor_rollout_ref.actor.optim.lr=1e-2"], environ={}
    ).actor_rollout_ref.actor.optim
    return model, *make_optimizer(model, optim)


def _train_step(model, optimizer, scheduler) -> dict[str, float]:
    """One update on random data drawn from every generator a checkpoint restores."""
    ids = torch.randint(0, 64, (2, 6))
    loss = model(input_ids=ids, labels=ids).loss * (1 + random.random() + np.random.rand())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return {"loss": loss.item(), "lr": scheduler.get_last_lr()[0]}


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_resume_continues_exactly(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trainer()
    for _ in range(3):
        _train_step(model, optimizer, scheduler)
    path = save_checkpoint(
        tmp_path, 3, model, optimizer, scheduler, keep_last=2, extra={"cursor": 24}
    )
    expected = [_train_step(model, optimizer, scheduler) for _ in range(2)]
    expected_parameters = _parameters(model)

    resumed_model, resumed_optimizer, resumed_scheduler = _trainer()
    torch.manual_seed(123)  # generators elsewhere: the checkpoint must restore them
    meta = load_checkpoint(path, resumed_model, resumed_optimizer, resumed_scheduler)
    assert (meta.step, meta.extra) == (3, {"cursor": 24})
    got = [_train_step(resumed_model, resumed_optimizer, resumed_scheduler) for _ in range(2)]
    assert got == expected
    resumed = _parameters(resumed_model)
    for name, value in expected_parameters.items():
        assert torch.equal(resumed[name], value), name
    tied = resumed_model.get_output_embeddings().weight
    assert tied.data_ptr() == resumed_model.get_input_embeddings().weight.data_ptr()


def test_keep_last_and_replace(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trainer()
    for step in (1, 2, 3, 10):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000010"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000010"

    save_checkpoint(tmp_path, 10, model, optimizer, scheduler, keep_last=2, extra={"v": 2})
    meta = load_checkpoint(tmp_path / "step_00000010", model, optimizer, scheduler)
    assert meta.extra == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000010"]
    assert latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 11, model, optimizer, scheduler, keep_last=0)


def test_only_the_newest_runs_keep_their_checkpoints(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trainer()
    for age, run in enumerate(["old", "middle", "new", "current"]):
        folder = tmp_path / run / "checkpoints"
        for step in (1, 2):
            path = save_checkpoint(folder, step, model, optimizer, scheduler, keep_last=2)
            os.utime(path, (1_000_000 + age * 10 + step,) * 2)  # the newest checkpoint's time
        (tmp_path / run / "metrics.jsonl").write_text("{}\n")
    os.utime(tmp_path / "current/checkpoints/step_00000002", (0, 0))  # the oldest, kept anyway
    (tmp_path / "no-checkpoints").mkdir()

    deleted = prune_other_runs(tmp_path, current="current", keep_runs=3)
    assert deleted == [tmp_path / "old" / "checkpoints"]
    kept = {run.name for run in tmp_path.iterdir() if latest_checkpoint(run / "checkpoints")}
    assert kept == {"middle", "new", "current"}
    assert (tmp_path / "old" / "metrics.jsonl").exists()  # only checkpoints go
    assert prune_other_runs(tmp_path, current="current", keep_runs=1) == [
        tmp_path / "new" / "checkpoints",
        tmp_path / "middle" / "checkpoints",
    ]
    assert [run.name for run in tmp_path.iterdir() if latest_checkpoint(run / "checkpoints")] == [
        "current"
    ]
    assert prune_other_runs(tmp_path / "missing", current="x", keep_runs=1) == []
    with pytest.raises(ValueError, match="keep_runs"):
        prune_other_runs(tmp_path, current="current", keep_runs=0)


def test_crash_mid_save_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer, scheduler = _trainer()
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, keep_last=3)

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.torch, "save", crash)
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(tmp_path, 2, model, optimizer, scheduler, keep_last=3)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())

    save_checkpoint(tmp_path, 2, model, optimizer, scheduler, keep_last=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_checkpoint(tmp_path, model, optimizer, scheduler)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_checkpoint_is_a_model_folder_for_transformers_and_vllm(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(2)
    with torch.no_grad():  # trained weights differ from the folder's: the check can fail
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    path = save_checkpoint(
        tmp_path, 7, model, *make_optimizer(model, load_config().actor_rollout_ref.actor.optim),
        keep_last=1, tokenizer=tokenizer,
    )  # fmt: skip
    prompt = torch.tensor([[1, 100, 200, 300, 400, 500]])
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, 6:].tolist()
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert torch.equal(loaded(prompt).logits, model(prompt).logits)
    assert AutoTokenizer.from_pretrained(path).encode("7 + 5") == tokenizer.encode("7 + 5")

    engine = build_engine(tiny_config(path))
    try:
        outputs = [
            output
            async for output in engine.generate(
                {"prompt_token_ids": prompt[0].tolist()},
                SamplingParams(temperature=0.0, max_tokens=8),
                request_id="checkpoint",
            )
        ]
        assert list(outputs[-1].outputs[0].token_ids) == expected
    finally:
        engine.shutdown()
