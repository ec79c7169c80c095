"""One learner step with the HAPO loss vs the plain PPO loss, on the default architecture.

    hapo bench trainer [--batch 8 --group-size 4 --mini-batches 1 --prompt-len 32
                        --response-len 64 --varied-lengths --repeats 3 --layers L
                        --hidden H --profile]
                       [--baseline KEY=VALUE ...]

The model has SmolLM2-135M-Instruct's architecture (``config.json`` of ``model.path``, by
default the installed SmolLM2 folder) with random weights: the weights are never loaded.
``--layers``/``--hidden`` shrink it for smoke tests. Both variants run ``learner_step`` on
the same batch and model, alternating, after one untimed warm-up step each; the fastest
repeat of each is compared. "PPO" is the same step with ``adaptive_clip`` and
``adaptive_advantage`` off (so the training forward computes no entropy); everything else,
advantage estimator included, is identical. ``--baseline`` replaces PPO by the HAPO step
under those config overrides (``--baseline trainer.reuse_first_forward=false``: what a
setting buys, measured the same way). ``--profile`` then runs one more HAPO step under
``torch.profiler`` and prints its operators by self CPU time (after the figures, which it
does not change).

Model-FLOPs utilisation: the model FLOPs of the HAPO step (``learner_step_flops``: the
matrix products of each epoch's forward and backward and of the ``pi_prox`` forward of the
samples past the first mini-batch (``trainer.reuse_first_forward``), as the learner runs
them, each prompt once per group and the vocabulary projection on response tokens only)
over its fastest time, divided by the peak of one large matrix product in the
step's compute dtype measured in the same run (``hapo.runtime.cpus.matmul_flops``). Last line:
{"bench": "trainer", "hapo_loss_overhead": X, "tokens_per_s": Y, "mfu": M,
 "matmul_peak_gflops": P, "compute_dtype": D, "peak_mem_mb": Z}
with X = HAPO step time / PPO step time - 1 and Y the HAPO step's tokens/s; with
``--baseline``, "baseline": the overrides and "speedup_over_baseline": baseline step time /
HAPO step time in place of X.
"""

from __future__ import annotations

import argparse
import json
import resource
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hapo.config import HapoConfig, load_config
from hapo.runtime.cpus import matmul_flops
from hapo.training.learner import learner_step, make_optimizer
from hapo.training.policy import build_batch, compute_dtype, layer_weights, learner_device
from hapo.transport.messages import ScoredTrajectory


def group_response_lens(group_size: int, response_len: int, varied: bool) -> list[int]:
    """Each sample's response length in a group: ``response_len`` for all, or ``varied``,
    ``response_len x (j + 1) / group_size`` for the ``j``-th from the shortest (the longest
    at ``response_len`` and the mean a little over half of it, as on the arithmetic tasks,
    where a group's longest sample often runs to the length limit)."""
    if not varied:
        return [response_len] * group_size
    return [max(1, round(response_len * (j + 1) / group_size)) for j in reversed(range(group_size))]


