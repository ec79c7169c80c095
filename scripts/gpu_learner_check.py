"""The learner on an accelerator: fp32 vs bf16 parity, tokens/s, HAPO-loss overhead and MFU
on a 0.5B-class model built from a config (random weights: nothing to download).

    python scripts/gpu_learner_check.py [--out DIR] [--device cuda] [--small]

For a lent GPU machine, which has torch and transformers but not this project's other
packages (pydantic travels as wheels: ``scripts/gpu_learner_check.sh``). ``--small`` runs
a 2-layer model on a short batch, the CPU check of the script itself (its test).

1. **Parity** on one batch and the same weights: the response log-probs and entropies of
   ``policy_log_probs`` under bf16 autocast against fp32 (max and mean absolute
   difference over valid tokens), and the gradient of one HAPO mini-batch (relative L2
   difference of the flattened gradients, cosine similarity).
2. **Speed**: ``learner_step`` with the HAPO loss and with the plain PPO loss (adaptive
   clip and advantage off), alternating, in bf16, after a warm-up step each: the fastest
   of ``--repeats``, tokens/s, the overhead HAPO / PPO - 1, and model-FLOPs utilisation
   against a bf16 matrix product's peak measured in the same run
   (``benchmarks.trainer``'s count and peak).

Prints each figure as it comes and writes ``OUT/gpu_learner_check.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from benchmarks.trainer import _batch_trajectories, learner_step_flops
from hapo.config import HapoConfig, load_config
from hapo.runtime.cpus import matmul_flops
from hapo.training.learner import accumulate_gradients, learner_step, make_optimizer, step_targets
from hapo.training.policy import build_batch, old_log_probs_and_entropy, policy_log_probs

QWEN2_0_5B = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, vocab_size=151_936, max_position_embeddings=32_768,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip
"""Qwen2.5-0.5B's architecture (494 M parameters)."""
SMALL = QWEN2_0_5B | dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, vocab_size=512)  # fmt: skip


def _config(precision: str, groups: int, n: int, micro: int, hapo_loss: bool) -> HapoConfig:
    switch = str(hapo_loss).lower()
    return load_config(
        overrides=[
            f"actor_rollout_ref.rollout.n={n}", f"data.train_batch_size={groups}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={groups // 2}",
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
            f"actor_rollout_ref.actor.adaptive_clip={switch}",
            f"actor_rollout_ref.actor.adaptive_advantage={switch}",
            f"trainer.precision={precision}",
        ],
        environ={},
    )  # fmt: skip


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parity(model, batch, groups: int, n: int, micro: int) -> dict[str, float]:
    """bf16 against fp32 on the same weights and batch: log-probs, entropies, gradient."""
    valid = batch.response_mask.bool()
    results, grads = {}, {}
    for precision in ("fp32", "bf16"):
        config = _config(precision, groups, n, micro, hapo_loss=True)
        dtype = torch.bfloat16 if precision == "bf16" else None
        with torch.no_grad():
            log_prob, entropy = policy_log_probs(model, batch, with_entropy=True, dtype=dtype)
        results[precision] = (log_prob[valid].double(), entropy[valid].double())
        # One mini-batch's gradient against the fp32 pass's targets (the same for both).
        if precision == "fp32":
            old, start_entropy = old_log_probs_and_entropy(model, batch, micro)
            targets = step_targets(batch, old, start_entropy, config)
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, batch, targets, config)
        grads[precision] = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    (lp32, h32), (lp16, h16) = results["fp32"], results["bf16"]
    g32, g16 = grads["fp32"], grads["bf16"]
    return {
        "log_prob_max_abs_diff": (lp16 - lp32).abs().max().item(),
        "log_prob_mean_abs_diff": (lp16 - lp32).abs().mean().item(),
        "entropy_max_abs_diff": (h16 - h32).abs().max().item(),
        "entropy_mean_abs_diff": (h16 - h32).abs().mean().item(),
        "grad_rel_l2_diff": ((g16 - g32).norm() / g32.norm()).item(),
        "grad_cosine": torch.nn.functional.cosine_similarity(g16, g32, dim=0).item(),
    }


def speed(model, batch, architecture, shape: dict[str, int], repeats: int) -> dict[str, Any]:
    """HAPO vs PPO ``learner_step`` in bf16, alternating; the fastest of each."""
    groups, n, micro = shape["groups"], shape["n"], shape["micro"]
    configs = {name: _config("bf16", groups, n, micro, hapo_loss=name == "hapo")
               for name in ("hapo", "ppo")}  # fmt: skip
    optimizer, scheduler = make_optimizer(model, configs["hapo"].actor_rollout_ref.actor.optim)
    device = next(model.parameters()).device
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for repeat in range(repeats + 1):
        for name, config in configs.items():
            _synchronize(device)
            started = time.perf_counter()
            learner_step(model, optimizer, scheduler, batch, config)
            _synchronize(device)
            elapsed = time.perf_counter() - started
            print(f"  {name} {'warm-up' if repeat == 0 else repeat}: {elapsed:.3f} s", flush=True)
            if repeat:
                seconds[name].append(elapsed)
    hapo_s, ppo_s = min(seconds["hapo"]), min(seconds["ppo"])
    peak = matmul_flops(torch.bfloat16, size=2048, repeats=16, device=device)
    flops = learner_step_flops(architecture, groups, shape["prompt"], [shape["response"]] * n,
                               configs["hapo"])  # fmt: skip
    tokens = batch.attention_mask.sum().item()
    return {
        "hapo_step_s": hapo_s, "ppo_step_s": ppo_s,
        "hapo_loss_overhead": hapo_s / ppo_s - 1, "tokens_per_s": tokens / hapo_s,
        "mfu": flops / hapo_s / peak, "matmul_peak_gflops": peak / 1e9,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                            if device.type == "cuda" else None),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="a 2-layer model, short batch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = (dict(groups=2, n=2, micro=2, prompt=8, response=8) if args.small
             else dict(groups=8, n=8, micro=8, prompt=256, response=512))  # fmt: skip
    architecture = Qwen2Config(**(SMALL if args.small else QWEN2_0_5B))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(architecture, dtype=torch.float32).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.1f} M parameters on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})",
          flush=True)  # fmt: skip
    trajectories = _batch_trajectories(shape["groups"], shape["prompt"],
                                       [shape["response"]] * shape["n"],
                                       architecture.vocab_size)  # fmt: skip
    batch = build_batch(trajectories, pad_token_id=0).to(device)
    result: dict[str, Any] = {"check": "gpu_learner", "device": str(device), "params": params,
                              **shape}  # fmt: skip
    result["parity"] = parity(model, batch, shape["groups"], shape["n"], shape["micro"])
    print(json.dumps(result["parity"]), flush=True)
    result["speed"] = speed(model, batch, architecture, shape, args.repeats)
    print(json.dumps(result["speed"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_learner_check.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
