"""The learner on a tiny random Llama: the training step against a plain PPO/GRPO
reference, micro-batch invariance, the h_hat switch, the optimizer and its warm-up, bf16,
and the behaviour correction (the policy forward's own tests: ``test_policy``)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch
from transformers import LlamaForCausalLM

from hapo.algorithm import (
    compute_norm_entropys,
    entropy_h_hat,
    hapo_policy_loss,
    log_entropy,
)
from hapo.config import HapoConfig, load_config
from hapo.training.learner import (
    StepTargets,
    accumulate_gradients,
    compute_advantages,
    learner_step,
    make_optimizer,
)
from hapo.training.policy import (
    TrainingBatch,
    build_batch,
    old_log_probs_and_entropy,
    policy_log_probs,
    sampling_log_probs,
)
from tests.hapo.training.common import (
    PAD,
    VOCAB,
    assert_gradients_close,
    gradients,
    two_groups,
)
from tests.helpers import tiny_llama


def _config(*overrides: str) -> HapoConfig:
    defaults = [
        "actor_rollout_ref.rollout.n=4",
        "data.train_batch_size=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.optim.lr_warmup_steps=0",
        "trainer.precision=fp32",  # exact comparisons; bf16 has its own test
    ]
    return load_config(overrides=[*defaults, *overrides], environ={})


def _targets(model: LlamaForCausalLM, batch: TrainingBatch, config: HapoConfig, noise: float):
    """Start-of-step targets, with ``old_log_prob`` moved by noise so ratios leave the
    clip range and every branch of the loss is taken."""
    old_log_prob, entropy = old_log_probs_and_entropy(model, batch, batch.size)
    norm = compute_norm_entropys(entropy, batch.response_mask)
    generator = torch.Generator().manual_seed(1)
    shifted = old_log_prob + noise * torch.randn(old_log_prob.shape, generator=generator)
    return StepTargets(
        old_log_prob=shifted,
        advantages=compute_advantages(batch, config.algorithm),
        norm_entropys=norm,
        old_h_hat=entropy_h_hat(log_entropy(entropy), norm),
        rollout_is_weights=torch.ones_like(old_log_prob),
        loss_mask=batch.response_mask,
        metrics={},
    )


def _accumulated(model, batch, targets, config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, batch, targets, config)
    return loss, gradients(model)


def _reference_grpo(batch: TrainingBatch) -> torch.Tensor:
    """verl's GRPO advantage with a loop over groups: unbiased std, eps 1e-6."""
    scores = batch.token_level_rewards.sum(-1).double()
    advantage = torch.zeros_like(scores)
    for label in set(batch.group_index):
        rows = torch.from_numpy(batch.group_index == label)
        group = scores[rows]
        advantage[rows] = (group - group.mean()) / (group.std() + 1e-6)
    return (advantage[:, None] * batch.response_mask).float()


