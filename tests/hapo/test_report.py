"""Run reports: plots and summary.md from a metrics.jsonl shaped like the trainer's."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from hapo.report import MOVING_AVERAGE_STEPS, PLOTS, moving_average, write_report
from tests.entrypoints.test_cli import run as run_cli


def step_record(step: int) -> dict:
    """A trainer JSONL line (``TrainerService._record``) with made-up values."""
    reward = (step % 7) / 10 + step / 1000  # no ties for "best"
    return {
        "step": step, "policy_version": step, "reward/mean": reward, "reward/std": 0.1,
        "reward/response_length_mean": 20.0 + step, "reward/response_length_max": 64,
        "entropy/mean": 1.5 - step / 100, "entropy/h_hat_pos_frac": 0.2,
        "entropy/h_hat_mean": -0.1, "entropy/h_hat_p10": -0.6, "entropy/h_hat_p50": -0.05,
        "entropy/h_hat_p90": 0.4, "loss/clipfrac": 0.01, "loss/clipfrac_high_entropy": 0.02,
        # a step without low-entropy tokens has no low-entropy clip fraction
        "loss/clipfrac_low_entropy": math.nan if step == 3 else 0.005,
        "staleness/mean": 0.5, "staleness/max": 1, "perf/tokens_per_s": 1000.0,
        "perf/step_s": 2.0, "perf/weight_sync_s": 0.5, "perf/samples": 16.0,
        "staleness/dropped_samples": float(step == 2), "rollout_corr/weight_mean": 1.0,
        "rollout_corr/weight_max": 2.0, "rollout_corr/kl": 0.004, "rollout_corr/truncated_frac": 0.001,
        "rollout_corr/masked_frac": 0.0, "entropy/t_dyn_mean": 1.0, "entropy/t_dyn_min": 0.95,
        "entropy/t_dyn_max": 1.05, "data/group_ids": [f"{step:08d}"],
    }  # fmt: skip


def write_metrics(run_dir: Path, records: list[dict], tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(record) + "\n" for record in records)
    (run_dir / "metrics.jsonl").write_text(lines + tail)


def naive_moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for index in range(len(values)):
        finite = [v for v in values[max(0, index - window + 1) : index + 1] if math.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def test_full_run_draws_every_plot_and_summarises(tmp_path: Path) -> None:
    run_dir = tmp_path / "run-abc"
    steps = range(1, 31)
    write_metrics(run_dir, [step_record(s) for s in steps], tail='{"step": 31, "rew')
    summary = write_report(run_dir)
    assert summary == run_dir / "summary.md"
    for plot in PLOTS:
        with Image.open(run_dir / "plots" / f"{plot.name}.png") as image:
            assert image.format == "PNG" and image.size == (700, 400)
    text = summary.read_text()
    assert text.startswith("# Run run-abc\n")
    assert "30 steps (1-30)." in text
    rewards = [(s % 7) / 10 + s / 1000 for s in steps]
    smooth = naive_moving_average(rewards, MOVING_AVERAGE_STEPS)
    best_smooth = int(np.argmax(smooth))
    assert "| first | 0.101 (step 1) | 0.101 (step 1) |" in text
    assert f"| last | 0.23 (step 30) | {smooth[-1]:.4g} (step 30) |" in text
    assert (
        f"| best | 0.627 (step 27) | {smooth[best_smooth]:.4g} (step {best_smooth + 1}) |" in text
    )
    assert "- learner time: 60.0 s" in text
    assert "- tokens trained (prompt + response): 60000" in text
    assert "- samples left out of the loss as too stale: 1" in text  # step 2's
    assert "- clipped tokens: mean 0.0100 a step, 30 of 30 steps above 0" in text
    assert "- learner throughput: 1000 tokens/s" in text
    assert "- samples trained: 480" in text
    for plot in PLOTS:
        assert f"](plots/{plot.name}.png)" in text
    assert "1 line(s) of `metrics.jsonl` could not be read" in text


def test_missing_keys_skip_their_plots(tmp_path: Path) -> None:
    records = [{"step": s, "reward/mean": s / 10, "entropy/mean": None} for s in (2, 1, 3)]
    write_metrics(tmp_path, records)
    text = write_report(tmp_path).read_text()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["reward.png"]
    assert "3 steps (1-3)." in text
    assert "| best | 0.3 (step 3) | 0.2 (step 3) |" in text  # sorted by step
    assert "Token entropy: not drawn, no data." in text
    assert "## Totals" not in text


def test_steps_without_reward_and_empty_files(tmp_path: Path) -> None:
    write_metrics(tmp_path / "a", [{"step": 1, "staleness/mean": 0.0}])
    text = write_report(tmp_path / "a").read_text()
    assert "## Reward" not in text and "staleness: mean 0.00" in text
    assert (tmp_path / "a" / "plots" / "staleness.png").is_file()
    write_metrics(tmp_path / "b", [])
    assert "No training step recorded" in write_report(tmp_path / "b").read_text()


@given(
    st.lists(st.one_of(st.floats(-1e6, 1e6), st.just(math.nan)), min_size=1, max_size=40),
    st.integers(1, 12),
)
def test_moving_average_is_the_trailing_mean_of_finite_values(
    values: list[float], window: int
) -> None:
    got = moving_average(np.array(values), window)
    np.testing.assert_allclose(got, naive_moving_average(values, window), rtol=1e-9, atol=1e-6)


def test_cli_report(tmp_path: Path) -> None:
    write_metrics(tmp_path, [step_record(1)])
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "summary.md") in result.stdout
    missing = run_cli("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "no metrics.jsonl" in missing.stderr


def test_importing_the_report_does_not_import_matplotlib() -> None:
    code = "import sys, entrypoints.cli, hapo.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
