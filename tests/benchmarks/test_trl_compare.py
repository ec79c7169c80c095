"""Pure helpers of benchmarks/trl_compare.py (no TRL, no model, no services)."""

import json
import math

import pytest

from benchmarks import trl_compare as tc


@pytest.mark.parametrize(
    ("response", "answer", "reward"),
    [
        ("7", "7", 1.0),
        ("3 + 4 = 7.", "7", 1.0),
        ("The answer is **12**", "12", 1.0),
        ("The answer is 8", "7", 0.0),
        ("seven", "7", 0.0),
        ("7 or maybe 9", "7", 0.0),
        ("\\boxed{7}", "7", 1.0),
        ("3 + 4", "7", 0.0),  # the last number is an operand, not an answer
    ],
)
def test_integer_reward(response, answer, reward):
    assert tc.integer_reward(response, answer) == reward


def _record(step_s, tokens, reward=0.5):
    return {"step_s": step_s, "gen_tokens": tokens, "reward": reward}


def test_summarize_leaves_out_the_warm_up_step():
    records = [_record(100.0, 4096), _record(10.0, 1000, 0.25), _record(30.0, 3000, 0.75)]
    summary = tc.summarize(records)
    assert summary["steps"] == 2
    assert summary["s_per_step"] == pytest.approx(20.0)
    assert summary["steps_per_hour"] == pytest.approx(180.0)
    assert summary["gen_tokens_per_s"] == pytest.approx(100.0)
    assert summary["response_length_mean"] == pytest.approx(4000 / (2 * tc.PROMPTS * tc.GROUP))
    assert summary["reward_mean"] == pytest.approx(0.5)
    assert summary["warmup_s"] == 100.0


def test_summarize_with_only_the_warm_up_step_is_nan():
    summary = tc.summarize([_record(100.0, 4096)])
    assert summary["steps"] == 0
    assert math.isnan(summary["steps_per_hour"]) and math.isnan(summary["s_per_step"])


def test_hapo_records_time_steps_by_metrics_lines():
    keys = ("reward/response_length_mean", "perf/samples", "reward/mean", "perf/step_s")
    lines = [
        dict(zip(keys, row, strict=True))
        for row in ((10.0, 64.0, 0.1, 5.0), (20.0, 64.0, 0.2, 6.0))
    ]
    records = tc.hapo_records(lines, [130.0, 142.5], start=100.0)
    assert [r["step_s"] for r in records] == [30.0, 12.5]
    assert [r["gen_tokens"] for r in records] == [640.0, 1280.0]
    assert [r["learner_s"] for r in records] == [5.0, 6.0]


def test_repeat_line_ratios_and_skipped_sides():
    hapo = tc.summarize([_record(50.0, 1), _record(10.0, 1000)])  # 100 tokens/s
    trl = tc.summarize([_record(90.0, 1), _record(80.0, 800)])  # 10 tokens/s
    line = tc.repeat_line(hapo, trl)
    assert line["hapo_steps_per_hour"] == pytest.approx(360.0)
    assert line["trl_steps_per_hour"] == pytest.approx(45.0)
    assert line["speedup"] == pytest.approx(8.0)
    assert line["speedup_per_token"] == pytest.approx(10.0)
    skipped = tc.repeat_line(None, trl)
    assert skipped["speedup"] is None and skipped["hapo_s_per_step"] is None
    json.loads(json.dumps(skipped, allow_nan=False))  # valid JSON: no NaN


def test_result_line_means_the_repeats_ratios():
    first = {"speedup": 2.0, "speedup_per_token": 1.5}
    second = {"speedup": 3.0, "speedup_per_token": None}
    line = tc.result_line([first, second], steps=5)
    assert line["bench"] == "trl_compare" and line["repeats"] == [first, second]
    assert line["speedup_mean"] == pytest.approx(2.5)
    assert line["speedup_per_token_mean"] == pytest.approx(1.5)


def test_result_line_turns_nan_into_null():
    repeat = tc.repeat_line(tc.summarize([_record(1.0, 1)]), None)
    assert repeat["hapo_steps_per_hour"] is None and repeat["speedup"] is None
    assert tc.result_line([repeat], steps=0)["speedup_mean"] is None


def test_table_shows_both_sides():
    text = tc.table(tc.summarize([_record(50.0, 1), _record(10.0, 1000)]), None)
    assert "steps/hour" in text and "360.0" in text and "skipped" in text
