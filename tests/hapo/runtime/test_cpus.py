"""CPU lists in the kernel's notation, checked against a reference that expands and
compresses by brute force; the CPU's model name and the rollout dtype ``auto`` resolves to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hapo.runtime import cpus
from hapo.runtime.cpus import (
    cpu_model,
    format_cpu_list,
    matmul_flops,
    parse_cpu_list,
    prefers_bf16,
    resolve_rollout_dtype,
)


def _reference_format(cpus: set[int]) -> str:
    """Every maximal run of consecutive CPUs, found by scanning 0..max."""
    parts, cpu, top = [], 0, max(cpus)
    while cpu <= top:
        if cpu in cpus:
            start = cpu
            while cpu + 1 in cpus:
                cpu += 1
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
        cpu += 1
    return ",".join(parts)


@given(st.sets(st.integers(0, 80), min_size=1))
def test_format_matches_reference_and_parses_back(cpus: set[int]) -> None:
    text = format_cpu_list(cpus)
    assert text == _reference_format(cpus)
    assert parse_cpu_list(text) == cpus


def test_parse_accepts_overlaps_and_spaces() -> None:
    assert parse_cpu_list("0-2, 2,5") == {0, 1, 2, 5}


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "'' is not a CPU"), ("a", "'a' is not"), ("1-", "'1-' is not"),
     ("-1", "'-1' is not"), ("3-1", "ends before it starts")],
)  # fmt: skip
def test_parse_names_the_bad_part(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cpu_list(text)


@pytest.mark.parametrize(
    ("configured", "cuda", "bf16_faster", "expected"),
    [("auto", True, False, "bfloat16"), ("auto", False, True, "bfloat16"),
     ("auto", False, False, "float32"), ("float16", False, False, "float16"),
     ("bfloat16", False, False, "bfloat16"), ("float32", True, True, "float32")],
)  # fmt: skip
def test_rollout_dtype_auto_is_bf16_only_where_it_is_faster(
    configured: str, cuda: bool, bf16_faster: bool, expected: str
) -> None:
    assert resolve_rollout_dtype(configured, cuda, bf16_faster) == expected


def test_rollout_dtype_auto_follows_the_probe_not_the_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CPU with native bf16 whose fp32 products are faster (the Xeon of
    ``cpu_bf16_is_faster``) gets float32; the probe is not taken on a GPU."""
    monkeypatch.setattr(cpus, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(cpus, "matmul_flops", lambda dtype, *_, **__: {
        torch.float32: 300e9, torch.bfloat16: 150e9}[dtype])  # fmt: skip
    cpus.cpu_bf16_is_faster.cache_clear()
    try:
        assert resolve_rollout_dtype("auto", cuda=False) == "float32"
        monkeypatch.setattr(cpus, "matmul_flops", lambda *_, **__: pytest.fail("probed"))
        assert resolve_rollout_dtype("auto", cuda=True) == "bfloat16"
    finally:
        cpus.cpu_bf16_is_faster.cache_clear()


def test_cpu_model_is_the_first_model_name(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\n"
        "model name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: avx2\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n"
    )
    assert cpu_model(cpuinfo) == "AMD EPYC 7B13 64-Core Processor"
    cpuinfo.write_text("processor\t: 0\nmodel\t\t: 1\n")  # e.g. some ARM kernels
    assert cpu_model(cpuinfo) == "unknown"
    assert cpu_model(tmp_path / "absent") == "unknown"


@pytest.mark.parametrize(
    ("fp32", "bf16", "expected"),
    [
        (143e9, 378e9, True),  # AMD EPYC with AVX512-BF16 (measured)
        (276e9, 150e9, False),  # Intel Xeon with AVX512-BF16, no AMX exposed (measured)
        (175e9, 0.2e9, False),  # AVX2 only: bf16 emulated (measured)
        (100e9, 124e9, False),  # faster, not by the margin
        (100e9, 125e9, True),
    ],
)
def test_bf16_only_where_it_is_clearly_faster(fp32: float, bf16: float, expected: bool) -> None:
    assert prefers_bf16(fp32, bf16) is expected


def test_the_probe_measures_this_cpu_and_is_skipped_without_native_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rate = matmul_flops(torch.float32, size=256, repeats=2)
    assert 1e8 < rate < 1e13  # between 0.1 GFLOP/s and 10 TFLOP/s on any CPU
    cpus.cpu_bf16_is_faster.cache_clear()
    monkeypatch.setattr(cpus, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(cpus, "matmul_flops", lambda *_: pytest.fail("probed without bf16"))
    assert cpus.cpu_bf16_is_faster() is False
    cpus.cpu_bf16_is_faster.cache_clear()
