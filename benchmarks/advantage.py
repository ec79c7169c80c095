"""Vectorised HAPO advantage vs the seed's loop form, on the same batch.

    hapo bench advantage [--groups 256 --group-size 16 --seq-len 1024]

Last line: {"bench": "advantage", "speedup_vs_loop": X, "max_abs_diff": Y, ...}.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

import numpy as np
import torch

from benchmarks.spec_reference import hapo_advantage_loop
from hapo.algorithm import compute_hapo_outcome_advantage


def make_batch(
    groups: int,
    group_size: int,
    seq_len: int,
    seed: int,
    mask_dtype: torch.dtype = torch.float32,
    labels: str = "str",
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Rewards ``[B, T]`` (0/1 on the last valid token), mask ``[B, T]``, group labels ``[B]``.

    ``labels``: ``str`` (a numpy unicode array of uuids), ``object`` (uuid ``str`` objects,
    as verl's ``uid``) or ``int``.
    """
    generator = torch.Generator().manual_seed(seed)
    batch = groups * group_size
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)
    mask = (torch.arange(seq_len) < lengths.unsqueeze(-1)).to(mask_dtype)
    difficulty = torch.rand(groups, generator=generator).repeat_interleave(group_size)
    correct = (torch.rand(batch, generator=generator) < difficulty).float()
    rewards = torch.zeros(batch, seq_len)
    rewards[torch.arange(batch), lengths - 1] = correct
    rng = np.random.default_rng(seed)
    if labels == "int":
        names = rng.permutation(groups)
    else:
        names = np.array([str(uuid.UUID(int=int(rng.integers(2**63)))) for _ in range(groups)])
    index = rng.permutation(np.repeat(names, group_size))
    return rewards, mask, index.astype(object) if labels == "object" else index


def _best_seconds(fn, repeats: int) -> float:
    """Best of ``repeats`` runs (timeit's convention: the least disturbed by other work)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="hapo bench advantage", description=__doc__)
    parser.add_argument("--groups", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mask-dtype", choices=["float32", "int64", "bool"], default="float32",
        help="dtype of the response mask (verl holds int64 or float32)",
    )  # fmt: skip
    parser.add_argument(
        "--labels", choices=["str", "object", "int"], default="str",
        help="group labels: numpy unicode uuids, uuid str objects (verl's uid), or ints",
    )  # fmt: skip
    args = parser.parse_args(argv)

    mask_dtype = getattr(torch, args.mask_dtype)
    rewards, mask, index = make_batch(
        args.groups, args.group_size, args.seq_len, args.seed, mask_dtype, args.labels
    )
    print(
        f"batch: {args.groups} groups x {args.group_size} samples, {args.seq_len} tokens, "
        f"{args.mask_dtype} mask, {args.labels} labels, {torch.get_num_threads()} torch threads"
    )

    def vectorised() -> torch.Tensor:
        return compute_hapo_outcome_advantage(
            rewards, mask, index, reference_padding_fallback=True
        )[0]

    def loop() -> torch.Tensor:
        return hapo_advantage_loop(rewards, mask, index)

    fast, slow = vectorised(), loop()  # warm-up, and the outputs compared below
    valid = mask.bool()
    max_abs_diff = (fast[valid] - slow[valid]).abs().max().item()
    vectorised_s = _best_seconds(vectorised, args.repeats)
    loop_s = _best_seconds(loop, max(1, args.repeats // 10))
    result = {
        "bench": "advantage",
        "speedup_vs_loop": round(loop_s / vectorised_s, 1),
        "max_abs_diff": max_abs_diff,
        "vectorised_ms": round(vectorised_s * 1e3, 2),
        "loop_ms": round(loop_s * 1e3, 1),
        "samples": args.groups * args.group_size,
        "seq_len": args.seq_len,
        "mask_dtype": args.mask_dtype,
        "labels": args.labels,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
