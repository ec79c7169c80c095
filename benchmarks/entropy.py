"""Chunked vs naive token entropy of [B, T, V] bf16 logits: peak memory and time.

    hapo bench entropy [--batch 8 --seq-len 2048 --vocab 49152 --chunk-size 512]

Each variant runs in a fresh process, so peak resident memory (``ru_maxrss``) is its own.
"Naive" is verl's ``entropy_from_logits`` on the whole tensor (an fp32 copy, softmax,
logsumexp). Last line: {"bench": "entropy", "peak_mem_ratio": X, "time_ratio": Y, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from hapo.algorithm import entropy_from_logits_chunked


def naive_entropy(logits: torch.Tensor) -> torch.Tensor:
    """verl's ``entropy_from_logits`` on fp32 logits ``[B, T, V]`` -> ``[B, T]``."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    logits = torch.empty(args.batch, args.seq_len, args.vocab, dtype=torch.bfloat16)
    for row in logits:  # fill in place: no fp32 temporary of the whole tensor
        row.normal_(0.0, 3.0)
    base_mb = _rss_mb()
    start = time.perf_counter()
    if args.worker == "naive":
        entropy = naive_entropy(logits)
    else:
        entropy = entropy_from_logits_chunked(logits, chunk_size=args.chunk_size)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "seconds": seconds, "extra_peak_mb": peak_mb - base_mb, "input_mb": logits.nbytes / 2**20,
        "checksum": entropy.double().sum().item(),
    }))  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="hapo bench entropy", description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return {}

    runs = {}
    for variant in ("chunked", "naive"):
        print(
            f"running {variant} on [{args.batch}, {args.seq_len}, {args.vocab}] bf16 ...",
            flush=True,
        )
        command = [sys.executable, "-m", "benchmarks.entropy", "--worker", variant,
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                   "--vocab", str(args.vocab), "--chunk-size", str(args.chunk_size)]  # fmt: skip
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs[variant] = json.loads(output.strip().splitlines()[-1])
        print(f"  {variant}: {runs[variant]['seconds']:.2f} s, "
              f"peak +{runs[variant]['extra_peak_mb']:.0f} MB over the input")  # fmt: skip
    naive, chunked = runs["naive"], runs["chunked"]
    checksum_rel_diff = abs(naive["checksum"] - chunked["checksum"]) / abs(naive["checksum"])
    result = {
        "bench": "entropy",
        "peak_mem_ratio": round(naive["extra_peak_mb"] / max(chunked["extra_peak_mb"], 1.0), 1),
        "time_ratio": round(naive["seconds"] / chunked["seconds"], 2),
        "naive_extra_peak_mb": round(naive["extra_peak_mb"]),
        "chunked_extra_peak_mb": round(chunked["extra_peak_mb"]),
        "naive_s": round(naive["seconds"], 2),
        "chunked_s": round(chunked["seconds"], 2),
        "input_mb": round(naive["input_mb"]),
        "checksum_rel_diff": checksum_rel_diff,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