def _batch_trajectories(
    groups: int, prompt_len: int, response_lens: Sequence[int], vocab: int
) -> list[ScoredTrajectory]:
    """Random trajectories, a prompt per group (as the rollout makes them), the samples of
    each group ``response_lens`` long; each group has both rewards, so advantages are
    nonzero."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, vocab, prompt_len) for _ in range(groups)]
    return [
        ScoredTrajectory(
            run_id="bench",
            group_id=f"g{group}",
            sample_idx=index,
            n=len(response_lens),
            policy_version=0,
            policy_version_end=0,
            prompt_ids=prompts[group],
            response_ids=rng.integers(1, vocab, length),
            logprobs=np.zeros(length),
            finish_reason="length",
            answer="0",
            reward=float(index % 2),
            reward_reason="bench",
        )
        for group in range(groups)
        for index, length in enumerate(response_lens)
    ]


def learner_step_flops(
    architecture: Any,
    groups: int,
    prompt_len: int,
    response_lens: Sequence[int],
    config: HapoConfig,
    *,
    attention: bool = True,
) -> float:
    """Model FLOPs of one ``learner_step`` on ``groups`` prompts of ``prompt_len`` tokens,
    each with a response of each length of ``response_lens`` (a Llama-type
    ``architecture``).

    A forward multiplies by every weight matrix of the layers once per token it feeds (2
    FLOPs a weight): each prompt once per group (its KV cache serves the group's responses)
    and each response but its last token, which predicts nothing, without padding (packed,
    ``trainer.pack_responses``; padded micro-batches take more); and by the vocabulary
    projection for response tokens only. ``attention`` adds 4 x layers x hidden FLOPs per
    token and position attended (torch's CPU attention kernel is not in torch's own FLOP
    count, so the test compares without it). The step runs, per epoch, a forward and a
    backward (twice the forward's FLOPs) over the whole batch, and the ``pi_prox`` forward
    over the samples whose training forward does not serve as theirs: the whole batch
    but the first mini-batch with ``trainer.reuse_first_forward``, the whole batch
    without (and once more over the whole batch with ``recompute_at_sampling_temperature``).
    """
    hidden, layers = architecture.hidden_size, architecture.num_hidden_layers
    per_layer = layer_weights(architecture)
    fed = groups * sum(length - 1 for length in response_lens)
    prompt_tokens, response_tokens = groups * prompt_len, groups * sum(response_lens)
    attended = groups * (
        prompt_len * (prompt_len + 1) / 2
        + sum((length - 1) * (prompt_len + length / 2) for length in response_lens)
    )
    forward = (
        2 * layers * per_layer * (prompt_tokens + fed)
        + 2 * hidden * architecture.vocab_size * response_tokens
        + attention * 4 * layers * hidden * attended
    )
    actor = config.actor_rollout_ref.actor
    prox_groups = groups
    if config.trainer.reuse_first_forward:
        prox_groups -= min(actor.ppo_mini_batch_size, groups)
    prox_forwards = prox_groups / groups
    if config.algorithm.rollout_correction.recompute_at_sampling_temperature:
        prox_forwards += 1
    return forward * (prox_forwards + 3 * actor.ppo_epochs)


def _variant_config(
    args: argparse.Namespace, hapo_loss: bool, extra: tuple[str, ...] = ()
) -> HapoConfig:
    groups = args.batch // args.group_size
    switch = str(hapo_loss).lower()
    return load_config(
        overrides=[
            f"actor_rollout_ref.rollout.n={args.group_size}",
            f"data.train_batch_size={groups}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={groups // args.mini_batches}",
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={args.micro_batch}",
            f"actor_rollout_ref.actor.adaptive_clip={switch}",
            f"actor_rollout_ref.actor.adaptive_advantage={switch}",
            f"trainer.precision={args.precision}",
            *extra,
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="hapo bench trainer", description=__doc__)
    parser.add_argument("--batch", type=int, default=8, help="samples per step")
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per fwd/bwd")
    parser.add_argument("--mini-batches", type=int, default=1, help="optimizer steps a step")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--varied-lengths", action="store_true",
                        help="a group's samples run from --response-len down to 1/group "
                        "of it (group_response_lens), as real groups vary")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--layers", type=int, help="override num_hidden_layers")
    parser.add_argument("--hidden", type=int, help="override hidden_size (and intermediate)")
    parser.add_argument("--profile", action="store_true",
                        help="print one more HAPO step's operators by CPU time")  # fmt: skip
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="trainer.precision of both variants")  # fmt: skip
    parser.add_argument("--baseline", nargs="+", metavar="KEY=VALUE",
                        help="compare with HAPO under these overrides, not PPO")  # fmt: skip
    args = parser.parse_args(argv)
    if args.batch % args.group_size or args.batch % args.micro_batch:
        parser.error("--group-size and --micro-batch must divide --batch")
    if (args.batch // args.group_size) % args.mini_batches:
        parser.error("--mini-batches must divide the prompts (--batch / --group-size)")

    path = load_config().model.local_path
    if not (path / "config.json").is_file():
        parser.error(f"no config.json in {path}: run `hapo model install` first")
    architecture = AutoConfig.from_pretrained(path)
    if args.layers:
        architecture.num_hidden_layers = args.layers
    if args.hidden:
        architecture.hidden_size = args.hidden
        architecture.intermediate_size = args.hidden * 8 // 3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(architecture, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"random {architecture.model_type} from {path / 'config.json'}: "
        f"{architecture.num_hidden_layers} layers, hidden {architecture.hidden_size}, "
        f"vocab {architecture.vocab_size}, {params / 1e6:.1f} M parameters",
        flush=True,
    )
    response_lens = group_response_lens(args.group_size, args.response_len, args.varied_lengths)
    groups = args.batch // args.group_size
    trajectories = _batch_trajectories(
        groups, args.prompt_len, response_lens, architecture.vocab_size
    )
    batch = build_batch(trajectories, pad_token_id=architecture.pad_token_id or 0)
    baseline = "baseline" if args.baseline else "ppo"
    configs = {
        "hapo": _variant_config(args, True),
        baseline: _variant_config(args, bool(args.baseline), tuple(args.baseline or ())),
    }
    optimizer, scheduler = make_optimizer(model, configs["hapo"].actor_rollout_ref.actor.optim)
    print(
        f"batch: {args.batch} samples x ({args.prompt_len} prompt + {response_lens} "
        f"response) tokens, micro-batch {args.micro_batch}",
        flush=True,
    )

    seconds: dict[str, list[float]] = {name: [] for name in configs}
    tokens_per_s: list[float] = []
    for repeat in range(args.repeats + 1):  # repeat 0 warms up (allocations, optimizer state)
        for name, config in configs.items():
            metrics = learner_step(model, optimizer, scheduler, batch, config).metrics
            label = "warm-up" if repeat == 0 else f"repeat {repeat}"
            print(f"  {name} {label}: {metrics['perf/step_s']:.2f} s "
                  f"({metrics['perf/tokens_per_s']:.0f} tokens/s, "
                  f"clipfrac {metrics['loss/clipfrac']:.3f})", flush=True)  # fmt: skip
            if repeat:
                seconds[name].append(metrics["perf/step_s"])
                if name == "hapo":
                    tokens_per_s.append(metrics["perf/tokens_per_s"])
    hapo_s, other_s = min(seconds["hapo"]), min(seconds[baseline])
    device = learner_device(configs["hapo"])
    dtype = compute_dtype(configs["hapo"], device) or torch.float32
    peak = matmul_flops(dtype, size=2048, repeats=16, device=device)
    flops = learner_step_flops(
        architecture, groups, args.prompt_len, response_lens, configs["hapo"]
    )
    versus: dict[str, Any] = {"hapo_loss_overhead": round(hapo_s / other_s - 1, 4)}
    if args.baseline:
        versus = {"baseline": args.baseline,
                  "speedup_over_baseline": round(other_s / hapo_s, 4)}  # fmt: skip
    result = {
        "bench": "trainer",
        **versus,
        "tokens_per_s": round(max(tokens_per_s), 1),
        "mfu": round(flops / hapo_s / peak, 4),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "peak_mem_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(f"fastest step: hapo {hapo_s:.3f} s, {baseline} {other_s:.3f} s; model FLOPs "
          f"{flops / 1e9:.1f} G: {flops / hapo_s / 1e9:.1f} GFLOP/s of a {peak / 1e9:.1f} "
          f"GFLOP/s {result['compute_dtype']} matmul peak", flush=True)  # fmt: skip
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            learner_step(model, optimizer, scheduler, batch, configs["hapo"])
        table = profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        print(table, flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
