"""The data-parallel learner under Ray Train gives the local learner's update, and the
trainer service runs on it (``trainer.backend=ray``).

A tiny random Llama, 2 groups x 4 samples of varied lengths and rewards, every adaptive
HAPO switch on, SGD (update = -lr x gradient, so the comparison measures gradients and
not Adam's sign-like first step). Two mini-batches of one group each, micro-batches of one
sample, two training steps: 2 Ray workers (gloo) vs one local ``learner_step``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from hapo.algorithm import compute_norm_entropys, entropy_h_hat, log_entropy
from hapo.config import HapoConfig, load_config
from hapo.training.collectives import check_shardable, shard_rows
from hapo.training.learner import (
    StepTargets,
    accumulate_gradients,
    compute_advantages,
    learner_step,
)
from hapo.training.policy import TrainingBatch, build_batch, old_log_probs_and_entropy
from services.trainer.ray_learner import RayLearner
from tests.helpers import scored_trajectories, tiny_llama, wait_for
from tests.services.trainer.conftest import ScoredFeeder, TrainerServer

VOCAB, PAD, LR = 128, 0, 0.1
# (prompt length, response length, reward) of two groups of four samples.
SAMPLES = [
    [(4, 6, 1.0), (4, 10, 0.0), (4, 3, 1.0), (4, 9, 0.0)],
    [(6, 5, 0.0), (6, 12, 1.0), (6, 7, 1.0), (6, 2, 0.0)],
]
# The two runs' parameters agree to fp32 rounding of reordered sums, compounded over four
# SGD updates: per tensor, |ray - local| <= RTOL x |local| + UPDATE_RTOL x (the tensor's
# largest update). Measured: at most 6e-5 of the largest update on the matrices; norm
# weights (values ~1) differ by 1-2 ulp of 1.0 (1.2e-7), which RTOL covers.
RTOL, UPDATE_RTOL = 1e-5, 1e-4


def _model() -> LlamaForCausalLM:
    return tiny_llama(VOCAB, PAD)


def _batch() -> TrainingBatch:
    """Behaviour log-probs of a uniform sampler: the correction weights pi_prox / mu of the
    random model are near 1 and differ token by token."""
    batch = build_batch(scored_trajectories(SAMPLES, VOCAB, seed=3), PAD)
    uniform = torch.full_like(batch.rollout_log_prob, -math.log(VOCAB))
    return replace(batch, rollout_log_prob=uniform * batch.response_mask)


def _config() -> HapoConfig:
    return load_config(
        overrides=[
            "actor_rollout_ref.rollout.n=4",
            "data.train_batch_size=2",
            "actor_rollout_ref.actor.ppo_mini_batch_size=1",  # 2 mini-batches of one group
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
            "actor_rollout_ref.actor.adaptive_clip=true",
            "actor_rollout_ref.actor.adaptive_advantage=true",
            "actor_rollout_ref.actor.grad_clip=1e9",
            "algorithm.adv_estimator=hapo",
            # One response row (R = 12) per logits chunk: a shard's chunks then hold the same
            # rows as the whole batch's, so the old log-probs agree bit for bit (with 7, rows
            # land in chunks of other sizes and differ by fp32 rounding).
            "trainer.logits_chunk_size=12",
            "trainer.precision=fp32",
        ],
        environ={},
    )


def _local_steps(model, batch, config, steps):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return [learner_step(model, optimizer, scheduler, batch, config) for _ in range(steps)]


def _gradient(model, batch, config, normalise_globally: bool) -> dict[str, torch.Tensor]:
    """What two data-parallel ranks produce on the first mini-batch, in one process: each
    shard's gradient with the loss over the mini-batch's (global) token count, summed; or
    over the shard's own count, averaged (DDP on a per-rank token-mean: the wrong maths)."""
    old_log_prob, entropy = old_log_probs_and_entropy(model, batch, batch.size)
    norm = compute_norm_entropys(entropy, batch.response_mask)
    targets = StepTargets(
        old_log_prob=old_log_prob
        - 0.3 * (torch.arange(old_log_prob.numel()) % 3 == 0).view_as(old_log_prob),
        advantages=compute_advantages(batch, config.algorithm),
        norm_entropys=norm,
        old_h_hat=entropy_h_hat(log_entropy(entropy), norm),
        rollout_is_weights=torch.ones_like(old_log_prob),
        loss_mask=batch.response_mask,
        metrics={},
    )
    mini = slice(0, 4)
    total: dict[str, torch.Tensor] = {}
    for rank in range(2):
        rows = shard_rows(0, 4, rank, 2)
        model.zero_grad(set_to_none=True)
        tokens = batch.response_mask[mini].sum() if normalise_globally else None
        accumulate_gradients(
            model, batch.select(rows), targets.select(rows), config, global_num_tokens=tokens
        )
        for name, p in model.named_parameters():
            share = p.grad if normalise_globally else p.grad / 2
            total[name] = total.get(name, 0) + share
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, batch.select(mini), targets.select(mini), config)
    whole = {name: p.grad.clone() for name, p in model.named_parameters()}
    return {name: total[name] - whole[name] for name in whole}


