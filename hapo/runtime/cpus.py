"""What the CPUs can do: native bf16 (and whether it beats fp32 here), and CPU lists in the
kernel's notation (``0-3,6``), as ``taskset -c`` and ``/proc`` write them.

``hapo up --pin`` pins each service to CPUs of its own this way, which on one machine is
what separate accelerators give a disaggregated run: rollout and learner stop competing for
the same cores. Children inherit the affinity, and both torch (its intra-op threads) and
vLLM's CPU worker (its OpenMP thread binding) size themselves to the allowed CPUs.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch is imported where it is used: the launcher needs none of it
    import torch

RolloutDtype = Literal["bfloat16", "float16", "float32"]


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Elsewhere bf16 is
    emulated: on an AVX2-only CPU a bf16 matrix product measured over 100x slower than fp32."""
    try:
        flags = cpuinfo.read_text()
    except OSError:  # not Linux
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


BF16_MIN_SPEEDUP = 1.25
"""How much faster than fp32 a CPU's bf16 matrix products must be for the learner's ``auto``
precision to take bf16: the casts autocast adds cost something, and a wide margin keeps
the choice the same from one start to the next on a noisy machine."""


def prefers_bf16(fp32_flops: float, bf16_flops: float) -> bool:
    """Whether matrix products at ``bf16_flops`` FLOP/s beat fp32's ``fp32_flops`` by
    ``BF16_MIN_SPEEDUP``."""
    return bf16_flops >= BF16_MIN_SPEEDUP * fp32_flops


def matmul_flops(
    dtype: torch.dtype,
    size: int = 512,
    repeats: int = 8,
    device: str | torch.device = "cpu",
    budget_s: float = 2.0,
) -> float:
    """The best FLOP/s of ``size x size`` products in ``dtype`` on ``device`` with this
    process's threads (the learner's commonest operation): one untimed product, then up to
    ``repeats`` timed ones, fewer once ``budget_s`` is spent. ``.item()`` waits for each
    product on a GPU too."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    (a @ b).sum().item()
    best, deadline = float("inf"), time.perf_counter() + budget_s
    for _ in range(repeats):
        started = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - started)
        if started > deadline:
            break
    return 2 * size**3 / best


@functools.cache
def cpu_bf16_is_faster() -> bool:
    """Whether this CPU multiplies bf16 faster than fp32 (``prefers_bf16``), measured once
    per process where it has native bf16 (``cpu_has_native_bf16``; emulated bf16 is ~100x
    slower, not worth a probe). The flags alone do not say: an AMD EPYC with AVX512-BF16
    ran bf16 products at 350-406 GFLOP/s against fp32's 136-150, an Intel Xeon with
    AVX512-BF16 but no AMX exposed at 145-154 against 240-313 (its learner step 1.4x
    faster in fp32). About 20 ms."""
    if not cpu_has_native_bf16():
        return False
    import torch

    return prefers_bf16(matmul_flops(torch.float32), matmul_flops(torch.bfloat16))


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name as ``/proc/cpuinfo`` gives it (``"unknown"`` where it does not):
    figures measured on different CPU kinds are not comparable, so results carry it."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:  # not Linux
        return "unknown"
    for line in lines:
        key, colon, value = line.partition(":")
        if colon and key.strip() == "model name":
            return value.strip()
    return "unknown"


def resolve_rollout_dtype(
    configured: str, cuda: bool, bf16_faster: bool | None = None
) -> RolloutDtype:
    """``rollout.dtype`` as the rollout's engine runs it: ``auto`` is bfloat16 on a GPU
    (``cuda``) or on a CPU that multiplies bf16 faster than fp32, else float32 (vLLM on
    the Xeon of ``cpu_bf16_is_faster``'s docstring generated 1.28x faster in fp32).
    ``bf16_faster`` defaults to this machine's ``cpu_bf16_is_faster()``, probed only where
    it matters (no GPU, ``auto``). Only the rollout resolves it: a trainer sends the weights
    in the dtype the replica reports."""
    if configured != "auto":
        return configured  # type: ignore[return-value]  # the config's Literal
    if cuda:
        return "bfloat16"
    if bf16_faster is None:
        bf16_faster = cpu_bf16_is_faster()
    return "bfloat16" if bf16_faster else "float32"


def parse_cpu_list(text: str) -> frozenset[int]:
    """``"0-2,5"`` -> ``{0, 1, 2, 5}``.

    Raises:
        ValueError: not a CPU list, naming the bad part.
    """
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{part!r} is not a CPU or a range of CPUs (e.g. 0, 2-3)")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"{part!r}: the range ends before it starts")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``"0-2,5"``."""
    ranges: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def allowed_cpus() -> frozenset[int]:
    """The CPUs this process may run on (all of them where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))
