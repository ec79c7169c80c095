"""The `hapo` command line, run as a user runs it (a subprocess of the installed script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HAPO = str(Path(sys.executable).with_name("hapo"))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HAPO, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_help_does_not_import_torch() -> None:
    code = "import sys, entrypoints.cli, hapo.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    result = run("--help")
    assert result.returncode == 0
    for command in ("bench", "config", "model", "redis"):
        assert command in result.stdout


def test_config_show_applies_overrides_and_masks_token() -> None:
    result = run(
        "config", "show", "--format", "json", "actor_rollout_ref.rollout.n=4",
        env={"HAPO_API_TOKEN": "hunter2-secret-token"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["actor_rollout_ref"]["rollout"]["n"] == 4
    assert "hunter2-secret-token" not in result.stdout + result.stderr


def test_config_error_exit_code_and_message(tmp_path: Path) -> None:
    result = run("config", "show", "actor_rollout_ref.rollout.nn=4")
    assert result.returncode == 2
    assert "did you mean 'actor_rollout_ref.rollout.n'" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    result = run("config", "show", "--config", str(bad))
    assert result.returncode == 2 and "must hold a mapping" in result.stderr


def test_bench_advantage_small() -> None:
    result = run(
        "bench",
        "advantage",
        "--groups",
        "8",
        "--group-size",
        "4",
        "--seq-len",
        "32",
        "--repeats",
        "2",
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "advantage"
    assert figures["max_abs_diff"] <= 1e-5
    assert figures["samples"] == 32


def test_bench_entropy_small() -> None:
    result = run(
        "bench",
        "entropy",
        "--batch",
        "2",
        "--seq-len",
        "64",
        "--vocab",
        "500",
        "--chunk-size",
        "16",
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "entropy"
    assert figures["checksum_rel_diff"] < 1e-4
    assert figures["peak_mem_ratio"] > 0


def test_bench_unknown_name() -> None:
    result = run("bench", "nope")
    assert result.returncode == 2


def test_bench_reward_small() -> None:
    result = run("bench", "reward", "--count", "300")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "reward" and figures["count"] == 300
    assert sum(figures["reasons"].values()) == 300
    assert set(figures["reasons"]) <= {"correct", "wrong"}


def test_bench_trainer_small() -> None:
    result = run("bench", "trainer", "--layers", "2", "--hidden", "64", "--batch", "4",
                 "--group-size", "2", "--micro-batch", "2", "--prompt-len", "8",
                 "--response-len", "8", "--repeats", "1", "--profile")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("  hapo repeat 1") for line in lines)
    # The profiled step's operators, before the figures.
    assert any("Self CPU %" in line for line in lines[:-1])
    assert any(line.strip().startswith("aten::mm") for line in lines[:-1])
    figures = json.loads(lines[-1])
    assert set(figures) == {
        "bench", "hapo_loss_overhead", "tokens_per_s", "mfu", "matmul_peak_gflops",
        "compute_dtype", "peak_mem_mb",
    }  # fmt: skip
    assert figures["bench"] == "trainer"
    assert figures["hapo_loss_overhead"] > -1 and figures["tokens_per_s"] > 0
    assert 0 < figures["mfu"] < 1 and figures["matmul_peak_gflops"] > 0
    assert figures["compute_dtype"] in ("float32", "bfloat16")
    assert figures["peak_mem_mb"] > 0


def test_bench_trainer_against_a_baseline_config() -> None:
    result = run("bench", "trainer", "--layers", "2", "--hidden", "64", "--batch", "4",
                 "--group-size", "2", "--micro-batch", "2", "--mini-batches", "2",
                 "--prompt-len", "8", "--response-len", "8", "--repeats", "1",
                 "--baseline", "trainer.reuse_first_forward=false")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("  baseline repeat 1") for line in lines)
    figures = json.loads(lines[-1])
    assert figures["baseline"] == ["trainer.reuse_first_forward=false"]
    assert figures["speedup_over_baseline"] > 0 and "hapo_loss_overhead" not in figures
    bad = run("bench", "trainer", "--layers", "2", "--hidden", "64", "--batch", "4",
              "--group-size", "2", "--micro-batch", "2", "--baseline", "trainer.no_such_key=1")  # fmt: skip
    assert bad.returncode != 0 and "no_such_key" in bad.stderr


def test_redis_ensure_masks_the_password() -> None:
    # Redis's default user takes any password when none is configured (nopass).
    result = run("redis", "ensure", "redis.url=redis://default:s3cret@127.0.0.1:6379/0")
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    assert result.stdout.strip() == "found Redis at redis://default:**********@127.0.0.1:6379/0"