def test_sharded_gradients_need_the_global_token_count() -> None:
    """The maths the Ray workers do, without Ray: shards normalised by the mini-batch's
    token count sum to its gradient; per-shard token-means (averaged) do not."""
    model, batch, config = _model(), _batch(), _config()
    right = _gradient(model, batch, config, normalise_globally=True)
    wrong = _gradient(model, batch, config, normalise_globally=False)
    assert max(d.abs().max().item() for d in right.values()) < 1e-6
    assert max(d.abs().max().item() for d in wrong.values()) > 1e-3


def test_uneven_shards_are_refused() -> None:
    with pytest.raises(ValueError, match="split evenly"):
        check_shardable(8, _config(), 3)


def _processes_of(session_dir: str) -> list[str]:
    """PIDs of this user's processes whose command line names the Ray session directory."""
    found = subprocess.run(
        ["pgrep", "-u", str(os.getuid()), "-f", session_dir], capture_output=True, text=True
    )
    return found.stdout.split()


@pytest.fixture
def ray_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A 2-CPU local Ray, shut down after, with none of its processes left behind."""
    import ray

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    session_dir = context.address_info["session_dir"]
    assert _processes_of(session_dir)  # the raylet and GCS name it: the check below can fail
    try:
        yield
    finally:
        ray.shutdown()
    deadline = time.monotonic() + 20
    while _processes_of(session_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_of(session_dir), "Ray processes left behind"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ray_workers_give_the_local_update(ray_cluster: None) -> None:
    batch, config, steps = _batch(), _config(), 2
    check_shardable(batch.size, config, 2)
    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    learner = RayLearner(
        model, optimizer, scheduler, config,
        optimizer_factory=functools.partial(torch.optim.SGD, lr=LR),
    )  # fmt: skip
    try:  # one fit() serves every step
        results = [learner.step(batch) for _ in range(steps)]
        learner.pull_state()
    finally:
        learner.close()
    local_model = _model()
    local = _local_steps(local_model, batch, config, steps)

    distributed, ratios = {n: p.detach() for n, p in model.named_parameters()}, {}
    for name, p in local_model.named_parameters():
        update = (p.detach() - before[name]).abs().max().item()
        ratios[name] = (distributed[name] - p.detach()).abs().max().item() / update
        torch.testing.assert_close(
            distributed[name], p.detach(), rtol=RTOL, atol=UPDATE_RTOL * update,
            msg=lambda m, n=name: f"{n}: {m}",
        )  # fmt: skip
    matrices = max(r for n, r in ratios.items() if "norm" not in n)
    print(f"|ray - local| / largest update: {matrices:.3g} (matrices), {max(ratios.values()):.3g}")
    moved = max((distributed[n] - before[n]).abs().max().item() for n in before)
    assert moved > 1e-2  # SGD moved the weights by far more than the tolerance

    assert len(results) == steps
    # Entropies agree to fp32 rounding (a shard runs its own prompts' forward, with other
    # shapes than the whole batch's; step 2 also starts from weights that differ by the
    # tolerance above), and a random model's log-entropies are all within ~1e-3 of
    # log(128) (std 7e-4), so h_hat = (log H - pivot) / std magnifies that ~1000-fold.
    for step in (0, 1):
        ray_result, local_result = results[step], local[step]
        # The scales are extremes of h_hat: the same magnification (measured 2.5e-4 rel).
        assert ray_result.norm_entropys == pytest.approx(local_result.norm_entropys, rel=1e-3)
        torch.testing.assert_close(ray_result.h_hat, local_result.h_hat, atol=1e-3, rtol=0)
        # Step 2 starts from weights that differ by the tolerance above, and its behaviour
        # weights exp(pi_prox - mu) carry the log-prob differences into every token's loss
        # (measured: 1.3e-4 rel on step 2's policy loss, ~1e-6 on step 1's).
        rel = 1e-4 if step == 0 else 3e-4
        for name in (
            "loss/policy_loss", "loss/grad_norm", "loss/clipfrac", "reward/mean",
            "rollout_corr/weight_mean", "rollout_corr/kl",
        ):  # fmt: skip
            value, expected = ray_result.metrics[name], local_result.metrics[name]
            assert value == pytest.approx(expected, rel=rel, abs=1e-5), (step, name)
    assert results[0].metrics["loss/approx_kl"] > 0  # mini-batch 2 saw moved weights
    assert scheduler.last_epoch == steps  # pulled from the workers: the driver never stepped


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_trainer_service_trains_on_ray_workers(
    trainer_api: TrainerServer, feeder: ScoredFeeder, tmp_path: Path, tiny_model_dir: Path
) -> None:
    overrides = ["trainer.run_id=ray", "trainer.total_steps=2", "trainer.backend=ray"]
    status, body = trainer_api.request("POST", "/v1/runs", {"overrides": overrides})
    assert status == 201, body

    def run() -> dict:
        return trainer_api.request("GET", "/v1/runs/ray")[1]

    wait_for(lambda: run()["state"] in ("finished", "failed", "stopped"), 240, "the Ray run")
    assert run()["state"] == "finished", run()["error"]
    lines = (tmp_path / "runs" / "ray" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines]
    assert [line["step"] for line in steps] == [1, 2]
    assert all(line["perf/data_parallel_ranks"] == 2 for line in steps)
    trained = load_file(
        tmp_path / "runs" / "ray" / "checkpoints" / "step_00000002" / "model.safetensors"
    )
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(trained[name], initial[name]) for name in initial)
