"""``scripts/gpu_learner_check.py`` on the CPU at a small scale, and what it imports: only
what the lent GPU machine has (torch, transformers, numpy, msgpack, PyYAML) and the
pydantic wheels that travel with it, never the services' packages."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hapo.runtime.cpus import cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_learner_check.py"
_spec = importlib.util.spec_from_file_location("gpu_learner_check", SCRIPT)
gpu_learner_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_learner_check)

# This project's dependencies the lent GPU machine lacks (its package list: torch,
# transformers, numpy, msgpack, PyYAML, typer, rich, tqdm, safetensors, prometheus-client and
# many more). pydantic is missing there too: its wheels travel (scripts/gpu_learner_check.sh).
ABSENT_THERE = {"pydantic_settings", "redis", "fastapi", "uvicorn", "starlette", "math_verify",
                "ray", "vllm"}  # fmt: skip
TRAVELLING = {"pydantic", "pydantic_core", "annotated_types", "typing_inspection"}


@pytest.mark.slow
def test_small_check_runs_and_bf16_agrees_with_fp32(tmp_path: Path) -> None:
    result = gpu_learner_check.main(["--small", "--device", "cpu", "--repeats", "1",
                                     "--out", str(tmp_path)])  # fmt: skip
    assert json.loads((tmp_path / "gpu_learner_check.json").read_text()) == result
    parity = result["parity"]
    # bf16 rounds (8 bits of mantissa): the passes differ, a little.
    assert 0 < parity["log_prob_max_abs_diff"] < 0.5
    assert parity["log_prob_mean_abs_diff"] < 0.05
    assert 0 < parity["grad_rel_l2_diff"] < 0.2 and parity["grad_cosine"] > 0.98
    speed = result["speed"]
    assert speed["hapo_step_s"] > 0 and speed["tokens_per_s"] > 0
    assert speed["mfu"] > 0 and speed["matmul_peak_gflops"] > 0
    if cpu_has_native_bf16():
        # Where bf16 is emulated (AVX2), a 2048-wide bf16 product is no peak: the small
        # step's own products ran ~2x its rate on such a CPU.
        assert speed["mfu"] < 1


def test_imports_only_what_the_gpu_machine_has() -> None:
    probe = (  # what the shell script runs: the repository root on the path, then the file
        "import runpy, sys; sys.path.insert(0, '.'); "
        "runpy.run_path('scripts/gpu_learner_check.py', run_name='probe'); "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} "
        "- set(sys.stdlib_module_names))))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=REPO, check=True)  # fmt: skip
    imported = set(result.stdout.split())
    assert {"torch", "transformers", "hapo", "pydantic"} <= imported
    assert imported & ABSENT_THERE == set()
    # The shell script carries these wheels, named by their distributions.
    wheels = (REPO / "scripts" / "gpu_learner_check.sh").read_text()
    for module in TRAVELLING:
        assert f'"{module.replace("_", "-")}"' in wheels, module
