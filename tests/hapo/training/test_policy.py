"""The policy forward on a tiny random Llama: the batch layout, log-probs and entropies of
a padded batch against each sample alone, the shared-prompt forward against the full one,
and the compute dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hapo.algorithm import token_entropy as reference_entropy
from hapo.config import load_config
from hapo.runtime.cpus import cpu_bf16_is_faster, cpu_has_native_bf16
from hapo.training.policy import (
    TrainingBatch,
    build_batch,
    compute_dtype,
    packing_pays,
    policy_log_probs,
)
from tests.hapo.training.common import (
    PAD,
    SAMPLES,
    VOCAB,
    assert_gradients_close,
    gradients,
    two_groups,
)
from tests.helpers import scored_trajectories


def test_build_batch_layout(batch: TrainingBatch) -> None:
    assert batch.prompt_length == 7 and batch.responses.shape == (8, 12)
    assert batch.response_mask.dtype == torch.float32
    assert batch.response_mask.sum(-1).tolist() == [5, 9, 2, 12, 4, 11, 6, 1]
    first = two_groups()[0]
    assert batch.input_ids[0, 4:12].tolist() == [*first.prompt_ids, *first.response_ids]
    assert batch.attention_mask[0].tolist() == [0] * 4 + [1] * 8 + [0] * 7
    assert batch.position_ids[0, 4:12].tolist() == list(range(8))
    assert batch.token_level_rewards.sum(-1).tolist() == [1, 0, 1, 0, 0, 0, 1, 0]
    assert batch.token_level_rewards[0, 4] == 1.0  # on the last valid token
    assert list(batch.group_index) == ["g0"] * 4 + ["g1"] * 4
    empty = two_groups()[0].model_copy(update={"response_ids": np.zeros(0, np.int32)})
    with pytest.raises(ValueError, match="empty"):
        build_batch([empty], PAD)


ONE_TOKEN_EACH = [[(3, 1, 1.0), (3, 1, 0.0)], [(5, 1, 0.0), (5, 1, 1.0)]]
"""Responses of one token: nothing is fed past the prompts."""


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("groups", [SAMPLES, ONE_TOKEN_EACH], ids=["mixed", "one_token_each"])
def test_padded_batch_log_probs_equal_each_sample_alone(
    model: LlamaForCausalLM, groups: list[list[tuple[int, int, float]]], pack: bool
) -> None:
    trajectories = scored_trajectories(groups, VOCAB, seed=0)
    batch = build_batch(trajectories, PAD)
    log_prob, entropy = policy_log_probs(model, batch, chunk_size=5, with_entropy=True, pack=pack)
    for row, trajectory in enumerate(trajectories):
        ids = torch.tensor([*trajectory.prompt_ids, *trajectory.response_ids])[None].long()
        logits = model(input_ids=ids).logits[0, len(trajectory.prompt_ids) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, ids[0, -logits.shape[0] :, None])
        length = len(trajectory.response_ids)
        torch.testing.assert_close(log_prob[row, :length], expected.squeeze(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            entropy[row, :length], reference_entropy(logits), atol=1e-5, rtol=0
        )


def test_shared_prompt_forward_gives_the_full_forwardgradients(
    model: LlamaForCausalLM, batch: TrainingBatch
) -> None:
    """Each group's prompt runs once (2 prompt rows, not 8), the responses run packed in
    one row without padding (each sample's tokens but its last), and the log-probs and
    their gradients equal one plain ``[B, P + R]`` forward's."""
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: shapes.append(tuple(args[0].shape))
    )
    coefficients = torch.randn(batch.responses.shape, generator=torch.Generator().manual_seed(4))
    log_prob, _ = policy_log_probs(model, batch)
    hook.remove()
    prompt_width, lengths = batch.prompt_length, batch.response_mask.sum(-1)
    assert lengths.min() < lengths.max()  # padding the packed forward leaves out
    assert shapes == [(2, prompt_width), (1, int((lengths - 1).sum()))]
    (log_prob * coefficients * batch.response_mask).sum().backward()
    shared = gradients(model)

    model.zero_grad(set_to_none=True)
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).logits[:, prompt_width - 1 : -1]
    expected = logits.log_softmax(-1).gather(-1, batch.responses[..., None]).squeeze(-1)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(log_prob[mask], expected[mask].detach(), atol=1e-5, rtol=0)
    (expected * coefficients * batch.response_mask).sum().backward()
    assert_gradients_close(shared, gradients(model))


def test_packing_pays_on_short_responses_of_varied_lengths_not_on_long_ones() -> None:
    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                          num_key_value_heads=3)  # fmt: skip
    # A group of 8 on the arithmetic task: one sample runs to the 64-token limit, the
    # rest stop at 8-40 tokens (fed: each sample's tokens but its last).
    lengths = torch.tensor([64, 8, 12, 20, 30, 40, 9, 15])
    fed = torch.arange(63) < lengths[:, None] - 1
    assert packing_pays(smollm2, 1, 40, fed)
    # Equal lengths: nothing to save, and the dense mask costs more.
    assert not packing_pays(smollm2, 1, 40, torch.ones(8, 63, dtype=torch.bool))
    # Long responses of similar lengths: attention over all ~30,000 packed tokens at once
    # outweighs the little padding saved; with one long outlier, the padding still does.
    lengths = torch.tensor([4096, 4000, 3900, 4096, 3500, 4096, 3800, 4050])
    assert not packing_pays(smollm2, 1, 200, torch.arange(4095) < lengths[:, None] - 1)
    lengths = torch.tensor([4096, 500, 800, 1200, 300, 700, 400, 2000])
    assert packing_pays(smollm2, 1, 200, torch.arange(4095) < lengths[:, None] - 1)


def test_unsupported_output_head_is_refused(model: LlamaForCausalLM, batch: TrainingBatch) -> None:
    model.lm_head = torch.nn.Linear(64, VOCAB, bias=True)
    with pytest.raises(ValueError, match="unsupported output head"):
        policy_log_probs(model, batch)


def test_auto_precision_is_bf16_where_the_hardware_has_it(tmp_path) -> None:
    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert cpu_has_native_bf16(with_bf16) and not cpu_has_native_bf16(without)
    assert not cpu_has_native_bf16(tmp_path / "missing")
    auto = load_config(overrides=["trainer.precision=auto"], environ={})
    fp32 = load_config(overrides=["trainer.precision=fp32"], environ={})
    assert compute_dtype(auto, torch.device("cuda")) == torch.bfloat16
    expected = torch.bfloat16 if cpu_bf16_is_faster() else None
    assert compute_dtype(auto, torch.device("cpu")) == expected
    assert compute_dtype(fp32, torch.device("cuda")) is None
