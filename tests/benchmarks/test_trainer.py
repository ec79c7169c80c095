"""``hapo bench trainer``'s model-FLOPs count, checked against torch's own count of a real
learner step (``torch.utils.flop_counter``); its matmul peak: ``tests/hapo/runtime``."""

from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.trainer import _batch_trajectories, group_response_lens, learner_step_flops
from hapo.config import load_config
from hapo.training.learner import learner_step, make_optimizer
from hapo.training.policy import build_batch
from tests.helpers import tiny_llama


@pytest.mark.parametrize(
    ("epochs", "mini_batch_groups", "reuse", "varied"),
    [(1, 2, True, False), (2, 2, True, False), (1, 1, True, False), (2, 1, False, False),
     (1, 2, False, False), (1, 2, True, True)],
)  # fmt: skip
def test_step_flops_match_torchs_count_of_a_real_learner_step(
    epochs: int, mini_batch_groups: int, reuse: bool, varied: bool
) -> None:
    """Also with responses of varied lengths: packed, the learner multiplies by the weights
    for real tokens only, not for a group's padding."""
    groups, group_size, prompt_len = 2, 4, 24
    response_lens = group_response_lens(group_size, 16, varied)
    assert varied == (response_lens == [16, 12, 8, 4])
    model = tiny_llama(vocab=512, pad=None, num_hidden_layers=3)
    config = load_config(
        overrides=[
            f"actor_rollout_ref.rollout.n={group_size}", f"data.train_batch_size={groups}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={mini_batch_groups}",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
            f"actor_rollout_ref.actor.ppo_epochs={epochs}", "trainer.precision=fp32",
            f"trainer.reuse_first_forward={str(reuse).lower()}",
        ],
        environ={},
    )  # fmt: skip
    trajectories = _batch_trajectories(groups, prompt_len, response_lens, 512)
    batch = build_batch(trajectories, pad_token_id=0)
    optimizer, scheduler = make_optimizer(model, config.actor_rollout_ref.actor.optim)
    with FlopCounterMode(display=False) as counter:
        learner_step(model, optimizer, scheduler, batch, config)
    counted = counter.get_total_flops()
    expected = learner_step_flops(
        model.config, groups, prompt_len, response_lens, config, attention=False
    )
    # torch's count on CPU has the matrix products only (its CPU attention kernel is not
    # counted), and the backward is exactly two products per forward one.
    assert counted == pytest.approx(expected, rel=1e-9)
    with_attention = learner_step_flops(model.config, groups, prompt_len, response_lens, config)
    assert with_attention > expected
