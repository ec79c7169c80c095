"""``hapo bench compare``'s figures from two runs' metrics (the runs themselves are
``hapo up``, tested end to end in tests/e2e)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.compare import PAIRS, plot, summarise


def _metrics(path: Path, step_s: float, rewards: list[float]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        {"step": step, "time": 1000.0 + step * step_s, "reward/mean": reward,
         "perf/step_s": step_s / 2, "perf/wall_step_s": step_s,
         "reward/response_length_mean": 10.0 + step}
        for step, reward in enumerate(rewards, 1)
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_steps_per_hour_and_rewards(tmp_path: Path) -> None:
    rewards = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    summary = summarise(_metrics(tmp_path / "a" / "metrics.jsonl", 30.0, rewards))
    assert summary["steps_per_hour"] == 120.0  # 6 intervals of 30 s
    assert summary["reward_first"] == 0.1
    assert summary["reward_last5"] == pytest.approx(0.5)
    assert summary["wall_step_s_median"] == 30.0
    assert summary["response_length_last"] == 17.0


def test_one_step_has_no_rate(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="fewer than 2 steps"):
        summarise(_metrics(tmp_path / "a" / "metrics.jsonl", 30.0, [0.5]))


def test_plot_draws_both_variants(tmp_path: Path) -> None:
    runs = {
        name: _metrics(tmp_path / name / "metrics.jsonl", 20.0, [0.1 * i for i in range(8)])
        for name in PAIRS["hapo-grpo"]
    }
    plot(runs, tmp_path / "reward.png")
    assert (tmp_path / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grpo_turns_every_hapo_part_off() -> None:
    from hapo.config import load_config

    grpo = load_config(overrides=PAIRS["hapo-grpo"]["grpo"], environ={})
    hapo = load_config(overrides=PAIRS["hapo-grpo"]["hapo"], environ={})
    assert hapo.algorithm.adv_estimator == "hapo"
    assert hapo.actor_rollout_ref.rollout.adaptive_temperature
    actor = grpo.actor_rollout_ref.actor
    assert grpo.algorithm.adv_estimator == "grpo"
    assert not grpo.actor_rollout_ref.rollout.adaptive_temperature
    assert not (actor.adaptive_clip or actor.adaptive_advantage)