def _reference_ppo_loss(
    model: LlamaForCausalLM,
    batch: TrainingBatch,
    old_log_prob: torch.Tensor,
    adv: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dual-clip PPO (0.2/0.2, c=10), each token's loss times ``token_weights``, token-mean
    over ``mask`` (default: the response mask), on full unchunked logits."""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).logits[:, batch.prompt_length - 1 : -1]
    log_prob = logits.log_softmax(-1).gather(-1, batch.responses[..., None]).squeeze(-1)
    ratio = (log_prob - old_log_prob).exp()
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    losses = torch.where(adv < 0, torch.minimum(clipped, -adv * 10.0), clipped)
    if token_weights is not None:
        losses = losses * token_weights
    mask = batch.response_mask if mask is None else mask
    return (losses * mask).sum() / mask.sum()


def test_every_switch_off_equals_plain_ppo_grpo(
    model: LlamaForCausalLM, batch: TrainingBatch
) -> None:
    config = _config(
        "algorithm.adv_estimator=grpo",
        "actor_rollout_ref.actor.adaptive_clip=false",
        "actor_rollout_ref.actor.adaptive_advantage=false",
        "algorithm.rollout_correction.mode=off",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "trainer.logits_chunk_size=7",
    )
    targets = _targets(model, batch, config, noise=0.3)
    # Ratios of ~20 on every fifth token reach the dual-clip bound where the advantage is < 0.
    every_fifth = torch.arange(targets.old_log_prob.numel()).view_as(targets.old_log_prob) % 5 == 0
    targets = replace(targets, old_log_prob=targets.old_log_prob - 3.0 * every_fifth)
    advantages = _reference_grpo(batch)
    torch.testing.assert_close(targets.advantages, advantages)

    loss, grads = _accumulated(model, batch, targets, config)
    with torch.no_grad():
        ratio = (policy_log_probs(model, batch)[0] - targets.old_log_prob).exp()
    outside = ((ratio < 0.8) | (ratio > 1.2)) & (batch.response_mask > 0)
    assert outside.any() and (outside & (advantages < 0) & (ratio > 10)).any()  # dual clip
    model.zero_grad(set_to_none=True)
    expected = _reference_ppo_loss(model, batch, targets.old_log_prob, advantages)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), atol=1e-6, rtol=1e-5)
    assert_gradients_close(grads, gradients(model))


def test_every_switch_off_step_update_equals_plain_ppo_grpo(
    model: LlamaForCausalLM, batch: TrainingBatch
) -> None:
    """A whole ``learner_step`` with SGD at lr 1 moves each weight by minus the reference
    gradient (old log-probs recomputed by the step, so every ratio starts at 1)."""
    config = _config(
        "algorithm.adv_estimator=grpo",
        "actor_rollout_ref.actor.adaptive_clip=false",
        "actor_rollout_ref.actor.adaptive_advantage=false",
        "algorithm.rollout_correction.mode=off",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.grad_clip=1e9",
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        old_log_prob = policy_log_probs(model, batch)[0]
    _reference_ppo_loss(model, batch, old_log_prob, _reference_grpo(batch)).backward()
    expected = {name: -g for name, g in gradients(model).items()}
    model.zero_grad(set_to_none=True)

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    result = learner_step(model, optimizer, scheduler, batch, config)
    moved = {name: p.detach() - before[name] for name, p in model.named_parameters()}
    assert_gradients_close(moved, expected)
    assert result.metrics["loss/clipfrac"] == 0.0 and result.metrics["loss/approx_kl"] < 1e-6


@pytest.mark.parametrize("estimator", ["hapo", "grpo"])
def test_micro_batch_invariance(
    model: LlamaForCausalLM, batch: TrainingBatch, estimator: str
) -> None:
    configs = [
        _config(f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
                f"algorithm.adv_estimator={estimator}")
        for micro in (8, 2)
    ]  # fmt: skip
    targets = _targets(model, batch, configs[0], noise=0.3)
    loss_whole, whole = _accumulated(model, batch, targets, configs[0])
    loss_split, split = _accumulated(model, batch, targets, configs[1])
    torch.testing.assert_close(loss_whole, loss_split, atol=1e-6, rtol=1e-6)
    assert max(g.abs().max().item() for g in whole.values()) > 1e-3
    assert_gradients_close(whole, split, atol=1e-5)


@pytest.mark.parametrize("epochs", [1, 2])
def test_first_forward_as_pi_prox_pass_gives_the_same_step(
    model: LlamaForCausalLM, batch: TrainingBatch, epochs: int
) -> None:
    """``trainer.reuse_first_forward``: the first mini-batch's training forward stands in
    for its no-grad ``pi_prox`` pass. Two mini-batches of two micro-batches: the step runs
    two micro-batch forwards fewer and moves the weights as the separate pass does."""
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    calls = 0

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    model.get_decoder().register_forward_hook(count)
    moved, metrics, decoder_calls = {}, {}, {}
    for reuse in (False, True):
        model.load_state_dict(start)
        config = _config(
            "actor_rollout_ref.actor.ppo_mini_batch_size=1",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            f"actor_rollout_ref.actor.ppo_epochs={epochs}",
            "actor_rollout_ref.actor.optim.lr=1e-3",
            f"trainer.reuse_first_forward={str(reuse).lower()}",
        )
        optimizer, scheduler = make_optimizer(model, config.actor_rollout_ref.actor.optim)
        calls = 0
        metrics[reuse] = learner_step(model, optimizer, scheduler, batch, config).metrics
        decoder_calls[reuse] = calls
        moved[reuse] = {name: p.detach() - start[name] for name, p in model.named_parameters()}
    # Each micro-batch forward is two decoder calls (prompts, then responses on their cache).
    micro_forwards = {reuse: n // 2 for reuse, n in decoder_calls.items()}
    assert micro_forwards == {False: 4 + 4 * epochs, True: 2 + 4 * epochs}
    assert max(d.abs().max().item() for d in moved[False].values()) > 1e-4
    assert_gradients_close(moved[False], moved[True], atol=1e-6)
    for name in ("loss/policy_loss", "loss/approx_kl", "loss/clipfrac", "entropy/pivot"):
        assert metrics[True][name] == pytest.approx(metrics[False][name], rel=1e-4, abs=1e-7)


def test_reference_micro_batch_h_hat_switch(model: LlamaForCausalLM, batch: TrainingBatch) -> None:
    def gradients(micro: int, switch: bool) -> dict[str, torch.Tensor]:
        config = _config(
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
            f"algorithm.reference_micro_batch_h_hat={str(switch).lower()}",
        )
        return _accumulated(model, batch, _targets(model, batch, config, 0.3), config)[1]

    # Micro-batches of 2 have their own entropy statistics: the update changes.
    ours, reference = gradients(2, False), gradients(2, True)
    assert max((ours[n] - reference[n]).abs().max().item() for n in ours) > 1e-4
    # One micro-batch holding the whole step's batch has the step's statistics.
    assert_gradients_close(gradients(8, False), gradients(8, True))


def _surrogate_loss(model, batch, targets: StepTargets, config: HapoConfig) -> float:
    """The HAPO loss of the fixed batch against the first step's old log-probs."""
    actor = config.actor_rollout_ref.actor
    with torch.no_grad():
        log_prob = policy_log_probs(model, batch)[0]
    loss, _ = hapo_policy_loss(
        log_prob, targets.old_log_prob, targets.advantages, batch.response_mask,
        targets.old_h_hat, clip_alpha=actor.clip_alpha, adv_beta=actor.adv_beta,
    )  # fmt: skip
    return loss.item()


def test_steps_lower_the_loss_on_a_fixed_batch(
    model: LlamaForCausalLM, batch: TrainingBatch
) -> None:
    config = _config(
        "actor_rollout_ref.actor.optim.lr=1e-4", "actor_rollout_ref.actor.ppo_epochs=2"
    )
    targets = _targets(model, batch, config, noise=0.0)
    optimizer, scheduler = make_optimizer(model, config.actor_rollout_ref.actor.optim)
    losses = [_surrogate_loss(model, batch, targets, config)]
    for _ in range(4):
        _, entropy = old_log_probs_and_entropy(model, batch, 8)
        result = learner_step(model, optimizer, scheduler, batch, config)
        losses.append(_surrogate_loss(model, batch, targets, config))
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    assert losses[-1] < losses[0] - 0.05

    metrics = result.metrics
    assert {name.split("/")[0] for name in metrics} == {
        "loss", "reward", "entropy", "perf", "rollout_corr", "staleness"
    }  # fmt: skip
    assert all(math.isfinite(value) for value in metrics.values())
    for name in (
        "loss/approx_kl", "loss/clipfrac_high_entropy", "loss/clipfrac_low_entropy",
        "loss/grad_norm", "perf/tokens_per_s", "reward/advantage_std",
        "reward/response_length_mean", "entropy/pivot", "entropy/mean",
    ):  # fmt: skip
        assert name in metrics, name
    assert metrics["reward/mean"] == pytest.approx(3 / 8)
    assert metrics["reward/response_length_mean"] == pytest.approx(50 / 8)
    assert metrics["loss/lr"] == pytest.approx(1e-4)
    assert metrics["loss/approx_kl"] > 0  # the second epoch sees moved weights
    # CPU seconds over the step's thread-seconds: some work was done, and no more than the
    # threads could do (a little over 1 if the process's other threads ran meanwhile).
    assert 0.05 < metrics["perf/cpu_share"] < 1.5
    # The returned statistics are those of the step's batch under the weights it started with.
    expected = compute_norm_entropys(entropy, batch.response_mask)
    assert result.norm_entropys == pytest.approx(expected, rel=1e-5)
    assert metrics["entropy/pivot"] == pytest.approx(expected.pivot, rel=1e-5)


def test_warmup_is_linear_from_the_first_step(model: LlamaForCausalLM) -> None:
    optim = _config(
        "actor_rollout_ref.actor.optim.lr=1e-3", "actor_rollout_ref.actor.optim.lr_warmup_steps=4"
    ).actor_rollout_ref.actor.optim
    optimizer, scheduler = make_optimizer(model, optim)
    seen = []
    for _ in range(6):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_optimizer_is_fused_adamw_as_written() -> None:
    """Three steps of ``make_optimizer``'s (fused) AdamW against AdamW written out:
    decoupled weight decay, bias-corrected moments, the default betas and epsilon."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(5, 3, generator=generator))
    optim = _config(
        "actor_rollout_ref.actor.optim.lr=1e-2", "actor_rollout_ref.actor.optim.lr_warmup_steps=0"
    ).actor_rollout_ref.actor.optim
    optimizer, _ = make_optimizer(torch.nn.ParameterList([weight]), optim)
    assert optimizer.defaults["fused"] is True

    expected = weight.detach().clone()
    first, second = torch.zeros_like(expected), torch.zeros_like(expected)
    beta1, beta2, eps, lr, decay = 0.9, 0.999, 1e-8, 1e-2, optim.weight_decay
    for step in range(1, 4):
        grad = torch.randn(5, 3, generator=generator)
        weight.grad = grad.clone()
        optimizer.step()
        expected -= lr * decay * expected
        first = beta1 * first + (1 - beta1) * grad
        second = beta2 * second + (1 - beta2) * grad**2
        corrected = first / (1 - beta1**step), second / (1 - beta2**step)
        expected -= lr * corrected[0] / (corrected[1].sqrt() + eps)
        torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-6)


def test_bf16_precision_computes_in_bf16_and_keeps_fp32_state(
    model: LlamaForCausalLM, batch: TrainingBatch
) -> None:
    """``trainer.precision=bf16`` (autocast; on CPU here, on GPU by default): log-probs
    stay within bf16 rounding of fp32's but are not fp32's, and the step still learns
    with fp32 weights and optimizer states."""
    fp32, _ = policy_log_probs(model, batch)
    bf16, _ = policy_log_probs(model, batch, dtype=torch.bfloat16)
    mask = batch.response_mask.bool()
    difference = (bf16 - fp32).abs().masked_select(mask)
    assert bf16.dtype == torch.float32
    assert 0 < difference.max() < 0.1  # bf16 has 8 mantissa bits: ~1e-2 on log-probs ~5

    config = _config(
        "actor_rollout_ref.actor.optim.lr=1e-4", "actor_rollout_ref.actor.ppo_epochs=2",
        "trainer.precision=bf16",
    )  # fmt: skip
    targets = _targets(model, batch, config, noise=0.0)
    optimizer, scheduler = make_optimizer(model, config.actor_rollout_ref.actor.optim)
    before = _surrogate_loss(model, batch, targets, config)
    for _ in range(3):
        learner_step(model, optimizer, scheduler, batch, config)
    assert _surrogate_loss(model, batch, targets, config) < before - 0.03
    assert all(p.dtype == torch.float32 for p in model.parameters())
    states = optimizer.state_dict()["state"].values()
    assert all(s["exp_avg"].dtype == torch.float32 for s in states)


def _sgd_update(model: LlamaForCausalLM, batch: TrainingBatch, config: HapoConfig):
    """``learner_step`` with SGD at lr 1: the update is minus the step's gradient."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    result = learner_step(model, optimizer, scheduler, batch, config)
    moved = {name: p.detach() - before[name] for name, p in model.named_parameters()}
    return moved, result


PLAIN_PPO = (
    "algorithm.adv_estimator=grpo",
    "actor_rollout_ref.actor.adaptive_clip=false",
    "actor_rollout_ref.actor.adaptive_advantage=false",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.actor.grad_clip=1e9",
)


def test_behaviour_correction_weights_each_token_by_truncated_pi_prox_over_mu(
    model: LlamaForCausalLM, batch: TrainingBatch
) -> None:
    """Decoupled PPO (token_tis, cap 2): the step's update is minus the gradient of the PPO
    loss with each token's loss times ``min(pi_prox / mu, 2)``, written out here."""
    config = _config(*PLAIN_PPO, "algorithm.rollout_correction.mode=token_tis")
    with torch.no_grad():
        pi_prox = policy_log_probs(model, batch)[0]
    # Behaviour log-probs around pi_prox: every third token 1.5 nats less likely under mu
    # (w = e^1.5 = 4.5, truncated to 2), every fourth 0.5 more likely (w = e^-0.5 = 0.61).
    index = torch.arange(pi_prox.numel()).view_as(pi_prox)
    mu = pi_prox - 1.5 * (index % 3 == 0) + 0.5 * ((index % 4 == 0) & (index % 3 != 0))
    batch = replace(batch, rollout_log_prob=mu * batch.response_mask)
    weights = torch.where(index % 3 == 0, 2.0, torch.where(index % 4 == 0, math.exp(-0.5), 1.0))
    _reference_ppo_loss(model, batch, pi_prox, _reference_grpo(batch), weights).backward()
    expected = {name: -g for name, g in gradients(model).items()}
    model.zero_grad(set_to_none=True)

    moved, result = _sgd_update(model, batch, config)
    assert_gradients_close(moved, expected)
    valid = batch.response_mask.bool()
    assert result.metrics["rollout_corr/truncated_frac"] == pytest.approx(
        (index % 3 == 0)[valid].float().mean().item()
    )
    assert result.metrics["rollout_corr/weight_max"] == pytest.approx(2.0)
    assert result.metrics["rollout_corr/kl"] > 0


def test_on_policy_samples_get_weight_one(model: LlamaForCausalLM, batch: TrainingBatch) -> None:
    """With mu == pi_prox (fresh samples, no temperature) the correction changes nothing."""
    with torch.no_grad():
        pi_prox = policy_log_probs(model, batch)[0]
    batch = replace(batch, rollout_log_prob=pi_prox)
    updates = []
    for mode in ("off", "token_tis"):
        moved, result = _sgd_update(
            tiny_llama(VOCAB, PAD), batch, _config(f"algorithm.rollout_correction.mode={mode}")
        )
        updates.append(moved)
    assert_gradients_close(*updates, atol=1e-7)
    assert result.metrics["rollout_corr/weight_mean"] == pytest.approx(1.0, abs=1e-6)
    assert result.metrics["rollout_corr/kl"] == pytest.approx(0.0, abs=1e-6)


def test_samples_staler_than_the_bound_leave_the_loss_but_not_the_advantage(
    model: LlamaForCausalLM,
) -> None:
    """max_staleness 1: a sample 2 versions old is dropped from the loss (the token-mean
    runs over the others) and counted; its reward still shapes its group's advantage."""
    trajectories = [t.model_copy(update={"policy_version": 3}) for t in two_groups()]
    trajectories[1] = trajectories[1].model_copy(update={"policy_version": 1})
    batch = build_batch(trajectories, PAD, policy_version=3)
    assert batch.staleness.tolist() == [0, 2, 0, 0, 0, 0, 0, 0]
    config = _config(*PLAIN_PPO, "algorithm.rollout_correction.mode=off", "trainer.max_staleness=1")
    with torch.no_grad():
        pi_prox = policy_log_probs(model, batch)[0]
    fresh = batch.response_mask.clone()
    fresh[1] = 0
    _reference_ppo_loss(model, batch, pi_prox, _reference_grpo(batch), mask=fresh).backward()
    expected = {name: -g for name, g in gradients(model).items()}
    model.zero_grad(set_to_none=True)

    moved, result = _sgd_update(model, batch, config)
    assert_gradients_close(moved, expected)
    assert result.metrics["staleness/dropped_samples"] == 1.0
    assert result.metrics["staleness/samples_0"] == 7.0
    assert result.metrics["staleness/max"] == 2.0


def test_correction_at_the_sampling_temperature_sees_only_the_policy_change(
    model: LlamaForCausalLM, batch: TrainingBatch
) -> None:
    """Samples drawn by these very weights at an adaptive temperature (tau 0.5): with
    ``pi_prox`` recomputed at each token's ``T_dyn`` every weight is 1 (no correction
    needed); at the base temperature the correction sees the temperature as a mismatch."""
    rows = batch.size
    _, entropy = old_log_probs_and_entropy(model, batch, rows)
    stats = compute_norm_entropys(entropy, batch.response_mask)  # as the step before did
    batch = replace(
        batch,
        sampling_tau=torch.full((rows,), 0.5),
        sampling_norm_entropys=torch.tensor(stats).expand(rows, 4),
    )
    batch = replace(batch, rollout_log_prob=sampling_log_probs(model, batch))
    kl = {}
    for recompute in (True, False):
        config = _config(
            f"algorithm.rollout_correction.recompute_at_sampling_temperature={recompute}"
        )
        _, result = _sgd_update(tiny_llama(VOCAB, PAD), batch, config)
        kl[recompute] = result.metrics["rollout_corr/kl"]
        if recompute:
            assert result.metrics["rollout_corr/weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert kl[True] < 1e-9 < 1e-4 < kl[False]
    # The sampled temperatures spread around T = 1 by up to tau.
    assert 0.5 <= result.metrics["entropy/t_dyn_min"] < 1 < result.metrics["entropy/t_dyn_max"]
    assert result.metrics["entropy/adaptive_samples_frac"] == 1.0


def test_plain_samples_report_their_base_temperature(
    model: LlamaForCausalLM, batch: TrainingBatch
) -> None:
    _, result = _sgd_update(model, batch, _config())
    assert result.metrics["entropy/t_dyn_min"] == result.metrics["entropy/t_dyn_max"] == 1.0
    assert result.metrics["entropy/adaptive_samples_frac"] == 0.0


def test_a_batch_of_only_too_stale_samples_changes_nothing(model: LlamaForCausalLM) -> None:
    trajectories = [t.model_copy(update={"policy_version": 0}) for t in two_groups()]
    batch = build_batch(trajectories, PAD, policy_version=5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = _config(*PLAIN_PPO, "algorithm.rollout_correction.mode=off", "trainer.max_staleness=1")
    _, result = _sgd_update(model, batch, config)
    assert result.metrics["staleness/dropped_samples"] == batch.size
    assert result.metrics["loss/skipped_updates"] == 0.0  # a zero loss, not NaN
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, msg=name)
